"""The gateway's image routes end to end: Livepeer multipart bodies to PNGs and an MP4.

A real orchestrator on loopback offers tiny-sd, tiny-sdxl and tiny-svd; the
requests are the multipart forms Livepeer AI clients send (every field a
string, the image a file part with a name and a content type).
"""

from __future__ import annotations

import io
import math
from collections.abc import AsyncIterator
from pathlib import Path

import av
import httpx
import pytest
from PIL import Image

from pipelines.loader import LoadedModel
from pipelines.tiny import TINY_SD, TINY_SDXL
from pipelines.tiny_svd import TINY_SVD
from tests.conftest import PRICE, RunningOrchestrator
from tests.gateway_helpers import gateway_on_loopback, sse_events
from tests.test_gateway_api import assert_error_shape
from tests.test_image_pipelines import image_bytes
from tests.test_network_pipelines import orchestrator_with_all

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.filterwarnings(
        "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
    ),
]


@pytest.fixture
async def all_pipelines(
    tiny_model: LoadedModel, tiny_sdxl_model: LoadedModel, tiny_svd_model: LoadedModel
) -> AsyncIterator[RunningOrchestrator]:
    models = {TINY_SD: tiny_model, TINY_SDXL: tiny_sdxl_model, TINY_SVD: tiny_svd_model}
    async with orchestrator_with_all(models) as running:
        yield running


def image_part(data: bytes, name: str = "input.png", mime: str = "image/png") -> dict:
    return {"image": (name, data, mime)}


async def fetch_output(client: httpx.AsyncClient, media: dict, gw_url: str, suffix: str) -> bytes:
    assert set(media) == {"url", "seed", "nsfw"} and media["nsfw"] is False
    assert media["url"].startswith(gw_url + "/outputs/") and media["url"].endswith(suffix)
    response = await client.get(media["url"])
    assert response.status_code == 200
    assert response.headers["content-type"] == ("video/mp4" if suffix == ".mp4" else "image/png")
    return response.content


async def test_image_to_image_returns_pngs_of_the_input_size(
    all_pipelines: RunningOrchestrator, tmp_path: Path
) -> None:
    async with (
        gateway_on_loopback([all_pipelines.url], tmp_path) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=60) as client,
    ):
        for model_id, upload in (
            (TINY_SD, image_part(image_bytes(64, 48))),
            (TINY_SDXL, image_part(image_bytes(48, 64, "JPEG"), "photo.jpg", "image/jpeg")),
        ):
            form = {
                "prompt": "the same in winter",
                "model_id": model_id,
                "strength": "0.5",
                "guidance_scale": "7.5",
                "image_guidance_scale": "1.5",
                "negative_prompt": "",
                "safety_check": "false",
                "seed": "7",
                "num_inference_steps": "6",
                "num_images_per_prompt": "2",
            }
            response = await client.post("/image-to-image", data=form, files=upload)
            assert response.status_code == 200, response.text
            body = response.json()
            assert list(body) == ["images"] and len(body["images"]) == 2
            size = Image.open(io.BytesIO(upload["image"][1])).size
            for media in body["images"]:
                png = await fetch_output(client, media, gw.url, ".png")
                with Image.open(io.BytesIO(png)) as img:
                    assert img.format == "PNG" and img.size == size
                    # What made it, as AUTOMATIC1111 writes it into its PNGs.
                    made = img.info["parameters"].splitlines()
                    assert made[0] == "the same in winter"
                    assert f"Seed: {media['seed']}" in made[-1] and f"Model: {model_id}" in made[-1]
                    assert "Steps: 6" in made[-1] and "Denoising strength: 0.5" in made[-1]
            assert body["images"][0]["seed"] == 7
            # int(6 x 0.5) = 3 executed steps per image: the orchestrator counted them.
            outcome = all_pipelines.orch.stats.outcomes[-1]
            assert outcome.terminal == "result" and outcome.steps_executed == 3


