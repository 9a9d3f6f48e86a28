"""When a job leaves an orchestrator that is alive: a deadline it will miss there, or a
queue it should not wait in (spec 4.6, M6, M7). Pure decisions, no I/O.

Both only move a job where another offer is measured (or claims) to do
better; an orchestrator that is merely late, with nobody faster, finishes
the job late rather than losing it.
"""

from __future__ import annotations

from collections.abc import Callable

from broadcaster.selection import Candidate, for_deadline
from protocol.job_events import JobStatus


def too_slow(
    *,
    rate: float,
    left: int,
    now: float,
    deadline_at: float,
    pixels: int,
    others: Callable[[], list[Candidate]],
) -> str | None:
    """Why the job should move for its deadline, or None while it can still make it here.

    `rate` is the steps per second seen on this try, `left` the steps to go,
    `others()` the orchestrators that could take it instead (asked only when
    the projection is late).
    """
    if rate <= 0 or left <= 0:
        return None
    projected = now + left / rate
    if projected <= deadline_at:
        return None
    if not for_deadline(others(), pixels * left, deadline_at - now):
        return None  # nobody else is measured to do better: finish here, late
    return (
        f"projected finish {projected - deadline_at:.2f} s past the deadline "
        f"at {rate:.1f} steps/s with {left} steps left"
    )


def leave_queue(
    event: JobStatus,
    *,
    chosen: Candidate,
    others: list[Candidate],
    pixel_steps: int,
    now: float,
    deadline_at: float | None,
) -> tuple[str, str] | None:
    """Whether the job leaves the queue it waits in (spec 4.6), as (reason, detail), or
    None to wait: `queued` to go to an orchestrator with a free slot now; with a
    deadline the queue's estimate says this one cannot make, `queued` to go to one
    projected to make it, else `deadline` to give up unpaid (M6, M7: the wait counts)."""
    place = f"queued at position {event.queue_position}"
    free = [c for c in others if c.has_room]
    if free:
        return "queued", f"{place}; {free[0].url} has a free slot"
    if deadline_at is None or not event.estimated_start_ms:
        return None
    start = event.estimated_start_ms / 1000
    finish = start + (chosen.projected_seconds(pixel_steps) or 0.0)
    if now + finish <= deadline_at:
        return None
    late = (
        f"{place} at {chosen.url}, expected to start in {start:.2f} s and finish in "
        f"{finish:.2f} s, past the deadline by {now + finish - deadline_at:.2f} s"
    )
    if for_deadline(others, pixel_steps, deadline_at - now):
        return "queued", late
    return "deadline", f"no offer can finish within the deadline: {late}"
