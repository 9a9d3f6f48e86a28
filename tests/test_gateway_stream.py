"""Following gateway jobs live: WebSocket and SSE streams, cancel, slow subscribers."""

from __future__ import annotations

import base64
import io
import json
import logging
import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from PIL import Image
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from broadcaster.gateway.app import HEARTBEAT_SECONDS
from broadcaster.gateway.hub import SUPERSEDING, JobStream
from broadcaster.gateway.jobs import GatewayJob
from broadcaster.gateway.requests import TextToImageRequest
from broadcaster.gateway.streams import preview_frame
from pipelines.loader import LoadedModel
from protocol.messages import TextToImageParams
from tests.conftest import PRICE, RunningOrchestrator, orchestrator_on_loopback
from tests.gateway_helpers import gateway_on_loopback, sse_events, ws_events

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
    assert accepted["fee_wei"] == str(64 * 64 * STEPS * PRICE)  # exact: a decimal string
    assert accepted["price_per_pixel_step_wei"] == str(PRICE)

    previews = [e for e in events if e["type"] == "preview"]
    assert len(previews) == math.ceil(STEPS / EVERY)
    assert [p["step"] for p in previews] == [2, 4, 6, 7]
    for p in previews:
        if "image_bytes" in p:  # WebSocket: a binary frame
            data = p["image_bytes"]
        else:  # SSE: a data URL
            head, text = p["image"].split(",", 1)
            assert head == f"data:image/{p['format']};base64"
            data = base64.b64decode(text)
        Image.open(io.BytesIO(data)).verify()

    progress = [e for e in events if e["type"] == "progress"]
    assert [e["step"] for e in progress] == sorted(e["step"] for e in progress)
    assert progress[-1]["step"] == progress[-1]["total_steps"] == STEPS
    assert progress[-1]["eta_seconds"] in (0, 0.0, None)
    assert all(e["steps_per_second"] >= 0 for e in progress)

    payments = [e for e in events if e["type"] == "payment"]
    assert all(isinstance(p["ev_paid_wei"], str) for p in payments)
    paid = [int(p["ev_paid_wei"]) for p in payments]
    assert paid == sorted(paid)
    # C4's one ticket: the dearer of the job's and its first window's (spec 8.11).
    one_ticket = max(
        (now - before) / p["tickets"]
        for p, now, before in zip(payments, paid, [0, *paid[:-1]], strict=True)
    )
    fee = int(accepted["fee_wei"])
    assert fee <= paid[-1] <= fee + one_ticket * 1.000001
    assert int(result["ev_paid_wei"]) == paid[-1] and result["fee_wei"] == accepted["fee_wei"]
    assert result["tickets_sent"] == payments[-1]["tickets_total"]
    assert result["steps"] == STEPS and result["images"][0]["seed"] == 5
    assert abs(running.orch.stats.ev_received - paid[-1]) <= Fraction(1, 2)  # to the wei


async def test_websocket_follows_a_job_from_accepted_to_result(
    running: RunningOrchestrator, tmp_path: Path
) -> None:
    async with (
        gateway_on_loopback([running.url], tmp_path) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=60) as client,
    ):
        job = await submit(client, job_body())
        ws_url = gw.url.replace("http://", "ws://") + job["ws_url"]
        with anyio.fail_after(60):
            async with connect(ws_url) as ws:
                # The gateway closes after the terminal event.
                events = [e async for e in ws_events(ws)]
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
                async for event in ws_events(ws):
                    events.append(event)
                    if event["type"] == "preview" and event["step"] == 1:
                        await ws.send(json.dumps({"type": "cancel"}))
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


