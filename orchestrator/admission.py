"""Which jobs an orchestrator may take, decided before any model work or payment.

Pure decisions over the job request and the offered models (spec 9.1), and
the capacity count, which is taken and given back without an await in
between so that jobs arriving together can never exceed it. A job that
finds every slot busy may wait in the slot's queue (spec 4.6): a freed unit
of capacity goes straight to the first job waiting, so the count never
drops below what runs and waits to run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import anyio

from orchestrator.config import ModelEntry
from pipelines.errors import InvalidRequest
from pipelines.requests import OutputShape, output_shape
from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import JobRequest

PREVIEW_METHODS = frozenset({"latent_rgb", "taesd", "vae", "none"})
PREVIEW_FORMATS = frozenset({"webp", "jpeg"})
DURATION_ALPHA = 0.3
"""Weight of the newest job's duration in the estimate of when a queued job starts."""


@dataclass
class ModelSlot:
    """One offered (pipeline, model): its aiModels.json entry and its jobs in flight."""

    entry: ModelEntry
    in_use: int = 0
    queue: list[anyio.Event] = field(default_factory=list)
    """Jobs waiting for a unit of capacity, first in line first; set when handed one."""
    job_seconds: float | None = None
    """Recent jobs' duration, smoothed: how long a slot takes to free up."""

    def reserve(self) -> None:
        """Take one unit of capacity, or refuse with no_capacity (no await: no race)."""
        if self.in_use >= self.entry.capacity:
            raise ProtocolError(
                ErrorCode.NO_CAPACITY,
                f"{self.entry.model_id} is running {self.in_use} of {self.entry.capacity} jobs",
            )
        self.in_use += 1

    def release(self) -> None:
        """Give a unit back: to the first job in the queue, else to the pool."""
        if self.queue:
            self.queue.pop(0).set()  # the unit passes on: in_use stays as it is
            return
        self.in_use = max(0, self.in_use - 1)

    def enqueue(self, limit: int) -> anyio.Event | None:
        """A place at the back of the queue, set once it holds a unit; None when the queue
        already holds `limit` jobs."""
        if len(self.queue) >= limit:
            return None
        place = anyio.Event()
        self.queue.append(place)
        return place

    def leave(self, place: anyio.Event) -> None:
        """Give up a place: out of the queue, or, if it was handed a unit, that unit on."""
        if place in self.queue:
            self.queue.remove(place)
        elif place.is_set():
            self.release()

    def position(self, place: anyio.Event) -> int:
        """1 for the next job to start; 0 once it holds a unit."""
        return self.queue.index(place) + 1 if place in self.queue else 0

    def estimated_start_ms(self, place: anyio.Event) -> int:
        """When the job at `place` should start: the jobs ahead of it, run `capacity` at a
        time, at the recent jobs' duration; 0 while no job has finished here."""
        if self.job_seconds is None:
            return 0
        waves = math.ceil(self.position(place) / max(1, self.entry.capacity))
        return min(2**32 - 1, int(waves * self.job_seconds * 1000))

    def observe_duration(self, seconds: float) -> None:
        old = self.job_seconds
        self.job_seconds = (
            seconds if old is None else (DURATION_ALPHA * seconds + (1 - DURATION_ALPHA) * old)
        )


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
