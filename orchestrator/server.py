"""The orchestrator: advertises what it runs, admits jobs, takes payment, hands steps to runners.

Every check that can refuse a job (pipeline, model, parameters, capacity,
model loading, the runner's plan) happens before the job is accepted, so a
refused job has taken no payment. After acceptance a JobDriver
(orchestrator/job_driver.py) runs the job's state machine; this module only
reads frames, checks tickets and routes what it learns to the job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import secrets
import time
from collections import Counter as Tally
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import anyio
import anyio.abc
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from orchestrator.admission import ModelSlot, Offers, check_request
from orchestrator.cashier import DEFAULT_FACE_VALUE, DEFAULT_REDEEM_COST_MULTIPLIER, Cashier
from orchestrator.config import ModelEntry
from orchestrator.connection_limits import ConnectionLimits
from orchestrator.job_driver import JobDriver
from orchestrator.metrics import OrchestratorMetrics
from orchestrator.peer import Peer
from orchestrator.runner_client import RunnerClient
from orchestrator.runner_pool import RunnerPool, RunnerSettings, default_runner_devices
from protocol.balances import DEFAULT_BALANCE_TTL, SenderBalances
from protocol.codec import DEFAULT_MAX_FRAME_BYTES
from protocol.connection import Connection, State
from protocol.errors import ErrorCode, ProtocolError
from protocol.job_context import current_job_id
from protocol.messages import (
    FEATURE_FIRST_PAYMENT,
    FEATURE_INFO_REQUEST,
    FEATURE_QUEUE,
    FEATURE_RESULT_FRAMES,
    FEATURE_STATUS,
    Cancel,
    Cancelled,
    Capability,
    Error,
    Hello,
    Info,
    InfoRequest,
    JobRequest,
    Message,
    Payment,
    Preview,
    Queued,
    Role,
    Status,
    TicketParams,
    error_message,
)
from protocol.orchestrator_job import (
    JobOutcome,
    OrchestratorJob,
    PaymentInput,
    make_quote,
    window_fee,
)
from protocol.pm import address_of
from protocol.recipient import MAX_NONCES_PER_RAND, PaymentReceipt, WinningTicket
from settlement.chain import SECONDS_PER_BLOCK, Settlement, offchain_block
from settlement.eth import ChainError

log = logging.getLogger(__name__)

LOADING_STATUS_SECONDS = 2.0
"""How often B hears `status` while its job waits for a model to load (spec 9.6)."""
QUEUE_STATUS_SECONDS = 2.0
"""How often a queued job hears its place in the queue (spec 4.6)."""
DEFAULT_MAX_QUEUED = 8
"""Jobs that may wait for each capability's slots (spec 4.6); more are refused no_capacity."""
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
    nonces_per_rand: int = MAX_NONCES_PER_RAND
    """go-livepeer's cap on a rand's nonces (spec 8.5); fresh parameters go out at half."""
    runners: RunnerSettings | None = None
    """Managed runners; None: one per GPU, else one CPU slot (orchestrator/runner_pool.py)."""
    limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    balance_ttl: float = DEFAULT_BALANCE_TTL
    """Seconds a sender's unspent credit is kept after it last changed (spec 7.5)."""
    max_queued: int = DEFAULT_MAX_QUEUED
    """Jobs waiting per capability when its slots are busy (spec 4.6); 0: no queue."""
    """Idle timeouts and the cap on connections per client address (spec 3.5)."""


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


@dataclass
class _Link:
    """One broadcaster connection: its socket and state, and the job it runs now."""

    peer: Peer
    driver: JobDriver | None = None

    def live_job(self, job_id: str) -> JobDriver | None:
        d = self.driver
        return d if d is not None and not d.ended and d.job.job_id == job_id else None


