"""Ethereum's Keccak-256 at the cost of the permutation, not of the wrapper around it.

A ticket costs two or three Keccak hashes beside its one signature, and
pycryptodome's `keccak.new(...).digest()` spends most of its time in Python
(building the object, ctypes buffers, a destructor): 20-40 us a hash, half a
signature. safe-pysha3 (a dependency, kept by Safe) does one in about 1 us
in C. Its digests are checked against pycryptodome's interface once, when
loaded; should it be missing or disagree (a platform without its wheel, a
broken build), pycryptodome's interface serves, slower but correct.
"""

from __future__ import annotations

from collections.abc import Callable

from Crypto.Hash import keccak as _keccak


def reference_keccak(data: bytes) -> bytes:
    """Keccak-256 through pycryptodome's public interface: the reference the fast one matches."""
    return _keccak.new(digest_bits=256, data=data).digest()


def _load_pysha3() -> Callable[[bytes], bytes] | None:
    """safe-pysha3's Keccak-256, or None where it is not installed or disagrees."""
    try:
        from sha3 import keccak_256  # type: ignore[import-not-found]
    except ImportError:
        return None

    def keccak256(data: bytes) -> bytes:
        return keccak_256(data).digest()

    probes = (b"", b"stepstream", bytes(range(200)))
    try:
        agrees = all(keccak256(probe) == reference_keccak(probe) for probe in probes)
    except (TypeError, ValueError):
        agrees = False
    return keccak256 if agrees else None


keccak256: Callable[[bytes], bytes] = _load_pysha3() or reference_keccak
"""Keccak-256 of `data` (bytes, bytearray or memoryview), the fast way where it loads."""
