"""Credit a sender paid beyond the steps its jobs ran, carried to its next job (spec 7.5).

Tickets are whole: a job's last window is paid in a ticket worth a full
window, and a cancelled job leaves up to a window and a lead paid and not
run. go-livepeer keeps such credit per sender in its `Balances`; so does an
orchestrator here, so that over many jobs a broadcaster pays the fees of
the steps that ran, plus at most one ticket. In memory, per sender address,
forgotten `ttl` seconds after it last changed, and at a restart.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

DEFAULT_BALANCE_TTL = 600.0


@dataclass
class _Balance:
    amount: Fraction
    touched: float


class SenderBalances:
    """EV credited to each sender and not yet spent on a step, in wei."""

    def __init__(self, ttl: float = DEFAULT_BALANCE_TTL) -> None:
        self.ttl = ttl
        self._balances: dict[bytes, _Balance] = {}

    def __len__(self) -> int:
        return len(self._balances)

    def get(self, sender: bytes, now: float) -> Fraction:
        self.expire(now)
        entry = self._balances.get(sender)
        return entry.amount if entry is not None else Fraction(0)

    def take(self, sender: bytes, up_to: Fraction, now: float) -> Fraction:
        """Spend up to `up_to` of the sender's balance on a new job; the amount taken."""
        self.expire(now)
        entry = self._balances.get(sender)
        if entry is None or up_to <= 0:
            return Fraction(0)
        taken = min(entry.amount, up_to)
        entry.amount -= taken
        entry.touched = now
        if entry.amount <= 0:
            del self._balances[sender]
        return taken

    def put(self, sender: bytes, amount: Fraction, now: float) -> None:
        """Keep `amount` (what a job was credited beyond its executed steps)."""
        if amount <= 0:
            return
        self.expire(now)
        entry = self._balances.get(sender)
        if entry is None:
            self._balances[sender] = _Balance(amount, now)
        else:
            entry.amount += amount
            entry.touched = now

    def expire(self, now: float) -> None:
        """Forget balances untouched for `ttl` seconds."""
        stale = [s for s, b in self._balances.items() if now - b.touched >= self.ttl]
        for sender in stale:
            del self._balances[sender]
