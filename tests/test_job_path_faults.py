"""One regression test per fault found on the runner path (issue: one path), each forcing
its interleaving with an event or a paused transport; none sleeps."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from fractions import Fraction
from typing import Any

import anyio
import anyio.abc
import pytest
from websockets.asyncio.client import connect

from broadcaster.failover import FailoverPolicy
from pipelines.job_pipeline import job_pipeline
from pipelines.loader import LoadedModel
from pipelines.tiny import TINY_SD
from protocol.errors import ErrorCode
from protocol.job_events import JobResult, OrchestratorChanged
from protocol.messages import Cancel, Cancelled, Error, JobAccepted, JobRequest, Result
from protocol.runner import Awaiting, Done, Failed, Grant, Message, Plan, Run, Stop
from runner.server import RunnerConfig, RunnerServer
from tests.failover_helpers import collect, pixels, runner_trying_first, small
from tests.loopback import FaultPlan, loopback_orchestrator
from tests.test_network import RawClient

pytestmark = pytest.mark.anyio
BOUND = 60.0


class Recorder:
    """A runner connection's sending side, as a list, with a wait for a frame."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self._changed = anyio.Event()

    async def send(self, message: Message) -> None:
        self.sent.append(message)
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_for(self, match: Any) -> Message:
        with anyio.fail_after(BOUND):
            while True:
                for message in self.sent:
                    if match(message):
                        return message
                await self._changed.wait()


def runner_with(model: LoadedModel) -> RunnerServer:
    server = RunnerServer(RunnerConfig(device="cpu", token="t"))
    server.models[model.model_id] = model
    return server


@contextlib.asynccontextmanager
async def dispatching(jobs: dict[str, Any]) -> AsyncIterator[anyio.abc.TaskGroup]:
    """A task group for a runner connection's jobs that stops them all when left,
    so a failing test ends instead of waiting on a job thread forever."""
    async with anyio.create_task_group() as tg:
        try:
            yield tg
        finally:
            for job in list(jobs.values()):
                job.stop(Stop(job.request.job_id, "internal_error", "test over"))


def job_request(steps: int = 4, job_id: str = "j") -> JobRequest:
    return JobRequest(
        job_id=job_id, pipeline="text-to-image", model_id=TINY_SD, params=small(steps)
    )


async def test_a_grant_right_behind_its_run_is_not_dropped(tiny_model: LoadedModel) -> None:
    """Was: the runner registered a job in a task, so a grant read before that task ran was
    dropped, and the paid job hung at step 0. Here both frames are handled back to back."""
    server, out, jobs = runner_with(tiny_model), Recorder(), {}
    async with dispatching(jobs) as tg:
        server._dispatch(Run(job_request(4), 1, 0), jobs, out.send, tg)
        server._dispatch(Grant("j", 2), jobs, out.send, tg)
        await out.wait_for(lambda m: isinstance(m, Done) and m.step == 2)
        waiting = await out.wait_for(lambda m: isinstance(m, Awaiting) and m.next_step == 3)
        assert waiting is not None
        server._dispatch(Stop("j", "cancelled"), jobs, out.send, tg)
        await out.wait_for(lambda m: isinstance(m, Failed))
    assert not [m for m in out.sent if isinstance(m, Awaiting) and m.next_step == 1]


async def test_a_stop_right_behind_its_run_ends_the_job(tiny_model: LoadedModel) -> None:
    """Was: a cancel just after `accepted` reached the runner before its job existed; the
    job then waited for a grant forever and held its slot (a free denial of service)."""
    server, out, jobs = runner_with(tiny_model), Recorder(), {}
    async with dispatching(jobs) as tg:
        server._dispatch(Run(job_request(4), 1, 0), jobs, out.send, tg)
        server._dispatch(Stop("j", "cancelled", "by the broadcaster"), jobs, out.send, tg)
        failed = await out.wait_for(lambda m: isinstance(m, Failed))
    assert failed.code == "cancelled"
    assert jobs == {}


async def test_a_cancel_the_moment_a_job_is_accepted_frees_its_slot(
    tiny_model: LoadedModel,
) -> None:
    async with loopback_orchestrator(tiny_model, capacity=1) as lo, connect(lo.url) as ws:
        client = RawClient(ws)
        await client.hello()
        for i in range(5):
            await client.send(job_request(4, job_id=f"j{i}"))
            assert isinstance(await client.recv(), JobAccepted)
            await client.send(Cancel(job_id=f"j{i}"))
            with anyio.fail_after(BOUND):
                while not isinstance(reply := await client.recv(), Cancelled | Error):
                    pass
            assert isinstance(reply, Cancelled) and reply.steps == 0
            assert lo.orch.slots[("text-to-image", TINY_SD)].in_use == 0


