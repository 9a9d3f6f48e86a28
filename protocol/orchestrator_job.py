"""The orchestrator's side of one job, sans I/O: quote, credit, grants, refresh, deadlines.

Every rule of a job's life on O lives here and is tested with plain
messages: the quote (spec 6, 8.2), credit in and grants out (spec 7 and
RUNNER.md 4: a runner is granted exactly the steps credit covers), the
payment timeout (a deadline the I/O layer waits on), parameter refresh
(spec 8.9) and how the job ends (result, cancelled or error). The I/O layer
(orchestrator/job_driver.py) feeds in what arrives, from the broadcaster,
the runner or the clock, and performs the outputs in order:

    job = OrchestratorJob(request, quote, payment_timeout=30.0)
    outputs = job.start(now)                      # [ToRunner(Run(...))]
    outputs = job.on_payment(receipt, now)        # [ToBroadcaster(Credit), ToRunner(Grant)]
    outputs = job.on_runner(Done(job_id, 1), now) # [ToBroadcaster(Progress)]
    outputs = job.on_deadline(now)                # when now >= job.deadline

Every input returns a list; none raises. `Ended` comes before the terminal
message to B, so capacity is free by the time B can send its next job; after
it the job ignores everything.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum
from fractions import Fraction

from protocol.credit import JobCredit
from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import (
    FEATURE_RESULT_FRAMES,
    FEATURE_STATUS,
    AwaitingPayment,
    Cancelled,
    Credit,
    JobAccepted,
    JobRequest,
    Message,
    Progress,
    Result,
    ResultFrame,
    ResultImage,
    Status,
    TicketParams,
    error_message,
)
from protocol.pricing import pixel_steps
from protocol.recipient import MAX_NONCES_PER_RAND
from protocol.runner import (
    Awaiting,
    Begin,
    Done,
    Failed,
    Grant,
    OutputFrame,
    Run,
    RunnerPreview,
    Stop,
    Working,
)
from protocol.runner import Output as RunnerOutput

__all__ = [
    "Ended",
    "JobOutput",
    "JobOutcome",
    "OrchestratorJob",
    "PaymentInput",
    "Phase",
    "ToBroadcaster",
    "ToRunner",
    "make_quote",
    "window_fee",
]


@dataclass(frozen=True)
class ToBroadcaster:
    message: Message


@dataclass(frozen=True)
class ToRunner:
    message: object
    """A runner-protocol message (protocol/runner.py)."""


@dataclass(frozen=True)
class JobOutcome:
    """What a finished job executed and earned (stats, metrics, tests)."""

    job_id: str
    terminal: str
    """"result", "cancelled" or "error"."""
    steps_executed: int
    steps_at_stop: int | None
    """Steps executed when a stop (cancel, bad payment, disconnect) was decided."""
    credit: Fraction
    earned: Fraction
    error_code: str | None = None

    @property
    def unspent(self) -> Fraction:
        """Credit beyond the fee of the steps that ran: the sender's balance (spec 7.5)."""
        return max(Fraction(0), self.credit - self.earned)


@dataclass(frozen=True)
class Ended:
    outcome: JobOutcome


JobOutput = ToBroadcaster | ToRunner | Ended
"""What an input asks the I/O layer to do, in order."""


@dataclass(frozen=True)
class PaymentInput:
    """What the I/O layer learnt from one payment message for this job."""

    ev: Fraction
    """EV of the tickets accepted (already checked by protocol/recipient.py)."""
    accepted: int
    winners: int
    error: ProtocolError | None = None
    """The first refused ticket's fault: credit what came before it, then end the job."""


class Phase(StrEnum):
    RUNNING = "running"
    STOPPING = "stopping"
    """A stop was sent to the runner; the job ends when the runner confirms."""
    ENDED = "ended"


def window_fee(fee_per_step: Fraction, preview_every: int, steps: int) -> Fraction:
    """The fee of one credit window: min(N, S) steps (spec 8.2)."""
    return fee_per_step * min(preview_every, steps)


def make_quote(
    request: JobRequest,
    *,
    steps: int,
    pixels_per_step: int,
    price_per_pixel_step: Fraction,
    seed: int,
    ticket_params: TicketParams,
    credit: Fraction = Fraction(0),
) -> JobAccepted:
    """The `accepted` message for a job the orchestrator takes (spec 6.1, 8.2), starting
    with `credit` from the sender's balance (7.5)."""
    fee_per_step = price_per_pixel_step * pixels_per_step
    return JobAccepted(
        job_id=request.job_id,
        steps=steps,
        pixels_per_step=pixels_per_step,
        price_per_pixel_step=price_per_pixel_step,
        fee=fee_per_step * steps,
        window_steps=request.preview_every,
        seed=seed,
        ticket_params=ticket_params,
        credit=credit,
    )


