"""`stepstream orchestrator`: load aiModels.json and a key, then serve until stopped."""

from __future__ import annotations

import argparse
import logging
import sys

from tqdm import tqdm

from orchestrator.config import ConfigError, load_ai_models
from orchestrator.server import DEFAULT_FACE_VALUE, Orchestrator, OrchestratorConfig
from stepstream.keys import KeyFileError, load_private_key

log = logging.getLogger("stepstream.orchestrator")


async def run_orchestrator(args: argparse.Namespace) -> int:
    try:
        models = load_ai_models(args.models)
        key = load_private_key(args.key)
    except (ConfigError, KeyFileError) as exc:
        print(f"stepstream orchestrator: {exc}", file=sys.stderr)
        return 2
    config = OrchestratorConfig(
        models=models,
        private_key=key,
        face_value=args.face_value or DEFAULT_FACE_VALUE,
        payment_timeout=args.payment_timeout,
    )
    orch = Orchestrator(config)
    log.info("recipient address %s", orch.address)
    log.info("no chain configured: tickets are checked and counted, winners kept, not redeemed")
    warm = sum(1 for m in models if m.warm)
    bar = tqdm(total=warm, unit="model", desc="loading models", file=sys.stderr, disable=not warm)
    try:
        await orch.load_warm_models(on_loaded=lambda model_id: bar.update(1))
    except Exception as exc:
        print(f"stepstream orchestrator: cannot load a warm model: {exc}", file=sys.stderr)
        return 2
    finally:
        bar.close()
    try:
        async with orch.serve(args.host, args.port) as server:
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
