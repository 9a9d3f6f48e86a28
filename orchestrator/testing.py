"""An orchestrator that misbehaves on purpose, for failover tests and the failover bench.

Each fault fires in the job's worker thread right after step `n` of a job
was reported (its progress sent), so the broadcaster has seen exactly n
steps when the fault begins. A stall blocks until the job is stopped (a
cancel or a disconnect), never on a timer, so tests need no sleeps.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any

import anyio
import anyio.from_thread
import torch
from websockets.asyncio.server import ServerConnection

from orchestrator.config import ModelEntry
from orchestrator.jobs import JobStopped, RunningJob
from orchestrator.server import Orchestrator, OrchestratorConfig
from pipelines.loader import LoadedModel
from protocol.messages import Info


@dataclass
class FaultPlan:
    """What goes wrong, and after which step of each job (None: never)."""

    stall_after: int | None = None
    """Stop making progress, but keep the connection open and answer cancel."""
    slow_after: int | None = None
    slow_step_seconds: float = 0.0
    """Extra seconds per step once `slow_after` steps are done (slows down partway)."""
    step_seconds: float = 0.0
    """Extra seconds every step: a slower GPU than it claims."""
    crash_after: int | None = None
    """Drop every connection without a close frame and refuse new ones (a dead process)."""
    close_after: int | None = None
    """Close the job's WebSocket cleanly mid-job."""
    malformed_after: int | None = None
    """Send a frame that is not msgpack."""
    error_after: int | None = None
    """End the job with pipeline_failed."""
    claim_warm: bool | None = None
    """Advertise the model as warm (or cold) whatever it is."""
    first_step_seconds: float = 0.0
    """Extra seconds before the first step: a 'warm' model that still has to load."""


@dataclass
class FaultLog:
    fired: list[str] = field(default_factory=list)


class FaultyOrchestrator(Orchestrator):
    """The real orchestrator, with a FaultPlan applied to every job it runs."""

    def __init__(self, config: OrchestratorConfig, plan: FaultPlan) -> None:
        super().__init__(config)
        self.plan = plan
        self.log = FaultLog()
        self.crashed = False
        self.sockets: set[ServerConnection] = set()
        owner = self

        class _Job(FaultyJob):
            orchestrator = owner

        self.job_class = _Job

    async def handle(self, ws: ServerConnection) -> None:
        if self.crashed:
            ws.transport.abort()
            return
        self.sockets.add(ws)
        try:
            await super().handle(ws)
        finally:
            self.sockets.discard(ws)

    def _info(self, sender: bytes) -> Info:
        info = super()._info(sender)
        if self.plan.claim_warm is None:
            return info
        caps = tuple(replace(c, warm=self.plan.claim_warm) for c in info.capabilities)
        return replace(info, capabilities=caps)

    async def _close_all(self) -> None:
        for ws in list(self.sockets):
            await ws.close()

    async def _crash(self) -> None:
        self.crashed = True
        for ws in list(self.sockets):
            ws.transport.abort()

    async def _send_garbage(self) -> None:
        for ws in list(self.sockets):
            with contextlib.suppress(Exception):
                await ws.send(b"\xc1 not msgpack")


class FaultyJob(RunningJob):
    orchestrator: FaultyOrchestrator

    def wait_for_step(self, step: int) -> None:
        plan = self.orchestrator.plan
        if step == 1 and plan.first_step_seconds:
            time.sleep(plan.first_step_seconds)  # the simulated model load, not a synchronisation
        super().wait_for_step(step)

    def on_step_end(self, step: int, latents: torch.Tensor) -> None:
        plan, orch = self.orchestrator.plan, self.orchestrator
        extra = plan.step_seconds
        if plan.slow_after is not None and step > plan.slow_after:
            extra += plan.slow_step_seconds
        if extra:
            time.sleep(extra)  # the simulated slow GPU step
        super().on_step_end(step, latents)
        if step == plan.stall_after:
            orch.log.fired.append("stall")
            self._block_until_stopped()
        if step == plan.error_after:
            orch.log.fired.append("error")
            raise RuntimeError("injected fault: the GPU fell off the bus")
        if step == plan.close_after:
            orch.log.fired.append("close")
            anyio.from_thread.run(orch._close_all)
        if step == plan.malformed_after:
            orch.log.fired.append("malformed")
            anyio.from_thread.run(orch._send_garbage)
        if step == plan.crash_after:
            orch.log.fired.append("crash")
            anyio.from_thread.run(orch._crash)

    def _block_until_stopped(self) -> None:
        with self._cond:
            while self._stop is None:
                self._cond.wait()
            raise JobStopped(self._stop)


@dataclass
class LoopbackOrchestrator:
    orch: FaultyOrchestrator
    url: str


@contextlib.asynccontextmanager
async def loopback_orchestrator(
    model: LoadedModel,
    plan: FaultPlan | None = None,
    *,
    price: Fraction = Fraction(1),
    capacity: int = 2,
    warm: bool = True,
    pipelines: Sequence[str] = ("text-to-image",),
    **config: Any,
) -> AsyncIterator[LoopbackOrchestrator]:
    """An orchestrator serving `model` (already loaded) on 127.0.0.1, faults per `plan`.

    It offers the model for each of `pipelines` (text-to-image only by default).
    """
    entries = [ModelEntry(p, model.model_id, warm, capacity, price) for p in pipelines]
    base = OrchestratorConfig(models=entries, private_key=secrets.token_bytes(32))
    orch = FaultyOrchestrator(replace(base, **config), plan or FaultPlan())
    if warm:
        for slot in orch.slots.values():
            slot.model = model
    async with orch.serve("127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        yield LoopbackOrchestrator(orch, f"ws://127.0.0.1:{port}")
