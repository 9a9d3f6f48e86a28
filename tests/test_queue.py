"""A full orchestrator queues a job instead of refusing it (spec 4.6): the job waits unpaid,
told its place, and starts when a slot frees; B may cancel it meanwhile."""

from __future__ import annotations

import json
import secrets
from fractions import Fraction
from pathlib import Path

import anyio
import anyio.abc
import pytest

from broadcaster.discovery import Discovery
from broadcaster.failover import JobRunner
from broadcaster.gateway.event_json import event_json
from broadcaster.gateway.hub import SUPERSEDING
from broadcaster.metrics_store import MetricsStore
from broadcaster.session import BroadcasterSession
from pipelines.loader import LoadedModel
from pipelines.tiny import TINY_SD
from protocol.job_events import (
    Accepted,
    Event,
    JobError,
    JobResult,
    JobStatus,
    OrchestratorChanged,
    PaymentSent,
)
from runner.faults import FAULTS_ENV
from stepstream.processes import model_entry, orchestrator_process
from tests.failover_helpers import TEST_POLICY, runner_trying_first, small
from tests.loopback import FaultPlan, loopback_orchestrator

pytestmark = pytest.mark.anyio


async def hold_the_slot(
    tg: anyio.abc.TaskGroup, session: BroadcasterSession, events: list[Event] | None = None
) -> None:
    """Start a 4-step job on `session` in `tg` and return once it is accepted: it then holds
    the slot until it ends (its events go to `events`)."""
    accepted = anyio.Event()

    async def run() -> None:
        async for event in session.generate(small(4), model_id=TINY_SD, preview_every=2):
            if events is not None:
                events.append(event)
            if isinstance(event, Accepted):
                accepted.set()

    tg.start_soon(run)
    await accepted.wait()


async def queue_scenario(url: str) -> tuple[list[Event], list[Event], list[int]]:
    """Job A takes the only slot; job B, sent while A runs, waits in the queue and runs once A
    ends. Returns A's events, B's events, and the `queued` count a third connection saw."""
    key = secrets.token_bytes(32)
    a_events: list[Event] = []
    b_events: list[Event] = []
    queued_seen: list[int] = []
    async with (
        BroadcasterSession(url, key) as a,
        BroadcasterSession(url, key) as b,
        BroadcasterSession(url, key) as watcher,
        anyio.create_task_group() as tg,
    ):
        await hold_the_slot(tg, a, a_events)
        async for event in b.generate(small(4), model_id=TINY_SD, preview_every=2):
            b_events.append(event)
            if isinstance(event, JobStatus) and event.phase == "queued" and not queued_seen:
                queued_seen.append((await watcher.refresh_info()).capabilities[0].queued)
    return a_events, b_events, queued_seen


def check_queued_then_ran(a_events: list[Event], b_events: list[Event]) -> None:
    assert isinstance(a_events[-1], JobResult), a_events[-1]
    assert isinstance(b_events[-1], JobResult), b_events[-1]
    accepted_at = next(i for i, e in enumerate(b_events) if isinstance(e, Accepted))
    waiting = b_events[:accepted_at]
    assert waiting and all(isinstance(e, JobStatus) and e.phase == "queued" for e in waiting)
    assert waiting[0].queue_position == 1  # type: ignore[union-attr]
    assert not [e for e in waiting if isinstance(e, PaymentSent)]  # nothing paid while queued
    # B was accepted only once A had ended (capacity 1): A's result came first.
    assert b_events[-1].steps == 4


async def test_a_full_orchestrator_queues_a_job_and_starts_it_when_a_slot_frees(
    tiny_model: LoadedModel,
) -> None:
    async with loopback_orchestrator(tiny_model, FaultPlan(step_seconds=0.5), capacity=1) as lo:
        a_events, b_events, queued_seen = await queue_scenario(lo.url)
        check_queued_then_ran(a_events, b_events)
        assert queued_seen == [1]
        assert lo.orch.stats.jobs_accepted == 2 and lo.orch.stats.jobs_refused == 0
        assert lo.orch.slots[("text-to-image", TINY_SD)].in_use == 0


async def test_a_queued_job_may_be_cancelled_unpaid(tiny_model: LoadedModel) -> None:
    async with loopback_orchestrator(tiny_model, FaultPlan(step_seconds=0.5), capacity=1) as lo:
        key = secrets.token_bytes(32)
        events: list[Event] = []
        async with (
            BroadcasterSession(lo.url, key) as a,
            BroadcasterSession(lo.url, key) as b,
            anyio.create_task_group() as tg,
        ):
            await hold_the_slot(tg, a)
            async for event in b.generate(small(4), model_id=TINY_SD, job_id="queued-1"):
                events.append(event)
                if isinstance(event, JobStatus):
                    await b.cancel("queued-1")
        assert isinstance(events[-1], JobError) and events[-1].code == "cancelled"
        assert not [e for e in events if isinstance(e, Accepted | PaymentSent)]
        slot = lo.orch.slots[("text-to-image", TINY_SD)]
        assert slot.queue == [] and slot.in_use == 0
        assert lo.orch.stats.jobs_accepted == 1


async def test_queue_through_the_real_processes(tmp_path: Path) -> None:
    """The same, with `stepstream orchestrator` and its runner as separate processes."""
    env = {FAULTS_ENV: json.dumps({"step_seconds": 0.5})}
    with orchestrator_process(tmp_path, [model_entry(capacity=1)], env=env) as orch:
        a_events, b_events, queued_seen = await queue_scenario(orch.url)
    check_queued_then_ran(a_events, b_events)
    assert queued_seen == [1]


