"""Observed speed and reliability per orchestrator and model, kept in SQLite across restarts.

Speeds are pixel-steps per second measured from progress events (so jobs of
different sizes compare), smoothed with an exponential moving average; time
to first step is smoothed the same way. Failures and timeouts are counts.

Each speed is kept with the node's claim (spec 4.5: its advertised step
time, as pixel-steps per second) at the time, and a node whose claim
overstates what it delivers OVERCLAIM_FACTOR times more than the most
accurate node of the model does is marked down; the mark is a column, so
it outlives the process, and is recomputed whenever a node of the model is
measured again.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from broadcaster.stall import ProgressHistory

DEFAULT_ALPHA = 0.3
"""Weight of the newest sample in the moving averages."""
OVERCLAIM_FACTOR = 1.5
"""A node is marked down when delivered/claimed is below the best node's ratio divided by
this: a node claiming twice its real speed is, one whose claim is merely optimistic like
everyone's (network and preview overheads) is not."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS speed (
    url TEXT NOT NULL,
    model_id TEXT NOT NULL,
    pixel_steps_per_second REAL,
    first_step_seconds REAL,
    jobs INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    timeouts INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL,
    claimed_pixel_steps_per_second REAL,
    marked_down INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (url, model_id)
)
"""
_ADDED_COLUMNS = {
    "claimed_pixel_steps_per_second": "REAL",
    "marked_down": "INTEGER NOT NULL DEFAULT 0",
}
"""Columns newer than the first schema, added to a file made before them."""


@dataclass(frozen=True)
class SpeedRecord:
    url: str
    model_id: str
    pixel_steps_per_second: float | None
    """None until a job there delivered two progress events."""
    first_step_seconds: float | None
    jobs: int
    failures: int
    timeouts: int
    claimed_pixel_steps_per_second: float | None = None
    """The node's claim when it was last measured (spec 4.5)."""
    marked_down: bool = False
    """It delivers far less than it claims, compared with the other nodes of the model."""

    @property
    def measured(self) -> bool:
        return self.pixel_steps_per_second is not None and self.pixel_steps_per_second > 0

    def seconds_for(self, pixel_steps: int) -> float | None:
        """Projected seconds for a job of `pixel_steps`, start to finish; None if unmeasured."""
        if not self.measured:
            return None
        assert self.pixel_steps_per_second is not None
        return (self.first_step_seconds or 0.0) + pixel_steps / self.pixel_steps_per_second


class MetricsStore:
    """One SQLite file (or ":memory:"); every write is committed at once."""

    def __init__(self, path: str | Path = ":memory:", alpha: float = DEFAULT_ALPHA) -> None:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path))
        self._db.execute(_SCHEMA)
        have = {row[1] for row in self._db.execute("PRAGMA table_info(speed)")}
        for column, kind in _ADDED_COLUMNS.items():
            if column not in have:
                self._db.execute(f"ALTER TABLE speed ADD COLUMN {column} {kind}")
        self._db.commit()
        self.alpha = alpha
        self.progress = ProgressHistory()
        """Recent gaps between progress arrivals, per orchestrator (in memory, not in the
        file): what the next job's stall deadline starts from (broadcaster/stall.py)."""

    def close(self) -> None:
        self._db.close()

    def get(self, url: str, model_id: str) -> SpeedRecord:
        row = self._db.execute(
            "SELECT pixel_steps_per_second, first_step_seconds, jobs, failures, timeouts, "
            "claimed_pixel_steps_per_second, marked_down FROM speed "
            "WHERE url = ? AND model_id = ?",
            (url, model_id),
        ).fetchone()
        if row is None:
            return SpeedRecord(url, model_id, None, None, 0, 0, 0)
        *head, claimed, marked = row
        return SpeedRecord(url, model_id, *head, claimed, bool(marked))

    def _ensure(self, url: str, model_id: str) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO speed (url, model_id, updated) VALUES (?, ?, ?)",
            (url, model_id, time.time()),
        )

    def _smooth(self, old: float | None, new: float) -> float:
        return new if old is None else self.alpha * new + (1 - self.alpha) * old

    def record_speed(
        self,
        url: str,
        model_id: str,
        pixel_steps_per_second: float,
        claimed: float | None = None,
    ) -> None:
        """A measured speed, with what the node claimed for it (None: no claim)."""
        if pixel_steps_per_second <= 0:
            return
        old = self.get(url, model_id)
        self._ensure(url, model_id)
        self._db.execute(
            "UPDATE speed SET pixel_steps_per_second = ?, claimed_pixel_steps_per_second = ?, "
            "updated = ? WHERE url = ? AND model_id = ?",
            (
                self._smooth(old.pixel_steps_per_second, pixel_steps_per_second),
                claimed if claimed else old.claimed_pixel_steps_per_second,
                time.time(),
                url,
                model_id,
            ),
        )
        self._mark(model_id)
        self._db.commit()

    def _mark(self, model_id: str) -> None:
        """Recompute the marks of the model's nodes from delivered/claimed (OVERCLAIM_FACTOR)."""
        rows = self._db.execute(
            "SELECT url, pixel_steps_per_second, claimed_pixel_steps_per_second FROM speed "
            "WHERE model_id = ?",
            (model_id,),
        ).fetchall()
        ratios = {url: speed / claim for url, speed, claim in rows if speed and claim}
        best = max(ratios.values(), default=0.0)
        for url, _speed, _claim in rows:
            ratio = ratios.get(url)
            marked = ratio is not None and ratio * OVERCLAIM_FACTOR < best
            self._db.execute(
                "UPDATE speed SET marked_down = ? WHERE url = ? AND model_id = ?",
                (int(marked), url, model_id),
            )

    def marked_down(self, model_id: str) -> list[str]:
        """The nodes of the model marked down, by URL."""
        rows = self._db.execute(
            "SELECT url FROM speed WHERE model_id = ? AND marked_down = 1 ORDER BY url",
            (model_id,),
        ).fetchall()
        return [url for (url,) in rows]

    def record_first_step(self, url: str, model_id: str, seconds: float) -> None:
        old = self.get(url, model_id).first_step_seconds
        self._ensure(url, model_id)
        self._db.execute(
            "UPDATE speed SET first_step_seconds = ?, updated = ? WHERE url = ? AND model_id = ?",
            (self._smooth(old, seconds), time.time(), url, model_id),
        )
        self._db.commit()

    def record_outcome(
        self, url: str, model_id: str, *, failed: bool = False, timed_out: bool = False
    ) -> None:
        """Count one job there; a timeout counts as a failure too."""
        self._ensure(url, model_id)
        self._db.execute(
            "UPDATE speed SET jobs = jobs + 1, failures = failures + ?, timeouts = timeouts + ?, "
            "updated = ? WHERE url = ? AND model_id = ?",
            (int(failed or timed_out), int(timed_out), time.time(), url, model_id),
        )
        self._db.commit()