class Orchestrator:
    job_type: type[OrchestratorJob] = OrchestratorJob
    """The rules each accepted job runs by (tests plant faults in a subclass)."""

    def __init__(self, config: OrchestratorConfig) -> None:
        self.config = config
        self.address = address_of(config.private_key)
        self._address_bytes = bytes.fromhex(self.address[2:])
        self.offers = Offers.of(config.models)
        self.stats = Stats()
        self.metrics = OrchestratorMetrics()
        self.cashier = Cashier(
            config.private_key,
            self.address,
            config.settlement or Settlement(config.current_block),
            face_value=config.face_value,
            redeem_cost_multiplier=config.redeem_cost_multiplier,
            validity_blocks=config.ticket_validity_blocks,
            nonces_per_rand=config.nonces_per_rand,
            winners_db=config.winners_db,
            on_redeemed=self.metrics.observe_redemptions,
        )
        """Ticket parameters out, tickets in, winners to the redeemer (spec 8)."""
        settings = config.runners or RunnerSettings(default_runner_devices())
        self.runners = RunnerPool(config.models, settings, self.metrics.runner_restarts.inc)
        self._clients: Tally[str] = Tally()
        """Open connections per client address."""
        self.balances = SenderBalances(config.balance_ttl)
        """Credit senders paid beyond their jobs' steps, for their next job (spec 7.5)."""
        self.observers: list[Callable[[Message], Awaitable[None]]] = []
        """Awaited after each job message reaches a broadcaster's socket, in order
        (tests use it to break the wire at an exact step)."""

    @property
    def slots(self) -> dict[tuple[str, str], ModelSlot]:
        return self.offers.slots

    async def load_warm_models(self, on_loaded: Callable[[str], None] | None = None) -> None:
        """Load every model marked warm. One that fails is logged and left cold.

        `on_loaded(model_id)` runs after each attempt (the CLI's progress bar).
        """
        for slot in self.slots.values():
            if slot.entry.warm:
                try:
                    await self._runner_for(slot)
                except ProtocolError as err:
                    log.error("cannot load warm model %s: %s", slot.entry.model_id, err.message)
                if on_loaded is not None:
                    on_loaded(slot.entry.model_id)

    async def _runner_for(self, slot: ModelSlot) -> RunnerClient:
        """The runner holding the slot's model, loading it first if it is cold."""
        model_id = slot.entry.model_id
        if self.runners.state(model_id) is None:
            log.info("loading model %s on a runner", model_id)
        client, state = await self.runners.acquire(model_id)
        log.debug("%s ready on %s (loaded in %.2f s)", model_id, client.name, state.load_seconds)
        return client

    def _advertise(self, slot: ModelSlot) -> Capability:
        """The slot's capability: warm when loaded on a live runner, with its load time and
        its step time (the speed claim), measured when it was last loaded (spec 4.5)."""
        entry = slot.entry
        state = self.runners.state(entry.model_id)
        measured = state or self.runners.measured.get(entry.model_id)
        return Capability(
            pipeline=entry.pipeline,
            model_id=entry.model_id,
            warm=state is not None,
            capacity=entry.capacity,
            in_use=slot.in_use,
            price_per_pixel_step=entry.price_per_pixel_step,
            resume_scheduler=state.resume_scheduler if state else "",
            load_seconds=state.load_seconds if state else None,
            queued=len(slot.queue),
            step_seconds=measured.step_seconds if measured else None,
            step_pixels=measured.step_pixels if measured else 0,
            batch_gains=measured.batch_gains if measured else (),
            max_batch=min(measured.max_batch, entry.capacity) if measured else 1,
        )

    @contextlib.asynccontextmanager
    async def serve(self, host: str, port: int) -> AsyncIterator[Server]:
        """An `async with` server on host:port (port 0 picks a free one).

        The redeemer runs alongside; it starts with the winners a previous
        run left pending.
        """
        log.info("%s", self.cashier.describe())
        async with self.runners.active(), anyio.create_task_group() as tg:
            tg.start_soon(self.cashier.redeemer.run)
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
        client = _client_address(ws)
        limits = self.config.limits
        peer = Peer(ws, Connection(Role.ORCHESTRATOR, self.config.max_frame_bytes))
        if self._clients[client] >= limits.max_connections_per_client:
            await peer.refuse(
                ErrorCode.TOO_MANY_CONNECTIONS,
                f"{client} already has {limits.max_connections_per_client} connections open",
            )
            return
        self._clients[client] += 1
        link = _Link(peer)
        try:
            async with anyio.create_task_group() as tg:
                await self._converse(link, tg)
                # Jobs end on their own once told the connection is gone.
        finally:
            self._clients[client] -= 1
            if self._clients[client] <= 0:
                del self._clients[client]

    async def _converse(self, link: _Link, tg: anyio.abc.TaskGroup) -> None:
        peer, limits = link.peer, self.config.limits
        try:
            while True:
                driver = link.driver if link.driver is not None and not link.driver.ended else None
                if peer.conn.state is State.AWAIT_HELLO:
                    frame, waited = await _recv_within(peer, limits.hello_timeout), "hello"
                elif driver is None:
                    frame, waited = await _recv_within(peer, limits.idle_timeout), "job"
                else:  # a job in flight has its own deadlines; idle counts from its end
                    frame = await _recv_unless(peer, driver.done)
                    if frame is None:
                        continue
                if frame is None:
                    timeout = limits.hello_timeout if waited == "hello" else limits.idle_timeout
                    await peer.close_idle(f"no {waited} within {timeout:g} s")
                    return
                try:
                    message = peer.decode(frame)
                except ProtocolError as err:
                    log.info("closing connection: %s", err)
                    await peer.fail(err)
                    return
                if not await self._dispatch(link, message, tg):
                    return
        except ConnectionClosed:
            pass
        finally:
            if link.driver is not None:
                link.driver.disconnect("connection closed")

    async def _dispatch(self, link: _Link, message: Message, tg: anyio.abc.TaskGroup) -> bool:
        """Act on one message; False when the connection is over."""
        peer = link.peer
        if isinstance(message, Hello):
            peer.sender = message.sender
            await self._send_info(peer)
        elif isinstance(message, InfoRequest):
            await self._send_info(peer)
        elif isinstance(message, JobRequest):
            driver = await self._admit(peer, message)
            if driver is not None:
                link.driver = driver
                tg.start_soon(self._run, driver)
        elif isinstance(message, Payment):
            await self._take_payment(link, message)
        elif isinstance(message, Cancel):
            driver = link.live_job(message.job_id)
            if driver is not None:
                driver.cancel()
        elif isinstance(message, Error):
            log.info("broadcaster reported an error: %s %s", message.code, message.message)
            if message.job_id is None:  # fatal (spec 3.3): the connection is over
                await peer.ws.close()
                return False
        return True

    async def _send_info(self, peer: Peer) -> None:
        """`info` for a hello or an info_request; its first-window parameters (if any)
        replace the connection's earlier ones (spec 8.11)."""
        info = await self._info(peer.sender, FEATURE_FIRST_PAYMENT in peer.conn.features)
        peer.first_seeds = frozenset(p.seed for p in info.first_params)
        await peer.send(info)

    async def _info(self, sender: bytes, first_payment: bool = False) -> Info:
        """The advertisement; with `first_payment`, also the parameters that pay the first
        window of this connection's jobs, one-ticket EVs a factor of 4 apart (spec 8.11)."""
        params, first = await self.cashier.info_params(sender, first_payment)
        return Info(
            orchestrator=self._address_bytes,
            capabilities=tuple(self._advertise(s) for s in self.slots.values()),
            ticket_params=params,
            max_frame_bytes=self.config.max_frame_bytes,
            agent="stepstream-orchestrator/0.1",
            devices=tuple(self.runners.devices()),
            features=(FEATURE_INFO_REQUEST,),
            first_params=tuple(first),
        )

    # ------------------------------------------------------------ admission

    async def _admit(self, peer: Peer, req: JobRequest) -> JobDriver | None:
        """Accept the job (quote + ticket params) or refuse it before any payment."""
        current_job_id.set(req.job_id)
        slot: ModelSlot | None = None
        features = peer.conn.features
        place = None
        try:
            slot = self.offers.slot_for(req)
            shape = check_request(req, frames_streamed=FEATURE_RESULT_FRAMES in features)
            try:
                slot.reserve()
            except ProtocolError:
                # Full: a broadcaster that understands a queue may wait in it (spec 4.6).
                if FEATURE_QUEUE not in features:
                    raise
                place = slot.enqueue(self.config.max_queued)
                if place is None:
                    raise
        except ProtocolError as err:
            await self._refuse(peer, req, err)
            return None
        if place is not None and not await self._queued(peer, req, slot, place):
            return None
        # B's job ids are unique on its connection only; the runner sees one of ours.
        runner_job_id = secrets.token_hex(8)
        try:
            runner = await self._loading(peer, req, slot)
            steps = await runner.plan(dataclasses.replace(req, job_id=runner_job_id))
            price = slot.entry.price_per_pixel_step
            fee = window_fee(price * shape.pixels_per_step, req.preview_every, steps)
            params = await self.cashier.job_params(peer.sender, fee)
        except ProtocolError as err:
            slot.release()
            await self._refuse(peer, req, err)
            return None
        except ChainError as exc:
            slot.release()
            err = ProtocolError(ErrorCode.INTERNAL_ERROR, f"chain unavailable: {exc}")
            await self._refuse(peer, req, err)
            return None
        first = await self._first_payment(peer, req)
        if isinstance(first, ProtocolError):
            slot.release()
            await self._refuse(peer, req, first)
            return None
        seed = req.params.seed if req.params.seed is not None else secrets.randbits(32)
        job_fee = price * shape.pixels_per_step * steps
        # Taken without an await before the quote goes out: two jobs of one sender
        # cannot both spend the same balance.
        carried = self.balances.take(peer.sender, job_fee, time.monotonic())
        quote = make_quote(
            req,
            steps=steps,
            pixels_per_step=shape.pixels_per_step,
            price_per_pixel_step=price,
            seed=seed,
            ticket_params=params,
            credit=carried,
        )
        job = self.job_type(
            req,
            quote,
            payment_timeout=self.config.payment_timeout,
            refresh_blocks=self.config.refresh_blocks,
            refresh_nonces=self.config.nonces_per_rand // 2,
            runner_job_id=runner_job_id,
            features=features,
        )
        if first is not None:
            job.prepay(first)  # granted with the job and acknowledged after `accepted`
        try:
            await peer.send(quote)
        except BaseException:
            slot.release()  # the broadcaster left before it heard the quote
            self.balances.put(peer.sender, carried, time.monotonic())
            raise
        self.stats.jobs_accepted += 1
        log.info("job %s accepted: %d steps, fee %.0f wei", req.job_id, steps, quote.fee)
        return JobDriver(job, peer, runner, _Host(self, slot, peer.sender))

    async def _first_payment(
        self, peer: Peer, req: JobRequest
    ) -> PaymentInput | ProtocolError | None:
        """Check the payment attached to an admitted job against the connection's first-window
        parameters (spec 8.11): its credit, or the refusal (K2's code) that ends the job
        before it starts, the EV of the tickets before the faulty one kept as the sender's
        balance (7.5); None when the job came without one."""
        attached = req.first_payment
        if attached is None:
            return None
        payment = Payment(
            job_id=req.job_id,
            sender=peer.sender,
            ticket_params=attached.ticket_params,
            tickets=attached.tickets,
        )
        receipt = await self.cashier.receive(payment, peer.first_seeds)
        self._count_tickets(receipt)
        if receipt.error is not None:
            log.info("job %s: attached payment refused: %s", req.job_id, receipt.error)
            self.balances.put(peer.sender, receipt.ev, time.monotonic())
            return receipt.error
        return PaymentInput(receipt.ev, receipt.accepted, len(receipt.winners))

    async def _loading(self, peer: Peer, req: JobRequest, slot: ModelSlot) -> RunnerClient:
        """The slot's runner; while a cold model loads, B hears `status` every few seconds
        (when it listed the feature), so a slow load is not taken for a dead node."""
        if FEATURE_STATUS not in peer.conn.features or self.runners.state(slot.entry.model_id):
            return await self._runner_for(slot)
        failure: ProtocolError | None = None
        async with anyio.create_task_group() as tg:

            async def heartbeat() -> None:
                status = Status(
                    job_id=req.job_id,
                    phase="loading",
                    next_within_ms=int(LOADING_STATUS_SECONDS * 2000),
                )
                while True:
                    await peer.send(status)
                    await anyio.sleep(LOADING_STATUS_SECONDS)  # a period, not a sync

            tg.start_soon(heartbeat)
            try:
                runner = await self._runner_for(slot)
            except ProtocolError as err:
                failure = err
            tg.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return runner

    async def _queued(
        self, peer: Peer, req: JobRequest, slot: ModelSlot, place: anyio.Event
    ) -> bool:
        """Wait for a unit of the slot's capacity, telling B its place every few seconds;
        nothing is quoted or paid meanwhile. B may cancel (answered `cancelled`, 0 steps) or
        leave; False then, and the place (or a unit handed to it meanwhile) is given up."""
        ended: str | None = None

        async def tell(scope: anyio.CancelScope) -> None:
            nonlocal ended
            while True:
                message = Queued(
                    job_id=req.job_id,
                    position=slot.position(place),
                    estimated_start_ms=slot.estimated_start_ms(place),
                    next_within_ms=int(QUEUE_STATUS_SECONDS * 2000),
                )
                try:
                    await peer.send(message)
                except ConnectionClosed:
                    ended = "left"
                    scope.cancel()
                    return
                await anyio.sleep(QUEUE_STATUS_SECONDS)  # a period, not a sync

        async def listen(scope: anyio.CancelScope) -> None:
            nonlocal ended
            try:
                message = peer.decode(await peer.ws.recv())
            except ProtocolError as err:
                await peer.fail(err)
                ended = "failed"
            except ConnectionClosed:
                ended = "left"
            else:  # in job_requested B may send only `cancel` or a fatal `error`
                ended = "cancelled" if isinstance(message, Cancel) else "left"
            scope.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(tell, tg.cancel_scope)
            tg.start_soon(listen, tg.cancel_scope)
            await place.wait()
            tg.cancel_scope.cancel()
        if ended is None and place.is_set():
            return True
        slot.leave(place)
        log.info("job %s left the queue (%s)", req.job_id, ended)
        if ended == "cancelled":
            with contextlib.suppress(ConnectionClosed):
                await peer.send(Cancelled(job_id=req.job_id, steps=0))
        return False

    async def _refuse(self, peer: Peer, req: JobRequest, err: ProtocolError) -> None:
        self.stats.jobs_refused += 1
        self.metrics.jobs.labels(req.pipeline, req.model_id, f"refused:{err.code.value}").inc()
        log.info("job %s refused: %s", req.job_id, err)
        await peer.send(error_message(err.code.value, err.message, req.job_id))

    async def _run(self, driver: JobDriver) -> None:
        current_job_id.set(driver.job.job_id)
        async with self.runners.use(driver.job.request.model_id):
            await driver.run()

    def _observe(self, req: JobRequest, outcome: JobOutcome, seconds: float) -> None:
        labels = (req.pipeline, req.model_id)
        m = self.metrics
        terminal = outcome.error_code if outcome.terminal == "error" else outcome.terminal
        m.jobs.labels(*labels, terminal).inc()
        m.steps.labels(*labels).inc(outcome.steps_executed)
        if outcome.steps_executed and seconds > 0:
            m.step_seconds.labels(*labels).observe(seconds / outcome.steps_executed)
            m.steps_per_second.labels(*labels).observe(outcome.steps_executed / seconds)
        self.stats.steps_executed += outcome.steps_executed
        self.stats.outcomes.append(outcome)
        self.stats.job_credit[req.job_id] = outcome.credit
        log.info(
            "job %s ended (%s) after %d steps",
            req.job_id,
            outcome.terminal,
            outcome.steps_executed,
        )

    # ------------------------------------------------------------ payments

    async def _take_payment(self, link: _Link, payment: Payment) -> None:
        # The job it names: running, or (a late payment, spec 5.3) the one that just ended.
        named = link.driver if link.driver and link.driver.job.job_id == payment.job_id else None
        receipt = await self.cashier.receive(payment, named.job.issued_seeds if named else set())
        self._count_tickets(receipt)
        driver = link.live_job(payment.job_id)
        if driver is None:
            log.info("payment for ended job %s: %d tickets kept", payment.job_id, receipt.accepted)
            return
        if receipt.error is not None:
            log.info("job %s: payment refused: %s", payment.job_id, receipt.error)
        driver.payment(
            PaymentInput(receipt.ev, receipt.accepted, len(receipt.winners), receipt.error)
        )

    def _count_tickets(self, receipt: PaymentReceipt) -> None:
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


