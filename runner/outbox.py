"""A job's frames to the orchestrator, sent in order by one task, posted without waiting.

The pipeline thread posts each message, or the future of one still being made
(a preview encoding on a worker thread), and goes straight on with the next
step: posting is a non-blocking hand-off to the event loop, so a step never
waits for the loop, the socket or an encode. One task sends the items in the
order they were posted, each future once it is done, so the orchestrator sees
exactly the order the step thread meant (a step's preview before its `done`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

Item = Any
"""A runner message, or a concurrent.futures.Future of one."""
_END = object()


class ConnectionLost(Exception):
    """The orchestrator's connection closed: nobody is left to tell anything."""


class Outbox:
    """One job's outgoing frames; create it on the event loop that sends them."""

    def __init__(self, send: Callable[[Any], Awaitable[None]], on_lost: Callable[[], None]) -> None:
        self._send = send
        self._on_lost = on_lost
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Item] = asyncio.Queue()
        self._drained = asyncio.Event()
        self._closing = False
        self.lost = False

    def post(self, item: Item) -> None:
        """Queue `item` from any thread; returns at once."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def wait_sent(self) -> None:
        """Block (in another thread than the loop's) until all posted so far was sent."""
        sent = threading.Event()
        self.post(sent)
        sent.wait()

    def put(self, item: Item) -> None:
        """Queue `item` from the event loop's own thread."""
        self._queue.put_nowait(item)

    async def close(self) -> None:
        """Send what is queued, then return (call on the loop, once nothing more is posted)."""
        if not self._closing:
            self._closing = True
            self._queue.put_nowait(_END)
        await self._drained.wait()

    async def drain(self) -> None:
        """Send items in order until `close`; once the connection is lost, drop them."""
        try:
            while (item := await self._queue.get()) is not _END:
                if isinstance(item, threading.Event):
                    item.set()
                    continue
                if isinstance(item, concurrent.futures.Future):
                    try:
                        item = await asyncio.wrap_future(item)
                    except Exception:  # the step thread reports it
                        continue
                if self.lost:
                    continue
                try:
                    await self._send(item)
                except ConnectionLost:
                    self.lost = True
                    self._on_lost()
        finally:
            self._drained.set()
