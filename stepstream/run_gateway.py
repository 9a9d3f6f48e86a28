"""`stepstream gateway`: the HTTP gateway for apps, in front of one or more orchestrators."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import anyio

from broadcaster.gateway.app import Gateway
from broadcaster.gateway.selection import FirstAvailable
from broadcaster.gateway.server import serving
from broadcaster.gateway.storage import LocalFolderStorage
from broadcaster.session import BroadcasterSession
from stepstream.keys import KeyFileError, load_private_key

log = logging.getLogger("stepstream.gateway")


def orchestrator_urls(text: str) -> list[str]:
    urls = [u.strip() for u in text.split(",") if u.strip()]
    bad = [u for u in urls if not u.startswith(("ws://", "wss://"))]
    if not urls or bad:
        raise argparse.ArgumentTypeError(
            f"expected ws://host:port[,ws://...], got {', '.join(bad) or 'nothing'}"
        )
    return urls


async def run_gateway(args: argparse.Namespace) -> int:
    try:
        key = load_private_key(args.key)
    except KeyFileError as exc:
        print(f"stepstream gateway: {exc}", file=sys.stderr)
        return 2
    token = None
    if args.token_file is not None:
        try:
            token = args.token_file.read_text().strip()
        except OSError as exc:
            print(f"stepstream gateway: cannot read {args.token_file}: {exc}", file=sys.stderr)
            return 2

    def open_session(url: str) -> BroadcasterSession:
        return BroadcasterSession(url, key, max_price=args.max_price)

    gateway = Gateway(
        FirstAvailable(args.orchestrators, open_session),
        LocalFolderStorage(Path(args.outputs)),
        token=token,
    )
    try:
        async with serving(gateway, args.host, args.port) as url:
            # The demo and tests wait for this exact line.
            print(f"gateway listening on {url}", flush=True)
            log.info("orchestrators %s, outputs in %s", ",".join(args.orchestrators), args.outputs)
            await anyio.sleep_forever()
    except OSError as exc:
        print(
            f"stepstream gateway: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr
        )
        return 2
    return 0
