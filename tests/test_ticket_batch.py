"""The ticket fast path (protocol/ticket_batch.py, protocol/keccak.py) equals the slow one.

protocol.pm's Ticket, sign_ticket and recover_signer are the reference
(checked against go-livepeer's vectors in tests/test_pm.py); sender.pay and
Recipient.receive use the fast path, so it must give the same bytes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from coincurve import PrivateKey

from protocol.keccak import _load_pysha3, keccak256, reference_keccak
from protocol.pm import (
    _HALF_N,
    SECP256K1_N,
    InvalidSignature,
    Ticket,
    address_of,
    recipient_rand_hash,
    recover_signer,
    sign_ticket,
)
from protocol.ticket_batch import TicketBatch

REPO = Path(__file__).resolve().parents[1]
SHARED_VECTORS = REPO.parent / "shared" / "vectors"
SPEC_VECTORS = REPO / "spec" / "vectors"
ZERO_ADDR = "0x" + "00" * 20


@pytest.mark.parametrize("load", [_load_pysha3, lambda: keccak256])
def test_fast_keccak_is_keccak_256(load: Any) -> None:
    fast = load()
    assert fast is not None, "safe-pysha3 is a dependency: its Keccak must load"
    assert keccak256 is not reference_keccak  # tickets use the C one
    rng = random.Random(1)
    for n in [*range(0, 300), 1000, 4096]:
        data = rng.randbytes(n)
        assert fast(data) == reference_keccak(data)
    assert fast(bytearray(b"abc")) == reference_keccak(b"abc")
    assert fast(memoryview(b"abc")) == reference_keccak(b"abc")
    # Ethereum's Keccak-256, not SHA3-256.
    assert fast(b"").hex().startswith("c5d2460186f7233c")


@pytest.mark.parametrize(
    "vector",
    json.loads((SHARED_VECTORS / "go-livepeer-pm-ticket-hash.json").read_text())["vectors"],
    ids=lambda v: ",".join(v["fields"]),
)
def test_go_livepeer_hash_vectors(vector: dict[str, Any]) -> None:
    fields: dict[str, Any] = {
        "recipient": ZERO_ADDR,
        "sender": ZERO_ADDR,
        "face_value": 0,
        "win_prob": 0,
        "sender_nonce": 0,
    }
    for name, value in vector["fields"].items():
        fields[name] = bytes.fromhex(value) if name.endswith("hash") else value
    ticket = Ticket(**fields)
    assert TicketBatch.of(ticket).hash(ticket.sender_nonce).hex() == vector["hash"]


@pytest.mark.parametrize(
    "vector",
    json.loads((SPEC_VECTORS / "tickets.json").read_text())["vectors"],
    ids=lambda v: v["name"],
)
def test_spec_ticket_vectors(vector: dict[str, Any]) -> None:
    key = bytes.fromhex(json.loads((SPEC_VECTORS / "tickets.json").read_text())["private_key"])
    t = vector["ticket"]
    ticket = Ticket(
        recipient=t["recipient"],
        sender=t["sender"],
        face_value=int(t["face_value"]),
        win_prob=int(t["win_prob"]),
        sender_nonce=int(t["sender_nonce"]),
        recipient_rand_hash=bytes.fromhex(t["recipient_rand_hash"]),
        creation_round=int(t["creation_round"]),
        creation_round_block_hash=bytes.fromhex(t["creation_round_block_hash"]),
    )
    batch = TicketBatch.of(ticket)
    sig = bytes.fromhex(vector["sig"])
    assert batch.hash(ticket.sender_nonce).hex() == vector["hash"]
    assert batch.sign(PrivateKey(key), [ticket.sender_nonce]) == [sig]
    [signer] = batch.signers([(ticket.sender_nonce, sig)])
    assert "0x" + signer.hex() == vector["signer"].lower()


def _random_ticket(rng: random.Random, key: bytes, nonce: int) -> Ticket:
    with_aux = rng.random() < 0.5
    return Ticket(
        recipient="0x" + rng.randbytes(20).hex(),
        sender=address_of(key),
        face_value=rng.randrange(2**256),
        win_prob=rng.randrange(2**256),
        sender_nonce=nonce,
        recipient_rand_hash=recipient_rand_hash(rng.randrange(2**256)),
        creation_round=rng.randrange(1, 2**64) if with_aux else 0,
        creation_round_block_hash=rng.randbytes(32) if with_aux else bytes(32),
    )


def test_random_batches_equal_the_slow_path() -> None:
    rng = random.Random(7)
    for _ in range(20):
        key = rng.randbytes(32)
        base = _random_ticket(rng, key, 0)
        batch = TicketBatch.of(base)
        nonces = [rng.randrange(2**32) for _ in range(5)]
        tickets = [Ticket(**{**base.__dict__, "sender_nonce": n}) for n in nonces]
        sigs = batch.sign(PrivateKey(key), nonces)
        assert sigs == [sign_ticket(t, key) for t in tickets]
        assert [batch.hash(n) for n in nonces] == [t.hash() for t in tickets]
        signers = list(batch.signers(zip(nonces, sigs, strict=True)))
        assert ["0x" + s.hex() for s in signers] == [
            recover_signer(t, s).lower() for t, s in zip(tickets, sigs, strict=True)
        ]


def _bad_sigs(sig: bytes) -> list[bytes]:
    r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:64], "big")
    high = sig[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - sig[64]])
    return [
        sig[:64],  # short
        sig[:64] + bytes([29]),  # V
        bytes(32) + sig[32:],  # R zero
        SECP256K1_N.to_bytes(32, "big") + sig[32:],  # R out of range
        high,  # S in the upper half
        sig[:32] + (_HALF_N + 1).to_bytes(32, "big") + sig[64:],
        sig[:32] + bytes(32) + sig[64:],  # S zero
        (r ^ 1).to_bytes(32, "big") + sig[32:],  # may not recover at all
    ]


def test_bad_signatures_fail_as_on_the_slow_path() -> None:
    key = bytes([3]) * 32
    ticket = _random_ticket(random.Random(3), key, 9)
    batch = TicketBatch.of(ticket)
    [sig] = batch.sign(PrivateKey(key), [9])
    for bad in _bad_sigs(sig):
        try:
            slow: str | None = recover_signer(ticket, bad).lower()
        except InvalidSignature as exc:
            slow = f"error: {exc}"
        try:
            fast: str | None = "0x" + next(batch.signers([(9, bad)])).hex()
        except InvalidSignature as exc:
            fast = f"error: {exc}"
        assert fast == slow


def test_signers_stop_at_the_first_bad_signature() -> None:
    key = bytes([4]) * 32
    batch = TicketBatch.of(_random_ticket(random.Random(4), key, 1))
    good = batch.sign(PrivateKey(key), [1, 2])
    found = batch.signers([(1, good[0]), (2, good[1][:64] + bytes([30])), (3, good[1])])
    assert next(found) == bytes.fromhex(address_of(key)[2:])
    with pytest.raises(InvalidSignature, match="V must be 27 or 28"):
        next(found)


def test_a_bad_batch_or_nonce_is_a_clear_error() -> None:
    fields: dict[str, Any] = {
        "recipient": bytes(20),
        "sender": bytes(20),
        "face_value": 1,
        "win_prob": 1,
        "recipient_rand_hash": bytes(32),
    }
    with pytest.raises(ValueError, match="recipient must be 20 bytes"):
        TicketBatch(**{**fields, "recipient": bytes(19)})
    with pytest.raises(ValueError, match="face_value"):
        TicketBatch(**{**fields, "face_value": -1})
    with pytest.raises(ValueError, match="sender_nonce"):
        TicketBatch(**fields).hash(2**256)
