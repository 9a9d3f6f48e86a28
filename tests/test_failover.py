"""Each failover trigger, over real websockets with the real tiny pipeline.

The faulty orchestrator (tests/loopback.py: faults in its runner, or on its
wire) misbehaves right after step 4; every progress carries the latents, so
the broadcaster holds step 4's and the new orchestrator resumes from there.
"""

from __future__ import annotations

import secrets

import pytest

from broadcaster.failover import FailoverPolicy
from broadcaster.session import BroadcasterSession
from pipelines.tiny import TINY_SD
from protocol.job_events import Accepted, JobError, JobResult, OrchestratorChanged, ProgressUpdate
from tests.failover_helpers import (
    assert_old_paid_at_most_one_window_ahead,
    collect,
    pixels,
    runner_trying_first,
    small,
    split_at_change,
)
from tests.loopback import FaultPlan, WireFaults, loopback_orchestrator

pytestmark = pytest.mark.anyio

STEPS, EVERY = 8, 2


async def uninterrupted(url: str) -> JobResult:
    async with BroadcasterSession(url, secrets.token_bytes(32)) as session:
        events = [e async for e in session.generate(small(STEPS), model_id=TINY_SD)]
    assert isinstance(events[-1], JobResult)
    return events[-1]


@pytest.mark.parametrize(
    ("plan", "reason"),
    [
        (FaultPlan(stall_after=4), "stall"),
        (WireFaults(close_after=4), "disconnect"),
        (WireFaults(crash_after=4), "disconnect"),
        (FaultPlan(error_after=4), "error"),
        (WireFaults(malformed_after=4), "error"),
    ],
    ids=["stall", "disconnect", "crash", "error", "malformed"],
)
async def test_job_moves_and_resumes(
    tiny_model: object, plan: FaultPlan | WireFaults, reason: str
) -> None:
    runner_faults = plan if isinstance(plan, FaultPlan) else None
    wire = plan if isinstance(plan, WireFaults) else None
    async with (
        loopback_orchestrator(tiny_model, runner_faults, wire=wire) as bad,
        loopback_orchestrator(tiny_model) as good,
    ):
        runner = await runner_trying_first(bad.url, [bad.url, good.url])
        events = await collect(runner, small(STEPS), EVERY)
        before, change, after = split_at_change(events)
        assert (change.old, change.new, change.reason) == (bad.url, good.url, reason)
        assert bad.fired
        result = events[-1]
        assert isinstance(result, JobResult) and result.steps == STEPS

        # Stopped paying at once: the old orchestrator got what the broadcaster
        # paid before the change, at most one window beyond what it delivered.
        assert_old_paid_at_most_one_window_ahead(before, change)
        assert bad.orch.stats.ev_received == change.paid

        # The failed orchestrator sits out; the good one does not.
        assert runner.suspensions.reason(bad.url) is not None
        assert runner.suspensions.reason(good.url) is None
        assert runner.metrics.get(bad.url, TINY_SD).failures == 1
        # What each try showed of its node's rhythm is kept for the next job's deadlines.
        gaps_seen = runner.metrics.progress.gaps
        assert len(gaps_seen(bad.url, TINY_SD, 64 * 64)) == 3  # steps 1-4 arrived there
        assert len(gaps_seen(good.url, TINY_SD, 64 * 64)) == STEPS - 4 - 1
        assert runner.metrics.progress.first_step(good.url, TINY_SD, 64 * 64) is not None

        # Resumed from the last delivered step: no delivered step ran twice.
        assert change.resumed and change.from_step == 4
        steps_seen = [e.step for e in events if isinstance(e, ProgressUpdate)]
        assert steps_seen == list(range(1, STEPS + 1))
        # The new orchestrator quoted, was paid for and ran only the steps left.
        quote = next(e for e in after if isinstance(e, Accepted))
        assert quote.steps == STEPS - 4 and quote.fee == change.step_fee * (STEPS - 4)
        # ...and the image is the one an uninterrupted run gives for the seed.
        reference = await uninterrupted(good.url)
        assert (pixels(result) == pixels(reference)).all()


async def test_too_slow_for_the_deadline(tiny_model: object) -> None:
    """A cheap orchestrator measured fast slows down partway; the deadline moves the job."""
    slow_plan = FaultPlan(slow_after=1, slow_step_seconds=3.0)
    policy = FailoverPolicy(stall_floor=10.0, first_step_timeout=60.0)
    async with (
        loopback_orchestrator(tiny_model, slow_plan, price=1) as cheap,
        loopback_orchestrator(tiny_model, price=2) as dear,
    ):
        runner = await runner_trying_first(cheap.url, [cheap.url, dear.url], policy)
        # Both are measured fast enough for the deadline: the deadline rule picks the
        # cheaper first; its seven slow steps (21 s) then project past the deadline.
        events = await collect(runner, small(STEPS), EVERY, deadline=15.0)
        before, change, after = split_at_change(events)
        assert (change.old, change.new, change.reason) == (cheap.url, dear.url, "too_slow")
        assert "past the deadline" in change.detail
        assert isinstance(events[-1], JobResult)
        assert_old_paid_at_most_one_window_ahead(before, change)
        assert cheap.orch.stats.ev_received == change.paid


