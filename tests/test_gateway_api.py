"""The gateway's Livepeer AI routes: request shapes, response shapes, error shapes, OpenAPI."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import pytest
from openapi_spec_validator import validate
from PIL import Image

from broadcaster.gateway.errors import ApiError
from broadcaster.gateway.openapi import openapi_document
from broadcaster.gateway.requests import (
    ImageToImageRequest,
    ImageToVideoRequest,
    TextToImageRequest,
    build_request,
)
from pipelines.loader import LoadedModel
from pipelines.tiny import TINY_SD
from tests.conftest import RunningOrchestrator, orchestrator_on_loopback
from tests.gateway_helpers import gateway_on_loopback

pytestmark = pytest.mark.anyio


def png_bytes(size: tuple[int, int] = (32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 80, 40)).save(buf, format="PNG")
    return buf.getvalue()


def assert_error_shape(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    # go-livepeer's shape with a code, and ai-runner's (which the livepeer-ai SDK parses).
    assert set(body) == {"error", "detail"}
    assert set(body["error"]) == {"message", "code"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["detail"] == {"msg": body["error"]["message"]}
    return body["error"]["message"]


async def test_text_to_image_answers_livepeer_shape(
    running: RunningOrchestrator, tmp_path: Path
) -> None:
    async with (
        gateway_on_loopback([running.url], tmp_path) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=60) as client,
    ):
        body = {
            "model_id": TINY_SD,
            "prompt": "a lighthouse",
            "width": 64,
            "height": 64,
            "num_inference_steps": 4,
            "seed": 3,
            "safety_check": False,
            "unknown_field": "ignored, as ai-runner does",
        }
        response = await client.post("/text-to-image", json=body)
        assert response.status_code == 200, response.text
        result = response.json()
        assert list(result) == ["images"] and len(result["images"]) == 1
        media = result["images"][0]
        assert set(media) == {"url", "seed", "nsfw"}
        assert media["seed"] == 3 and media["nsfw"] is False
        assert media["url"].startswith(gw.url + "/outputs/") and media["url"].endswith(".png")
        image = await client.get(media["url"])
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        with Image.open(io.BytesIO(image.content)) as img:
            assert img.format == "PNG" and img.size == (64, 64)

        # model_id may be left out: the first model offered for the pipeline runs it.
        response = await client.post(
            "/text-to-image",
            json={"prompt": "x", "width": 64, "height": 64, "num_inference_steps": 2},
        )
        assert response.status_code == 200, response.text
        assert 0 <= response.json()["images"][0]["seed"] < 2**32


async def test_validation_and_server_errors_share_one_shape(
    running: RunningOrchestrator, tmp_path: Path
) -> None:
    async with (
        gateway_on_loopback([running.url], tmp_path) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=60) as client,
    ):
        t2i = "/text-to-image"
        assert "prompt" in assert_error_shape(
            await client.post(t2i, json={"width": 64}), 400, "invalid_request"
        )
        assert "width" in assert_error_shape(
            await client.post(t2i, json={"prompt": "x", "width": "wide"}), 400, "invalid_request"
        )
        assert "num_inference_steps" in assert_error_shape(
            await client.post(t2i, json={"prompt": "x", "num_inference_steps": 0}),
            400,
            "invalid_request",
        )
        assert_error_shape(
            await client.post(t2i, content=b"{", headers={"content-type": "application/json"}),
            400,
            "invalid_request",
        )
        assert_error_shape(await client.post(t2i, data={"prompt": "x"}), 400, "invalid_request")
        assert_error_shape(await client.post(t2i, json=["x"]), 400, "invalid_request")
        # Multipart routes: the image is required and must be an image.
        assert "image" in assert_error_shape(
            await client.post("/image-to-image", data={"prompt": "x"}, files={"other": b"1"}),
            400,
            "invalid_request",
        )
        assert "image" in assert_error_shape(
            await client.post(
                "/image-to-video", files={"image": ("a.png", b"not an image", "image/png")}
            ),
            400,
            "invalid_request",
        )
        assert "fps" in assert_error_shape(
            await client.post(
                "/image-to-video",
                data={"fps": "six"},
                files={"image": ("a.png", png_bytes(), "image/png")},
            ),
            400,
            "invalid_request",
        )
        # A model nobody offers, routes and methods that do not exist.
        assert_error_shape(
            await client.post(t2i, json={"prompt": "x", "model_id": "nope/none"}),
            503,
            "unknown_model",
        )
        assert_error_shape(await client.get("/no-such-route"), 404, "not_found")
        assert_error_shape(await client.get(t2i), 405, "method_not_allowed")
        assert_error_shape(await client.get("/outputs/..%2F..%2Fetc%2Fpasswd"), 404, "not_found")
        assert_error_shape(await client.get("/jobs/unknown"), 404, "unknown_job")

    # An orchestrator that does not answer is a 503, in the same shape.
    async with (
        gateway_on_loopback(["ws://127.0.0.1:9"], tmp_path) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=60) as client,
    ):
        message = assert_error_shape(
            await client.post(t2i, json={"prompt": "x"}), 503, "unsupported_pipeline"
        )
        assert "unreachable" in message


async def test_image_pipelines_parse_multipart_and_fail_cleanly(
    running: RunningOrchestrator, tmp_path: Path
) -> None:
    """Valid image jobs that no orchestrator offers end in the standard error shape."""
    async with (
        gateway_on_loopback([running.url], tmp_path) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=60) as client,
    ):
        image = {"image": ("in.png", png_bytes(), "image/png")}
        response = await client.post(
            "/image-to-image",
            data={"prompt": "make it blue", "strength": "0.5", "seed": "4"},
            files=image,
        )
        assert "image-to-image" in assert_error_shape(response, 503, "unsupported_pipeline")
        small = {"width": "32", "height": "32", "num_frames": "2"}
        response = await client.post(
            "/image-to-video", data={**small, "fps": "8", "motion_bucket_id": "100"}, files=image
        )
        assert "image-to-video" in assert_error_shape(response, 503, "unsupported_pipeline")


def test_requests_take_ai_runner_defaults() -> None:
    t2i = build_request("text-to-image", {"prompt": "a cat"}, None, from_form=False)
    assert t2i == TextToImageRequest(prompt="a cat")
    assert (t2i.width, t2i.height, t2i.guidance_scale, t2i.num_inference_steps) == (
        1024,
        576,
        7.5,
        50,
    )
    png = png_bytes((20, 10))
    i2i = build_request("image-to-image", {"prompt": "p"}, png, from_form=True)
    assert isinstance(i2i, ImageToImageRequest)
    assert (i2i.strength, i2i.image_guidance_scale, i2i.num_inference_steps) == (0.8, 1.5, 100)
    assert (i2i.image.width, i2i.image.height, i2i.image.format) == (20, 10, "png")
    i2v = build_request(
        "image-to-video", {"seed": "", "safety_check": "false", "fps": "12"}, png, from_form=True
    )
    assert isinstance(i2v, ImageToVideoRequest)
    assert (i2v.width, i2v.height, i2v.fps, i2v.motion_bucket_id) == (1024, 576, 12, 127)
    assert (i2v.noise_aug_strength, i2v.num_inference_steps, i2v.num_frames) == (0.02, 25, 25)
    assert i2v.seed is None and i2v.safety_check is False
    with pytest.raises(ApiError) as err:
        build_request("text-to-image", {"prompt": "x", "width": True}, None, from_form=False)
    assert err.value.status == 400 and "width" in err.value.message
    with pytest.raises(ApiError):
        build_request("text-to-image", {"prompt": "x", "loras": "{}"}, None, from_form=False)


async def test_bearer_token_is_required_when_set(tiny_model: LoadedModel, tmp_path: Path) -> None:
    async with (
        orchestrator_on_loopback(tiny_model) as running,
        gateway_on_loopback([running.url], tmp_path, token="s3cret") as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=60) as client,
    ):
        body = {"prompt": "x", "width": 64, "height": 64, "num_inference_steps": 2}
        assert_error_shape(await client.post("/text-to-image", json=body), 401, "unauthorized")
        wrong = {"Authorization": "Bearer nope"}
        assert_error_shape(
            await client.post("/text-to-image", json=body, headers=wrong), 401, "unauthorized"
        )
        assert_error_shape(await client.post("/jobs/text-to-image", json=body), 401, "unauthorized")
        right = {"Authorization": "Bearer s3cret"}
        response = await client.post("/text-to-image", json=body, headers=right)
        assert response.status_code == 200, response.text
        # The page, health, OpenAPI and metrics stay open.
        for path in ("/", "/health", "/openapi.json", "/metrics"):
            assert (await client.get(path)).status_code == 200


async def test_openapi_document_is_valid(running: RunningOrchestrator, tmp_path: Path) -> None:
    async with (
        gateway_on_loopback([running.url], tmp_path) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=60) as client,
    ):
        response = await client.get("/openapi.json")
    assert response.status_code == 200
    doc = response.json()
    assert doc == openapi_document()
    validate(doc)  # raises on an invalid OpenAPI 3.1 document
    for route in ("/text-to-image", "/image-to-image", "/image-to-video"):
        assert "200" in doc["paths"][route]["post"]["responses"]
    t2i = doc["components"]["schemas"]["TextToImageParams"]
    assert t2i["required"] == ["prompt"]
    assert t2i["properties"]["num_inference_steps"]["default"] == 50


def test_gateway_command_refuses_bad_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from stepstream.cli import main

    key = tmp_path / "gw.key"
    key.write_text("0x" + "11" * 32)
    assert main(["gateway", "--orchestrators", "http://127.0.0.1:1", "--key", str(key)]) == 2
    assert "not a ws:// or wss:// URL" in capsys.readouterr().err
    assert main(["gateway", "--key", str(key)]) == 2
    assert "no orchestrator given" in capsys.readouterr().err
    absent = str(tmp_path / "no-such-list.txt")
    assert main(["gateway", "--orchestrators-file", absent, "--key", str(key)]) == 2
    assert "no-such-list.txt" in capsys.readouterr().err
    missing = str(tmp_path / "none.key")
    assert main(["gateway", "--orchestrators", "ws://127.0.0.1:1", "--key", missing]) == 2
    assert "cannot read key file" in capsys.readouterr().err


async def test_user_errors_are_400s_naming_the_field_and_blame_no_orchestrator(
    running: RunningOrchestrator, tmp_path: Path
) -> None:
    async with (
        gateway_on_loopback([running.url], tmp_path) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=60) as client,
    ):
        body = {"prompt": "x", "width": 64, "height": 64, "num_inference_steps": 2}
        for field, value in (
            ("num_inference_steps", 0),
            ("preview_every", 0),
            ("seed", -1),
            ("prompt", "x" * 5000),
            ("width", 65),
        ):
            for route in ("/text-to-image", "/jobs/text-to-image"):
                response = await client.post(route, json={**body, field: value})
                assert field in assert_error_shape(response, 400, "invalid_request")
        assert gw.gateway.jobs.jobs == {}
        assert list(running.orch.stats.outcomes) == []  # no orchestrator saw a job
        assert gw.gateway.runner.suspensions.reason(running.url) is None
