"""One job on a runner: the pipeline in a worker thread, gated by the orchestrator's grants.

The runner never sees money: a step starts only when `StepGrant.admit` says
it was granted, so a runner cannot run ahead of what the orchestrator has
been paid for. The job exists (and takes grants and stops) from the moment
its `run` arrives; the model work starts in the worker thread.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Awaitable, Callable

import anyio
import anyio.from_thread
import torch

from pipelines.dispatch import executed_steps, png_bytes, resume_point, run_job
from pipelines.errors import InvalidRequest
from pipelines.loader import LoadedModel
from pipelines.previews import StepPreviews
from pipelines.resume import latents_to_bytes, resume_scheduler_name
from protocol.errors import ErrorCode
from protocol.messages import MAX_LATENTS_BYTES, Latents, ResultImage
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
from runner.faults import Faults


class ConnectionLost(Exception):
    """The orchestrator's connection closed: nobody is left to tell anything."""


class Stopped(Exception):
    """Raised in the pipeline thread when the orchestrator stops the job."""

    def __init__(self, stop: Stop) -> None:
        super().__init__(stop.message)
        self.stop = stop


class RunnerJob:
    """Runs one `run` request; `grant` and `stop` come from the connection's loop."""

    def __init__(
        self,
        run: Run,
        model: LoadedModel,
        send: Callable[[Message], Awaitable[None]],
        faults: Faults | None = None,
    ) -> None:
        self.request = run.request
        self.model = model
        self.seed = run.seed
        self._send = send
        self._faults = faults
        self._cond = threading.Condition()
        self.gate = StepGrant(granted=run.granted)
        self._previews: StepPreviews | None = None
        self._resume_scheduler = ""

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
        """Run to the job's last frame: its output, or `failed` with why."""
        with contextlib.suppress(ConnectionLost):
            await self._send(await self._outcome())

    async def _outcome(self) -> Message:
        job_id = self.request.job_id
        try:
            return await anyio.to_thread.run_sync(self._run_blocking)
        except ConnectionLost:
            raise
        except Stopped as stopped:
            return Failed(job_id, stopped.stop.code, stopped.stop.message[:1024])
        except InvalidRequest as exc:
            return Failed(job_id, ErrorCode.INVALID_REQUEST.value, str(exc)[:1024])
        except Exception as exc:  # the pipeline itself failed
            message = f"pipeline failed: {type(exc).__name__}: {exc}"[:1024]
            return Failed(job_id, ErrorCode.PIPELINE_FAILED.value, message)

    # ---------------------------------------- called from the worker thread

    def _run_blocking(self) -> Output:
        req, model = self.request, self.model
        params = req.params
        resume = resume_point(params, req.resume, model) if req.resume else None
        total = executed_steps(params, model) - (resume.step if resume else 0)
        self._previews = StepPreviews(model, req, total)
        if req.want_latents:
            self._resume_scheduler = resume_scheduler_name(model.pipe)
        output = run_job(model, params, self, self.seed, resume=resume)
        images = tuple(
            ResultImage(
                image=png_bytes(image),
                format="png",
                width=image.width,
                height=image.height,
                # Image i uses seed + i; every frame of a video comes from the one seed.
                seed=(self.seed + (0 if output.video else i)) % 2**32,
            )
            for i, image in enumerate(output.images)
        )
        return Output(req.job_id, images, output.video, output.fps)

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
        if self._faults is not None:
            self._faults.before_step(step)
        self._emit(Begin(self.request.job_id, step))

    def on_step_end(self, step: int, latents: torch.Tensor) -> None:
        req = self.request
        assert self._previews is not None
        if self._previews.due(step):
            self._emit(RunnerPreview(self._previews.message(step, latents)))
        self._emit(Done(req.job_id, step, self._latents(latents)))
        if self._faults is not None:
            offset = self.request.resume.step if self.request.resume else 0
            self._faults.after_step(step, self._wait_until_stopped, offset)

    def _latents(self, latents: torch.Tensor) -> Latents | None:
        """The state after a step, when the job asked and the model can resume from it."""
        if not self._resume_scheduler:
            return None
        if latents.numel() * latents.element_size() > MAX_LATENTS_BYTES:
            return None  # too big for one frame: this step cannot be resumed from
        dtype, shape, data = latents_to_bytes(latents)
        return Latents(scheduler=self._resume_scheduler, dtype=dtype, shape=shape, data=data)

    def _wait_until_stopped(self) -> None:
        with self._cond:
            while self.gate.stop is None:
                self._cond.wait()
            raise Stopped(self.gate.stop)
