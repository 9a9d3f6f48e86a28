"""A gateway safe to expose: origins, CORS, hosts, tokens, jobs in flight, labels, health, money.

spec/GATEWAY.md section 5. Each safeguard is exercised through a real
gateway on loopback in front of a real orchestrator, and the ones the
command enforces through the `stepstream gateway` process itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from fractions import Fraction
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from broadcaster.gateway.guard import host_name, is_loopback
from broadcaster.gateway.server import serving
from pipelines.tiny import TINY_SD
from stepstream.demo_gateway import gateway_process
from tests.conftest import RunningOrchestrator
from tests.gateway_helpers import gateway_on_loopback, sse_events
from tests.test_gateway_api import assert_error_shape

pytestmark = pytest.mark.anyio

EVIL = "https://evil.example"
APP = "https://app.example"
BODY = {"prompt": "a lighthouse", "width": 64, "height": 64, "num_inference_steps": 3}


def metric_lines(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name + "{")]


async def test_a_cross_origin_post_without_a_token_gets_403_and_starts_no_job(
    running: RunningOrchestrator, tmp_path: Path
) -> None:
    async with (
        gateway_on_loopback([running.url], tmp_path) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=60) as client,
    ):
        evil = {"Origin": EVIL}
        for path in ("/text-to-image", "/jobs/text-to-image"):
            response = await client.post(path, json=BODY, headers=evil)
            assert "evil.example" in assert_error_shape(response, 403, "forbidden_origin")
            assert "access-control-allow-origin" not in response.headers
        # The multipart form a page can send without any preflight is refused the same way.
        form = await client.post(
            "/jobs/image-to-image", data={"prompt": "x"}, files={"image": b"x"}, headers=evil
        )
        assert_error_shape(form, 403, "forbidden_origin")
        assert gw.gateway.jobs.jobs == {}  # no job exists, so none ran or paid
        assert list(running.orch.stats.outcomes) == []
        metrics = (await client.get("/metrics")).text
        assert metric_lines(metrics, "stepstream_gateway_jobs_total") == []

        # A WebSocket handshake from that origin is refused too (no cancel, no reading).
        ws_url = gw.url.replace("http://", "ws://") + "/jobs/anything/ws"
        with pytest.raises(InvalidStatus) as refused:
            async with connect(ws_url, origin=EVIL):  # type: ignore[arg-type]
                pass
        assert refused.value.response.status_code == 403

        # The gateway's own page (same origin) and clients without an Origin may.
        own = await client.post(
            "/jobs/text-to-image?wait_for_subscriber=1", json=BODY, headers={"Origin": gw.url}
        )
        assert own.status_code == 202, own.text
        job = own.json()
        cancel = await client.delete(job["status_url"], headers=evil)  # not from elsewhere
        assert_error_shape(cancel, 403, "forbidden_origin")
        assert (await client.delete(job["status_url"])).status_code == 202
        events = [e async for e in sse_events(client, job["events_url"])]
        assert events[-1]["code"] == "cancelled"


async def test_cors_answers_allowed_origins_only(
    running: RunningOrchestrator, tmp_path: Path
) -> None:
    async with (
        gateway_on_loopback([running.url], tmp_path, allow_origins=[APP]) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=60) as client,
    ):
        preflight = {
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, authorization",
        }
        allowed = await client.options("/jobs/text-to-image", headers={**preflight, "Origin": APP})
        assert allowed.status_code == 204
        assert allowed.headers["access-control-allow-origin"] == APP
        assert "POST" in allowed.headers["access-control-allow-methods"]
        allowed_headers = allowed.headers["access-control-allow-headers"].lower()
        assert {"authorization", "content-type", "last-event-id"} <= {
            h.strip() for h in allowed_headers.split(",")
        }
        assert allowed.headers["vary"] == "Origin"

        refused = await client.options("/jobs/text-to-image", headers={**preflight, "Origin": EVIL})
        assert_error_shape(refused, 403, "forbidden_origin")
        assert "access-control-allow-origin" not in refused.headers

        # The allowed origin's request runs, and its answer may be read by that page.
        response = await client.post("/text-to-image", json=BODY, headers={"Origin": APP})
        assert response.status_code == 200, response.text
        assert response.headers["access-control-allow-origin"] == APP
        health = await client.get("/health", headers={"Origin": EVIL})
        assert "access-control-allow-origin" not in health.headers


async def test_a_token_is_required_off_loopback(
    running: RunningOrchestrator, tmp_path: Path
) -> None:
    key = tmp_path / "gw.key"
    key.write_text("0x" + "11" * 32)
    done = subprocess.run(
        [sys.executable, "-m", "stepstream", "gateway", "--orchestrators", running.url,
         "--key", str(key), "--host", "0.0.0.0", "--port", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--token-file" in done.stderr and "0.0.0.0" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""  # never said it listened

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")
    assert host_name("[::1]:8937") == "::1" and host_name("evil.example:80") == "evil.example"

    async with gateway_on_loopback([running.url], tmp_path / "a") as gw:
        # Serving it beyond loopback is refused in code too.
        with pytest.raises(ValueError, match="loopback"):
            async with serving(gw.gateway, "0.0.0.0", 0):
                pass
        # A name that resolves to 127.0.0.1 (DNS rebinding) is not a loopback Host.
        async with httpx.AsyncClient(base_url=gw.url, timeout=60) as client:
            rebound = {"Host": "evil.example:8937", "Origin": "http://evil.example:8937"}
            response = await client.post("/text-to-image", json=BODY, headers=rebound)
            assert_error_shape(response, 403, "forbidden_host")
            assert gw.gateway.jobs.jobs == {}
    async with (
        gateway_on_loopback([running.url], tmp_path / "b", token="s3cret") as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=60) as client,
    ):
        # With a token, any Host may be served; the token is what guards the key.
        headers = {"Host": "gateway.example", "Authorization": "Bearer s3cret"}
        assert (await client.get("/health", headers=headers)).status_code == 200


async def test_each_client_has_a_bounded_number_of_jobs_in_flight(
    running: RunningOrchestrator, tmp_path: Path
) -> None:
    async with (
        gateway_on_loopback([running.url], tmp_path, max_jobs_per_client=2) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=60) as client,
    ):
        held = "/jobs/text-to-image?wait_for_subscriber=1"  # in flight until a stream subscribes
        jobs = [(await client.post(held, json=BODY)).json() for _ in range(2)]
        assert all("job_id" in j for j in jobs)
        message = assert_error_shape(await client.post(held, json=BODY), 429, "too_many_jobs")
        assert "2" in message
        assert len(gw.gateway.jobs.jobs) == 2  # the third started nothing
        assert_error_shape(await client.post("/text-to-image", json=BODY), 429, "too_many_jobs")

        # One ends (cancelled): there is room for one more.
        assert (await client.delete(jobs[0]["status_url"])).status_code == 202
        with anyio.fail_after(30):
            events = [e async for e in sse_events(client, jobs[0]["events_url"])]
        assert events[-1]["code"] == "cancelled"
        again = await client.post(held, json=BODY)
        assert again.status_code == 202, again.text
        for job in (jobs[1], again.json()):
            await client.delete(job["status_url"])


async def test_metric_labels_stay_bounded_and_health_says_degraded(
    running: RunningOrchestrator, tmp_path: Path
) -> None:
    async with (
        gateway_on_loopback([running.url], tmp_path / "a") as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=60) as client,
    ):
        health = await client.get("/health")
        assert health.status_code == 200
        assert health.json() == {"status": "OK", "orchestrators": 1, "reachable": 1}
        randoms = [f"random/{uuid.uuid4().hex}" for _ in range(3)]
        for model_id in randoms:
            response = await client.post("/text-to-image", json={**BODY, "model_id": model_id})
            assert_error_shape(response, 503, "unknown_model")
        assert (await client.post("/text-to-image", json=BODY)).status_code == 200
        metrics = (await client.get("/metrics")).text
        jobs = metric_lines(metrics, "stepstream_gateway_jobs_total")
        assert not any(r in metrics for r in randoms)
        assert (
            'stepstream_gateway_jobs_total{model="other",outcome="unknown_model",'
            'pipeline="text-to-image"} 3.0'
        ) in jobs
        assert any(f'model="{TINY_SD}"' in line and "success" in line for line in jobs)
        assert len(jobs) == 2  # 3 random ids made one series, not three

    async with (
        gateway_on_loopback(["ws://127.0.0.1:9"], tmp_path / "b") as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=60) as client,
    ):
        health = await client.get("/health")
        assert health.status_code == 503
        body = health.json()
        assert body["status"] == "degraded" and body["reachable"] == 0
        assert body["orchestrators"] == 1 and "no orchestrator" in body["detail"]


async def test_money_in_every_event_is_an_exact_decimal_string(
    running: RunningOrchestrator, tmp_path: Path
) -> None:
    async with (
        gateway_on_loopback([running.url], tmp_path) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=60) as client,
    ):
        job = (await client.post("/jobs/text-to-image?wait_for_subscriber=1", json=BODY)).json()
        with anyio.fail_after(60):
            events = [e async for e in sse_events(client, job["events_url"])]
        status = (await client.get(job["status_url"])).json()
    money: list[tuple[str, Any]] = [
        (k, v) for e in events + [status["result"]] for k, v in e.items() if k.endswith("_wei")
    ]
    kinds = {k for k, _ in money}
    assert {"fee_wei", "ev_paid_wei", "price_per_pixel_step_wei"} <= kinds
    for name, value in money:
        assert isinstance(value, str), (name, value)
        if name == "price_per_pixel_step_wei":
            assert Fraction(value) > 0
        else:
            assert value.isdigit() and int(value) > 0
    # The result's EV is what the orchestrator received, to the wei.
    result = events[-1]
    assert abs(int(result["ev_paid_wei"]) - running.orch.stats.ev_received) <= Fraction(1, 2)
    assert json.loads(json.dumps(result)) == result


async def test_the_gateway_warns_at_start_without_a_max_price(
    running: RunningOrchestrator, tmp_path: Path
) -> None:
    key = tmp_path / "gw.key"
    key.write_text("0x" + "11" * 32)
    with gateway_process(tmp_path, running.url, key) as url:
        assert url.startswith("http://127.0.0.1:")
    log = (tmp_path / "gateway.log").read_text()
    assert "warning: no --max-price" in log and "Traceback" not in log
