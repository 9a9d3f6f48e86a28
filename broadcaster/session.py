"""The broadcaster's Python API: one connection to an orchestrator, jobs as event streams.

    async with BroadcasterSession(url, key, max_price=Fraction(1)) as session:
        async for event in session.generate(TextToImageParams(prompt="a cat"), model_id=...):
            ...

The session checks every quote against the advertised price and its own
maximum before paying, then pays each window as the schedule in
protocol/credit.py says, so at most about one window is ever at risk.
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

from broadcaster.events import (
    Accepted,
    Event,
    JobError,
    JobResult,
    PaymentSent,
    PreviewFrame,
    ProgressUpdate,
)
from broadcaster.rate import StepRate
from pipelines.errors import InvalidRequest
from pipelines.requests import output_shape
from protocol.codec import DEFAULT_MAX_FRAME_BYTES, check
from protocol.connection import Connection
from protocol.credit import PaymentSchedule, ev_fits_window
from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import (
    Cancel,
    Cancelled,
    Capability,
    Credit,
    Error,
    Hello,
    Info,
    JobAccepted,
    JobParams,
    JobRequest,
    Message,
    Preview,
    Progress,
    Result,
    ResumeFrom,
    Role,
    TicketParams,
)
from protocol.pm import ticket_ev
from protocol.sender import TicketSender

MAX_TICKETS_PER_PAYMENT = 1024


class SessionError(Exception):
    """The session could not be set up; `code` is a protocol error code."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code


