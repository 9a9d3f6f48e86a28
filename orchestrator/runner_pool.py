"""Runners of one orchestrator and which models live where: managed and external.

Managed runners (orchestrator/managed.py) are started on first need, one per
GPU (or `slots` on the CPU), and models are placed on them by measured
memory (orchestrator/placement.py), evicting idle cold models. An aiModels.json
entry with a `url` is served by the external runner there, with its `token`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import anyio
import anyio.abc

from orchestrator.config import ModelEntry
from orchestrator.managed import ManagedRunner
from orchestrator.placement import DevicePool, Resident, place
from orchestrator.runner_client import RunnerClient, RunnerUnavailable
from pipelines.devices import CPU_SLOTS_DEFAULT, cuda_devices
from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import Device
from protocol.runner import ModelState

log = logging.getLogger(__name__)


@dataclass
class RunnerSettings:
    """How managed runners are started (CLI: --runners, --device, --memory-budget, --offload)."""

    devices: list[str] = field(default_factory=list)
    """One managed runner per entry; empty: every GPU, else CPU slots."""
    memory_budget: int | None = None
    offload: bool = False


def default_runner_devices(slots: int | None = None, device: str | None = None) -> list[str]:
    """Devices of the managed runners: `slots` on `device` if given, else one per GPU,
    else CPU_SLOTS_DEFAULT on the CPU."""
    if device is not None:
        return [device] * (slots or 1)
    gpus = cuda_devices()
    if gpus:
        return gpus[:slots] if slots else gpus
    return ["cpu"] * (slots or CPU_SLOTS_DEFAULT)


@dataclass
class Usage:
    in_use: int = 0
    last_used: float = 0.0


class RunnerPool:
    """Finds (loading if needed) the runner for a model; owns every runner connection."""

    def __init__(
        self,
        entries: list[ModelEntry],
        settings: RunnerSettings,
        on_restart: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.warm = {e.model_id for e in entries if e.warm}
        self.external = {e.model_id: (e.url, e.token or "") for e in entries if e.url}
        self.batching = {e.model_id: (e.max_batch, e.batch_wait_ms) for e in entries}
        self.managed = [
            ManagedRunner(d, settings.memory_budget, settings.offload, on_restart)
            for d in settings.devices
        ]
        self.usage: dict[str, Usage] = {}
        self.footprints: dict[str, int] = {}
        """Last measured footprint of each model, for placing it again."""
        self.measured: dict[str, ModelState] = {}
        """Each model as last loaded (its load and step times), also once it is cold again."""
        self._clients: dict[str, RunnerClient] = {}
        """External runners by url."""
        self._tg: anyio.abc.TaskGroup | None = None
        self._lock = anyio.Lock()

    @contextlib.asynccontextmanager
    async def active(self) -> AsyncIterator[RunnerPool]:
        """Runners live inside this block; leaving it stops every managed runner."""
        if self._tg is not None:
            yield self
            return
        async with anyio.create_task_group() as tg:
            self._tg = tg
            try:
                yield self
            finally:
                self._tg = None
                tg.cancel_scope.cancel()
                for client in self._clients.values():
                    with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                        await client.aclose()
                self._clients.clear()

    def state(self, model_id: str) -> ModelState | None:
        """The model as loaded on a live runner, or None (cold)."""
        for client in self._live_clients():
            if model_id in client.models:
                return client.models[model_id]
        return None

    def devices(self) -> list[Device]:
        """The device of each live runner (PROTOCOL.md 4.5): a GPU by its name and memory,
        free memory being what the measured footprints of its models leave; the CPU as
        `cpu`, with no VRAM."""
        out = []
        for client in self._live_clients():
            ready = client.ready
            if ready is None:
                continue
            held = sum(m.footprint_bytes for m in client.models.values())
            total = ready.vram_bytes or None
            gpu = ready.gpu or ("cpu" if ready.device.startswith("cpu") else ready.device)
            out.append(
                Device(
                    name=ready.device,
                    gpu=gpu,
                    vram_total=total,
                    vram_free=None if total is None else max(0, total - held),
                    models=tuple(sorted(client.models))[:256],
                )
            )
        return out[:64]

    def _live_clients(self) -> list[RunnerClient]:
        clients = [m.client for m in self.managed if m.client is not None]
        clients += list(self._clients.values())
        return [c for c in clients if not c.closed.is_set()]

    @contextlib.asynccontextmanager
    async def use(self, model_id: str) -> AsyncIterator[None]:
        """Mark the model busy (not evictable) for the block."""
        usage = self.usage.setdefault(model_id, Usage())
        usage.in_use += 1
        try:
            yield
        finally:
            usage.in_use -= 1
            usage.last_used = time.monotonic()

    async def acquire(self, model_id: str) -> tuple[RunnerClient, ModelState]:
        """The runner holding `model_id`, loading it there first if it is cold.

        Raises ProtocolError: model_unavailable (runner unreachable, token refused,
        load failed) or no_capacity (no device has memory for it).
        """
        if self._tg is None:
            raise ProtocolError(ErrorCode.INTERNAL_ERROR, "runners are not started")
        try:
            if model_id in self.external:
                client = await self._external(model_id)
                state = await client.load(model_id, *self.batching.get(model_id, (1, 0)))
                self.measured[model_id] = state
                return client, state
            async with self._lock:
                client = await self._place(model_id)
                state = await client.load(model_id, *self.batching.get(model_id, (1, 0)))
                self.footprints[model_id] = state.footprint_bytes
                self.measured[model_id] = state
                return client, state
        except RunnerUnavailable as exc:
            raise ProtocolError(ErrorCode.MODEL_UNAVAILABLE, str(exc)) from None

    async def _external(self, model_id: str) -> RunnerClient:
        url, token = self.external[model_id]
        client = self._clients.get(url)
        if client is None or client.closed.is_set():
            client = RunnerClient(url, token)
            await client.connect()
            assert self._tg is not None
            self._tg.start_soon(client.receive_loop)
            self._clients[url] = client
        return client

    async def _place(self, model_id: str) -> RunnerClient:
        if not self.managed:
            raise ProtocolError(ErrorCode.MODEL_UNAVAILABLE, "no managed runner is configured")
        assert self._tg is not None
        for runner in self.managed:
            runner.start(self._tg)
        clients = [await runner.wait_up() for runner in self.managed]
        for client in clients:
            if model_id in client.models:
                return client
        pools = [
            DevicePool(str(i), c.memory_bytes, tuple(self._residents(c)))
            for i, c in enumerate(clients)
        ]
        placement = place(pools, self.footprints.get(model_id, 0))
        if placement is None:
            raise ProtocolError(
                ErrorCode.NO_CAPACITY, f"no device has memory for {model_id} while others run"
            )
        client = clients[int(placement.device)]
        for victim in placement.evict:
            log.info("evicting idle model %s from %s", victim, client.name)
            await client.unload(victim)
        return client

    def _residents(self, client: RunnerClient) -> list[Resident]:
        out = []
        for model_id, state in client.models.items():
            usage = self.usage.get(model_id, Usage())
            busy = usage.in_use > 0 or model_id in self.warm
            out.append(Resident(model_id, state.footprint_bytes, busy, usage.last_used))
        return out
