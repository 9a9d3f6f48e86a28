"""The stall deadline (spec 15.1): k measured progress intervals plus a floor, pure."""

from __future__ import annotations

import pytest

from broadcaster.failover import FailoverPolicy
from broadcaster.stall import (
    DEFAULT_STALL_FACTOR,
    DEFAULT_STALL_FLOOR,
    WARMUP_GAPS,
    ProgressClock,
    ProgressHistory,
    StallRule,
    stall_timeout,
)

RULE = StallRule(factor=3.0, floor=0.25, first_step_timeout=30.0, finish_timeout=20.0)


def deadline(**kw: object) -> float:
    args: dict[str, object] = {
        "delivered": 5,
        "steps": 20,
        "interval": None,
        "first_step": None,
        "promised": 0.0,
    }
    args.update(kw)
    return stall_timeout(RULE, **args)  # type: ignore[arg-type]


def test_k_intervals_plus_the_floor_not_the_larger() -> None:
    assert deadline(interval=0.02) == pytest.approx(3 * 0.02 + 0.25)
    assert deadline(interval=2.0) == pytest.approx(3 * 2.0 + 0.25)


def test_before_the_first_step_the_measured_first_step_or_the_first_step_timeout() -> None:
    assert deadline(delivered=0, steps=None) == 30.0
    assert deadline(delivered=0, steps=20, first_step=0.5) == pytest.approx(1.75)


def test_after_the_last_step_the_finish_timeout() -> None:
    assert deadline(delivered=20, steps=20, interval=0.02) == 20.0


def test_one_step_without_an_interval_waits_the_first_step_timeout() -> None:
    assert deadline(delivered=1, interval=None) == 30.0


def test_a_status_promise_is_honoured_twice_over() -> None:
    assert deadline(interval=0.02, promised=5.0) == 10.0
    assert deadline(delivered=20, steps=20, promised=15.0) == 30.0
    assert deadline(interval=0.02, promised=0.01) == pytest.approx(0.31)


def test_the_policy_carries_the_spec_defaults() -> None:
    rule = FailoverPolicy().rule
    assert (rule.factor, rule.floor) == (DEFAULT_STALL_FACTOR, DEFAULT_STALL_FLOOR)
    assert FailoverPolicy(stall_factor=2.0, stall_floor=0.5).rule.floor == 0.5


def test_clock_needs_two_arrivals() -> None:
    clock = ProgressClock()
    assert clock.interval is None
    clock.observe(10.0)
    assert clock.interval is None
    clock.observe(10.1)
    assert clock.interval == pytest.approx(0.1)


def test_clock_keeps_the_longest_recent_gap() -> None:
    """A window boundary (preview, payment) or a burst of jitter raises the deadline."""
    clock = ProgressClock(keep=4)
    t = 0.0
    for gap in (0.02, 0.02, 0.02, 0.09, 0.02):
        t += gap
        clock.observe(t)
    assert clock.interval == pytest.approx(0.09)


def test_clock_forgets_an_old_spike_slowly() -> None:
    clock = ProgressClock(keep=4, alpha=0.5)
    t = 0.0
    clock.observe(t)
    for gap in (1.0, 0.02, 0.02, 0.02, 0.02, 0.02):
        t += gap
        clock.observe(t)
    # Out of the recent gaps; the average remembers a little of it.
    assert 0.02 < clock.interval < 0.1  # type: ignore[operator]


def test_clock_ignores_time_going_backwards() -> None:
    clock = ProgressClock()
    clock.observe(5.0)
    clock.observe(4.0)
    assert clock.interval == 0.0


def test_clock_counts_the_first_step_until_it_has_seen_a_few_gaps() -> None:
    """Two quick steps after a slow start say little about the third."""
    clock = ProgressClock(sent_at=0.0)
    clock.observe(0.9)  # the first step, payment round trip included
    assert clock.interval == pytest.approx(0.9)
    t = 0.9
    for _ in range(WARMUP_GAPS - 1):
        t += 0.02
        clock.observe(t)
        assert clock.interval == pytest.approx(0.9)
    clock.observe(t + 0.02)
    assert clock.interval == pytest.approx(0.02)


def test_earlier_jobs_gaps_set_a_new_jobs_first_deadlines() -> None:
    """A job whose first gaps are quick is judged by the longest gap that orchestrator
    showed lately, not by its own two quick steps (a burst of load then trips nothing)."""
    alone, seeded = ProgressClock(0.0), ProgressClock(0.0, prior=[0.05, 0.30, 0.06])
    for clock in (alone, seeded):
        for now in (0.04, 0.08, 0.12):
            clock.observe(now)
    assert alone.interval == pytest.approx(0.04)
    assert seeded.interval == pytest.approx(0.30)
    assert seeded.seen == pytest.approx([0.04, 0.04])  # its own gaps only


def test_a_jobs_own_gaps_push_the_earlier_ones_out() -> None:
    clock = ProgressClock(0.0, keep=4, prior=[0.5, 0.5])
    for i in range(1, 6):
        clock.observe(0.1 * i)
    assert clock.interval == pytest.approx(0.1)


def test_history_keeps_gaps_and_first_steps_per_orchestrator_model_and_size() -> None:
    history = ProgressHistory(keep_gaps=3)
    history.record("ws://a", "m", 4096, [0.1, 0.2, 0.3, 0.4], 0.5)
    history.record("ws://a", "m", 4096, [], 0.9)
    history.record("ws://a", "m", 4096, [0.05], None)
    assert history.gaps("ws://a", "m", 4096) == pytest.approx([0.3, 0.4, 0.05])
    assert history.first_step("ws://a", "m", 4096) == 0.9  # the longest lately
    assert history.gaps("ws://b", "m", 4096) == [] and history.gaps("ws://a", "m", 1) == []
    assert history.first_step("ws://a", "other", 4096) is None
