"""Leaving a live orchestrator for a deadline or a queue (broadcaster/deadlines.py), pure."""

from __future__ import annotations

from fractions import Fraction

from broadcaster.deadlines import leave_queue, too_slow
from broadcaster.metrics_store import SpeedRecord
from broadcaster.selection import Candidate
from pipelines.tiny import TINY_SD
from protocol.job_events import JobStatus
from protocol.messages import Capability

PIXELS = 64 * 64


def offer(url: str, speed: float | None, in_use: int = 0) -> Candidate:
    cap = Capability("text-to-image", TINY_SD, True, 1, in_use, Fraction(1))
    return Candidate(url, cap, SpeedRecord(url, TINY_SD, speed, None, 1, 0, 0))


def asked(found: list[Candidate]) -> tuple[list[int], object]:
    calls: list[int] = []

    def others() -> list[Candidate]:
        calls.append(1)
        return found

    return calls, others


def test_on_time_stays_and_does_not_look_elsewhere() -> None:
    calls, others = asked([offer("ws://fast", PIXELS * 100.0)])
    kw = {"left": 10, "now": 0.0, "deadline_at": 1.0, "pixels": PIXELS, "others": others}
    assert too_slow(rate=20.0, **kw) is None  # 0.5 s to go, 1 s left
    assert calls == []  # the other offers are not even asked


def test_late_moves_only_where_someone_is_measured_to_make_it() -> None:
    kw = {"left": 10, "now": 0.0, "deadline_at": 1.0, "pixels": PIXELS}
    _, faster = asked([offer("ws://fast", PIXELS * 100.0)])
    _, slower = asked([offer("ws://slow", PIXELS * 5.0)])
    why = too_slow(rate=5.0, others=faster, **kw)  # 2 s to go
    assert why is not None and "1.00 s past the deadline" in why
    assert too_slow(rate=5.0, others=slower, **kw) is None  # nobody better: finish late


def status(position: int, start_ms: int) -> JobStatus:
    return JobStatus(
        job_id="j", phase="queued", next_within_ms=4000,
        queue_position=position, estimated_start_ms=start_ms,
    )  # fmt: skip


def test_a_queue_is_left_for_a_free_slot_and_otherwise_waited_in() -> None:
    here = offer("ws://busy", PIXELS * 100.0, in_use=1)
    kw = {"chosen": here, "pixel_steps": PIXELS * 20, "now": 0.0, "deadline_at": None}
    free, full = offer("ws://free", None), offer("ws://full", None, in_use=1)
    assert leave_queue(status(2, 500), others=[free], **kw) == (
        "queued",
        "queued at position 2; ws://free has a free slot",
    )
    assert leave_queue(status(2, 500), others=[full], **kw) is None


def test_a_queue_past_the_deadline_is_left_unpaid_when_nobody_can_make_it() -> None:
    here = offer("ws://busy", PIXELS * 100.0, in_use=1)
    kw = {"chosen": here, "others": [], "pixel_steps": PIXELS * 20, "now": 0.0}
    assert leave_queue(status(1, 500), deadline_at=1.0, **kw) is None  # 0.5 + 0.2 s: in time
    reason, detail = leave_queue(status(3, 5000), deadline_at=1.0, **kw) or ("", "")
    assert reason == "deadline" and "no offer can finish within the deadline" in detail
