"""The first window paid with the job, and connections kept between jobs (spec 8.11, 3.5),
through a real `stepstream orchestrator` process and its runner process."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Iterator
from fractions import Fraction

import anyio
import pytest
from websockets.asyncio.server import ServerConnection, serve

from broadcaster.discovery import Discovery
from broadcaster.failover import JobRunner
from broadcaster.pool import SessionPool
from broadcaster.session import BroadcasterSession
from conformance.wire import Wire
from pipelines.tiny import TINY_SD
from protocol import codec
from protocol.connection import Connection
from protocol.credit import plan_first_payment
from protocol.job_events import Accepted, Event, JobError, JobResult, PaymentSent, ProgressUpdate
from protocol.messages import (
    FEATURE_FIRST_PAYMENT,
    FEATURES,
    Cancel,
    Cancelled,
    Capability,
    Credit,
    Error,
    FirstPayment,
    Info,
    JobAccepted,
    JobRequest,
    Progress,
    Result,
    Role,
    TextToImageParams,
    TicketParams,
    error_message,
)
from protocol.pm import ticket_ev
from protocol.sender import TicketSender
from stepstream.processes import ChildServer, model_entry, orchestrator_process
from tests.failover_helpers import TEST_POLICY

pytestmark = pytest.mark.anyio
BOUND = 60.0
"""Upper bound on any wait here."""
IDLE = 2.0
"""The orchestrator's idle timeout (spec 3.5): short, so that a test sees it close."""


@pytest.fixture(scope="module")
def orchestrator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChildServer]:
    with orchestrator_process(
        tmp_path_factory.mktemp("first-payment"),
        [model_entry(TINY_SD, capacity=2)],
        extra_args=["--runners", "1", "--idle-timeout", str(IDLE)],
    ) as child:
        yield child


def small(steps: int = 6) -> TextToImageParams:
    return TextToImageParams(
        prompt="a lighthouse", width=64, height=64, num_inference_steps=steps, seed=3
    )


def with_first_window(
    info: Info, sender: TicketSender, job_id: str, every: int, steps: int = 6
) -> JobRequest:
    """A job carrying its first window's tickets, planned as the reference broadcaster does."""
    cap = next(c for c in info.capabilities if c.model_id == TINY_SD)
    window = cap.price_per_pixel_step * 64 * 64 * min(every, steps)
    evs = [ticket_ev(p.face_value, p.win_prob) for p in info.first_params]
    plan = plan_first_payment(evs, window)
    assert plan is not None and plan.tickets <= 4
    payment = sender.pay(job_id, info.first_params[plan.index], plan.tickets)
    first = FirstPayment(ticket_params=payment.ticket_params, tickets=payment.tickets)
    return JobRequest(job_id, "text-to-image", TINY_SD, small(steps), every, first_payment=first)


async def test_a_job_with_its_first_window_attached_runs_without_a_separate_payment(
    orchestrator: ChildServer,
) -> None:
    sender = TicketSender(secrets.token_bytes(32))
    wire = await Wire.open(orchestrator.url, sender, BOUND)
    try:
        info = await wire.hello((FEATURE_FIRST_PAYMENT,))
        assert len(info.first_params) == 15
        await wire.send(with_first_window(info, sender, "first", every=3))
        seen = await wire.recv_until(lambda m: isinstance(m, Progress) and m.step == 3)
        accepted, credit = seen[0], seen[1]
        assert isinstance(accepted, JobAccepted) and isinstance(credit, Credit)
        assert credit.covered_steps >= 3 and credit.credit > accepted.credit
        # Three steps ran on the attached window alone: no `payment` was ever sent.
        assert [m.step for m in seen if isinstance(m, Progress)] == [1, 2, 3]
        await wire.send(Cancel(job_id="first"))  # free the slot before the next test
        await wire.recv_until(lambda m: isinstance(m, Cancelled | Result | Error))
    finally:
        await wire.close()


async def test_a_refused_attached_payment_starts_nothing(orchestrator: ChildServer) -> None:
    """K18: a bad ticket answers the job with its K2 code instead of `accepted`."""
    sender = TicketSender(secrets.token_bytes(32))
    wire = await Wire.open(orchestrator.url, sender, BOUND)
    try:
        info = await wire.hello((FEATURE_FIRST_PAYMENT,))
        request = with_first_window(info, sender, "forged", every=3)
        assert request.first_payment is not None
        tickets = request.first_payment.tickets
        forged = dataclasses.replace(tickets[0], sender_nonce=tickets[0].sender_nonce + 100)
        bad = dataclasses.replace(request.first_payment, tickets=(forged, *tickets[1:]))
        await wire.send(dataclasses.replace(request, first_payment=bad))
        reply = await wire.recv()
        assert isinstance(reply, Error) and reply.job_id == "forged"
        assert reply.code == "ticket_bad_signature"
        # The connection goes on: the next job, paid properly, runs.
        await wire.send(with_first_window(info, sender, "after", every=2, steps=2))
        seen = await wire.recv_until(lambda m: isinstance(m, Result | Error))
        assert isinstance(seen[0], JobAccepted) and isinstance(seen[-1], Result)
    finally:
        await wire.close()


