"""`stepstream.client` against a real gateway on loopback, in front of a real orchestrator."""

from __future__ import annotations

import io
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import anyio
import pytest
from PIL import Image

from pipelines.tiny import TINY_SD
from stepstream.client import (
    Accepted,
    Error,
    GatewayClient,
    GatewayError,
    OrchestratorChanged,
    Payment,
    Preview,
    Progress,
    Result,
    Submitted,
)
from tests.conftest import PRICE, RunningOrchestrator
from tests.gateway_helpers import gateway_on_loopback

pytestmark = pytest.mark.anyio

JOB = {"prompt": "a lighthouse", "width": 64, "height": 64, "num_inference_steps": 6,
       "preview_every": 2, "seed": 4}  # fmt: skip


async def test_stream_yields_typed_events_from_submitted_to_result(
    running: RunningOrchestrator, tmp_path: Path
) -> None:
    async with (
        gateway_on_loopback([running.url], tmp_path, token="s3cret") as gw,
        GatewayClient(gw.url, token="s3cret") as client,
    ):
        with anyio.fail_after(60):
            events = [e async for e in client.stream("text-to-image", JOB)]
            result = events[-1]
            assert isinstance(result, Result)
            png = await client.download(result.images[0])
            offers = await client.offers()
    assert isinstance(events[0], Submitted) and events[0].job_id in gw.gateway.jobs.jobs
    changed = events[1]
    assert isinstance(changed, OrchestratorChanged) and changed.url == running.url
    assert changed.reason == "selected" and changed.address is not None
    accepted = events[2]
    assert isinstance(accepted, Accepted) and accepted.steps == 6 and accepted.seed == 4
    assert accepted.price_per_pixel_step_wei == PRICE  # exact, a Fraction
    assert accepted.fee_wei == 64 * 64 * 6 * PRICE
    previews = [e for e in events if isinstance(e, Preview)]
    assert [p.step for p in previews] == [2, 4, 6]
    for preview in previews:
        with Image.open(io.BytesIO(preview.image)) as img:
            assert img.format.lower() == preview.format and img.size == (64, 64)
    progress = [e for e in events if isinstance(e, Progress)]
    assert progress[-1].step == progress[-1].total_steps == 6
    payments = [e for e in events if isinstance(e, Payment)]
    assert payments and isinstance(payments[-1].ev_paid_wei, int)
    assert result.ev_paid_wei == payments[-1].ev_paid_wei >= result.fee_wei == accepted.fee_wei
    assert abs(result.ev_paid_wei - running.orch.stats.ev_received) <= Fraction(1, 2)
    assert result.steps == 6 and result.images[0].seed == 4
    with Image.open(io.BytesIO(png)) as img:
        assert img.size == (64, 64) and "Seed: 4" in img.info["parameters"]
    assert offers[0]["model_id"] == TINY_SD


async def test_refusals_raise_and_failed_jobs_end_with_an_error_event(
    running: RunningOrchestrator, tmp_path: Path
) -> None:
    async with gateway_on_loopback([running.url], tmp_path, token="s3cret") as gw:
        async with GatewayClient(gw.url) as anonymous:
            with pytest.raises(GatewayError) as refused:
                await anonymous.submit("text-to-image", JOB)
            assert refused.value.status == 401 and refused.value.code == "unauthorized"
        async with GatewayClient(gw.url, token="s3cret") as client:
            with pytest.raises(GatewayError) as bad:
                await client.submit("text-to-image", {**JOB, "num_inference_steps": 0})
            assert bad.value.status == 400 and "num_inference_steps" in bad.value.message
            with anyio.fail_after(60):
                events = [
                    e async for e in client.stream("text-to-image", {**JOB, "model_id": "nope/x"})
                ]
                assert isinstance(events[-1], Error) and events[-1].code == "unknown_model"
                assert events[-1].status == 503
                with pytest.raises(GatewayError) as failed:
                    await client.run("text-to-image", {**JOB, "model_id": "nope/x"})
                assert failed.value.code == "unknown_model"


async def test_events_resume_after_an_event_id_and_cancel_stops_a_job(
    running: RunningOrchestrator, tmp_path: Path
) -> None:
    async with (
        gateway_on_loopback([running.url], tmp_path) as gw,
        GatewayClient(gw.url) as client,
    ):
        with anyio.fail_after(60):
            job_id = await client.submit("text-to-image", JOB)
            whole = [e async for e in client.events(job_id)]
            # Following the ended job again from event 2 (its quote) replays what came after.
            tail = [e async for e in client.events(job_id, after=2)]
            assert not any(isinstance(e, OrchestratorChanged | Accepted) for e in tail)
            assert tail[-1] == whole[-1] and isinstance(tail[-1], Result)

            long = await client.submit("text-to-image", {**JOB, "num_inference_steps": 400})
            ended = None
            async for event in client.events(long):
                if isinstance(event, Preview):
                    await client.cancel(long)
                ended = event
            assert isinstance(ended, Error) and ended.code == "cancelled"
            assert (await client.status(long))["state"] == "error"


def test_the_client_loads_without_torch() -> None:
    code = "import sys, stepstream.client; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
