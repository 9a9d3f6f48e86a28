"""Apps get failover through the gateway: one job stream, the move told, the money counted.

A faulty orchestrator (orchestrator/testing.py) that the gateway's selection
tries first breaks after step 4; the job finishes on a good one. The app
sees an `orchestrator_changed` event between progress events, the cost so
far includes what the first orchestrator was paid, and the gateway's
failovers counter moves.
"""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from PIL import Image

from pipelines.loader import LoadedModel
from pipelines.tiny import TINY_SD
from tests.gateway_helpers import gateway_on_loopback, sse_events
from tests.loopback import FaultPlan, WireFaults, loopback_orchestrator
from tests.test_image_pipelines import image_bytes
from tests.test_metrics import scrape, value

pytestmark = pytest.mark.anyio

STEPS, EVERY, FAULT_AT = 8, 2, 4
FAILOVERS = "stepstream_gateway_failovers_total"


def split_at_move(events: list[dict[str, Any]]) -> tuple[list, dict[str, Any], list]:
    moves = [i for i, e in enumerate(events) if e["type"] == "orchestrator_changed"]
    assert len(moves) == 2, [e["type"] for e in events]  # the selection, then the move
    i = moves[1]
    return events[:i], events[i], events[i + 1 :]


async def test_sse_job_moves_to_a_good_orchestrator_and_counts_both_payments(
    tiny_model: LoadedModel, tmp_path: Path
) -> None:
    async with (
        loopback_orchestrator(tiny_model, wire=WireFaults(close_after=FAULT_AT)) as bad,
        loopback_orchestrator(tiny_model) as good,
        gateway_on_loopback([bad.url, good.url], tmp_path, first=bad.url) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=60) as client,
    ):
        before = await scrape(client, "/metrics")
        body = {
            "prompt": "a lighthouse",
            "model_id": TINY_SD,
            "width": 64,
            "height": 64,
            "num_inference_steps": STEPS,
            "preview_every": EVERY,
            "seed": 5,
        }
        response = await client.post("/jobs/text-to-image?wait_for_subscriber=1", json=body)
        assert response.status_code == 202, response.text
        job = response.json()
        with anyio.fail_after(60):
            events = [e async for e in sse_events(client, job["events_url"])]
        after_metrics = await scrape(client, "/metrics")
        status = (await client.get(job["status_url"])).json()

    assert bad.fired == ["close"]
    first, move, rest = split_at_move(events)
    assert first[0]["type"] == "orchestrator_changed" and first[0]["reason"] == "selected"
    assert first[0]["url"] == bad.url
    assert first[0]["address"].lower() == bad.orch.address.lower()
    assert move["url"] == good.url and move["previous"] == bad.url
    assert move["address"].lower() == good.orch.address.lower()
    assert move["reason"] == "disconnect" and move["resumed"] is True
    assert move["from_step"] == FAULT_AT == move["previous_delivered_steps"]
    assert status["orchestrator"] == good.url and status["state"] == "result"

    # Between progress events: steps up to the fault before, the rest after.
    before_steps = [e["step"] for e in first if e["type"] == "progress"]
    after_steps = [e["step"] for e in rest if e["type"] == "progress"]
    assert before_steps and max(before_steps) == FAULT_AT
    assert after_steps and min(after_steps) > FAULT_AT and after_steps[-1] == STEPS
    assert all(e["total_steps"] == STEPS for e in first + rest if e["type"] == "progress")
    assert [e["type"] for e in rest if e["type"] == "accepted"] == ["accepted"]
    assert rest[-1]["type"] == "result" and rest[-1]["steps"] == STEPS

    # The cost so far keeps what the first orchestrator was paid; the result is
    # what both received, and the fee counts the steps each one delivered.
    result = rest[-1]
    received = bad.orch.stats.ev_received + good.orch.stats.ev_received
    # Wei are exact decimal strings, rounded to the nearest wei.
    assert int(move["previous_paid_wei"]) == round(bad.orch.stats.ev_received) > 0
    assert abs(int(result["ev_paid_wei"]) - received) <= 1
    payments_after = [e for e in rest if e["type"] == "payment"]
    assert payments_after and all(
        int(p["ev_paid_wei"]) > int(move["previous_paid_wei"]) for p in payments_after
    )
    assert payments_after[-1]["ev_paid_wei"] == result["ev_paid_wei"]
    assert payments_after[-1]["tickets_total"] == result["tickets_sent"]
    quotes = [e for e in first + rest if e["type"] == "accepted"]
    step_fee = Fraction(quotes[0]["fee_wei"]) / quotes[0]["steps"]
    assert quotes[1]["steps"] == STEPS - FAULT_AT
    assert abs(int(result["fee_wei"]) - (step_fee * FAULT_AT + int(quotes[1]["fee_wei"]))) <= 1

    assert value(after_metrics, FAILOVERS) - value(before, FAILOVERS) == 1
    job_labels = {"pipeline": "text-to-image", "model": TINY_SD}
    steps = "stepstream_gateway_steps_total"
    assert value(after_metrics, steps, **job_labels) - value(before, steps, **job_labels) == STEPS


async def test_livepeer_routes_succeed_across_a_failover(
    tiny_model: LoadedModel, tmp_path: Path
) -> None:
    """The REST call answers as if nothing happened: text-to-image and image-to-image
    both resume from the last step delivered."""
    pipelines = ("text-to-image", "image-to-image")
    async with (
        loopback_orchestrator(tiny_model, FaultPlan(error_after=2), pipelines=pipelines) as bad,
        loopback_orchestrator(tiny_model, pipelines=pipelines) as good,
        gateway_on_loopback([bad.url, good.url], tmp_path, first=bad.url) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=60) as client,
    ):
        before = await scrape(client, "/metrics")
        t2i = {"prompt": "a lighthouse", "width": 64, "height": 64, "num_inference_steps": 4}
        t2i["preview_every"] = 2
        response = await client.post("/text-to-image", json={**t2i, "seed": 3})
        assert response.status_code == 200, response.text
        png = await client.get(response.json()["images"][0]["url"])
        assert png.content.startswith(b"\x89PNG")

        gw.gateway.runner.suspensions.clear(bad.url)  # the bad one is tried first again
        form = {
            "prompt": "the same in winter",
            "model_id": TINY_SD,
            "strength": "0.5",
            "num_inference_steps": "8",  # int(8 x 0.5) = 4 executed steps
            "seed": "7",
            "preview_every": "2",
        }
        upload = {"image": ("in.png", image_bytes(64, 48), "image/png")}
        response = await client.post("/image-to-image", data=form, files=upload)
        assert response.status_code == 200, response.text
        media = response.json()["images"]
        assert len(media) == 1 and media[0]["seed"] == 7
        png = await client.get(media[0]["url"])
        with Image.open(io.BytesIO(png.content)) as img:
            assert img.format == "PNG" and img.size == (64, 48)
        after = await scrape(client, "/metrics")

    assert bad.fired == ["error", "error"]
    assert value(after, FAILOVERS) - value(before, FAILOVERS) == 2
    outcomes = good.orch.stats.outcomes
    assert [o.terminal for o in outcomes] == ["result", "result"]
    # Both resumed after step 2: 2 steps left of 4 (image-to-image: within its tail).
    assert [o.steps_executed for o in outcomes] == [2, 2]
    for pipeline in pipelines:
        labels = {"pipeline": pipeline, "model": TINY_SD, "outcome": "success"}
        name = "stepstream_gateway_jobs_total"
        assert value(after, name, **labels) - value(before, name, **labels) == 1
