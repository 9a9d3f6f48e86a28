"""End to end over real websockets on loopback, with the real tiny pipeline."""

from __future__ import annotations

import io
import math
import secrets
from fractions import Fraction

import anyio
import pytest
from PIL import Image
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from broadcaster.session import BroadcasterSession
from pipelines.tiny import TINY_SD
from protocol import codec
from protocol.connection import Connection
from protocol.job_events import (
    Accepted,
    JobError,
    JobResult,
    PaymentSent,
    PreviewFrame,
    ProgressUpdate,
)
from protocol.messages import (
    AwaitingPayment,
    Credit,
    Error,
    Hello,
    Info,
    JobAccepted,
    JobRequest,
    Message,
    OtherParams,
    Progress,
    Role,
    TextToImageParams,
)
from protocol.pm import ticket_ev
from protocol.sender import TicketSender
from tests.conftest import PRICE, RunningOrchestrator, orchestrator_on_loopback

pytestmark = pytest.mark.anyio


def small(steps: int = 6, **kw: object) -> TextToImageParams:
    fields: dict = dict(prompt="a lighthouse at dusk", width=64, height=64, seed=7)
    return TextToImageParams(num_inference_steps=steps, **{**fields, **kw})


async def run_job(url: str, params: TextToImageParams, every: int, **kw: object) -> list:
    async with BroadcasterSession(url, secrets.token_bytes(32)) as session:
        return [
            e async for e in session.generate(params, model_id=TINY_SD, preview_every=every, **kw)
        ]


async def test_job_end_to_end(running: RunningOrchestrator) -> None:
    steps, every = 6, 4
    events = await run_job(running.url, small(steps), every)

    accepted = next(e for e in events if isinstance(e, Accepted))
    assert accepted.fee == 64 * 64 * steps * PRICE
    previews = [e for e in events if isinstance(e, PreviewFrame)]
    assert [p.step for p in previews] == [4, 6] == list(range(every, steps, every)) + [steps]
    assert len(previews) == math.ceil(steps / every)
    for p in previews:
        Image.open(io.BytesIO(p.image)).verify()
    assert len({p.image for p in previews}) == len(previews), "previews must show progress"

    result = events[-1]
    assert isinstance(result, JobResult)
    assert len(result.images) == 1
    with Image.open(io.BytesIO(result.images[0].image)) as img:
        assert img.size == (64, 64) and img.format == "PNG"
    assert result.steps == steps and result.fee == accepted.fee

    # Paid at least the fee and at most one ticket more (spec C4): the dearer ticket of the
    # job's parameters and the first-window ones its first window went with (8.11)...
    payments = [e for e in events if isinstance(e, PaymentSent)]
    ev = dearest_ticket(payments)
    assert accepted.fee <= result.ev_paid <= accepted.fee + ev
    # ...and never more than N + lead steps plus one ticket ahead of delivery (C3).
    fee_per_step = accepted.fee / steps
    delivered = 0
    for e in events:
        if isinstance(e, ProgressUpdate):
            delivered = e.step
        if isinstance(e, PaymentSent):
            assert e.ev_paid - delivered * fee_per_step <= (every + 1) * fee_per_step + ev
    assert running.orch.stats.steps_executed == steps
    assert running.orch.stats.ev_received == result.ev_paid


class RawClient:
    """A hand-driven broadcaster: the protocol state machine over a raw socket."""

    def __init__(self, ws: object) -> None:
        self.ws = ws
        self.conn = Connection(Role.BROADCASTER)
        self.key = secrets.token_bytes(32)
        self.sender = TicketSender(self.key)

    async def send(self, message: Message) -> None:
        await self.ws.send(self.conn.send(message))  # type: ignore[attr-defined]

    async def recv(self) -> Message:
        with anyio.fail_after(30):
            return self.conn.receive(await self.ws.recv())  # type: ignore[attr-defined]

    async def hello(self) -> Info:
        await self.send(Hello(sender=self.sender.address_bytes))
        info = await self.recv()
        assert isinstance(info, Info)
        return info


async def test_no_step_without_credit(tiny_model: object) -> None:
    """A broadcaster that pays one window gets that window, a pause, then payment_timeout."""
    async with orchestrator_on_loopback(tiny_model, payment_timeout=1.0) as running:
        async with connect(running.url) as ws:
            client = RawClient(ws)
            await client.hello()
            await client.send(
                JobRequest(
                    job_id="j",
                    pipeline="text-to-image",
                    model_id=TINY_SD,
                    params=small(6),
                    preview_every=2,
                )
            )
            accepted = await client.recv()
            assert isinstance(accepted, JobAccepted)
            tp = accepted.ticket_params
            window_fee = accepted.fee / accepted.steps * 2
            tickets = math.ceil(window_fee / ticket_ev(tp.face_value, tp.win_prob))
            assert tickets == 1  # one ticket per window (spec 8.2)
            await client.send(client.sender.pay("j", tp, tickets))

            seen: list[Message] = []
            while not isinstance(seen[-1:] and seen[-1], Error):
                seen.append(await client.recv())
            progress = [m.step for m in seen if isinstance(m, Progress)]
            credit = [m for m in seen if isinstance(m, Credit)]
            pauses = [m for m in seen if isinstance(m, AwaitingPayment)]
            assert progress == [1, 2]
            assert credit[-1].covered_steps == 2
            assert pauses and pauses[-1].next_step == 3
            assert seen[-1].code == "payment_timeout" and seen[-1].job_id == "j"
        assert running.orch.stats.steps_executed == 2