async def test_image_to_video_returns_one_mp4_and_streams_its_job(
    all_pipelines: RunningOrchestrator, tmp_path: Path
) -> None:
    form = {
        "model_id": TINY_SVD,
        "width": "64",
        "height": "48",
        "fps": "8",
        "motion_bucket_id": "127",
        "noise_aug_strength": "0.02",
        "safety_check": "false",
        "seed": "5",
        "num_inference_steps": "3",
        "num_frames": "4",
        "preview_every": "2",
    }
    async with (
        gateway_on_loopback([all_pipelines.url], tmp_path) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=60) as client,
    ):
        upload = image_part(image_bytes(80, 80))  # resized to width x height
        response = await client.post("/image-to-video", data=form, files=upload)
        assert response.status_code == 200, response.text
        body = response.json()
        assert list(body) == ["images"] and len(body["images"]) == 1
        assert body["images"][0]["seed"] == 5
        mp4 = await fetch_output(client, body["images"][0], gw.url, ".mp4")
        with av.open(io.BytesIO(mp4)) as container:
            stream = container.streams.video[0]
            assert stream.average_rate == 8
            frames = [f.to_image() for f in container.decode(video=0)]
        assert len(frames) == 4 and all(f.size == (64, 48) for f in frames)

        # The same job through /jobs and SSE: every event of a video job, in order.
        submitted = await client.post(
            "/jobs/image-to-video?wait_for_subscriber=1", data=form, files=upload
        )
        assert submitted.status_code == 202, submitted.text
        events = [e async for e in sse_events(client, submitted.json()["events_url"])]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "orchestrator_changed" and kinds[1] == "accepted"
    assert kinds[-1] == "result"
    accepted = events[1]
    assert accepted["steps"] == 3 and accepted["pixels_per_step"] == 64 * 48 * 4
    assert accepted["fee_wei"] == str(64 * 48 * 4 * 3 * PRICE)
    previews = [e for e in events if e["type"] == "preview"]
    assert [p["step"] for p in previews] == [2, 3] and len(previews) == math.ceil(3 / 2)
    assert events[-1]["images"][0]["url"].endswith(".mp4")


async def test_bad_uploads_answer_the_error_shape_before_any_job(
    all_pipelines: RunningOrchestrator, tmp_path: Path
) -> None:
    png = image_bytes(64, 48)
    i2i, i2v = "/image-to-image", "/image-to-video"
    small = {"width": "64", "height": "48", "num_frames": "2", "num_inference_steps": "2"}
    cases = [
        (i2i, {"prompt": "x"}, {}, "image is required"),
        (i2i, {"prompt": "x"}, image_part(b"GIF89a-not-really"), "not a readable image"),
        (i2i, {}, image_part(png), "prompt is required"),
        (i2i, {"prompt": "x", "strength": "1.5"}, image_part(png), "strength"),
        (
            i2i,
            {"prompt": "x", "strength": "0.05", "num_inference_steps": "10"},
            image_part(png),
            "no step",
        ),
        (i2i, {"prompt": "x"}, image_part(image_bytes(60, 48)), "multiples of 8"),
        (i2v, {**small, "width": "60"}, image_part(png), "multiples of 8"),
        (i2v, {**small, "num_frames": "0"}, image_part(png), "num_frames"),
        (i2v, small, {}, "image is required"),
        # 128 frames of 2048x1024: past even a streamed video's pixel limit.
        (
            i2v,
            {**small, "width": "2048", "height": "1024", "num_frames": "128"},
            image_part(png),
            "limit per job",
        ),
    ]
    async with (
        gateway_on_loopback([all_pipelines.url], tmp_path) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=60) as client,
    ):
        for route, form, files, words in cases:
            if not files:  # a multipart body with no image part
                files = {"other": ("a.txt", b"1", "text/plain")}
            response = await client.post(route, data=form, files=files)
            assert words in assert_error_shape(response, 400, "invalid_request"), (route, form)
        # None of them reached the orchestrator.
        assert len(all_pipelines.orch.stats.outcomes) == 0
        # A model the orchestrator offers for another pipeline only: 503, same shape.
        response = await client.post(
            i2v, data={**small, "model_id": TINY_SD}, files=image_part(png)
        )
        assert_error_shape(response, 503, "unknown_model")
