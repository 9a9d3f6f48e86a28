"""One entry point for every pipeline: which model runs what, steps, and the run itself."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipelines.errors import InvalidRequest
from pipelines.image_to_image import img2img_steps, run_image_to_image
from pipelines.image_to_video import run_image_to_video, video_steps
from pipelines.text_to_image import executed_steps as text_steps
from pipelines.text_to_image import run_text_to_image
from protocol.messages import (
    ImageToImageParams,
    ImageToVideoParams,
    JobParams,
    ResumeFrom,
    TextToImageParams,
)

if TYPE_CHECKING:
    from PIL import Image

    from pipelines.loader import LoadedModel
    from pipelines.resume import ResumePoint
    from pipelines.text_to_image import StepHooks

PIPELINES_BY_FAMILY: dict[str, frozenset[str]] = {
    "sd1": frozenset({"text-to-image", "image-to-image"}),
    "sdxl": frozenset({"text-to-image", "image-to-image"}),
    "svd": frozenset({"image-to-video"}),
}
"""What a loaded model can serve, by its latent family."""


@dataclass(frozen=True)
class JobOutput:
    """Images of an image job, or the frames (in order) of a video job."""

    images: list[Image.Image]
    video: bool = False
    fps: int = 0


def png_bytes(image: Image.Image) -> bytes:
    """An output image or frame as the PNG a result carries."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def supports(model: LoadedModel, pipeline: str) -> bool:
    return pipeline in PIPELINES_BY_FAMILY.get(model.family, frozenset())


def executed_steps(params: JobParams, model: LoadedModel | None = None) -> int:
    """Denoising steps the job executes: the unit it is priced and paid in."""
    if isinstance(params, TextToImageParams):
        return text_steps(params, model)
    if isinstance(params, ImageToImageParams):
        return img2img_steps(params, model)
    if isinstance(params, ImageToVideoParams):
        return video_steps(params, model)
    raise TypeError(f"no pipeline takes {type(params).__name__}")


def resume_point(params: JobParams, resume: ResumeFrom, model: LoadedModel) -> ResumePoint:
    """The checked starting point of a job that continues one begun elsewhere (spec 15.4).

    Raises InvalidRequest when this model cannot continue it: another scheduler,
    no step left, or latents that are not the shape this job's would be.
    """
    from pipelines.requests import output_shape
    from pipelines.resume import ResumePoint, latents_from_bytes, resume_scheduler_name

    latents = resume.latents
    scheduler = resume_scheduler_name(model.pipe)
    if not scheduler or latents.scheduler != scheduler:
        raise InvalidRequest(
            f"cannot resume {latents.scheduler} latents here (resume scheduler: "
            f"{scheduler or 'none'})"
        )
    steps = executed_steps(params, model)
    if resume.step >= steps:
        raise InvalidRequest(
            f"resume step {resume.step} leaves no step of the job's {steps} to run"
        )
    shape = output_shape(params)
    h, w = shape.height // 8, shape.width // 8
    expected = (1, shape.count, 4, h, w) if shape.video else (shape.count, 4, h, w)
    if tuple(latents.shape) != expected:
        raise InvalidRequest(
            f"latents of shape {tuple(latents.shape)} do not fit the job's {expected}"
        )
    try:
        tensor = latents_from_bytes(latents.dtype, tuple(latents.shape), latents.data)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    return ResumePoint(resume.step, tensor)


def run_job(
    model: LoadedModel,
    params: JobParams,
    hooks: StepHooks,
    seed: int,
    resume: ResumePoint | None = None,
) -> JobOutput:
    """Run the pipeline `params` is for; hooks gate every step (see StepHooks).

    `resume` continues a job from latents made elsewhere; the hooks then count
    only the steps this call executes.
    """
    if not supports(model, params.PIPELINE):
        raise TypeError(f"{model.model_id} ({model.family}) does not run {params.PIPELINE}")
    if isinstance(params, TextToImageParams):
        return JobOutput(run_text_to_image(model, params, hooks, seed, resume=resume))
    if isinstance(params, ImageToImageParams):
        return JobOutput(run_image_to_image(model, params, hooks, seed, resume=resume))
    if isinstance(params, ImageToVideoParams):
        frames = run_image_to_video(model, params, hooks, seed, resume=resume)
        return JobOutput(frames, True, params.fps)
    raise TypeError(f"no pipeline takes {type(params).__name__}")
