"""What a node offers (spec 4.5): its devices, its load and its claimed speed, in `info`,
refreshed on an open connection with `info_request`."""

from __future__ import annotations

import random
import secrets
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from broadcaster.discovery import Discovery
from broadcaster.failover import JobRunner
from broadcaster.job_control import JobControl
from broadcaster.metrics_store import MetricsStore
from broadcaster.selection import SelectionConfig
from broadcaster.session import BroadcasterSession
from pipelines.loader import LoadedModel
from pipelines.tiny import TINY_SD
from protocol.job_events import JobError, JobResult, PaymentSent
from protocol.messages import TextToImageParams
from stepstream.processes import model_entry, orchestrator_process
from tests.failover_helpers import TEST_POLICY, small
from tests.gateway_helpers import gateway_on_loopback
from tests.loopback import FaultPlan, loopback_orchestrator

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
        # `stepstream generate` filters by hardware and refuses an unmeetable deadline,
        # before any job is sent (so before any payment).
        out = tmp_path / "out.png"
        vram = generate(orch.url, out, "--min-vram", "8")
        assert vram.returncode == 1, vram.stderr
        assert "no_orchestrator" in vram.stderr and "at least 8 GiB of VRAM" in vram.stderr
        assert "cpu: cpu" in vram.stderr
        late = generate(orch.url, out, "--gpu", "CPU", "--deadline", "0.001")
        assert late.returncode == 1, late.stderr
        assert "deadline_unmeetable" in late.stderr
        assert f"the fastest, {orch.url}, is projected to finish in" in late.stderr
        bad = generate(orch.url, out, "--min-vram", "lots")
        assert bad.returncode == 2 and "--min-vram" in bad.stderr
        assert not out.exists()


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


def generate(url: str, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable, "-m", "stepstream", "generate", "--orchestrator", url,
            "--model", TINY_SD, "--prompt", "a lighthouse", "--width", "64", "--height", "64",
            "--steps", "4", "--out", str(out), *extra,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )  # fmt: skip


async def test_a_node_claiming_twice_its_speed_loses_jobs_to_an_honest_one(
    tiny_model: LoadedModel,
) -> None:
    """Spec M5, 4.5: two nodes claim the same speed (the same model, timed at load on the same
    machine), but one is made slower than it claims (runner fault `step_seconds`). Both are
    tried first, by their claims; then the one delivering far less than it claims is marked
    down, the mark is in the metrics store, and every later job goes to the honest one."""
    async with (
        loopback_orchestrator(tiny_model) as honest,
        loopback_orchestrator(tiny_model) as liar,
    ):
        # 3 s more per step: under half the honest speed unless a step already takes 6 s.
        liar.plan = FaultPlan(step_seconds=3.0)
        metrics = MetricsStore()
        discovery = Discovery([honest.url, liar.url], secrets.token_bytes(32))
        runner = JobRunner(
            discovery,
            secrets.token_bytes(32),
            metrics=metrics,
            selection=SelectionConfig(explore=1.0),  # the unmeasured are always tried first
            policy=TEST_POLICY,
            rng=random.Random(3),
        )
        chosen = []
        for _ in range(5):
            control = JobControl()
            job = runner.generate(small(2), model_id=TINY_SD, preview_every=2, control=control)
            events = [e async for e in job]
            assert isinstance(events[-1], JobResult), events[-1]
            chosen.append(control.url)
        assert sorted(chosen[:2]) == sorted([honest.url, liar.url])  # each tried once
        assert chosen[2:] == [honest.url] * 3
        assert metrics.marked_down(TINY_SD) == [liar.url]
        assert not metrics.get(honest.url, TINY_SD).marked_down


async def test_an_unmeetable_deadline_is_refused_before_payment(tiny_model: LoadedModel) -> None:
    """Spec M6: no offer is projected to make the deadline: the job fails at once with
    `deadline_unmeetable`, naming the fastest offer; no job reached the node, nothing paid."""
    async with loopback_orchestrator(tiny_model) as lo:
        discovery = Discovery([lo.url], secrets.token_bytes(32))
        runner = JobRunner(discovery, secrets.token_bytes(32), policy=TEST_POLICY)
        events = [
            e
            async for e in runner.generate(
                small(8), model_id=TINY_SD, preview_every=2, deadline=0.001
            )
        ]
        (error,) = events
        assert isinstance(error, JobError) and error.code == "deadline_unmeetable"
        assert f"the fastest, {lo.url}, is projected to finish in" in error.message
        assert not [e for e in events if isinstance(e, PaymentSent)]
        assert lo.orch.stats.jobs_accepted == 0 and lo.orch.stats.jobs_refused == 0
        assert lo.orch.stats.tickets_received == 0


async def test_the_offers_route_filters_by_hardware(
    tiny_model: LoadedModel, tmp_path: Path
) -> None:
    """GET /offers?min_vram=&gpu= narrows the list to nodes on that hardware (a CPU node has
    no VRAM); a bad figure is a 400 with a code."""
    async with (
        loopback_orchestrator(tiny_model) as lo,
        gateway_on_loopback([lo.url], tmp_path) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=60) as client,
    ):
        every = (await client.get("/offers")).json()
        assert [o["gpus"] for o in every["offers"]] == [["cpu"]]
        assert every["hardware"] == "any hardware"
        assert (await client.get("/offers", params={"min_vram": "1"})).json()["offers"] == []
        assert (await client.get("/offers", params={"gpu": "a100"})).json()["offers"] == []
        cpu = (await client.get("/offers", params={"gpu": "cpu"})).json()
        assert len(cpu["offers"]) == 1 and "a GPU matching 'cpu'" in cpu["hardware"]
        bad = await client.get("/offers", params={"min_vram": "lots"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request"
