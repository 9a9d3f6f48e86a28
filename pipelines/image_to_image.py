"""Run an image-to-image job (SD 1.x/2.x or SDXL) one paid step at a time.

The model is loaded as a text-to-image pipeline; a per-job image-to-image
pipeline shares its weights (diffusers' `from_pipe`) with its own scheduler.
With strength s, the scheduler skips the first steps and runs
int(num_inference_steps * s): those are the steps executed and paid for.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from pipelines.requests import decode_image, output_shape
from pipelines.stepping import generators, step_callback
from pipelines.text_to_image import job_pipeline
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


def img2img_pipeline(model: LoadedModel) -> Any:
    """An image-to-image pipeline for one job over the model's weights."""
    with quiet_diffusers():
        from diffusers import AutoPipelineForImage2Image

        pipe = AutoPipelineForImage2Image.from_pipe(job_pipeline(model))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def img2img_steps(params: ImageToImageParams, model: LoadedModel | None = None) -> int:
    """Steps executed: the tail of the schedule that strength keeps (diffusers' get_timesteps)."""
    n = params.num_inference_steps
    kept = min(int(n * params.strength), n)
    if model is None:
        return kept
    scheduler = model.pipe.scheduler
    probe = type(scheduler).from_config(scheduler.config)
    probe.set_timesteps(n, device="cpu")
    start = max(n - kept, 0) * getattr(probe, "order", 1)
    return len(probe.timesteps[start:])


def run_image_to_image(
    model: LoadedModel, params: ImageToImageParams, hooks: StepHooks, seed: int
) -> list[Image.Image]:
    """num_images_per_prompt images of the input image's size, gated by `hooks`."""
    shape = output_shape(params)
    image = decode_image(params.image, "image-to-image")
    pipe = img2img_pipeline(model)
    hooks.wait_for_step(1)
    with torch.inference_mode():
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
    images: list[Image.Image] = list(out.images)
    for im in images:
        if im.size != (shape.width, shape.height):
            raise RuntimeError(
                f"pipeline returned {im.size[0]}x{im.size[1]}, expected "
                f"{shape.width}x{shape.height}"
            )
    return images
