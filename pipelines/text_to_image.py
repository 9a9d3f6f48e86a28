"""Run a text-to-image job one paid step at a time.

The job never runs ahead of its hooks: step k starts only after
hooks.wait_for_step(k) returned, which is where the orchestrator blocks until
credit covers the step. Hooks cancel by raising; diffusers' SD pipelines do
not catch exceptions from callback_on_step_end, so the exception leaves
run_text_to_image unchanged and the GPU stops within one step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pipelines.errors import InvalidRequest
from pipelines.job_pipeline import job_pipeline
from pipelines.resume import ResumePoint, resuming_scheduler
from pipelines.schedule import schedule
from pipelines.stepping import StepHooks, generators, step_callback

if TYPE_CHECKING:
    from PIL import Image

    from pipelines.loader import LoadedModel
    from protocol.messages import TextToImageParams

__all__ = [
    "MAX_PIXELS_PER_IMAGE",
    "MAX_PIXELS_PER_JOB",
    "InvalidRequest",
    "StepHooks",
    "executed_steps",
    "run_text_to_image",
    "validate_text_to_image",
]

MAX_PIXELS_PER_IMAGE = 2048 * 2048
"""Past this SD-family UNets produce tiling artefacts and attention memory explodes."""
MAX_PIXELS_PER_JOB = 4 * 1024 * 1024
"""Four 1024x1024 images: one batch that fits a 24 GB GPU with SDXL in fp16."""
PIXEL_MULTIPLE = 8
"""The VAE scale factor: latents are (height/8, width/8)."""


def executed_steps(params: TextToImageParams, model: LoadedModel | None = None) -> int:
    """Denoising steps the job will execute, the unit the job is priced and paid in.

    With no model this is num_inference_steps. With a model, its scheduler is
    asked, because some schedulers run a different count: PNDM (SD 1.5's
    default) runs one more, second-order schedulers (Heun) nearly twice as many.
    """
    if model is None:
        return params.num_inference_steps
    return schedule(model.pipe.scheduler, params.num_inference_steps).timesteps


def validate_text_to_image(params: TextToImageParams) -> None:
    """Refuse jobs the pipeline cannot or will not run, before anything is paid for."""
    if not params.prompt.strip():
        raise InvalidRequest("prompt is empty")
    w, h, n = params.width, params.height, params.num_images_per_prompt
    if w < PIXEL_MULTIPLE or h < PIXEL_MULTIPLE or w % PIXEL_MULTIPLE or h % PIXEL_MULTIPLE:
        raise InvalidRequest(
            f"width and height must be positive multiples of {PIXEL_MULTIPLE}, got {w}x{h}"
        )
    if params.num_inference_steps < 1:
        raise InvalidRequest("num_inference_steps must be at least 1")
    if n < 1:
        raise InvalidRequest("num_images_per_prompt must be at least 1")
    if w * h > MAX_PIXELS_PER_IMAGE:
        raise InvalidRequest(
            f"{w}x{h} is {w * h} pixels per image; the limit is {MAX_PIXELS_PER_IMAGE}"
        )
    if w * h * n > MAX_PIXELS_PER_JOB:
        raise InvalidRequest(
            f"{n} images of {w}x{h} are {w * h * n} pixels; the limit per job is "
            f"{MAX_PIXELS_PER_JOB}"
        )


def run_text_to_image(
    model: LoadedModel,
    params: TextToImageParams,
    hooks: StepHooks,
    seed: int,
    resume: ResumePoint | None = None,
) -> list[Image.Image]:
    """Generate params.num_images_per_prompt images of width x height, gated by `hooks`.

    Calls wait_for_step(1) before any work, then after step k on_step_end(k)
    and, unless k is the last step, wait_for_step(k + 1). Exceptions from the
    hooks propagate unchanged. Safe to call for several jobs on one model at once.
    With `resume`, the run starts from its latents after its step of the full
    schedule (pipelines/resume.py), and the hooks count only the steps this
    call executes: hook step k is step resume.step + k of the schedule.
    """
    validate_text_to_image(params)
    scheduler, start_latents = None, None
    if resume is not None:
        scheduler = resuming_scheduler(model.pipe.scheduler, resume.step)
        start_latents = resume.latents.to(model.device, model.dtype)
    hooks.wait_for_step(1)
    with job_pipeline(model, scheduler) as pipe, torch.inference_mode():
        out = pipe(
            prompt=params.prompt,
            negative_prompt=params.negative_prompt or None,
            width=params.width,
            height=params.height,
            guidance_scale=params.guidance_scale,
            num_inference_steps=params.num_inference_steps,
            num_images_per_prompt=params.num_images_per_prompt,
            generator=generators(model.device, seed, params.num_images_per_prompt),
            latents=start_latents,
            output_type="pil",
            callback_on_step_end=step_callback(hooks, executed_steps(params, model)),
            callback_on_step_end_tensor_inputs=["latents"],
        )
    images: list[Image.Image] = list(out.images)
    for im in images:
        if im.size != (params.width, params.height):
            raise RuntimeError(
                f"pipeline returned {im.size[0]}x{im.size[1]}, expected "
                f"{params.width}x{params.height}"
            )
    return images
