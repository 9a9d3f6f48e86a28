"""The path users run, under stress: `stepstream orchestrator` with its runner process, and
`stepstream generate`, each a process of its own. Bounded in count and time."""

from __future__ import annotations

import io
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import numpy as np
import pytest
from PIL import Image
from websockets.asyncio.client import connect

from broadcaster.metrics_store import MetricsStore
from broadcaster.session import BroadcasterSession
from pipelines.tiny import TINY_SD
from protocol.job_events import JobResult
from protocol.messages import (
    Cancel,
    Cancelled,
    Error,
    JobAccepted,
    JobRequest,
    Result,
    TextToImageParams,
)
from runner.faults import FAULTS_ENV, FaultPlan
from stepstream.processes import ChildServer, model_entry, orchestrator_process
from tests.test_network import RawClient

pytestmark = pytest.mark.anyio
BOUND = 60.0
"""Bound on any one wait; a hang fails the test instead of holding the suite."""

PROMPTS = {11: "a red circle", 12: "a lighthouse on a cliff at dusk, oil on canvas, a storm"}


def params(seed: int, steps: int = 4) -> TextToImageParams:
    return TextToImageParams(
        prompt=PROMPTS[seed], width=64, height=64, num_inference_steps=steps, seed=seed
    )


@pytest.fixture(scope="module")
def orchestrator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChildServer]:
    """One orchestrator process, capacity 2, one runner process."""
    entries = [model_entry(TINY_SD, capacity=2)]
    with orchestrator_process(
        tmp_path_factory.mktemp("stress"), entries, extra_args=["--runners", "1"]
    ) as child:
        yield child


async def one_job(session: BroadcasterSession, seed: int) -> bytes:
    with anyio.fail_after(BOUND):
        async for event in session.generate(params(seed), model_id=TINY_SD, preview_every=2):
            if isinstance(event, JobResult):
                return event.images[0].image
    raise AssertionError(f"job with seed {seed} ended without a result: {event}")


async def test_a_cancel_the_moment_a_job_is_accepted_never_holds_a_slot(
    orchestrator: ChildServer,
) -> None:
    async with connect(orchestrator.url) as ws:
        client = RawClient(ws)
        await client.hello()
        for i in range(100):
            job = JobRequest(
                job_id=f"c{i}",
                pipeline="text-to-image",
                model_id=TINY_SD,
                params=params(11, steps=20),
            )
            await client.send(job)
            assert isinstance(await client.recv(), JobAccepted)
            await client.send(Cancel(job_id=job.job_id))
            with anyio.fail_after(BOUND):
                while not isinstance(reply := await client.recv(), Cancelled | Error | Result):
                    pass
            assert isinstance(reply, Cancelled), reply
    async with connect(orchestrator.url) as ws:
        info = await RawClient(ws).hello()
    assert [c.in_use for c in info.capabilities] == [0]


async def test_two_jobs_at_once_on_capacity_two_never_hang_and_match_alone(
    orchestrator: ChildServer,
) -> None:
    """30 rounds of two simultaneous jobs: every image byte-equal to its seed run alone."""
    key = secrets.token_bytes(32)
    async with (
        BroadcasterSession(orchestrator.url, key) as a,
        BroadcasterSession(orchestrator.url, key) as b,
    ):
        alone = {seed: await one_job(a, seed) for seed in PROMPTS}
        for _ in range(30):
            images: dict[int, bytes] = {}

            async def run(session: BroadcasterSession, seed: int, into: dict[int, bytes]) -> None:
                into[seed] = await one_job(session, seed)

            async with anyio.create_task_group() as tg:
                tg.start_soon(run, a, 11, images)
                tg.start_soon(run, b, 12, images)
            assert images == alone


# ------------------------------------------------------------ failover across processes

STEPS, WINDOW, FREEZE_AT = 40, 4, 10


def generate(url: str, out: Path, metrics_db: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "stepstream.cli", "generate", "--orchestrator", url,
        "--model", TINY_SD, "--prompt", "a lighthouse", "--width", "64", "--height", "64",
        "--steps", str(STEPS), "--preview-every", str(WINDOW), "--seed", "5",
        "--metrics-db", str(metrics_db), "--out", str(out), *extra,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=240)


def png_pixels(path: Path) -> np.ndarray:
    with Image.open(io.BytesIO(path.read_bytes())) as img:
        return np.asarray(img.convert("RGB")).copy()


def test_a_frozen_orchestrator_is_left_and_the_job_resumes(tmp_path: Path) -> None:
    """Two `stepstream orchestrator` processes. The one running a 40-step job is frozen
    (SIGSTOP, sent by its own runner's fault plan right after step 10); `generate` moves the
    job, resumes where it was, and its image equals an uninterrupted run's."""
    freeze = FaultPlan(freeze_orchestrator_after=FREEZE_AT)
    cheap, dear = model_entry(TINY_SD, price_per_unit=1), model_entry(TINY_SD, price_per_unit=2)
    with (
        orchestrator_process(
            tmp_path, [cheap], name="frozen", env={FAULTS_ENV: freeze.to_env()}
        ) as frozen,
        orchestrator_process(tmp_path, [dear], name="healthy") as healthy,
    ):
        # Both measured fast: with a deadline, selection takes the cheapest that makes it,
        # so the job starts on the one whose runner will freeze it.
        db = tmp_path / "metrics.sqlite3"
        store = MetricsStore(db)
        for child in (frozen, healthy):
            store.record_speed(child.url, TINY_SD, 64 * 64 * 100.0)
        store.close()
        # A stall floor well above a step, even on a loaded machine: only the freeze moves it.
        moved = generate(
            f"{frozen.url},{healthy.url}",
            tmp_path / "moved.png",
            db,
            "--deadline",
            "600",
            "--stall-floor",
            "5",
        )
        assert moved.returncode == 0, moved.stderr[-3000:]
        reference = generate(healthy.url, tmp_path / "alone.png", tmp_path / "other.sqlite3")
        assert reference.returncode == 0, reference.stderr[-3000:]

    lines = re.findall(
        rf"moved from {re.escape(frozen.url)} to {re.escape(healthy.url)} \(stall\); "
        r"resumed at step (\d+)\n  .*; it delivered (\d+) steps",
        moved.stderr,
    )
    assert len(lines) == 1, moved.stderr[-3000:]
    resumed_at, delivered = (int(x) for x in lines[0])
    assert resumed_at >= FREEZE_AT - WINDOW
    # Resumed at the last step delivered: none delivered before the freeze is paid twice.
    assert resumed_at == delivered
    assert (png_pixels(tmp_path / "moved.png") == png_pixels(tmp_path / "alone.png")).all()
