"""`stepstream orchestrator`: load aiModels.json, a key and a chain, then serve until stopped."""

from __future__ import annotations

import argparse
import logging
import sys

import anyio
from tqdm import tqdm

from orchestrator.cashier import DEFAULT_FACE_VALUE, DEFAULT_REDEEM_COST_MULTIPLIER
from orchestrator.config import ConfigError, ModelEntry, load_ai_models
from orchestrator.connection_limits import ConnectionLimits
from orchestrator.runner_pool import RunnerSettings, default_runner_devices
from orchestrator.server import Orchestrator, OrchestratorConfig
from protocol.pm import address_of
from settlement.chain import settlement_for
from settlement.eth import ChainError
from stepstream.keys import KeyFileError, load_private_key

log = logging.getLogger("stepstream.orchestrator")


async def run_orchestrator(args: argparse.Namespace) -> int:
    try:
        models = load_ai_models(args.models)
        key = load_private_key(args.key, args.key_password_file)
        settlement = settlement_for(
            args.eth_url,
            key,
            controller=args.eth_controller,
            broker=args.ticket_broker,
            initialize_rounds=args.initialize_round,
        )
        # Measured now (a probe redemption's gas), so a chain that cannot pay us fails here.
        await anyio.to_thread.run_sync(settlement.redeem_cost)
    except (ConfigError, KeyFileError, ChainError) as exc:
        print(f"stepstream orchestrator: {exc}", file=sys.stderr)
        return 2
    if args.max_queued < 0:
        print("stepstream orchestrator: --max-queued must not be negative", file=sys.stderr)
        return 2
    multiplier = args.redeem_cost_multiplier
    config = OrchestratorConfig(
        models=models,
        private_key=key,
        face_value=args.face_value or DEFAULT_FACE_VALUE,
        payment_timeout=args.payment_timeout,
        max_queued=args.max_queued,
        settlement=settlement,
        winners_db=args.data_dir / f"winners-{address_of(key)}.sqlite",
        redeem_cost_multiplier=DEFAULT_REDEEM_COST_MULTIPLIER if multiplier is None else multiplier,
        runners=RunnerSettings(
            default_runner_devices(args.runners, args.device), args.memory_budget, args.offload
        ),
        limits=ConnectionLimits(
            hello_timeout=args.hello_timeout,
            idle_timeout=args.idle_timeout,
            max_connections_per_client=args.max_connections_per_client,
        ),
    )
    orch = Orchestrator(config)
    return await _serve(orch, models, args)


async def _serve(orch: Orchestrator, models: list[ModelEntry], args: argparse.Namespace) -> int:
    """Listen first (a port in use fails at once), redeem what an earlier run left
    pending, then load the warm models; the redeemer runs whatever the models do."""
    log.info("recipient address %s", orch.address)
    pending = orch.cashier.winners.counts()["pending"]
    if pending:
        log.info("%d winning tickets from an earlier run are pending redemption", pending)
    try:
        async with orch.serve(args.host, args.port) as server:
            warm = sum(1 for m in models if m.warm)
            bar = tqdm(
                total=warm, unit="model", desc="loading models", file=sys.stderr, disable=not warm
            )
            with bar:
                await orch.load_warm_models(on_loaded=lambda model_id: bar.update(1))
            host, port = server.sockets[0].getsockname()[:2]
            # The demo and tests wait for this exact line.
            print(f"listening on ws://{host}:{port}", flush=True)
            await server.serve_forever()
    except OSError as exc:
        print(
            f"stepstream orchestrator: cannot listen on {args.host}:{args.port}: {exc}",
            file=sys.stderr,
        )
        return 2
    return 0
