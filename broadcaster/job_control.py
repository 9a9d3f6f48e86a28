"""The caller's handle on a job that JobRunner runs: where it runs now, and how to cancel it.

A gateway cancels a job from another task (an HTTP DELETE, a WebSocket
message) while the runner's task reads the job's events. The runner keeps
the handle up to date; `cancel` asks the orchestrator running the job to
stop (or, before it has accepted, the runner does so as soon as it does),
and the runner then ends the job with `cancelled` instead of failing over.
"""

from __future__ import annotations

import contextlib

from broadcaster.session import BroadcasterSession


class JobControl:
    def __init__(self) -> None:
        self.url: str | None = None
        """The orchestrator the job runs on now (None before the first one is chosen)."""
        self.cancel_requested = False
        self._job_id: str | None = None
        self._session: BroadcasterSession | None = None
        self._accepted = False

    async def cancel(self) -> None:
        """Stop the job; safe to call at any time, more than once."""
        self.cancel_requested = True
        await self._send_cancel()

    # ------------------------------------------------------------ the runner's side

    def started(self, job_id: str, url: str, session: BroadcasterSession) -> None:
        self._job_id, self.url, self._session, self._accepted = job_id, url, session, False

    async def accepted(self) -> None:
        """The orchestrator accepted the job: a cancel asked for before now is sent now."""
        self._accepted = True
        if self.cancel_requested:
            await self._send_cancel()

    def ended(self) -> None:
        self._session, self._accepted = None, False

    async def _send_cancel(self) -> None:
        session, job_id = self._session, self._job_id
        if session is None or not self._accepted or job_id is None:
            return  # between orchestrators, or not yet accepted: the runner checks the flag
        with contextlib.suppress(Exception):  # a closing session cannot cancel; the job ends anyway
            await session.cancel(job_id)
