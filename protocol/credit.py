"""The credit window: paid steps are flow control (spec section 7).

The orchestrator side keeps a `JobCredit`: it may execute step k only when
the expected value received for the job covers k steps. The broadcaster side
keeps a `PaymentSchedule`: it pays window w+1 once delivery reaches
w*N - lead, so the GPU need not wait for money, while no more than N + lead
steps (plus less than one ticket) are ever paid and not yet delivered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from functools import cache

from protocol.errors import ErrorCode, ProtocolError
from protocol.pm import MAX_UINT256


def max_lead(window_steps: int) -> int:
    """The most steps before a window's end B may pay the next (spec 7.3): N - 1, and 1
    when N = 1, so that a runner paid step by step still need not wait a round trip."""
    return max(1, window_steps - 1)


@dataclass
class JobCredit:
    """Orchestrator-side ledger of one job: credit in, steps out."""

    fee_per_step: Fraction
    total_steps: int
    credit: Fraction = Fraction(0)
    executed: int = 0

    def __post_init__(self) -> None:
        if self.fee_per_step < 0 or self.total_steps < 1:
            raise ValueError("fee_per_step must be >= 0 and total_steps >= 1")

    def add(self, ev: Fraction) -> None:
        if ev < 0:
            raise ValueError("credit cannot be negative")
        self.credit += ev

    @property
    def covered_steps(self) -> int:
        """How many steps of the job the credit pays for (capped at the job's length)."""
        if self.fee_per_step == 0:
            return self.total_steps
        return min(self.total_steps, math.floor(self.credit / self.fee_per_step))

    def may_execute(self, step: int) -> bool:
        return step <= self.covered_steps

    def execute(self, step: int) -> None:
        """Record that step `step` (1-based) runs; refuses an unpaid or out-of-order step."""
        if step != self.executed + 1:
            raise ValueError(f"step {step} out of order after {self.executed}")
        if step > self.total_steps:
            raise ValueError(f"step {step} is beyond the job's {self.total_steps} steps")
        if not self.may_execute(step):
            raise ProtocolError(ErrorCode.PAYMENT_TIMEOUT, f"step {step} is not covered by credit")
        self.executed = step

    @property
    def earned(self) -> Fraction:
        """Fee of the steps executed so far."""
        return self.executed * self.fee_per_step


@dataclass
class PaymentSchedule:
    """Broadcaster-side plan: how many tickets to send as steps are delivered."""

    fee_per_step: Fraction
    total_steps: int
    window_steps: int
    ticket_ev: Fraction
    lead_steps: int = 1
    paid: Fraction = Fraction(0)
    tickets_sent: int = 0

    def __post_init__(self) -> None:
        if self.window_steps < 1:
            raise ValueError("window_steps must be >= 1")
        if self.ticket_ev <= 0:
            raise ValueError("ticket EV must be positive")
        self.lead_steps = max(0, min(self.lead_steps, max_lead(self.window_steps)))

    def target_steps(self, delivered: int) -> int:
        """Steps that should be paid for once `delivered` steps have arrived."""
        n = self.window_steps
        windows = (delivered + self.lead_steps) // n + 1
        return min(self.total_steps, windows * n)

    def tickets_due(self, delivered: int) -> int:
        """ceil((fee of target steps - paid) / EV), or 0 when paid up."""
        shortfall = self.target_steps(delivered) * self.fee_per_step - self.paid
        if shortfall <= 0:
            return 0
        return math.ceil(shortfall / self.ticket_ev)

    def record_sent(self, tickets: int) -> None:
        self.tickets_sent += tickets
        self.paid += tickets * self.ticket_ev

    def max_exposure(self) -> Fraction:
        """Bound on EV paid and not delivered: N + lead steps plus one ticket (spec 7.3)."""
        return (self.window_steps + self.lead_steps) * self.fee_per_step + self.ticket_ev


def ticket_odds(window_fee: Fraction, face_value: int) -> tuple[int, int]:
    """Face value and win probability whose EV is one window's fee, rounded up by < 1 wei.

    Rounding up, not down, is deliberate: a ticket worth a hair less than a
    window would make every window cost two tickets. The face value is kept
    (so a winner is worth redeeming) unless the window costs more than it;
    then the ticket is a sure one for the window's fee, rounded up to a wei.
    """
    if face_value <= 0:
        raise ValueError("face value must be positive")
    if window_fee >= face_value:
        return max(1, math.ceil(window_fee)), MAX_UINT256
    win_prob = math.ceil(window_fee * MAX_UINT256 / face_value)
    return face_value, max(1, win_prob)


def ev_fits_window(ev: Fraction, window_fee: Fraction) -> bool:
    """Whether a ticket is no dearer than a window, allowing ticket_odds' rounding."""
    return ev < window_fee + 1


FIRST_EV_BASE = 4
FIRST_EV_MIN_EXPONENT = 10
"""First-window parameters (spec 8.11) have one-ticket EVs of 4^k wei, k from 10 (about
10^6 wei) up: any window then takes at most 4 tickets of the largest set that fits it."""
MAX_FIRST_PARAMS = 16
MAX_ATTACHED_TICKETS = 16
"""B attaches at most this many tickets to a job; a window that needs more pays after
`accepted` as before (spec 8.11)."""


def first_window_evs(face_value: int) -> list[int]:
    """The one-ticket EVs of a connection's first-window parameters: powers of 4 up to the
    face value (a ticket is worth at most its face), the largest MAX_FIRST_PARAMS of them."""
    evs, k = [], FIRST_EV_MIN_EXPONENT
    while FIRST_EV_BASE**k <= face_value:
        evs.append(FIRST_EV_BASE**k)
        k += 1
    return evs[-MAX_FIRST_PARAMS:]


@cache
def first_window_odds(face_value: int) -> tuple[tuple[int, int], ...]:
    """(face value, win_prob) of each first-window parameter set: the same for every
    connection while the face value stands, so worked out once."""
    return tuple(ticket_odds(Fraction(ev), face_value) for ev in first_window_evs(face_value))


@dataclass(frozen=True)
class AttachPlan:
    """Which first-window parameters pay a job's first window, and with how many tickets."""

    index: int
    """Position of the parameters in `info.first_params`."""
    tickets: int
    ev: Fraction
    """EV of the attached tickets together: the window's fee, up to one ticket more."""


def plan_first_payment(first_evs: list[Fraction], window_fee: Fraction) -> AttachPlan | None:
    """The fewest tickets, of parameters no dearer than the window (K15's rule), that pay
    `window_fee`; None when none fits or it takes more than MAX_ATTACHED_TICKETS."""
    if window_fee <= 0:
        return None
    best: AttachPlan | None = None
    for index, ev in enumerate(first_evs):
        if ev <= 0 or not ev_fits_window(ev, window_fee):
            continue
        count = math.ceil(window_fee / ev)
        if count <= MAX_ATTACHED_TICKETS and (best is None or count < best.tickets):
            best = AttachPlan(index, count, count * ev)
    return best
