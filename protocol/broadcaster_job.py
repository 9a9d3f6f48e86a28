"""The broadcaster's side of one job, sans I/O: the quote's checks, the payment schedule, events.

What B must refuse (a quote that breaks the offer or spec 6.1, ticket
parameters worth more than a window, spec 6.3 and 8.2), when it pays and how
much (spec 7.3), and what the caller is told, all decided here from the
messages O sends and the time they arrived. The session
(broadcaster/session.py) sends the job, feeds every message in, and does
what comes out, in order:

    job = BroadcasterJob(request, capability, orchestrator, pixels_per_step=64 * 64, now=t0)
    for out in [*job.on_message(accepted, now), *job.payments()]:
        SendPayment -> sign `count` tickets against `params` and send them
        SendCancel  -> send `cancel`
        EndConnection -> send a fatal `error` with its code and close (a bad result, J7)
        Emit        -> hand `event` to the caller

`payments()` is asked after the caller has seen a message's events, so a
cancel made in between stops the payment that delivery would have released.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum
from fractions import Fraction

from protocol.credit import AttachPlan, PaymentSchedule, ev_fits_window
from protocol.errors import ErrorCode, ProtocolError
from protocol.job_events import (
    Accepted,
    Event,
    JobError,
    JobResult,
    JobStatus,
    PaymentSent,
    PreviewFrame,
    ProgressUpdate,
)
from protocol.messages import (
    Cancelled,
    Capability,
    Credit,
    Error,
    JobAccepted,
    JobRequest,
    Message,
    Preview,
    Progress,
    Queued,
    Result,
    ResultFrame,
    ResultImage,
    Status,
    TicketParams,
)
from protocol.pm import ticket_ev
from protocol.rate import StepRate
from protocol.result_check import result_problem

MAX_TICKETS_PER_PAYMENT = 1024
"""A payment carries at most this many tickets (spec 4.1)."""


@dataclass(frozen=True)
class Emit:
    event: Event


@dataclass(frozen=True)
class SendPayment:
    count: int
    params: TicketParams


@dataclass(frozen=True)
class SendCancel:
    pass


@dataclass(frozen=True)
class EndConnection:
    """End the connection with a fatal error: the orchestrator cannot be trusted with it."""

    error: ProtocolError


JobOutput = Emit | SendPayment | SendCancel | EndConnection


class Phase(StrEnum):
    REQUESTED = "requested"
    RUNNING = "running"
    DRAINING = "draining"
    """B refused the quote (or new parameters) and cancelled: read until O ends the job."""
    ENDED = "ended"


def check_offer(
    capability: Capability | None, pipeline: str, model_id: str, max_price: Fraction | None
) -> ProtocolError | None:
    """Why B must not send this job to this orchestrator (spec 6.3), or None."""
    if capability is None:
        return ProtocolError(
            ErrorCode.UNKNOWN_MODEL, f"the orchestrator does not offer {pipeline} {model_id}"
        )
    if max_price is not None and capability.price_per_pixel_step > max_price:
        return ProtocolError(
            ErrorCode.PRICE_TOO_HIGH,
            f"price {float(capability.price_per_pixel_step):g} wei per pixel-step is above "
            f"the maximum {float(max_price):g}",
        )
    return None


class BroadcasterJob:
    """One job B sent: checks O's quote, pays per window as steps arrive, reports events."""

    def __init__(
        self,
        request: JobRequest,
        capability: Capability,
        orchestrator: bytes,
        *,
        pixels_per_step: int,
        now: float,
        max_price: Fraction | None = None,
        lead_steps: int = 1,
        output_size: tuple[int, int] | None = None,
        attached: AttachPlan | None = None,
    ) -> None:
        self.request = request
        self.job_id = request.job_id
        self.capability = capability
        self.orchestrator = orchestrator
        self.pixels_per_step = pixels_per_step
        """What the request's output makes a step carry (computed by the caller, spec 6.1)."""
        self.max_price = max_price
        self.lead_steps = lead_steps
        self.output_size = output_size
        """(width, height) every result image must have (spec 6.1); None: not checked."""
        self.attached = attached
        """The first window's tickets that went with the `job` (spec 8.11), paid already."""
        self.phase = Phase.REQUESTED
        self.quote: JobAccepted | None = None
        self.ticket_params: TicketParams | None = None
        self.schedule: PaymentSchedule | None = None
        self.rate = StepRate()
        self.winners = 0
        self.cancelled = False
        self._started = now
        self._first_preview: float | None = None
        self._frames: list[ResultImage] = []
        self._delivered: int | None = None
        """Steps delivered, when a payment may be due for them (see `payments`)."""

    @property
    def ended(self) -> bool:
        return self.phase is Phase.ENDED

    @property
    def paid_here(self) -> Fraction:
        """EV this job paid in its own tickets (not what it carried from earlier jobs)."""
        if self.schedule is None or self.quote is None:
            return Fraction(0)
        return self.schedule.paid - self.quote.credit

    def cancel(self) -> list[JobOutput]:
        """The caller cancels: pay nothing more, ask O to stop (it answers `cancelled`)."""
        if self.phase in (Phase.ENDED, Phase.DRAINING) or self.cancelled:
            return []
        self.cancelled = True
        return [SendCancel()]

    def fail(self, code: ErrorCode, message: str) -> list[JobOutput]:
        """The connection failed under the job (closed, a fatal frame): it ends here."""
        if self.phase is Phase.ENDED:
            return []
        self.phase = Phase.ENDED
        return [Emit(JobError(job_id=self.job_id, code=code.value, message=message))]

    def on_message(self, message: Message, now: float) -> list[JobOutput]:
        """A frame O sent for this job (the connection's state machine checked its order)."""
        if self.phase is Phase.ENDED:
            return []
        if self.phase is Phase.DRAINING:
            if isinstance(message, Result | Cancelled | Error):
                self.phase = Phase.ENDED
            return []
        if isinstance(message, JobAccepted):
            return self._accepted(message, now)
        if isinstance(message, Progress):
            return self._progress(message, now)
        if isinstance(message, Preview):
            return self._preview(message, now)
        if isinstance(message, Credit):
            self.winners += message.winners
            return []
        if isinstance(message, ResultFrame):
            return self._frame(message)
        if isinstance(message, Status):
            status = JobStatus(
                job_id=self.job_id, phase=message.phase, next_within_ms=message.next_within_ms
            )
            return [Emit(status)]
        if isinstance(message, Queued):  # waiting for a slot; nothing is paid (spec 4.6)
            queued = JobStatus(
                job_id=self.job_id,
                phase="queued",
                next_within_ms=message.next_within_ms,
                queue_position=message.position,
                estimated_start_ms=message.estimated_start_ms,
            )
            return [Emit(queued)]
        if isinstance(message, Result):
            return self._result(message, now)
        if isinstance(message, Cancelled):
            return self._end(ErrorCode.CANCELLED.value, "the job was cancelled")
        if isinstance(message, Error):
            return self._end(message.code, message.message)
        return []  # awaiting_payment: B pays on delivery only, never on request

    # ------------------------------------------------------------------ checks

    def check_quote(self, quote: JobAccepted) -> ProtocolError | None:
        """The quote must match the advertisement, the request and B's ceiling (spec 6.3)."""
        cap, req = self.capability, self.request
        if quote.price_per_pixel_step != cap.price_per_pixel_step or (
            self.max_price is not None and quote.price_per_pixel_step > self.max_price
        ):
            return ProtocolError(ErrorCode.PRICE_TOO_HIGH, "quoted price differs from the offer")
        if quote.steps < 1 or (
            quote.pixels_per_step != self.pixels_per_step
            or quote.fee != self.pixels_per_step * quote.steps * cap.price_per_pixel_step
        ):
            return ProtocolError(ErrorCode.PRICE_TOO_HIGH, "quoted fee does not match the request")
        if quote.window_steps != req.preview_every:
            return ProtocolError(ErrorCode.PRICE_TOO_HIGH, "quoted window is not the one asked")
        already_done = req.resume.step if req.resume else 0
        if quote.steps > req.params.num_inference_steps - already_done:
            return ProtocolError(ErrorCode.INVALID_REQUEST, "quote charges more steps than asked")
        return self.check_params(quote, quote.ticket_params)

    def check_params(self, quote: JobAccepted, tp: TicketParams) -> ProtocolError | None:
        """Parameters must name this orchestrator and make a ticket worth at most a window."""
        window_fee = quote.fee / quote.steps * min(quote.window_steps, quote.steps)
        if tp.recipient != self.orchestrator or tp.win_prob == 0:
            return ProtocolError(ErrorCode.INVALID_TICKET_PARAMS, "ticket parameters are unusable")
        if not ev_fits_window(ticket_ev(tp.face_value, tp.win_prob), window_fee):
            return ProtocolError(
                ErrorCode.INVALID_TICKET_PARAMS,
                "one ticket would be worth more than one window of the job",
            )
        return None

    # ---------------------------------------------------------------- messages

    def _accepted(self, quote: JobAccepted, now: float) -> list[JobOutput]:
        problem = self.check_quote(quote)
        if problem is not None:
            return self._refuse(problem)
        self.quote, self.ticket_params = quote, quote.ticket_params
        self.phase = Phase.RUNNING
        attached = self.attached
        self.schedule = PaymentSchedule(
            fee_per_step=quote.fee / quote.steps,
            total_steps=quote.steps,
            window_steps=quote.window_steps,
            ticket_ev=ticket_ev(quote.ticket_params.face_value, quote.ticket_params.win_prob),
            lead_steps=self.lead_steps,
            # What earlier jobs left at this orchestrator counts as paid (spec 7.5), and
            # so do the tickets that came with the job (8.11).
            paid=quote.credit + (attached.ev if attached else 0),
            tickets_sent=attached.tickets if attached else 0,
        )
        self.rate.observe(now, 0)
        accepted = Accepted(
            job_id=self.job_id,
            steps=quote.steps,
            pixels_per_step=quote.pixels_per_step,
            price_per_pixel_step=quote.price_per_pixel_step,
            fee=quote.fee,
            window_steps=quote.window_steps,
            seed=quote.seed,
            credit=quote.credit,
        )
        self._delivered = 0
        if attached is None:
            return [Emit(accepted)]
        sent = PaymentSent(
            job_id=self.job_id,
            tickets=attached.tickets,
            tickets_total=attached.tickets,
            ev_paid=self.paid_here,
            fee=quote.fee,
        )
        return [Emit(accepted), Emit(sent)]

    def _progress(self, progress: Progress, now: float) -> list[JobOutput]:
        quote = self.quote
        assert quote is not None and self.schedule is not None
        if progress.ticket_params is not None:
            # Fresh parameters before the old ones expire (spec 8.9).
            problem = self.check_params(quote, progress.ticket_params)
            if problem is not None:
                return self._refuse(problem)
            self.ticket_params = progress.ticket_params
            self.schedule.ticket_ev = ticket_ev(
                progress.ticket_params.face_value, progress.ticket_params.win_prob
            )
        self.rate.observe(now, progress.step)
        update = ProgressUpdate(
            job_id=self.job_id,
            step=progress.step,
            total_steps=progress.total_steps,
            steps_per_second=self.rate.steps_per_second,
            pixel_steps_per_second=self.rate.steps_per_second * quote.pixels_per_step,
            latents=progress.latents,
        )
        self._delivered = progress.step
        return [Emit(update)]

    def _preview(self, preview: Preview, now: float) -> list[JobOutput]:
        if self._first_preview is None:
            self._first_preview = now - self._started
        frame = PreviewFrame(
            job_id=self.job_id,
            step=preview.step,
            image=preview.image,
            format=preview.format,
            width=preview.width,
            height=preview.height,
            method=preview.method,
            frames=preview.frames,
        )
        return [Emit(frame)]

    def _frame(self, message: ResultFrame) -> list[JobOutput]:
        """A video frame ahead of the result (feature result_frames): kept, in order."""
        if message.index != len(self._frames):
            return self._invalid(
                f"result frame {message.index} arrived where {len(self._frames)} was due"
            )
        self._frames.append(message.frame)
        return []

    def _result(self, result: Result, now: float) -> list[JobOutput]:
        self.phase = Phase.ENDED
        assert self.quote is not None
        if result.streamed_frames or self._frames:  # the frames came ahead (spec 9.4)
            if result.streamed_frames != len(self._frames):
                why = f"the result counts {result.streamed_frames} frames, {len(self._frames)} came"
                return self._invalid(why)
            result = dataclasses.replace(result, frames=tuple(self._frames), streamed_frames=0)
        problem = result_problem(result, self.request, self.quote, self.output_size)
        if problem is not None:  # spec J7: never handed to the caller
            return self._invalid(problem)
        frames = result.frames
        schedule = self.schedule
        event = JobResult(
            job_id=self.job_id,
            images=result.images,
            steps=result.steps,
            fee=result.fee,
            ev_paid=self.paid_here,
            ev_carried=self.quote.credit if self.quote else Fraction(0),
            tickets_sent=schedule.tickets_sent if schedule else 0,
            seconds=now - self._started,
            time_to_first_preview=self._first_preview,
            steps_per_second=self.rate.steps_per_second,
            winners=self.winners,
            frames=frames,
            fps=result.fps,
        )
        return [Emit(event)]

    def _invalid(self, problem: str) -> list[JobOutput]:
        """A result that is not the one asked for (spec J7): end the connection."""
        bad = ProtocolError(ErrorCode.INVALID_RESULT, problem)
        return [EndConnection(bad), *self._end(bad.code.value, problem)]

    def _end(self, code: str, message: str) -> list[JobOutput]:
        self.phase = Phase.ENDED
        return [Emit(JobError(job_id=self.job_id, code=code, message=message))]

    def _refuse(self, problem: ProtocolError) -> list[JobOutput]:
        """Stop the job over a bad quote or parameters: cancel, tell the caller, drain."""
        self.phase = Phase.DRAINING
        error = JobError(job_id=self.job_id, code=problem.code.value, message=problem.message)
        return [SendCancel(), Emit(error)]

    def payments(self) -> list[JobOutput]:
        """The payments now due (spec 7.3), in payments of at most 1024 tickets.

        Asked after the caller has seen the events of the last message, so a
        cancel the caller made meanwhile is honoured: nothing is paid after it.
        """
        delivered, self._delivered = self._delivered, None
        schedule, params = self.schedule, self.ticket_params
        if delivered is None or self.cancelled or self.phase is not Phase.RUNNING:
            return []
        assert schedule is not None and params is not None
        out: list[JobOutput] = []
        due = schedule.tickets_due(delivered)
        while due > 0:
            count = min(due, MAX_TICKETS_PER_PAYMENT)
            schedule.record_sent(count)
            due -= count
            out.append(SendPayment(count, params))
            sent = PaymentSent(
                job_id=self.job_id,
                tickets=count,
                tickets_total=schedule.tickets_sent,
                ev_paid=self.paid_here,
                fee=self.quote.fee if self.quote else Fraction(0),
            )
            out.append(Emit(sent))
        return out
