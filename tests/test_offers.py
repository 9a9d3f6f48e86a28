"""What a node offers (spec 4.5): its devices, its load and its claimed speed, in `info`,
refreshed on an open connection with `info_request`."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from broadcaster.session import BroadcasterSession
from pipelines.loader import LoadedModel
from pipelines.tiny import TINY_SD
from protocol.messages import TextToImageParams
from stepstream.processes import model_entry, orchestrator_process
from tests.loopback import loopback_orchestrator

pytestmark = pytest.mark.anyio


async def test_a_real_orchestrator_says_what_it_runs_on(tmp_path: Path) -> None:
    """Through the real processes: a CPU node says `cpu` and claims no VRAM; its warm model
    carries the step time its runner measured at load; `info_request` refreshes it."""
    with orchestrator_process(tmp_path, [model_entry(capacity=1)]) as orch:
        async with BroadcasterSession(orch.url, secrets.token_bytes(32)) as session:
            info = session.info
            assert info is not None and "info_request" in info.features
            (device,) = info.devices
            assert (device.name, device.gpu) == ("cpu", "cpu")
            assert device.vram_total is None and device.vram_free is None
            assert device.models == (TINY_SD,)
            (cap,) = info.capabilities
            assert cap.warm and cap.capacity == 1 and cap.in_use == 0 and cap.queued == 0
            assert cap.load_seconds is not None
            assert cap.step_seconds is not None and cap.step_seconds > 0
            assert cap.step_pixels == 64 * 64  # tiny-sd's default size, one image
            fresh = await session.refresh_info()
            assert fresh.devices == info.devices
            assert fresh.capabilities[0].step_seconds == cap.step_seconds
            assert fresh.ticket_params.seed != info.ticket_params.seed  # a new info, not a copy


async def test_info_request_shows_the_load_of_now(tiny_model: LoadedModel) -> None:
    """A job running on one connection shows as `in_use` in the info another connection
    asks for again, without reconnecting; and as free once it ended."""
    async with loopback_orchestrator(tiny_model, capacity=2) as lo:
        key = secrets.token_bytes(32)
        async with (
            BroadcasterSession(lo.url, key) as watcher,
            BroadcasterSession(lo.url, key) as worker,
        ):
            assert watcher.info is not None
            assert watcher.info.capabilities[0].in_use == 0
            params = TextToImageParams(prompt="p", width=64, height=64, num_inference_steps=4)
            seen = []
            async for event in worker.generate(params, model_id=TINY_SD):
                if type(event).__name__ == "ProgressUpdate" and not seen:
                    seen.append((await watcher.refresh_info()).capabilities[0].in_use)
            assert seen == [1]
            assert (await watcher.refresh_info()).capabilities[0].in_use == 0
