"""Shared fixtures: one tiny model per session, orchestrators (with runners) on loopback."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from fractions import Fraction
from typing import Any

import pytest

from pipelines.loader import LoadedModel, load_model
from pipelines.tiny import TINY_SD
from tests.loopback import LoopbackOrchestrator, loopback_orchestrator

PRICE = Fraction(95367, 1)  # wei per pixel-step, e.g. go-livepeer's 4768371/pixel over 50 steps


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def tiny_model() -> LoadedModel:
    return load_model(TINY_SD, device="cpu")


RunningOrchestrator = LoopbackOrchestrator


@contextlib.asynccontextmanager
async def orchestrator_on_loopback(
    model: LoadedModel, **overrides: Any
) -> AsyncIterator[LoopbackOrchestrator]:
    """An orchestrator with the tiny model warm on its runner, on 127.0.0.1 and a free port."""
    async with loopback_orchestrator(model, price=PRICE, capacity=2, **overrides) as running:
        yield running


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
