"""Loading an Ethereum private key from a file, without ever echoing it."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from protocol.pm import SECP256K1_N


class KeyFileError(Exception):
    """The key file cannot be used; the message names the file, never its contents."""


def load_private_key(path: str | os.PathLike[str]) -> bytes:
    """A raw key file: 64 hex digits, optionally 0x-prefixed, surrounding whitespace ignored."""
    p = Path(path)
    try:
        text = p.read_text().strip()
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {p}: {exc.strerror}") from None
    hex_part = text[2:] if text.lower().startswith("0x") else text
    try:
        key = bytes.fromhex(hex_part)
    except ValueError:
        raise KeyFileError(f"key file {p} does not hold a hex private key") from None
    if len(key) != 32 or not 0 < int.from_bytes(key, "big") < SECP256K1_N:
        raise KeyFileError(f"key file {p} does not hold a valid 32-byte secp256k1 key")
    return key


def write_new_key(path: str | os.PathLike[str]) -> bytes:
    """Create a fresh random key file readable by its owner only (demo and tests)."""
    key = secrets.token_bytes(32)
    p = Path(path)
    p.write_text("0x" + key.hex() + "\n")
    p.chmod(0o600)
    return key
