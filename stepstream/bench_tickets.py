"""Tickets signed and verified per second on one core, against raw coincurve.

The baseline is the bare secp256k1 work a ticket cannot avoid (one
sign_recoverable, one public-key recovery), timed in the same run, batch by
batch in turn with the tickets, so the ratio says what hashing, encoding
and the recipient's checks add, even on a machine that is busy otherwise.
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


def _interleaved(
    ours: Callable[[], None], raw: Callable[[], None], seconds: float
) -> tuple[float, float]:
    """Operations per second of each, timed batch by batch in turn.

    Alternating batches puts both under the same load from the rest of the
    machine, so the ratio holds on a busy machine where each rate alone does not.
    """
    spent = [0.0, 0.0]
    done = 0
    while sum(spent) < 2 * seconds:
        for i, run_batch in enumerate((ours, raw) if done % 2 == 0 else (raw, ours)):
            start = time.perf_counter()
            run_batch()
            spent[(i + done) % 2] += time.perf_counter() - start
        done += 1
    return done * BATCH / spent[0], done * BATCH / spent[1]


def measure(seconds: float = 1.0) -> TicketRates:
    b_key, o_key = secrets.token_bytes(32), secrets.token_bytes(32)
    sender = TicketSender(b_key)
    recipient = Recipient(
        TicketSender(o_key).address, secrets.token_bytes(32), NonceLedger(max_rands=10**7)
    )
    payments = []

    def sign_batch() -> None:
        payments.append(sender.pay("bench", next(issued), BATCH))

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

    # The recipient issues parameters once per payment: its work, not the signer's.
    issued = iter(
        [
            recipient.issue_params(
                sender.address_bytes, 10**15, MAX_UINT256 // 1000, 100, secrets.token_bytes(16)
            )
            for _ in range(int(seconds * 1000) + 10)
        ]
    )
    sign, raw_sign = _interleaved(sign_batch, raw_sign_batch, seconds)
    # Verify exactly the tickets signed above, as many batches as there are.
    spent = [0.0, 0.0]
    batches = len(payments)
    for i in range(batches):
        for j, run_batch in enumerate((verify_batch, raw_recover_batch)[:: 1 if i % 2 else -1]):
            start = time.perf_counter()
            run_batch()
            spent[j if i % 2 else 1 - j] += time.perf_counter() - start
    verify, raw_recover = batches * BATCH / spent[0], batches * BATCH / spent[1]
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
