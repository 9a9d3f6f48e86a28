"""Selection: filters, warm before cold, maximum price, exploration, speed, deadline."""

from __future__ import annotations

import random
import secrets
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest

from broadcaster.discovery import Discovery, OrchestratorStatus, parse_orchestrator_urls
from broadcaster.failover import JobRunner
from broadcaster.hardware import GIB, HardwareFilter, HardwareFilterError
from broadcaster.metrics_store import MetricsStore
from broadcaster.selection import (
    LIVEPEER_WEIGHTS,
    DeadlineUnmeetable,
    NoOrchestrator,
    SelectionConfig,
    candidates,
    choose,
)
from broadcaster.suspension import Suspensions
from pipelines.tiny import TINY_SD
from protocol.job_events import JobResult
from protocol.messages import Capability, Device, Info, TicketParams
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
    with pytest.raises(DeadlineUnmeetable, match="the fastest, ws://fast-dear") as info:
        choose(cands, config, rng, pixel_steps=PIXEL_STEPS, deadline=0.001)
    assert info.value.reasons["ws://unmeasured"] == "not measured yet, and claims no speed"
    with pytest.raises(NoOrchestrator, match="fast enough"):  # nothing projected at all
        choose(cands[3:], config, rng, pixel_steps=PIXEL_STEPS, deadline=0.001)


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
        loopback_orchestrator(tiny_model, FaultPlan(step_seconds=0.6)) as slow,  # beats load
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


# ------------------------------------------------ hardware and claims (spec 4.5)


def offer(
    url: str, *, claim: float | None = None, devices: tuple = (), in_use: int = 0
) -> OrchestratorStatus:
    """An offer of the tiny model claiming `claim` pixel-steps per second (None: no claim)."""
    step = {} if claim is None else {"step_seconds": 64 * 64 / claim, "step_pixels": 64 * 64}
    cap = Capability("text-to-image", TINY_SD, True, 2, in_use, Fraction(1), **step)
    return OrchestratorStatus(url, Info(bytes(20), (cap,), TP, 1 << 20, devices=devices), None, 0)


def test_hardware_filters_by_vram_and_gpu_name() -> None:
    h100 = Device("cuda:0", "NVIDIA H100 80GB HBM3", 80 * GIB, 70 * GIB, (TINY_SD,))
    rtx = Device("cuda:0", "NVIDIA GeForce RTX 4090", 24 * GIB, 20 * GIB, ())
    cpu = Device("cpu", "cpu")
    statuses = [
        offer("ws://h100", devices=(h100,)),
        offer("ws://4090", devices=(rtx,)),
        offer("ws://cpu", devices=(cpu,)),
        offer("ws://silent"),  # lists no device
    ]
    metrics = MetricsStore()

    def kept(**kw: object) -> tuple[list[str], dict[str, str]]:
        hardware = HardwareFilter.parse(kw.get("min_vram"), kw.get("gpu"))  # type: ignore[arg-type]
        found_, why = candidates(
            statuses,
            pipeline="text-to-image",
            model_id=TINY_SD,
            max_price=None,
            metrics=metrics,
            suspensions=Suspensions(),
            exclude={},
            stakes={},
            hardware=hardware,
        )
        return [c.url for c in found_], why

    assert kept()[0] == ["ws://h100", "ws://4090", "ws://cpu", "ws://silent"]
    urls, why = kept(min_vram="24")
    assert urls == ["ws://h100", "ws://4090"]
    assert "cpu" in why["ws://cpu"] and "at least 24 GiB" in why["ws://cpu"]
    assert "lists no device" in why["ws://silent"]
    assert kept(min_vram=40)[0] == ["ws://h100"]
    assert kept(gpu="4090")[0] == ["ws://4090"]  # no wildcard: a part of the name
    assert kept(gpu="nvidia h100*")[0] == ["ws://h100"]  # shell pattern, any case
    assert kept(gpu="cpu")[0] == ["ws://cpu"]
    assert kept(gpu="4090", min_vram=30)[0] == []
    for bad in ("lots", "-1"):
        with pytest.raises(HardwareFilterError):
            HardwareFilter.parse(bad, None)


def test_an_unmeasured_node_is_ranked_by_its_claim() -> None:
    """Spec M5: the claim is the prior: among unmeasured nodes the fastest claim is tried
    first; once measured, the measurement replaces the claim."""
    metrics = MetricsStore()
    statuses = [offer("ws://modest", claim=2e4), offer("ws://bold", claim=8e4), offer("ws://mute")]
    cands = found(statuses, metrics)
    assert set(picks(cands, n=50)) == {"ws://bold"}
    assert cands[1].projected_seconds(PIXEL_STEPS) == PIXEL_STEPS / 8e4
    assert cands[2].projected_seconds(PIXEL_STEPS) is None
    metrics.record_speed("ws://bold", TINY_SD, 1e3, claimed=8e4)
    cands = found(statuses, metrics)
    assert cands[1].expected_speed == 1e3  # measured: the claim no longer counts
    assert cands[1].projected_seconds(PIXEL_STEPS) == pytest.approx(PIXEL_STEPS / 1e3)
    # Only the unmeasured are explored (explore=1), the best claim first.
    assert set(picks(cands, n=50, explore=1.0)) == {"ws://modest"}


def test_a_node_that_delivers_far_less_than_it_claims_is_marked_and_the_mark_kept(
    tmp_path: Path,
) -> None:
    db = tmp_path / "metrics.sqlite3"
    metrics = MetricsStore(db)
    metrics.record_speed("ws://liar", TINY_SD, 1e4, claimed=4e4)  # alone: nothing to compare
    assert metrics.marked_down(TINY_SD) == []
    metrics.record_speed("ws://honest", TINY_SD, 3e4, claimed=4e4)  # overheads: 75 % of it
    metrics.record_speed("ws://optimist", TINY_SD, 2.4e4, claimed=4e4)  # 60 %: not a liar
    assert metrics.marked_down(TINY_SD) == ["ws://liar"]
    metrics.close()
    reopened = MetricsStore(db)
    assert reopened.get("ws://liar", TINY_SD).marked_down
    assert not reopened.get("ws://honest", TINY_SD).marked_down
    statuses = [offer("ws://liar", claim=4e4), offer("ws://honest", claim=4e4)]
    # Marked: chosen only when nothing unmarked can take the job.
    assert set(picks(found(statuses, reopened), n=200)) == {"ws://honest"}
    assert set(picks(found(statuses[:1], reopened), n=5)) == {"ws://liar"}


def test_an_unmeetable_deadline_names_the_fastest_offer() -> None:
    """Spec M6: no projection (measured, else claimed) fits: refused, naming the fastest."""
    metrics = MetricsStore()
    metrics.record_speed("ws://measured", TINY_SD, 1e4)
    statuses = [offer("ws://claims", claim=2e4), offer("ws://measured"), offer("ws://mute")]
    cands = found(statuses, metrics)
    with pytest.raises(DeadlineUnmeetable) as info:
        choose(cands, SelectionConfig(), random.Random(1), pixel_steps=10**6, deadline=5.0)
    assert info.value.fastest == "ws://claims"
    assert info.value.seconds == pytest.approx(50.0)
    assert "the fastest, ws://claims, is projected to finish in 50.00 s" in str(info.value)
    assert "projected 100.00 s (measured)" in str(info.value)
    chosen = choose(cands, SelectionConfig(), random.Random(1), pixel_steps=10**6, deadline=60)
    assert chosen.url == "ws://claims"  # a claim is enough to be tried for a deadline
