"""One job on a runner: the pipeline in a worker thread, gated by the orchestrator's grants.

The runner-side twin of orchestrator/jobs.py, except that it never sees
money: a step starts only when `StepGrant.admit` says it was granted, so a
runner cannot run ahead of what the orchestrator has been paid for.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable

import anyio
import anyio.from_thread
import torch

from pipelines.dispatch import executed_steps, png_bytes, run_job
from pipelines.loader import LoadedModel
from pipelines.previews import StepPreviews
from protocol.errors import ErrorCode
from protocol.runner import (
    Awaiting,
    Begin,
    Done,
    Failed,
    Message,
    Output,
    Run,
    RunnerPreview,
    StepGrant,
    Stop,
)


class Stopped(Exception):
    """Raised in the pipeline thread when the orchestrator stops the job."""

    def __init__(self, stop: Stop) -> None:
        super().__init__(stop.message)
        self.stop = stop


class RunnerJob:
    """Runs one `run` request; `grant` and `stop` come from the connection's loop."""

    def __init__(
        self, run: Run, model: LoadedModel, send: Callable[[Message], Awaitable[None]]
    ) -> None:
        self.request = run.request
        self.model = model
        self.seed = run.seed
        self._send = send
        self._cond = threading.Condition()
        self.gate = StepGrant(granted=run.granted)
        self.total_steps = executed_steps(run.request.params, model)
        self._previews = StepPreviews(model, run.request, self.total_steps)

    # ------------------------------------------------- called from the loop

    def grant(self, upto: int) -> None:
        with self._cond:
            self.gate.grant(upto)
            self._cond.notify_all()

    def stop(self, stop: Stop) -> None:
        with self._cond:
            if self.gate.stop is None:
                self.gate.stop = stop
            self._cond.notify_all()

    async def run(self) -> None:
        job_id = self.request.job_id
        try:
            output = await anyio.to_thread.run_sync(
                run_job, self.model, self.request.params, self, self.seed
            )
        except Stopped as stopped:
            await self._send(Failed(job_id, stopped.stop.code, stopped.stop.message[:1024]))
            return
        except Exception as exc:  # the pipeline itself failed
            message = f"pipeline failed: {type(exc).__name__}: {exc}"[:1024]
            await self._send(Failed(job_id, ErrorCode.PIPELINE_FAILED.value, message))
            return
        pngs = tuple(png_bytes(image) for image in output.images)
        await self._send(Output(job_id, pngs, output.video, output.fps))

    # ---------------------------------------- called from the worker thread

    def _emit(self, message: Message) -> None:
        anyio.from_thread.run(self._send, message)

    def wait_for_step(self, step: int) -> None:
        """Block until `step` is granted (announcing the wait once), or raise Stopped."""
        announced = False
        while True:
            with self._cond:
                if self.gate.stop is not None:
                    raise Stopped(self.gate.stop)
                if self.gate.admit(step):
                    break
                if announced:
                    self._cond.wait()
                    continue
            self._emit(Awaiting(self.request.job_id, step))
            announced = True
        self._emit(Begin(self.request.job_id, step))

    def on_step_end(self, step: int, latents: torch.Tensor) -> None:
        req = self.request
        if self._previews.due(step):
            self._emit(RunnerPreview(self._previews.message(step, latents)))
        self._emit(Done(req.job_id, step))