class BroadcasterSession:
    def __init__(
        self,
        url: str,
        private_key: bytes,
        *,
        max_price: Fraction | None = None,
        idle_timeout: float = 60.0,
        open_timeout: float = 10.0,
        lead_steps: int = 1,
    ) -> None:
        self.url = url
        self.sender = TicketSender(private_key)
        self.max_price = max_price
        self.idle_timeout = idle_timeout
        self.open_timeout = open_timeout
        self.lead_steps = lead_steps
        self.info: Info | None = None
        self._ws: ClientConnection | None = None
        self._conn = Connection(Role.BROADCASTER)
        self._lock = anyio.Lock()
        self._cancelled: set[str] = set()

    async def __aenter__(self) -> BroadcasterSession:
        try:
            with anyio.fail_after(self.open_timeout):
                self._ws = await connect(
                    self.url, max_size=2 * DEFAULT_MAX_FRAME_BYTES, compression=None
                )
                await self._send(Hello(sender=self.sender.address_bytes, agent="stepstream/0.1"))
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
        return self

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

    async def cancel(self, job_id: str) -> None:
        """Stop paying for the job and ask the orchestrator to stop it.

        The job's stream then ends with a JobError whose code is `cancelled`
        (or with its result, if that crossed the cancel on the wire).
        """
        self._cancelled.add(job_id)
        await self._send(Cancel(job_id=job_id))

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
        refusal = self._check_offer(pipeline, model_id)
        if refusal is not None:
            yield JobError(job_id, refusal.code.value, refusal.message)
            return
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
            check(request)
        except ProtocolError as err:
            yield JobError(job_id, err.code.value, err.message)
            return
        started = time.monotonic()
        first_preview: float | None = None
        rate = StepRate()
        schedule: PaymentSchedule | None = None
        accepted: JobAccepted | None = None
        winners = 0
        try:
            await self._send(request)
            while True:
                message = await self._receive()
                if isinstance(message, JobAccepted):
                    problem = self._check_quote(request, message)
                    if problem is not None:
                        await self._send(Cancel(job_id=job_id))
                        yield JobError(job_id, problem.code.value, problem.message)
                        await self._drain_to_end()
                        return
                    accepted = message
                    schedule = PaymentSchedule(
                        fee_per_step=message.fee / message.steps,
                        total_steps=message.steps,
                        window_steps=message.window_steps,
                        ticket_ev=ticket_ev(
                            message.ticket_params.face_value, message.ticket_params.win_prob
                        ),
                        lead_steps=self.lead_steps,
                    )
                    rate.observe(time.monotonic(), 0)
                    yield Accepted(
                        job_id,
                        message.steps,
                        message.pixels_per_step,
                        message.price_per_pixel_step,
                        message.fee,
                        message.window_steps,
                        message.seed,
                    )
                    async for event in self._pay(accepted, schedule, delivered=0):
                        yield event
                elif isinstance(message, Progress):
                    assert accepted is not None and schedule is not None
                    if message.ticket_params is not None:
                        # Fresh parameters before the old ones expire (spec 8.9).
                        problem = self._check_params(accepted, message.ticket_params)
                        if problem is not None:
                            await self._send(Cancel(job_id=job_id))
                            yield JobError(job_id, problem.code.value, problem.message)
                            await self._drain_to_end()
                            return
                        accepted = dataclasses.replace(
                            accepted, ticket_params=message.ticket_params
                        )
                        schedule.ticket_ev = ticket_ev(
                            message.ticket_params.face_value, message.ticket_params.win_prob
                        )
                    rate.observe(time.monotonic(), message.step)
                    yield ProgressUpdate(
                        job_id,
                        message.step,
                        message.total_steps,
                        rate.steps_per_second,
                        rate.steps_per_second * accepted.pixels_per_step,
                    )
                    async for event in self._pay(accepted, schedule, delivered=message.step):
                        yield event
                elif isinstance(message, Preview):
                    if first_preview is None:
                        first_preview = time.monotonic() - started
                    yield PreviewFrame(
                        job_id,
                        message.step,
                        message.image,
                        message.format,
                        message.width,
                        message.height,
                        message.method,
                        message.frames,
                        message.latents,
                    )
                elif isinstance(message, Result):
                    yield JobResult(
                        job_id,
                        message.images,
                        message.steps,
                        message.fee,
                        schedule.paid if schedule else Fraction(0),
                        schedule.tickets_sent if schedule else 0,
                        time.monotonic() - started,
                        first_preview,
                        rate.steps_per_second,
                        winners,
                        message.frames,
                        message.fps,
                    )
                    return
                elif isinstance(message, Credit):
                    winners += message.winners
                elif isinstance(message, Cancelled):
                    yield JobError(job_id, ErrorCode.CANCELLED.value, "the job was cancelled")
                    return
                elif isinstance(message, Error):
                    yield JobError(job_id, message.code, message.message)
                    return
        except ProtocolError as err:
            await self._fail(err)
            yield JobError(job_id, err.code.value, err.message)
        except TimeoutError:
            yield JobError(
                job_id,
                ErrorCode.INTERNAL_ERROR.value,
                f"no message from the orchestrator for {self.idle_timeout:g} s",
            )
        except ConnectionClosed as exc:
            yield JobError(job_id, ErrorCode.INTERNAL_ERROR.value, f"connection closed: {exc}")

    async def _pay(
        self, accepted: JobAccepted, schedule: PaymentSchedule, delivered: int
    ) -> AsyncIterator[Event]:
        if accepted.job_id in self._cancelled:
            return
        due = schedule.tickets_due(delivered)
        while due > 0:
            count = min(due, MAX_TICKETS_PER_PAYMENT)
            payment = self.sender.pay(accepted.job_id, accepted.ticket_params, count)
            await self._send(payment)
            schedule.record_sent(count)
            due -= count
            yield PaymentSent(
                accepted.job_id, count, schedule.tickets_sent, schedule.paid, accepted.fee
            )

    def _check_offer(self, pipeline: str, model_id: str) -> ProtocolError | None:
        cap = self.capability(pipeline, model_id)
        if cap is None:
            return ProtocolError(
                ErrorCode.UNKNOWN_MODEL, f"the orchestrator does not offer {pipeline} {model_id}"
            )
        if self.max_price is not None and cap.price_per_pixel_step > self.max_price:
            return ProtocolError(
                ErrorCode.PRICE_TOO_HIGH,
                f"price {float(cap.price_per_pixel_step):g} wei per pixel-step is above "
                f"the maximum {float(self.max_price):g}",
            )
        return None

    def _check_quote(self, request: JobRequest, quote: JobAccepted) -> ProtocolError | None:
        """The quote must match the advertisement, the request and our ceiling."""
        assert self.info is not None
        cap = self.capability(request.pipeline, request.model_id)
        assert cap is not None
        p = request.params
        try:
            pixels = output_shape(p).pixels_per_step
        except InvalidRequest as exc:
            return ProtocolError(ErrorCode.INVALID_REQUEST, f"cannot check the quote: {exc}")
        if quote.price_per_pixel_step != cap.price_per_pixel_step or (
            self.max_price is not None and quote.price_per_pixel_step > self.max_price
        ):
            return ProtocolError(ErrorCode.PRICE_TOO_HIGH, "quoted price differs from the offer")
        if (
            quote.pixels_per_step != pixels
            or quote.fee != pixels * quote.steps * cap.price_per_pixel_step
        ):
            return ProtocolError(ErrorCode.PRICE_TOO_HIGH, "quoted fee does not match the request")
        problem = self._check_params(quote, quote.ticket_params)
        if problem is not None:
            return problem
        already_done = request.resume.step if request.resume else 0
        if quote.steps > p.num_inference_steps - already_done:
            return ProtocolError(ErrorCode.INVALID_REQUEST, "quote charges more steps than asked")
        return None

    def _check_params(self, quote: JobAccepted, tp: TicketParams) -> ProtocolError | None:
        """Parameters must name this orchestrator and make a ticket worth one window."""
        assert self.info is not None
        window_fee = quote.fee / quote.steps * min(quote.window_steps, quote.steps)
        if tp.recipient != self.info.orchestrator or tp.win_prob == 0:
            return ProtocolError(ErrorCode.INVALID_TICKET_PARAMS, "ticket parameters are unusable")
        if not ev_fits_window(ticket_ev(tp.face_value, tp.win_prob), window_fee):
            return ProtocolError(
                ErrorCode.INVALID_TICKET_PARAMS,
                "one ticket would be worth more than one window of the job",
            )
        return None

    async def _drain_to_end(self) -> None:
        """After cancelling, read until the orchestrator ends the job."""
        while True:
            message = await self._receive()
            if isinstance(message, Result | Cancelled | Error):
                return

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
        return self._conn.receive(frame)

    async def _fail(self, err: ProtocolError) -> None:
        if self._ws is not None:
            with contextlib.suppress(ConnectionClosed):
                await self._ws.send(self._conn.error_frame(err))
            await self._ws.close(1002, err.code.value)
