"""`stepstream gateway`: the HTTP gateway for apps, in front of one or more orchestrators.

Jobs run through a JobRunner over the listed orchestrators, so apps get
measured-speed selection, failover and resume; measured speeds are kept in
SQLite (--metrics-db) across restarts. The gateway pays with --key, so it
refuses to listen beyond loopback without --token-file, and warns when no
--max-price bounds what it pays.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import anyio

from broadcaster.discovery import Discovery, OrchestratorListError, parse_orchestrator_urls
from broadcaster.failover import FailoverPolicy, JobRunner
from broadcaster.gateway.app import Gateway
from broadcaster.gateway.guard import is_loopback
from broadcaster.gateway.server import serving
from broadcaster.gateway.storage import LocalFolderStorage
from broadcaster.hardware import HardwareFilter, HardwareFilterError
from broadcaster.metrics_store import MetricsStore
from broadcaster.selection import PROFILES, SelectionConfig
from settlement.chain import settlement_for
from settlement.eth import ChainError
from settlement.stakes import ChainStakes, keep_fresh
from stepstream.keys import KeyFileError, load_private_key

log = logging.getLogger("stepstream.gateway")


async def run_gateway(args: argparse.Namespace) -> int:
    try:
        key = load_private_key(args.key, args.key_password_file)
        urls = parse_orchestrator_urls(args.orchestrator, args.orchestrators_file)
        settlement = settlement_for(
            args.eth_url, key, controller=args.eth_controller, broker=args.ticket_broker
        )
    except (KeyFileError, OrchestratorListError, ChainError) as exc:
        print(f"stepstream gateway: {exc}", file=sys.stderr)
        return 2
    if args.max_orchestrators < 1:
        print("stepstream gateway: --max-orchestrators must be at least 1", file=sys.stderr)
        return 2
    if args.max_jobs_per_client < 1:
        print("stepstream gateway: --max-jobs-per-client must be at least 1", file=sys.stderr)
        return 2
    token = None
    if args.token_file is not None:
        try:
            token = args.token_file.read_text().strip()
        except OSError as exc:
            print(f"stepstream gateway: cannot read {args.token_file}: {exc}", file=sys.stderr)
            return 2
        if not token:
            print(f"stepstream gateway: --token-file {args.token_file} is empty", file=sys.stderr)
            return 2
    if token is None and not is_loopback(args.host):
        print(
            f"stepstream gateway: --host {args.host} is reachable from other machines and the "
            "gateway pays with --key: give --token-file to require a bearer token there",
            file=sys.stderr,
        )
        return 2
    bad_origin = next(
        (o for o in args.allow_origin if not o.startswith(("http://", "https://"))), None
    )
    if bad_origin is not None:
        print(
            f"stepstream gateway: --allow-origin {bad_origin!r} is not an origin "
            "(scheme://host[:port], e.g. https://app.example)",
            file=sys.stderr,
        )
        return 2
    try:
        hardware = HardwareFilter.parse(args.min_vram, args.gpu)
    except HardwareFilterError as exc:
        print(f"stepstream gateway: --min-vram/--gpu: {exc}", file=sys.stderr)
        return 2
    if args.max_price is None:
        print(
            "stepstream gateway: warning: no --max-price: jobs pay whatever price an "
            "orchestrator asks (give --max-price in wei per pixel-step)",
            file=sys.stderr,
        )
    metrics = MetricsStore(args.metrics_db)
    stakes = ChainStakes(settlement)
    discovery = Discovery(urls, key)
    runner = JobRunner(
        discovery,
        key,
        metrics=metrics,
        selection=SelectionConfig(weights=PROFILES[args.selection], stakes=stakes),
        policy=FailoverPolicy(max_orchestrators=args.max_orchestrators),
        max_price=args.max_price,
        hardware=hardware,
        pool_connections=True,
    )
    gateway = Gateway(
        runner,
        LocalFolderStorage(Path(args.outputs)),
        token=token,
        refresh_seconds=args.refresh_seconds,
        allow_origins=args.allow_origin,
        max_jobs_per_client=args.max_jobs_per_client,
    )
    try:
        async with serving(gateway, args.host, args.port) as url:
            # The demo and tests wait for this exact line.
            print(f"gateway listening on {url}", flush=True)
            log.info("%s", settlement.describe())
            log.info(
                "orchestrators %s, outputs in %s, speeds in %s",
                ",".join(urls),
                args.outputs,
                args.metrics_db,
            )
            if not settlement.redeems:
                await anyio.sleep_forever()
            # Stake for selection, from the BondingManager, as discovery finds orchestrators.
            await keep_fresh(
                stakes,
                lambda: {s.url: s.info.orchestrator for s in discovery.statuses if s.info},
                args.refresh_seconds,
            )
    except OSError as exc:
        print(
            f"stepstream gateway: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr
        )
        return 2
    finally:
        with anyio.CancelScope(shield=True):
            await runner.aclose()
        metrics.close()
    return 0
