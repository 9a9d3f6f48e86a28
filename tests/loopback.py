"""Orchestrators on loopback for tests: the real server, its jobs on a real runner.

Every job runs the way `stepstream orchestrator` runs it: through the runner
protocol, over a WebSocket, to a RunnerServer (runner/server.py). The one
shortcut is that the runner lives in the test's process, holding models the
session has already loaded, so a test costs no process start and no model
load. Faults are injected where they happen in production: in the runner
(runner/faults.py: stall, slow steps, a failing pipeline), or on the wire
between orchestrator and broadcaster (`WireFaults`: a clean close, a dead
process, garbage), right after the orchestrator has sent a given step's
progress, so the broadcaster has seen exactly that many steps.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any

from websockets.asyncio.server import Server

from orchestrator.config import ModelEntry
from orchestrator.runner_pool import RunnerSettings
from orchestrator.server import Orchestrator, OrchestratorConfig
from pipelines.loader import LoadedModel
from protocol.messages import Message, Progress
from runner.faults import FaultPlan
from runner.reference import StepClaim
from runner.server import RunnerConfig, RunnerServer

__all__ = ["FaultPlan", "LoopbackOrchestrator", "WireFaults", "loopback_orchestrator"]

_CLAIMS: dict[int, StepClaim] = {}
"""Each session model's step, timed once (runner/reference.py): a runner times a model when
it loads it, and the session's models are loaded once."""


@dataclass(frozen=True)
class WireFaults:
    """Faults of the orchestrator's connections, after it sent progress for step n."""

    close_after: int | None = None
    """Close every broadcaster connection cleanly (a close frame)."""
    crash_after: int | None = None
    """Drop every connection without a close frame and stop listening (a dead process)."""
    malformed_after: int | None = None
    """Send every broadcaster a frame that is not msgpack."""


@dataclass
class LoopbackOrchestrator:
    orch: Orchestrator
    url: str
    runner: RunnerServer
    server: Server
    fired: list[str] = field(default_factory=list)
    """Faults that fired, runner-side and wire-side, in order."""

    @property
    def plan(self) -> FaultPlan | None:
        return self.runner.config.faults

    @plan.setter
    def plan(self, plan: FaultPlan | None) -> None:
        self.runner.config.faults = plan


def _wire_observer(lo: LoopbackOrchestrator, faults: WireFaults) -> Any:
    async def observe(message: Message) -> None:
        if not isinstance(message, Progress):
            return
        step, server = message.step, lo.server
        if step == faults.close_after:
            lo.fired.append("close")
            for ws in list(server.connections):
                await ws.close()
        if step == faults.crash_after:
            lo.fired.append("crash")
            server.close(close_connections=False)
            for ws in list(server.connections):
                ws.transport.abort()
        if step == faults.malformed_after:
            lo.fired.append("malformed")
            for ws in list(server.connections):
                with contextlib.suppress(Exception):
                    await ws.send(b"\xc1 not msgpack")

    return observe


@contextlib.asynccontextmanager
async def loopback_orchestrator(
    models: LoadedModel | Sequence[LoadedModel],
    plan: FaultPlan | None = None,
    *,
    wire: WireFaults | None = None,
    price: Fraction = Fraction(1),
    capacity: int = 2,
    warm: bool = True,
    pipelines: Sequence[str] = ("text-to-image",),
    entries: Sequence[ModelEntry] | None = None,
    preloaded: bool = True,
    orchestrator_type: type[Orchestrator] = Orchestrator,
    **config: Any,
) -> AsyncIterator[LoopbackOrchestrator]:
    """An orchestrator on 127.0.0.1 whose runner holds `models` (already loaded).

    It offers the first model for each of `pipelines`, or exactly `entries`
    (their url and token are filled in); with `preloaded=False` the runner loads them
    itself, as a fresh one would. `plan` injects faults in the runner,
    `wire` on the orchestrator's connections; `orchestrator_type` may be a
    test's subclass with a planted fault; `config` overrides
    OrchestratorConfig fields.
    """
    loaded = [models] if isinstance(models, LoadedModel) else list(models)
    token = secrets.token_urlsafe(16)
    runner = RunnerServer(RunnerConfig(device="cpu", token=token, faults=plan))
    for model in loaded if preloaded else ():  # else the runner loads them on demand
        await runner.adopt(model, _CLAIMS.get(id(model)))
        if model.model_id in runner.claims:
            _CLAIMS[id(model)] = runner.claims[model.model_id]
    runner.fired = fired = []
    async with runner.serve("127.0.0.1", 0) as runner_server:
        runner_url = f"ws://127.0.0.1:{runner_server.sockets[0].getsockname()[1]}"
        if entries is None:
            entries = [ModelEntry(p, loaded[0].model_id, warm, capacity, price) for p in pipelines]
        offered = [replace(e, url=runner_url, token=token) for e in entries]
        base = OrchestratorConfig(
            models=offered,
            private_key=secrets.token_bytes(32),
            runners=RunnerSettings(devices=[]),
        )
        orch = orchestrator_type(replace(base, **config))
        async with orch.serve("127.0.0.1", 0) as server:
            if any(e.warm for e in offered):
                await orch.load_warm_models()
            port = server.sockets[0].getsockname()[1]
            lo = LoopbackOrchestrator(orch, f"ws://127.0.0.1:{port}", runner, server, fired)
            if wire is not None:
                orch.observers.append(_wire_observer(lo, wire))
            yield lo
