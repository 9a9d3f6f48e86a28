"""The sender monitor: how much more a sender's funds can pay this orchestrator (max float).

A winner is worth what the chain will pay for it when it is redeemed, not
its face value: the broker pays from the sender's deposit, then from its
reserve, but only up to this recipient's share of the reserve,
`reserve / active pool size` per round, less what the recipient already
claimed this round (`claimableReserve` on Livepeer's broker). Winners
queued and not yet redeemed will take their face value first. So:

    max float = deposit + claimable reserve share - face value of pending winners

and 0 while the sender is unlocking. go-livepeer's sender monitor counts
the reserve share alone (a deposit can be drained by other recipients
between check and redemption); this project counts the deposit too, as the
exposure table of spec 8.10 says.
"""

from __future__ import annotations

from typing import Protocol

from settlement.contracts import SenderInfo
from settlement.winners import WinnerQueue

__all__ = ["FundsReader", "SenderMonitor", "max_float"]


def max_float(info: SenderInfo, claimable_reserve: int, pending: int) -> int:
    """What the sender's funds can still pay this recipient, as the chain would pay it."""
    if info.unlocking:
        return 0
    return info.deposit + claimable_reserve - pending


class FundsReader(Protocol):
    """The two chain reads the monitor needs (settlement/chain.py's OnChain has them)."""

    redeems: bool

    def sender_info(self, sender: str) -> SenderInfo | None: ...

    def claimable_reserve(self, sender: str) -> int: ...


class SenderMonitor:
    """Max float per sender, from the chain and the winner queue (blocking calls)."""

    def __init__(self, chain: FundsReader, winners: WinnerQueue) -> None:
        self.chain = chain
        self.winners = winners

    def max_float(self, sender: str) -> int | None:
        """The sender's max float; None with no chain, where no funds are checked."""
        if not self.chain.redeems:
            return None
        info = self.chain.sender_info(sender)
        if info is None:
            return 0
        claimable = 0 if info.unlocking else self.chain.claimable_reserve(sender)
        return max_float(info, claimable, self.winners.pending_face_value(sender))
