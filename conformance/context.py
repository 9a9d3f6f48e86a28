"""What every orchestrator case works with: options, the node's offer, connections, jobs.

The context opens connections for a case and cleans up after it: any job
still running is cancelled and drained, every socket is closed, so the
suite never leaves a slot held on the orchestrator it tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import anyio

from conformance.verdicts import CaseFailed, CaseSkipped, check
from conformance.wire import Closed, Wire
from protocol.connection import State
from protocol.credit import PaymentSchedule
from protocol.messages import (
    Cancel,
    Cancelled,
    Capability,
    Credit,
    Error,
    Info,
    JobAccepted,
    JobRequest,
    Message,
    Payment,
    Progress,
    Result,
    TextToImageParams,
    TicketParams,
)
from protocol.pm import ticket_ev
from protocol.sender import TicketSender
from settlement.chain import Settlement

JOB_ENDS = (Result, Cancelled, Error)


@dataclass(frozen=True)
class Options:
    url: str
    key: bytes
    """The sender key the suite pays with (funded on chain, when the node checks funds)."""
    timeout: float = 30.0
    """Seconds to wait for any expected reply (a cold model's first load may be slow)."""
    model: str | None = None
    """The text-to-image model to use; None: the first one offered, warm first."""
    size: int = 64
    hello_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_connections_per_client: int = 32
    slow: bool = False
    settlement: Settlement = field(default_factory=Settlement)
    """Where blocks and rounds come from: the chain given, else the off-chain clock (8.2)."""
    on_chain: bool = False


def job_ended(message: Message) -> bool:
    return isinstance(message, JOB_ENDS) and getattr(message, "job_id", None) is not None


class CaseContext:
    def __init__(self, options: Options, info: Info) -> None:
        self.options = options
        self.info = info
        self.sender = TicketSender(options.key)
        self._wires: list[Wire] = []

    @property
    def fatal_wait(self) -> float:
        """Seconds a fatal error (and then the close) may take: the node waits on nothing."""
        return min(10.0, self.options.timeout)

    @property
    def capability(self) -> Capability:
        """The text-to-image offer the case's jobs use (SKIP when there is none)."""
        return pick_capability(self.info, self.options.model)

    # ------------------------------------------------------------ connections

    async def connect(self, sender: TicketSender | None = None) -> Wire:
        wire = await Wire.open(self.options.url, sender or self.sender, self.options.timeout)
        self._wires.append(wire)
        return wire

    async def ready(
        self, sender: TicketSender | None = None, features: tuple[str, ...] = ()
    ) -> tuple[Wire, Info]:
        """A connection past hello/info; `features` go in the hello (spec 12.1)."""
        wire = await self.connect(sender)
        return wire, await wire.hello(features)

    async def cleanup(self) -> None:
        """Cancel and drain any job still running, then close every connection. A job whose
        connection failed under it ends on the node's own time: wait until its slot is
        free, so that the next case finds the node as this one did."""
        abandoned = False
        for wire in self._wires:
            if wire.is_open and wire.conn.state in (State.JOB_REQUESTED, State.JOB_RUNNING):
                job_id = wire.conn.job_id
                assert job_id is not None
                try:
                    await wire.send(Cancel(job_id=job_id))
                    await wire.recv_until(job_ended, timeout=self.options.timeout)
                except (CaseFailed, Closed, Exception):  # noqa: BLE001 - best effort
                    abandoned = True
            elif wire.conn.job_id is not None and wire.conn.state is not State.READY:
                abandoned = True  # closed (a fatal error) with a job in flight
            await wire.close()
        self._wires.clear()
        if abandoned:
            await self.slots_free()

    async def slots_free(self) -> None:
        """Wait (at most `timeout`) until every capability's in_use is back to what the
        suite found when it started."""
        before = {(c.pipeline, c.model_id): c.in_use for c in self.info.capabilities}
        with anyio.move_on_after(self.options.timeout):
            while True:
                wire = await Wire.open(self.options.url, self.sender, self.options.timeout)
                try:
                    info = await wire.hello()
                finally:
                    await wire.close()
                if all(
                    c.in_use <= before.get((c.pipeline, c.model_id), 0) for c in info.capabilities
                ):
                    return
                await anyio.sleep(0.1)

    async def end(self, wire: Wire) -> None:
        """Cancel the wire's job and read until it ends (its slot is free again)."""
        if wire.conn.state in (State.JOB_REQUESTED, State.JOB_RUNNING):
            assert wire.conn.job_id is not None
            await wire.send(Cancel(job_id=wire.conn.job_id))
            await wire.recv_until(job_ended)

    # ------------------------------------------------------------------ jobs

    @property
    def price(self) -> Fraction:
        return self.capability.price_per_pixel_step

    def params(self, steps: int = 4, **changes: Any) -> TextToImageParams:
        size = self.options.size
        fields: dict[str, Any] = dict(
            prompt="a conformance test pattern", width=size, height=size, seed=1234
        )
        return TextToImageParams(num_inference_steps=steps, **{**fields, **changes})

    def request(self, job_id: str, steps: int = 4, every: int = 2, **changes: Any) -> JobRequest:
        """A small text-to-image job for the chosen model; `changes` go to the job or its params."""
        job_fields = {
            k: changes.pop(k)
            for k in list(changes)
            if k in ("preview_method", "preview_format", "preview_frame", "want_latents", "resume")
        }
        return JobRequest(
            job_id=job_id,
            pipeline="text-to-image",
            model_id=self.capability.model_id,
            params=self.params(steps, **changes),
            preview_every=every,
            **job_fields,
        )

    def step_fee(self, request: JobRequest) -> Fraction:
        """f of spec 6.1, from the advertised price and the request (never from the quote)."""
        p = request.params
        assert isinstance(p, TextToImageParams)
        return self.price * p.width * p.height * p.num_images_per_prompt

    async def start(self, wire: Wire, request: JobRequest) -> JobAccepted:
        """Send the job; it must be accepted."""
        await wire.send(request)
        reply = await wire.recv()
        if isinstance(reply, Error):
            raise CaseFailed(f"the job was refused: {reply.code} ({reply.message[:200]})")
        check(isinstance(reply, JobAccepted), f"expected accepted, got {reply.TYPE}")
        assert isinstance(reply, JobAccepted)
        return reply

    def tickets_for(self, accepted: JobAccepted, f: Fraction, steps: int, paid: Fraction) -> int:
        """Tickets that bring the EV paid up to the fee of `steps` steps."""
        ev = params_ev(accepted.ticket_params)
        return max(0, math.ceil((min(steps, accepted.steps) * f - paid) / ev))

    def pay(self, job_id: str, params: TicketParams, count: int) -> Payment:
        return self.sender.pay(job_id, params, count)

    async def run(
        self,
        wire: Wire,
        request: JobRequest,
        accepted: JobAccepted,
        *,
        stop: Any = None,
    ) -> list[Message]:
        """Pay as a spec-following broadcaster does (7.3, default lead) until the job ends;
        `stop(message)` returning True ends the loop early (the job keeps running)."""
        f = self.step_fee(request)
        n = accepted.window_steps
        schedule = PaymentSchedule(
            fee_per_step=f,
            total_steps=accepted.steps,
            window_steps=n,
            ticket_ev=params_ev(accepted.ticket_params),
            lead_steps=1,
        )
        params = accepted.ticket_params
        seen: list[Message] = []

        async def pay_for(delivered: int) -> None:
            due = schedule.tickets_due(delivered)
            if due:
                schedule.record_sent(due)
                await wire.send(self.pay(request.job_id, params, due))

        await pay_for(0)
        limit = self.options.timeout + accepted.steps * 5
        with anyio.move_on_after(limit):
            while True:
                message = await wire.recv()
                seen.append(message)
                if job_ended(message) or (stop is not None and stop(message)):
                    return seen
                if isinstance(message, Progress):
                    if message.ticket_params is not None:
                        params = message.ticket_params
                        schedule.ticket_ev = params_ev(params)
                    await pay_for(message.step)
        raise CaseFailed(f"the job ran for {limit:g} s without ending")

    async def run_job(self, wire: Wire, request: JobRequest) -> tuple[JobAccepted, list[Message]]:
        accepted = await self.start(wire, request)
        return accepted, await self.run(wire, request, accepted)


def params_ev(params: TicketParams) -> Fraction:
    return ticket_ev(params.face_value, params.win_prob)


def pick_capability(info: Info, model: str | None) -> Capability:
    offers = [c for c in info.capabilities if c.pipeline == "text-to-image"]
    if model is not None:
        offers = [c for c in offers if c.model_id == model]
    if not offers:
        what = f"model {model}" if model else "any model"
        raise CaseSkipped(f"the orchestrator offers text-to-image with {what}")
    return sorted(offers, key=lambda c: not c.warm)[0]


def credits(messages: list[Message]) -> list[Credit]:
    return [m for m in messages if isinstance(m, Credit)]


def progress_steps(messages: list[Message]) -> list[int]:
    return [m.step for m in messages if isinstance(m, Progress)]
