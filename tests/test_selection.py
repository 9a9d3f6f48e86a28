"""Selection: filters, warm before cold, maximum price, exploration, speed, deadline."""

from __future__ import annotations

import random
import secrets
from collections import Counter
from fractions import Fraction

import pytest

from broadcaster.discovery import Discovery, OrchestratorStatus, parse_orchestrator_urls
from broadcaster.failover import JobRunner
from broadcaster.metrics_store import MetricsStore
from broadcaster.selection import (
    LIVEPEER_WEIGHTS,
    NoOrchestrator,
    SelectionConfig,
    candidates,
    choose,
)
from broadcaster.suspension import Suspensions
from pipelines.tiny import TINY_SD
from protocol.job_events import JobResult
from protocol.messages import Capability, Info, TicketParams
from tests.failover_helpers import TEST_POLICY, collect, small
from tests.loopback import FaultPlan, loopback_orchestrator

PIXEL_STEPS = 64 * 64 * 8
TP = TicketParams(bytes(20), 1, 1, bytes(32), bytes(32), 1)


def status(url: str, *, warm: bool = True, price: int = 1, in_use: int = 0) -> OrchestratorStatus:
    cap = Capability("text-to-image", TINY_SD, warm, 2, in_use, Fraction(price))
    return OrchestratorStatus(url, Info(bytes(20), (cap,), TP, 1 << 20), None, 0.0)


def found(statuses: list[OrchestratorStatus], metrics: MetricsStore, **kw: object) -> list:
    args: dict = dict(max_price=None, exclude={}, stakes={}, suspensions=Suspensions())
    result, _ = candidates(
        statuses, pipeline="text-to-image", model_id=TINY_SD, metrics=metrics, **{**args, **kw}
    )
    return result


def picks(cands: list, n: int = 2000, seed: int = 1, **kw: object) -> Counter:
    rng = random.Random(seed)
    config = SelectionConfig(**kw)  # type: ignore[arg-type]
    return Counter(choose(cands, config, rng, pixel_steps=PIXEL_STEPS).url for _ in range(n))


def test_warm_before_cold_and_maximum_price() -> None:
    metrics = MetricsStore()
    for url in ("ws://warm", "ws://cold", "ws://dear"):
        metrics.record_speed(url, TINY_SD, 1e5)
    statuses = [
        status("ws://cold", warm=False),
        status("ws://warm"),
        status("ws://dear", price=50),
        OrchestratorStatus("ws://down", None, "connection refused", 0.0),
    ]
    cands = found(statuses, metrics, max_price=Fraction(10))
    assert {c.url for c in cands} == {"ws://warm", "ws://cold"}
    assert picks(cands) == Counter({"ws://warm": 2000})
    # A full warm orchestrator falls behind a cold one with room.
    statuses[1] = status("ws://warm", in_use=2)
    assert picks(found(statuses, metrics, max_price=Fraction(10))) == Counter({"ws://cold": 2000})
    # With nothing under the maximum, the reasons say why.
    _, why = candidates(
        statuses,
        pipeline="text-to-image",
        model_id=TINY_SD,
        max_price=Fraction(0),
        metrics=metrics,
        suspensions=Suspensions(),
        exclude={},
        stakes={},
    )
    assert "above the maximum" in why["ws://dear"] and "unreachable" in why["ws://down"]


def test_measured_faster_gets_more_and_unmeasured_are_explored() -> None:
    metrics = MetricsStore()
    metrics.record_speed("ws://fast", TINY_SD, 4e5)
    metrics.record_speed("ws://slow", TINY_SD, 1e5)
    cands = found([status("ws://fast"), status("ws://slow"), status("ws://new")], metrics)
    counts = picks(cands, weights=LIVEPEER_WEIGHTS)
    assert counts["ws://fast"] > 2 * counts["ws://slow"] > 0
    assert counts["ws://new"] > 0.3 * 2000  # explored about half of the time
    # With stake configured, the default profile is go-livepeer's: stake 0.7, random 0.3.
    staked = found([status("ws://fast"), status("ws://slow")], metrics, stakes={"ws://slow": 1})
    for c in staked:
        object.__setattr__(c, "stake", 1 if c.url == "ws://slow" else 0)
    counts = picks(staked)
    assert counts["ws://slow"] == pytest.approx(2000 * (0.7 + 0.15), rel=0.08)


