"""The orchestrator's end of one runner connection: load, plan, and run jobs remotely.

Steps are granted as credit arrives: a grant never exceeds what the job's
ledger covers (spec/RUNNER.md 4), and a `begin` for an ungranted step is a
runner fault that ends the job. If the connection drops (the runner crashed
or stopped answering health pings), every job on it ends with `runner_lost`.
"""

from __future__ import annotations

import io
import logging
import math
import time
from typing import TYPE_CHECKING, Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from PIL import Image
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from pipelines.dispatch import JobOutput
from protocol.codec import DEFAULT_MAX_FRAME_BYTES
from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import AwaitingPayment, JobRequest, Progress
from protocol.runner import (
    AUTH_HEADER,
    FROM_RUNNER,
    Awaiting,
    Begin,
    Done,
    Failed,
    Grant,
    Load,
    Loaded,
    LoadFailed,
    Message,
    ModelState,
    Output,
    Plan,
    Planned,
    Ready,
    Run,
    RunnerPreview,
    Stop,
    Unload,
    Unloaded,
    decode,
    encode,
)

if TYPE_CHECKING:
    from orchestrator.jobs import RunningJob

log = logging.getLogger(__name__)

HEALTH_PING_INTERVAL = 5.0
HEALTH_PING_TIMEOUT = 10.0
"""A runner that misses a WebSocket pong this long is treated as crashed."""
REPLY_TIMEOUT = 600.0
"""Longest wait for a load (large models from disk) or a plan."""


class RunnerUnavailable(Exception):
    """The runner cannot be reached, refused our token, or went away."""


class RunnerLost(Exception):
    """Queued into a job's stream when its runner's connection drops."""


