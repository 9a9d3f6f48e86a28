"""Command-line options of `stepstream runner` (no torch import: `stepstream --help` stays fast)."""

from __future__ import annotations

import argparse

TOKEN_ENV = "STEPSTREAM_RUNNER_TOKEN"


def add_runner_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    runner = sub.add_parser("runner", help="keep models warm and run jobs for an orchestrator")
    runner.add_argument(
        "--model", action="append", default=[], help="model id to load at start (repeatable)"
    )
    runner.add_argument("--host", default="127.0.0.1", help="address to listen on")
    runner.add_argument("--port", type=int, default=8936, help="port to listen on")
    runner.add_argument(
        "--token", default=None, help=f"bearer token orchestrators must send (else ${TOKEN_ENV})"
    )
    runner.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if any)")
    runner.add_argument(
        "--memory-budget", type=int, default=None, help="bytes models may use on the device"
    )
    runner.add_argument(
        "--offload",
        action="store_true",
        help="sequential CPU offload (CUDA): fits small cards, runs slower",
    )
    runner.add_argument(
        "--managed", action="store_true", help="exit when stdin closes (set by the orchestrator)"
    )
