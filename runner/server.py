"""The runner process's server: one WebSocket per orchestrator, models shared by all.

Auth is a bearer token on the handshake (spec/RUNNER.md 2); a wrong or
missing token gets HTTP 401 and no connection. Loading runs in a worker
thread so that grants, stops and health pings keep flowing meanwhile.
"""

from __future__ import annotations

import contextlib
import gc
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus

import anyio
import anyio.abc
import torch
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from pipelines.devices import device_memory_bytes
from pipelines.dispatch import PIPELINES_BY_FAMILY, executed_steps, resume_point, supports
from pipelines.errors import ModelNotFound
from pipelines.loader import LoadedModel, load_model
from pipelines.requests import output_shape
from pipelines.resume import resume_scheduler_name
from protocol.codec import DEFAULT_MAX_FRAME_BYTES
from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import JobRequest
from protocol.runner import (
    AUTH_HEADER,
    TO_RUNNER,
    Failed,
    Grant,
    Load,
    Loaded,
    LoadFailed,
    Message,
    ModelState,
    Plan,
    Planned,
    Ready,
    Run,
    Stop,
    Unload,
    Unloaded,
    decode,
    encode,
)
from runner.batcher import BatchClaim, Batcher, measure_batching
from runner.faults import FaultPlan, Faults
from runner.job import RunnerJob
from runner.outbox import ConnectionLost
from runner.reference import StepClaim, hardware, measure_step, reference_size

log = logging.getLogger(__name__)
AGENT = "stepstream-runner/0.1"
Send = Callable[[Message], Awaitable[None]]


@dataclass
class RunnerConfig:
    device: str
    token: str = field(repr=False)
    memory_budget: int | None = None
    """Bytes models may use on the device; None: all of the GPU's (or system's) memory."""
    offload: bool = False
    """Sequential CPU offload (CUDA only), for cards too small for the model."""
    faults: FaultPlan | None = None
    """Faults injected into every job (runner/faults.py); None in production."""


def model_state(
    model: LoadedModel, claim: StepClaim | None = None, batching: BatchClaim | None = None
) -> ModelState:
    return ModelState(
        model_id=model.model_id,
        family=model.family,
        pipelines=tuple(sorted(PIPELINES_BY_FAMILY.get(model.family, ()))),
        load_seconds=model.load_seconds,
        footprint_bytes=max(0, model.footprint_bytes),
        resume_scheduler=resume_scheduler_name(model.pipe),
        step_seconds=claim.seconds if claim else None,
        step_pixels=claim.pixels if claim else 0,
        batch_gains=batching.gains if batching else (),
        max_batch=batching.max_batch if batching else 1,
    )


