"""Which jobs an orchestrator may take, decided before any model work or payment.

Pure decisions over the job request and the offered models (spec 9.1), and
the capacity count, which is taken and given back without an await in
between so that jobs arriving together can never exceed it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.config import ModelEntry
from pipelines.errors import InvalidRequest
from pipelines.requests import OutputShape, output_shape
from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import JobRequest

PREVIEW_METHODS = frozenset({"latent_rgb", "taesd", "vae", "none"})
PREVIEW_FORMATS = frozenset({"webp", "jpeg"})


@dataclass
class ModelSlot:
    """One offered (pipeline, model): its aiModels.json entry and its jobs in flight."""

    entry: ModelEntry
    in_use: int = 0

    def reserve(self) -> None:
        """Take one unit of capacity, or refuse with no_capacity (no await: no race)."""
        if self.in_use >= self.entry.capacity:
            raise ProtocolError(
                ErrorCode.NO_CAPACITY,
                f"{self.entry.model_id} is running {self.in_use} of {self.entry.capacity} jobs",
            )
        self.in_use += 1

    def release(self) -> None:
        self.in_use = max(0, self.in_use - 1)


@dataclass
class Offers:
    """The slots of every offered (pipeline, model)."""

    slots: dict[tuple[str, str], ModelSlot] = field(default_factory=dict)

    @classmethod
    def of(cls, entries: list[ModelEntry]) -> Offers:
        return cls({(e.pipeline, e.model_id): ModelSlot(e) for e in entries})

    def slot_for(self, req: JobRequest) -> ModelSlot:
        slot = self.slots.get((req.pipeline, req.model_id))
        if slot is not None:
            return slot
        if not any(p == req.pipeline for p, _ in self.slots):
            raise ProtocolError(
                ErrorCode.UNSUPPORTED_PIPELINE, f"pipeline {req.pipeline!r} is not offered here"
            )
        raise ProtocolError(
            ErrorCode.UNKNOWN_MODEL, f"model {req.model_id!r} is not offered for {req.pipeline}"
        )


def check_request(req: JobRequest, frames_streamed: bool = False) -> OutputShape:
    """The job's output shape, or invalid_request for anything the orchestrator refuses.

    A video larger than one result frame needs its frames streamed (the broadcaster
    listed `result_frames`, spec 9.4)."""
    if req.preview_method not in PREVIEW_METHODS:
        raise ProtocolError(
            ErrorCode.INVALID_REQUEST, f"preview_method must be one of {sorted(PREVIEW_METHODS)}"
        )
    if req.preview_format not in PREVIEW_FORMATS:
        raise ProtocolError(
            ErrorCode.INVALID_REQUEST, f"preview_format must be one of {sorted(PREVIEW_FORMATS)}"
        )
    try:
        shape = output_shape(req.params, frames_streamed)
    except InvalidRequest as exc:
        raise ProtocolError(ErrorCode.INVALID_REQUEST, str(exc)) from None
    if req.preview_frame is not None and not (shape.video and req.preview_frame < shape.count):
        raise ProtocolError(
            ErrorCode.INVALID_REQUEST,
            f"preview_frame {req.preview_frame} is not a frame of this job's output",
        )
    return shape
