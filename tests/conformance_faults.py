"""Planted faults for the conformance tests: an orchestrator or a broadcaster that breaks one
rule of spec/, built from the real pieces (a subclass, or a socket wrapper), never a mock.

Production code is unchanged: Orchestrator.job_type and BroadcasterSession.job_type name the
job machine each one runs, and these subclasses break one rule each.
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import Any

import anyio
from websockets.asyncio.server import ServerConnection

from broadcaster.session import BroadcasterSession
from orchestrator.server import Orchestrator
from protocol import codec
from protocol.broadcaster_job import BroadcasterJob, JobOutput, SendPayment
from protocol.messages import AwaitingPayment, JobAccepted, Message, Progress
from protocol.orchestrator_job import JobOutput as OJobOutput
from protocol.orchestrator_job import OrchestratorJob, ToRunner
from protocol.recipient import NonceLedger
from protocol.runner import Grant, Run, RunnerPreview

# ------------------------------------------------------------------ orchestrators


class RunsAStepWithoutCredit(OrchestratorJob):
    """Grants its runner one step more than the credit covers, and runs it (breaks C1)."""

    def _ahead(self) -> int:
        return min(self.ledger.total_steps, self.ledger.covered_steps + 1)

    def start(self, now: float) -> list[OJobOutput]:
        out = super().start(now)
        self.granted = self._ahead()
        return [
            ToRunner(dataclasses.replace(o.message, granted=self.granted))
            if isinstance(o, ToRunner) and isinstance(o.message, Run)
            else o
            for o in out
        ]

    def _grant(self) -> list[OJobOutput]:
        ahead = self._ahead()
        if ahead <= self.granted:
            return []
        self.granted = ahead
        return [ToRunner(Grant(self.runner_job_id, ahead))]

    def _begin(self, step: int, now: float) -> list[OJobOutput]:
        self.ledger.executed = step
        return []


class SendsOnePreviewTooFew(OrchestratorJob):
    """Drops the job's first preview (breaks J2)."""

    dropped = False

    def on_runner(self, message: object, now: float) -> list[OJobOutput]:
        if isinstance(message, RunnerPreview) and not self.dropped:
            self.dropped = True
            return []
        return super().on_runner(message, now)


class ForgetsNonces(NonceLedger):
    """Takes every nonce as new (breaks check 6 of K2)."""

    def check_and_record(self, *args: Any) -> bool:
        return True


class _Socket:
    """A server connection with one behaviour changed; everything else is the real one."""

    def __init__(self, ws: ServerConnection) -> None:
        self._ws = ws

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ws, name)

    async def send(self, frame: Any) -> None:
        await self._ws.send(frame)

    async def recv(self) -> Any:
        return await self._ws.recv()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self._ws.close(code, reason)


class _FeeOffByOneWei(_Socket):
    async def send(self, frame: Any) -> None:
        if isinstance(frame, bytes):
            message = codec.decode(frame)
            if isinstance(message, JobAccepted):
                frame = codec.encode(dataclasses.replace(message, fee=message.fee + 1))
        await self._ws.send(frame)


class _NeverCloses(_Socket):
    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self._ws.wait_closed()  # leaves it to the peer


class _IgnoresTextFrames(_Socket):
    async def recv(self) -> Any:
        while isinstance(frame := await self._ws.recv(), str):
            pass
        return frame


def orchestrator_with_socket(wrapper: type[_Socket]) -> type[Orchestrator]:
    class Wrapped(Orchestrator):
        async def handle(self, ws: ServerConnection) -> None:
            await super().handle(wrapper(ws))  # type: ignore[arg-type]

    return Wrapped


QuotesAFeeOneWeiOff = orchestrator_with_socket(_FeeOffByOneWei)
"""Quotes the fee plus one wei (breaks P1)."""
SendsAnErrorWithoutClosing = orchestrator_with_socket(_NeverCloses)
"""Sends a fatal error and leaves the socket open (breaks F3)."""
AnswersATextFrameWithNothing = orchestrator_with_socket(_IgnoresTextFrames)
"""Reads past a text frame as if it never came (breaks F1)."""

# ------------------------------------------------------------------ broadcasters


