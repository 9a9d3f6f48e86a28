"""The broadcaster's Python API: one connection to an orchestrator, jobs as event streams.

    async with BroadcasterSession(url, key, max_price=Fraction(1)) as session:
        async for event in session.generate(TextToImageParams(prompt="a cat"), model_id=...):
            ...

The session only moves messages: every rule of a job (the quote's checks,
when to pay and how much, what the caller is told) is decided by
protocol/broadcaster_job.py, so at most about one window is ever at risk.

A session runs its jobs one after another on one connection, and pays each
job's first window with the `job` itself when the orchestrator issued
first-window parameters (spec 8.11), so a job's first step waits for no
round trip. When the orchestrator closed the connection for idling (3.5),
the next job opens a fresh one, and a job that crossed the close on the wire
is sent again there: neither is a failed job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from fractions import Fraction

import anyio
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State as WsState

from pipelines.errors import InvalidRequest
from pipelines.requests import OutputShape, output_shape, planned_steps
from protocol.broadcaster_job import (
    BroadcasterJob,
    Emit,
    EndConnection,
    SendCancel,
    SendPayment,
    check_offer,
)
from protocol.codec import DEFAULT_MAX_FRAME_BYTES, check
from protocol.connection import Connection, State
from protocol.credit import AttachPlan, plan_first_payment
from protocol.errors import ErrorCode, ProtocolError
from protocol.job_events import Event, JobError
from protocol.messages import (
    FEATURE_INFO_REQUEST,
    FEATURES,
    Cancel,
    Capability,
    Error,
    FirstPayment,
    Hello,
    Info,
    InfoRequest,
    JobParams,
    JobRequest,
    Message,
    ResumeFrom,
    Role,
)
from protocol.pm import ticket_ev
from protocol.sender import TicketSender

FIRST_PARAMS_MAX_AGE = 120.0
"""Seconds after `info` that B pays a first window with its parameters: well inside their
validity (40 blocks, spec 8.2), so they never expire on the way (8.11)."""


def _closed_idle(message: Message) -> bool:
    """O ended the connection for idling (3.5): a job sent meanwhile never reached it."""
    return (
        isinstance(message, Error)
        and message.job_id is None
        and message.code == ErrorCode.IDLE_TIMEOUT.value
    )


class SessionError(Exception):
    """The session could not be set up; `code` is a protocol error code."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code