async def test_a_queued_job_goes_where_a_slot_is_free(tiny_model: LoadedModel) -> None:
    """B decides: queued where another orchestrator has a free slot, it leaves the queue
    (unpaid, not suspended) and runs there."""
    async with (
        loopback_orchestrator(tiny_model, capacity=1) as busy,
        loopback_orchestrator(tiny_model) as free,
    ):
        runner = await runner_trying_first(busy.url, [busy.url, free.url])
        slot = busy.orch.slots[("text-to-image", TINY_SD)]
        slot.in_use = 1  # full after discovery asked it: the runner learns it from the queue
        events = [e async for e in runner.generate(small(4), model_id=TINY_SD, preview_every=2)]
        queued = [e for e in events if isinstance(e, JobStatus) and e.phase == "queued"]
        assert queued and queued[0].queue_position == 1
        (change,) = [e for e in events if isinstance(e, OrchestratorChanged)]
        assert change.reason == "queued" and f"{free.url} has a free slot" in change.detail
        assert change.paid == 0 and change.delivered_steps == 0
        assert isinstance(events[-1], JobResult)
        assert runner.suspensions.reason(busy.url) is None
        assert busy.orch.stats.tickets_received == 0 and busy.orch.stats.jobs_accepted == 0


async def test_waiting_in_a_queue_counts_against_the_deadline(tiny_model: LoadedModel) -> None:
    """Spec M7: queued where the estimate says the job would start in 30 s, a job due in 10 s
    cannot make it, and no other orchestrator can: it leaves the queue unpaid with
    `deadline_unmeetable` rather than wait (and the orchestrator is not suspended)."""
    async with loopback_orchestrator(tiny_model, capacity=1) as busy:
        slot = busy.orch.slots[("text-to-image", TINY_SD)]
        metrics = MetricsStore()
        metrics.record_speed(busy.url, TINY_SD, 1e6)  # the run itself: a few hundredths
        discovery = Discovery([busy.url], secrets.token_bytes(32))
        await discovery.refresh()
        slot.in_use, slot.job_seconds = 1, 30.0  # one job running, jobs take 30 s here
        runner = JobRunner(discovery, secrets.token_bytes(32), metrics=metrics, policy=TEST_POLICY)
        job = runner.generate(small(4), model_id=TINY_SD, preview_every=2, deadline=10.0)
        events = [e async for e in job]
        queued = [e for e in events if isinstance(e, JobStatus) and e.phase == "queued"]
        assert queued and queued[0].estimated_start_ms == 30_000
        error = events[-1]
        assert isinstance(error, JobError) and error.code == "deadline_unmeetable"
        assert (
            "queued at position 1" in error.message and "expected to start in 30" in error.message
        )
        assert not [e for e in events if isinstance(e, Accepted | PaymentSent)]
        assert busy.orch.stats.jobs_accepted == 0 and busy.orch.stats.tickets_received == 0
        assert runner.suspensions.reason(busy.url) is None


async def test_the_gateway_streams_the_place_in_the_queue() -> None:
    """Apps see `queued` (GATEWAY.md 3), one at a time: a newer one replaces an older one."""
    status = JobStatus(
        job_id="j", phase="queued", next_within_ms=4000, queue_position=2, estimated_start_ms=1500
    )
    earlier = (Fraction(0), Fraction(0), 0)
    assert event_json(status, earlier) == {
        "type": "queued",
        "position": 2,
        "estimated_start_seconds": 1.5,
    }
    unknown = JobStatus(
        job_id="j", phase="queued", next_within_ms=4000, queue_position=1, estimated_start_ms=0
    )
    assert event_json(unknown, earlier)["estimated_start_seconds"] is None  # type: ignore[index]
    loading = JobStatus(job_id="j", phase="loading", next_within_ms=4000)
    assert event_json(loading, earlier) is None
    assert "queued" in SUPERSEDING


async def test_a_wait_in_the_queue_does_not_count_as_a_first_step(
    tiny_model: LoadedModel,
) -> None:
    """The first-step time that later stall deadlines scale with (spec 15.1) runs from
    `accepted`: a job that waited seconds in a queue does not teach B to wait seconds
    for the next job's first step there."""
    async with loopback_orchestrator(tiny_model, FaultPlan(step_seconds=0.5), capacity=1) as lo:
        runner = JobRunner(
            Discovery([lo.url], secrets.token_bytes(32)), secrets.token_bytes(32),
            metrics=MetricsStore(), policy=TEST_POLICY,
        )  # fmt: skip
        async with (
            BroadcasterSession(lo.url, secrets.token_bytes(32)) as a,
            anyio.create_task_group() as tg,
        ):
            await hold_the_slot(tg, a)
            sent = anyio.current_time()
            accepted = None
            async for event in runner.generate(small(4), model_id=TINY_SD, preview_every=2):
                if isinstance(event, Accepted):
                    accepted = anyio.current_time()
        assert accepted is not None and accepted - sent > 1.0  # it waited for A's 4 slow steps
        first = runner.metrics.progress.first_step(lo.url, TINY_SD, 64 * 64)
        assert first is not None and first < (accepted - sent) / 2
