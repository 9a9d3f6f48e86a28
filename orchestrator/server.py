"""The orchestrator: advertises what it runs, admits jobs, takes payment, runs steps.

Every check that can refuse a job (pipeline, model, parameters, capacity,
model loading) happens before the job is accepted, so a refused job has
taken no payment. After acceptance, steps run only against credit
(orchestrator/jobs.py).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

import anyio
import anyio.abc
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from orchestrator.config import ModelEntry
from orchestrator.jobs import JobOutcome, RunningJob
from orchestrator.peer import Peer
from pipelines.errors import InvalidRequest, ModelNotFound
from pipelines.loader import LoadedModel, load_model
from pipelines.resume import ResumePoint, latents_from_bytes, resume_scheduler_name
from pipelines.text_to_image import executed_steps, validate_text_to_image
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
    Role,
    error_message,
)
from protocol.pm import MAX_UINT256, address_of
from protocol.pricing import job_fee
from protocol.recipient import NonceLedger, Recipient, WinningTicket

log = logging.getLogger(__name__)

PREVIEW_METHODS = frozenset({"latent_rgb", "vae", "none"})
PREVIEW_FORMATS = frozenset({"webp", "jpeg"})
DEFAULT_FACE_VALUE = 10**15
DEFAULT_TICKET_EV = 8 * 10**9  # go-livepeer's default ticket EV, for the info message
SECONDS_PER_BLOCK = 12


def offchain_block() -> int:
    """With no chain configured, a 'block' is a 12 s period of wall-clock time."""
    return int(time.time()) // SECONDS_PER_BLOCK


@dataclass
class OrchestratorConfig:
    models: list[ModelEntry]
    private_key: bytes
    face_value: int = DEFAULT_FACE_VALUE
    payment_timeout: float = 30.0
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    current_block: Callable[[], int] = offchain_block


@dataclass
class ModelSlot:
    """One offered (pipeline, model): its config, the loaded model, jobs in flight."""

    entry: ModelEntry
    model: LoadedModel | None = None
    in_use: int = 0
    load_lock: anyio.Lock = field(default_factory=anyio.Lock)

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


class Orchestrator:
    job_class: type[RunningJob] = RunningJob
    """What runs an admitted job; orchestrator/testing.py swaps in one that injects faults."""

    def __init__(self, config: OrchestratorConfig) -> None:
        self.config = config
        self.address = address_of(config.private_key)
        self._address_bytes = bytes.fromhex(self.address[2:])
        # Derived from the key, so parameters issued before a restart still verify.
        secret = hmac.new(config.private_key, b"stepstream recipient secret", hashlib.sha256)
        self.recipient = Recipient(self.address, secret.digest(), NonceLedger())
        self.slots = {(e.pipeline, e.model_id): ModelSlot(e) for e in config.models}
        self.stats = Stats()

    async def load_warm_models(self) -> None:
        """Load every model marked warm before accepting connections."""
        for slot in self.slots.values():
            if slot.entry.warm:
                await self._ensure_loaded(slot)

    async def _ensure_loaded(self, slot: ModelSlot) -> LoadedModel:
        async with slot.load_lock:
            if slot.model is None:
                log.info("loading model %s", slot.entry.model_id)
                slot.model = await anyio.to_thread.run_sync(load_model, slot.entry.model_id)
                log.info("loaded %s in %.2f s", slot.entry.model_id, slot.model.load_seconds)
            return slot.model

    def serve(self, host: str, port: int) -> serve:
        """An `async with` server on host:port (port 0 picks a free one)."""
        return serve(
            self.handle,
            host,
            port,
            # Frames up to twice our cap reach the codec, which answers
            # frame_too_large; larger ones are closed by websockets with 1009.
            max_size=2 * self.config.max_frame_bytes,
            compression=None,
        )

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
            await peer.send(self._info(message.sender))
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

    def _info(self, sender: bytes) -> Info:
        face = self.config.face_value
        params = self.recipient.issue_params(
            sender,
            face,
            max(1, DEFAULT_TICKET_EV * MAX_UINT256 // face),
            self.config.current_block(),
            secrets.token_bytes(16),
        )
        return Info(
            orchestrator=self._address_bytes,
            capabilities=tuple(s.capability() for s in self.slots.values()),
            ticket_params=params,
            max_frame_bytes=self.config.max_frame_bytes,
            agent="stepstream-orchestrator/0.1",
        )

    # ------------------------------------------------------------ admission

    async def _admit(self, peer: Peer, req: JobRequest) -> tuple[RunningJob, ModelSlot] | None:
        """Accept the job (quote + ticket params) or refuse it before any payment."""
        try:
            slot, model = await self._check(req)
        except ProtocolError as err:
            self.stats.jobs_refused += 1
            log.info("job %s refused: %s", req.job_id, err)
            await peer.send(error_message(err.code.value, err.message, req.job_id))
            return None
        params = req.params
        try:
            resume = self._resume_point(req, model)
        except ProtocolError as err:
            self.stats.jobs_refused += 1
            await peer.send(error_message(err.code.value, err.message, req.job_id))
            return None
        steps = executed_steps(params, model) - (resume.step if resume else 0)
        pixels = params.width * params.height * params.num_images_per_prompt
        price = slot.entry.price_per_pixel_step
        fee_per_step = job_fee(pixels, 1, price)
        window_fee = fee_per_step * min(req.preview_every, steps)
        face_value, win_prob = ticket_odds(window_fee, self.config.face_value)
        ticket_params = self.recipient.issue_params(
            peer.sender,
            face_value,
            win_prob,
            self.config.current_block(),
            secrets.token_bytes(16),
        )
        seed = params.seed if params.seed is not None else secrets.randbits(32)
        job = self.job_class(
            req,
            model,
            JobCredit(fee_per_step, steps),
            seed,
            lambda m: peer.send(m),
            self.config.payment_timeout,
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

    async def _check(self, req: JobRequest) -> tuple[ModelSlot, LoadedModel]:
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
            validate_text_to_image(req.params)
        except InvalidRequest as exc:
            raise ProtocolError(ErrorCode.INVALID_REQUEST, str(exc)) from None
        if slot.in_use >= slot.entry.capacity:
            raise ProtocolError(
                ErrorCode.NO_CAPACITY,
                f"{req.model_id} is running {slot.in_use} of {slot.entry.capacity} jobs",
            )
        try:
            model = await self._ensure_loaded(slot)
        except ModelNotFound as exc:
            raise ProtocolError(ErrorCode.MODEL_UNAVAILABLE, str(exc)) from None
        return slot, model

    def _resume_point(self, req: JobRequest, model: LoadedModel) -> ResumePoint | None:
        """The job's starting latents when it resumes one begun elsewhere (spec 15)."""
        if req.resume is None:
            return None
        latents, p = req.resume.latents, req.params
        scheduler = resume_scheduler_name(model.pipe)
        if not scheduler or latents.scheduler != scheduler:
            raise ProtocolError(
                ErrorCode.INVALID_REQUEST,
                f"cannot resume {latents.scheduler} latents here (resume scheduler: "
                f"{scheduler or 'none'})",
            )
        if req.resume.step >= executed_steps(p, model):
            raise ProtocolError(
                ErrorCode.INVALID_REQUEST,
                f"resume step {req.resume.step} leaves no step of {p.num_inference_steps} to run",
            )
        shape = (p.num_images_per_prompt, 4, p.height // 8, p.width // 8)
        if tuple(latents.shape) != shape:
            raise ProtocolError(
                ErrorCode.INVALID_REQUEST,
                f"latents of shape {tuple(latents.shape)} do not fit the job's {shape}",
            )
        try:
            tensor = latents_from_bytes(latents.dtype, tuple(latents.shape), latents.data)
        except ValueError as exc:
            raise ProtocolError(ErrorCode.INVALID_REQUEST, str(exc)) from None
        return ResumePoint(req.resume.step, tensor)

    async def _run(self, job: RunningJob, slot: ModelSlot) -> None:
        try:
            outcome = await job.run()
        finally:
            slot.in_use -= 1
        self.stats.steps_executed += outcome.steps_executed
        self.stats.outcomes.append(outcome)
        log.info(
            "job %s ended (%s) after %d steps",
            job.request.job_id,
            outcome.terminal,
            outcome.steps_executed,
        )

    # ------------------------------------------------------------ payments

    async def _take_payment(self, peer: Peer, payment: Payment, job: RunningJob | None) -> None:
        receipt = self.recipient.receive(payment, self.config.current_block())
        self.stats.tickets_received += receipt.accepted
        self.stats.ev_received += receipt.ev
        for winner in receipt.winners:
            # Off-chain mode: winners are kept, not redeemed (spec 8.6).
            log.info(
                "winning ticket from %s, face value %d",
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
