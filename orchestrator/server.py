"""The orchestrator: advertises what it runs, admits jobs, takes payment, runs steps.

Every check that can refuse a job (pipeline, model, parameters, capacity,
model loading) happens before the job is accepted, so a refused job has
taken no payment. After acceptance, steps run only against credit
(orchestrator/jobs.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import anyio
import anyio.abc
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from orchestrator.config import ModelEntry
from orchestrator.jobs import JobOutcome, RunningJob
from orchestrator.metrics import OrchestratorMetrics
from orchestrator.peer import Peer
from orchestrator.resume import resume_point
from orchestrator.runner_client import RunnerClient
from orchestrator.runner_pool import RunnerPool, RunnerSettings, default_runner_devices
from pipelines.dispatch import executed_steps, supports
from pipelines.errors import InvalidRequest, ModelNotFound
from pipelines.loader import LoadedModel
from pipelines.requests import OutputShape, output_shape
from pipelines.resume import resume_scheduler_name
from protocol.codec import DEFAULT_MAX_FRAME_BYTES
from protocol.connection import Connection
from protocol.credit import JobCredit, ticket_odds
from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import (
    Cancel,
    Capability,
    Credit,
    Error,
    Hello,
    Info,
    JobAccepted,
    JobRequest,
    Message,
    Payment,
    Preview,
    Progress,
    Role,
    TicketParams,
    error_message,
)
from protocol.pm import MAX_UINT256, address_of
from protocol.pricing import job_fee
from protocol.recipient import (
    NonceLedger,
    PaymentReceipt,
    Recipient,
    WinningTicket,
    address_str,
)
from settlement.chain import SECONDS_PER_BLOCK, Settlement, offchain_block
from settlement.eth import ChainError
from settlement.redeemer import Redeemer
from settlement.sender_monitor import SenderMonitor
from settlement.winners import WinnerQueue
from stepstream.logs import current_job_id

log = logging.getLogger(__name__)

PREVIEW_METHODS = frozenset({"latent_rgb", "taesd", "vae", "none"})
PREVIEW_FORMATS = frozenset({"webp", "jpeg"})
DEFAULT_FACE_VALUE = 10**15
DEFAULT_TICKET_EV = 8 * 10**9  # go-livepeer's default ticket EV, for the info message
DEFAULT_REDEEM_COST_MULTIPLIER = 100
"""Face value is kept at least this many times the gas a redemption costs."""
__all__ = ["SECONDS_PER_BLOCK", "Orchestrator", "OrchestratorConfig", "offchain_block"]


@dataclass
class OrchestratorConfig:
    models: list[ModelEntry]
    private_key: bytes = field(repr=False)
    face_value: int = DEFAULT_FACE_VALUE
    payment_timeout: float = 30.0
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    current_block: Callable[[], int] = offchain_block
    """The block clock when no chain is configured (spec 8.2)."""
    settlement: Settlement | None = None
    """Where winners are redeemed and funds checked; None: off-chain mode (spec 8.6)."""
    winners_db: Path | None = None
    """SQLite file of the winner queue; None keeps winners in memory (tests only)."""
    redeem_cost_multiplier: int = DEFAULT_REDEEM_COST_MULTIPLIER
    ticket_validity_blocks: int = 40
    refresh_blocks: int = 10
    """Fresh ticket parameters go out when the job's expire within this many blocks."""
    runners: RunnerSettings | None = None
    """Managed runners; None: one per GPU, else one CPU slot (orchestrator/runner_pool.py)."""


@dataclass
class JobTickets:
    """The ticket parameters a running job pays with, and what a window costs."""

    sender: bytes
    window_fee: Fraction
    params: TicketParams


@dataclass
class ModelSlot:
    """One offered (pipeline, model): its config, the loaded model, jobs in flight."""

    entry: ModelEntry
    model: LoadedModel | None = None
    in_use: int = 0
    load_lock: anyio.Lock = field(default_factory=anyio.Lock)
    """`model` set: the model runs in this process (tests); else on a runner."""

    def capability(self) -> Capability:
        return Capability(
            pipeline=self.entry.pipeline,
            model_id=self.entry.model_id,
            warm=self.model is not None,
            capacity=self.entry.capacity,
            in_use=self.in_use,
            price_per_pixel_step=self.entry.price_per_pixel_step,
            resume_scheduler=resume_scheduler_name(self.model.pipe) if self.model else "",
        )


