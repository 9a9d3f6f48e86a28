"""One job, one event stream, as many orchestrators as it takes (within a bound).

`JobRunner.generate` selects an orchestrator (broadcaster/selection.py),
runs the job there through a BroadcasterSession and watches it. The job
moves when no progress arrives within k measured progress intervals plus
a small floor (broadcaster/stall.py), when the projected finish passes the
client's deadline and another orchestrator is measured to make it, on a
disconnect, or on an error. Moving means: stop paying at once (payments are only ever made in
answer to progress, so none follows), cancel there, suspend that
orchestrator, and continue elsewhere, from the latents of the last step
delivered (every progress carries them) when the new orchestrator can
resume (spec 15), else from the start. The client sees one stream with an
OrchestratorChanged event at each move, and a second move resumes from the
newest latents. A `JobControl` lets the caller see where the job runs and
cancel it from another task.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from fractions import Fraction

import anyio

from broadcaster.deadlines import leave_queue, too_slow
from broadcaster.discovery import Discovery
from broadcaster.hardware import HardwareFilter
from broadcaster.job_control import JobControl
from broadcaster.metrics_store import MetricsStore
from broadcaster.pool import SessionPool
from broadcaster.selection import (
    Candidate,
    DeadlineUnmeetable,
    NoOrchestrator,
    SelectionConfig,
    candidates,
    choose,
)
from broadcaster.session import BroadcasterSession, SessionError
from broadcaster.stall import (
    DEFAULT_STALL_FACTOR,
    DEFAULT_STALL_FLOOR,
    ProgressClock,
    StallRule,
    stall_timeout,
)
from broadcaster.suspension import Suspensions
from broadcaster.tries import Try, classify, give_up, job_result
from pipelines.errors import InvalidRequest
from pipelines.requests import output_shape, planned_steps
from protocol.codec import check
from protocol.errors import ErrorCode, ProtocolError
from protocol.job_events import (
    Accepted,
    Event,
    JobError,
    JobResult,
    JobStatus,
    OrchestratorChanged,
    PaymentSent,
    PreviewFrame,
    ProgressUpdate,
)
from protocol.messages import JobParams, JobRequest, Latents, ResumeFrom

RETRYABLE_REFUSALS = frozenset({ErrorCode.NO_CAPACITY.value})
"""Refusals that say 'not now' rather than 'something is wrong here': no suspension."""


@dataclass(frozen=True)
class FailoverPolicy:
    stall_factor: float = DEFAULT_STALL_FACTOR
    """k: no progress within k measured progress intervals plus the floor is a stall."""
    stall_floor: float = DEFAULT_STALL_FLOOR
    """Seconds added to every stall deadline: jitter that does not scale with the step."""
    first_step_timeout: float = 30.0
    """Seconds from sending the job to its first progress, when nothing is measured."""
    finish_timeout: float = 30.0
    """Seconds from the last step's progress to the result (the decode), unless the
    orchestrator's `status` promises more (spec 9.6)."""
    alone_timeout: float = 60.0
    """Seconds without progress before giving up on an orchestrator when no other one
    could take the job: waiting for a slow one beats failing the job."""
    max_orchestrators: int = 3
    """Tries per job, refusals included, before giving up."""
    connect_timeout: float = 2.0
    close_timeout: float = 1.0
    resume: bool = True
    """Ask for latents and continue from them where the next orchestrator can."""

    @property
    def rule(self) -> StallRule:
        return StallRule(
            self.stall_factor, self.stall_floor, self.first_step_timeout, self.finish_timeout
        )


