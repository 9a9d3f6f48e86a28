"""Run an image-to-image job (SD 1.x/2.x or SDXL) one paid step at a time.

The model is loaded as a text-to-image pipeline; a per-job image-to-image
pipeline shares its weights (diffusers' `from_pipe`) with its own scheduler.
With strength s, the scheduler skips the first steps and runs
int(num_inference_steps * s): those are the steps executed and paid for, and
a job moved mid-way resumes within that tail.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from pipelines.job_pipeline import job_pipeline
from pipelines.requests import OutputShape, decode_image, output_shape
from pipelines.resume import ResumePoint, resuming_scheduler
from pipelines.schedule import schedule
from pipelines.stepping import generators, step_callback
from pipelines.tiny import quiet_diffusers

if TYPE_CHECKING:
    from PIL import Image

    from pipelines.loader import LoadedModel
    from pipelines.text_to_image import StepHooks
    from protocol.messages import ImageToImageParams


def _not_upcast_advice(record: logging.LogRecord) -> bool:
    """SDXL img2img upcasts its VAE with `.to(float32)` on every job; diffusers then
    advises against casting with `to()`, once per job. The advice is not actionable."""
    return "should be kept in float32" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_not_upcast_advice)


@contextlib.contextmanager
def img2img_pipeline(model: LoadedModel) -> Iterator[Any]:
    """An image-to-image pipeline for one job over the model's weights."""
    with job_pipeline(model) as base:
        with quiet_diffusers():
            from diffusers import AutoPipelineForImage2Image

            pipe = AutoPipelineForImage2Image.from_pipe(base)
        pipe.set_progress_bar_config(disable=True)
        yield pipe


def img2img_steps(params: ImageToImageParams, model: LoadedModel | None = None) -> int:
    """Steps executed: the tail of the schedule that strength keeps (diffusers' get_timesteps)."""
    n = params.num_inference_steps
    kept = min(int(n * params.strength), n)
    if model is None:
        return kept
    plan = schedule(model.pipe.scheduler, n)
    return max(0, plan.timesteps - max(n - kept, 0) * plan.order)


def img2img_schedule_offset(params: ImageToImageParams, model: LoadedModel) -> int:
    """Steps of the full schedule that strength skips: where the executed tail starts."""
    total = schedule(model.pipe.scheduler, params.num_inference_steps).timesteps
    return total - img2img_steps(params, model)


def run_image_to_image(
    model: LoadedModel,
    params: ImageToImageParams,
    hooks: StepHooks,
    seed: int,
    resume: ResumePoint | None = None,
) -> list[Image.Image]:
    """num_images_per_prompt images of the input image's size, gated by `hooks`.

    With `resume`, the job continues from latents after `resume.step` of its
    executed steps (the tail of the schedule that strength keeps): the input
    image is already in those latents, so the rest is the text-to-image loop
    started at that point of the full schedule.
    """
    shape = output_shape(params)
    image = decode_image(params.image, "image-to-image")
    if resume is not None:
        return _resume_image_to_image(model, params, hooks, seed, resume, shape)
    hooks.wait_for_step(1)
    with img2img_pipeline(model) as pipe, torch.inference_mode():
        out = pipe(
            prompt=params.prompt,
            negative_prompt=params.negative_prompt or None,
            image=image,
            strength=params.strength,
            guidance_scale=params.guidance_scale,
            num_inference_steps=params.num_inference_steps,
            num_images_per_prompt=params.num_images_per_prompt,
            generator=generators(model.device, seed, params.num_images_per_prompt),
            output_type="pil",
            callback_on_step_end=step_callback(hooks, img2img_steps(params, model)),
            callback_on_step_end_tensor_inputs=["latents"],
        )
    return _checked(list(out.images), shape)


def _resume_image_to_image(
    model: LoadedModel,
    params: ImageToImageParams,
    hooks: StepHooks,
    seed: int,
    resume: ResumePoint,
    shape: OutputShape,
) -> list[Image.Image]:
    start = img2img_schedule_offset(params, model) + resume.step
    scheduler = resuming_scheduler(model.pipe.scheduler, start)
    hooks.wait_for_step(1)
    with job_pipeline(model, scheduler) as pipe, torch.inference_mode():
        out = pipe(
            prompt=params.prompt,
            negative_prompt=params.negative_prompt or None,
            width=shape.width,
            height=shape.height,
            guidance_scale=params.guidance_scale,
            num_inference_steps=params.num_inference_steps,
            num_images_per_prompt=params.num_images_per_prompt,
            generator=generators(model.device, seed, params.num_images_per_prompt),
            latents=resume.latents.to(model.device, model.dtype),
            output_type="pil",
            callback_on_step_end=step_callback(hooks, img2img_steps(params, model) - resume.step),
            callback_on_step_end_tensor_inputs=["latents"],
        )
    return _checked(list(out.images), shape)


def _checked(images: list[Image.Image], shape: OutputShape) -> list[Image.Image]:
    for im in images:
        if im.size != (shape.width, shape.height):
            raise RuntimeError(
                f"pipeline returned {im.size[0]}x{im.size[1]}, expected "
                f"{shape.width}x{shape.height}"
            )
    return images