@dataclass
class Stats:
    outcomes: deque[JobOutcome] = field(default_factory=lambda: deque(maxlen=100))
    """The most recent finished jobs, newest last."""
    jobs_accepted: int = 0
    jobs_refused: int = 0
    steps_executed: int = 0
    tickets_received: int = 0
    ev_received: Fraction = Fraction(0)
    winners: list[WinningTicket] = field(default_factory=list)
    job_credit: dict[str, Fraction] = field(default_factory=dict)
    """EV credited to each finished job (for tests: no step ran unpaid)."""
    params_refreshed: int = 0


class Orchestrator:
    job_class: type[RunningJob] = RunningJob
    """What runs an admitted job; orchestrator/testing.py swaps in one that injects faults."""

    def __init__(self, config: OrchestratorConfig) -> None:
        self.config = config
        self.address = address_of(config.private_key)
        self._address_bytes = bytes.fromhex(self.address[2:])
        # Derived from the key, so parameters issued before a restart still verify.
        secret = hmac.new(config.private_key, b"stepstream recipient secret", hashlib.sha256)
        self.recipient = Recipient(
            self.address,
            secret.digest(),
            NonceLedger(),
            validity_blocks=config.ticket_validity_blocks,
        )
        self.slots = {(e.pipeline, e.model_id): ModelSlot(e) for e in config.models}
        self.stats = Stats()
        self.metrics = OrchestratorMetrics()
        self.settlement = config.settlement or Settlement(config.current_block)
        self.winners = WinnerQueue(config.winners_db)
        self.monitor = SenderMonitor(self.settlement, self.winners)
        self.redeemer = Redeemer(
            self.winners, self.settlement, on_redeemed=self.metrics.observe_redemptions
        )
        settings = config.runners or RunnerSettings(default_runner_devices())
        self.runners = RunnerPool(config.models, settings, self.metrics.runner_restarts.inc)

    def describe_settlement(self) -> str:
        """What happens to tickets here; logged at start-up (spec 8.6)."""
        where = self.winners.path or "memory only (no --data-dir)"
        return f"{self.settlement.describe()}; winners queued in {where}"

    async def current_block(self) -> int:
        return await anyio.to_thread.run_sync(self.settlement.block_number)

    async def face_value(self) -> int:
        """The configured face value, raised to stay above the cost of redeeming it."""
        cost = await anyio.to_thread.run_sync(self.settlement.redeem_cost)
        return max(self.config.face_value, cost * self.config.redeem_cost_multiplier)

    async def load_warm_models(self, on_loaded: Callable[[str], None] | None = None) -> None:
        """Load every model marked warm before accepting connections.

        `on_loaded(model_id)` runs after each one (the CLI's progress bar).
        """
        for slot in self.slots.values():
            if slot.entry.warm:
                await self._ensure_loaded(slot)
                if on_loaded is not None:
                    on_loaded(slot.entry.model_id)

    async def _ensure_loaded(self, slot: ModelSlot) -> LoadedModel | RunnerClient:
        """The model in this process if one was put there, else the runner holding it."""
        if slot.model is not None:
            return slot.model
        async with slot.load_lock:
            model_id = slot.entry.model_id
            if self.runners.state(model_id) is None:
                log.info("loading model %s on a runner", model_id)
            client, state = await self.runners.acquire(model_id)
            log.info("%s ready on %s (loaded in %.2f s)", model_id, client.name, state.load_seconds)
            return client

    def _advertise(self, slot: ModelSlot) -> Capability:
        """The slot's capability: warm when loaded here or on a live runner, with its load time."""
        cap = slot.capability()
        if slot.model is not None:
            return dataclasses.replace(cap, load_seconds=slot.model.load_seconds)
        state = self.runners.state(slot.entry.model_id)
        if state is None:
            return cap
        return dataclasses.replace(cap, warm=True, load_seconds=state.load_seconds)

    @contextlib.asynccontextmanager
    async def serve(self, host: str, port: int) -> AsyncIterator[Server]:
        """An `async with` server on host:port (port 0 picks a free one).

        The redeemer runs alongside; it starts with the winners a previous
        run left pending.
        """
        log.info("%s", self.describe_settlement())
        async with self.runners.active(), anyio.create_task_group() as tg:
            tg.start_soon(self.redeemer.run)
            try:
                async with serve(
                    self.handle,
                    host,
                    port,
                    # Frames up to twice our cap reach the codec, which answers
                    # frame_too_large; larger ones are closed by websockets with 1009.
                    max_size=2 * self.config.max_frame_bytes,
                    compression=None,
                    # Plain HTTP `GET /metrics` on the same port (spec 3.4).
                    process_request=self.metrics.process_request,
                ) as server:
                    yield server
            finally:
                tg.cancel_scope.cancel()

    # ------------------------------------------------------------ connections

    async def handle(self, ws: ServerConnection) -> None:
        peer = Peer(ws, Connection(Role.ORCHESTRATOR, self.config.max_frame_bytes))
        current: list[RunningJob] = []
        async with anyio.create_task_group() as tg:
            try:
                async for frame in ws:
                    try:
                        message = peer.decode(frame)
                    except ProtocolError as err:
                        log.info("closing connection: %s", err)
                        await peer.fail(err)
                        break
                    await self._dispatch(peer, message, current, tg)
            except ConnectionClosed:
                pass
            finally:
                for job in current:
                    job.stop(ProtocolError(ErrorCode.INTERNAL_ERROR, "connection closed"))

    async def _dispatch(
        self,
        peer: Peer,
        message: Message,
        current: list[RunningJob],
        tg: anyio.abc.TaskGroup,
    ) -> None:
        job = current[0] if current else None
        if isinstance(message, Hello):
            peer.sender = message.sender
            await peer.send(await self._info(message.sender))
        elif isinstance(message, JobRequest):
            admitted = await self._admit(peer, message)
            if admitted is not None:
                current[:] = [admitted[0]]
                tg.start_soon(self._run, *admitted)
        elif isinstance(message, Payment):
            await self._take_payment(peer, message, job)
        elif isinstance(message, Cancel):
            if job is not None and job.request.job_id == message.job_id:
                job.stop(ProtocolError(ErrorCode.CANCELLED, "cancelled by the broadcaster"))
        elif isinstance(message, Error):
            log.info("broadcaster reported an error: %s %s", message.code, message.message)

    async def _info(self, sender: bytes) -> Info:
        face = await self.face_value()
        issue = await anyio.to_thread.run_sync(self.settlement.issue_round)
        params = self.recipient.issue_params(
            sender,
            face,
            min(MAX_UINT256, max(1, DEFAULT_TICKET_EV * MAX_UINT256 // face)),
            await self.current_block(),
            secrets.token_bytes(16),
            issue.round,
            issue.block_hash,
        )
        return Info(
            orchestrator=self._address_bytes,
            capabilities=tuple(self._advertise(s) for s in self.slots.values()),
            ticket_params=params,
            max_frame_bytes=self.config.max_frame_bytes,
            agent="stepstream-orchestrator/0.1",
        )

    # ------------------------------------------------------------ admission

    async def _admit(self, peer: Peer, req: JobRequest) -> tuple[RunningJob, ModelSlot] | None:
        """Accept the job (quote + ticket params) or refuse it before any payment."""
        current_job_id.set(req.job_id)
        try:
            slot, model, shape = await self._check(req)
            runner = model if isinstance(model, RunnerClient) else None
            local = None if isinstance(model, RunnerClient) else model
            resume = resume_point(req, local)
            params = req.params
            steps = await runner.plan(req) if runner else executed_steps(params, local)
            steps -= resume.step if resume else 0
        except ProtocolError as err:
            self.stats.jobs_refused += 1
            self.metrics.jobs.labels(req.pipeline, req.model_id, f"refused:{err.code.value}").inc()
            log.info("job %s refused: %s", req.job_id, err)
            await peer.send(error_message(err.code.value, err.message, req.job_id))
            return None
        pixels = shape.pixels_per_step
        price = slot.entry.price_per_pixel_step
        fee_per_step = job_fee(pixels, 1, price)
        window_fee = fee_per_step * min(req.preview_every, steps)
        try:
            tickets = JobTickets(
                peer.sender, window_fee, await self._job_params(peer.sender, window_fee)
            )
        except ChainError as exc:
            self.stats.jobs_refused += 1
            await peer.send(
                error_message(
                    ErrorCode.INTERNAL_ERROR.value, f"chain unavailable: {exc}", req.job_id
                )
            )
            return None
        ticket_params = tickets.params
        seed = params.seed if params.seed is not None else secrets.randbits(32)
        job = self.job_class(
            req,
            local,
            JobCredit(fee_per_step, steps),
            seed,
            lambda m: self._send_job_message(peer, req, tickets, m),
            self.config.payment_timeout,
            runner,
            resume=resume,
        )
        slot.in_use += 1
        self.stats.jobs_accepted += 1
        await peer.send(
            JobAccepted(
                job_id=req.job_id,
                steps=steps,
                pixels_per_step=pixels,
                price_per_pixel_step=price,
                fee=fee_per_step * steps,
                window_steps=req.preview_every,
                seed=seed,
                ticket_params=ticket_params,
            )
        )
        log.info("job %s accepted: %d steps, fee %.0f wei", req.job_id, steps, fee_per_step * steps)
        return job, slot

    async def _job_params(self, sender: bytes, window_fee: Fraction) -> TicketParams:
        """Parameters whose ticket is worth one window (spec 8.2), valid from this block."""
        face_value, win_prob = ticket_odds(window_fee, await self.face_value())
        issue = await anyio.to_thread.run_sync(self.settlement.issue_round)
        block, salt = await self.current_block(), secrets.token_bytes(16)
        return self.recipient.issue_params(
            sender, face_value, win_prob, block, salt, issue.round, issue.block_hash
        )

    async def _send_job_message(
        self, peer: Peer, req: JobRequest, tickets: JobTickets, message: Message
    ) -> None:
        """Send a job's message, counting preview bytes; a progress carries fresh
        parameters near expiry (spec 8.9)."""
        if isinstance(message, Preview):
            self.metrics.preview_bytes.labels(req.pipeline, req.model_id).inc(len(message.image))
        if isinstance(message, Progress):
            left = tickets.params.expiration_block - await self.current_block()
            if left <= self.config.refresh_blocks:
                tickets.params = await self._job_params(tickets.sender, tickets.window_fee)
                self.stats.params_refreshed += 1
                message = dataclasses.replace(message, ticket_params=tickets.params)
        await peer.send(message)

    async def _check(
        self, req: JobRequest
    ) -> tuple[ModelSlot, LoadedModel | RunnerClient, OutputShape]:
        slot = self.slots.get((req.pipeline, req.model_id))
        if slot is None:
            if not any(p == req.pipeline for p, _ in self.slots):
                raise ProtocolError(
                    ErrorCode.UNSUPPORTED_PIPELINE, f"pipeline {req.pipeline!r} is not offered here"
                )
            raise ProtocolError(
                ErrorCode.UNKNOWN_MODEL, f"model {req.model_id!r} is not offered for {req.pipeline}"
            )
        if req.preview_method not in PREVIEW_METHODS:
            raise ProtocolError(
                ErrorCode.INVALID_REQUEST,
                f"preview_method must be one of {sorted(PREVIEW_METHODS)}",
            )
        if req.preview_format not in PREVIEW_FORMATS:
            raise ProtocolError(
                ErrorCode.INVALID_REQUEST,
                f"preview_format must be one of {sorted(PREVIEW_FORMATS)}",
            )
        try:
            shape = output_shape(req.params)
        except InvalidRequest as exc:
            raise ProtocolError(ErrorCode.INVALID_REQUEST, str(exc)) from None
        if req.preview_frame is not None and not (shape.video and req.preview_frame < shape.count):
            raise ProtocolError(
                ErrorCode.INVALID_REQUEST,
                f"preview_frame {req.preview_frame} is not a frame of this job's output",
            )
        if slot.in_use >= slot.entry.capacity:
            raise ProtocolError(
                ErrorCode.NO_CAPACITY,
                f"{req.model_id} is running {slot.in_use} of {slot.entry.capacity} jobs",
            )
        try:
            model = await self._ensure_loaded(slot)
        except ModelNotFound as exc:
            raise ProtocolError(ErrorCode.MODEL_UNAVAILABLE, str(exc)) from None
        if isinstance(model, LoadedModel) and not supports(model, req.pipeline):
            raise ProtocolError(
                ErrorCode.MODEL_UNAVAILABLE, f"{req.model_id} cannot run {req.pipeline}"
            )
        return slot, model, shape

    async def _run(self, job: RunningJob, slot: ModelSlot) -> None:
        current_job_id.set(job.request.job_id)
        started = time.monotonic()
        try:
            async with self.runners.use(slot.entry.model_id):
                outcome = await job.run()
        finally:
            slot.in_use -= 1
        self._observe(job.request, outcome, time.monotonic() - started)
        self.stats.steps_executed += outcome.steps_executed
        self.stats.outcomes.append(outcome)
        self.stats.job_credit[job.request.job_id] = job.ledger.credit
        log.info(
            "job %s ended (%s) after %d steps",
            job.request.job_id,
            outcome.terminal,
            outcome.steps_executed,
        )

    def _observe(self, req: JobRequest, outcome: JobOutcome, seconds: float) -> None:
        labels = (req.pipeline, req.model_id)
        m = self.metrics
        m.jobs.labels(*labels, outcome.terminal).inc()
        m.steps.labels(*labels).inc(outcome.steps_executed)
        if outcome.steps_executed and seconds > 0:
            m.step_seconds.labels(*labels).observe(seconds / outcome.steps_executed)
            m.steps_per_second.labels(*labels).observe(outcome.steps_executed / seconds)

    # ------------------------------------------------------------ payments

    async def _receive_tickets(self, payment: Payment) -> PaymentReceipt:
        """Validate a payment against the chain's block and round and the sender's max float
        (spec 8.4, 8.8), and queue its winners durably before anyone acknowledges it (8.6)."""
        try:
            block = await self.current_block()
            sender = address_str(payment.sender)
            max_float = await anyio.to_thread.run_sync(self.monitor.max_float, sender)
            creation_round = payment.ticket_params.creation_round
            rounds = await anyio.to_thread.run_sync(self.settlement.round_view, creation_round)
        except ChainError as exc:
            return PaymentReceipt(
                error=ProtocolError(ErrorCode.INTERNAL_ERROR, f"chain unavailable: {exc}")
            )
        receipt = self.recipient.receive(payment, block, max_float, rounds)
        if receipt.winners:
            try:
                await anyio.to_thread.run_sync(self.winners.add, receipt.winners)
            except Exception as exc:  # a disk fault: credit nothing we cannot keep
                log.error("cannot queue winning tickets: %s", exc)
                return PaymentReceipt(
                    error=ProtocolError(ErrorCode.INTERNAL_ERROR, "cannot store winning tickets")
                )
            self.redeemer.notify()
        return receipt

    async def _take_payment(self, peer: Peer, payment: Payment, job: RunningJob | None) -> None:
        receipt = await self._receive_tickets(payment)
        self.stats.tickets_received += receipt.accepted
        self.stats.ev_received += receipt.ev
        self.metrics.tickets_received.inc(receipt.accepted)
        self.metrics.ev_received.inc(float(receipt.ev))
        self.metrics.tickets_won.inc(len(receipt.winners))
        for winner in receipt.winners:
            log.info(
                "winning ticket from %s, face value %d, queued for redemption",
                winner.ticket.sender,
                winner.ticket.face_value,
            )
            self.stats.winners.append(winner)
        live = (
            job is not None and job.request.job_id == payment.job_id and not job.finished.is_set()
        )
        if not live:
            log.info("payment for ended job %s: %d tickets kept", payment.job_id, receipt.accepted)
            return
        assert job is not None
        covered = job.add_credit(receipt.ev)
        await peer.send_if_allowed(
            Credit(
                job_id=payment.job_id,
                credit=job.ledger.credit,
                covered_steps=covered,
                tickets_accepted=receipt.accepted,
                winners=len(receipt.winners),
            )
        )
        if receipt.error is not None:
            log.info("job %s: payment refused: %s", payment.job_id, receipt.error)
            job.stop(receipt.error)
