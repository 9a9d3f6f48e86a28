"""Probabilistic micropayment tickets, byte-compatible with go-livepeer's `pm` package.

Why compatible: an orchestrator that accepts our tickets can redeem winners on
Livepeer's TicketBroker unchanged, and a go-livepeer gateway's tickets verify
here. Everything is pure (no I/O, no clocks) so both peers and tests share it.

Layouts follow go-livepeer (pm/ticket.go, eth/accounts.go, pm/recipient.go):

- hash = keccak256(recipient(20) | sender(20) | u256(face_value) | u256(win_prob)
  | u256(sender_nonce) | recipient_rand_hash(32) | aux_data)
- aux_data = u256(creation_round) | creation_round_block_hash(32), or empty when
  both are zero
- sig = personal_sign(hash): 65 bytes R|S|V, V in {27, 28}, S low
- wins iff uint256(keccak256(sig | u256(recipient_rand))) < win_prob
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
from dataclasses import dataclass
from fractions import Fraction

from coincurve import PrivateKey, PublicKey

from protocol.keccak import keccak256

__all__ = [
    "MAX_UINT256",
    "SECP256K1_N",
    "InvalidSignature",
    "Ticket",
    "address_of",
    "check_signature",
    "derive_recipient_rand",
    "is_winning",
    "recipient_rand_hash",
    "recover_signer",
    "sign_ticket",
    "ticket_ev",
]

MAX_UINT256 = 2**256 - 1
"""Largest uint256; also the EV denominator, so win_prob == MAX_UINT256 means ~certain."""

SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
"""Order of the secp256k1 group; bounds R and S of a signature."""

_HALF_N = SECP256K1_N // 2
_PERSONAL_PREFIX = b"\x19Ethereum Signed Message:\n32"
_ADDRESS_RE = re.compile(r"^0x[0-9a-fA-F]{40}$")
_SIG_LEN = 65


def keccak(data: bytes) -> bytes:
    """Ethereum's Keccak-256 (not SHA3-256: the padding differs); protocol/keccak.py."""
    return keccak256(data)


@functools.lru_cache(maxsize=4096)
def to_checksum_address(address: str | bytes) -> str:
    """EIP-55 mixed-case form of an address given as 20 bytes or hex.

    Cached: a peer's few addresses are converted for every ticket.
    """
    raw = address.hex() if isinstance(address, bytes) else address.lower().removeprefix("0x")
    if len(raw) != 40:
        raise ValueError(f"an address is 20 bytes, got {len(raw) // 2}")
    digest = keccak(raw.encode()).hex()[:40]
    return "0x" + "".join(
        c.upper() if int(d, 16) >= 8 else c for c, d in zip(raw, digest, strict=True)
    )


class InvalidSignature(ValueError):
    """A ticket signature is malformed or non-canonical, so no signer can be trusted."""


def _u256(value: int) -> bytes:
    """Encode as a 32-byte big-endian word, as Solidity's abi.encodePacked(uint256) does."""
    return value.to_bytes(32, "big")


def _check_u256(name: str, value: int) -> None:
    """Reject values that cannot be a uint256 on chain (bools are not integers here)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= value <= MAX_UINT256:
        raise ValueError(f"{name} must be in 0..2^256-1, got {value}")


def _check_address(name: str, value: str) -> None:
    """Require a 0x-prefixed 40-hex address; case is not checked (EIP-55 is cosmetic)."""
    if not isinstance(value, str) or not _ADDRESS_RE.match(value):
        raise ValueError(f"{name} must be a 0x-prefixed 40-hex-digit address, got {value!r}")


def _check_hash32(name: str, value: bytes) -> None:
    """Require exactly 32 bytes, the width of a bytes32 on chain."""
    if not isinstance(value, bytes | bytearray) or len(value) != 32:
        raise ValueError(f"{name} must be exactly 32 bytes")


def _address_bytes(address: str) -> bytes:
    """The 20 raw bytes of a validated hex address."""
    return bytes.fromhex(address[2:])


@dataclass(frozen=True, kw_only=True)
class Ticket:
    """One probabilistic payment ticket; field names mirror go-livepeer's pm.Ticket."""

    recipient: str
    sender: str
    face_value: int
    win_prob: int
    sender_nonce: int
    recipient_rand_hash: bytes = bytes(32)
    creation_round: int = 0
    creation_round_block_hash: bytes = bytes(32)

    def __post_init__(self) -> None:
        """Validate eagerly so a bad ticket fails where it is built, not when hashed."""
        _check_address("recipient", self.recipient)
        _check_address("sender", self.sender)
        _check_u256("face_value", self.face_value)
        _check_u256("win_prob", self.win_prob)
        _check_u256("sender_nonce", self.sender_nonce)
        _check_u256("creation_round", self.creation_round)
        _check_hash32("recipient_rand_hash", self.recipient_rand_hash)
        _check_hash32("creation_round_block_hash", self.creation_round_block_hash)
        # Normalise bytearray to bytes so the frozen ticket is really immutable.
        object.__setattr__(self, "recipient_rand_hash", bytes(self.recipient_rand_hash))
        object.__setattr__(self, "creation_round_block_hash", bytes(self.creation_round_block_hash))

    def aux_data(self) -> bytes:
        """u256(creation_round) | block_hash, or b"" when both are zero (as go-livepeer)."""
        if self.creation_round == 0 and self.creation_round_block_hash == bytes(32):
            return b""
        return _u256(self.creation_round) + self.creation_round_block_hash

    def hash(self) -> bytes:
        """keccak256 of the packed ticket; the value the TicketBroker signs over and marks used."""
        packed = (
            _address_bytes(self.recipient)
            + _address_bytes(self.sender)
            + _u256(self.face_value)
            + _u256(self.win_prob)
            + _u256(self.sender_nonce)
            + self.recipient_rand_hash
            + self.aux_data()
        )
        return keccak(packed)


