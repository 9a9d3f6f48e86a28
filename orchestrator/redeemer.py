"""Redeems queued winning tickets on chain, asynchronously, exactly once.

Before each attempt the redeemer asks the broker whether the ticket is
already used (a transaction sent just before a crash may have been mined),
so a ticket is never redeemed twice. A failed attempt is retried with
exponential backoff; after `max_attempts` the winner is marked failed and
kept, with its last error, for an operator.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import anyio

from orchestrator.winners import QueuedWinner, WinnerQueue
from stepstream.settlement import Settlement

log = logging.getLogger(__name__)


class Redeemer:
    def __init__(
        self,
        queue: WinnerQueue,
        settlement: Settlement,
        *,
        max_attempts: int = 12,
        base_delay: float = 2.0,
        max_delay: float = 600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.queue = queue
        self.settlement = settlement
        self.max_attempts = max_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.clock = clock
        self.redeemed = 0
        self.gas_spent = 0
        self._wake = anyio.Event()
        self._pass_done = anyio.Event()

    def notify(self) -> None:
        """A winner was queued: look now rather than at the next due time."""
        self._wake.set()

    def backoff(self, attempts: int) -> float:
        """Seconds before retry number `attempts` (1, 2, ...): doubling, capped."""
        return min(self.max_delay, self.base_delay * 2 ** (attempts - 1))

    async def wait_settled(self) -> None:
        """Return once no winner is pending (for tests and shutdown)."""
        self._wake.set()
        while True:
            done = self._pass_done  # taken first, so a pass ending meanwhile is not missed
            if not await anyio.to_thread.run_sync(self.queue.pending):
                return
            await done.wait()

    async def run(self) -> None:
        """Redeem due winners until cancelled; sleeps until the next one is due."""
        if not self.settlement.redeems:
            return
        while True:
            self._wake = anyio.Event()
            due = await anyio.to_thread.run_sync(self.queue.due, self.clock())
            for item in due:
                await anyio.to_thread.run_sync(self.settle, item)
            next_due = await anyio.to_thread.run_sync(self.queue.next_due)
            self._pass_done.set()
            self._pass_done = anyio.Event()
            delay = None if next_due is None else max(0.0, next_due - self.clock())
            if delay == 0.0:
                continue
            with anyio.move_on_after(delay if delay is not None else float("inf")):
                await self._wake.wait()

    def settle(self, item: QueuedWinner) -> None:
        """One attempt at one winner (blocking; runs in a worker thread)."""
        ticket_hash = item.ticket_hash
        label = f"ticket 0x{ticket_hash.hex()[:16]}.. from {item.winner.ticket.sender}"
        try:
            if self.settlement.is_redeemed(ticket_hash):
                log.info("%s is already used on chain; not redeeming it again", label)
                self.queue.mark_redeemed(ticket_hash, None, 0)
                return
            log.info("redeeming %s (attempt %d)", label, item.attempts + 1)
            redemption = self.settlement.redeem(item.winner)
        except Exception as exc:  # node down, revert, timeout: all retried
            reason = f"{type(exc).__name__}: {exc}"
            attempts = item.attempts + 1
            if attempts >= self.max_attempts:
                log.error("giving up on %s after %d attempts: %s", label, attempts, reason)
                self.queue.mark_failed(ticket_hash, reason)
            else:
                delay = self.backoff(attempts)
                log.warning("redeeming %s failed (%s); retry in %.0f s", label, reason, delay)
                self.queue.mark_retry(ticket_hash, reason, self.clock() + delay)
            return
        self.queue.mark_redeemed(ticket_hash, redemption.tx_hash, redemption.gas_cost)
        self.redeemed += 1
        self.gas_spent += redemption.gas_cost
        log.info(
            "redeemed %s for %d wei (gas %d wei) in %s",
            label,
            item.winner.ticket.face_value,
            redemption.gas_cost,
            redemption.tx_hash,
        )
