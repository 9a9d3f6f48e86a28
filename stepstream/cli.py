"""The `stepstream` command: orchestrator, gateway, generate, keys, bench, deploy-broker,
conformance."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from fractions import Fraction
from importlib import metadata
from pathlib import Path
from typing import Any

import anyio

from broadcaster.stall import DEFAULT_STALL_FACTOR, DEFAULT_STALL_FLOOR
from orchestrator.connection_limits import (
    DEFAULT_HELLO_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
)
from runner.args import add_runner_parser
from stepstream.conformance_command import add_conformance_parser
from stepstream.interrupt import until_interrupted
from stepstream.logs import configure_logging

EXIT_CODES = """exit codes:
  0    done
  1    the job failed (its error code is printed), or a server stopped on an error
  2    bad usage or input (a flag, a file, a key, a request): nothing was sent or paid
  3    generate: every orchestrator asks more than --max-price
  130  interrupted (Ctrl-C)"""
EXIT_INTERRUPTED = 130
TERMINATING = (signal.SIGINT, signal.SIGTERM)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help line; the exit-code table kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or action.required
            or default in (None, False, argparse.SUPPRESS)
            or not action.option_strings
            or (isinstance(default, list) and not default)
        ):
            return text
        shown = f"{default!r}" if default == "" else "%(default)s"
        return f"{text} (default: {shown})"


class _Parser(argparse.ArgumentParser):
    """Every (sub)command: no abbreviations, defaults in --help, -v/-q in any position."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", _Formatter)
        kwargs.setdefault("epilog", EXIT_CODES)
        super().__init__(*args, **kwargs)
        # SUPPRESS: given before or after the subcommand, either one sets it.
        self.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
            help="log at debug level",
        )  # fmt: skip
        self.add_argument(
            "-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
            help="log warnings and errors only",
        )  # fmt: skip


def _version() -> str:
    try:
        return metadata.version("stepstream")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "0.1.0 (not installed)"


def _fraction(text: str) -> Fraction:
    try:
        value = Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number or fraction: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _add_hardware_flags(parser: argparse.ArgumentParser) -> None:
    """Offers filtered by the hardware nodes advertise (spec 4.5)."""
    parser.add_argument(
        "--min-vram",
        default=None,
        metavar="GIB",
        help="only nodes with a GPU of at least this many GiB of VRAM (a CPU has none)",
    )
    parser.add_argument(
        "--gpu",
        default=None,
        metavar="PATTERN",
        help="only nodes whose GPU name matches, e.g. 4090 or 'NVIDIA H100*' (no case)",
    )


