"""Each job's events, fanned out to any number of subscribers without unbounded buffers.

Events are JSON-ready dicts with a "type". A subscriber that reads slower
than the job runs does not accumulate previews: progress, preview and
payment events supersede an undelivered event of the same type, so each
subscriber holds at most one of each plus the few events that are never
dropped (accepted, orchestrator_changed, result, error). A subscriber that
joins late first gets the same coalesced replay: everything that must not
be lost and the latest of each superseding kind.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import anyio

SUPERSEDING = frozenset({"progress", "preview", "payment"})
TERMINAL = frozenset({"result", "error"})

JsonEvent = dict[str, Any]


class _Queue:
    """Pending events in order, where a superseding kind keeps only its newest."""

    def __init__(self) -> None:
        self.events: deque[JsonEvent] = deque()

    def push(self, event: JsonEvent) -> None:
        if event["type"] in SUPERSEDING:
            for old in self.events:
                if old["type"] == event["type"]:
                    self.events.remove(old)
                    break
        self.events.append(event)


class Subscription:
    def __init__(self, stream: JobStream, replay: list[JsonEvent]) -> None:
        self._stream = stream
        self._queue = _Queue()
        for event in replay:
            self._queue.push(event)
        self._wake = anyio.Event()
        self.dropped = 0

    @property
    def pending(self) -> int:
        return len(self._queue.events)

    def push(self, event: JsonEvent) -> None:
        before = len(self._queue.events)
        self._queue.push(event)
        self.dropped += before + 1 - len(self._queue.events)
        self._wake.set()

    async def next(self) -> JsonEvent | None:
        """The next event, or None once the job has ended and all was delivered."""
        while not self._queue.events:
            if self._stream.finished:
                return None
            await self._wake.wait()
            self._wake = anyio.Event()
        return self._queue.events.popleft()

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
        self.finished = False
        self.first_subscriber = anyio.Event()
        self.terminal: JsonEvent | None = None

    def publish(self, event: JsonEvent) -> None:
        if self.finished:
            return
        self._replay.push(event)
        for sub in list(self._subscribers):
            sub.push(event)
        if event["type"] in TERMINAL:
            self.terminal = event
            self.finished = True

    def subscribe(self) -> Subscription:
        sub = Subscription(self, list(self._replay.events))
        self._subscribers.add(sub)
        self.first_subscriber.set()
        return sub