class BroadcasterSession:
    job_type: type[BroadcasterJob] = BroadcasterJob
    """The job machine each job runs (tests plant faults in a subclass)."""

    def __init__(
        self,
        url: str,
        private_key: bytes,
        *,
        max_price: Fraction | None = None,
        idle_timeout: float = 60.0,
        open_timeout: float = 10.0,
        lead_steps: int = 1,
        features: frozenset[str] = FEATURES,
    ) -> None:
        self.url = url
        self.sender = TicketSender(private_key)
        self.max_price = max_price
        self.idle_timeout = idle_timeout
        self.open_timeout = open_timeout
        self.lead_steps = lead_steps
        self.features = features
        """What the hello lists (spec 12.1); without `first_payment` every job waits for its
        quote before paying, as a v0.1 client does."""
        self.info: Info | None = None
        self.connections = 0
        """WebSockets opened so far: one, unless the orchestrator closed an idle one (3.5)."""
        self._ws: ClientConnection | None = None
        self._conn = Connection(Role.BROADCASTER)
        self._lock = anyio.Lock()
        self._jobs: dict[str, BroadcasterJob] = {}
        self._info_at = 0.0
        self._jobs_here = 0
        """Jobs sent on the current connection."""

    async def __aenter__(self) -> BroadcasterSession:
        await self._open()
        return self

    async def _open(self) -> None:
        """Connect, say hello and read `info`; raises SessionError."""
        await self.aclose()
        self._conn = Connection(Role.BROADCASTER)
        self._jobs_here = 0
        try:
            with anyio.fail_after(self.open_timeout):
                self._ws = await connect(
                    self.url, max_size=2 * DEFAULT_MAX_FRAME_BYTES, compression=None
                )
                hello = Hello(
                    sender=self.sender.address_bytes,
                    agent="stepstream/0.2",
                    features=tuple(sorted(self.features)),
                )
                await self._send(hello)
                info = await self._receive()
        except TimeoutError:
            await self.aclose()
            raise SessionError(ErrorCode.INTERNAL_ERROR, f"{self.url} did not answer") from None
        except (OSError, ConnectionClosed) as exc:
            await self.aclose()
            raise SessionError(
                ErrorCode.INTERNAL_ERROR, f"cannot reach {self.url}: {exc}"
            ) from None
        except ProtocolError as err:
            await self.aclose()
            raise SessionError(err.code, err.message) from None
        if not isinstance(info, Info):
            await self.aclose()
            raise SessionError(ErrorCode.UNEXPECTED_MESSAGE, f"expected info, got {info.TYPE}")
        self.info = info
        self._info_at = time.monotonic()
        self.connections += 1

    @property
    def reusable(self) -> bool:
        """Open, between jobs, and not failed: the next job can go on this connection."""
        return (
            self._ws is not None
            and self._ws.state is WsState.OPEN
            and self._conn.state is State.READY
            and not self._jobs
        )

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._ws is not None:
            await self._ws.close()

    def capability(self, pipeline: str, model_id: str) -> Capability | None:
        assert self.info is not None, "use the session inside `async with`"
        for cap in self.info.capabilities:
            if cap.pipeline == pipeline and cap.model_id == model_id:
                return cap
        return None

    async def refresh_info(self) -> Info:
        """Ask for a fresh `info` on this connection, between jobs (spec 4.5): the load and
        devices of now, without a new connection. SessionError when O does not offer it."""
        assert self.info is not None, "use the session inside `async with`"
        if FEATURE_INFO_REQUEST not in self.info.features:
            raise SessionError(
                ErrorCode.UNEXPECTED_MESSAGE, f"{self.url} does not answer info_request"
            )
        try:
            await self._send(InfoRequest())
            info = await self._receive()
        except ProtocolError as err:
            await self._fail(err)
            raise SessionError(err.code, err.message) from None
        except (TimeoutError, ConnectionClosed) as exc:
            raise SessionError(
                ErrorCode.INTERNAL_ERROR, f"no info from {self.url}: {exc}"
            ) from None
        if not isinstance(info, Info):
            raise SessionError(ErrorCode.UNEXPECTED_MESSAGE, f"expected info, got {info.TYPE}")
        self.info = info
        return info

    async def cancel(self, job_id: str) -> None:
        """Stop paying for the job and ask the orchestrator to stop it.

        The job's stream then ends with a JobError whose code is `cancelled`
        (or with its result, if that crossed the cancel on the wire).
        """
        job = self._jobs.get(job_id)
        if job is None:
            await self._send(Cancel(job_id=job_id))
            return
        for out in job.cancel():
            await self._perform(job, out)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ jobs

    async def generate(
        self,
        params: JobParams,
        *,
        model_id: str,
        pipeline: str | None = None,
        preview_every: int = 1,
        preview_method: str = "latent_rgb",
        preview_format: str = "webp",
        job_id: str | None = None,
        preview_frame: int | None = None,
        want_latents: bool = False,
        resume: ResumeFrom | None = None,
    ) -> AsyncIterator[Event]:
        """Run one job, yielding its events; the last one is a JobResult or a JobError.

        The pipeline defaults to the one `params` is for (TextToImageParams:
        text-to-image, ImageToImageParams, ImageToVideoParams). `want_latents`
        asks previews to carry the latents; `resume` continues a job begun
        elsewhere (spec 15), and its steps then count from there.
        """
        job_id = job_id or uuid.uuid4().hex
        pipeline = pipeline or params.PIPELINE
        assert self.info is not None, "use the session inside `async with`"
        capability = self.capability(pipeline, model_id)
        refusal = check_offer(capability, pipeline, model_id, self.max_price)
        request = JobRequest(
            job_id=job_id,
            pipeline=pipeline,
            model_id=model_id,
            params=params,
            preview_every=preview_every,
            preview_method=preview_method,
            preview_format=preview_format,
            preview_frame=preview_frame,
            want_latents=want_latents,
            resume=resume,
        )
        try:
            if refusal is not None:
                raise refusal
            check(request)
            shape = output_shape(params)
        except ProtocolError as err:
            yield JobError(job_id=job_id, code=err.code.value, message=err.message)
            return
        except InvalidRequest as exc:
            yield JobError(job_id=job_id, code=ErrorCode.INVALID_REQUEST.value, message=str(exc))
            return
        assert capability is not None
        for attempt in range(2):
            # S7: a job id must differ from the previous job's on one connection.
            if not self.reusable or self._conn.job_id == job_id:
                try:
                    await self._open()  # O closed the idle connection (3.5): a fresh one
                except SessionError as exc:
                    yield JobError(job_id=job_id, code=exc.code.value, message=str(exc))
                    return
                capability = self.capability(pipeline, model_id) or capability
            # O may close a connection that idled between jobs just as this job goes out;
            # then the job never reached it and goes again, once, on a fresh connection.
            retry_if_idle = attempt == 0 and self._jobs_here > 0
            first_payment, plan = self._first_payment(request, capability, shape)
            job = self.job_type(
                request,
                capability,
                self.info.orchestrator,
                pixels_per_step=shape.pixels_per_step,
                now=time.monotonic(),
                max_price=self.max_price,
                lead_steps=self.lead_steps,
                output_size=(shape.width, shape.height),
                attached=plan,
            )
            self._jobs[job_id] = job
            heard = False
            try:
                self._jobs_here += 1
                await self._send(dataclasses.replace(request, first_payment=first_payment))
                while not job.ended:
                    message = await self._receive()
                    if not heard and _closed_idle(message) and retry_if_idle:
                        break
                    heard = True
                    for out in job.on_message(message, time.monotonic()):
                        if isinstance(out, Emit):
                            yield out.event
                        else:
                            await self._perform(job, out)
                    for out in job.payments():  # after the caller saw the events (a cancel)
                        if isinstance(out, Emit):
                            yield out.event
                        else:
                            await self._perform(job, out)
            except ProtocolError as err:
                await self._fail(err)
                for out in job.fail(err.code, err.message):
                    yield out.event  # type: ignore[union-attr]
            except TimeoutError:
                why = f"no message from the orchestrator for {self.idle_timeout:g} s"
                for out in job.fail(ErrorCode.INTERNAL_ERROR, why):
                    yield out.event  # type: ignore[union-attr]
            except ConnectionClosed as exc:
                if not (retry_if_idle and not heard):
                    for out in job.fail(ErrorCode.INTERNAL_ERROR, f"connection closed: {exc}"):
                        yield out.event  # type: ignore[union-attr]
            finally:
                self._jobs.pop(job_id, None)
            if job.ended:
                return
            await self.aclose()

    def _first_payment(
        self, request: JobRequest, capability: Capability, shape: OutputShape
    ) -> tuple[FirstPayment | None, AttachPlan | None]:
        """The first window's tickets to send with the job (spec 8.11), when O issued
        first-window parameters on this connection that are fresh and fit the window."""
        info = self.info
        if info is None or not info.first_params or request.resume is not None:
            return None, None
        if time.monotonic() - self._info_at > FIRST_PARAMS_MAX_AGE:
            return None, None
        steps = planned_steps(request.params)
        fee_per_step = capability.price_per_pixel_step * shape.pixels_per_step
        window = fee_per_step * min(request.preview_every, steps)
        evs = [ticket_ev(p.face_value, p.win_prob) for p in info.first_params]
        plan = plan_first_payment(evs, window)
        if plan is None:
            return None, None
        params = info.first_params[plan.index]
        if params.recipient != info.orchestrator:
            return None, None
        payment = self.sender.pay(request.job_id, params, plan.tickets)
        return FirstPayment(ticket_params=params, tickets=payment.tickets), plan

    async def _perform(
        self, job: BroadcasterJob, out: SendPayment | SendCancel | EndConnection
    ) -> None:
        if isinstance(out, SendPayment):
            await self._send(self.sender.pay(job.job_id, out.params, out.count))
        elif isinstance(out, SendCancel):
            await self._send(Cancel(job_id=job.job_id))
        else:
            await self._fail(out.error)

    # -------------------------------------------------------------- transport

    async def _send(self, message: Message) -> None:
        assert self._ws is not None
        async with self._lock:
            await self._ws.send(self._conn.send(message))

    async def _receive(self) -> Message:
        assert self._ws is not None
        with anyio.fail_after(self.idle_timeout):
            frame = await self._ws.recv()
        if isinstance(frame, str):
            raise ProtocolError(ErrorCode.MALFORMED_FRAME, "text frame from the orchestrator")
        message = self._conn.receive(frame)
        if isinstance(message, Error) and message.job_id is None:
            # The orchestrator ended the connection (spec 3.3): close our side too.
            await self._ws.close()
        return message

    async def _fail(self, err: ProtocolError) -> None:
        if self._ws is not None:
            with contextlib.suppress(ConnectionClosed):
                await self._ws.send(self._conn.error_frame(err))
            await self._ws.close(1002, err.code.value)