def test_deadline_takes_the_cheapest_that_is_measured_to_make_it() -> None:
    metrics = MetricsStore()
    metrics.record_speed("ws://fast-dear", TINY_SD, 1e6)
    metrics.record_speed("ws://ok-cheap", TINY_SD, 1e5)
    metrics.record_speed("ws://slow-cheapest", TINY_SD, 1e3)
    cands = found(
        [
            status("ws://fast-dear", price=9),
            status("ws://ok-cheap", price=3),
            status("ws://slow-cheapest", price=1),
            status("ws://unmeasured", price=1),
        ],
        metrics,
    )
    rng = random.Random(0)
    config = SelectionConfig()
    # 32768 pixel-steps: 0.03 s, 0.33 s, 33 s and unknown.
    assert choose(cands, config, rng, pixel_steps=PIXEL_STEPS, deadline=1.0).url == "ws://ok-cheap"
    assert choose(cands, config, rng, pixel_steps=PIXEL_STEPS, deadline=0.1).url == "ws://fast-dear"
    with pytest.raises(NoOrchestrator, match="fast enough") as info:
        choose(cands, config, rng, pixel_steps=PIXEL_STEPS, deadline=0.001)
    assert info.value.reasons["ws://unmeasured"] == "not measured yet"


def test_suspension_expires_and_grows() -> None:
    now = [0.0]
    suspensions = Suspensions(penalty=10, clock=lambda: now[0])
    assert suspensions.suspend("ws://a", "stall") == 10
    metrics = MetricsStore()
    assert found([status("ws://a")], metrics, suspensions=suspensions) == []
    now[0] = 10.0
    assert suspensions.reason("ws://a") is None
    assert suspensions.suspend("ws://a", "stall") == 20  # a second strike sits out longer
    suspensions.clear("ws://a")
    assert suspensions.reason("ws://a") is None


def test_metrics_survive_a_restart(tmp_path: object) -> None:
    path = tmp_path / "metrics.sqlite3"  # type: ignore[operator]
    store = MetricsStore(path, alpha=0.5)
    store.record_speed("ws://a", TINY_SD, 100.0)
    store.record_speed("ws://a", TINY_SD, 200.0)
    store.record_first_step("ws://a", TINY_SD, 0.5)
    store.record_outcome("ws://a", TINY_SD, timed_out=True)
    store.record_outcome("ws://a", TINY_SD)
    store.close()
    again = MetricsStore(path).get("ws://a", TINY_SD)
    assert again.pixel_steps_per_second == 150.0
    assert (again.first_step_seconds, again.jobs, again.failures, again.timeouts) == (0.5, 2, 1, 1)
    assert MetricsStore(path).get("ws://b", TINY_SD).measured is False


def test_orchestrator_lists(tmp_path: object) -> None:
    listing = tmp_path / "orchestrators.txt"  # type: ignore[operator]
    listing.write_text("# mine\nws://c:1\n\nws://a:1  # again\n")
    urls = parse_orchestrator_urls(["ws://a:1,ws://b:1", "ws://a:1"], listing)
    assert urls == ["ws://a:1", "ws://b:1", "ws://c:1"]
    with pytest.raises(ValueError, match="not a ws"):
        parse_orchestrator_urls(["http://a"])


@pytest.mark.anyio
async def test_measured_speed_drives_selection_over_many_jobs(tiny_model: object) -> None:
    """Real jobs measure both; then the measured-faster one is chosen more often."""
    async with (
        loopback_orchestrator(tiny_model) as fast,
        loopback_orchestrator(tiny_model, FaultPlan(step_seconds=0.15)) as slow,
    ):
        urls = [fast.url, slow.url, "ws://127.0.0.1:9"]  # the last one is down
        discovery = Discovery(urls, secrets.token_bytes(32), info_timeout=1.0)
        await discovery.refresh()
        assert [s.reachable for s in discovery.statuses] == [True, True, False]
        runner = JobRunner(
            discovery,
            secrets.token_bytes(32),
            selection=SelectionConfig(explore=1.0),
            policy=TEST_POLICY,
            rng=random.Random(5),
        )
        for _ in range(2):  # both unmeasured: each is explored once
            events = await collect(runner, small(4), 2)
            assert isinstance(events[-1], JobResult)
        assert fast.orch.stats.jobs_accepted == slow.orch.stats.jobs_accepted == 1
        speed_fast = runner.metrics.get(fast.url, TINY_SD).pixel_steps_per_second
        speed_slow = runner.metrics.get(slow.url, TINY_SD).pixel_steps_per_second
        assert speed_fast and speed_slow and speed_fast > speed_slow
        cands = found(discovery.statuses, runner.metrics)
        counts = picks(cands, n=1000)
        assert counts[fast.url] > counts[slow.url]
