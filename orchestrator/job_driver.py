"""The task that runs one accepted job: it feeds the job's state machine and does what it says.

Everything that concerns the job arrives in one inbox, in order: the
runner's frames (routed by orchestrator/runner_client.py), payments the
connection has checked, a cancel, the connection's loss. The one task that
reads the inbox is the only one that touches the job (protocol/
orchestrator_job.py), so no two inputs race; it waits on the job's deadline
(the payment timeout) and nothing else.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
from websockets.exceptions import ConnectionClosed

from orchestrator.peer import Peer
from orchestrator.runner_client import RunnerClient, RunnerLost, RunnerUnavailable
from protocol.errors import ProtocolError
from protocol.messages import Message, TicketParams
from protocol.orchestrator_job import (
    Ended,
    JobOutcome,
    OrchestratorJob,
    PaymentInput,
    Phase,
    ToBroadcaster,
    ToRunner,
)
from protocol.runner import Begin, Done

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Cancel:
    pass


@dataclass(frozen=True)
class _Disconnect:
    why: str


class JobHost(Protocol):
    """What a job needs from its orchestrator."""

    async def current_block(self) -> int: ...

    async def refreshed_params(self, job: OrchestratorJob) -> TicketParams: ...

    def nonces_used(self, params: TicketParams) -> int:
        """Nonces the recipient has recorded for these parameters (spec 8.5)."""

    def job_ended(self, job: OrchestratorJob, outcome: JobOutcome) -> None:
        """Free the job's capacity and count it; called before B hears the end."""

    async def sent(self, job: OrchestratorJob, message: Message) -> None:
        """`message` went to the broadcaster (metrics, observers)."""

    def grant_waited(self, job: OrchestratorJob, step: int, seconds: float) -> None:
        """The runner's step `step` waited `seconds` for its grant once it was ready."""


class JobDriver:
    """Drives one OrchestratorJob between its broadcaster (`peer`) and its runner."""

    def __init__(
        self,
        job: OrchestratorJob,
        peer: Peer,
        runner: RunnerClient,
        host: JobHost,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.job = job
        self.peer = peer
        self.runner = runner
        self.host = host
        self.clock = clock
        self.outcome: JobOutcome | None = None
        self.done = anyio.Event()
        """Set when the job has ended (its terminal message is on its way)."""
        self._inbox_send, self._inbox = anyio.create_memory_object_stream[Any](math.inf)
        self._broadcaster_gone = False

    # ------------------------------------------------ from the connection task

    @property
    def ended(self) -> bool:
        return self.outcome is not None

    def payment(self, payment: PaymentInput) -> None:
        self._post(payment)

    def cancel(self) -> None:
        self._post(_Cancel())

    def disconnect(self, why: str) -> None:
        self._post(_Disconnect(why))

    def _post(self, item: object) -> None:
        if not self.ended:
            self._inbox_send.send_nowait(item)

    # ------------------------------------------------------------ the task

    async def run(self) -> JobOutcome:
        job = self.job
        self.runner.open_job(job.runner_job_id, self._inbox_send)
        try:
            await self._perform(job.start(self.clock()))
            while self.outcome is None:
                item = await self._next()
                await self._perform(await self._apply(item))
        finally:
            self.runner.close_job(job.runner_job_id)
            self._inbox.close()
        return self.outcome

    async def _next(self) -> object | None:
        """The next input, or None when the job's deadline passed first."""
        deadline = self.job.deadline
        if deadline is None:
            return await self._inbox.receive()
        with anyio.move_on_after(max(0.0, deadline - self.clock())):
            return await self._inbox.receive()
        return None

    async def _apply(self, item: object | None) -> list[Any]:
        job, now = self.job, self.clock()
        if item is None:
            return job.on_deadline(now)
        if isinstance(item, PaymentInput):
            return job.on_payment(item, now)
        if isinstance(item, _Cancel):
            return job.on_cancel(now)
        if isinstance(item, _Disconnect):
            self._broadcaster_gone = True
            return job.on_disconnect(item.why, now)
        if isinstance(item, RunnerLost):
            return job.on_runner_lost(f"{item} during the job")
        if isinstance(item, Begin) and item.waited_us:
            self.host.grant_waited(job, item.step, item.waited_us / 1e6)
        refresh = isinstance(item, Done) and job.phase is Phase.RUNNING
        if refresh and job.needs_fresh_params(
            await self.host.current_block(), self.host.nonces_used(job.ticket_params)
        ):
            job.use_params(await self.host.refreshed_params(job))
        return job.on_runner(item, now)

    async def _perform(self, outputs: list[Any]) -> None:
        for out in outputs:
            if isinstance(out, ToRunner):
                try:
                    await self.runner.send(out.message)
                except RunnerUnavailable as exc:
                    self._post(RunnerLost(str(exc)))
            elif isinstance(out, ToBroadcaster):
                await self._to_broadcaster(out.message)
            elif isinstance(out, Ended):
                self.outcome = out.outcome
                self.done.set()
                self.host.job_ended(self.job, out.outcome)

    async def _to_broadcaster(self, message: Any) -> None:
        if self._broadcaster_gone:
            return
        try:
            await self.peer.send(message)
        except ConnectionClosed as exc:
            self._gone(f"connection closed: {exc}")
            return
        except ProtocolError as exc:  # the connection failed meanwhile (a fatal error)
            self._gone(f"connection failed: {exc}")
            return
        await self.host.sent(self.job, message)

    def _gone(self, why: str) -> None:
        if not self._broadcaster_gone:
            self._broadcaster_gone = True
            self._post(_Disconnect(why))