class JobRunner:
    """Runs jobs over the orchestrators `discovery` knows, failing over as needed."""

    def __init__(
        self,
        discovery: Discovery,
        private_key: bytes,
        *,
        metrics: MetricsStore | None = None,
        suspensions: Suspensions | None = None,
        selection: SelectionConfig | None = None,
        policy: FailoverPolicy | None = None,
        max_price: Fraction | None = None,
        rng: random.Random | None = None,
        hardware: HardwareFilter | None = None,
        pool_connections: bool = False,
    ) -> None:
        self.discovery = discovery
        self.private_key = private_key
        self.metrics = metrics or MetricsStore()
        self.suspensions = suspensions or Suspensions()
        self.selection = selection or SelectionConfig()
        self.policy = policy or FailoverPolicy()
        self.max_price = max_price
        self.rng = rng or random.Random()
        self.hardware = hardware
        """Only offers on this hardware (spec 4.5: --min-vram, --gpu); None: any."""
        self.pool = (
            SessionPool(
                private_key,
                max_price=max_price,
                open_timeout=self.policy.connect_timeout,
                idle_timeout=math.inf,  # the stall timer of _run_try bounds every wait
            )
            if pool_connections
            else None
        )
        """Connections kept per orchestrator between jobs (broadcaster/pool.py), or None."""

    async def aclose(self) -> None:
        """Close the pooled connections."""
        if self.pool is not None:
            await self.pool.aclose()

    async def generate(
        self,
        params: JobParams,
        *,
        model_id: str,
        pipeline: str | None = None,
        preview_every: int = 1,
        preview_method: str = "latent_rgb",
        preview_format: str = "webp",
        preview_frame: int | None = None,
        deadline: float | None = None,
        job_id: str | None = None,
        control: JobControl | None = None,
    ) -> AsyncIterator[Event]:
        """Run one job; the last event is a JobResult or a JobError naming every try.

        The pipeline defaults to the one `params` is for. With `control`, the
        caller can see where the job runs and cancel it (the job then ends with
        a `cancelled` JobError, and no orchestrator is blamed).
        """
        job_id = job_id or uuid.uuid4().hex
        pipeline = pipeline or params.PIPELINE
        control = control or JobControl()
        started = time.monotonic()
        try:
            pixels = output_shape(params).pixels_per_step
            # What the wire would refuse is refused here, before any orchestrator is blamed.
            check(JobRequest(job_id, pipeline, model_id, params, preview_every, preview_method))
        except InvalidRequest as exc:
            yield JobError(job_id=job_id, code=ErrorCode.INVALID_REQUEST.value, message=str(exc))
            return
        except ProtocolError as err:
            yield JobError(job_id=job_id, code=err.code.value, message=err.message)
            return
        if not self.discovery.statuses:
            await self.discovery.refresh()
        if params.seed is None:
            # Resuming and restarting elsewhere both need the same seed everywhere.
            params = _with_seed(params, self.rng.randrange(2**32))
        tries: list[Try] = []
        kept: tuple[int, Latents] | None = None
        total = planned_steps(params)
        while len(tries) < self.policy.max_orchestrators:
            if control.cancel_requested:
                yield _cancelled(job_id)
                return
            offset = kept[0] if kept else 0
            remaining = None if deadline is None else deadline - (time.monotonic() - started)
            try:
                chosen = self._select(
                    pipeline, model_id, tries, pixels * (total - offset), remaining
                )
            except DeadlineUnmeetable as exc:
                # Refused before any job went out, so nothing was paid; no retry (spec M6).
                yield JobError(
                    job_id=job_id,
                    code=ErrorCode.DEADLINE_UNMEETABLE.value,
                    message=give_up(tries, str(exc)),
                )
                return
            except NoOrchestrator as exc:
                code = (
                    ErrorCode.PRICE_TOO_HIGH
                    if not tries and self._priced_out(pipeline, model_id)
                    else ErrorCode.NO_ORCHESTRATOR
                )
                yield JobError(job_id=job_id, code=code.value, message=give_up(tries, str(exc)))
                return
            resume = None
            if (
                kept
                and self.policy.resume
                and chosen.capability.resume_scheduler == kept[1].scheduler
            ):
                resume = ResumeFrom(step=kept[0], latents=kept[1])
            offset = resume.step if resume else 0
            if tries:
                old = tries[-1]
                yield OrchestratorChanged(
                    job_id=job_id,
                    old=old.url,
                    new=chosen.url,
                    reason=old.reason,
                    detail=old.detail,
                    resumed=resume is not None,
                    from_step=offset,
                    delivered_steps=old.delivered,
                    paid=old.paid,
                    step_fee=old.step_fee,
                    window_steps=old.accepted.window_steps if old.accepted else preview_every,
                )
            attempt = Try(chosen.url, model_id, offset)
            tries.append(attempt)
            async for event in self._run_try(
                attempt,
                chosen,
                params,
                can_move=lambda: self._has_alternative(pipeline, model_id, tries),
                model_id=model_id,
                pipeline=pipeline,
                preview=(preview_every, preview_method, preview_format, preview_frame),
                resume=resume,
                job_id=job_id,
                deadline_at=None if deadline is None else started + deadline,
                pixels=pixels,
                control=control,
            ):
                if (
                    isinstance(event, ProgressUpdate)
                    and event.latents is not None
                    and (kept is None or event.step > kept[0])
                ):
                    kept = (event.step, event.latents)
                if not isinstance(event, JobResult | JobError):
                    yield event  # a try's own end is told by OrchestratorChanged or the last event
            self._account(attempt, model_id, chosen.claimed_speed)
            if attempt.result is not None:
                yield job_result(job_id, tries, started)
                return
            if attempt.reason == "deadline":  # left a queue unpaid: nobody can make it (M7)
                yield JobError(
                    job_id=job_id,
                    code=ErrorCode.DEADLINE_UNMEETABLE.value,
                    message=attempt.detail,
                )
                return
            if control.cancel_requested:
                yield _cancelled(job_id)
                return
        yield JobError(
            job_id=job_id,
            code=ErrorCode.NO_ORCHESTRATOR.value,
            message=give_up(tries, f"gave up after {len(tries)} orchestrators"),
        )

    # ------------------------------------------------------------ selection

    def _select(
        self,
        pipeline: str,
        model_id: str,
        tries: list[Try],
        pixel_steps: int,
        remaining: float | None,
    ) -> Candidate:
        # Suspended orchestrators are a last resort, but a resort: a job tried on
        # one that failed a while ago beats a job refused outright.
        found = self._untried(pipeline, model_id, tries) or self._untried(
            pipeline, model_id, tries, include_suspended=True
        )
        if not found:
            _, why = candidates(
                self.discovery.statuses,
                pipeline=pipeline,
                model_id=model_id,
                max_price=self.max_price,
                metrics=self.metrics,
                suspensions=self.suspensions,
                exclude={},
                stakes={},
                hardware=self.hardware,
            )
            raise NoOrchestrator("no other orchestrator can take the job", why)
        return choose(found, self.selection, self.rng, pixel_steps=pixel_steps, deadline=remaining)

    def _priced_out(self, pipeline: str, model_id: str) -> bool:
        """Whether every orchestrator that offers the model asks more than our maximum."""
        offers = [s.capability(pipeline, model_id) for s in self.discovery.statuses]
        prices = [c.price_per_pixel_step for c in offers if c is not None]
        return bool(prices) and self.max_price is not None and min(prices) > self.max_price

    def _has_alternative(self, pipeline: str, model_id: str, tries: list[Try]) -> bool:
        """Whether another orchestrator could take the job now (none tried yet for it)."""
        return bool(self._untried(pipeline, model_id, tries))

    def _untried(
        self, pipeline: str, model_id: str, tries: list[Try], include_suspended: bool = False
    ) -> list[Candidate]:
        exclude = {t.url: f"already tried: {t.reason}" for t in tries}
        return self._others(pipeline, model_id, exclude, include_suspended=include_suspended)

    def _others(
        self,
        pipeline: str,
        model_id: str,
        exclude: dict[str, str],
        include_suspended: bool = False,
    ) -> list[Candidate]:
        """The orchestrators that could take the job, but those in `exclude` (url -> why)."""
        found, _ = candidates(
            self.discovery.statuses,
            pipeline=pipeline,
            model_id=model_id,
            max_price=self.max_price,
            metrics=self.metrics,
            suspensions=Suspensions() if include_suspended else self.suspensions,
            exclude=exclude,
            stakes=self.selection.stakes,
            hardware=self.hardware,
        )
        return found

    # ------------------------------------------------------------ one try

    def _stall_timeout(self, attempt: Try, model_id: str, pixels: int, promised: float) -> float:
        """k measured progress intervals plus the floor (broadcaster/stall.py, spec 15.1)."""
        interval = attempt.clock.interval
        if interval is None and attempt.delivered:
            speed = self.metrics.get(attempt.url, model_id).pixel_steps_per_second
            interval = pixels / speed if speed else None
        first = None
        if attempt.delivered == 0:  # the longest first step seen there lately, or the average
            recent = self.metrics.progress.first_step(attempt.url, model_id, pixels)
            first = recent or self.metrics.get(attempt.url, model_id).first_step_seconds
        return stall_timeout(
            self.policy.rule,
            delivered=attempt.delivered,
            steps=attempt.accepted.steps if attempt.accepted is not None else None,
            interval=interval,
            first_step=first,
            promised=promised,
        )

    async def _run_try(
        self,
        attempt: Try,
        chosen: Candidate,
        params: JobParams,
        *,
        can_move: Callable[[], bool],
        model_id: str,
        pipeline: str,
        preview: tuple[int, str, str, int | None],
        resume: ResumeFrom | None,
        job_id: str,
        deadline_at: float | None,
        pixels: int,
        control: JobControl,
    ) -> AsyncIterator[Event]:
        try:
            session = await self._session(attempt.url)
        except SessionError as exc:
            attempt.reason, attempt.detail = "unreachable", str(exc)
            return
        sent_at = time.monotonic()
        attempt.clock = ProgressClock(
            sent_at, prior=self.metrics.progress.gaps(attempt.url, model_id, pixels)
        )
        control.started(job_id, attempt.url, session)
        preview_every, preview_method, preview_format, preview_frame = preview
        events = session.generate(
            params,
            model_id=model_id,
            pipeline=pipeline,
            preview_every=preview_every,
            preview_method=preview_method,
            preview_format=preview_format,
            preview_frame=preview_frame,
            job_id=job_id,
            # Every progress carries the latents, so a move resumes at the last step seen.
            want_latents=self.policy.resume,
            resume=resume,
        )
        last_progress = sent_at
        """The last sign of life (the job sent, `accepted`, `progress`, `status`)."""
        first_gap: float | None = None
        """From the last sign of life to the first `progress`: what the first-step deadline
        times (so a queue's wait or a model's load, both before `accepted`, is not in it)."""
        alone, alone_checked = False, -math.inf
        promised = 0.0
        """Seconds the orchestrator's last `status` promised its next message within."""
        try:
            while True:
                timeout = self._stall_timeout(attempt, model_id, pixels, promised)
                # Whether the job could go elsewhere reads the metrics store: ask
                # at most once a second, not on every event.
                if time.monotonic() - alone_checked >= 1.0:
                    alone, alone_checked = not can_move(), time.monotonic()
                if alone:
                    timeout = max(timeout, self.policy.alone_timeout)
                wait = last_progress + timeout - time.monotonic()
                event = None
                with anyio.move_on_after(max(0.0, wait)):
                    event = await events.__anext__()
                if event is None:
                    attempt.reason = "stall"
                    at = attempt.offset + attempt.delivered
                    attempt.detail = f"no progress for {timeout:.2f} s after step {at}"
                    break
                now = time.monotonic()
                if isinstance(event, ProgressUpdate) and attempt.delivered == 0:
                    first_gap = now - last_progress
                ended = self._observe(attempt, event, now, sent_at)
                if isinstance(event, JobError) and control.cancel_requested:
                    attempt.reason = "cancelled"
                if isinstance(event, ProgressUpdate | Accepted):
                    last_progress, promised = now, 0.0
                elif isinstance(event, JobStatus):
                    # Alive in a phase without steps (a load, a decode, a queue): wait as
                    # promised; the deadline counts the wait all the same.
                    last_progress, promised = now, event.next_within_ms / 1000
                yield attempt.to_client(event)
                if isinstance(event, Accepted):
                    await control.accepted()
                if ended:
                    break
                if isinstance(event, JobStatus) and event.queue_position is not None:
                    leave = leave_queue(
                        event,
                        chosen=chosen,
                        others=self._others(pipeline, model_id, {chosen.url: "queued there"}),
                        pixel_steps=pixels * planned_steps(params),
                        now=time.monotonic(),
                        deadline_at=deadline_at,
                    )
                    if leave is not None:
                        attempt.reason, attempt.detail = leave
                        break
                if isinstance(event, ProgressUpdate) and deadline_at is not None:
                    late = too_slow(
                        rate=attempt.rate.steps_per_second,
                        left=event.total_steps - event.step,
                        now=now,
                        deadline_at=deadline_at,
                        pixels=pixels,
                        others=lambda: self._others(
                            pipeline, model_id, {chosen.url: "running the job"}
                        ),
                    )
                    if late:
                        attempt.reason, attempt.detail = "too_slow", late
                        break
        except StopAsyncIteration:
            attempt.reason = attempt.reason or "disconnect"
        finally:
            control.ended()
            self.metrics.progress.record(
                attempt.url, model_id, pixels, attempt.clock.seen, first_gap
            )
            with contextlib.suppress(BaseException):
                await events.aclose()
            if attempt.result is None:
                # Stop paying (no further progress is read) and cancel there.
                with anyio.move_on_after(self.policy.close_timeout), contextlib.suppress(Exception):
                    await session.cancel(job_id)
            with anyio.move_on_after(self.policy.close_timeout), contextlib.suppress(Exception):
                if self.pool is not None:  # kept for the next job there when it ended cleanly
                    await self.pool.release(session, clean=attempt.result is not None)
                else:
                    await session.aclose()

    async def _session(self, url: str) -> BroadcasterSession:
        """A session to `url`: pooled, or a new one. Raises SessionError."""
        if self.pool is not None:
            return await self.pool.acquire(url)
        session = BroadcasterSession(
            url,
            self.private_key,
            max_price=self.max_price,
            open_timeout=self.policy.connect_timeout,
            idle_timeout=math.inf,  # the stall timer of _run_try bounds every wait
        )
        await session.__aenter__()
        return session

    def _observe(self, attempt: Try, event: Event, now: float, sent_at: float) -> bool:
        """Update the try's record from one session event; True when the try has ended."""
        if isinstance(event, Accepted):
            attempt.accepted = event
        elif isinstance(event, ProgressUpdate):
            if attempt.delivered == 0:
                attempt.first_step = now - sent_at
                self.metrics.record_first_step(attempt.url, attempt.model_id, now - sent_at)
            attempt.delivered = event.step
            attempt.rate.observe(now, event.step)
            attempt.clock.observe(now)
        elif isinstance(event, PaymentSent):
            attempt.paid, attempt.tickets = event.ev_paid, event.tickets_total
        elif isinstance(event, PreviewFrame):
            if attempt.first_preview is None:
                attempt.first_preview = now - sent_at
        elif isinstance(event, JobResult):
            attempt.result = event
            attempt.reason, attempt.detail = "completed", f"{event.steps} steps"
            return True
        elif isinstance(event, JobError):
            attempt.reason, attempt.detail = classify(event, attempt.accepted is not None)
            return True
        return False

    def _account(self, attempt: Try, model_id: str, claimed: float | None = None) -> None:
        """Metrics (the speed seen, with the node's claim: spec 4.5) and suspension for a
        finished try."""
        a = attempt.accepted
        pixels = a.pixels_per_step if a else 0
        if attempt.rate.steps_per_second > 0 and attempt.delivered >= 2:
            speed = attempt.rate.steps_per_second * pixels
            self.metrics.record_speed(attempt.url, model_id, speed, claimed)
        if attempt.reason == "completed":
            self.metrics.record_outcome(attempt.url, model_id)
            self.suspensions.clear(attempt.url)
            return
        if attempt.reason in ("cancelled", "queued", "deadline") or attempt.refused_the_request:
            return  # the client's choice or the client's request, not the orchestrator's failure
        retryable = (
            attempt.reason == "refused" and attempt.detail.split(":")[0] in RETRYABLE_REFUSALS
        )
        if retryable:
            return
        self.metrics.record_outcome(
            attempt.url,
            model_id,
            failed=True,
            timed_out=attempt.reason in ("stall", "too_slow"),
        )
        self.suspensions.suspend(attempt.url, f"{attempt.reason}: {attempt.detail}")


def _with_seed(params: JobParams, seed: int) -> JobParams:
    return replace(params, seed=seed)  # every pipeline's params have a seed


def _cancelled(job_id: str) -> JobError:
    return JobError(job_id=job_id, code=ErrorCode.CANCELLED.value, message="the job was cancelled")
