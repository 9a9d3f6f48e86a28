"""All three pipelines end to end: broadcaster, orchestrator and the tiny models, on loopback."""

from __future__ import annotations

import contextlib
import io
import math
import secrets
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import msgpack
import pytest
from PIL import Image
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from broadcaster.session import BroadcasterSession
from orchestrator.config import ModelEntry
from pipelines.loader import LoadedModel
from pipelines.tiny import TINY_SD, TINY_SDXL
from pipelines.tiny_svd import TINY_SVD
from protocol import codec
from protocol.job_events import (
    Accepted,
    JobError,
    JobResult,
    PaymentSent,
    PreviewFrame,
    ProgressUpdate,
)
from protocol.messages import (
    Error,
    ImageToImageParams,
    ImageToVideoParams,
    JobParams,
    JobRequest,
    TextToImageParams,
)
from tests.conftest import PRICE, RunningOrchestrator
from tests.loopback import loopback_orchestrator
from tests.test_image_pipelines import image_bytes
from tests.test_network import RawClient, dearest_ticket

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.filterwarnings(
        "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
    ),
]

OFFERS = [
    ("text-to-image", TINY_SD),
    ("image-to-image", TINY_SD),
    ("text-to-image", TINY_SDXL),
    ("image-to-image", TINY_SDXL),
    ("image-to-video", TINY_SVD),
]


@contextlib.asynccontextmanager
async def orchestrator_with_all(
    models: dict[str, LoadedModel], **overrides: Any
) -> AsyncIterator[RunningOrchestrator]:
    entries = [
        ModelEntry(p, m, warm=True, capacity=2, price_per_pixel_step=PRICE) for p, m in OFFERS
    ]
    async with loopback_orchestrator(
        list(models.values()), entries=entries, **overrides
    ) as running:
        yield running


@pytest.fixture
def models(
    tiny_model: LoadedModel, tiny_sdxl_model: LoadedModel, tiny_svd_model: LoadedModel
) -> dict[str, LoadedModel]:
    return {TINY_SD: tiny_model, TINY_SDXL: tiny_sdxl_model, TINY_SVD: tiny_svd_model}


@pytest.fixture
async def running(models: dict[str, LoadedModel]) -> AsyncIterator[RunningOrchestrator]:
    async with orchestrator_with_all(models) as running:
        yield running


async def run_job(url: str, params: JobParams, model_id: str, every: int, **kw: Any) -> list:
    async with BroadcasterSession(url, secrets.token_bytes(32)) as session:
        return [
            e async for e in session.generate(params, model_id=model_id, preview_every=every, **kw)
        ]


def t2i(steps: int) -> TextToImageParams:
    return TextToImageParams(
        prompt="a lighthouse", width=64, height=48, num_inference_steps=steps, seed=11
    )


def i2i(steps: int, strength: float = 0.5) -> ImageToImageParams:
    return ImageToImageParams(
        prompt="in winter",
        image=image_bytes(64, 48),
        strength=strength,
        num_inference_steps=steps,
        seed=11,
    )


def i2v(steps: int, frames: int = 3) -> ImageToVideoParams:
    return ImageToVideoParams(
        image=image_bytes(64, 48),
        width=64,
        height=48,
        num_frames=frames,
        num_inference_steps=steps,
        seed=11,
    )


