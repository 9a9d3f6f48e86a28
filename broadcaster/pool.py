"""Connections kept per orchestrator, so that a job costs no new `hello` and `info`.

A broadcaster (the gateway, a client running many jobs) takes a session for
an orchestrator's URL, runs one job on it and gives it back. A session given
back open and between jobs waits for the next job to that orchestrator; one
that failed, or that the caller could not finish cleanly, is closed instead.
An orchestrator closes connections that idle (spec 3.5, L1); the session
notices at its next job and opens a fresh one (broadcaster/session.py), so a
pooled connection that went away is never a failed job.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

from broadcaster.session import BroadcasterSession


class SessionPool:
    """Idle sessions per orchestrator URL, at most `max_idle` each; one job per session."""

    def __init__(self, private_key: bytes, *, max_idle: int = 4, **session_options: Any) -> None:
        self.private_key = private_key
        self.max_idle = max_idle
        self.session_options = session_options
        """Keyword arguments of every BroadcasterSession opened (max_price, timeouts...)."""
        self._idle: defaultdict[str, list[BroadcasterSession]] = defaultdict(list)
        self.opened = 0
        """Sessions opened so far (each then replaces its own closed connections)."""

    async def acquire(self, url: str) -> BroadcasterSession:
        """A session to `url`: an idle one (whose connection may have been closed since; its
        next job opens a fresh one), else a new one. Raises SessionError."""
        idle = self._idle[url]
        if idle:
            return idle.pop()
        session = BroadcasterSession(url, self.private_key, **self.session_options)
        await session.__aenter__()
        self.opened += 1
        return session

    async def release(self, session: BroadcasterSession, *, clean: bool = True) -> None:
        """Keep the session for the next job to its orchestrator, or close it: when its job
        did not end cleanly (`clean`), its connection failed, or enough are idle already."""
        idle = self._idle[session.url]
        if clean and session.reusable and len(idle) < self.max_idle:
            idle.append(session)
            return
        with contextlib.suppress(Exception):
            await session.aclose()

    @contextlib.asynccontextmanager
    async def session(self, url: str) -> AsyncIterator[BroadcasterSession]:
        """`async with pool.session(url) as s:` one job on `s`; an exception closes it."""
        session = await self.acquire(url)
        clean = False
        try:
            yield session
            clean = True
        finally:
            await self.release(session, clean=clean)

    def idle(self, url: str) -> int:
        return len(self._idle[url])

    async def aclose(self) -> None:
        for sessions in self._idle.values():
            for session in sessions:
                with contextlib.suppress(Exception):
                    await session.aclose()
        self._idle.clear()
