"""Ethereum's Keccak-256 at the cost of the permutation, not of the wrapper around it.

A ticket costs two or three Keccak hashes beside its one signature, and
pycryptodome's `keccak.new(...).digest()` spends most of its time in Python
(building the object, ctypes buffers, a destructor): 20-40 us a hash, half
a signature. So, in this order of preference:

1. `sha3.keccak_256` from safe-pysha3 (the `fast` extra), a C extension:
   about 1 us a hash;
2. the compiled Keccak that pycryptodome ships (`Crypto.Hash._keccak`, so
   no new dependency), called directly with one reusable state per thread,
   without pycryptodome's wrapper: about a third of the wrapper's cost;
3. pycryptodome's interface, where neither loads.

Each is checked against pycryptodome's interface when loaded, and the
digests are the same (tests/test_ticket_batch.py).
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from importlib import util
from pathlib import Path

from Crypto.Hash import keccak as _keccak

_RATE_PADDING = 0x01
"""Keccak's original padding byte (SHA3-256 would use 0x06)."""
_CAPACITY = 64
"""Bytes of capacity for a 256-bit digest (2 x 32)."""
_ROUNDS = 24


def reference_keccak(data: bytes) -> bytes:
    """Keccak-256 through pycryptodome's public interface: the reference the fast one matches."""
    return _keccak.new(digest_bits=256, data=data).digest()


def _load_pysha3() -> Callable[[bytes], bytes] | None:
    """safe-pysha3's Keccak-256, or None where it is not installed."""
    try:
        from sha3 import keccak_256  # type: ignore[import-not-found]
    except ImportError:
        return None

    def keccak256(data: bytes) -> bytes:
        return keccak_256(data).digest()

    return keccak256 if _agrees(keccak256) else None


def _agrees(candidate: Callable[[bytes], bytes]) -> bool:
    """Whether `candidate` gives pycryptodome's digests (checked once, when loaded)."""
    try:
        return all(
            candidate(probe) == reference_keccak(probe)
            for probe in (b"", b"stepstream", bytes(range(200)))
        )
    except (RuntimeError, TypeError, ValueError, ctypes.ArgumentError):
        return False


def _load_raw() -> Callable[[bytes], bytes] | None:
    """A Keccak-256 calling pycryptodome's compiled library directly, or None."""
    spec = util.find_spec("Crypto.Hash._keccak")
    if spec is None or spec.origin is None or not Path(spec.origin).is_file():
        return None
    try:
        lib = ctypes.PyDLL(spec.origin)  # PyDLL: keeps the GIL, the state is per thread
        init, reset = lib.keccak_init, lib.keccak_reset
        absorb, digest = lib.keccak_absorb, lib.keccak_digest
    except (OSError, AttributeError):
        return None
    state_p = ctypes.c_void_p
    init.argtypes = [ctypes.POINTER(state_p), ctypes.c_size_t, ctypes.c_uint8]
    reset.argtypes = [state_p]
    absorb.argtypes = [state_p, ctypes.c_char_p, ctypes.c_size_t]
    digest.argtypes = [state_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint8]
    for fn in (init, reset, absorb, digest):
        fn.restype = ctypes.c_int
    local = threading.local()

    def new_state() -> tuple[ctypes.c_void_p, ctypes.Array[ctypes.c_char]]:
        state = state_p()
        if init(ctypes.byref(state), _CAPACITY, _ROUNDS):
            raise RuntimeError("keccak_init failed")
        # Never freed: one small state per thread that ever hashes.
        local.state = (state, ctypes.create_string_buffer(32))
        return local.state

    def keccak256(data: bytes) -> bytes:
        if type(data) is not bytes:
            data = bytes(data)  # a bytearray or memoryview: c_char_p takes bytes only
        try:
            state, out = local.state
        except AttributeError:
            state, out = new_state()
        reset(state)
        absorb(state, data, len(data))
        digest(state, out, 32, _RATE_PADDING)
        return out.raw

    return keccak256 if _agrees(keccak256) else None


keccak256: Callable[[bytes], bytes] = _load_pysha3() or _load_raw() or reference_keccak
"""Keccak-256 of `data` (bytes), the fast way where it loads."""
