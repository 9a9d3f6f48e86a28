"""Orchestrators that failed a job sit out for a while; the penalty expires.

Each new failure doubles the penalty (up to a cap), and a success clears the
record, so a node that failed once comes back soon and one that keeps
failing stays out longer. Time comes from a clock function so that tests
can move it without sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_PENALTY_SECONDS = 30.0
DEFAULT_MAX_PENALTY_SECONDS = 600.0


@dataclass
class _Record:
    strikes: int
    until: float
    reason: str


class Suspensions:
    def __init__(
        self,
        penalty: float = DEFAULT_PENALTY_SECONDS,
        max_penalty: float = DEFAULT_MAX_PENALTY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.penalty = penalty
        self.max_penalty = max_penalty
        self.clock = clock
        self._records: dict[str, _Record] = {}

    def suspend(self, url: str, reason: str) -> float:
        """Suspend `url`; returns the seconds it sits out."""
        record = self._records.get(url)
        strikes = record.strikes + 1 if record else 1
        seconds = min(self.max_penalty, self.penalty * 2 ** (strikes - 1))
        self._records[url] = _Record(strikes, self.clock() + seconds, reason)
        return seconds

    def clear(self, url: str) -> None:
        self._records.pop(url, None)

    def reason(self, url: str) -> str | None:
        """Why `url` is suspended now, or None when it is not (its penalty expired)."""
        record = self._records.get(url)
        if record is None or self.clock() >= record.until:
            return None
        return record.reason
