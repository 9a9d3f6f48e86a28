"""One job on the orchestrator: a pipeline in a worker thread, gated by credit.

The pipeline runs in a runner process (orchestrator/runner_client.py grants
its steps as credit arrives), or, for a model loaded in this process (tests),
in a thread (diffusers is blocking) whose step hooks are the only place the
thread meets the event loop. `wait_for_step` blocks until the
job's credit covers the step (spec 7.2: no step without credit), and every
message the thread emits goes through `send`, in order, on the loop.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

import anyio
import anyio.from_thread
import torch

from pipelines.dispatch import JobOutput, png_bytes, run_job
from pipelines.loader import LoadedModel
from pipelines.previews import StepPreviews
from pipelines.resume import ResumePoint, latents_to_bytes, resume_scheduler_name
from protocol.credit import JobCredit
from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import (
    AwaitingPayment,
    Cancelled,
    JobRequest,
    Latents,
    Message,
    Progress,
    Result,
    ResultImage,
    error_message,
)
from protocol.pricing import pixel_steps

if TYPE_CHECKING:
    from orchestrator.runner_client import RunnerClient


class JobStopped(Exception):
    """Raised inside the pipeline thread to end the job; carries the reason."""

    def __init__(self, reason: ProtocolError) -> None:
        super().__init__(str(reason))
        self.reason = reason


@dataclass
class JobOutcome:
    """What a finished job earned and executed (for stats and tests)."""

    job_id: str
    steps_executed: int
    terminal: str
    steps_at_stop: int | None
    """Steps executed when the stop (cancel, bad payment, disconnect) arrived."""


class RunningJob:
    """Runs one accepted job; thread-safe credit and stop signalling."""

    def __init__(
        self,
        request: JobRequest,
        model: LoadedModel | None,
        ledger: JobCredit,
        seed: int,
        send: Callable[[Message], Awaitable[None]],
        payment_timeout: float,
        runner: RunnerClient | None = None,
        resume: ResumePoint | None = None,
    ) -> None:
        self.request = request
        self.resume = resume
        """Where the job starts when it continues one begun elsewhere; steps count from there."""
        self.model = model
        self.ledger = ledger
        self.seed = seed
        self._send = send
        self.payment_timeout = payment_timeout
        self.runner = runner
        """Where the job runs; None: in a thread of this process, on `model`."""
        self._previews = None if model is None else StepPreviews(model, request, ledger.total_steps)
        self.changed = anyio.Event()
        """Set (and replaced) when credit arrives or the job is stopped: wakes the grant pump."""
        self._cond = threading.Condition()
        self._stop: ProtocolError | None = None
        self.steps_at_stop: int | None = None
        self.finished = anyio.Event()

    # ------------------------------------------------- called from the loop

    def add_credit(self, ev: Fraction) -> int:
        """Credit EV to the job and wake the pipeline; returns the covered steps."""
        with self._cond:
            self.ledger.add(ev)
            self._cond.notify_all()
            covered = self.ledger.covered_steps
        self.wake()
        return covered

    def stop(self, reason: ProtocolError) -> None:
        """End the job at its next step boundary (cancel, bad payment, disconnect)."""
        with self._cond:
            if self._stop is None:
                self._stop = reason
                self.steps_at_stop = self.ledger.executed
            self._cond.notify_all()
        self.wake()

    def wake(self) -> None:
        """Wake whoever waits on `changed` (loop side only)."""
        changed, self.changed = self.changed, anyio.Event()
        changed.set()

    @property
    def stop_reason(self) -> ProtocolError | None:
        with self._cond:
            return self._stop

    def record_step(self, step: int) -> None:
        """A runner began `step`: charge it; raises if it was not covered (a runner fault)."""
        with self._cond:
            self.ledger.execute(step)

    async def forward(self, message: Message) -> None:
        """Send a message a runner produced; a lost connection stops the job."""
        try:
            await self._send(message)
        except Exception as exc:  # connection closed under us
            self.stop(ProtocolError(ErrorCode.INTERNAL_ERROR, f"connection lost: {exc}"))

    async def run(self) -> JobOutcome:
        """Run to a terminal message: result, cancelled, or error."""
        try:
            if self.runner is not None:
                output = await self.runner.execute(self)
            else:
                output = await anyio.to_thread.run_sync(self._run_blocking)
        except JobStopped as stopped:
            return await self._end_stopped(stopped.reason)
        except Exception as exc:  # the pipeline itself failed
            await self._send_quietly(
                error_message(
                    ErrorCode.PIPELINE_FAILED.value,
                    f"pipeline failed: {type(exc).__name__}: {exc}",
                    self.request.job_id,
                )
            )
            return self._outcome("error")
        finally:
            self.finished.set()
        pictures = tuple(
            ResultImage(
                image=png_bytes(img),
                format="png",
                width=img.width,
                height=img.height,
                # Image i uses seed + i; every frame of a video comes from the one seed.
                seed=(self.seed + (0 if output.video else i)) % 2**32,
            )
            for i, img in enumerate(output.images)
        )
        first = output.images[0]
        result = Result(
            job_id=self.request.job_id,
            images=() if output.video else pictures,
            steps=self.ledger.executed,
            pixel_steps=pixel_steps(
                first.width, first.height, len(output.images), self.ledger.executed
            ),
            fee=self.ledger.earned,
            frames=pictures if output.video else (),
            fps=output.fps,
        )
        await self._send_quietly(result)
        return self._outcome("result")

    def _outcome(self, terminal: str) -> JobOutcome:
        return JobOutcome(self.request.job_id, self.ledger.executed, terminal, self.steps_at_stop)

    async def _end_stopped(self, reason: ProtocolError) -> JobOutcome:
        job_id = self.request.job_id
        if reason.code is ErrorCode.CANCELLED:
            await self._send_quietly(Cancelled(job_id=job_id, steps=self.ledger.executed))
            terminal = "cancelled"
        else:
            await self._send_quietly(error_message(reason.code.value, reason.message, job_id))
            terminal = "error"
        return self._outcome(terminal)

    async def _send_quietly(self, message: Message) -> None:
        """Send a terminal message unless the connection is already gone."""
        with contextlib.suppress(Exception):
            await self._send(message)

    # ---------------------------------------- called from the worker thread

    def _run_blocking(self) -> JobOutput:
        assert self.model is not None
        return run_job(self.model, self.request.params, self, self.seed, resume=self.resume)

    def _emit(self, message: Message) -> None:
        try:
            anyio.from_thread.run(self._send, message)
        except Exception as exc:  # connection closed under us
            raise JobStopped(
                ProtocolError(ErrorCode.INTERNAL_ERROR, f"connection lost: {exc}")
            ) from None

    def wait_for_step(self, step: int) -> None:
        """Block until `step` is paid for; never lets an unpaid step start."""
        deadline = time.monotonic() + self.payment_timeout
        announced = False
        while True:
            with self._cond:
                if self._stop is not None:
                    raise JobStopped(self._stop)
                if self.ledger.may_execute(step):
                    self.ledger.execute(step)
                    return
                covered = self.ledger.covered_steps
                if announced:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise JobStopped(
                            ProtocolError(
                                ErrorCode.PAYMENT_TIMEOUT,
                                f"no credit for step {step} within {self.payment_timeout:g} s "
                                f"(credit covers {covered} steps)",
                            )
                        )
                    self._cond.wait(remaining)
                    continue
            # Tell the broadcaster we are paused, outside the lock: the loop
            # needs the lock to credit a payment.
            self._emit(
                AwaitingPayment(
                    job_id=self.request.job_id,
                    next_step=step,
                    covered_steps=covered,
                    timeout_ms=int(self.payment_timeout * 1000),
                )
            )
            announced = True

    def on_step_end(self, step: int, latents: torch.Tensor) -> None:
        """Report a completed step (it was paid for); a stop takes effect before the next."""
        req = self.request
        total = self.ledger.total_steps
        assert self._previews is not None
        if self._previews.due(step):
            carried = self._latents(latents) if req.want_latents else None
            self._emit(self._previews.message(step, latents, carried))
        self._emit(
            Progress(
                job_id=req.job_id,
                step=step,
                total_steps=total,
                covered_steps=self.ledger.covered_steps,
            )
        )

    def _latents(self, latents: torch.Tensor) -> Latents | None:
        """The state a preview carries when asked, so another orchestrator can resume."""
        scheduler = resume_scheduler_name(self.model.pipe)
        if not scheduler:
            return None
        dtype, shape, data = latents_to_bytes(latents)
        return Latents(scheduler=scheduler, dtype=dtype, shape=shape, data=data)