def _personal_hash(message_hash: bytes) -> bytes:
    """EIP-191 personal_sign digest of a 32-byte message, as go-livepeer's eth.VerifySig."""
    return keccak(_PERSONAL_PREFIX + message_hash)


def address_of(private_key: bytes) -> str:
    """Checksummed Ethereum address of a secp256k1 private key."""
    pub = PrivateKey(private_key).public_key.format(compressed=False)
    return to_checksum_address(keccak(pub[1:])[-20:])


def sign_ticket(ticket: Ticket, private_key: bytes | PrivateKey) -> bytes:
    """Sign the ticket hash with personal_sign; deterministic (RFC 6979) and low-S.

    A coincurve PrivateKey may be passed instead of the 32 key bytes by a
    signer that makes many tickets: building one costs as much as signing.
    """
    key = private_key if isinstance(private_key, PrivateKey) else PrivateKey(private_key)
    raw = key.sign_recoverable(_personal_hash(ticket.hash()), hasher=None)
    r_s, recid = raw[:64], raw[64]
    # libsecp256k1 always emits low S; assert it so a library change cannot slip through.
    if int.from_bytes(r_s[32:], "big") > _HALF_N:  # pragma: no cover - defensive
        raise InvalidSignature("signer produced a high-S signature")
    return r_s + bytes([recid + 27])


def check_signature(sig: bytes) -> None:
    """Raise InvalidSignature unless `sig` is 65 bytes R|S|V, canonical (low S), V 27 or 28."""
    if not isinstance(sig, bytes | bytearray) or len(sig) != _SIG_LEN:
        raise InvalidSignature(f"signature must be {_SIG_LEN} bytes")
    v = sig[64]
    if v not in (27, 28):
        raise InvalidSignature(f"signature V must be 27 or 28, got {v}")
    if not 0 < int.from_bytes(sig[:32], "big") < SECP256K1_N:
        raise InvalidSignature("signature R out of range")
    if not 0 < int.from_bytes(sig[32:64], "big") <= _HALF_N:
        raise InvalidSignature("signature S must be non-zero and in the lower half of the order")


def recover_signer(ticket: Ticket, sig: bytes) -> str:
    """Checksummed address that signed `ticket`; rejects malleable or malformed signatures.

    High S is rejected because the TicketBroker (OpenZeppelin ECDSA) rejects it, and a
    second valid encoding would let one ticket be presented twice under a new sig.
    """
    check_signature(sig)
    v = sig[64]
    try:
        pub = PublicKey.from_signature_and_message(
            bytes(sig[:64]) + bytes([v - 27]), _personal_hash(ticket.hash()), hasher=None
        )
    except Exception as exc:  # coincurve raises plain Exception on failed recovery
        raise InvalidSignature(f"signature does not recover a public key: {exc}") from exc
    return to_checksum_address(keccak(pub.format(compressed=False)[1:])[-20:])


def is_winning(sig: bytes, recipient_rand: int, win_prob: int) -> bool:
    """True iff uint256(keccak256(sig | u256(recipient_rand))) < win_prob (go-livepeer rule)."""
    if not isinstance(sig, bytes | bytearray) or len(sig) != _SIG_LEN:
        raise InvalidSignature(f"signature must be {_SIG_LEN} bytes")
    _check_u256("recipient_rand", recipient_rand)
    _check_u256("win_prob", win_prob)
    draw = int.from_bytes(keccak(bytes(sig) + _u256(recipient_rand)), "big")
    return draw < win_prob


def ticket_ev(face_value: int, win_prob: int) -> Fraction:
    """Expected value in wei, exact: face_value * win_prob / (2^256 - 1)."""
    _check_u256("face_value", face_value)
    _check_u256("win_prob", win_prob)
    return Fraction(face_value * win_prob, MAX_UINT256)


def recipient_rand_hash(recipient_rand: int) -> bytes:
    """Commitment keccak256(u256(recipient_rand)) the recipient hands out before payment."""
    _check_u256("recipient_rand", recipient_rand)
    return keccak(_u256(recipient_rand))


def derive_recipient_rand(secret: bytes, seed: bytes, sender: str) -> int:
    """HMAC-SHA256(secret, seed | sender) as an int, so the recipient keeps no per-ticket state.

    Given the seed it issued (echoed back with the ticket params), the recipient re-derives
    recipient_rand on demand, like go-livepeer's recipient.rand(seed, sender).
    """
    _check_address("sender", sender)
    mac = hmac.new(bytes(secret), bytes(seed) + _address_bytes(sender), hashlib.sha256)
    return int.from_bytes(mac.digest(), "big")
