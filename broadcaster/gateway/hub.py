"""Each job's events, fanned out to any number of subscribers without unbounded buffers.

Events are JSON-ready dicts with a "type", numbered 1, 2, 3... in the order
the job published them (the SSE `id:`). A subscriber that reads slower
than the job runs does not accumulate previews: progress, preview and
payment events supersede an undelivered event of the same type, so each
subscriber holds at most one of each plus the few events that are never
dropped (accepted, orchestrator_changed, result, error). A subscriber that
joins late first gets the same coalesced replay: everything that must not
be lost and the latest of each superseding kind. A subscriber that resumes
after event N (SSE's Last-Event-ID) gets the part of that replay numbered
after N, so nothing that must not be lost is missed or repeated.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import anyio

SUPERSEDING = frozenset({"progress", "preview", "payment", "queued"})
TERMINAL = frozenset({"result", "error"})

JsonEvent = dict[str, Any]


@dataclass(frozen=True)
class Entry:
    """One published event and its number in the job's stream (from 1)."""

    id: int
    event: JsonEvent


class _Queue:
    """Pending entries in order, where a superseding kind keeps only its newest."""

    def __init__(self) -> None:
        self.entries: deque[Entry] = deque()

    def push(self, entry: Entry) -> None:
        kind = entry.event["type"]
        if kind in SUPERSEDING:
            for old in self.entries:
                if old.event["type"] == kind:
                    self.entries.remove(old)
                    break
        self.entries.append(entry)


class Subscription:
    def __init__(self, stream: JobStream, replay: list[Entry]) -> None:
        self._stream = stream
        self._queue = _Queue()
        for entry in replay:
            self._queue.push(entry)
        self._wake = anyio.Event()
        self.dropped = 0

    @property
    def pending(self) -> int:
        return len(self._queue.entries)

    def push(self, entry: Entry) -> None:
        before = len(self._queue.entries)
        self._queue.push(entry)
        self.dropped += before + 1 - len(self._queue.entries)
        self._wake.set()

    async def next_entry(self) -> Entry | None:
        """The next event and its id, or None once the job has ended and all was delivered.

        Cancelling a wait loses nothing: the event stays queued for the next call.
        """
        while not self._queue.entries:
            if self._stream.finished:
                return None
            await self._wake.wait()
            self._wake = anyio.Event()
        return self._queue.entries.popleft()

    async def next(self) -> JsonEvent | None:
        """The next event, or None once the job has ended and all was delivered."""
        entry = await self.next_entry()
        return None if entry is None else entry.event

    def close(self) -> None:
        self._stream._subscribers.discard(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class JobStream:
    """The event hub of one job."""

    def __init__(self) -> None:
        self._replay = _Queue()
        self._subscribers: set[Subscription] = set()
        self._last_id = 0
        self.finished = False
        self.first_subscriber = anyio.Event()
        self.terminal: JsonEvent | None = None

    @property
    def last_id(self) -> int:
        return self._last_id

    def publish(self, event: JsonEvent) -> None:
        if self.finished:
            return
        self._last_id += 1
        entry = Entry(self._last_id, event)
        self._replay.push(entry)
        for sub in list(self._subscribers):
            sub.push(entry)
        if event["type"] in TERMINAL:
            self.terminal = event
            self.finished = True

    def subscribe(self, after: int = 0) -> Subscription:
        """A subscription that first replays what was published after event `after`."""
        replay = [e for e in self._replay.entries if e.id > after]
        sub = Subscription(self, replay)
        self._subscribers.add(sub)
        self.first_subscriber.set()
        return sub
