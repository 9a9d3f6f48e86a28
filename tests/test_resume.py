"""Resume: a job continued from step k's latents ends where the uninterrupted one does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from websockets.asyncio.client import connect

from pipelines.resume import ResumePoint, latents_from_bytes, latents_to_bytes
from pipelines.text_to_image import run_text_to_image
from pipelines.tiny import TINY_SD
from protocol.messages import Error, JobRequest, Latents, ResumeFrom
from tests.failover_helpers import small
from tests.test_network import RawClient


class Recorder:
    """Hooks that keep every step's latents and never wait."""

    def __init__(self) -> None:
        self.latents: dict[int, torch.Tensor] = {}

    def wait_for_step(self, step: int) -> None:
        pass

    def on_step_end(self, step: int, latents: torch.Tensor) -> None:
        self.latents[step] = latents.clone()


@pytest.mark.parametrize("k", [1, 4, 7])
def test_resumed_run_equals_uninterrupted(tiny_model: object, k: int) -> None:
    params = small(8, seed=11)
    full = Recorder()
    expected = run_text_to_image(tiny_model, params, full, 11)  # type: ignore[arg-type]
    # Over the wire and back, as a preview carries them.
    dtype, shape, data = latents_to_bytes(full.latents[k])
    start = latents_from_bytes(dtype, shape, data)
    rest = Recorder()
    resumed = run_text_to_image(
        tiny_model,  # type: ignore[arg-type]
        params,
        rest,
        11,
        resume=ResumePoint(k, start),
    )
    # Only the steps after k ran, and each matches the uninterrupted run's.
    assert sorted(rest.latents) == list(range(1, 8 - k + 1))
    for step, latents in rest.latents.items():
        assert torch.equal(latents, full.latents[k + step])
    assert np.array_equal(np.asarray(resumed[0]), np.asarray(expected[0]))


def test_latents_bytes_are_checked() -> None:
    with pytest.raises(ValueError, match="do not hold"):
        latents_from_bytes("float32", (1, 4, 8, 8), b"\x00" * 12)
    with pytest.raises(ValueError, match="unknown latents dtype"):
        latents_from_bytes("int8", (1,), b"\x00")


@pytest.mark.anyio
async def test_bad_resume_is_refused_before_payment(running: object) -> None:
    url = running.url  # type: ignore[attr-defined]
    good = Latents("EulerDiscreteScheduler", "float32", (1, 4, 8, 8), bytes(4 * 256))
    cases = [
        (ResumeFrom(2, Latents("PNDMScheduler", "float32", (1, 4, 8, 8), bytes(1024))), "PNDM"),
        (ResumeFrom(8, good), "leaves no step"),
        (
            ResumeFrom(2, Latents("EulerDiscreteScheduler", "float32", (1, 4, 4, 4), bytes(256))),
            "shape",
        ),
        (
            ResumeFrom(2, Latents("EulerDiscreteScheduler", "float32", (1, 4, 8, 8), bytes(5))),
            "bytes",
        ),
    ]
    async with connect(url) as ws:
        client = RawClient(ws)
        info = await client.hello()
        assert info.capabilities[0].resume_scheduler == "EulerDiscreteScheduler"
        for i, (resume, words) in enumerate(cases):
            await client.send(
                JobRequest(
                    job_id=f"r{i}",
                    pipeline="text-to-image",
                    model_id=TINY_SD,
                    params=small(8),
                    resume=resume,
                )
            )
            reply = await client.recv()
            assert isinstance(reply, Error) and reply.code == "invalid_request", reply
            assert words in reply.message
    assert running.orch.stats.jobs_accepted == 0  # type: ignore[attr-defined]