async def run(session: BroadcasterSession, every: int = 3) -> list[Event]:
    with anyio.fail_after(BOUND):
        return [e async for e in session.generate(small(), model_id=TINY_SD, preview_every=every)]


async def test_two_jobs_reuse_one_connection_and_pay_their_first_window_with_the_job(
    orchestrator: ChildServer,
) -> None:
    async with BroadcasterSession(orchestrator.url, secrets.token_bytes(32)) as session:
        for _ in range(2):
            events = await run(session)
            assert isinstance(events[-1], JobResult)
            accepted, attached = events[0], events[1]
            assert isinstance(accepted, Accepted) and isinstance(attached, PaymentSent)
            first_step = next(i for i, e in enumerate(events) if isinstance(e, ProgressUpdate))
            assert first_step == 2  # nothing paid between the quote and the first step
            assert events[-1].fee <= events[-1].ev_paid + events[-1].ev_carried
        assert session.connections == 1


async def test_an_old_client_without_the_feature_still_works(orchestrator: ChildServer) -> None:
    old = frozenset(FEATURES - {FEATURE_FIRST_PAYMENT})
    async with BroadcasterSession(orchestrator.url, secrets.token_bytes(32), features=old) as s:
        assert s.info is not None and s.info.first_params == ()
        events = await run(s)
        assert isinstance(events[-1], JobResult)
        paid = [e for e in events if isinstance(e, PaymentSent)]
        assert events.index(paid[0]) > 0 and isinstance(events[0], Accepted)


async def test_a_pooled_connection_closed_by_the_orchestrator_is_replaced(
    orchestrator: ChildServer,
) -> None:
    pool = SessionPool(secrets.token_bytes(32))
    try:
        async with pool.session(orchestrator.url) as session:
            assert isinstance((await run(session))[-1], JobResult)
        assert pool.idle(orchestrator.url) == 1
        assert session._ws is not None
        with anyio.fail_after(BOUND):  # the orchestrator closes it after IDLE seconds (L1)
            await session._ws.wait_closed()
        async with pool.session(orchestrator.url) as again:
            assert again is session and not again.reusable
            events = await run(again)
        assert isinstance(events[-1], JobResult), events[-1]
        assert not any(isinstance(e, JobError) for e in events)
        assert session.connections == 2 and pool.opened == 1
    finally:
        await pool.aclose()


async def test_the_gateway_runner_pools_its_connections(orchestrator: ChildServer) -> None:
    key = secrets.token_bytes(32)
    runner = JobRunner(
        Discovery([orchestrator.url], key), key, policy=TEST_POLICY, pool_connections=True
    )
    try:
        for _ in range(3):
            with anyio.fail_after(BOUND):
                events = [e async for e in runner.generate(small(), model_id=TINY_SD)]
            assert isinstance(events[-1], JobResult), events[-1]
        assert runner.pool is not None and runner.pool.opened == 1
    finally:
        await runner.aclose()


async def test_a_job_that_crossed_an_idle_close_goes_again_on_a_fresh_connection() -> None:
    """O closes an idle connection just as B's next job is on its way (spec 3.5): O never
    read the job, so B sends it again on a new connection and reports no failure."""
    connections: list[int] = []
    offer = Capability("text-to-image", TINY_SD, True, 1, 0, Fraction(1))
    params = TicketParams(bytes(20), 1, 1, bytes(32), bytes(32), 1)

    async def orchestrator(ws: ServerConnection) -> None:
        connections.append(len(connections))
        conn = Connection(Role.ORCHESTRATOR)
        conn.receive(await ws.recv())  # hello
        await ws.send(conn.send(Info(bytes(20), (offer,), params, 1 << 24)))
        job = conn.receive(await ws.recv())
        # Every job is refused (no_capacity: the connection stays), then a second job on
        # the first connection meets the idle close.
        await ws.send(conn.send(error_message("no_capacity", "busy", job.job_id)))  # type: ignore[attr-defined]
        if len(connections) == 1:
            await ws.recv()  # the next job, which "crossed" the close
            await ws.send(codec.encode(error_message("idle_timeout", "no job within 1 s")))
            await ws.close(1000)
            return
        await ws.wait_closed()

    async with serve(orchestrator, "127.0.0.1", 0) as server:
        url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        async with BroadcasterSession(url, secrets.token_bytes(32)) as session:
            for _ in range(2):
                events = [e async for e in session.generate(small(), model_id=TINY_SD)]
                assert isinstance(events[-1], JobError) and events[-1].code == "no_capacity"
            assert session.connections == 2 and len(connections) == 2
