"""The orchestrator's end of one runner connection: load and plan, and each job's frames.

Load and plan are request and reply. A job's frames are routed, in order,
into the inbox of the task that drives it (orchestrator/job_driver.py),
which decides everything else. If the connection drops (the runner crashed
or stopped answering health pings), every job inbox gets `RunnerLost`.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectSendStream
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from protocol.codec import DEFAULT_MAX_FRAME_BYTES
from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import JobRequest
from protocol.runner import (
    AUTH_HEADER,
    FROM_RUNNER,
    Failed,
    Load,
    Loaded,
    LoadFailed,
    Message,
    ModelState,
    Plan,
    Planned,
    Ready,
    Unload,
    Unloaded,
    decode,
    encode,
)

log = logging.getLogger(__name__)

HEALTH_PING_INTERVAL = 5.0
HEALTH_PING_TIMEOUT = 10.0
"""A runner that misses a WebSocket pong this long is treated as crashed."""
REPLY_TIMEOUT = 600.0
"""Longest wait for a load (large models from disk) or a plan."""


class RunnerUnavailable(Exception):
    """The runner cannot be reached, refused our token, or went away."""


class RunnerLost(Exception):
    """Queued into a job's inbox when its runner's connection drops."""


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
                _deliver(stream, RunnerLost(f"runner {self.name} went away"))

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
                _deliver(stream, message)

    def _reply(self, key: tuple[str, str], message: Message) -> None:
        stream = self._replies.get(key)
        if stream is not None:
            _deliver(stream, message)

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

    async def load(self, model_id: str, max_batch: int = 1, batch_wait_ms: int = 0) -> ModelState:
        """Load a model on the runner; ProtocolError(model_unavailable) when it cannot."""
        if model_id in self.models:
            return self.models[model_id]
        load = Load(model_id, max_batch, batch_wait_ms)
        reply = await self._request(("load", model_id), load)
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

    def open_job(self, job_id: str, inbox: MemoryObjectSendStream[Any]) -> None:
        """Route the runner's frames for `job_id` into `inbox` (and RunnerLost if it goes)."""
        self._jobs[job_id] = inbox
        if self.closed.is_set():
            _deliver(inbox, RunnerLost(f"runner {self.name} went away"))

    def close_job(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)

    async def send(self, message: Message) -> None:
        """Send a frame to the runner; RunnerUnavailable when it is gone."""
        await self._send(message)


def _deliver(stream: MemoryObjectSendStream[Any], item: object) -> None:
    """Queue `item`, unless whoever read the stream has finished with it."""
    with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
        stream.send_nowait(item)


def _preview_job(message: Message) -> str | None:
    preview = getattr(message, "preview", None)
    return getattr(preview, "job_id", None)