class OrchestratorJob:
    """One accepted job: its credit ledger, the grants sent to its runner, its deadline."""

    def __init__(
        self,
        request: JobRequest,
        quote: JobAccepted,
        *,
        payment_timeout: float,
        refresh_blocks: int = 10,
        refresh_nonces: int = MAX_NONCES_PER_RAND // 2,
        stop_timeout: float = 60.0,
        runner_job_id: str | None = None,
        features: frozenset[str] = frozenset(),
    ) -> None:
        self.request = request
        self.job_id = request.job_id
        self.runner_job_id = runner_job_id or request.job_id
        self.features = features
        """Optional messages the broadcaster listed in its hello (spec 12.1)."""
        self._kept_frames: list[ResultImage] = []
        self._frames_seen = 0
        self._frame_size = (0, 0)
        """The job's id on its runner. B chooses `job_id`, unique only on its connection;
        the runner needs one unique among every job of the orchestrator."""
        self.quote = quote
        fee_per_step = quote.price_per_pixel_step * quote.pixels_per_step
        self.ledger = JobCredit(fee_per_step, quote.steps)
        self.ledger.add(quote.credit)  # carried from the sender's balance (spec 7.5)
        self.window_fee = window_fee(fee_per_step, quote.window_steps, quote.steps)
        self.payment_timeout = payment_timeout
        self.refresh_blocks = refresh_blocks
        self.refresh_nonces = refresh_nonces
        """Fresh parameters once this many nonces used the job's current ones: half of
        the cap leaves B the other half to pay with until the fresh ones reach it."""
        self.stop_timeout = stop_timeout
        """Seconds the runner has to confirm a stop; after that the job ends without it."""
        self.ticket_params = quote.ticket_params
        """The parameters the job's payments use now (the quote's, or refreshed ones)."""
        self.issued_seeds: set[bytes] = {quote.ticket_params.seed}
        """Seeds of every parameter set issued for this job: its payments may use only
        these (spec 8.1, check 3 of 8.4)."""
        self.phase = Phase.RUNNING
        self.granted = 0
        """Steps granted to the runner: always what credit covered when it was sent."""
        self.deadline: float | None = None
        """When `on_deadline` must be called (the payment timeout), or None."""
        self.stop_reason: ProtocolError | None = None
        self.steps_at_stop: int | None = None
        self._waiting_for: int | None = None
        self._fresh_params: TicketParams | None = None
        self._started = False
        self._first_credit: Credit | None = None

    # ------------------------------------------------------------------ inputs

    def prepay(self, payment: PaymentInput) -> None:
        """Credit the payment that came with the `job` (spec 8.11), checked once the quote
        was fixed: `start` grants what it covers and acknowledges it after `accepted`."""
        if self._started or self._first_credit is not None or payment.error is not None:
            raise ValueError("only a clean attached payment, once, before start")
        self.ledger.add(payment.ev)
        self._first_credit = Credit(
            job_id=self.job_id,
            credit=self.ledger.credit,
            covered_steps=self.ledger.covered_steps,
            tickets_accepted=payment.accepted,
            winners=payment.winners,
        )

    def start(self, now: float) -> list[JobOutput]:
        """Send the job to its runner, granted whatever credit already covers (the balance
        carried, an attached payment), then acknowledge an attached payment (C5, P9)."""
        if self._started or self.phase is not Phase.RUNNING:
            return []
        self._started = True
        self.granted = self.ledger.covered_steps
        run = Run(dataclasses.replace(self.request, job_id=self.runner_job_id), self.quote.seed)
        out: list[JobOutput] = [ToRunner(dataclasses.replace(run, granted=self.granted))]
        if self._first_credit is not None:
            out.append(ToBroadcaster(self._first_credit))
        return out

    def on_payment(self, payment: PaymentInput, now: float) -> list[JobOutput]:
        """Credit a payment's EV: acknowledge it, grant what it covers, or stop on a fault."""
        if self.phase is Phase.ENDED:
            return []
        self.ledger.add(payment.ev)
        covered = self.ledger.covered_steps
        out: list[JobOutput] = [
            ToBroadcaster(
                Credit(
                    job_id=self.job_id,
                    credit=self.ledger.credit,
                    covered_steps=covered,
                    tickets_accepted=payment.accepted,
                    winners=payment.winners,
                )
            )
        ]
        if self._waiting_for is not None and covered >= self._waiting_for:
            self._waiting_for, self.deadline = None, None
        if self.phase is Phase.RUNNING:
            out += self._grant()
        if payment.error is not None:
            out += self._stop(payment.error, now)
        return out

    def on_cancel(self, now: float) -> list[JobOutput]:
        return self._stop(ProtocolError(ErrorCode.CANCELLED, "cancelled by the broadcaster"), now)

    def on_disconnect(self, why: str, now: float) -> list[JobOutput]:
        """The broadcaster's connection is gone: stop the runner (nobody pays any more)."""
        return self._stop(ProtocolError(ErrorCode.INTERNAL_ERROR, f"connection lost: {why}"), now)

    def on_deadline(self, now: float) -> list[JobOutput]:
        """The clock reached `deadline`: no credit came for the step the runner waits at,
        or the runner did not confirm a stop in time (it is then left to finish alone)."""
        if self.deadline is None or now < self.deadline:
            return []
        if self.phase is Phase.STOPPING:
            assert self.stop_reason is not None
            return self._end_with(self.stop_reason)
        step, covered = self._waiting_for, self.ledger.covered_steps
        return self._stop(
            ProtocolError(
                ErrorCode.PAYMENT_TIMEOUT,
                f"no credit for step {step} within {self.payment_timeout:g} s "
                f"(credit covers {covered} steps)",
            ),
            now,
        )

    def on_runner_lost(self, why: str) -> list[JobOutput]:
        """The runner crashed or stopped answering (spec 9.5): the job ends here.

        A job already stopping ends as it was stopped (a cancel stays a cancel).
        """
        return self._end_with(self.stop_reason or ProtocolError(ErrorCode.RUNNER_LOST, why))

    def on_runner(self, message: object, now: float) -> list[JobOutput]:
        """A frame the runner sent for this job."""
        if self.phase is Phase.ENDED:
            return []
        if isinstance(message, Begin):
            return self._begin(message.step, now)
        if isinstance(message, Awaiting):
            return self._awaiting(message.next_step, now)
        if isinstance(message, RunnerPreview):
            return [ToBroadcaster(dataclasses.replace(message.preview, job_id=self.job_id))]
        if isinstance(message, Done):
            return self._done(message)
        if isinstance(message, OutputFrame):
            return self._output_frame(message)
        if isinstance(message, RunnerOutput):
            return self._output(message)
        if isinstance(message, Working):
            return self._working(message)
        if isinstance(message, Failed):
            return self._failed(message)
        return []

    # ---------------------------------------------------- parameter refresh

    def needs_fresh_params(self, block: int, nonces_used: int) -> bool:
        """Whether the next progress must carry fresh parameters (spec 8.9): the job's
        expire soon, or `nonces_used` of their nonces wear them out."""
        if self.phase is Phase.ENDED or self._fresh_params is not None:
            return False
        expiring = self.ticket_params.expiration_block - block <= self.refresh_blocks
        return expiring or nonces_used >= self.refresh_nonces

    def use_params(self, params: TicketParams) -> None:
        """Fresh parameters, sent with the next progress and used from then on."""
        self.ticket_params = params
        self.issued_seeds.add(params.seed)
        self._fresh_params = params

    # --------------------------------------------------------------- runner

    def _grant(self) -> list[JobOutput]:
        covered = self.ledger.covered_steps
        if covered <= self.granted:
            return []
        self.granted = covered
        return [ToRunner(Grant(self.runner_job_id, covered))]

    def _begin(self, step: int, now: float) -> list[JobOutput]:
        try:
            if step > self.granted:
                raise ValueError(f"step {step} was never granted (granted {self.granted})")
            self.ledger.execute(step)
        except (ValueError, ProtocolError) as exc:
            fault = ProtocolError(ErrorCode.INTERNAL_ERROR, f"runner fault: {exc}")
            return self._stop(fault, now)
        return []

    def _awaiting(self, step: int, now: float) -> list[JobOutput]:
        if self.phase is not Phase.RUNNING:
            return []
        if step <= self.granted:
            # Our grant crossed the runner's wait on the wire; sending it again is
            # harmless (an equal grant is allowed) and means no grant is ever lost.
            return [ToRunner(Grant(self.runner_job_id, self.granted))]
        covered = self.ledger.covered_steps
        if self._waiting_for == step:
            return []
        self._waiting_for = step
        self.deadline = now + self.payment_timeout
        return [
            ToBroadcaster(
                AwaitingPayment(
                    job_id=self.job_id,
                    next_step=step,
                    covered_steps=covered,
                    timeout_ms=int(self.payment_timeout * 1000),
                )
            )
        ]

    def _done(self, done: Done) -> list[JobOutput]:
        """Report the step (also while stopping: it ran, was charged, and B is owed it)."""
        fresh, self._fresh_params = self._fresh_params, None
        return [
            ToBroadcaster(
                Progress(
                    job_id=self.job_id,
                    step=done.step,
                    total_steps=self.ledger.total_steps,
                    covered_steps=self.ledger.covered_steps,
                    ticket_params=fresh,
                    latents=done.latents if self.request.want_latents else None,
                )
            )
        ]

    def _output_frame(self, frame: OutputFrame) -> list[JobOutput]:
        """A video frame: on to B as it comes (feature result_frames), else kept for the
        result, which then fits one frame (admission capped the job for that)."""
        self._frame_size = (frame.frame.width, frame.frame.height)
        self._frames_seen += 1
        if FEATURE_RESULT_FRAMES in self.features:
            return [
                ToBroadcaster(ResultFrame(job_id=self.job_id, index=frame.index, frame=frame.frame))
            ]
        self._kept_frames.append(frame.frame)
        return []

    def _output(self, output: RunnerOutput) -> list[JobOutput]:
        executed, streamed = self.ledger.executed, 0
        if output.video and output.frames:
            frames = tuple(self._kept_frames)
            streamed = 0 if frames else self._frames_seen
            (width, height), count = self._frame_size, self._frames_seen
        else:
            frames = output.images if output.video else ()
            first = output.images[0]
            width, height, count = first.width, first.height, len(output.images)
        result = Result(
            job_id=self.job_id,
            images=() if output.video else output.images,
            steps=executed,
            pixel_steps=pixel_steps(width, height, count, executed),
            fee=self.ledger.earned,
            frames=frames,
            fps=output.fps,
            streamed_frames=streamed,
        )
        return [*self._ended("result"), ToBroadcaster(result)]

    def _working(self, working: Working) -> list[JobOutput]:
        if FEATURE_STATUS not in self.features:
            return []
        status = Status(
            job_id=self.job_id, phase=working.phase, next_within_ms=working.next_within_ms
        )
        return [ToBroadcaster(status)]

    def _failed(self, failed: Failed) -> list[JobOutput]:
        if self.stop_reason is not None:
            return self._end_with(self.stop_reason)
        try:
            code = ErrorCode(failed.code)
        except ValueError:
            code = ErrorCode.PIPELINE_FAILED
        return self._end_with(ProtocolError(code, failed.message))

    # ------------------------------------------------------------- ending

    def _stop(self, reason: ProtocolError, now: float) -> list[JobOutput]:
        """Ask the runner to stop before its next step; the job ends when it confirms
        (or, should it never answer, after `stop_timeout`)."""
        if self.phase is not Phase.RUNNING:
            return []
        self.stop_reason = reason
        self.steps_at_stop = self.ledger.executed
        self._waiting_for = None
        if not self._started:
            return self._end_with(reason)
        self.deadline = now + self.stop_timeout
        self.phase = Phase.STOPPING
        return [ToRunner(Stop(self.runner_job_id, reason.code.value, reason.message[:1024]))]

    def _end_with(self, reason: ProtocolError) -> list[JobOutput]:
        if self.phase is Phase.ENDED:
            return []
        if reason.code is ErrorCode.CANCELLED:
            message: Message = Cancelled(job_id=self.job_id, steps=self.ledger.executed)
            terminal = "cancelled"
        else:
            message = error_message(reason.code.value, reason.message, self.job_id)
            terminal = "error"
        return [*self._ended(terminal, reason.code.value), ToBroadcaster(message)]

    def _ended(self, terminal: str, code: str | None = None) -> list[JobOutput]:
        self.phase = Phase.ENDED
        self.deadline = None
        return [
            Ended(
                JobOutcome(
                    job_id=self.job_id,
                    terminal=terminal,
                    steps_executed=self.ledger.executed,
                    steps_at_stop=self.steps_at_stop,
                    credit=self.ledger.credit,
                    earned=self.ledger.earned,
                    error_code=code,
                )
            )
        ]
