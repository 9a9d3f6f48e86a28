"""One job on a runner: the pipeline in a worker thread, gated by the orchestrator's grants.

The runner never sees money: a step starts only when `StepGrant.admit` says
it was granted, so a runner cannot run ahead of what the orchestrator has
been paid for. The job exists (and takes grants and stops) from the moment
its `run` arrives; the model work starts in the worker thread.

That thread does the steps and little else: its frames go out through an
outbox without waiting for the loop or the socket (runner/outbox.py), and a
preview renders on a worker while the next steps run, so a step without a
preview costs nothing beyond the model (and the latents copy a job asking for
them needs, which on a GPU finishes off the step thread too).
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import anyio
import torch
from PIL import Image

from pipelines.dispatch import JobOutput, executed_steps, png_bytes, resume_point, run_job
from pipelines.errors import InvalidRequest
from pipelines.loader import LoadedModel
from pipelines.previews import StepPreviews
from pipelines.resume import ResumePoint, latents_later, resume_scheduler_name
from protocol.errors import ErrorCode
from protocol.fields import UINT32_MAX
from protocol.messages import MAX_LATENTS_BYTES, Latents, ResultImage
from protocol.runner import (
    Awaiting,
    Begin,
    Done,
    Failed,
    Message,
    Output,
    OutputFrame,
    Run,
    RunnerPreview,
    StepGrant,
    Stop,
    Working,
)
from runner.faults import Faults
from runner.outbox import ConnectionLost, Outbox


class BatchRuns(Protocol):
    """What runs a job in a batch (runner/batcher.py's Batcher), seen from the job."""

    async def run(self, job: RunnerJob) -> JobOutput: ...


HEARTBEAT_SECONDS = 2.0
"""How often a job in a phase without steps says it is alive (spec PROTOCOL.md 9.6)."""
HEARTBEAT_AFTER = 0.5
"""A phase shorter than this (most previews) sends nothing."""
HEARTBEAT_TICK = 0.25


PREVIEW_THREADS = 2
"""Workers that render previews (and finish latents copies) for all of a runner's jobs."""


@functools.cache
def _workers() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(PREVIEW_THREADS, thread_name_prefix="preview")


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
        batcher: BatchRuns | None = None,
    ) -> None:
        self.request = run.request
        self._batcher = batcher
        """Where the job runs when its model batches (runner/batcher.py); None: alone."""
        self.model = model
        self.seed = run.seed
        self._send = send
        self._faults = faults
        self._cond = threading.Condition()
        self.gate = StepGrant(granted=run.granted)
        self._previews: StepPreviews | None = None
        self._resume_scheduler = ""
        self._total = 0
        self._phase: str | None = None
        """The phase without steps the job is in (heartbeats say it), or None."""
        self._phase_since = 0.0
        self._outbox: Outbox | None = None
        self._preview: Future[Message] | None = None
        """The preview being rendered on a worker: at most one a job."""
        self._preview_since: float | None = None
        self._ready_since: dict[int, float] = {}
        """When each step still waiting for its grant was ready (announced once, even when
        a batch leaves the job and it waits on alone)."""

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
        """Run to the job's last frame: its output, or `failed` with why.

        Phases without steps (decoding after the last step, encoding the output)
        send `working` every HEARTBEAT_SECONDS, so nobody takes a long decode for a
        dead runner. A video's frames go one message each, so no message holds them
        all. The step thread's frames go through the outbox, in order, sent by its
        own task; the last ones follow once it is empty.
        """
        outbox = self._outbox = Outbox(self._send, self._connection_lost)
        with contextlib.suppress(ConnectionLost):
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._heartbeat)
                tg.start_soon(outbox.drain)
                try:
                    messages = await self._outcome()
                    await outbox.close()
                    for message in messages if not outbox.lost else ():
                        await self._send(message)
                finally:
                    tg.cancel_scope.cancel()

    def _connection_lost(self) -> None:
        self.stop(Stop(self.request.job_id, ErrorCode.INTERNAL_ERROR.value, "connection lost"))

    async def _heartbeat(self) -> None:
        """`working` once a phase without steps has lasted HEARTBEAT_AFTER seconds, then
        every HEARTBEAT_SECONDS while it lasts."""
        job_id, sent_at = self.request.job_id, -math.inf
        while True:
            await anyio.sleep(HEARTBEAT_TICK)  # a clock tick, not a synchronisation
            phase, since, now = self._phase, self._phase_since, time.monotonic()
            if phase is None and self._preview_since is not None:
                phase, since = "preview", self._preview_since  # a slow (video) preview
            if phase is None or now - since < HEARTBEAT_AFTER:
                continue
            if now - sent_at >= HEARTBEAT_SECONDS:
                sent_at = now
                try:
                    await self._send(Working(job_id, phase, int(HEARTBEAT_SECONDS * 2000)))
                except ConnectionLost:
                    self._connection_lost()
                    return

    async def _outcome(self) -> list[Message]:
        job_id = self.request.job_id
        try:
            if self._batcher is not None:
                output = await self._batcher.run(self)
            else:
                output = await anyio.to_thread.run_sync(self.run_blocking)
        except ConnectionLost:
            raise
        except Stopped as stopped:
            return [Failed(job_id, stopped.stop.code, stopped.stop.message[:1024])]
        except InvalidRequest as exc:
            return [Failed(job_id, ErrorCode.INVALID_REQUEST.value, str(exc)[:1024])]
        except Exception as exc:  # the pipeline itself failed
            message = f"pipeline failed: {type(exc).__name__}: {exc}"[:1024]
            return [Failed(job_id, ErrorCode.PIPELINE_FAILED.value, message)]
        self.enter("encoding")
        if not output.video:
            images = [await anyio.to_thread.run_sync(self._encoded, im, i) for i, im in
                      enumerate(output.images)]  # fmt: skip
            return [Output(job_id, tuple(images))]
        # One frame at a time: encode it, send it, let it go (after what the steps sent).
        assert self._outbox is not None
        await self._outbox.close()
        count = len(output.images)
        for index in range(count):
            frame = output.images[index]
            encoded = await anyio.to_thread.run_sync(self._encoded, frame, 0)
            output.images[index] = None  # type: ignore[call-overload]
            await self._send(OutputFrame(job_id, index, encoded))
        return [Output(job_id, (), True, output.fps, frames=count)]

    def _encoded(self, image: Image.Image, i: int) -> ResultImage:
        """An output image as the result carries it; image i uses seed + i (spec 9.2),
        every frame of a video the one seed."""
        return ResultImage(
            image=png_bytes(image),
            format="png",
            width=image.width,
            height=image.height,
            seed=(self.seed + i) % 2**32,
        )

    # ---------------------------------------- called from the worker thread

    def run_blocking(self) -> JobOutput:
        """The job alone, in this (worker) thread."""
        req = self.request
        resume = resume_point(req.params, req.resume, self.model) if req.resume else None
        self.prepare(resume.step if resume else 0)
        output = run_job(self.model, req.params, self, self.seed, resume=resume)
        self.settle_preview()
        return output

    def continue_blocking(self, point: ResumePoint) -> JobOutput:
        """The job alone from where it left a batch (`point`: its steps done and latents)."""
        hooks = _Offset(self, point.step)
        output = run_job(self.model, self.request.params, hooks, self.seed, resume=point)
        self.settle_preview()
        return output

    def prepare(self, resumed_at: int = 0) -> None:
        """Before the first step, alone or in a batch: the steps and previews to expect."""
        req, model = self.request, self.model
        total = executed_steps(req.params, model) - resumed_at
        self._total = total
        self._previews = StepPreviews(model, req, total)
        if req.want_latents:
            self._resume_scheduler = resume_scheduler_name(model.pipe)

    def enter(self, phase: str | None) -> None:
        """The phase without steps the job is in now (None: steps), which heartbeats say."""
        self._phase_since = time.monotonic()
        self._phase = phase

    def _emit(self, message: Message | Future[Message]) -> None:
        """Queue a frame (or the future of one) for O and return at once."""
        assert self._outbox is not None
        self._outbox.post(message)

    def wait_for_step(self, step: int) -> None:
        """Block until `step` is granted (announcing the wait once), or raise Stopped.

        `begin` says how long the step waited for its grant once it was ready (0
        when the grant was there already): the time money held up the device.
        """
        self.granted_within(step, math.inf)

    def granted_within(self, step: int, seconds: float) -> bool:
        """`wait_for_step` for at most `seconds`: False when the grant has not come (a batch
        then goes on without the job, runner/batcher.py); raises Stopped."""
        ready = self._ready_since.get(step, time.perf_counter())
        deadline = time.perf_counter() + seconds
        while True:
            with self._cond:
                if self.gate.stop is not None:
                    raise Stopped(self.gate.stop)
                if self.gate.admit(step):
                    break
                left = deadline - time.perf_counter()
                if step in self._ready_since:
                    if left <= 0:
                        return False
                    self._cond.wait(None if math.isinf(left) else left)
                    continue
            self._ready_since[step] = ready
            self._emit(Awaiting(self.request.job_id, step))
        announced = self._ready_since.pop(step, None) is not None
        waited = round((time.perf_counter() - ready) * 1e6) if announced else 0
        if self._faults is not None:
            self._faults.before_step(step)
        self._emit(Begin(self.request.job_id, step, min(waited, UINT32_MAX)))
        return True

    def on_step_end(self, step: int, latents: torch.Tensor) -> None:
        """Queue the step's preview and `done`, and go on: a step without a preview does
        no copy, no device sync and no encode (unless the job wants every step's latents,
        spec 15.3); a preview renders on a worker while the next steps run."""
        assert self._previews is not None
        if self._previews.due(step):
            self.settle_preview()  # one at a time: a slow one holds the steps back
            shown = self._previews.scaled(step, latents)  # a new tensor: the steps move on
            self._preview = _workers().submit(self._render, step, shown)
            self._emit(self._preview)
        self._emit(self._done(step, latents))
        if step == self._total:
            self.enter("decoding")  # the pipeline decodes the latents next
        if self._faults is not None:
            assert self._outbox is not None
            self._outbox.wait_sent()  # faults act once the step's messages are out
            offset = self.request.resume.step if self.request.resume else 0
            self._faults.after_step(step, self._wait_until_stopped, offset, step == self._total)

    def _render(self, step: int, shown: torch.Tensor) -> Message:
        """On a worker: the preview of `shown`, encoded (as the step thread would have, in
        inference mode, which is per thread)."""
        assert self._previews is not None
        self._preview_since = time.monotonic()
        try:
            with torch.inference_mode():
                return RunnerPreview(self._previews.render(step, shown))
        finally:
            self._preview_since = None

    def settle_preview(self) -> None:
        """Wait for the preview in flight; its failure is the pipeline's."""
        if self._preview is not None:
            preview, self._preview = self._preview, None
            preview.result()

    def _done(self, step: int, latents: torch.Tensor) -> Message | Future[Message]:
        """`done` for the step, with its latents when the job asked and the model can resume
        from them; on a GPU the copy finishes on a worker, so the step does not wait for it."""
        job_id = self.request.job_id
        if not self._resume_scheduler:
            return Done(job_id, step)
        if latents.numel() * latents.element_size() > MAX_LATENTS_BYTES:
            return Done(job_id, step)  # too big for one frame: this step cannot be resumed from
        finish, scheduler = latents_later(latents), self._resume_scheduler

        def done() -> Message:
            dtype, shape, data = finish()
            state = Latents(scheduler=scheduler, dtype=dtype, shape=shape, data=data)
            return Done(job_id, step, state)

        if latents.device.type == "cpu":
            return done()  # copied already: nothing to wait for
        return _workers().submit(done)

    def _wait_until_stopped(self) -> None:
        with self._cond:
            while self.gate.stop is None:
                self._cond.wait()
            raise Stopped(self.gate.stop)


class _Offset:
    """A job's hooks for a run that starts `done` steps in: run step k is job step done + k."""

    def __init__(self, job: RunnerJob, done: int) -> None:
        self._job, self._done = job, done

    def wait_for_step(self, step: int) -> None:
        self._job.wait_for_step(self._done + step)

    def on_step_end(self, step: int, latents: torch.Tensor) -> None:
        self._job.on_step_end(self._done + step, latents)
