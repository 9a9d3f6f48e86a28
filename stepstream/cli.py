"""The `stepstream` command: orchestrator, gateway, generate, bench, deploy-broker."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import anyio

from runner.args import add_runner_parser
from stepstream.logs import configure_logging


def _fraction(text: str) -> Fraction:
    try:
        value = Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number or fraction: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


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
    parser.add_argument("--ticket-broker", default=None, help="TicketBroker contract address")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepstream", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sub = parser.add_subparsers(dest="command", required=True)

    orch = sub.add_parser("orchestrator", help="serve jobs on this machine")
    orch.add_argument("--models", required=True, type=Path, help="go-livepeer aiModels.json")
    orch.add_argument("--host", default="127.0.0.1")
    orch.add_argument("--port", type=int, default=8935)
    orch.add_argument("--key", required=True, type=Path, help="file with the hex private key")
    orch.add_argument("--face-value", type=int, default=None, help="ticket face value, wei")
    orch.add_argument(
        "--payment-timeout", type=float, default=30.0, help="seconds to wait for credit"
    )
    _add_chain_flags(orch)
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

    gen = sub.add_parser("generate", help="run one text-to-image job and save the image")
    gen.add_argument(
        "--orchestrator",
        action="append",
        default=[],
        help="ws://host:port; repeat it or give a comma-separated list to fail over between them",
    )
    gen.add_argument("--orchestrators-file", type=Path, default=None, help="one URL per line")
    gen.add_argument("--deadline", type=float, default=None, help="seconds the job may take")
    gen.add_argument("--max-orchestrators", type=int, default=3, help="tries before giving up")
    gen.add_argument(
        "--metrics-db",
        type=Path,
        default=Path.home() / ".stepstream" / "metrics.sqlite3",
        help="where measured orchestrator speeds are kept",
    )
    gen.add_argument("--selection", default="livepeer", choices=["livepeer", "speed", "cheap"])
    gen.add_argument("--model", required=True, help="model id, e.g. stepstream/tiny-sd")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("--width", type=int, default=1024)
    gen.add_argument("--height", type=int, default=576)
    gen.add_argument("--steps", type=int, default=50)
    gen.add_argument("--guidance-scale", type=float, default=7.5)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--num-images", type=int, default=1)
    gen.add_argument("--preview-every", type=int, default=5)
    gen.add_argument(
        "--preview-method", default="latent_rgb", choices=["latent_rgb", "taesd", "vae", "none"]
    )
    gen.add_argument(
        "--max-price", type=_fraction, default=None, help="most wei per pixel-step to pay"
    )
    gen.add_argument("--key", type=Path, default=None, help="key file; a throwaway key if absent")
    gen.add_argument("--out", required=True, type=Path, help="image file to write (PNG)")
    _add_chain_flags(gen)
    gen.add_argument("--deposit", type=int, default=0, help="wei to add to the ticket deposit")
    gen.add_argument("--reserve", type=int, default=0, help="wei to add to the ticket reserve")

    deploy = sub.add_parser("deploy-broker", help="deploy the TicketBroker contract")
    deploy.add_argument("--eth-url", required=True, help="JSON-RPC URL of the chain")
    deploy.add_argument("--key", required=True, type=Path, help="key file of the deployer")
    deploy.add_argument("--key-password-file", type=Path, default=None)
    deploy.add_argument("--unlock-period", type=int, default=40, help="blocks")

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
    gw.add_argument("--selection", default="livepeer", choices=["livepeer", "speed", "cheap"])
    gw.add_argument(
        "--metrics-db",
        type=Path,
        default=Path(".stepstream") / "gateway-metrics.sqlite3",
        help="where measured orchestrator speeds are kept (not in --outputs: that is served)",
    )
    gw.add_argument(
        "--refresh-seconds", type=float, default=60.0, help="how often orchestrators are asked"
    )
    gw.add_argument("--host", default="127.0.0.1")
    gw.add_argument("--port", type=int, default=8937)
    gw.add_argument("--key", required=True, type=Path, help="file with the hex private key")
    gw.add_argument("--outputs", type=Path, default=Path("gateway-outputs"), help="output folder")
    gw.add_argument("--token-file", type=Path, default=None, help="require this bearer token")
    gw.add_argument(
        "--max-price", type=_fraction, default=None, help="most wei per pixel-step to pay"
    )

    bench = sub.add_parser("bench", help="network job vs. direct pipeline, side by side")
    bench.add_argument(
        "what",
        nargs="?",
        default="network",
        choices=["network", "pipelines", "failover"],
        help="network: overhead per job; pipelines: per-step and preview costs; "
        "failover: recovery time and money lost per stall",
    )
    bench.add_argument("--frames", type=int, default=4, help="video frames (bench pipelines)")
    bench.add_argument("--repeats", type=int, default=5, help="previews timed per method")
    bench.add_argument(
        "--taesd-random-weights",
        action="store_true",
        help="time TAESD with its real architecture and random weights when none are on disk",
    )
    bench.add_argument("--stall-after", type=int, default=6, help="failover: step that stalls")
    bench.add_argument("--stall-floor", type=float, default=1.0, help="failover: seconds")
    bench.add_argument(
        "--step-seconds", type=float, default=0.0, help="failover: extra seconds per step"
    )
    bench.add_argument("--runs", type=int, default=5)
    bench.add_argument("--steps", type=int, default=20)
    bench.add_argument("--size", type=int, default=64)
    bench.add_argument("--preview-every", type=int, default=4)
    bench.add_argument("--model", default="stepstream/tiny-sd")
    add_runner_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    quiet = args.command in ("bench", "generate")
    configure_logging(logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO)
    # Imports here keep `stepstream --help` fast (torch is slow to import).
    if args.command == "orchestrator":
        from stepstream.run_orchestrator import run_orchestrator

        return anyio.run(run_orchestrator, args)
    if args.command == "gateway":
        from stepstream.run_gateway import run_gateway

        return anyio.run(run_gateway, args)
    if args.command == "generate":
        from stepstream.generate import run_generate

        return anyio.run(run_generate, args)
    if args.command == "deploy-broker":
        from stepstream.run_orchestrator import run_deploy_broker

        return run_deploy_broker(args)
    if args.command == "runner":
        from runner.main import run_runner

        return anyio.run(run_runner, args)
    if args.command == "bench" and args.what == "pipelines":
        from stepstream.bench_pipelines import run_bench_pipelines

        return run_bench_pipelines(args)
    if args.command == "bench" and args.what == "failover":
        from stepstream.bench_failover import run_failover_bench

        return run_failover_bench(args)
    if args.command == "bench":
        from stepstream.bench import run_bench

        return run_bench(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
