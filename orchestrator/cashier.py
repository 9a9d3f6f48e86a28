"""An orchestrator's till: ticket parameters out, tickets in, winners kept for redemption.

Connections and jobs ask it three things (spec 8): what a ticket must look
like for a sender (in `info`, a job's quote, a refresh), what a payment is
worth (every check of 8.4 and the sender's max float, 8.8), and the chain's
block. A winner is stored durably before any payment that carries it is
acknowledged (8.6), and the redeemer works that queue in the background.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import TypeVar

import anyio

from protocol.credit import first_window_odds, ticket_odds
from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import Payment, TicketParams
from protocol.pm import MAX_UINT256
from protocol.recipient import (
    MAX_NONCES_PER_RAND,
    NonceLedger,
    PaymentReceipt,
    Recipient,
    address_str,
)
from settlement.chain import Settlement
from settlement.eth import ChainError
from settlement.redeemer import Redeemer
from settlement.sender_monitor import SenderMonitor
from settlement.winners import WinnerQueue

log = logging.getLogger(__name__)
_T = TypeVar("_T")

DEFAULT_FACE_VALUE = 10**15
DEFAULT_TICKET_EV = 8 * 10**9  # go-livepeer's default ticket EV, for the info message
DEFAULT_REDEEM_COST_MULTIPLIER = 100
"""Face value is kept at least this many times the gas a redemption costs."""


class Cashier:
    """Issues ticket parameters, checks payments, and queues winners for the redeemer."""

    def __init__(
        self,
        private_key: bytes,
        address: str,
        settlement: Settlement,
        *,
        face_value: int = DEFAULT_FACE_VALUE,
        redeem_cost_multiplier: int = DEFAULT_REDEEM_COST_MULTIPLIER,
        validity_blocks: int = 40,
        nonces_per_rand: int = MAX_NONCES_PER_RAND,
        winners_db: Path | None = None,
        on_redeemed: Callable[..., None] | None = None,
    ) -> None:
        # Derived from the key, so parameters issued before a restart still verify.
        secret = hmac.new(private_key, b"stepstream recipient secret", hashlib.sha256)
        self.recipient = Recipient(
            address,
            secret.digest(),
            NonceLedger(per_rand=nonces_per_rand),
            validity_blocks=validity_blocks,
        )
        self.settlement = settlement
        self.winners = WinnerQueue(winners_db)
        self.monitor = SenderMonitor(settlement, self.winners)
        self.redeemer = Redeemer(self.winners, settlement, on_redeemed=on_redeemed)
        self._face_value = face_value
        self._redeem_cost_multiplier = redeem_cost_multiplier

    def describe(self) -> str:
        """What happens to tickets here; logged at start-up (spec 8.6)."""
        where = self.winners.path or "memory only (no --data-dir)"
        return f"{self.settlement.describe()}; winners queued in {where}"

    async def settled(self, read: Callable[..., _T], *args: object) -> _T:
        """A settlement read: in a thread where it may wait on a chain, inline off chain,
        where it reads the clock and a thread hop would cost more than the read (three
        of them on every `hello`)."""
        if not self.settlement.redeems:
            return read(*args)
        return await anyio.to_thread.run_sync(read, *args)

    async def current_block(self) -> int:
        return await self.settled(self.settlement.block_number)

    async def face_value(self) -> int:
        """The configured face value, raised to stay above the cost of redeeming it."""
        cost = await self.settled(self.settlement.redeem_cost)
        return max(self._face_value, cost * self._redeem_cost_multiplier)

    async def _issue(self, sender: bytes, odds: list[tuple[int, int]]) -> list[TicketParams]:
        """Parameters for `sender`, one set per (face value, win probability), valid from
        this block, in this round."""
        issue = await self.settled(self.settlement.issue_round)
        block = await self.current_block()
        return [
            self.recipient.issue_params(
                sender,
                face_value,
                win_prob,
                block,
                secrets.token_bytes(16),
                issue.round,
                issue.block_hash,
            )
            for face_value, win_prob in odds
        ]

    async def info_params(
        self, sender: bytes, first_payment: bool
    ) -> tuple[TicketParams, list[TicketParams]]:
        """`info`'s parameters (go-livepeer's default EV), and with `first_payment` the
        ones that pay the first window of the connection's jobs, one-ticket EVs a factor
        of 4 apart (spec 8.11)."""
        face = await self.face_value()
        odds = [(face, min(MAX_UINT256, max(1, DEFAULT_TICKET_EV * MAX_UINT256 // face)))]
        if first_payment:
            odds += first_window_odds(face)
        params = await self._issue(sender, odds)
        return params[0], params[1:]

    async def job_params(self, sender: bytes, window_fee: Fraction) -> TicketParams:
        """Parameters whose ticket is worth one window (spec 8.2), valid from this block."""
        (params,) = await self._issue(sender, [ticket_odds(window_fee, await self.face_value())])
        return params

    async def receive(
        self, payment: Payment, job_seeds: set[bytes] | frozenset[bytes] | None = None
    ) -> PaymentReceipt:
        """Validate a payment against its job's parameters (`job_seeds`; None: unchecked),
        the chain's block and round and the sender's max float (spec 8.4, 8.8), and queue
        its winners durably before anyone acknowledges it (8.6)."""
        try:
            block = await self.current_block()
            sender = address_str(payment.sender)
            max_float = await self.settled(self.monitor.max_float, sender)
            creation_round = payment.ticket_params.creation_round
            rounds = await self.settled(self.settlement.round_view, creation_round)
        except ChainError as exc:
            return PaymentReceipt(
                error=ProtocolError(ErrorCode.INTERNAL_ERROR, f"chain unavailable: {exc}")
            )
        receipt = self.recipient.receive(payment, block, max_float, rounds, job_seeds)
        if receipt.winners:
            try:
                await anyio.to_thread.run_sync(self.winners.add, receipt.winners)
            except Exception as exc:  # a disk fault: credit nothing we cannot keep
                log.error("cannot queue winning tickets: %s", exc)
                return PaymentReceipt(
                    error=ProtocolError(ErrorCode.INTERNAL_ERROR, "cannot store winning tickets")
                )
            self.redeemer.notify()
        return receipt
