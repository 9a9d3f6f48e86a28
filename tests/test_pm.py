"""Tests of protocol.pm against go-livepeer's hash vectors, eth_account and our spec vectors."""

from __future__ import annotations

import importlib.util
import json
from fractions import Fraction
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_hash.auto import keccak

from protocol.pm import (
    MAX_UINT256,
    SECP256K1_N,
    InvalidSignature,
    Ticket,
    address_of,
    derive_recipient_rand,
    is_winning,
    recipient_rand_hash,
    recover_signer,
    sign_ticket,
    ticket_ev,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_VECTORS = REPO.parent / "shared" / "vectors"
SPEC_VECTORS = REPO / "spec" / "vectors"

ZERO_ADDR = "0x" + "00" * 20
KEY = bytes([0x01]) * 32  # test-only key
RECIPIENT = "0x73AEd7b5dEb30222fa896f399d46cC99c7BEe57F"


def _ticket(**overrides: Any) -> Ticket:
    fields: dict[str, Any] = {
        "recipient": RECIPIENT,
        "sender": address_of(KEY),
        "face_value": 10**15,
        "win_prob": 2**250,
        "sender_nonce": 7,
        "recipient_rand_hash": recipient_rand_hash(42),
    }
    fields.update(overrides)
    return Ticket(**fields)


# --- go-livepeer hash vectors ---------------------------------------------------------


def _go_vectors() -> list[dict[str, Any]]:
    doc = json.loads((SHARED_VECTORS / "go-livepeer-pm-ticket-hash.json").read_text())
    return doc["vectors"]


@pytest.mark.parametrize("vector", _go_vectors(), ids=lambda v: ",".join(v["fields"]))
def test_go_livepeer_hash_vectors(vector: dict[str, Any]) -> None:
    fields: dict[str, Any] = {
        "recipient": ZERO_ADDR,
        "sender": ZERO_ADDR,
        "face_value": 0,
        "win_prob": 0,
        "sender_nonce": 0,
    }
    for name, value in vector["fields"].items():
        if name.endswith("hash"):
            fields[name] = bytes.fromhex(value)
        else:
            fields[name] = value
    assert Ticket(**fields).hash().hex() == vector["hash"]


def test_go_vectors_count() -> None:
    assert len(_go_vectors()) == 7


def test_aux_data_empty_only_when_both_zero() -> None:
    assert _ticket().aux_data() == b""
    assert _ticket(creation_round=1).aux_data() == (1).to_bytes(32, "big") + bytes(32)
    bh = bytes(31) + b"\x01"
    assert _ticket(creation_round_block_hash=bh).aux_data() == bytes(32) + bh


# --- validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"recipient": "73AEd7b5dEb30222fa896f399d46cC99c7BEe57F"},
        {"sender": "0x1234"},
        {"sender": "0x" + "zz" * 20},
        {"face_value": -1},
        {"win_prob": MAX_UINT256 + 1},
        {"sender_nonce": True},
        {"creation_round": -5},
        {"recipient_rand_hash": bytes(31)},
        {"creation_round_block_hash": bytes(33)},
    ],
)
def test_ticket_validation(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        _ticket(**overrides)


def test_lowercase_address_accepted_and_same_hash() -> None:
    assert _ticket(recipient=RECIPIENT.lower()).hash() == _ticket().hash()


# --- signatures -----------------------------------------------------------------------


def test_address_of_matches_eth_account() -> None:
    assert address_of(KEY) == Account.from_key(KEY).address


def test_sign_and_recover_matches_eth_account() -> None:
    ticket = _ticket()
    sig = sign_ticket(ticket, KEY)
    assert len(sig) == 65
    assert recover_signer(ticket, sig) == address_of(KEY)
    eth_addr = Account.recover_message(encode_defunct(primitive=ticket.hash()), signature=sig)
    assert eth_addr == Account.from_key(KEY).address == address_of(KEY)


def test_signature_matches_eth_account_signing() -> None:
    ticket = _ticket()
    signed = Account.sign_message(encode_defunct(primitive=ticket.hash()), private_key=KEY)
    assert bytes(signed.signature) == sign_ticket(ticket, KEY)


@pytest.mark.parametrize("nonce", range(16))
def test_v_and_low_s(nonce: int) -> None:
    sig = sign_ticket(_ticket(sender_nonce=nonce), KEY)
    assert sig[64] in (27, 28)
    assert 0 < int.from_bytes(sig[32:64], "big") <= SECP256K1_N // 2


def test_high_s_rejected() -> None:
    ticket = _ticket()
    sig = sign_ticket(ticket, KEY)
    s = int.from_bytes(sig[32:64], "big")
    flipped_v = 55 - sig[64]  # 27 <-> 28
    high = sig[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes([flipped_v])
    with pytest.raises(InvalidSignature):
        recover_signer(ticket, high)


@pytest.mark.parametrize("bad_v", [0, 1, 26, 29, 255])
def test_bad_v_rejected(bad_v: int) -> None:
    ticket = _ticket()
    sig = sign_ticket(ticket, KEY)
    with pytest.raises(InvalidSignature):
        recover_signer(ticket, sig[:64] + bytes([bad_v]))


@pytest.mark.parametrize("length", [0, 64, 66])
def test_wrong_length_rejected(length: int) -> None:
    ticket = _ticket()
    sig = (sign_ticket(ticket, KEY) * 2)[:length]
    with pytest.raises(InvalidSignature):
        recover_signer(ticket, sig)


def test_zero_and_out_of_range_r_s_rejected() -> None:
    ticket = _ticket()
    sig = sign_ticket(ticket, KEY)
    for bad in (
        bytes(32) + sig[32:],
        SECP256K1_N.to_bytes(32, "big") + sig[32:],
        sig[:32] + bytes(32) + sig[64:],
    ):
        with pytest.raises(InvalidSignature):
            recover_signer(ticket, bad)


def test_invalid_signature_is_value_error() -> None:
    assert issubclass(InvalidSignature, ValueError)


def test_tampered_ticket_recovers_other_address() -> None:
    ticket = _ticket()
    sig = sign_ticket(ticket, KEY)
    tampered = _ticket(face_value=ticket.face_value + 1)
    assert recover_signer(tampered, sig) != address_of(KEY)


# --- win rule, EV, recipient rand -----------------------------------------------------


def test_is_winning_extremes() -> None:
    sig = sign_ticket(_ticket(), KEY)
    for rand in range(20):
        assert is_winning(sig, rand, MAX_UINT256)
        assert not is_winning(sig, rand, 0)


def test_is_winning_matches_independent_keccak() -> None:
    sig = sign_ticket(_ticket(), KEY)
    rand = 123456789
    draw = int.from_bytes(keccak(sig + rand.to_bytes(32, "big")), "big")
    assert is_winning(sig, rand, draw + 1)
    assert not is_winning(sig, rand, draw)
    assert is_winning(sig, rand, 2**255) == (draw < 2**255)


def test_is_winning_rejects_bad_sig_length() -> None:
    with pytest.raises(InvalidSignature):
        is_winning(bytes(64), 1, MAX_UINT256)


def test_ticket_ev_exact() -> None:
    assert ticket_ev(10, MAX_UINT256) == 10
    assert ticket_ev(0, MAX_UINT256) == 0
    assert ticket_ev(3, 2**255) == Fraction(3 * 2**255, 2**256 - 1)
    assert isinstance(ticket_ev(1, 1), Fraction)


def test_recipient_rand_hash() -> None:
    assert recipient_rand_hash(0) == keccak(bytes(32))
    assert recipient_rand_hash(5) == keccak((5).to_bytes(32, "big"))
    assert len(recipient_rand_hash(MAX_UINT256)) == 32
    with pytest.raises(ValueError):
        recipient_rand_hash(-1)


def test_derive_recipient_rand() -> None:
    import hashlib
    import hmac

    secret = b"s" * 32
    sender = address_of(KEY)
    a = derive_recipient_rand(secret, b"seed-1", sender)
    assert a == derive_recipient_rand(secret, b"seed-1", sender.lower())
    assert a != derive_recipient_rand(secret, b"seed-2", sender)
    assert a != derive_recipient_rand(secret, b"seed-1", RECIPIENT)
    assert a != derive_recipient_rand(b"t" * 32, b"seed-1", sender)
    expected = hmac.new(secret, b"seed-1" + bytes.fromhex(sender[2:]), hashlib.sha256).digest()
    assert a == int.from_bytes(expected, "big")
    assert 0 <= a <= MAX_UINT256


# --- spec vectors ---------------------------------------------------------------------


def _spec_doc() -> dict[str, Any]:
    return json.loads((SPEC_VECTORS / "tickets.json").read_text())


def _load_generator() -> ModuleType:
    path = SPEC_VECTORS / "make_ticket_vectors.py"
    spec = importlib.util.spec_from_file_location("make_ticket_vectors", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("vector", _spec_doc()["vectors"], ids=lambda v: v["name"])
def test_spec_vectors(vector: dict[str, Any]) -> None:
    key = bytes.fromhex(_spec_doc()["private_key"])
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
    rand = int(vector["recipient_rand"])
    sig = bytes.fromhex(vector["sig"])
    assert recipient_rand_hash(rand) == ticket.recipient_rand_hash
    assert ticket.aux_data().hex() == vector["aux_data"]
    assert ticket.hash().hex() == vector["hash"]
    assert sign_ticket(ticket, key) == sig
    assert recover_signer(ticket, sig) == vector["signer"] == address_of(key)
    assert is_winning(sig, rand, ticket.win_prob) is vector["wins"]
    eth_addr = Account.recover_message(encode_defunct(primitive=ticket.hash()), signature=sig)
    assert eth_addr == vector["signer"]


def test_spec_vectors_cover_cases() -> None:
    vectors = _spec_doc()["vectors"]
    assert any(v["wins"] for v in vectors)
    assert any(not v["wins"] for v in vectors)
    assert any(v["aux_data"] for v in vectors)


def test_spec_vectors_file_is_reproducible() -> None:
    gen = _load_generator()
    text = (SPEC_VECTORS / "tickets.json").read_text()
    assert gen.render(gen.build_vectors()) == text


def test_sign_ticket_takes_a_prepared_key_with_identical_result() -> None:
    from coincurve import PrivateKey

    key = keccak(b"stepstream prepared key")
    ticket = Ticket(
        recipient="0x" + "11" * 20, sender=address_of(key), face_value=5, win_prob=7, sender_nonce=1
    )
    assert sign_ticket(ticket, PrivateKey(key)) == sign_ticket(ticket, key)
