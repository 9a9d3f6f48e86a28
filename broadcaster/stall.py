"""When a job that makes no progress counts as stalled (spec 15.1): pure decisions, no I/O.

The deadline is k measured intervals plus a small floor, not the larger of
the two: k scales with the orchestrator's own speed and the floor absorbs
the jitter that does not (the network, a busy scheduler), so a fast
orchestrator is left quickly and a slow one is not left early. The interval
is the gap between `progress` arrivals as B sees it, estimated robustly: the
largest of the recent gaps and a slow moving average, so that the longer
gaps at window boundaries (a preview, a payment round trip) and a burst of
jitter under CPU load raise the deadline instead of tripping it. The gaps
of earlier jobs on the same orchestrator, model and size (ProgressHistory)
count among them, so a job's first steps are judged by the jitter that
orchestrator has shown, not by the two or three gaps seen so far.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

DEFAULT_STALL_FACTOR = 3.0
"""k: a stall is no progress within k measured intervals (plus the floor)."""
DEFAULT_STALL_FLOOR = 0.15
"""Seconds added to every deadline: jitter that does not scale with the step time."""


class ProgressClock:
    """Gaps between `progress` arrivals: the interval a stall deadline scales with."""

    def __init__(
        self,
        sent_at: float | None = None,
        keep: int = 16,
        alpha: float = 0.2,
        prior: Iterable[float] = (),
    ) -> None:
        self._sent_at = sent_at
        """When the job was sent: the first arrival after it is the first step's time."""
        self._first: float | None = None
        self._gaps: deque[float] = deque(prior, maxlen=keep)
        """The last `keep` gaps: two windows of 8 steps, so a window boundary is always in.
        It starts with `prior`, earlier jobs' gaps there, which this job's push out."""
        self.seen: list[float] = []
        """This try's own gaps, in order (what ProgressHistory keeps for the next job)."""
        self._alpha = alpha
        self._average: float | None = None
        self._last: float | None = None

    def observe(self, now: float) -> None:
        """One `progress` arrived at `now` (monotonic seconds)."""
        if self._last is None:
            if self._sent_at is not None:
                self._first = max(0.0, now - self._sent_at)
        else:
            gap = max(0.0, now - self._last)
            self._gaps.append(gap)
            self.seen.append(gap)
            a = self._alpha
            self._average = gap if self._average is None else a * gap + (1 - a) * self._average
        self._last = now

    @property
    def interval(self) -> float | None:
        """The robust interval estimate; None before any arrival (or one, without `sent_at`).

        While fewer than WARMUP_GAPS gaps were seen, the first step's time
        (setup and the first payment included, so never less than a step)
        stands in as well: two quick steps say little about the third.
        """
        if self._average is None:
            if self._first is None:
                return None
            return max(self._first, *self._gaps) if self._gaps else self._first
        measured = max(max(self._gaps), self._average)
        if len(self._gaps) < WARMUP_GAPS and self._first is not None:
            return max(measured, self._first)
        return measured


WARMUP_GAPS = 4
"""Gaps seen before the measured ones alone set the interval."""


class ProgressHistory:
    """What earlier jobs showed of each orchestrator's rhythm: their last gaps between
    `progress` arrivals and their first-step times, per (url, model, pixels per step).

    Kept in memory only: jitter belongs to the machine's load of now, and a
    broadcaster that runs many jobs (a gateway) is the one that needs it.
    """

    def __init__(self, keep_gaps: int = 16, keep_first_steps: int = 8) -> None:
        self._gaps: dict[tuple[str, str, int], deque[float]] = {}
        self._firsts: dict[tuple[str, str, int], deque[float]] = {}
        self._keep_gaps, self._keep_firsts = keep_gaps, keep_first_steps

    def gaps(self, url: str, model_id: str, pixels: int) -> list[float]:
        """The last gaps seen there, oldest first (empty: no job seen)."""
        return list(self._gaps.get((url, model_id, pixels), ()))

    def first_step(self, url: str, model_id: str, pixels: int) -> float | None:
        """The longest of the recent first-step times there, or None."""
        firsts = self._firsts.get((url, model_id, pixels))
        return max(firsts) if firsts else None

    def record(
        self, url: str, model_id: str, pixels: int, gaps: list[float], first_step: float | None
    ) -> None:
        key = (url, model_id, pixels)
        if gaps:
            self._gaps.setdefault(key, deque(maxlen=self._keep_gaps)).extend(gaps)
        if first_step is not None:
            self._firsts.setdefault(key, deque(maxlen=self._keep_firsts)).append(first_step)


@dataclass(frozen=True)
class StallRule:
    """The numbers behind every stall deadline (FailoverPolicy carries them)."""

    factor: float = DEFAULT_STALL_FACTOR
    floor: float = DEFAULT_STALL_FLOOR
    first_step_timeout: float = 30.0
    """Before the first step, when no first-step time was measured for the orchestrator."""
    finish_timeout: float = 30.0
    """After the last step (the decode and the output)."""


def stall_timeout(
    rule: StallRule,
    *,
    delivered: int,
    steps: int | None,
    interval: float | None,
    first_step: float | None,
    promised: float = 0.0,
) -> float:
    """Seconds from the last sign of life to a stall.

    `delivered` steps of `steps` (None before `accepted`) have arrived;
    `interval` is the measured gap between progress messages on this try
    (ProgressClock.interval; a caller without one passes a speed measured
    before, or None); `first_step` is
    the first-step time measured on this orchestrator before (None: never);
    `promised` is what the orchestrator's last `status` said its next
    message would take (spec 9.6), honoured twice over.
    """
    if steps is not None and delivered >= steps:
        timeout = rule.finish_timeout
    elif delivered == 0:
        timeout = (
            rule.first_step_timeout if first_step is None else rule.factor * first_step + rule.floor
        )
    elif interval is None:
        timeout = rule.first_step_timeout
    else:
        timeout = rule.factor * interval + rule.floor
    return max(timeout, 2 * promised)
