"""Shared fixtures: one tiny model per session, orchestrators on loopback."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any

import pytest

from orchestrator.config import ModelEntry
from orchestrator.server import Orchestrator, OrchestratorConfig
from pipelines.loader import LoadedModel, load_model
from pipelines.tiny import TINY_SD

PRICE = Fraction(95367, 1)  # wei per pixel-step, e.g. go-livepeer's 4768371/pixel over 50 steps


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def tiny_model() -> LoadedModel:
    return load_model(TINY_SD, device="cpu")


@dataclass
class RunningOrchestrator:
    orch: Orchestrator
    url: str


@contextlib.asynccontextmanager
async def orchestrator_on_loopback(
    model: LoadedModel, **overrides: Any
) -> AsyncIterator[RunningOrchestrator]:
    """An orchestrator with the tiny model warm, on 127.0.0.1 and a free port."""
    entry = ModelEntry("text-to-image", TINY_SD, warm=True, capacity=2, price_per_pixel_step=PRICE)
    config = OrchestratorConfig(models=[entry], private_key=secrets.token_bytes(32))
    orch = Orchestrator(replace(config, **overrides))
    for slot in orch.slots.values():
        slot.model = model
    async with orch.serve("127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        yield RunningOrchestrator(orch, f"ws://127.0.0.1:{port}")


@pytest.fixture
async def running(tiny_model: LoadedModel) -> AsyncIterator[RunningOrchestrator]:
    async with orchestrator_on_loopback(tiny_model) as running:
        yield running


@pytest.fixture(scope="session")
def tiny_sdxl_model() -> LoadedModel:
    from pipelines.tiny import TINY_SDXL

    return load_model(TINY_SDXL, device="cpu")


@pytest.fixture(scope="session")
def tiny_svd_model() -> LoadedModel:
    from pipelines.tiny_svd import TINY_SVD

    return load_model(TINY_SVD, device="cpu")
