"""One broadcaster job as the conformance orchestrator serves it: a script drives it, a record
keeps what the broadcaster did (every payment, when, against what it had been shown).

The orchestrator side of spec 7 is honest here unless a case says otherwise:
a step is shown only once credit covers it, every payment is answered with a
`credit` (C5), a preview comes every N steps. The misbehaviour a case wants
is one argument away (`accept(fee_delta=1)`, `step(k, params=...)`).
"""

from __future__ import annotations

import io
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import anyio

from pipelines.requests import OutputShape
from protocol.credit import ticket_odds
from protocol.messages import (
    AwaitingPayment,
    Cancelled,
    Credit,
    Error,
    JobAccepted,
    JobRequest,
    Message,
    Payment,
    Preview,
    Progress,
    Result,
    ResultImage,
    TicketParams,
    error_message,
)
from protocol.pm import MAX_UINT256, ticket_ev
from protocol.recipient import PaymentReceipt, Recipient

FACE_VALUE = 10**15


@dataclass(frozen=True)
class PaymentSeen:
    at: float
    delivered: int
    """The last step shown to the broadcaster (progress sent) when the payment arrived."""
    tickets: int
    ev: Fraction
    """EV of the tickets accepted."""
    ticket_ev: Fraction
    """EV of one ticket of the parameters used."""
    seed: bytes
    refused: str | None
    """The first ticket check that failed (spec 8.4), or None."""
    attached: bool = False
    """Came with the `job` (spec 8.11)."""


