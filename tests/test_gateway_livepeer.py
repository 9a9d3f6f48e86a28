"""The Livepeer AI API all the way: the livepeer-ai SDK (0.10.0) against a real gateway.

Errors must parse in the SDK (ai-runner's `{"detail": {"msg"}}` beside
go-livepeer's `{"error"}`), fields the orchestrators cannot honour are
refused by name, routes not served here say so, and the offers route
lists what can be run and at what price.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import httpx
import pytest
from livepeer_ai import Livepeer
from livepeer_ai.models import errors

from pipelines.tiny import TINY_SD
from tests.conftest import PRICE, RunningOrchestrator
from tests.gateway_helpers import gateway_on_loopback
from tests.test_gateway_api import assert_error_shape, png_bytes

pytestmark = pytest.mark.anyio


def sdk(url: str) -> Livepeer:
    return Livepeer(http_bearer="unused", server_url=url)


async def test_the_livepeer_sdk_parses_answers_and_errors(
    running: RunningOrchestrator, tmp_path: Path
) -> None:
    async with gateway_on_loopback([running.url], tmp_path) as gw:
        lp = sdk(gw.url)
        small = {"model_id": TINY_SD, "width": 64, "height": 64, "num_inference_steps": 2}
        ok = await lp.generate.text_to_image_async(
            request={"prompt": "a lighthouse", "safety_check": False, "seed": 8, **small}
        )
        assert ok.http_meta.response.status_code == 200 and ok.image_response is not None
        media = ok.image_response.images[0]
        assert media.seed == 8 and media.nsfw is False and media.url.endswith(".png")

        # A 400 is the SDK's HTTPError with a message, not a pydantic ValidationError.
        with pytest.raises(errors.HTTPError) as bad:
            await lp.generate.text_to_image_async(
                request={"prompt": "x", "safety_check": False, **small, "num_inference_steps": 0}
            )
        assert "num_inference_steps" in bad.value.data.detail.msg
        # The SDK sends safety_check=true unless told: refused, and it says what to do.
        with pytest.raises(errors.HTTPError) as unchecked:
            await lp.generate.text_to_image_async(request={"prompt": "x", **small})
        assert "safety_check" in unchecked.value.data.detail.msg
        assert "false" in unchecked.value.data.detail.msg
        # The image routes too (multipart), with the SDK's defaults for the rest.
        with pytest.raises(errors.HTTPError) as guided:
            await lp.generate.image_to_image_async(
                request={
                    "prompt": "x",
                    "image": {"file_name": "in.png", "content": png_bytes()},
                    "safety_check": False,
                    "image_guidance_scale": 3.0,
                }
            )
        assert "image_guidance_scale" in guided.value.data.detail.msg
        # A route not served here: a clear error, which the SDK surfaces with its body.
        with pytest.raises(errors.SDKError) as upscale:
            await lp.generate.upscale_async(
                request={"prompt": "x", "image": {"file_name": "in.png", "content": png_bytes()}}
            )
        assert upscale.value.status_code == 404 and "upscale" in upscale.value.body


async def test_routes_not_served_and_fields_not_honoured_say_so(
    running: RunningOrchestrator, tmp_path: Path
) -> None:
    async with (
        gateway_on_loopback([running.url], tmp_path) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=60) as client,
    ):
        for route in ("upscale", "audio-to-text", "llm", "segment-anything-2", "image-to-text"):
            message = assert_error_shape(
                await client.post(f"/{route}", json={}), 404, "unsupported_pipeline"
            )
            assert route in message and "text-to-image" in message
        image = {"image": ("in.png", png_bytes(), "image/png")}
        for fields, named in (
            ({"prompt": "x", "safety_check": "true"}, "safety_check"),
            ({"prompt": "x", "image_guidance_scale": "2.5"}, "image_guidance_scale"),
        ):
            response = await client.post("/image-to-image", data=fields, files=image)
            assert named in assert_error_shape(response, 400, "invalid_request")
        response = await client.post("/image-to-video", data={"safety_check": "1"}, files=image)
        assert "safety_check" in assert_error_shape(response, 400, "invalid_request")
        assert gw.gateway.jobs.jobs == {}


async def test_offers_list_pipelines_models_and_exact_prices(
    running: RunningOrchestrator, tmp_path: Path
) -> None:
    async with (
        gateway_on_loopback([running.url, "ws://127.0.0.1:9"], tmp_path) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=60) as client,
    ):
        gw.gateway.runner.max_price = PRICE / 2
        response = await client.get("/offers")
    assert response.status_code == 200
    body = response.json()
    assert body["max_price_per_pixel_step_wei"] == str(PRICE / 2)
    (offer,) = body["offers"]
    claimed = offer.pop("claimed_pixel_steps_per_second")
    assert claimed > 0  # the tiny model's step, timed at load (spec 4.5)
    assert offer == {
        "pipeline": "text-to-image",
        "model_id": TINY_SD,
        "price_per_pixel_step_wei": str(PRICE),
        "orchestrators": 1,
        "warm": 1,
        "within_max_price": False,
        "gpus": ["cpu"],
        "max_vram_gib": None,
        "in_use": 0,
        "capacity": offer["capacity"],
    }
    assert Fraction(body["offers"][0]["price_per_pixel_step_wei"]) == PRICE
