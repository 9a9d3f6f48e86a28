"""Following gateway jobs live: WebSocket and SSE streams, cancel, slow subscribers."""

from __future__ import annotations

import base64
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from PIL import Image
from websockets.asyncio.client import connect

from broadcaster.gateway.hub import JobStream
from pipelines.loader import LoadedModel
from tests.conftest import PRICE, RunningOrchestrator, orchestrator_on_loopback
from tests.gateway_helpers import gateway_on_loopback, sse_events

pytestmark = pytest.mark.anyio

STEPS, EVERY = 7, 2


def job_body(steps: int = STEPS, every: int = EVERY) -> dict[str, Any]:
    return {
        "prompt": "a lighthouse",
        "width": 64,
        "height": 64,
        "num_inference_steps": steps,
        "preview_every": every,
        "seed": 5,
    }


async def submit(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post("/jobs/text-to-image?wait_for_subscriber=1", json=body)
    assert response.status_code == 202, response.text
    return response.json()


def check_job_events(events: list[dict[str, Any]], running: RunningOrchestrator) -> None:
    """accepted .. result, ceil(steps/N) previews in order, cost = fee within one ticket."""
    types = [e["type"] for e in events]
    assert types[0] == "orchestrator_changed" and events[0]["url"] == running.url
    assert events[0]["address"].lower() == running.orch.address.lower()
    assert types[1] == "accepted" and types[-1] == "result"
    assert types.count("accepted") == 1 and types.count("result") == 1
    accepted, result = events[1], events[-1]
    assert accepted["steps"] == STEPS
    assert accepted["fee_wei"] == float(64 * 64 * STEPS * PRICE)

    previews = [e for e in events if e["type"] == "preview"]
    assert len(previews) == math.ceil(STEPS / EVERY)
    assert [p["step"] for p in previews] == [2, 4, 6, 7]
    for p in previews:
        head, data = p["image"].split(",", 1)
        assert head == f"data:image/{p['format']};base64"
        Image.open(io.BytesIO(base64.b64decode(data))).verify()

    progress = [e for e in events if e["type"] == "progress"]
    assert [e["step"] for e in progress] == sorted(e["step"] for e in progress)
    assert progress[-1]["step"] == progress[-1]["total_steps"] == STEPS
    assert progress[-1]["eta_seconds"] in (0, 0.0, None)
    assert all(e["steps_per_second"] >= 0 for e in progress)

    payments = [e for e in events if e["type"] == "payment"]
    paid = [p["ev_paid_wei"] for p in payments]
    assert paid == sorted(paid)
    one_ticket = paid[0] / payments[0]["tickets"]
    fee = accepted["fee_wei"]
    assert fee <= paid[-1] <= fee + one_ticket * 1.000001
    assert result["ev_paid_wei"] == paid[-1] and result["fee_wei"] == fee
    assert result["tickets_sent"] == payments[-1]["tickets_total"]
    assert result["steps"] == STEPS and result["images"][0]["seed"] == 5
    assert running.orch.stats.ev_received == pytest.approx(paid[-1], rel=1e-9)


async def test_websocket_follows_a_job_from_accepted_to_result(
    running: RunningOrchestrator, tmp_path: Path
) -> None:
    async with (
        gateway_on_loopback([running.url], tmp_path) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=60) as client,
    ):
        job = await submit(client, job_body())
        ws_url = gw.url.replace("http://", "ws://") + job["ws_url"]
        events = []
        with anyio.fail_after(60):
            async with connect(ws_url) as ws:
                async for message in ws:  # the gateway closes after the terminal event
                    events.append(json.loads(message))
        check_job_events(events, running)
        # The result's URL serves the PNG, and the job's status says it is done.
        image = await client.get(events[-1]["images"][0]["url"])
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
        status = (await client.get(job["status_url"])).json()
        assert status["state"] == "result" and status["orchestrator"] == running.url


async def test_sse_follows_a_job_from_accepted_to_result(
    running: RunningOrchestrator, tmp_path: Path
) -> None:
    async with (
        gateway_on_loopback([running.url], tmp_path) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=60) as client,
    ):
        job = await submit(client, job_body())
        with anyio.fail_after(60):
            events = [e async for e in sse_events(client, job["events_url"])]
        check_job_events(events, running)


