"""Run an image-to-video job (Stable Video Diffusion) one paid step at a time.

Every step denoises all frames at once, so a step's price counts every frame
(width x height x frames pixels). SVD ignores `pipe._interrupt`; the step
callback stops it by raising, like every other pipeline here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pipelines.job_pipeline import job_pipeline
from pipelines.requests import decode_image, output_shape
from pipelines.resume import ResumePoint, resuming_scheduler
from pipelines.schedule import schedule
from pipelines.stepping import generators, step_callback

if TYPE_CHECKING:
    from PIL import Image

    from pipelines.loader import LoadedModel
    from pipelines.text_to_image import StepHooks
    from protocol.messages import ImageToVideoParams

DECODE_CHUNK_FRAMES = 8
"""Frames the temporal VAE decodes at once: bounds decode memory on small GPUs."""


def video_steps(params: ImageToVideoParams, model: LoadedModel | None = None) -> int:
    """Steps executed: what the model's scheduler makes of num_inference_steps."""
    if model is None:
        return params.num_inference_steps
    return schedule(model.pipe.scheduler, params.num_inference_steps).timesteps


def run_image_to_video(
    model: LoadedModel,
    params: ImageToVideoParams,
    hooks: StepHooks,
    seed: int,
    resume: ResumePoint | None = None,
) -> list[Image.Image]:
    """params.num_frames frames of width x height, in order, gated by `hooks`.

    With `resume`, the run continues from the video latents after `resume.step`
    steps; the conditioning (image embedding, noise-augmented image latents)
    is recomputed from the same seed, so the result equals the uninterrupted run.
    """
    shape = output_shape(params)
    image = decode_image(params.image, "image-to-video")
    scheduler, start_latents, steps = None, None, video_steps(params, model)
    if resume is not None:
        scheduler = resuming_scheduler(model.pipe.scheduler, resume.step)
        start_latents = resume.latents.to(model.device, model.dtype)
        steps -= resume.step
    hooks.wait_for_step(1)
    with job_pipeline(model, scheduler) as pipe, torch.inference_mode():
        out = pipe(
            image,
            width=params.width,
            height=params.height,
            num_frames=params.num_frames,
            num_inference_steps=params.num_inference_steps,
            fps=params.fps,
            motion_bucket_id=params.motion_bucket_id,
            noise_aug_strength=params.noise_aug_strength,
            decode_chunk_size=DECODE_CHUNK_FRAMES,
            generator=generators(model.device, seed, 1)[0],
            latents=start_latents,
            output_type="pil",
            callback_on_step_end=step_callback(hooks, steps),
            callback_on_step_end_tensor_inputs=["latents"],
        )
    frames: list[Image.Image] = list(out.frames[0])
    if len(frames) != shape.count or any(f.size != (shape.width, shape.height) for f in frames):
        raise RuntimeError(
            f"pipeline returned {len(frames)} frames of {frames[0].size if frames else '?'}, "
            f"expected {shape.count} of {shape.width}x{shape.height}"
        )
    return frames
