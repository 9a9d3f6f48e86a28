"""Tickets signed and verified per second on one core, against raw coincurve.

The baseline is the bare secp256k1 work a ticket cannot avoid (one
sign_recoverable, one public-key recovery), timed in the same run, so the
ratio says what hashing, encoding and the recipient's checks add.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from coincurve import PrivateKey, PublicKey

from protocol.pm import MAX_UINT256
from protocol.recipient import NonceLedger, Recipient
from protocol.sender import TicketSender

BATCH = 100


@dataclass
class TicketRates:
    """Operations per second on one core (one thread)."""

    sign: float
    verify: float
    raw_sign: float
    raw_recover: float


def _rate(run_batch: Callable[[], None], seconds: float) -> float:
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        run_batch()
        done += BATCH
    return done / elapsed


def measure(seconds: float = 1.0) -> TicketRates:
    b_key, o_key = secrets.token_bytes(32), secrets.token_bytes(32)
    sender = TicketSender(b_key)
    recipient = Recipient(
        TicketSender(o_key).address, secrets.token_bytes(32), NonceLedger(max_rands=10**7)
    )
    payments = []

    def sign_batch() -> None:
        params = recipient.issue_params(
            sender.address_bytes, 10**15, MAX_UINT256 // 1000, 100, secrets.token_bytes(16)
        )
        payments.append(sender.pay("bench", params, BATCH))

    def verify_batch() -> None:
        receipt = recipient.receive(payments.pop(), current_block=100)
        assert receipt.error is None and receipt.accepted == BATCH

    raw_key = PrivateKey(b_key)
    digest = secrets.token_bytes(32)
    sig = raw_key.sign_recoverable(digest, hasher=None)

    def raw_sign_batch() -> None:
        for _ in range(BATCH):
            raw_key.sign_recoverable(digest, hasher=None)

    def raw_recover_batch() -> None:
        for _ in range(BATCH):
            PublicKey.from_signature_and_message(sig, digest, hasher=None)

    raw_sign = _rate(raw_sign_batch, seconds)
    sign = _rate(sign_batch, seconds)
    signed = len(payments) * BATCH
    start = time.perf_counter()
    while payments:  # verify exactly the tickets signed above
        verify_batch()
    verify = signed / (time.perf_counter() - start)
    raw_recover = _rate(raw_recover_batch, seconds)
    return TicketRates(sign, verify, raw_sign, raw_recover)


def report(rates: TicketRates) -> str:
    return (
        f"  tickets signed          {rates.sign:8.0f}/s per core  "
        f"({rates.sign / rates.raw_sign:.2f}x raw coincurve sign_recoverable, "
        f"{rates.raw_sign:.0f}/s)\n"
        f"  tickets verified        {rates.verify:8.0f}/s per core  "
        f"({rates.verify / rates.raw_recover:.2f}x raw coincurve recover, "
        f"{rates.raw_recover:.0f}/s)"
    )
