"""Signing and checking a payment's tickets at close to the cost of their signatures.

Every ticket of a payment shares all its fields but the nonce, so the
packed bytes around the nonce are built once per payment (`TicketBatch`),
not once per ticket through a validated `Ticket`. Signing and recovery call
libsecp256k1 through coincurve's compiled binding directly, with the output
buffers allocated once per payment, and a recovered public key maps to its
address through a small cache instead of a Keccak per ticket. The bytes
are protocol.pm's (go-livepeer's): tests/test_ticket_batch.py holds them
equal on the go-livepeer vectors and on random tickets.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from coincurve import PrivateKey
from coincurve._libsecp256k1 import ffi, lib
from coincurve.context import GLOBAL_CONTEXT

from protocol.keccak import keccak256
from protocol.pm import (
    _HALF_N,
    _PERSONAL_PREFIX,
    SECP256K1_N,
    InvalidSignature,
    Ticket,
    _check_hash32,
    _check_u256,
    check_signature,
)

_CTX = GLOBAL_CONTEXT.ctx
_UNCOMPRESSED = 2  # SECP256K1_EC_UNCOMPRESSED
_ADDRESS_CACHE_LIMIT = 4096
_addresses: dict[bytes, bytes] = {}
"""Recovered uncompressed public key -> its 20-byte address: a payer signs with one key."""


class TicketBatch:
    """The fields one payment's tickets share, packed once around the nonce."""

    __slots__ = ("_prefix", "_suffix")

    def __init__(
        self,
        *,
        recipient: bytes,
        sender: bytes,
        face_value: int,
        win_prob: int,
        recipient_rand_hash: bytes,
        creation_round: int = 0,
        creation_round_block_hash: bytes = bytes(32),
    ) -> None:
        for name, address in (("recipient", recipient), ("sender", sender)):
            if not isinstance(address, bytes | bytearray) or len(address) != 20:
                raise ValueError(f"{name} must be 20 bytes")
        _check_u256("face_value", face_value)
        _check_u256("win_prob", win_prob)
        _check_u256("creation_round", creation_round)
        _check_hash32("recipient_rand_hash", recipient_rand_hash)
        _check_hash32("creation_round_block_hash", creation_round_block_hash)
        aux = (
            b""
            if creation_round == 0 and creation_round_block_hash == bytes(32)
            else creation_round.to_bytes(32, "big") + bytes(creation_round_block_hash)
        )
        self._prefix = (
            bytes(recipient)
            + bytes(sender)
            + face_value.to_bytes(32, "big")
            + win_prob.to_bytes(32, "big")
        )
        self._suffix = bytes(recipient_rand_hash) + aux

    @classmethod
    def of(cls, ticket: Ticket) -> TicketBatch:
        """The batch `ticket` belongs to (its nonce aside)."""
        return cls(
            recipient=bytes.fromhex(ticket.recipient[2:]),
            sender=bytes.fromhex(ticket.sender[2:]),
            face_value=ticket.face_value,
            win_prob=ticket.win_prob,
            recipient_rand_hash=ticket.recipient_rand_hash,
            creation_round=ticket.creation_round,
            creation_round_block_hash=ticket.creation_round_block_hash,
        )

    def hash(self, nonce: int) -> bytes:
        """The ticket hash of the ticket with this sender nonce (protocol.pm.Ticket.hash)."""
        _check_u256("sender_nonce", nonce)
        return keccak256(self._prefix + nonce.to_bytes(32, "big") + self._suffix)

    def digest(self, nonce: int) -> bytes:
        """The personal_sign digest that is signed for that ticket."""
        return keccak256(_PERSONAL_PREFIX + self.hash(nonce))

    def sign(self, key: PrivateKey, nonces: Iterable[int]) -> list[bytes]:
        """65-byte R|S|V signatures of the tickets with these nonces (protocol.pm.sign_ticket)."""
        # Hash every ticket first, then sign in a tight loop: the curve's tables stay in cache.
        digests = [self.digest(nonce) for nonce in nonces]
        secret = key.secret
        sig = ffi.new("secp256k1_ecdsa_recoverable_signature *")
        out = ffi.new("unsigned char[64]")
        recid = ffi.new("int *")
        sign = lib.secp256k1_ecdsa_sign_recoverable
        serialize = lib.secp256k1_ecdsa_recoverable_signature_serialize_compact
        raw = []
        for digest in digests:
            if not sign(_CTX, sig, digest, secret, ffi.NULL, ffi.NULL):
                raise ValueError("the private key cannot sign")  # pragma: no cover
            serialize(_CTX, out, recid, sig)
            raw.append(ffi.buffer(out, 64)[:] + _V[recid[0]])
        # libsecp256k1 always emits low S; assert it so a library change cannot slip through.
        if any(int.from_bytes(r[32:64], "big") > _HALF_N for r in raw):  # pragma: no cover
            raise InvalidSignature("signer produced a high-S signature")
        return raw

    def signers(self, signed: Iterable[tuple[int, bytes]]) -> Iterator[bytes]:
        """The 20-byte address that signed each (nonce, sig), in order (protocol.pm.recover_signer).

        Raises InvalidSignature at the first signature that recovers nobody;
        the addresses before it have been yielded. The signatures are
        checked and the tickets hashed first, then recovered in a tight loop
        (the curve's tables stay in cache), so a bad signature costs the
        recoveries of the tickets before it, never after.
        """
        items = list(signed)
        digests = []
        fault: InvalidSignature | None = None
        for nonce, sig in items:
            try:
                check_signature(sig)
            except InvalidSignature as exc:
                fault = exc
                break
            digests.append(self.digest(nonce))
        parsed = ffi.new("secp256k1_ecdsa_recoverable_signature *")
        pubkey = ffi.new("secp256k1_pubkey *")
        out = ffi.new("unsigned char[65]")
        out_len = ffi.new("size_t *")
        parse = lib.secp256k1_ecdsa_recoverable_signature_parse_compact
        recover = lib.secp256k1_ecdsa_recover
        serialize = lib.secp256k1_ec_pubkey_serialize
        keys = []
        for (_, sig), digest in zip(items, digests, strict=False):
            # The parse reads R|S, the first 64 bytes.
            if not parse(_CTX, parsed, bytes(sig), sig[64] - 27):  # pragma: no cover
                fault = InvalidSignature("signature does not parse")  # R and S were checked
                break
            if not recover(_CTX, pubkey, parsed, digest):
                fault = InvalidSignature(
                    "signature does not recover a public key: failed to recover ECDSA public key"
                )
                break
            out_len[0] = 65
            serialize(_CTX, out, out_len, pubkey, _UNCOMPRESSED)
            keys.append(ffi.buffer(out, 65)[:])
        for key in keys:
            address = _addresses.get(key)
            if address is None:
                if len(_addresses) >= _ADDRESS_CACHE_LIMIT:
                    _addresses.clear()
                address = _addresses[key] = keccak256(key[1:])[-20:]
            yield address
        if fault is not None:
            raise fault


_V = (bytes([27]), bytes([28]), bytes([29]), bytes([30]))
"""V from the recovery id: only 27 and 28 occur for real keys (R < N)."""

__all__ = ["SECP256K1_N", "TicketBatch"]
