"""Redeems queued winning tickets on chain, asynchronously, exactly once, none lost.

Before each attempt the redeemer asks the broker whether the ticket is
already used (a transaction sent just before a crash may have been mined),
so a ticket is never redeemed twice. Several due winners go in one
batchRedeemWinningTickets with gas for each; Livepeer's broker skips a
ticket that fails or runs short of gas without reverting, so after a batch
each ticket is looked up again, and one that is not used stays pending and
is retried. A failed attempt is retried with exponential backoff; after
`max_attempts` the winner is marked failed and kept, with its last error,
for an operator. After redeeming, the fee pool is read back from the chain
and reported: that, not a sum of face values, is what was earned.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import anyio

from settlement.chain import Settlement
from settlement.winners import QueuedWinner, WinnerQueue

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 20
"""Winners per batch transaction (about 2.5 M gas on the project's broker)."""


def _label(item: QueuedWinner) -> str:
    return f"ticket 0x{item.ticket_hash.hex()[:16]}.. from {item.winner.ticket.sender}"


class Redeemer:
    def __init__(
        self,
        queue: WinnerQueue,
        settlement: Settlement,
        *,
        max_attempts: int = 12,
        base_delay: float = 2.0,
        max_delay: float = 600.0,
        batch_size: int = DEFAULT_BATCH_SIZE,
        clock: Callable[[], float] = time.time,
        on_redeemed: Callable[[int, int | None], None] | None = None,
    ) -> None:
        """`on_redeemed(tickets, fee_pool)` is told of each pass that redeemed tickets,
        with the fee pool as the chain records it (also once at start-up, tickets 0)."""
        self.queue = queue
        self.settlement = settlement
        self.max_attempts = max_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.batch_size = batch_size
        self.clock = clock
        self.on_redeemed = on_redeemed
        self.redeemed = 0
        self.gas_spent = 0
        self.fee_pool: int | None = None
        """The chain's fee pool for this account, as last read."""
        self._wake = anyio.Event()
        self._pass_done = anyio.Event()

    def notify(self) -> None:
        """A winner was queued: look now rather than at the next due time."""
        self._wake.set()

    def backoff(self, attempts: int) -> float:
        """Seconds before retry number `attempts` (1, 2, ...): doubling, capped."""
        return min(self.max_delay, self.base_delay * 2 ** (attempts - 1))

    async def wait_settled(self) -> None:
        """Return once a pass of `run` has ended, fee pool reported, with no winner pending
        (for tests and shutdown; at once off chain, where nothing is redeemed)."""
        if not self.settlement.redeems:
            return
        self._wake.set()
        while True:
            await self._pass_done.wait()
            if not await anyio.to_thread.run_sync(self.queue.pending):
                return

    async def run(self) -> None:
        """Redeem due winners until cancelled; sleeps until the next one is due."""
        if not self.settlement.redeems:
            return
        await anyio.to_thread.run_sync(self.report_fee_pool, 0)
        while True:
            self._wake = anyio.Event()
            due = await anyio.to_thread.run_sync(self.queue.due, self.clock())
            redeemed = 0
            for start in range(0, len(due), self.batch_size):
                group = due[start : start + self.batch_size]
                redeemed += await anyio.to_thread.run_sync(self.settle_group, group)
            if redeemed:
                await anyio.to_thread.run_sync(self.report_fee_pool, redeemed)
            next_due = await anyio.to_thread.run_sync(self.queue.next_due)
            self._pass_done.set()
            self._pass_done = anyio.Event()
            delay = None if next_due is None else max(0.0, next_due - self.clock())
            if delay == 0.0:
                continue
            with anyio.move_on_after(delay if delay is not None else float("inf")):
                await self._wake.wait()

    def report_fee_pool(self, redeemed: int) -> None:
        """Read the fee pool back from the chain, log it and tell `on_redeemed`."""
        try:
            self.fee_pool = self.settlement.fee_pool()
        except Exception as exc:  # a read failing must not stop redemption
            log.warning("cannot read the fee pool: %s", exc)
        if self.fee_pool is not None:
            log.info("fee pool on chain: %d wei", self.fee_pool)
        if self.on_redeemed is not None:
            self.on_redeemed(redeemed, self.fee_pool)

    def _failed(self, item: QueuedWinner, reason: str) -> None:
        """Schedule a retry, or give up after max_attempts."""
        attempts = item.attempts + 1
        if attempts >= self.max_attempts:
            log.error("giving up on %s after %d attempts: %s", _label(item), attempts, reason)
            self.queue.mark_failed(item.ticket_hash, reason)
        else:
            delay = self.backoff(attempts)
            log.warning("redeeming %s failed (%s); retry in %.0f s", _label(item), reason, delay)
            self.queue.mark_retry(item.ticket_hash, reason, self.clock() + delay)

    def _already_used(self, item: QueuedWinner) -> bool | None:
        """Whether the chain says the ticket is used (None: cannot tell now; retry set)."""
        try:
            used = self.settlement.is_redeemed(item.ticket_hash)
        except Exception as exc:
            self._failed(item, f"{type(exc).__name__}: {exc}")
            return None
        if used:
            log.info("%s is already used on chain; not redeeming it again", _label(item))
            self.queue.mark_redeemed(item.ticket_hash, None, 0)
        return used

    def settle(self, item: QueuedWinner) -> int:
        """One attempt at one winner (blocking; runs in a worker thread); 1 if redeemed."""
        if self._already_used(item) is not False:
            return 0
        try:
            log.info("redeeming %s (attempt %d)", _label(item), item.attempts + 1)
            redemption = self.settlement.redeem(item.winner)
        except Exception as exc:  # node down, revert, timeout: all retried
            self._failed(item, f"{type(exc).__name__}: {exc}")
            return 0
        self.queue.mark_redeemed(item.ticket_hash, redemption.tx_hash, redemption.gas_cost)
        self.redeemed += 1
        self.gas_spent += redemption.gas_cost
        log.info(
            "redeemed %s for %d wei (gas %d wei) in %s",
            _label(item),
            item.winner.ticket.face_value,
            redemption.gas_cost,
            redemption.tx_hash,
        )
        return 1

    def settle_group(self, items: Sequence[QueuedWinner]) -> int:
        """Redeem several winners, in one batch when more than one is still unused;
        every ticket is checked on chain afterwards. Returns how many were redeemed."""
        unused = [item for item in items if self._already_used(item) is False]
        if len(unused) <= 1:
            return sum(self.settle(item) for item in unused)
        log.info("redeeming %d tickets in one batch", len(unused))
        try:
            redemption = self.settlement.redeem_batch([item.winner for item in unused])
        except Exception as exc:
            for item in unused:
                self._failed(item, f"{type(exc).__name__}: {exc}")
            return 0
        done = []
        for item in unused:
            try:
                used = self.settlement.is_redeemed(item.ticket_hash)
            except Exception as exc:  # unknown for now: the next attempt looks again first
                self._failed(item, f"{type(exc).__name__}: {exc}")
                continue
            if used:
                done.append(item)
            else:
                self._failed(item, f"skipped by the batch in {redemption.tx_hash}")
        share = redemption.gas_cost // max(1, len(done))
        for item in done:
            self.queue.mark_redeemed(item.ticket_hash, redemption.tx_hash, share)
            log.info(
                "redeemed %s for %d wei in batch %s",
                _label(item),
                item.winner.ticket.face_value,
                redemption.tx_hash,
            )
        self.redeemed += len(done)
        self.gas_spent += redemption.gas_cost
        return len(done)
