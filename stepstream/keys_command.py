"""`stepstream keys new FILE` and `stepstream keys address FILE`: the keys every role needs.

A new key is 32 random bytes, written as hex (`0x...`) or, with
--keystore, as an encrypted Ethereum keystore (what geth and go-livepeer
write). The file is created readable by its owner only and never
overwrites an existing one. Both print the key's Ethereum address, which is
what a chain funds.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys

from protocol.pm import address_of
from stepstream.keys import PASSWORD_ENV, KeyFileError, load_private_key, write_keystore


def run_keys(args: argparse.Namespace) -> int:
    if args.keys_command == "address":
        try:
            key = load_private_key(args.file, args.key_password_file)
        except KeyFileError as exc:
            print(f"stepstream keys: {exc}", file=sys.stderr)
            return 2
        print(address_of(key))
        return 0
    return _new_key(args)


def _new_key(args: argparse.Namespace) -> int:
    path = args.file
    if path.exists():
        print(f"stepstream keys: {path} exists; it is never overwritten", file=sys.stderr)
        return 2
    password = None
    if args.keystore:
        try:
            password = _password(args)
        except KeyFileError as exc:
            print(f"stepstream keys: {exc}", file=sys.stderr)
            return 2
    elif args.key_password_file is not None:
        print("stepstream keys: --key-password-file goes with --keystore", file=sys.stderr)
        return 2
    key = secrets.token_bytes(32)
    try:
        if password is not None:
            write_keystore(path, key, password)
        else:
            # O_EXCL: never clobber a key another process wrote meanwhile.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write("0x" + key.hex() + "\n")
    except OSError as exc:
        print(f"stepstream keys: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(address_of(key))
    return 0


def _password(args: argparse.Namespace) -> str:
    if args.key_password_file is not None:
        try:
            password = args.key_password_file.read_text().rstrip("\r\n")
        except OSError as exc:
            raise KeyFileError(
                f"cannot read password file {args.key_password_file}: {exc.strerror}"
            ) from None
    else:
        password = os.environ.get(PASSWORD_ENV, "")
    if not password:
        raise KeyFileError(
            f"--keystore needs a password: --key-password-file FILE or ${PASSWORD_ENV}"
        )
    return password