async def expect_fatal(url: str, frames: list[bytes | str], code: str) -> None:
    async with connect(url, max_size=None) as ws:
        for frame in frames:
            await ws.send(frame)
        reply = codec.decode(await ws.recv())
        if isinstance(reply, Info):  # a valid hello came first
            reply = codec.decode(await ws.recv())
        assert isinstance(reply, Error) and reply.code == code and reply.job_id is None
        with pytest.raises(ConnectionClosed):
            await ws.recv()


async def test_bad_frames_get_error_codes(tiny_model: object) -> None:
    cap = 64 * 1024
    async with orchestrator_on_loopback(tiny_model, max_frame_bytes=cap) as running:
        hello = codec.encode(Hello(sender=bytes(19) + b"\x01"))
        good_result: list = []

        async def good_client() -> None:
            good_result.extend(await run_job(running.url, small(8), 2))

        async with anyio.create_task_group() as tg:
            tg.start_soon(good_client)
            await expect_fatal(running.url, [b"\xc1\x00"], "malformed_frame")
            await expect_fatal(running.url, ["hello"], "malformed_frame")
            await expect_fatal(running.url, [b"\x00" * (cap + 1)], "frame_too_large")
            import msgpack

            await expect_fatal(
                running.url, [msgpack.packb({"v": 1, "type": "launch"})], "unknown_message_type"
            )
            job = JobRequest(job_id="x", pipeline="text-to-image", model_id=TINY_SD, params=small())
            await expect_fatal(running.url, [codec.encode(job)], "unexpected_message")
            await expect_fatal(
                running.url,
                [msgpack.packb({"v": 1, "type": "hello", "sender": "0xabc"})],
                "invalid_field",
            )
            await expect_fatal(running.url, [hello, hello], "unexpected_message")
        assert isinstance(good_result[-1], JobResult)


async def test_invalid_jobs_are_refused_before_payment(running: RunningOrchestrator) -> None:
    bad = [
        (dict(params=small(width=65)), "invalid_request"),
        (dict(params=small(), model_id="nobody/has-this"), "unknown_model"),
        (dict(params=small(), preview_method="oracle"), "invalid_request"),
        (dict(params=small(num_images_per_prompt=16, width=2048, height=2048)), "invalid_request"),
    ]
    async with connect(running.url) as ws:
        client = RawClient(ws)
        await client.hello()
        for i, (fields, code) in enumerate(bad):
            req = {"job_id": f"bad{i}", "pipeline": "text-to-image", "model_id": TINY_SD, **fields}
            await client.send(JobRequest(**req))
            reply = await client.recv()
            assert isinstance(reply, Error) and reply.code == code and reply.job_id == f"bad{i}"
        await client.send(
            JobRequest(job_id="v", pipeline="upscale", model_id=TINY_SD, params=OtherParams())
        )
        reply = await client.recv()
        assert isinstance(reply, Error) and reply.code == "unsupported_pipeline"
    assert running.orch.stats.tickets_received == 0
    assert running.orch.stats.jobs_accepted == 0
    # The same orchestrator still serves a good job.
    events = await run_job(running.url, small(2), 1)
    assert isinstance(events[-1], JobResult)


async def test_price_above_maximum_is_refused(running: RunningOrchestrator) -> None:
    async with BroadcasterSession(
        running.url, secrets.token_bytes(32), max_price=PRICE - Fraction(1, 10)
    ) as session:
        events = [e async for e in session.generate(small(), model_id=TINY_SD)]
    assert isinstance(events[-1], JobError) and events[-1].code == "price_too_high"
    assert running.orch.stats.jobs_accepted == 0


async def test_cancel_stops_within_a_step(running: RunningOrchestrator) -> None:
    steps = 20
    async with BroadcasterSession(running.url, secrets.token_bytes(32)) as session:
        events = []
        async for event in session.generate(small(steps), model_id=TINY_SD, preview_every=2):
            events.append(event)
            if isinstance(event, ProgressUpdate) and event.step == 3:
                await session.cancel(event.job_id)
        # The connection stays usable after a cancelled job.
        after = [e async for e in session.generate(small(2), model_id=TINY_SD)]
    assert isinstance(events[-1], JobError) and events[-1].code == "cancelled"
    cancelled = running.orch.stats.outcomes[0]
    assert cancelled.terminal == "cancelled" and cancelled.steps_at_stop is not None
    # At most the step in flight when the cancel arrived completes (spec X1)...
    assert cancelled.steps_executed <= cancelled.steps_at_stop + 1 < steps
    # ...every executed step was reported to the broadcaster...
    last_step = max(e.step for e in events if isinstance(e, ProgressUpdate))
    assert last_step == cancelled.steps_executed
    # ...and nothing was paid after the cancel.
    payments = [i for i, e in enumerate(events) if isinstance(e, PaymentSent)]
    cancel_at = next(
        i for i, e in enumerate(events) if isinstance(e, ProgressUpdate) and e.step == 3
    )
    assert all(i < cancel_at for i in payments)
    assert isinstance(after[-1], JobResult)


def dearest_ticket(payments: list[PaymentSent]) -> Fraction:
    """The EV of the dearest ticket a job paid with: C4's "one ticket" when the first window
    went with first-window parameters (spec 8.11) and the rest with the job's."""
    paid_before = [Fraction(0), *(p.ev_paid for p in payments[:-1])]
    return max(
        (p.ev_paid - before) / p.tickets for p, before in zip(payments, paid_before, strict=True)
    )