# (params, model, executed steps, outputs per step: images or frames, video?)
CASES = {
    "sd-i2i": (i2i(10, 0.5), TINY_SD, 5, 1, False),
    "sdxl-t2i": (t2i(5), TINY_SDXL, 5, 1, False),
    "sdxl-i2i": (i2i(7, 0.75), TINY_SDXL, 5, 1, False),
    "svd-i2v": (i2v(5, frames=3), TINY_SVD, 5, 3, True),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_every_pipeline_end_to_end(running: RunningOrchestrator, case: str) -> None:
    params, model_id, steps, outputs, video = CASES[case]
    every = 2
    events = await run_job(running.url, params, model_id, every)
    accepted = next(e for e in events if isinstance(e, Accepted))
    result = events[-1]
    assert isinstance(result, JobResult), result
    # Price is executed pixel-steps: every image or frame, int(steps * strength) steps.
    assert accepted.steps == steps == result.steps
    assert accepted.pixels_per_step == 64 * 48 * outputs
    assert accepted.fee == 64 * 48 * outputs * steps * PRICE == result.fee
    payments = [e for e in events if isinstance(e, PaymentSent)]
    # C4: at most the dearer ticket over the fee, of the job's and its first window's (8.11).
    assert accepted.fee <= result.ev_paid <= accepted.fee + dearest_ticket(payments)
    # ceil(steps / N) previews, at every N-th step and the last.
    previews = [e for e in events if isinstance(e, PreviewFrame)]
    assert [p.step for p in previews] == [2, 4, 5] and len(previews) == math.ceil(steps / every)
    assert [e.step for e in events if isinstance(e, ProgressUpdate)] == list(range(1, steps + 1))
    outputs_seen = result.frames if video else result.images
    assert len(outputs_seen) == outputs and (not video or not result.images)
    for out in outputs_seen:
        with Image.open(io.BytesIO(out.image)) as img:
            assert img.size == (64, 48) and img.format == "PNG"
    if video:
        assert result.fps == 6 and all(p.frames == outputs for p in previews)
        with Image.open(io.BytesIO(previews[0].image)) as anim:
            assert anim.n_frames == outputs
    # Same seed, same request: byte-identical output.
    again = (await run_job(running.url, params, model_id, every))[-1]
    assert isinstance(again, JobResult)
    assert [o.image for o in (again.frames if video else again.images)] == [
        o.image for o in outputs_seen
    ]


async def test_video_preview_of_a_chosen_frame(running: RunningOrchestrator) -> None:
    events = await run_job(
        running.url, i2v(2, frames=3), TINY_SVD, 1, preview_frame=1, preview_format="jpeg"
    )
    previews = [e for e in events if isinstance(e, PreviewFrame)]
    assert len(previews) == 2 and all(p.frames == 1 for p in previews)
    with Image.open(io.BytesIO(previews[-1].image)) as img:
        assert img.size == (64, 48) and img.format == "JPEG"
    assert isinstance(events[-1], JobResult)


async def test_taesd_fallback_is_reported(
    running: RunningOrchestrator, monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    monkeypatch.setenv("STEPSTREAM_TAESD_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    events = await run_job(running.url, i2i(4), TINY_SD, 2, preview_method="taesd")
    previews = [e for e in events if isinstance(e, PreviewFrame)]
    assert previews and all(p.method == "latent_rgb" for p in previews)
    assert isinstance(events[-1], JobResult)


@pytest.mark.parametrize("case", ["sd-i2i", "sdxl-t2i", "svd-i2v"])
async def test_cancel_stops_every_pipeline_within_a_step(
    running: RunningOrchestrator, case: str
) -> None:
    params, model_id, *_ = CASES[case]
    params = replace(params, num_inference_steps=40)
    async with BroadcasterSession(running.url, secrets.token_bytes(32)) as session:
        events = []
        async for event in session.generate(params, model_id=model_id, preview_every=2):
            events.append(event)
            if isinstance(event, ProgressUpdate) and event.step == 3:
                await session.cancel(event.job_id)
    assert isinstance(events[-1], JobError) and events[-1].code == "cancelled"
    outcome = running.orch.stats.outcomes[-1]
    accepted = next(e for e in events if isinstance(e, Accepted))
    assert outcome.terminal == "cancelled" and outcome.steps_at_stop is not None
    assert outcome.steps_executed <= outcome.steps_at_stop + 1 < accepted.steps
    assert max(e.step for e in events if isinstance(e, ProgressUpdate)) == outcome.steps_executed
    cancel_at = next(
        i for i, e in enumerate(events) if isinstance(e, ProgressUpdate) and e.step == 3
    )
    assert all(i < cancel_at for i, e in enumerate(events) if isinstance(e, PaymentSent))


INVALID = [
    ("image-to-image", TINY_SD, ImageToImageParams(prompt="x"), "invalid_request"),
    ("image-to-image", TINY_SD, replace(i2i(8), image=b"GIF89a-not-really"), "invalid_request"),
    ("image-to-image", TINY_SDXL, replace(i2i(8), image=image_bytes(60, 48)), "invalid_request"),
    ("image-to-image", TINY_SD, i2i(10, strength=0.05), "invalid_request"),
    ("image-to-video", TINY_SVD, replace(i2v(4), image=None), "invalid_request"),
    ("image-to-video", TINY_SVD, replace(i2v(4), image=b"\x89PNG\r\n\x1a\n"), "invalid_request"),
    ("image-to-video", TINY_SVD, replace(i2v(4), width=100), "invalid_request"),
    (
        "image-to-video",
        TINY_SVD,
        replace(i2v(4), width=1024, height=576, num_frames=25),
        "invalid_request",
    ),
    ("image-to-video", TINY_SD, i2v(4), "unknown_model"),
    ("text-to-image", TINY_SVD, t2i(4), "unknown_model"),
]


async def test_invalid_image_jobs_are_refused_before_payment(running: RunningOrchestrator) -> None:
    async with connect(running.url) as ws:
        client = RawClient(ws)
        await client.hello()
        for i, (pipeline, model_id, params, code) in enumerate(INVALID):
            await client.send(
                JobRequest(job_id=f"bad{i}", pipeline=pipeline, model_id=model_id, params=params)
            )
            reply = await client.recv()
            assert isinstance(reply, Error) and (reply.code, reply.job_id) == (code, f"bad{i}"), (
                reply
            )
        await client.send(
            JobRequest(
                job_id="frame",
                pipeline="image-to-video",
                model_id=TINY_SVD,
                params=i2v(2),
                preview_frame=3,
            )
        )
        reply = await client.recv()
        assert isinstance(reply, Error) and reply.code == "invalid_request"
    # A strength outside 0..1 breaks the field's range: invalid_field, and the connection ends.
    raw = codec.encode(
        JobRequest(job_id="s", pipeline="image-to-image", model_id=TINY_SD, params=i2i(8))
    )
    fields = msgpack.unpackb(raw, raw=False)
    fields["params"]["strength"] = 1.5
    async with connect(running.url) as ws:
        client = RawClient(ws)
        await client.hello()
        await ws.send(msgpack.packb(fields, use_bin_type=True))
        reply = codec.decode(await ws.recv())
        assert (
            isinstance(reply, Error)
            and reply.code == "invalid_field"
            and "strength" in reply.message
        )
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    # The broadcaster session refuses such a request itself, before sending or paying.
    async with BroadcasterSession(running.url, secrets.token_bytes(32)) as session:
        bad = replace(i2i(8), strength=1.5)
        events = [e async for e in session.generate(bad, model_id=TINY_SD)]
        assert isinstance(events[-1], JobError) and events[-1].code == "invalid_field"
    assert running.orch.stats.tickets_received == 0
    assert running.orch.stats.jobs_accepted == 0