def _add_chain_flags(parser: argparse.ArgumentParser) -> None:
    """Key and chain options shared by the commands that hold a key."""
    parser.add_argument(
        "--key-password-file",
        type=Path,
        default=None,
        help="password of a keystore --key (else $STEPSTREAM_KEY_PASSWORD)",
    )
    parser.add_argument(
        "--eth-url", default=None, help="JSON-RPC URL of the chain; none: off-chain mode"
    )
    parser.add_argument(
        "--eth-controller",
        default=None,
        help="Controller address; TicketBroker, RoundsManager and BondingManager are looked "
        "up in it (go-livepeer's -ethController)",
    )
    parser.add_argument(
        "--ticket-broker",
        default=None,
        help="TicketBroker address, for a bare broker: the rest is found through its Controller",
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="stepstream", description=__doc__)
    parser.add_argument("--version", action="version", version=f"stepstream {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    orch = sub.add_parser("orchestrator", help="serve jobs on this machine")
    orch.add_argument("--models", required=True, type=Path, help="go-livepeer aiModels.json")
    orch.add_argument("--host", default="127.0.0.1", help="address to listen on")
    orch.add_argument("--port", type=int, default=8935, help="port to listen on (0: any free)")
    orch.add_argument(
        "--key", required=True, type=Path, help="key file: hex or keystore (stepstream keys new)"
    )
    orch.add_argument(
        "--face-value", type=int, default=None, help="ticket face value, wei (default: 100x gas)"
    )
    orch.add_argument(
        "--payment-timeout", type=float, default=30.0, help="seconds to wait for credit"
    )
    orch.add_argument(
        "--max-queued",
        type=int,
        default=8,
        help="jobs that may wait per model when its slots are busy (0: refuse them)",
    )
    _add_chain_flags(orch)
    orch.add_argument(
        "--initialize-round",
        action="store_true",
        help="start a round nobody has initialized when one is needed (one transaction a round)",
    )
    orch.add_argument(
        "--data-dir", type=Path, default=Path(".stepstream"), help="where winners are queued"
    )
    orch.add_argument(
        "--redeem-cost-multiplier",
        type=int,
        default=None,
        help="keep face value at least this many times a redemption's gas cost (default 100)",
    )
    orch.add_argument(
        "--runners",
        type=int,
        default=None,
        help="managed runner processes (default: one per GPU, else one on the CPU)",
    )
    orch.add_argument("--device", default=None, help="device of the managed runners: cpu, cuda:N")
    orch.add_argument(
        "--memory-budget", type=int, default=None, help="bytes each runner's models may use"
    )
    orch.add_argument(
        "--offload", action="store_true", help="sequential CPU offload on small GPUs (slower)"
    )
    orch.add_argument(
        "--hello-timeout",
        type=float,
        default=DEFAULT_HELLO_TIMEOUT,
        help="seconds a new connection has to send hello (default %(default)s)",
    )
    orch.add_argument(
        "--idle-timeout",
        type=float,
        default=DEFAULT_IDLE_TIMEOUT,
        help="seconds a connection may stay open with no job (default %(default)s)",
    )
    orch.add_argument(
        "--max-connections-per-client",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
        help="open connections allowed per client address (default %(default)s)",
    )

    gen = sub.add_parser("generate", help="run one text-to-image job and save the image")
    gen.add_argument(
        "--orchestrator",
        "--orchestrators",
        dest="orchestrator",
        action="append",
        default=[],
        help="ws://host:port; repeat it or give a comma-separated list to fail over between them",
    )
    gen.add_argument("--orchestrators-file", type=Path, default=None, help="one URL per line")
    gen.add_argument("--deadline", type=float, default=None, help="seconds the job may take")
    gen.add_argument("--max-orchestrators", type=int, default=3, help="tries before giving up")
    _add_hardware_flags(gen)
    gen.add_argument(
        "--stall-floor",
        type=float,
        default=DEFAULT_STALL_FLOOR,
        help="seconds added to k measured progress intervals before a job counts as "
        f"stalled (default {DEFAULT_STALL_FLOOR:g}; spec 15.1)",
    )
    gen.add_argument(
        "--metrics-db",
        type=Path,
        default=Path.home() / ".stepstream" / "metrics.sqlite3",
        help="where measured orchestrator speeds are kept",
    )
    gen.add_argument(
        "--selection",
        default="livepeer",
        choices=["livepeer", "speed", "cheap"],
        help="how orchestrators are chosen: go-livepeer's weighted draw, fastest, cheapest",
    )
    gen.add_argument("--model", required=True, help="model id, e.g. stepstream/tiny-sd")
    gen.add_argument("--prompt", required=True, help="what to draw (at most 4000 characters)")
    gen.add_argument("--negative-prompt", default="", help="what to keep out of the image")
    gen.add_argument("--width", type=int, default=1024, help="pixels, a multiple of 8")
    gen.add_argument("--height", type=int, default=576, help="pixels, a multiple of 8")
    gen.add_argument("--steps", type=int, default=50, help="denoising steps, 1..1000")
    gen.add_argument(
        "--guidance-scale", type=float, default=7.5, help="how closely to follow the prompt"
    )
    gen.add_argument(
        "--seed", type=int, default=None, help="0..4294967295 (default: a random one, printed)"
    )
    gen.add_argument("--num-images", type=int, default=1, help="images of the prompt, 1..16")
    gen.add_argument(
        "--preview-every", type=int, default=5, help="a preview (and a payment) every N steps"
    )
    gen.add_argument(
        "--preview-method",
        default="latent_rgb",
        choices=["latent_rgb", "taesd", "vae", "none"],
        help="cheap latent colours, the tiny preview decoder, the exact VAE decode, or none",
    )
    gen.add_argument(
        "--max-price",
        type=_fraction,
        default=None,
        help="most wei per pixel-step to pay, e.g. 95367 or 4768371/50 (default: any price)",
    )
    gen.add_argument("--key", type=Path, default=None, help="key file; a throwaway key if absent")
    gen.add_argument(
        "--out",
        required=True,
        type=Path,
        help="image file to write: .png, .jpg or .webp (the suffix picks the format)",
    )
    _add_chain_flags(gen)
    gen.add_argument("--deposit", type=int, default=0, help="wei to add to the ticket deposit")
    gen.add_argument("--reserve", type=int, default=0, help="wei to add to the ticket reserve")

    keys = sub.add_parser("keys", help="make a key file, or print a key file's address")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, parser_class=_Parser)
    new = keys_sub.add_parser("new", help="write a new random key to FILE and print its address")
    new.add_argument("file", type=Path, help="where to write it (never overwritten)")
    new.add_argument(
        "--keystore",
        action="store_true",
        help="write an encrypted Ethereum keystore instead of hex "
        "(password from --key-password-file or $STEPSTREAM_KEY_PASSWORD)",
    )
    new.add_argument("--key-password-file", type=Path, default=None, help="password for --keystore")
    address = keys_sub.add_parser("address", help="print the Ethereum address of a key file")
    address.add_argument("file", type=Path, help="a hex or keystore key file")
    address.add_argument(
        "--key-password-file", type=Path, default=None, help="password of a keystore"
    )

    deploy = sub.add_parser(
        "deploy-broker",
        help="deploy the contracts (Controller, TicketBroker, RoundsManager, BondingManager, "
        "Minter) and print the Controller's address",
    )
    deploy.add_argument("--eth-url", required=True, help="JSON-RPC URL of the chain")
    deploy.add_argument("--key", required=True, type=Path, help="key file of the deployer")
    deploy.add_argument(
        "--key-password-file", type=Path, default=None, help="password of a keystore --key"
    )
    deploy.add_argument(
        "--eth-controller",
        default=None,
        help="a set deployed before: register --transcoder on it instead of deploying",
    )
    deploy.add_argument(
        "--transcoder",
        action="append",
        default=[],
        metavar="ADDRESS[=STAKE]",
        help="register an orchestrator as an active transcoder (stake in wei, default 1e18)",
    )
    deploy.add_argument("--round-length", type=int, default=100, help="blocks per round")
    deploy.add_argument("--unlock-period", type=int, default=2, help="rounds")
    deploy.add_argument("--ticket-validity", type=int, default=2, help="rounds")

    gw = sub.add_parser("gateway", help="serve the Livepeer AI API and live job streams to apps")
    gw.add_argument(
        "--orchestrators",
        "--orchestrator",
        dest="orchestrator",
        action="append",
        default=[],
        help="ws://host:port[,ws://host:port...]; repeat it or list several to fail over",
    )
    gw.add_argument("--orchestrators-file", type=Path, default=None, help="one URL per line")
    gw.add_argument("--max-orchestrators", type=int, default=3, help="tries per job")
    _add_hardware_flags(gw)
    gw.add_argument(
        "--selection",
        default="livepeer",
        choices=["livepeer", "speed", "cheap"],
        help="how orchestrators are chosen: go-livepeer's weighted draw, fastest, cheapest",
    )
    gw.add_argument(
        "--metrics-db",
        type=Path,
        default=Path(".stepstream") / "gateway-metrics.sqlite3",
        help="where measured orchestrator speeds are kept (not in --outputs: that is served)",
    )
    gw.add_argument(
        "--refresh-seconds", type=float, default=60.0, help="how often orchestrators are asked"
    )
    gw.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; anything but loopback needs --token-file",
    )
    gw.add_argument("--port", type=int, default=8937, help="port to listen on (0: any free)")
    gw.add_argument(
        "--key", required=True, type=Path, help="key file the gateway pays with (hex or keystore)"
    )
    _add_chain_flags(gw)
    gw.add_argument("--outputs", type=Path, default=Path("gateway-outputs"), help="output folder")
    gw.add_argument(
        "--token-file", type=Path, default=None, help="require the bearer token this file holds"
    )
    gw.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        help="a web origin (https://app.example) whose pages may call the gateway; repeatable",
    )
    gw.add_argument(
        "--max-jobs-per-client",
        type=int,
        default=4,
        help="jobs one client address may have in flight; more are answered 429",
    )
    gw.add_argument(
        "--max-price",
        type=_fraction,
        default=None,
        help="most wei per pixel-step to pay, e.g. 95367 or 4768371/50 (default: any, warned)",
    )

    bench = sub.add_parser("bench", help="network job vs. direct pipeline, side by side")
    bench.add_argument(
        "what",
        nargs="?",
        default="network",
        choices=["network", "pipelines", "failover", "load", "batching"],
        help="network: overhead per job; pipelines: per-step and preview costs; "
        "failover: recovery time and money lost per stall; load: many sessions on one "
        "orchestrator; batching: throughput and latency per batch size",
    )
    bench.add_argument(
        "--batch-sizes",
        type=_positive,
        nargs="+",
        default=None,
        help="batching: batch sizes, the first the baseline (default 1 2 4 8)",
    )
    bench.add_argument("--frames", type=int, default=4, help="video frames (bench pipelines)")
    bench.add_argument("--repeats", type=int, default=5, help="previews timed per method")
    bench.add_argument(
        "--taesd-random-weights",
        action="store_true",
        help="time TAESD with its real architecture and random weights when none are on disk",
    )
    bench.add_argument("--stall-after", type=int, default=6, help="failover: step that stalls")
    bench.add_argument(
        "--stall-floor",
        type=float,
        default=DEFAULT_STALL_FLOOR,
        help=f"failover: seconds added to k intervals (default {DEFAULT_STALL_FLOOR:g})",
    )
    bench.add_argument(
        "--stall-factor",
        type=float,
        default=DEFAULT_STALL_FACTOR,
        help=f"failover: k, measured progress intervals (default {DEFAULT_STALL_FACTOR:g})",
    )
    bench.add_argument(
        "--false-stalls",
        action="store_true",
        help="failover: count jobs that move off healthy orchestrators while a core is busy",
    )
    bench.add_argument(
        "--jobs",
        type=int,
        default=50,
        help="failover --false-stalls: jobs; load: sessions that run a one-step job",
    )
    bench.add_argument("--sessions", type=int, default=1000, help="load: sessions")
    bench.add_argument("--rate", type=float, default=100.0, help="load: sessions opened a second")
    bench.add_argument(
        "--hog-seconds",
        type=float,
        default=600.0,
        help="failover --false-stalls: the busy child ends by itself after this long",
    )
    bench.add_argument(
        "--step-seconds", type=float, default=0.0, help="failover: extra seconds per step"
    )
    bench.add_argument(
        "--runs", type=_positive, default=None, help="jobs timed (network: 9, the others: 5)"
    )
    bench.add_argument(
        "--matrix",
        action="store_true",
        help="network: 64x64 at a window of 4 and of 1, and 128x128 at 4, in one go",
    )
    bench.add_argument("--steps", type=int, default=20, help="denoising steps per job")
    bench.add_argument("--size", type=int, default=64, help="width and height, pixels")
    bench.add_argument("--preview-every", type=int, default=4, help="a preview every N steps")
    bench.add_argument("--model", default="stepstream/tiny-sd", help="model id")
    add_runner_parser(sub)
    add_conformance_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    quiet = args.command in ("bench", "generate", "keys", "conformance") or getattr(
        args, "quiet", False
    )
    level = logging.DEBUG if getattr(args, "verbose", False) else logging.INFO
    configure_logging(logging.WARNING if quiet and level != logging.DEBUG else level)
    if args.command == "runner" and args.managed:
        # Its orchestrator ends it (by closing stdin); a Ctrl-C meant for the
        # orchestrator reaches the whole process group, and is the orchestrator's.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print(f"stepstream {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run(args: argparse.Namespace) -> int:
    # Imports here keep `stepstream --help` fast (torch is slow to import).
    if args.command == "orchestrator":
        from stepstream.run_orchestrator import run_orchestrator

        return anyio.run(until_interrupted, lambda: run_orchestrator(args))
    if args.command == "gateway":
        from stepstream.run_gateway import run_gateway

        # SIGTERM too, as uvicorn did: the gateway stops its server in order.
        return anyio.run(until_interrupted, lambda: run_gateway(args), TERMINATING)
    if args.command == "generate":
        from stepstream.generate import run_generate

        return anyio.run(until_interrupted, lambda: run_generate(args))
    if args.command == "keys":
        from stepstream.keys_command import run_keys

        return run_keys(args)
    if args.command == "deploy-broker":
        from stepstream.deploy import run_deploy_broker

        return run_deploy_broker(args)
    if args.command == "runner":
        from runner.main import run_runner

        if args.managed:  # its orchestrator ends it; SIGINT stays ignored (see main)
            return anyio.run(run_runner, args)
        return anyio.run(until_interrupted, lambda: run_runner(args))
    if args.command == "bench" and args.runs is None:
        args.runs = 9 if args.what == "network" else 5
    if args.command == "bench" and args.what == "pipelines":
        from stepstream.bench_pipelines import run_bench_pipelines

        return run_bench_pipelines(args)
    if args.command == "bench" and args.what == "load":
        from stepstream.bench_load import run_load_bench

        return run_load_bench(args)
    if args.command == "bench" and args.what == "batching":
        from stepstream.bench_batching import run_bench_batching

        return run_bench_batching(args)
    if args.command == "bench" and args.what == "failover":
        from stepstream.bench_failover import run_failover_bench

        return run_failover_bench(args)
    if args.command == "conformance":
        from stepstream.conformance_command import run_conformance

        return run_conformance(args)
    if args.command == "bench":
        from stepstream.bench import run_bench

        return run_bench(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
