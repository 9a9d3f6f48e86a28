"""Tickets signed and verified per second on one core, against raw coincurve.

The baseline is the bare secp256k1 work a ticket cannot avoid (one
sign_recoverable, one public-key recovery), timed in the same run, batch by
batch in turn with the tickets, so the ratio says what hashing, encoding
and the recipient's checks add, even on a machine that is busy otherwise.
"""

from __future__ import annotations

import secrets
import statistics
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
    ours: Callable[[], None], raw: Callable[[], None], batches: int | None, seconds: float
) -> tuple[float, float]:
    """Operations per second of each, from the median time of a batch, batches taken in turn.

    Alternating batches puts both under the same load from the rest of the
    machine, and the median drops the batches a busy machine preempted, so
    the ratio holds where each rate alone does not. Runs `batches` pairs, or
    pairs for `seconds` when None.
    """
    times: tuple[list[float], list[float]] = ([], [])
    start = time.perf_counter()
    done = 0
    while (done < batches) if batches is not None else time.perf_counter() - start < seconds:
        order = (0, 1) if done % 2 == 0 else (1, 0)
        for which in order:
            begun = time.perf_counter()
            (ours, raw)[which]()
            times[which].append(time.perf_counter() - begun)
        done += 1
    return BATCH / statistics.median(times[0]), BATCH / statistics.median(times[1])


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
    sign, raw_sign = _interleaved(sign_batch, raw_sign_batch, None, seconds)
    # Verify exactly the tickets signed above, a payment a batch.
    verify, raw_recover = _interleaved(verify_batch, raw_recover_batch, len(payments), seconds)
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