class PaysTwoWindowsAhead(BroadcasterJob):
    """Keeps two more windows paid than 7.3 allows: lead 2N instead of L < N (breaks C3;
    one window more still fits the bound's one-ticket term)."""

    def _accepted(self, quote: JobAccepted, now: float) -> list[JobOutput]:
        out = super()._accepted(quote, now)
        if self.schedule is not None:
            self.schedule.lead_steps = 2 * self.schedule.window_steps
        return out


class IgnoresCarriedCredit(BroadcasterJob):
    """Pays as though `accepted.credit` were 0 (breaks C8)."""

    def _accepted(self, quote: JobAccepted, now: float) -> list[JobOutput]:
        out = super()._accepted(quote, now)
        if self.schedule is not None:
            self.schedule.paid = Fraction(0)
        return out


class PaysOneTicketTooMany(BroadcasterJob):
    """Adds a ticket to the payment after the last step (breaks C4)."""

    extra_paid = False

    def payments(self) -> list[JobOutput]:
        due_for = self._delivered
        out = super().payments()
        if (
            not self.extra_paid
            and self.quote is not None
            and due_for == self.quote.steps
            and self.ticket_params is not None
        ):
            self.extra_paid = True
            out.append(SendPayment(1, self.ticket_params))
        return out


class PaysWhenAsked(BroadcasterJob):
    """Pays a ticket whenever the orchestrator sends awaiting_payment (breaks C6)."""

    asked = False

    def on_message(self, message: Message, now: float) -> list[JobOutput]:
        if isinstance(message, AwaitingPayment):
            self.asked = True
        return super().on_message(message, now)

    def payments(self) -> list[JobOutput]:
        out = super().payments()
        if self.asked and self.ticket_params is not None and not self.ended:
            self.asked = False
            out.append(SendPayment(1, self.ticket_params))
        return out


class SkipsTheFeeCheck(BroadcasterJob):
    """Takes any fee, checking only the rest of the quote (breaks P3)."""

    def check_quote(self, quote: JobAccepted):  # type: ignore[no-untyped-def]
        honest = quote.pixels_per_step * quote.steps * quote.price_per_pixel_step
        return super().check_quote(dataclasses.replace(quote, fee=honest))


class SkipsTheEvCheck(BroadcasterJob):
    """Takes parameters whatever one ticket is worth (breaks K15)."""

    def check_params(self, quote: JobAccepted, tp: Any):  # type: ignore[no-untyped-def]
        return None


class IgnoresRefreshedParams(BroadcasterJob):
    """Pays with the quote's parameters to the end (breaks K16)."""

    def _progress(self, progress: Progress, now: float) -> list[JobOutput]:
        return super()._progress(dataclasses.replace(progress, ticket_params=None), now)


class AcceptsAnyResultSize(BroadcasterJob):
    """Checks a result's count, steps and fee but not its size (breaks J7)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["output_size"] = None
        super().__init__(*args, **kwargs)


def session_with(job_type: type[BroadcasterJob]) -> type[BroadcasterSession]:
    return type(f"SessionWith{job_type.__name__}", (BroadcasterSession,), {"job_type": job_type})


class PaysOnAClock(BroadcasterSession):
    """Pays a ticket whenever no message came for `tick` seconds, as if the job were still
    running (payment by time, as Livepeer's live AI does): breaks M1."""

    tick = 1.5

    async def _receive(self) -> Message:
        while True:
            with anyio.move_on_after(self.tick):
                return await super()._receive()
            for job in list(self._jobs.values()):
                if job.ticket_params is not None and not job.ended:
                    await self._send(self.sender.pay(job.job_id, job.ticket_params, 1))


class AttachesOneTicketTooMany(BroadcasterSession):
    """Attaches one first-window ticket more than the window takes (breaks C9)."""

    def _first_payment(self, request: Any, capability: Any, shape: Any) -> Any:
        first, plan = super()._first_payment(request, capability, shape)
        if first is None or plan is None:
            return first, plan
        more = self.sender.pay(request.job_id, first.ticket_params, 1).tickets
        ev = plan.ev / plan.tickets
        bigger = dataclasses.replace(plan, tickets=plan.tickets + 1, ev=plan.ev + ev)
        return dataclasses.replace(first, tickets=first.tickets + more), bigger