async def test_restart_when_the_next_one_cannot_resume(tiny_model: object) -> None:
    async with (
        loopback_orchestrator(tiny_model, FaultPlan(error_after=4)) as bad,
        loopback_orchestrator(tiny_model) as good,
    ):
        runner = await runner_trying_first(
            bad.url, [bad.url, good.url], FailoverPolicy(stall_floor=10.0, resume=False)
        )
        events = await collect(runner, small(STEPS), EVERY)
        _, change, after = split_at_change(events)
        assert not change.resumed and change.from_step == 0
        assert [e.step for e in after if isinstance(e, ProgressUpdate)][0] == 1
        assert next(e for e in after if isinstance(e, Accepted)).steps == STEPS
        assert isinstance(events[-1], JobResult)


async def test_gives_up_naming_each_try(tiny_model: object) -> None:
    policy = FailoverPolicy(stall_floor=10.0, max_orchestrators=2)
    async with (
        loopback_orchestrator(tiny_model, wire=WireFaults(crash_after=2)) as a,
        loopback_orchestrator(tiny_model, FaultPlan(error_after=1)) as b,
        loopback_orchestrator(tiny_model) as c,
    ):
        runner = await runner_trying_first(a.url, [a.url, b.url, c.url], policy)
        # All stake on a and b: c, which would work, is beyond the bound of two tries.
        runner.selection.stakes = {a.url: 1, b.url: 1}
        events = await collect(runner, small(STEPS), EVERY)
    error = events[-1]
    assert isinstance(error, JobError) and error.code == "no_orchestrator"
    assert "gave up after 2 orchestrators" in error.message
    assert f"{a.url} (disconnect: connection closed" in error.message
    assert f"{b.url} (error: pipeline_failed" in error.message
    assert "1. " in error.message and "2. " in error.message
    assert c.orch.stats.jobs_accepted == 0


async def test_no_capacity_refusal_does_not_suspend(tiny_model: object) -> None:
    async with (
        loopback_orchestrator(tiny_model, capacity=1, max_queued=0) as busy,  # no queue
        loopback_orchestrator(tiny_model) as free,
    ):
        runner = await runner_trying_first(busy.url, [busy.url, free.url])
        # Full after discovery asked it: the runner learns it from the refusal.
        next(iter(busy.orch.slots.values())).in_use = 1
        events = await collect(runner, small(4), EVERY)
        _, change, _ = split_at_change(events)
        assert change.reason == "refused" and change.detail.startswith("no_capacity")
        assert isinstance(events[-1], JobResult)
        assert runner.suspensions.reason(busy.url) is None
        assert busy.orch.stats.tickets_received == 0
        assert isinstance(events[0], OrchestratorChanged)  # refused before any other event


async def test_a_slow_orchestrator_with_no_alternative_finishes_the_job(tiny_model: object) -> None:
    """A stall moves a job only where it can go: alone, a slow orchestrator is waited for."""
    # Steps of 1.5 s against a 0.2 s stall floor: each one would count as a stall.
    policy = FailoverPolicy(stall_floor=0.2, stall_factor=1.0, alone_timeout=30.0)
    async with loopback_orchestrator(
        tiny_model, FaultPlan(slow_after=1, slow_step_seconds=1.5)
    ) as slow:
        runner = await runner_trying_first(slow.url, [slow.url], policy)
        events = await collect(runner, small(3), 1)
    assert not [e for e in events if isinstance(e, OrchestratorChanged)]
    assert isinstance(events[-1], JobResult) and events[-1].steps == 3


async def test_a_lone_orchestrator_that_failed_still_gets_the_next_job(tiny_model: object) -> None:
    """Suspension orders choices; it must not refuse every job when nothing else is left."""
    async with loopback_orchestrator(tiny_model, FaultPlan(error_after=1)) as lone:
        runner = await runner_trying_first(lone.url, [lone.url])
        failed = await collect(runner, small(3), 1)
        assert isinstance(failed[-1], JobError)
        assert runner.suspensions.reason(lone.url) is not None
        lone.plan = FaultPlan()  # it recovers
        events = await collect(runner, small(3), 1)
    assert isinstance(events[-1], JobResult)