async def test_capacity_holds_when_jobs_arrive_together(tiny_model: LoadedModel) -> None:
    """Was: the capacity check and the count had awaits between them, so two jobs ran on a
    capacity of 1. Here the first job is held at its runner's plan (a paused transport)
    while the second arrives."""
    async with loopback_orchestrator(tiny_model, capacity=1) as lo:
        planning, release = anyio.Event(), anyio.Event()
        answer_plan = lo.runner._answer_plan

        async def paused_plan(plan: Plan, send: Any) -> None:
            planning.set()
            await release.wait()
            await answer_plan(plan, send)

        lo.runner._answer_plan = paused_plan  # type: ignore[method-assign]
        async with connect(lo.url) as first_ws, connect(lo.url) as second_ws:
            first, second = RawClient(first_ws), RawClient(second_ws)
            await first.hello()
            await second.hello()
            await first.send(job_request())
            with anyio.fail_after(BOUND):
                await planning.wait()
            try:
                await second.send(job_request())
                with anyio.fail_after(BOUND):
                    refusal = await second.recv()
            finally:
                release.set()  # a failing test must not hold the server's shutdown
            assert isinstance(refusal, Error) and refusal.code == ErrorCode.NO_CAPACITY.value
            assert isinstance(await first.recv(), JobAccepted)
        assert lo.orch.stats.jobs_accepted == 1


async def test_two_broadcasters_may_use_the_same_job_id(tiny_model: LoadedModel) -> None:
    """Job ids are B's, unique on one connection only; on the runner they must not meet.
    Both jobs are held at their runner's plan (a paused transport) so they overlap."""
    async with loopback_orchestrator(tiny_model, capacity=2) as lo:
        plans, release = [], anyio.Event()
        both = anyio.Event()
        answer_plan = lo.runner._answer_plan

        async def paused_plan(plan: Plan, send: Any) -> None:
            plans.append(plan.request.job_id)
            if len(plans) == 2:
                both.set()
            await release.wait()
            await answer_plan(plan, send)

        lo.runner._answer_plan = paused_plan  # type: ignore[method-assign]
        async with connect(lo.url) as a_ws, connect(lo.url) as b_ws:
            clients = [RawClient(a_ws), RawClient(b_ws)]
            for client in clients:
                await client.hello()
                await client.send(job_request(2, job_id="same"))
            try:
                with anyio.fail_after(BOUND):
                    await both.wait()
            finally:
                release.set()
            assert len(set(plans)) == 2 and "same" not in plans
            for client in clients:
                quote = await client.recv()
                assert isinstance(quote, JobAccepted) and quote.job_id == "same"
                payment = client.sender.pay("same", quote.ticket_params, 2)
                await client.send(payment)
            for client in clients:
                with anyio.fail_after(BOUND):
                    while not isinstance(reply := await client.recv(), Result | Error):
                        pass
                assert isinstance(reply, Result) and reply.job_id == "same", reply


def test_jobs_in_flight_never_share_a_tokenizer(
    tiny_model: LoadedModel, tiny_sdxl_model: LoadedModel
) -> None:
    """Was: every job used the model's one fast tokenizer, whose padding and truncation
    settings each call rewrites: concurrent jobs got wrong images or size errors."""
    for model in (tiny_model, tiny_sdxl_model):
        names = ["tokenizer", "tokenizer_2"] if model.family == "sdxl" else ["tokenizer"]
        with job_pipeline(model) as a, job_pipeline(model) as b:
            for name in names:
                shared = getattr(model.pipe, name)
                assert getattr(a, name) is not getattr(b, name)
                assert shared not in (getattr(a, name), getattr(b, name))
            held = {id(getattr(a, n)) for n in names}
        with job_pipeline(model) as c:  # a set given back is lent again, not copied anew
            assert {id(getattr(c, n)) for n in names} <= held | {id(getattr(b, n)) for n in names}
        assert model.tokenizers.copies == 2


async def test_a_second_move_resumes_from_the_newest_latents(tiny_model: LoadedModel) -> None:
    """Was: the failover runner rebuilt events positionally, dropping their latents, so a
    second move resumed from the first move's (stale) latents."""
    policy = FailoverPolicy(stall_floor=5.0, first_step_timeout=60.0, max_orchestrators=3)
    # With a deadline, selection takes the cheapest that makes it: a, then b, then c.
    async with (
        loopback_orchestrator(tiny_model, FaultPlan(stall_after=2), price=Fraction(1)) as a,
        # b resumes at step 2; its own third step is step 5 of the schedule.
        loopback_orchestrator(tiny_model, FaultPlan(stall_after=3), price=Fraction(2)) as b,
        loopback_orchestrator(tiny_model, price=Fraction(3)) as c,
    ):
        runner = await runner_trying_first(a.url, [a.url, b.url, c.url], policy)
        events = await collect(runner, small(8), 1, deadline=1000.0)
        reference = await collect(await runner_trying_first(c.url, [c.url], policy), small(8), 1)
    moves = [e for e in events if isinstance(e, OrchestratorChanged)]
    assert [(m.old, m.new, m.from_step, m.resumed) for m in moves] == [
        (a.url, b.url, 2, True),
        (b.url, c.url, 5, True),
    ]
    result, expected = events[-1], reference[-1]
    assert isinstance(result, JobResult) and isinstance(expected, JobResult)
    assert (pixels(result) == pixels(expected)).all()
    assert c.orch.stats.outcomes[0].steps_executed == 3