@dataclass
class _Host:
    """The orchestrator as one job sees it (orchestrator/job_driver.py's JobHost)."""

    orch: Orchestrator
    slot: ModelSlot
    sender: bytes
    started: float = field(default_factory=time.monotonic)

    async def current_block(self) -> int:
        return await self.orch.cashier.current_block()

    async def refreshed_params(self, job: OrchestratorJob) -> TicketParams:
        self.orch.stats.params_refreshed += 1
        return await self.orch.cashier.job_params(self.sender, job.window_fee)

    def nonces_used(self, params: TicketParams) -> int:
        return self.orch.cashier.recipient.nonces.count(params.recipient_rand_hash)

    def job_ended(self, job: OrchestratorJob, outcome: JobOutcome) -> None:
        self.slot.observe_duration(time.monotonic() - self.started)
        self.slot.release()
        self.orch.balances.put(self.sender, outcome.unspent, time.monotonic())
        self.orch._observe(job.request, outcome, time.monotonic() - self.started)

    def grant_waited(self, job: OrchestratorJob, step: int, seconds: float) -> None:
        req, m = job.request, self.orch.metrics
        labels = (req.pipeline, req.model_id, "first" if step == 1 else "later")
        m.grant_wait.labels(*labels).inc(seconds)
        m.grant_waits.labels(*labels).inc()

    async def sent(self, job: OrchestratorJob, message: Message) -> None:
        if isinstance(message, Preview):
            req = job.request
            self.orch.metrics.preview_bytes.labels(req.pipeline, req.model_id).inc(
                len(message.image)
            )
        for observe in self.orch.observers:
            await observe(message)


async def _recv_within(peer: Peer, seconds: float) -> bytes | str | None:
    """The next frame, or None after `seconds` (websockets' recv may be cancelled safely)."""
    with anyio.move_on_after(seconds):
        return await peer.ws.recv()
    return None


async def _recv_unless(peer: Peer, event: anyio.Event) -> bytes | str | None:
    """The next frame, or None as soon as `event` is set (the job ended)."""
    frame: bytes | str | None = None
    closed: ConnectionClosed | None = None
    async with anyio.create_task_group() as tg:

        async def stop_on_event() -> None:
            await event.wait()
            tg.cancel_scope.cancel()

        tg.start_soon(stop_on_event)
        try:
            frame = await peer.ws.recv()
        except ConnectionClosed as exc:  # raised here, not wrapped in the group's error
            closed = exc
        tg.cancel_scope.cancel()
    if closed is not None:
        raise closed
    return frame


def _client_address(ws: ServerConnection) -> str:
    remote = ws.remote_address
    return str(remote[0]) if remote else "unknown"