class RunnerClient:
    """One connection to a runner: request/reply for load and plan, a stream per job."""

    def __init__(self, url: str, token: str, name: str = "") -> None:
        self.url = url
        self.token = token
        self.name = name or url
        self.ready: Ready | None = None
        self.models: dict[str, ModelState] = {}
        self.closed = anyio.Event()
        self._ws: ClientConnection | None = None
        self._jobs: dict[str, MemoryObjectSendStream[Any]] = {}
        self._replies: dict[tuple[str, str], MemoryObjectSendStream[Any]] = {}

    @property
    def memory_bytes(self) -> int:
        return self.ready.memory_bytes if self.ready else 0

    async def connect(self) -> None:
        """Open the connection and read the runner's `ready`; RunnerUnavailable if not."""
        try:
            self._ws = await connect(
                self.url,
                additional_headers={AUTH_HEADER: f"Bearer {self.token}"},
                max_size=2 * DEFAULT_MAX_FRAME_BYTES,
                compression=None,
                ping_interval=HEALTH_PING_INTERVAL,
                ping_timeout=HEALTH_PING_TIMEOUT,
                open_timeout=30,
            )
            with anyio.fail_after(30):
                first = decode(await self._ws.recv(), FROM_RUNNER)
        except InvalidStatus as exc:
            status = exc.response.status_code
            why = "refused our token" if status == 401 else f"answered HTTP {status}"
            raise RunnerUnavailable(f"runner {self.name} {why}") from None
        except (OSError, TimeoutError, ConnectionClosed, ProtocolError) as exc:
            raise RunnerUnavailable(f"runner {self.name} unreachable: {exc}") from None
        if not isinstance(first, Ready):
            raise RunnerUnavailable(f"runner {self.name} did not start with ready")
        self.ready = first
        self.models = {m.model_id: m for m in first.models}
        log.info("runner %s ready on %s with %d models", self.name, first.device, len(self.models))

    async def receive_loop(self) -> None:
        """Route the runner's frames until the connection ends; then fail what waits on it."""
        assert self._ws is not None
        try:
            async for frame in self._ws:
                self._route(decode(frame, FROM_RUNNER))
        except (ConnectionClosed, ProtocolError) as exc:
            log.warning("runner %s connection ended: %s", self.name, exc)
        finally:
            self.closed.set()
            for stream in [*self._jobs.values(), *self._replies.values()]:
                stream.send_nowait(RunnerLost(f"runner {self.name} went away"))

    async def aclose(self) -> None:
        if self._ws is not None:
            await self._ws.close()

    def _route(self, message: Message) -> None:
        if isinstance(message, Loaded):
            self.models[message.model.model_id] = message.model
            self._reply(("load", message.model.model_id), message)
        elif isinstance(message, LoadFailed):
            self._reply(("load", message.model_id), message)
        elif isinstance(message, Unloaded):
            self.models.pop(message.model_id, None)
            self._reply(("unload", message.model_id), message)
        elif isinstance(message, Planned | Failed) and ("plan", message.job_id) in self._replies:
            self._reply(("plan", message.job_id), message)
        else:
            stream = self._jobs.get(getattr(message, "job_id", None) or _preview_job(message))
            if stream is not None:
                stream.send_nowait(message)

    def _reply(self, key: tuple[str, str], message: Message) -> None:
        stream = self._replies.get(key)
        if stream is not None:
            stream.send_nowait(message)

    async def _send(self, message: Message) -> None:
        if self._ws is None or self.closed.is_set():
            raise RunnerUnavailable(f"runner {self.name} is not connected")
        try:
            await self._ws.send(encode(message))
        except ConnectionClosed:
            raise RunnerUnavailable(f"runner {self.name} went away") from None

    async def _request(self, key: tuple[str, str], message: Message) -> Message:
        send, receive = anyio.create_memory_object_stream[Any](4)
        self._replies[key] = send
        try:
            await self._send(message)
            with anyio.fail_after(REPLY_TIMEOUT):
                reply = await receive.receive()
        except TimeoutError:
            raise RunnerUnavailable(f"runner {self.name} did not answer {key[0]}") from None
        finally:
            self._replies.pop(key, None)
        if isinstance(reply, RunnerLost):
            raise RunnerUnavailable(str(reply))
        return reply

    async def load(self, model_id: str) -> ModelState:
        """Load a model on the runner; ProtocolError(model_unavailable) when it cannot."""
        if model_id in self.models:
            return self.models[model_id]
        reply = await self._request(("load", model_id), Load(model_id))
        if isinstance(reply, LoadFailed):
            raise ProtocolError(ErrorCode.MODEL_UNAVAILABLE, reply.message)
        return reply.model

    async def unload(self, model_id: str) -> None:
        await self._request(("unload", model_id), Unload(model_id))

    async def plan(self, request: JobRequest) -> int:
        """Steps the job executes on this runner's model (before acceptance, before payment)."""
        reply = await self._request(("plan", request.job_id), Plan(request))
        if isinstance(reply, Failed):
            raise ProtocolError(ErrorCode(reply.code), reply.message)
        return reply.steps

    # ------------------------------------------------------------------ jobs

    async def execute(self, job: RunningJob) -> JobOutput:
        """Run `job` on the runner, granting steps as its credit covers them."""
        from orchestrator.jobs import JobStopped

        job_id = job.request.job_id
        send, receive = anyio.create_memory_object_stream[Any](math.inf)
        self._jobs[job_id] = send
        try:
            return await self._drive(job, receive)
        except RunnerUnavailable as exc:
            raise JobStopped(ProtocolError(ErrorCode.RUNNER_LOST, str(exc))) from None
        finally:
            self._jobs.pop(job_id, None)

    async def _drive(self, job: RunningJob, receive: MemoryObjectReceiveStream[Any]) -> JobOutput:
        from orchestrator.jobs import JobStopped

        pump = _GrantPump(self, job)
        await self._send(Run(job.request, job.seed, pump.granted))
        async with anyio.create_task_group() as tg:
            tg.start_soon(pump.run)
            outcome = await self._consume(job, receive, pump)
            tg.cancel_scope.cancel()
        if isinstance(outcome, ProtocolError):
            raise JobStopped(outcome)
        return outcome

    async def _consume(
        self, job: RunningJob, receive: MemoryObjectReceiveStream[Any], pump: _GrantPump
    ) -> JobOutput | ProtocolError:
        """Act on the job's frames until its output or its end; never raises."""
        req, ledger = job.request, job.ledger
        async for message in receive:
            if isinstance(message, RunnerLost):
                return ProtocolError(ErrorCode.RUNNER_LOST, f"{message} during the job")
            if isinstance(message, Begin):
                try:
                    job.record_step(message.step)
                except (ValueError, ProtocolError) as exc:
                    job.stop(ProtocolError(ErrorCode.INTERNAL_ERROR, f"runner fault: {exc}"))
            elif isinstance(message, Awaiting):
                await pump.awaiting(message.next_step)
            elif isinstance(message, RunnerPreview):
                await job.forward(message.preview)
            elif isinstance(message, Done):
                progress = Progress(
                    job_id=req.job_id,
                    step=message.step,
                    total_steps=ledger.total_steps,
                    covered_steps=ledger.covered_steps,
                )
                await job.forward(progress)
            elif isinstance(message, Failed):
                return job.stop_reason or ProtocolError(_code(message.code), message.message)
            elif isinstance(message, Output):
                try:
                    images = [Image.open(io.BytesIO(png)) for png in message.images]
                    for image in images:
                        image.load()
                except Exception as exc:
                    return ProtocolError(ErrorCode.PIPELINE_FAILED, f"runner output: {exc}")
                return JobOutput(images, message.video, message.fps)
        return ProtocolError(ErrorCode.RUNNER_LOST, "runner stream ended")


