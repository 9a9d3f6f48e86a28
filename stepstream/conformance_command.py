"""`stepstream conformance`: the command line of the suite (both directions)."""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import anyio

from stepstream.interrupt import until_interrupted

SERVE_DEFAULT_MODEL = "stepstream/tiny-sd"


def add_conformance_parser(sub: Any) -> None:
    """The `conformance` subcommand (imports nothing heavy: `stepstream --help` stays fast)."""
    p = sub.add_parser(
        "conformance",
        help="check an orchestrator (ws://HOST:PORT), or with --serve a broadcaster, against spec/",
        description="Run the conformance suite against an orchestrator, or serve a misbehaving "
        "orchestrator for a broadcaster to connect to (--serve). Verdicts: PASS, FAIL, SKIP "
        "(with why), INFO. spec/CONFORMANCE.md describes every case.",
        epilog="exit codes:\n  0    no case FAILed\n  1    a case FAILed\n"
        "  2    bad usage (a flag, a key, a URL, an unknown --case)\n  130  interrupted (Ctrl-C)",
    )
    p.add_argument("url", nargs="?", default=None, help="ws://HOST:PORT of the orchestrator")
    p.add_argument("--serve", action="store_true", help="check broadcasters instead")
    p.add_argument("--host", default="127.0.0.1", help="--serve: address to listen on")
    p.add_argument("--port", type=int, default=8936, help="--serve: port to listen on (0: any)")
    p.add_argument(
        "--case",
        action="append",
        default=[],
        metavar="ID",
        help="run only this case, or every case of a spec id (K2) (repeatable)",
    )
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument(
        "--slow", action="store_true", help="add cases that wait on block time (minutes)"
    )
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--junit", type=Path, default=None, help="write JUnit XML here")
    p.add_argument(
        "--key",
        type=Path,
        default=None,
        help="key the suite pays with (fund it on the chain of an orchestrator that checks "
        "funds); a throwaway key if absent",
    )
    p.add_argument("--key-password-file", type=Path, default=None, help="password of a keystore")
    p.add_argument("--eth-url", default=None, help="the orchestrator's chain: JSON-RPC URL")
    p.add_argument("--eth-controller", default=None, help="the chain's Controller")
    p.add_argument("--ticket-broker", default=None, help="a bare TicketBroker instead")
    p.add_argument(
        "--model",
        action="append",
        default=[],
        help="orchestrator: the text-to-image model to use (default: the first offered); "
        f"--serve: a model to offer (repeatable, default {SERVE_DEFAULT_MODEL})",
    )
    p.add_argument("--size", type=int, default=64, help="width and height of test jobs, pixels")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for a reply")
    p.add_argument(
        "--hello-timeout", type=float, default=10.0, help="the orchestrator's hello timeout, s"
    )
    p.add_argument(
        "--idle-timeout", type=float, default=60.0, help="the orchestrator's idle timeout, s"
    )
    p.add_argument(
        "--max-connections-per-client",
        type=int,
        default=32,
        help="the orchestrator's cap of connections per client address",
    )
    p.add_argument(
        "--price", default="95367", help="--serve: advertised wei per pixel-step (a fraction)"
    )
    p.add_argument(
        "--lead",
        type=int,
        default=None,
        help="--serve: the broadcaster's lead L (default: the spec's, 1)",
    )
    p.add_argument(
        "--observe", type=float, default=2.0, help="--serve: seconds to watch for a reaction"
    )
    p.add_argument("--stall", type=float, default=3.0, help="--serve: seconds of the stall case")
    p.add_argument(
        "--wait",
        type=float,
        default=600.0,
        help="--serve: seconds to wait for the broadcaster's jobs before giving up",
    )


def run_conformance(args: argparse.Namespace) -> int:
    if args.list:
        return _list(args)
    if args.serve:
        return anyio.run(until_interrupted, lambda: _serve(args))
    if not args.url:
        print("stepstream conformance: give ws://HOST:PORT, or --serve", file=sys.stderr)
        return 2
    if not args.url.startswith(("ws://", "wss://")):
        print(f"stepstream conformance: not a ws:// URL: {args.url}", file=sys.stderr)
        return 2
    return anyio.run(until_interrupted, lambda: _check_orchestrator(args))


