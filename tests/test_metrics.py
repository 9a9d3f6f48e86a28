"""Prometheus endpoints of gateway and orchestrator, scraped after a job."""

from __future__ import annotations

import base64
from pathlib import Path

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipelines.tiny import TINY_SD
from tests.conftest import RunningOrchestrator
from tests.gateway_helpers import gateway_on_loopback, sse_events

pytestmark = pytest.mark.anyio

STEPS, EVERY = 6, 2


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(scraped: dict, name: str, **labels: str) -> float:
    return scraped.get((name, frozenset(labels.items())), 0.0)


async def scrape(client: httpx.AsyncClient, url: str) -> dict:
    response = await client.get(url)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return samples(response.text)


async def test_metrics_move_by_one_job(running: RunningOrchestrator, tmp_path: Path) -> None:
    orch_metrics = running.url.replace("ws://", "http://") + "/metrics"
    async with (
        gateway_on_loopback([running.url], tmp_path) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=60) as client,
    ):
        before_g = await scrape(client, "/metrics")
        before_o = await scrape(client, orch_metrics)
        body = {
            "prompt": "a lighthouse",
            "model_id": TINY_SD,
            "width": 64,
            "height": 64,
            "num_inference_steps": STEPS,
            "preview_every": EVERY,
        }
        job = (await client.post("/jobs/text-to-image?wait_for_subscriber=1", json=body)).json()
        with anyio.fail_after(60):
            events = [e async for e in sse_events(client, job["events_url"])]
        result = events[-1]
        assert result["type"] == "result"
        preview_bytes = sum(
            len(base64.b64decode(e["image"].split(",", 1)[1]))
            for e in events
            if e["type"] == "preview"
        )
        g = await scrape(client, "/metrics")
        o = await scrape(client, orch_metrics)

    def moved(after: dict, before: dict, name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    job = {"pipeline": "text-to-image", "model": TINY_SD}
    # Gateway: one successful job, its steps, previews, tickets and EV.
    assert moved(g, before_g, "stepstream_gateway_jobs_total", **job, outcome="success") == 1
    assert moved(g, before_g, "stepstream_gateway_steps_total", **job) == STEPS
    assert moved(g, before_g, "stepstream_gateway_previews_total", **job) == 3
    assert moved(g, before_g, "stepstream_gateway_preview_bytes_total", **job) == preview_bytes
    assert moved(g, before_g, "stepstream_gateway_tickets_sent_total") == result["tickets_sent"]
    assert moved(g, before_g, "stepstream_gateway_ev_paid_wei_total") == pytest.approx(
        int(result["ev_paid_wei"]), abs=1
    )
    for hist in ("time_to_first_preview_seconds", "steps_per_second"):
        assert moved(g, before_g, f"stepstream_gateway_{hist}_count", **job) == 1
    # One observation per progress report after the first.
    assert moved(g, before_g, "stepstream_gateway_step_duration_seconds_count", **job) >= 1
    assert moved(g, before_g, "stepstream_gateway_failovers_total") == 0

    # Orchestrator: the same job, steps, previews, tickets and EV from its side.
    assert moved(o, before_o, "stepstream_orchestrator_jobs_total", **job, outcome="result") == 1
    assert moved(o, before_o, "stepstream_orchestrator_steps_total", **job) == STEPS
    assert moved(o, before_o, "stepstream_orchestrator_preview_bytes_total", **job) == (
        preview_bytes
    )
    assert (
        moved(o, before_o, "stepstream_orchestrator_tickets_received_total")
        == (result["tickets_sent"])
    )
    assert moved(o, before_o, "stepstream_orchestrator_ev_received_wei_total") == pytest.approx(
        int(result["ev_paid_wei"]), abs=1
    )
    assert moved(o, before_o, "stepstream_orchestrator_tickets_won_total") == len(
        running.orch.stats.winners
    )
    assert moved(o, before_o, "stepstream_orchestrator_step_duration_seconds_count", **job) == 1
    # Declared, not yet moved by anything: present at zero.
    for name in ("redemptions_total", "runner_restarts_total"):
        assert (f"stepstream_orchestrator_{name}", frozenset()) in o
