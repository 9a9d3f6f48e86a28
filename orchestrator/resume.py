"""Checking a job that asks to resume one begun elsewhere (spec 15.4), before payment."""

from __future__ import annotations

from pipelines.dispatch import executed_steps
from pipelines.loader import LoadedModel
from pipelines.resume import ResumePoint, latents_from_bytes, resume_scheduler_name
from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import JobRequest, TextToImageParams


def resume_point(req: JobRequest, model: LoadedModel | None) -> ResumePoint | None:
    """The job's starting latents when it resumes one begun elsewhere (spec 15).

    Only models loaded in this process can resume: the runner protocol
    does not carry latents yet, so runner-hosted models advertise none.
    """
    if req.resume is None:
        return None
    if model is None:
        raise ProtocolError(
            ErrorCode.INVALID_REQUEST,
            f"{req.model_id} runs on a runner here, which cannot resume",
        )
    latents, p = req.resume.latents, req.params
    if not isinstance(p, TextToImageParams):
        raise ProtocolError(
            ErrorCode.INVALID_REQUEST, f"only text-to-image jobs can resume, not {req.pipeline}"
        )
    scheduler = resume_scheduler_name(model.pipe)
    if not scheduler or latents.scheduler != scheduler:
        raise ProtocolError(
            ErrorCode.INVALID_REQUEST,
            f"cannot resume {latents.scheduler} latents here (resume scheduler: "
            f"{scheduler or 'none'})",
        )
    if req.resume.step >= executed_steps(p, model):
        raise ProtocolError(
            ErrorCode.INVALID_REQUEST,
            f"resume step {req.resume.step} leaves no step of {p.num_inference_steps} to run",
        )
    shape = (p.num_images_per_prompt, 4, p.height // 8, p.width // 8)
    if tuple(latents.shape) != shape:
        raise ProtocolError(
            ErrorCode.INVALID_REQUEST,
            f"latents of shape {tuple(latents.shape)} do not fit the job's {shape}",
        )
    try:
        tensor = latents_from_bytes(latents.dtype, tuple(latents.shape), latents.data)
    except ValueError as exc:
        raise ProtocolError(ErrorCode.INVALID_REQUEST, str(exc)) from None
    return ResumePoint(req.resume.step, tensor)
