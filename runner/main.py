"""`stepstream runner`: serve models to an orchestrator on one port, behind a token.

A managed runner (started by the orchestrator) gets its token in
$STEPSTREAM_RUNNER_TOKEN and exits when its stdin closes, so it never
outlives the orchestrator that started it, even one killed with SIGKILL.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import anyio

from runner.args import TOKEN_ENV
from runner.faults import FaultPlan
from runner.server import RunnerConfig, RunnerServer

log = logging.getLogger("stepstream.runner")


async def _exit_when_stdin_closes() -> None:
    """A managed runner's lifeline: EOF on stdin means the orchestrator is gone."""
    await anyio.to_thread.run_sync(sys.stdin.buffer.read, abandon_on_cancel=True)
    log.info("orchestrator gone (stdin closed); exiting")
    os._exit(0)


async def run_runner(args: argparse.Namespace) -> int:
    from pipelines.loader import default_device

    token = args.token or os.environ.get(TOKEN_ENV)
    if not token:
        print(f"stepstream runner: a --token (or ${TOKEN_ENV}) is required", file=sys.stderr)
        return 2
    try:
        faults = FaultPlan.from_env()
    except ValueError as exc:
        print(f"stepstream runner: {exc}", file=sys.stderr)
        return 2
    if faults is not None:
        log.warning("injecting faults into every job: %s", faults)
    config = RunnerConfig(
        device=args.device or default_device(),
        token=token,
        memory_budget=args.memory_budget,
        offload=args.offload,
        faults=faults,
    )
    server = RunnerServer(config)
    async with anyio.create_task_group() as tg:
        if args.managed:
            tg.start_soon(_exit_when_stdin_closes)
        code = await _serve(server, args)
        tg.cancel_scope.cancel()
    return code


async def _serve(server: RunnerServer, args: argparse.Namespace) -> int:
    try:
        for model_id in args.model:
            await server.load(model_id)
    except Exception as exc:
        print(f"stepstream runner: cannot load a model: {exc}", file=sys.stderr)
        return 2
    try:
        async with server.serve(args.host, args.port) as ws_server:
            host, port = ws_server.sockets[0].getsockname()[:2]
            # The orchestrator and tests wait for this exact line.
            print(f"listening on ws://{host}:{port}", flush=True)
            await ws_server.serve_forever()
    except OSError as exc:
        where = f"{args.host}:{args.port}"
        print(f"stepstream runner: cannot listen on {where}: {exc}", file=sys.stderr)
        return 2
    return 0