async def test_sse_numbers_events_and_resumes_after_last_event_id(
    running: RunningOrchestrator, tmp_path: Path
) -> None:
    async with (
        gateway_on_loopback([running.url], tmp_path) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=60) as client,
    ):
        job = await submit(client, job_body())
        async with client.stream("GET", job["events_url"]) as response:
            first_line = await anext(response.aiter_lines())
        assert first_line == "retry: 3000"  # how long a browser waits to reconnect

        # Read until the first preview, drop the connection, resume from the last id.
        with anyio.fail_after(60):
            before = []
            async for event in sse_events(client, job["events_url"]):
                before.append(event)
                if event["type"] == "preview":
                    break
            last = before[-1]["_id"]
            after = [e async for e in sse_events(client, job["events_url"], last_event_id=last)]
        ids = [e["_id"] for e in before + after]
        assert ids == sorted(set(ids)) and after[0]["_id"] > last
        kept = [e["type"] for e in before + after if e["type"] not in SUPERSEDING]
        assert kept == ["orchestrator_changed", "accepted", "result"]  # none missed or repeated
        assert after[-1]["type"] == "result" and after[-1]["steps"] == STEPS

        # The job has ended: resuming after `accepted` replays what followed it, coalesced.
        whole = [e async for e in sse_events(client, job["events_url"])]
        accepted_id = next(e["_id"] for e in whole if e["type"] == "accepted")
        tail = [e async for e in sse_events(client, job["events_url"], accepted_id)]
        # (the latest progress, preview and payment, in the order they were published)
        assert sorted(e["type"] for e in tail) == ["payment", "preview", "progress", "result"]
        assert all(e["_id"] > accepted_id for e in tail) and tail[-1]["type"] == "result"
        assert tail == [e for e in whole if e["_id"] > accepted_id]
        assert [e async for e in sse_events(client, job["events_url"], whole[-1]["_id"])] == []
        bad = await client.get(job["events_url"], headers={"Last-Event-ID": "yesterday"})
        assert bad.status_code == 400 and "Last-Event-ID" in bad.json()["error"]["message"]


async def test_sse_sends_a_heartbeat_while_a_job_is_silent(
    running: RunningOrchestrator, tmp_path: Path
) -> None:
    async with (
        gateway_on_loopback([running.url], tmp_path, heartbeat_seconds=0.05) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=60) as client,
    ):
        # A job that publishes nothing until the test says so.
        request = TextToImageRequest(prompt="x")
        job = GatewayJob("silent", request, TextToImageParams(prompt="x"), gw.url + "/")
        gw.gateway.jobs.jobs[job.job_id] = job
        lines = []
        with anyio.fail_after(30):
            async with client.stream("GET", "/jobs/silent/events") as response:
                async for line in response.aiter_lines():
                    lines.append(line)
                    if line == ": heartbeat" and lines.count(line) == 2:
                        job.stream.publish({"type": "error", "code": "cancelled"})
        assert lines[0] == "retry: 3000"
        assert lines.count(": heartbeat") >= 2  # one per quiet interval, until the event
        event = ["id: 1", "event: error", 'data: {"type": "error", "code": "cancelled"}']
        assert event in [lines[i : i + 3] for i in range(len(lines))]
    assert HEARTBEAT_SECONDS <= 15


async def test_websocket_previews_are_binary_frames_and_unknown_jobs_an_error_event(
    tiny_model: LoadedModel, tmp_path: Path
) -> None:
    frame = preview_frame({"format": "webp", "image": "data:image/webp;base64,AAEC"})
    assert frame == b"\x00\x00\x00\x01" + b"\x00\x00\x00\x03" + b"\x00\x01\x02"
    assert preview_frame({"format": "png", "image": "data:image/png;base64,AA=="})[4:8] == (
        b"\x00\x00\x00\x02"
    )
    async with (
        orchestrator_on_loopback(tiny_model) as running,
        gateway_on_loopback([running.url], tmp_path, token="s3cret") as gw,
    ):
        base = gw.url.replace("http://", "ws://")
        with anyio.fail_after(30):
            async with connect(f"{base}/jobs/no-such-job/ws?token=s3cret") as ws:
                error = json.loads(await ws.recv())
                with pytest.raises(ConnectionClosed):
                    await ws.recv()
            assert ws.close_code == 4404
            assert error["type"] == "error" and error["code"] == "unknown_job"
            assert error["status"] == 404 and "no-such-job" in error["message"]
            async with connect(f"{base}/jobs/no-such-job/ws") as ws:
                error = json.loads(await ws.recv())
                with pytest.raises(ConnectionClosed):
                    await ws.recv()
            assert ws.close_code == 4401 and error["code"] == "unauthorized"