@dataclass
class JobRecord:
    """What the broadcaster did during one job."""

    request: JobRequest
    shape: OutputShape
    steps: int
    f: Fraction
    """Fee of one step (spec 6.1) at the advertised price."""
    lead: int
    payments: list[PaymentSeen] = field(default_factory=list)
    delivered: int = 0
    cancelled_at: float | None = None
    closed_at: float | None = None
    broadcaster_error: Error | None = None
    invalid_frame: str | None = None
    next_job_at: float | None = None
    issued: dict[bytes, str] = field(default_factory=dict)
    """Seed of every parameter set shown for the job -> what it was (quote, refresh...)."""
    notes: list[str] = field(default_factory=list)
    marks: dict[str, Any] = field(default_factory=dict)
    """What a case's script noted for its judge (when it refreshed, what came meanwhile)."""
    ended: bool = False
    carried: Fraction = Fraction(0)
    """Credit the quote said the job starts with (`accepted.credit`, spec 7.5)."""
    _changed: anyio.Event = field(default_factory=anyio.Event)

    @property
    def pixels(self) -> int:
        return self.shape.pixels_per_step

    @property
    def window(self) -> int:
        return self.request.preview_every

    @property
    def fee(self) -> Fraction:
        return self.f * self.steps

    @property
    def paid(self) -> Fraction:
        """EV credited to the job: what it carried in, and every payment's."""
        return self.carried + sum((p.ev for p in self.payments), Fraction(0))

    @property
    def covered(self) -> int:
        return self.steps if self.f == 0 else min(self.steps, math.floor(self.paid / self.f))

    def target(self, delivered: int) -> int:
        """Steps a spec-following broadcaster keeps paid after `delivered` (spec 7.3)."""
        n = self.window
        return min(self.steps, ((delivered + self.lead) // n + 1) * n)

    @property
    def gone(self) -> bool:
        return self.closed_at is not None or self.broadcaster_error is not None

    def notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_until(self, condition: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not condition():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            changed = self._changed
            with anyio.move_on_after(left):
                await changed.wait()
        return True


class BroadcasterGone(Exception):
    """The broadcaster cancelled, closed or failed the connection: the script stops."""


class ServedJob:
    """The script's handle on a job: quote, steps, refreshes, the end."""

    def __init__(
        self,
        record: JobRecord,
        send: Callable[[Message], Awaitable[None]],
        recipient: Recipient,
        sender: bytes,
        *,
        price: Fraction,
        current_block: Callable[[], int],
        payment_timeout: float,
    ) -> None:
        self.record = record
        self.job_id = record.request.job_id
        self.send = send
        self.recipient = recipient
        self.sender = sender
        self.price = price
        self.current_block = current_block
        self.payment_timeout = payment_timeout
        self.quote: JobAccepted | None = None
        self._first: tuple[int, int] | None = None
        """(tickets accepted, winners) of the payment the job came with, to credit (8.11)."""

    # ------------------------------------------------------------ parameters

    def issue(self, window_fee: Fraction, what: str, face_value: int | None = None) -> TicketParams:
        """Parameters whose ticket is worth `window_fee` (spec 8.2), or a sure ticket of
        `face_value` wei when given."""
        face, win_prob = (
            (face_value, MAX_UINT256) if face_value else ticket_odds(window_fee, FACE_VALUE)
        )
        params = self.recipient.issue_params(
            self.sender, face, win_prob, self.current_block(), secrets.token_bytes(16)
        )
        self.record.issued[params.seed] = what
        return params

    @property
    def window_fee(self) -> Fraction:
        return self.record.f * min(self.record.window, self.record.steps)

    def fresh_params(self) -> TicketParams:
        return self.issue(self.window_fee, "refresh")

    def greedy_params(self, what: str) -> TicketParams:
        """Parameters whose one ticket is worth the window's fee + 1 wei at least (K15)."""
        return self.issue(self.window_fee, what, face_value=math.ceil(self.window_fee) + 1)

    # ----------------------------------------------------------------- steps

    async def accept(
        self,
        *,
        price: Fraction | None = None,
        fee_delta: Fraction = Fraction(0),
        pixels_factor: int = 1,
        params: TicketParams | None = None,
        credit: Fraction = Fraction(0),
    ) -> JobAccepted:
        r = self.record
        r.carried = credit
        price = self.price if price is None else price
        pixels = r.pixels * pixels_factor
        quote = JobAccepted(
            job_id=self.job_id,
            steps=r.steps,
            pixels_per_step=pixels,
            price_per_pixel_step=price,
            fee=pixels * price * r.steps + fee_delta,
            window_steps=r.window,
            seed=r.request.params.seed if r.request.params.seed is not None else 42,
            ticket_params=params or self.issue(self.window_fee, "quote"),
            credit=credit,
        )
        self.quote = quote
        await self.send(quote)
        if self._first is not None:  # the attached payment's credit follows the quote (K18)
            accepted, winners = self._first
            await self.send(Credit(self.job_id, r.paid, r.covered, accepted, winners))
        return quote

    async def wait_paid(self, steps: int, timeout: float | None = None) -> bool:
        r = self.record
        return await r.wait_until(
            lambda: r.covered >= steps or r.gone or r.cancelled_at is not None,
            self.payment_timeout if timeout is None else timeout,
        )

    def _stopped(self) -> None:
        if self.record.gone or self.record.cancelled_at is not None:
            raise BroadcasterGone()

    async def step(self, k: int, params: TicketParams | None = None) -> None:
        """Show step k: wait for its credit (C1), then its preview (when due) and progress."""
        r = self.record
        self._stopped()
        if not await self.wait_paid(k):
            r.notes.append(f"did not pay for step {k} within {self.payment_timeout:g} s")
            await self.fail("payment_timeout", f"no credit for step {k}")
            raise BroadcasterGone()
        self._stopped()
        if r.request.preview_method != "none" and (k % r.window == 0 or k == r.steps):
            await self.send(_preview(self.job_id, k))
        r.delivered = k
        await self.send(
            Progress(
                job_id=self.job_id,
                step=k,
                total_steps=r.steps,
                covered_steps=r.covered,
                ticket_params=params,
            )
        )

    async def steps(self, first: int, last: int) -> None:
        for k in range(first, last + 1):
            await self.step(k)

    async def settle(self, delivered: int, timeout: float = 2.0) -> None:
        """Give the payment due after `delivered` steps (7.3) time to arrive."""
        r = self.record
        await r.wait_until(lambda: r.covered >= r.target(delivered) or r.gone, timeout)

    async def observe(self, seconds: float) -> list[PaymentSeen]:
        """Wait `seconds` (less if the broadcaster leaves); the payments that came meanwhile."""
        r = self.record
        before = len(r.payments)
        await r.wait_until(lambda: r.gone or r.next_job_at is not None, seconds)
        return r.payments[before:]

    async def awaiting(self, next_step: int) -> None:
        r = self.record
        await self.send(
            AwaitingPayment(
                job_id=self.job_id,
                next_step=next_step,
                covered_steps=r.covered,
                timeout_ms=int(self.payment_timeout * 1000),
            )
        )

    async def finish(self, width_delta: int = 0) -> None:
        """The result: every image a PNG of the output size (plus `width_delta` pixels)."""
        r = self.record
        width, height, count, video = r.shape.width, r.shape.height, r.shape.count, r.shape.video
        image = _png(width + width_delta, height)
        images = tuple(
            ResultImage(image=image, format="png", width=width + width_delta, height=height, seed=i)
            for i in range(count)
        )
        r.ended = True
        await self.send(
            Result(
                job_id=self.job_id,
                images=() if video else images,
                steps=r.steps,
                pixel_steps=r.pixels * r.steps,
                fee=r.fee,
                frames=images if video else (),
                fps=getattr(r.request.params, "fps", 0) if video else 0,
            )
        )

    async def answer_cancel(self) -> None:
        """A cancel the script stopped for is answered with `cancelled` (spec X1)."""
        r = self.record
        if r.cancelled_at is not None and not r.ended and not r.gone:
            r.ended = True
            await self.send(Cancelled(job_id=self.job_id, steps=r.delivered))

    async def fail(self, code: str, message: str) -> None:
        self.record.ended = True
        await self.send(error_message(code, message, self.job_id))

    async def until_refused(self, seconds: float) -> None:
        """Wait for the broadcaster to cancel (answered) or leave; else end the job."""
        r = self.record
        await r.wait_until(lambda: r.gone or r.cancelled_at is not None, seconds)
        if r.cancelled_at is not None:
            await self.answer_cancel()
        elif not r.gone:
            await self.fail("internal_error", "conformance: the quote was neither refused nor paid")

    # ------------------------------------------------------------- payments

    def take_first(self, payment: Payment, block: int, first_seeds: set[bytes]) -> None:
        """Check and record the payment the job came with (spec 8.11), against the
        connection's first-window parameters; `accept` then credits it."""
        receipt = self.recipient.receive(payment, block, job_seeds=first_seeds)
        self._record(payment, receipt, attached=True)
        if receipt.error is None:
            self._first = (receipt.accepted, len(receipt.winners))

    def take(self, payment: Payment, block: int) -> Credit | None:
        """Check a payment (spec 8.4, against this job's parameters) and record it; the
        `credit` to answer it with while the job runs (C5)."""
        r = self.record
        receipt = self.recipient.receive(payment, block, job_seeds=set(r.issued))
        self._record(payment, receipt)
        if r.ended:
            return None
        return Credit(
            job_id=self.job_id,
            credit=r.paid,
            covered_steps=r.covered,
            tickets_accepted=receipt.accepted,
            winners=len(receipt.winners),
        )

    def _record(self, payment: Payment, receipt: PaymentReceipt, attached: bool = False) -> None:
        r = self.record
        tp = payment.ticket_params
        r.payments.append(
            PaymentSeen(
                at=time.monotonic(),
                delivered=r.delivered,
                tickets=len(payment.tickets),
                ev=receipt.ev,
                ticket_ev=ticket_ev(tp.face_value, tp.win_prob),
                seed=tp.seed,
                refused=receipt.error.code.value if receipt.error else None,
                attached=attached,
            )
        )
        r.notify()


def _png(width: int, height: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height), (40, 90, 160)).save(out, format="PNG")
    return out.getvalue()


def _preview(job_id: str, step: int) -> Preview:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (16, 16), (step * 20 % 256, 90, 160)).save(out, format="WEBP")
    return Preview(
        job_id=job_id, step=step, image=out.getvalue(), format="webp", width=16, height=16
    )
