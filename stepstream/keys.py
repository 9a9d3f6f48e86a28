"""Loading an Ethereum private key from a file, without ever echoing it.

Two formats: a raw key file (64 hex digits), or an Ethereum keystore (the
encrypted JSON that geth, go-livepeer and eth_account write), whose password
comes from a file or from the STEPSTREAM_KEY_PASSWORD environment variable.
Errors name the file and what is wrong with it, never the key or password.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from protocol.pm import SECP256K1_N

PASSWORD_ENV = "STEPSTREAM_KEY_PASSWORD"
"""Environment variable holding a keystore's password when no password file is given."""


class KeyFileError(Exception):
    """The key file cannot be used; the message names the file, never its contents."""


def _check_key(key: bytes, p: Path) -> bytes:
    if len(key) != 32 or not 0 < int.from_bytes(key, "big") < SECP256K1_N:
        raise KeyFileError(f"key file {p} does not hold a valid 32-byte secp256k1 key")
    return key


def _read_password(password_file: str | os.PathLike[str] | None, p: Path) -> str:
    if password_file is not None:
        try:
            return Path(password_file).read_text().rstrip("\r\n")
        except OSError as exc:
            raise KeyFileError(
                f"cannot read password file {password_file}: {exc.strerror}"
            ) from None
    password = os.environ.get(PASSWORD_ENV)
    if password is None:
        raise KeyFileError(
            f"key file {p} is an encrypted keystore: give --key-password-file or set {PASSWORD_ENV}"
        )
    return password


def _decrypt_keystore(text: str, p: Path, password: str) -> bytes:
    from eth_account import Account  # imported lazily: only keystores need it

    try:
        keystore = json.loads(text)
    except json.JSONDecodeError:
        raise KeyFileError(f"key file {p} is neither hex nor keystore JSON") from None
    if not isinstance(keystore, dict) or "crypto" not in {k.lower() for k in keystore}:
        raise KeyFileError(f"key file {p} is JSON but not an Ethereum keystore")
    try:
        key = bytes(Account.decrypt(keystore, password))
    except ValueError as exc:
        # eth_keyfile says "MAC mismatch" for a wrong password; nothing secret is in it.
        reason = "wrong password" if "MAC" in str(exc) else "unsupported or damaged keystore"
        raise KeyFileError(f"cannot decrypt keystore {p}: {reason}") from None
    except (KeyError, TypeError):
        raise KeyFileError(f"cannot decrypt keystore {p}: damaged keystore") from None
    return _check_key(key, p)


def load_private_key(
    path: str | os.PathLike[str], password_file: str | os.PathLike[str] | None = None
) -> bytes:
    """A raw hex key file (optionally 0x-prefixed) or an Ethereum keystore file."""
    p = Path(path)
    try:
        text = p.read_text().strip()
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {p}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise KeyFileError(f"key file {p} is not text") from None
    if text.startswith("{"):
        return _decrypt_keystore(text, p, _read_password(password_file, p))
    hex_part = text[2:] if text.lower().startswith("0x") else text
    try:
        key = bytes.fromhex(hex_part)
    except ValueError:
        raise KeyFileError(f"key file {p} does not hold a hex private key") from None
    return _check_key(key, p)


def write_new_key(path: str | os.PathLike[str]) -> bytes:
    """Create a fresh random key file readable by its owner only (demo and tests)."""
    key = secrets.token_bytes(32)
    p = Path(path)
    p.write_text("0x" + key.hex() + "\n")
    p.chmod(0o600)
    return key


def write_keystore(
    path: str | os.PathLike[str], key: bytes, password: str, iterations: int = 2**18
) -> None:
    """Encrypt `key` into a keystore file (pbkdf2) readable by its owner only."""
    from eth_account import Account

    keystore = Account.encrypt(key, password, kdf="pbkdf2", iterations=iterations)
    p = Path(path)
    p.write_text(json.dumps(keystore))
    p.chmod(0o600)