class _GrantPump:
    """Grants steps as the job's credit covers them; stops the job on payment timeout."""

    def __init__(self, client: RunnerClient, job: RunningJob) -> None:
        self.client = client
        self.job = job
        self.granted = job.ledger.covered_steps
        self._deadline: float | None = None
        self._waiting_for = 0
        self._stop_sent = False

    async def awaiting(self, step: int) -> None:
        """The runner paused before `step`: tell the broadcaster, start the payment clock."""
        job = self.job
        covered = job.ledger.covered_steps
        if step <= covered:
            return  # a grant is already on its way
        self._waiting_for = step
        self._deadline = time.monotonic() + job.payment_timeout
        await job.forward(
            AwaitingPayment(
                job_id=job.request.job_id,
                next_step=step,
                covered_steps=covered,
                timeout_ms=int(job.payment_timeout * 1000),
            )
        )
        job.wake()

    async def run(self) -> None:
        try:
            await self._pump()
        except RunnerUnavailable as exc:
            stream = self.client._jobs.get(self.job.request.job_id)
            if stream is not None:
                stream.send_nowait(RunnerLost(str(exc)))

    async def _pump(self) -> None:
        job, job_id = self.job, self.job.request.job_id
        while True:
            changed = job.changed
            reason = job.stop_reason
            if reason is not None:
                if not self._stop_sent:
                    self._stop_sent = True
                    await self.client._send(Stop(job_id, reason.code.value, reason.message[:1024]))
                await changed.wait()
                continue
            covered = job.ledger.covered_steps
            if covered > self.granted:
                self.granted = covered
                await self.client._send(Grant(job_id, covered))
            if self._deadline is not None and self._waiting_for > covered:
                with anyio.move_on_after(max(0.0, self._deadline - time.monotonic())):
                    await changed.wait()
                    continue
                job.stop(
                    ProtocolError(
                        ErrorCode.PAYMENT_TIMEOUT,
                        f"no credit for step {self._waiting_for} within "
                        f"{job.payment_timeout:g} s (credit covers {covered} steps)",
                    )
                )
                continue
            await changed.wait()


def _code(value: str) -> ErrorCode:
    try:
        return ErrorCode(value)
    except ValueError:
        return ErrorCode.PIPELINE_FAILED


def _preview_job(message: Message) -> str | None:
    preview = getattr(message, "preview", None)
    return getattr(preview, "job_id", None)
