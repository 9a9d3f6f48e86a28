"""Connections that end (spec 3.5): hello and idle timeouts, a cap per client, fatal errors."""

from __future__ import annotations

import secrets
from fractions import Fraction

import anyio
import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from broadcaster.session import BroadcasterSession
from orchestrator.connection_limits import ConnectionLimits
from pipelines.loader import LoadedModel
from pipelines.tiny import TINY_SD
from protocol import codec
from protocol.connection import Connection
from protocol.job_events import JobError, JobResult
from protocol.messages import Capability, Error, Info, Role, TicketParams, error_message
from tests.conftest import orchestrator_on_loopback
from tests.failover_helpers import small
from tests.loopback import FaultPlan
from tests.test_network import RawClient

pytestmark = pytest.mark.anyio
BOUND = 30.0
"""Upper bound on any wait here; the timeouts under test are far shorter."""


async def closed_with(ws: object) -> int | None:
    """Wait (bounded) for the peer to close; the close code it sent."""
    with anyio.fail_after(BOUND):
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await ws.recv()  # type: ignore[attr-defined]
    return closed.value.rcvd.code if closed.value.rcvd else None


async def test_a_silent_connection_is_closed_after_the_hello_timeout(
    tiny_model: LoadedModel,
) -> None:
    limits = ConnectionLimits(hello_timeout=0.2)
    async with (
        orchestrator_on_loopback(tiny_model, limits=limits) as running,
        connect(running.url) as ws,
    ):
        with anyio.fail_after(BOUND):
            reply = codec.decode(await ws.recv())
        assert isinstance(reply, Error) and reply.code == "idle_timeout"
        assert reply.job_id is None and "hello" in reply.message
        assert await closed_with(ws) == 1000


async def test_an_idle_connection_is_closed_between_jobs(tiny_model: LoadedModel) -> None:
    """The idle clock runs after info and after each job, never during one."""
    limits = ConnectionLimits(idle_timeout=0.5)
    # Each step takes 0.3 s more: the 4-step job lasts longer than the idle timeout.
    async with (
        orchestrator_on_loopback(
            tiny_model, plan=FaultPlan(step_seconds=0.3), limits=limits
        ) as running,
        BroadcasterSession(running.url, secrets.token_bytes(32)) as session,
    ):
        events = [e async for e in session.generate(small(4), model_id=TINY_SD)]
        assert isinstance(events[-1], JobResult)
        assert session._ws is not None
        with anyio.fail_after(BOUND):
            reply = session._conn.receive(await session._ws.recv())
        assert isinstance(reply, Error) and reply.code == "idle_timeout"
        assert await closed_with(session._ws) == 1000


async def test_connections_per_client_are_capped(tiny_model: LoadedModel) -> None:
    limits = ConnectionLimits(max_connections_per_client=2)
    async with orchestrator_on_loopback(tiny_model, limits=limits) as running:
        async with connect(running.url) as a, connect(running.url) as b:
            for ws in (a, b):
                await RawClient(ws).hello()
            async with connect(running.url) as c:
                with anyio.fail_after(BOUND):
                    reply = codec.decode(await c.recv())
                assert isinstance(reply, Error) and reply.code == "too_many_connections"
                assert await closed_with(c) == 1008
            await a.close()
        # A slot freed is a slot to use: the count follows connections that end.
        with anyio.fail_after(BOUND):
            while running.orch._clients:
                await anyio.wait_all_tasks_blocked()
        async with connect(running.url) as d:
            info = await RawClient(d).hello()
            assert isinstance(info, Info)


async def test_a_fatal_error_from_the_broadcaster_closes_the_socket(
    tiny_model: LoadedModel,
) -> None:
    async with orchestrator_on_loopback(tiny_model) as running, connect(running.url) as ws:
        client = RawClient(ws)
        await client.hello()
        await client.send(error_message("internal_error", "the broadcaster gives up"))
        assert await closed_with(ws) is not None


async def test_the_broadcaster_closes_on_a_fatal_error() -> None:
    """An orchestrator that answers a job with a fatal error, then keeps its socket open."""
    closed = anyio.Event()
    params = TicketParams(bytes(20), 1, 1, bytes(32), bytes(32), 1)
    offer = Capability("text-to-image", TINY_SD, True, 1, 0, Fraction(1))

    async def rude(ws: ServerConnection) -> None:
        conn = Connection(Role.ORCHESTRATOR)
        conn.receive(await ws.recv())  # hello
        info = Info(
            orchestrator=bytes(20),
            capabilities=(offer,),
            ticket_params=params,
            max_frame_bytes=1 << 24,
        )
        await ws.send(conn.send(info))
        conn.receive(await ws.recv())  # the job
        await ws.send(codec.encode(error_message("internal_error", "going away")))
        await ws.wait_closed()  # only the broadcaster's close ends this
        closed.set()

    async with serve(rude, "127.0.0.1", 0) as server:
        url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        async with BroadcasterSession(url, secrets.token_bytes(32)) as session:
            events = [e async for e in session.generate(small(4), model_id=TINY_SD)]
            assert isinstance(events[-1], JobError) and events[-1].code == "internal_error"
            with anyio.fail_after(BOUND):
                await closed.wait()