def _list(args: argparse.Namespace) -> int:
    if args.serve:
        from conformance.serve_cases import SERVE_CASES

        rows = [(c.name, c.title, "") for c in SERVE_CASES]
    else:
        from conformance.all_cases import REGISTRY

        rows = [(c.name, c.title, " (--slow)" if c.slow else "") for c in REGISTRY.cases]
    width = max(len(name) for name, _, _ in rows)
    for name, title, slow in rows:
        print(f"{name:<{width}}  {title}{slow}")
    return 0


def _key(args: argparse.Namespace) -> bytes:
    from stepstream.keys import load_private_key

    return (
        load_private_key(args.key, args.key_password_file) if args.key else secrets.token_bytes(32)
    )


def _finish(report: Any, args: argparse.Namespace) -> int:
    print(report.summary())
    if args.json:
        report.write_json(args.json)
    if args.junit:
        report.write_junit(args.junit)
    return 1 if report.failed else 0


async def _check_orchestrator(args: argparse.Namespace) -> int:
    from conformance.all_cases import REGISTRY
    from conformance.context import Options
    from conformance.suite import run_suite
    from settlement.chain import settlement_for
    from settlement.eth import ChainError
    from stepstream.keys import KeyFileError

    try:
        key = _key(args)
        settlement = settlement_for(
            args.eth_url, key, controller=args.eth_controller, broker=args.ticket_broker
        )
    except (KeyFileError, ChainError) as exc:
        print(f"stepstream conformance: {exc}", file=sys.stderr)
        return 2
    cases = REGISTRY.select(args.case, args.slow)
    if not cases:
        print(f"stepstream conformance: no case matches {args.case}", file=sys.stderr)
        return 2
    options = Options(
        url=args.url,
        key=key,
        timeout=args.timeout,
        model=args.model[0] if args.model else None,
        size=args.size,
        hello_timeout=args.hello_timeout,
        idle_timeout=args.idle_timeout,
        max_connections_per_client=args.max_connections_per_client,
        slow=args.slow,
        settlement=settlement,
        on_chain=args.eth_url is not None,
    )

    def progress(result: Any) -> None:
        print(f"{result.verdict.value:<4}  {result.name}", file=sys.stderr, flush=True)

    report = await run_suite(options, cases, on_result=progress)
    return _finish(report, args)


async def _serve(args: argparse.Namespace) -> int:
    from conformance.serve import ConformanceOrchestrator, ServeOptions
    from conformance.serve_cases import SERVE_CASES
    from stepstream.keys import KeyFileError

    try:
        key = _key(args)
        price = Fraction(args.price)
    except (KeyFileError, ValueError, ZeroDivisionError) as exc:
        print(f"stepstream conformance: {exc}", file=sys.stderr)
        return 2
    cases = [
        c
        for c in SERVE_CASES
        if not args.case or c.name in args.case or any(i in args.case for i in c.ids)
    ]
    if not cases:
        print(f"stepstream conformance: no --serve case matches {args.case}", file=sys.stderr)
        return 2
    options = ServeOptions(
        key=key,
        models=args.model or [SERVE_DEFAULT_MODEL],
        price=price,
        lead=args.lead,
        observe=args.observe,
        stall=args.stall,
    )
    orch = ConformanceOrchestrator(cases, options)
    started = time.monotonic()
    try:
        async with orch.serve(args.host, args.port) as server:
            host, port = server.sockets[0].getsockname()[:2]
            print(f"serving {len(cases)} cases on ws://{host}:{port}", flush=True)
            with anyio.move_on_after(args.wait):
                await orch.all_done.wait()
    except OSError as exc:
        print(
            f"stepstream conformance: cannot listen on {args.host}:{args.port}: {exc}",
            file=sys.stderr,
        )
        return 2
    return _finish(orch.report(time.monotonic() - started), args)
