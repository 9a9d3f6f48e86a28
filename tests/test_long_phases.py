"""Phases without steps (a model load, a long decode) and results larger than one frame
(spec 9.4, 9.6, 12.1): optional messages for broadcasters that list their feature."""

from __future__ import annotations

import io
import secrets

import anyio
import pytest
from PIL import Image
from websockets.asyncio.client import connect

from broadcaster.failover import FailoverPolicy
from broadcaster.session import BroadcasterSession
from pipelines.loader import LoadedModel
from pipelines.tiny import TINY_SD
from pipelines.tiny_svd import TINY_SVD
from protocol.job_events import (
    Accepted,
    JobError,
    JobResult,
    JobStatus,
    OrchestratorChanged,
    ProgressUpdate,
)
from protocol.messages import (
    Error,
    ImageToVideoParams,
    JobAccepted,
    JobRequest,
    Result,
    ResultFrame,
    Status,
)
from tests.failover_helpers import collect, runner_trying_first, small
from tests.loopback import FaultPlan, loopback_orchestrator
from tests.test_network import RawClient

pytestmark = pytest.mark.anyio
BOUND = 60.0


def png(width: int = 64, height: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 90)).save(buf, "PNG")
    return buf.getvalue()


async def test_a_slow_decode_is_not_taken_for_a_stall(tiny_model: LoadedModel) -> None:
    """5 s of decoding after the last step, where 1 s without a message would move the
    job to another orchestrator: the runner says it is decoding, and the job stays."""
    policy = FailoverPolicy(
        stall_floor=1.0, stall_factor=1.0, first_step_timeout=60.0, finish_timeout=1.0
    )
    async with (
        loopback_orchestrator(tiny_model, FaultPlan(decode_seconds=5.0)) as slow,
        loopback_orchestrator(tiny_model) as other,
    ):
        runner = await runner_trying_first(slow.url, [slow.url, other.url], policy)
        events = await collect(runner, small(3), 1)
    assert not [e for e in events if isinstance(e, OrchestratorChanged)]
    statuses = [e for e in events if isinstance(e, JobStatus)]
    assert statuses and {s.phase for s in statuses} <= {"decoding", "encoding"}
    last_step = max(i for i, e in enumerate(events) if isinstance(e, ProgressUpdate))
    assert all(events.index(s) > last_step for s in statuses)
    assert isinstance(events[-1], JobResult)


async def test_a_model_loading_is_said_before_the_quote(tiny_model: LoadedModel) -> None:
    """A cold model that takes 5 s to load: the broadcaster hears `status: loading`."""
    async with (
        loopback_orchestrator(
            tiny_model, FaultPlan(load_seconds=5.0), warm=False, preloaded=False
        ) as cold,
        BroadcasterSession(cold.url, secrets.token_bytes(32)) as session,
    ):
        events = [e async for e in session.generate(small(2), model_id=TINY_SD)]
    first_accepted = next(i for i, e in enumerate(events) if isinstance(e, Accepted))
    loading = [e for e in events[:first_accepted] if isinstance(e, JobStatus)]
    assert loading and all(e.phase == "loading" for e in loading)
    assert isinstance(events[-1], JobResult)


async def test_optional_messages_go_only_to_who_asked(tiny_svd_model: LoadedModel) -> None:
    """A broadcaster that lists no feature gets v0.1's messages: no `status`, no
    `result_frame`, its video's frames in the result; and a video too large for one
    result frame is refused to it before payment."""
    params = ImageToVideoParams(
        image=png(), width=64, height=48, num_frames=3, num_inference_steps=2, seed=1
    )
    entries_kw = {"pipelines": ("image-to-video",)}
    async with (
        loopback_orchestrator(tiny_svd_model, FaultPlan(decode_seconds=3.0), **entries_kw) as lo,
        connect(lo.url) as ws,
    ):
        client = RawClient(ws)  # lists no features
        await client.hello()
        job = JobRequest(job_id="v", pipeline="image-to-video", model_id=TINY_SVD, params=params)
        await client.send(job)
        quote = await client.recv()
        assert isinstance(quote, JobAccepted)
        await client.send(client.sender.pay("v", quote.ticket_params, 2))
        seen = []
        with anyio.fail_after(BOUND):
            while not isinstance(message := await client.recv(), Result | Error):
                seen.append(type(message))
        assert Status not in seen and ResultFrame not in seen
        assert isinstance(message, Result) and len(message.frames) == 3
        assert message.streamed_frames == 0
        big = ImageToVideoParams(image=png(), width=1024, height=576, num_frames=25, seed=1)
        await client.send(
            JobRequest(job_id="big", pipeline="image-to-video", model_id=TINY_SVD, params=big)
        )
        refusal = await client.recv()
        assert isinstance(refusal, Error) and refusal.code == "invalid_request"
        assert "limit per job" in refusal.message


async def test_a_video_streams_its_frames_to_who_asked(tiny_svd_model: LoadedModel) -> None:
    params = ImageToVideoParams(
        image=png(), width=64, height=48, num_frames=5, num_inference_steps=2, seed=1
    )
    sent: list[object] = []

    async def record(message: object) -> None:
        sent.append(message)

    async with (
        loopback_orchestrator(tiny_svd_model, pipelines=("image-to-video",)) as lo,
        BroadcasterSession(lo.url, secrets.token_bytes(32)) as session,
    ):
        lo.orch.observers.append(record)
        events = [e async for e in session.generate(params, model_id=TINY_SVD)]
    # One message a frame, then a result that only counts them.
    assert [m.index for m in sent if isinstance(m, ResultFrame)] == [0, 1, 2, 3, 4]
    (final,) = [m for m in sent if isinstance(m, Result)]
    assert final.frames == () and final.streamed_frames == 5
    result = events[-1]
    assert not isinstance(result, JobError), result
    assert isinstance(result, JobResult) and len(result.frames) == 5
    assert all((f.width, f.height) == (64, 48) for f in result.frames)