async def test_cancel_by_websocket_message_and_by_delete(
    tiny_model: LoadedModel, tmp_path: Path
) -> None:
    long = job_body(steps=400, every=1)
    async with (
        orchestrator_on_loopback(tiny_model) as running,
        gateway_on_loopback([running.url], tmp_path) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=60) as client,
    ):
        # By message on the job's WebSocket.
        job = await submit(client, long)
        ws_url = gw.url.replace("http://", "ws://") + job["ws_url"]
        with anyio.fail_after(60):
            async with connect(ws_url) as ws:
                events = []
                async for message in ws:
                    events.append(json.loads(message))
                    if events[-1]["type"] == "preview":
                        await ws.send(json.dumps({"type": "cancel"}))
                        break
                async for message in ws:
                    events.append(json.loads(message))
        assert events[-1]["type"] == "error" and events[-1]["code"] == "cancelled"

        # By DELETE, followed over SSE.
        job = await submit(client, long)
        events = []
        with anyio.fail_after(60):
            async for event in sse_events(client, job["events_url"]):
                events.append(event)
                if event["type"] == "preview" and event["step"] == 1:
                    response = await client.delete(job["status_url"])
                    assert response.status_code == 202
        assert events[-1]["type"] == "error" and events[-1]["code"] == "cancelled"
        assert all(o.steps_executed < 400 for o in running.orch.stats.outcomes)
        assert [o.terminal for o in running.orch.stats.outcomes] == ["cancelled", "cancelled"]


def test_a_slow_subscriber_gets_the_latest_preview_not_a_backlog() -> None:
    stream = JobStream()
    sub = stream.subscribe()
    stream.publish({"type": "orchestrator_changed", "url": "ws://o"})
    stream.publish({"type": "accepted", "steps": 1000})
    for step in range(1, 1001):
        stream.publish({"type": "progress", "step": step})
        stream.publish({"type": "preview", "step": step, "image": "x" * 1000})
        stream.publish({"type": "payment", "ev_paid_wei": step})
    # A thousand steps later the subscriber that read nothing holds five events, not 3002.
    assert sub.pending == 5
    assert sub.dropped == 2997
    late = stream.subscribe()  # a late subscriber gets the same short replay
    assert late.pending == 5
    stream.publish({"type": "result", "images": []})

    async def drain(s: Any) -> list[dict[str, Any]]:
        return [e async for e in _events(s)]

    for s in (sub, late):
        events = anyio.run(drain, s)
        assert [e["type"] for e in events] == [
            "orchestrator_changed",
            "accepted",
            "progress",
            "preview",
            "payment",
            "result",
        ]
        assert events[2]["step"] == events[3]["step"] == events[4]["ev_paid_wei"] == 1000
    stream.publish({"type": "preview", "step": 1001})  # after the end: ignored
    assert stream.subscribe().pending == 6


async def _events(sub: Any) -> Any:
    while (event := await sub.next()) is not None:
        yield event


async def test_every_gateway_log_line_of_a_job_names_it(
    running: RunningOrchestrator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with (
        gateway_on_loopback([running.url], tmp_path) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=60) as client,
    ):
        job = await submit(client, job_body())
        with anyio.fail_after(60):
            events = [e async for e in sse_events(client, job["events_url"])]
    assert events[-1]["type"] == "result"
    job_lines = [r for r in caplog.records if r.name.startswith(("broadcaster.gateway", "orch"))]
    mine = [r for r in job_lines if job["job_id"] in (r.job_id, r.getMessage())]
    assert len(mine) >= 4  # running on, accepted, result, ended; the orchestrator's lines too
    for record in job_lines:
        if record.name == "broadcaster.gateway.jobs":
            assert record.job_id == job["job_id"], record.getMessage()
    orch_lines = [r for r in job_lines if r.name == "orchestrator.server"]
    assert orch_lines and all(r.job_id == job["job_id"] for r in orch_lines)