class RunnerServer:
    """Holds the runner's models and serves orchestrators on one port."""

    def __init__(self, config: RunnerConfig) -> None:
        self.config = config
        self.fired: list[str] = []
        """Injected faults that fired, in order (runner/faults.py)."""
        self.models: dict[str, LoadedModel] = {}
        self.claims: dict[str, StepClaim] = {}
        """Each loaded model's step, timed at load (runner/reference.py)."""
        self._load_locks: dict[str, anyio.Lock] = {}
        self.batching: dict[str, BatchClaim] = {}
        """Each model's batch gains and size, timed at load when its Load asked (5.2)."""
        self.batchers: dict[str, Batcher] = {}
        """The models that batch, and their jobs' batches."""

    def memory_bytes(self) -> int:
        return device_memory_bytes(self.config.device, self.config.memory_budget)

    async def load(self, model_id: str, max_batch: int = 1, batch_wait_ms: int = 0) -> LoadedModel:
        lock = self._load_locks.setdefault(model_id, anyio.Lock())
        async with lock:
            if model_id not in self.models:
                log.info("loading %s on %s", model_id, self.config.device)
                if self.config.faults is not None and self.config.faults.load_seconds:
                    await anyio.sleep(self.config.faults.load_seconds)  # a slow disk
                model = await anyio.to_thread.run_sync(
                    load_model, model_id, self.config.device, self.config.offload
                )
                await self.adopt(model)
            model = self.models[model_id]
            if max_batch > 1 and model_id not in self.batching:
                width, height, _ = reference_size(model)
                claim = await anyio.to_thread.run_sync(
                    measure_batching, model, max_batch, width, height
                )
                self.batching[model_id] = claim
                if claim.max_batch > 1:
                    self.batchers[model_id] = Batcher(model, claim.max_batch, batch_wait_ms / 1000)
            return model

    async def adopt(self, model: LoadedModel, claim: StepClaim | None = None) -> None:
        """Hold a loaded model, its step timed first (the node's speed claim) unless `claim`
        gives the timing already made of this very model."""
        if claim is None:
            claim = await anyio.to_thread.run_sync(measure_step, model)
        if claim is not None:
            self.claims[model.model_id] = claim
        self.models[model.model_id] = model

    def state(self, model: LoadedModel) -> ModelState:
        return model_state(
            model, self.claims.get(model.model_id), self.batching.get(model.model_id)
        )

    def unload(self, model_id: str) -> None:
        self.claims.pop(model_id, None)
        self.batching.pop(model_id, None)
        self.batchers.pop(model_id, None)
        if self.models.pop(model_id, None) is not None:
            gc.collect()
            if torch.device(self.config.device).type == "cuda":
                torch.cuda.empty_cache()

    def _authorize(self, connection: ServerConnection, request: Request) -> Response | None:
        given = request.headers.get(AUTH_HEADER, "")
        expected = f"Bearer {self.config.token}"
        if hmac.compare_digest(given.encode(), expected.encode()):
            return None
        return connection.respond(HTTPStatus.UNAUTHORIZED, "runner token missing or wrong\n")

    @contextlib.asynccontextmanager
    async def serve(self, host: str, port: int) -> AsyncIterator[Server]:
        async with serve(
            self.handle,
            host,
            port,
            max_size=2 * DEFAULT_MAX_FRAME_BYTES,
            compression=None,
            process_request=self._authorize,
        ) as server:
            yield server

    async def handle(self, ws: ServerConnection) -> None:
        jobs: dict[str, RunnerJob] = {}
        lock = anyio.Lock()

        async def send(message: Message) -> None:
            async with lock:
                try:
                    await ws.send(encode(message))
                except ConnectionClosed:
                    raise ConnectionLost("orchestrator connection closed") from None

        hw = hardware(self.config.device)
        ready = Ready(
            device=self.config.device,
            memory_bytes=self.memory_bytes(),
            models=tuple(self.state(m) for m in self.models.values()),
            agent=AGENT,
            gpu=hw.gpu,
            vram_bytes=hw.vram_bytes,
        )
        async with anyio.create_task_group() as tg:
            try:
                await send(ready)
                async for frame in ws:
                    try:
                        message = decode(frame, TO_RUNNER)
                    except ProtocolError as err:
                        log.warning("closing orchestrator connection: %s", err)
                        await ws.close(1002, err.message[:100])
                        break
                    self._dispatch(message, jobs, send, tg)
            except ConnectionClosed:
                pass
            finally:
                stop = Stop("", ErrorCode.INTERNAL_ERROR.value, "orchestrator connection closed")
                for job in jobs.values():
                    job.stop(stop)

    def _dispatch(
        self,
        message: Message,
        jobs: dict[str, RunnerJob],
        send: Send,
        tg: anyio.abc.TaskGroup,
    ) -> None:
        if isinstance(message, Load):
            tg.start_soon(self._answer_load, message, send)
        elif isinstance(message, Unload):
            self.unload(message.model_id)
            tg.start_soon(send, Unloaded(message.model_id))
        elif isinstance(message, Plan):
            tg.start_soon(self._answer_plan, message, send)
        elif isinstance(message, Run):
            # Registered before this returns, so a grant or stop right behind the
            # run (the next frame) always finds its job.
            job = self._start(message, jobs, send, tg)
            if job is not None:
                tg.start_soon(self._run, job, jobs)
        elif isinstance(message, Grant):
            job = jobs.get(message.job_id)
            if job is not None:
                try:
                    job.grant(message.granted)
                except ProtocolError as err:
                    log.warning("ignoring a grant for %s: %s", message.job_id, err)
        elif isinstance(message, Stop):
            job = jobs.get(message.job_id)
            if job is not None:
                job.stop(message)
        else:
            log.warning("ignoring %s from the orchestrator", type(message).__name__)

    async def _answer_load(self, load: Load, send: Send) -> None:
        model_id = load.model_id
        try:
            model = await self.load(model_id, load.max_batch, load.batch_wait_ms)
        except ModelNotFound as exc:
            text = str(exc)[:1024]
            reply: Message = LoadFailed(model_id, ErrorCode.MODEL_UNAVAILABLE.value, text)
        except Exception as exc:  # a broken copy, out of memory: say so, stay up
            text = f"cannot load: {type(exc).__name__}: {exc}"[:1024]
            reply = LoadFailed(model_id, ErrorCode.MODEL_UNAVAILABLE.value, text)
        else:
            reply = Loaded(self.state(model))
        await send(reply)

    async def _answer_plan(self, plan: Plan, send: Send) -> None:
        req = plan.request
        model = self.models.get(req.model_id)
        reply: Message
        if model is None or not supports(model, req.pipeline):
            why = "is not loaded" if model is None else f"cannot run {req.pipeline}"
            reply = Failed(req.job_id, ErrorCode.MODEL_UNAVAILABLE.value, f"{req.model_id} {why}")
        else:
            try:
                steps = await anyio.to_thread.run_sync(_plan, req, model)
            except Exception as exc:
                reply = Failed(req.job_id, ErrorCode.INVALID_REQUEST.value, str(exc)[:1024])
            else:
                reply = Planned(req.job_id, steps)
        await send(reply)

    def _start(
        self, run: Run, jobs: dict[str, RunnerJob], send: Send, tg: anyio.abc.TaskGroup
    ) -> RunnerJob | None:
        """The job for `run`, registered; None (and `failed` on its way) when it cannot run."""
        req = run.request
        model = self.models.get(req.model_id)
        if model is None or req.job_id in jobs:
            why = "is already running" if model is not None else f"{req.model_id} is not loaded"
            code = ErrorCode.MODEL_UNAVAILABLE.value
            tg.start_soon(send, Failed(req.job_id, code, f"job {req.job_id} {why}"))
            return None
        faults = None if self.config.faults is None else Faults(self.config.faults, self.fired)
        job = RunnerJob(run, model, send, faults, self.batchers.get(req.model_id))
        jobs[req.job_id] = job
        return job

    async def _run(self, job: RunnerJob, jobs: dict[str, RunnerJob]) -> None:
        try:
            await job.run()
        finally:
            jobs.pop(job.request.job_id, None)


def _plan(req: JobRequest, model: LoadedModel) -> int:
    """Steps the job executes here, from its resume point if it continues one (spec 15.4).

    Raises InvalidRequest (or the pipeline's own errors) when it cannot run.
    """
    output_shape(req.params)
    steps = executed_steps(req.params, model)
    if req.resume is not None:
        steps -= resume_point(req.params, req.resume, model).step
    return steps
