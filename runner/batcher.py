"""Jobs of one model that arrive together run as one batch (spec/RUNNER.md 5.2).

The first job of a kind (`batch_key`) waits up to the model's `batch_wait` for
others, and starts when the batch is full or the wait is over; jobs arriving
meanwhile join it. A job alone runs as it always does. Whether a model batches
at all, and how many, is decided when it loads (`measure_batching`): only where
a batch's throughput beats one job's by BATCH_GAIN_THRESHOLD and its images
are byte-identical to the jobs run alone (`batch_to_run`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from pipelines.batching import (
    Member,
    Unwatched,
    batch_key,
    default_patience,
    identical_when_batched,
    prepare_for_batching,
    run_text_to_image_batch,
)
from pipelines.dispatch import JobOutput
from pipelines.resume import ResumePoint, resume_scheduler_name
from protocol.messages import TextToImageParams

if TYPE_CHECKING:
    from pipelines.loader import LoadedModel
    from runner.job import RunnerJob

log = logging.getLogger(__name__)

BATCH_SIZES = (2, 4, 8)
"""The batch sizes timed at load (the offer's `batch_gains`, in this order)."""
BATCH_GAIN_THRESHOLD = 1.2
"""A batch runs only where its jobs per second beat one job's by this much."""
TIMED_RUNS = 3
"""Runs of each size at load; the quickest counts (the least disturbed)."""


@dataclass(frozen=True)
class BatchClaim:
    gains: tuple[float, ...]
    """Throughput at each of BATCH_SIZES (up to the max asked) over batch 1."""
    max_batch: int
    """The batch this runner runs (`batch_to_run`); 1: never batched."""


def measure_batching(model: LoadedModel, max_batch: int, width: int, height: int) -> BatchClaim:
    """Time the model's reference job alone and in batches up to `max_batch`, and check the
    bytes. Hooks the model for batch-invariant arithmetic first, if batching is asked."""
    sizes = [b for b in BATCH_SIZES if b <= max_batch]
    if not sizes or model.family not in ("sd1", "sdxl"):
        return BatchClaim((), 1)
    prepare_for_batching(model)

    def timed(size: int) -> float:
        members = [Member(_reference(width, height, i), Unwatched(), i) for i in range(size)]
        start = time.perf_counter()
        run_text_to_image_batch(model, members) if size > 1 else _alone(model, members[0])
        return time.perf_counter() - start

    best = {b: min(timed(b) for _ in range(TIMED_RUNS)) for b in [1, *sizes]}
    gains = tuple(round(b * best[1] / best[b], 3) for b in sizes)
    enabled = batch_to_run(
        dict(zip(sizes, gains, strict=True)),
        lambda size: identical_when_batched(model, size, width, height),
    )
    log.info("%s: batch gains %s at %s; batches of up to %d", model.model_id, gains, sizes,
             enabled)  # fmt: skip
    return BatchClaim(gains, enabled)


def batch_to_run(gains: dict[int, float], identical: Callable[[int], bool]) -> int:
    """The largest batch size whose gain reaches the threshold and whose jobs' bytes match
    alone's (`identical(size)`, asked from the largest down); else 1: never batched."""
    paying = [size for size, gain in gains.items() if gain >= BATCH_GAIN_THRESHOLD and size > 1]
    for size in sorted(paying, reverse=True):
        if identical(size):
            return size
        log.warning("batches of %d give other bytes than the jobs alone here", size)
    return 1


def _reference(width: int, height: int, i: int) -> TextToImageParams:
    return TextToImageParams(
        prompt=f"a lighthouse on a cliff at dusk, {i}",
        width=width,
        height=height,
        num_inference_steps=2,
    )


def _alone(model: LoadedModel, member: Member) -> None:
    from pipelines.text_to_image import run_text_to_image

    run_text_to_image(model, member.params, member.hooks, member.seed)


_ALONE = JobOutput([])
"""A seat's outcome when its job is to run alone after all."""


@dataclass
class _Seat:
    """One job's place in a batch: decided once it finished, failed or left."""

    job: RunnerJob
    decided: anyio.Event = field(default_factory=anyio.Event)
    outcome: JobOutput | BaseException | ResumePoint | None = None


@dataclass
class _Forming:
    seats: list[_Seat]
    full: anyio.Event = field(default_factory=anyio.Event)


class Batcher:
    """Gathers one model's jobs into batches and runs each batch in a thread of its own."""

    def __init__(self, model: LoadedModel, max_batch: int, wait: float) -> None:
        self.model = model
        self.max_batch = max_batch
        self.wait = wait
        self.patience = default_patience if resume_scheduler_name(model.pipe) else None
        """A member whose grant is late leaves and resumes alone, where the model can
        resume; where it cannot, the batch waits for it."""
        self._forming: dict[tuple[Any, ...], _Forming] = {}

    async def run(self, job: RunnerJob) -> JobOutput:
        """The job's output, run alone or in a batch; raises what its run raised."""
        request = job.request
        key = None if request.resume else batch_key(request.params)
        if key is None:
            return await anyio.to_thread.run_sync(job.run_blocking)
        seat = _Seat(job)
        job.enter("batching")  # said to B while it waits (PROTOCOL.md 9.6)
        forming = self._forming.get(key)
        if forming is not None:
            forming.seats.append(seat)
            if len(forming.seats) >= self.max_batch:
                del self._forming[key]  # full: the next job of this kind starts another
                forming.full.set()
        else:
            forming = self._forming[key] = _Forming([seat])
            try:
                with anyio.move_on_after(self.wait):
                    await forming.full.wait()
            except BaseException:  # cancelled (its connection went): the others run alone
                for other in forming.seats[1:]:
                    other.outcome = _ALONE
                    other.decided.set()
                raise
            finally:
                if self._forming.get(key) is forming:
                    del self._forming[key]
            if len(forming.seats) == 1:
                job.enter(None)
                return await anyio.to_thread.run_sync(job.run_blocking)
            token = anyio.lowlevel.current_token()
            threading.Thread(
                target=self._run_batch, args=(forming.seats, token), name="batch", daemon=True
            ).start()
        await seat.decided.wait()
        outcome = seat.outcome
        if outcome is _ALONE:  # not paid for its first step when the batch started
            return await anyio.to_thread.run_sync(job.run_blocking)
        if isinstance(outcome, ResumePoint):  # it left for want of credit: on alone
            return await anyio.to_thread.run_sync(job.continue_blocking, outcome)
        if isinstance(outcome, BaseException):
            raise outcome
        assert outcome is not None
        return outcome

    def _run_batch(self, seats: list[_Seat], token: anyio.lowlevel.EventLoopToken) -> None:
        """In the batch's thread: run it, and decide each seat as its job ends or leaves."""
        log.info("running %d jobs of %s as one batch", len(seats), self.model.model_id)
        members: dict[int, _Seat] = {}
        for seat in seats:
            seat.job.prepare()
            seat.job.enter(None)

        def decide(seat: _Seat, outcome: JobOutput | BaseException | ResumePoint) -> None:
            seat.outcome = outcome
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                anyio.from_thread.run_sync(seat.decided.set, token=token)

        def on_leave(member: Member) -> None:
            seat = members[id(member)]
            with contextlib.suppress(Exception):
                seat.job.settle_preview()
            if member.left is not None or member.left_before_start:
                done = member.left.step if member.left else 0
                log.info("job %s left its batch after step %d: its grant was late",
                         seat.job.request.job_id, done)  # fmt: skip
            if member.left_before_start:
                decide(seat, _ALONE)
            else:
                decide(seat, member.left or member.error or RuntimeError("left the batch"))

        batch = []
        for seat in seats:
            member = Member(seat.job.request.params, seat.job, seat.job.seed)  # type: ignore[arg-type]
            members[id(member)] = seat
            batch.append(member)
        try:
            run_text_to_image_batch(self.model, batch, self.patience, on_leave)
        except Exception as exc:  # the run itself failed: the error of every job still in
            for seat in seats:
                if seat.outcome is None:
                    decide(seat, exc)
            return
        for member in batch:
            seat = members[id(member)]
            if seat.outcome is not None:
                continue
            try:
                seat.job.settle_preview()
            except Exception as exc:
                decide(seat, exc)
                continue
            assert member.image is not None
            decide(seat, JobOutput([member.image]))
