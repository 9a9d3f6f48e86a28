"""`stepstream conformance --serve`: an orchestrator that misbehaves on purpose, one case per job.

A broadcaster under test connects and runs jobs; the k-th job it sends gets
the k-th case. Each case's script (conformance/serve_cases.py) serves the
job honestly except for one thing a broadcaster must catch, and its judge
turns what the broadcaster did (conformance/served_job.py records it) into
a verdict. Connections without a job (discovery) are answered and cost no case.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from fractions import Fraction

import anyio
import anyio.abc
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from conformance.report import Report
from conformance.serve_cases import ServeCase
from conformance.served_job import BroadcasterGone, JobRecord, ServedJob
from conformance.verdicts import CaseResult, Verdict
from pipelines.errors import InvalidRequest
from pipelines.requests import output_shape, planned_steps
from protocol.codec import DEFAULT_MAX_FRAME_BYTES
from protocol.connection import Connection, State
from protocol.credit import first_window_evs, max_lead, ticket_odds
from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import (
    FEATURE_FIRST_PAYMENT,
    Cancel,
    Capability,
    Error,
    Hello,
    Info,
    JobRequest,
    Message,
    Payment,
    Role,
    TicketParams,
    error_message,
)
from protocol.pm import MAX_UINT256, address_of
from protocol.recipient import NonceLedger, Recipient
from settlement.chain import offchain_block

log = logging.getLogger(__name__)
PIPELINES = ("text-to-image", "image-to-image", "image-to-video")


@dataclass
class ServeOptions:
    key: bytes
    models: list[str]
    price: Fraction = Fraction(95367)
    lead: int | None = None
    """The broadcaster's lead L (spec 7.3); None: the spec's default, 1."""
    observe: float = 2.0
    """Seconds to watch for a reaction (a cancel, a payment that must not come)."""
    stall: float = 3.0
    """Seconds the stall case stays silent."""
    payment_timeout: float = 10.0
    """Seconds to wait for a payment that is due before ending the job (payment_timeout)."""


@dataclass
class _Running:
    case: ServeCase
    record: JobRecord
    started: float
    done: anyio.Event = field(default_factory=anyio.Event)


class ConformanceOrchestrator:
    def __init__(self, cases: list[ServeCase], options: ServeOptions) -> None:
        self.options = options
        self.address = address_of(options.key)
        self.address_bytes = bytes.fromhex(self.address[2:])
        secret = hmac.new(options.key, b"stepstream conformance", hashlib.sha256).digest()
        self.recipient = Recipient(self.address, secret, NonceLedger())
        self.pending: deque[ServeCase] = deque(cases)
        self._order = {c.name: i for i, c in enumerate(cases)}
        self.results: list[CaseResult] = []
        self.all_done = anyio.Event()
        self._running = 0
        self.started = time.monotonic()
        self.target = "broadcaster"

    def report(self, waited: float) -> Report:
        results = list(self.results)
        for case in self.pending:
            results.append(
                CaseResult(case.name, case.ids, case.title, Verdict.SKIP,
                           f"no job arrived for this case within {waited:g} s", 0.0)
            )  # fmt: skip
        results.sort(key=lambda r: self._order.get(r.name, len(self._order)))
        return Report(self.target, results, time.monotonic() - self.started)

    @contextlib.asynccontextmanager
    async def serve(self, host: str, port: int) -> AsyncIterator[Server]:
        async with serve(
            self.handle,
            host,
            port,
            max_size=2 * DEFAULT_MAX_FRAME_BYTES,
            compression=None,
        ) as server:
            real = server.sockets[0].getsockname()[1]
            self.target = f"broadcasters of ws://{host}:{real}"
            yield server

    # ------------------------------------------------------------ connections

    def _info(self, sender: bytes, features: frozenset[str] = frozenset()) -> Info:
        """The advertisement; first-window parameters (8.11) when B asked for them and the
        case its next job gets wants them."""
        face = 10**15
        block = offchain_block()
        general = self.recipient.issue_params(
            sender, face, 8 * 10**9 * MAX_UINT256 // face, block, bytes(16)
        )
        first: list[TicketParams] = []
        if FEATURE_FIRST_PAYMENT in features and self.pending and self.pending[0].first_window:
            first = [
                self.recipient.issue_params(
                    sender, *ticket_odds(Fraction(ev), face), block, secrets.token_bytes(16)
                )
                for ev in first_window_evs(face)
            ]
        caps = tuple(
            Capability(pipeline, model, True, 8, 0, self.options.price)
            for model in self.options.models
            for pipeline in PIPELINES
        )
        return Info(
            orchestrator=self.address_bytes,
            capabilities=caps,
            ticket_params=general,
            max_frame_bytes=DEFAULT_MAX_FRAME_BYTES,
            agent="stepstream-conformance/0.2",
            first_params=tuple(first),
        )

    async def handle(self, ws: ServerConnection) -> None:
        conn = Connection(Role.ORCHESTRATOR)
        lock = anyio.Lock()
        current: list[tuple[ServedJob, _Running]] = []
        sender = bytes(20)
        first_seeds: set[bytes] = set()

        async def send(message: Message) -> None:
            async with lock:
                await ws.send(conn.send(message))

        async with anyio.create_task_group() as tg:
            try:
                while True:
                    frame = await ws.recv()
                    if conn.state is State.CLOSED:
                        continue  # we ended it on purpose (a case's fatal error): B may lag
                    try:
                        if isinstance(frame, str):
                            raise ProtocolError(ErrorCode.MALFORMED_FRAME, "a text frame")
                        message = conn.receive(frame)
                    except ProtocolError as err:
                        if current:
                            current[-1][1].record.invalid_frame = str(err)
                            current[-1][1].record.notify()
                        with contextlib.suppress(ConnectionClosed):
                            async with lock:
                                await ws.send(conn.error_frame(err))
                                await ws.close(1002, err.code.value)
                        break
                    if isinstance(message, Hello):
                        sender = message.sender
                        info = self._info(sender, conn.features)
                        first_seeds = {p.seed for p in info.first_params}
                        await send(info)
                    elif isinstance(message, JobRequest):
                        for _, running in current:
                            running.record.next_job_at = time.monotonic()
                            running.record.notify()
                        job = await self._admit(message, sender, send)
                        if job is not None and message.first_payment is not None:
                            attached = Payment(
                                job_id=message.job_id,
                                sender=sender,
                                ticket_params=message.first_payment.ticket_params,
                                tickets=message.first_payment.tickets,
                            )
                            job[0].take_first(attached, offchain_block(), first_seeds)
                        if job is not None:
                            current.append(job)
                            tg.start_soon(self._run_case, *job)
                    elif isinstance(message, Payment | Cancel):
                        self._on_job_message(message, current, send, tg)
                    elif isinstance(message, Error):
                        for _, running in current:
                            if message.job_id in (None, running.record.request.job_id):
                                running.record.broadcaster_error = message
                                running.record.notify()
                        if message.job_id is None:
                            await ws.close()
                            break
            except ConnectionClosed:
                pass
            finally:
                for _, running in current:
                    running.record.closed_at = time.monotonic()
                    running.record.notify()

    def _on_job_message(
        self, message: Message, current: list, send, tg: anyio.abc.TaskGroup
    ) -> None:
        for job, running in current:
            if job.job_id != message.job_id:  # type: ignore[attr-defined]
                continue
            if isinstance(message, Cancel):
                running.record.cancelled_at = running.record.cancelled_at or time.monotonic()
                running.record.notify()
            else:
                credit = job.take(message, offchain_block())  # type: ignore[arg-type]
                if credit is not None:
                    tg.start_soon(_send_quietly, send, credit)

    async def _admit(
        self, request: JobRequest, sender: bytes, send
    ) -> tuple[ServedJob, _Running] | None:
        """The job's case, or a refusal that costs no case (a request we cannot price)."""
        try:
            shape = output_shape(request.params)
        except InvalidRequest as exc:
            await send(error_message("invalid_request", str(exc), request.job_id))
            return None
        if request.model_id not in self.options.models or not self.pending:
            why = "no conformance case left" if not self.pending else "model not offered"
            code = "no_capacity" if not self.pending else "unknown_model"
            await send(error_message(code, why, request.job_id))
            return None
        case = self.pending.popleft()
        self._running += 1
        steps = planned_steps(request.params) - (request.resume.step if request.resume else 0)
        n = request.preview_every
        lead = self.options.lead if self.options.lead is not None else 1
        record = JobRecord(
            request=request,
            shape=shape,
            steps=max(1, steps),
            f=self.options.price * shape.pixels_per_step,
            lead=max(0, min(lead, max_lead(n))),
        )
        job = ServedJob(
            record,
            send,
            self.recipient,
            sender,
            price=self.options.price,
            current_block=offchain_block,
            payment_timeout=self.options.payment_timeout,
        )
        return job, _Running(case, record, time.monotonic())

    async def _run_case(self, job: ServedJob, running: _Running) -> None:
        case = running.case
        try:
            with contextlib.suppress(BroadcasterGone, ConnectionClosed, ProtocolError):
                await case.script(job, self.options)
            with contextlib.suppress(ConnectionClosed, ProtocolError):
                await job.answer_cancel()
            verdict, detail = case.judge(running.record, self.options)
        except Exception as exc:  # noqa: BLE001 - a suite bug must not hang the run
            log.exception("case %s", case.name)
            verdict, detail = Verdict.FAIL, f"suite error: {exc!r}"
        r = running.record
        if verdict is not Verdict.FAIL and r.invalid_frame:
            verdict, detail = (
                Verdict.FAIL,
                f"S6: the broadcaster sent a bad frame: {r.invalid_frame}",
            )
        refused = [p.refused for p in r.payments if p.refused]
        if verdict is not Verdict.FAIL and refused:
            verdict, detail = Verdict.FAIL, f"K16: tickets refused ({refused[0]})"
        if r.notes:
            detail = f"{detail}; {'; '.join(r.notes)}" if detail else "; ".join(r.notes)
        self.results.append(
            CaseResult(
                case.name, case.ids, case.title, verdict, detail, time.monotonic() - running.started
            )
        )
        self._running -= 1
        if not self.pending and self._running == 0:
            self.all_done.set()


async def _send_quietly(send, message: Message) -> None:
    with contextlib.suppress(ConnectionClosed, ProtocolError):
        await send(message)
