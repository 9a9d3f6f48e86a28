"""Gateway jobs: run each through the JobRunner (selection, failover, resume), publish events.

Each job runs as a task in the gateway's task group; its events go to the
job's `JobStream` as JSON-ready dicts (the WebSocket and SSE routes and the
synchronous REST routes all read from there), its outputs go to storage,
and its numbers go to the gateway's metrics. When the job moves to another
orchestrator, the stream gets an `orchestrator_changed` event and the cost
so far keeps counting what was paid to the orchestrators before. Every log
line of the task carries the job id.
"""

from __future__ import annotations

import io
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import anyio
import anyio.abc
from PIL import Image

from broadcaster.failover import JobRunner
from broadcaster.gateway.errors import ApiError, from_job_error
from broadcaster.gateway.event_json import event_json, wei
from broadcaster.gateway.hub import JobStream, JsonEvent
from broadcaster.gateway.metrics import GatewayMetrics, outcome_label
from broadcaster.gateway.offers import offered_model_ids, resolve_model
from broadcaster.gateway.params import checked_params
from broadcaster.gateway.requests import GatewayRequest, ImageToVideoRequest, TextToImageRequest
from broadcaster.gateway.storage import Storage
from broadcaster.gateway.video import encode_mp4
from broadcaster.image_files import encode_image, parameters_text
from broadcaster.job_control import JobControl
from protocol.errors import ErrorCode
from protocol.job_context import current_job_id
from protocol.job_events import (
    Accepted,
    Event,
    JobError,
    JobResult,
    OrchestratorChanged,
    PaymentSent,
    PreviewFrame,
    ProgressUpdate,
)
from protocol.messages import JobParams

log = logging.getLogger(__name__)

MAX_KEPT_JOBS = 1000
HOLD_TIMEOUT = 30.0
DEFAULT_MAX_JOBS_PER_CLIENT = 4
"""Jobs one client (one remote address) may have in flight; more are a 429."""


@dataclass
class GatewayJob:
    job_id: str
    request: GatewayRequest
    params: JobParams
    base_url: str
    stream: JobStream = field(default_factory=JobStream)
    done: anyio.Event = field(default_factory=anyio.Event)
    orchestrator: str | None = None
    """The orchestrator running the job, as last told on its stream."""
    control: JobControl = field(default_factory=JobControl)
    cancel_requested: bool = False
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    submitted: float = field(default_factory=time.monotonic)
    client: str = ""
    """Who submitted it (the remote address), for the per-client limit."""

    def status(self) -> dict[str, Any]:
        terminal = self.stream.terminal
        return {
            "job_id": self.job_id,
            "pipeline": self.request.pipeline,
            "state": "running" if terminal is None else terminal["type"],
            "orchestrator": self.orchestrator,
            "result": terminal,
        }


@dataclass
class _Spent:
    """Money and steps of one job across orchestrators, for the cost so far and the metrics."""

    earlier_paid: Fraction = Fraction(0)
    """EV paid to the orchestrators the job left."""
    earlier_fee: Fraction = Fraction(0)
    """What the steps they delivered cost at their prices."""
    earlier_tickets: int = 0
    session_paid: Fraction = Fraction(0)
    """EV paid to the orchestrator running the job now."""
    session_tickets: int = 0
    last_step: int = 0
    last_progress_at: float | None = None
    seen_preview: bool = False


class JobManager:
    def __init__(
        self,
        runner: JobRunner,
        storage: Storage,
        metrics: GatewayMetrics,
        preview_format: str = "webp",
        max_jobs_per_client: int = DEFAULT_MAX_JOBS_PER_CLIENT,
    ) -> None:
        self.runner = runner
        self.storage = storage
        self.metrics = metrics
        self.preview_format = preview_format
        self.max_jobs_per_client = max_jobs_per_client
        self.jobs: OrderedDict[str, GatewayJob] = OrderedDict()
        self.in_flight: dict[str, int] = {}
        """Jobs not yet ended, per client."""
        self._tg: anyio.abc.TaskGroup | None = None

    def attach(self, tg: anyio.abc.TaskGroup | None) -> None:
        """Jobs run in this task group (the app's lifespan); None detaches."""
        self._tg = tg

    def submit(
        self,
        request: GatewayRequest,
        base_url: str,
        wait_for_subscriber: bool = False,
        client: str = "",
    ) -> GatewayJob:
        if self._tg is None:
            raise ApiError(503, "internal_error", "the gateway is not running")
        params = checked_params(request)  # a bad request is a 400 before any job exists
        running = self.in_flight.get(client, 0)
        if running >= self.max_jobs_per_client:
            raise ApiError(
                429,
                "too_many_jobs",
                f"{running} jobs of yours are running; at most {self.max_jobs_per_client} "
                "may be in flight at once: wait for one to end or cancel one",
            )
        job = GatewayJob(uuid.uuid4().hex, request, params, base_url, client=client)
        self.in_flight[client] = running + 1
        self.jobs[job.job_id] = job
        while len(self.jobs) > MAX_KEPT_JOBS:
            oldest = next(iter(self.jobs.values()))
            if not oldest.done.is_set():
                break
            self.jobs.popitem(last=False)
        self._tg.start_soon(self._run, job, wait_for_subscriber)
        return job

    def get(self, job_id: str) -> GatewayJob:
        job = self.jobs.get(job_id)
        if job is None:
            raise ApiError(404, "unknown_job", f"no job {job_id}")
        return job

    async def cancel(self, job: GatewayJob) -> None:
        """Stop the job, wherever it is: waiting here, or running on an orchestrator."""
        if job.done.is_set() or job.cancel_requested:
            return
        job.cancel_requested = True
        log.info("cancel requested for job %s", job.job_id)
        job.scope.cancel()  # still waiting for a subscriber or a model; a no-op once running
        # Running: the orchestrator is asked to stop (as soon as it has accepted),
        # and the runner ends the job as cancelled instead of failing over.
        await job.control.cancel()

    # ------------------------------------------------------------------ running

    async def _run(self, job: GatewayJob, wait_for_subscriber: bool) -> None:
        current_job_id.set(job.job_id)
        req = job.request
        labels = (req.pipeline, self.model_label(req.model_id))
        outcome = "internal_error"
        try:
            with job.scope:
                if wait_for_subscriber:
                    with anyio.move_on_after(HOLD_TIMEOUT):
                        await job.stream.first_subscriber.wait()
                model_id = await resolve_model(self.runner.discovery, req.pipeline, req.model_id)
            if job.scope.cancelled_caught:
                outcome = ErrorCode.CANCELLED.value
                self._publish_error(job, ErrorCode.CANCELLED.value, "the job was cancelled", 499)
                return
            labels = (req.pipeline, model_id)
            outcome = await self._follow(job, model_id, labels)
        except ApiError as err:
            outcome = err.code
            self._publish_error(job, err.code, err.message, err.status)
        except Exception as exc:  # noqa: BLE001 - the job ends with an error event, not a crash
            log.exception("job failed inside the gateway")
            self._publish_error(job, ErrorCode.INTERNAL_ERROR.value, f"gateway error: {exc}", 500)
        finally:
            self.metrics.jobs.labels(*labels, outcome_label(outcome)).inc()
            left = self.in_flight.get(job.client, 1) - 1
            if left > 0:
                self.in_flight[job.client] = left
            else:
                self.in_flight.pop(job.client, None)
            job.done.set()
            log.info("job ended: %s", outcome)

    def model_label(self, model_id: str) -> str:
        """The metrics' model label: a model some orchestrator offers, else "other".

        Requests name any model they like; labelling by it would let anyone
        grow the metrics without bound.
        """
        if model_id in offered_model_ids(self.runner.discovery.statuses):
            return model_id
        return "other"

    async def _follow(self, job: GatewayJob, model_id: str, labels: tuple[str, str]) -> str:
        """Run the job through the runner, publishing each event; the outcome for the metrics."""
        req = job.request
        spent = _Spent()
        async for event in self.runner.generate(
            job.params,
            model_id=model_id,
            pipeline=req.pipeline,
            preview_every=req.preview_every,
            preview_format=self.preview_format,
            job_id=job.job_id,
            control=job.control,
        ):
            if isinstance(event, Accepted) and job.control.url != job.orchestrator:
                self._publish_orchestrator(job, job.control.url, {"reason": "selected"})
            if isinstance(event, OrchestratorChanged):
                self._moved(job, event, spent)
                continue
            if isinstance(event, JobResult):
                self.metrics.steps_per_second.labels(*labels).observe(event.steps_per_second)
                images = await anyio.to_thread.run_sync(self._store, req, event, model_id)
                job.stream.publish(self._result_event(job, event, images))
                log.info(
                    "result: %d steps, %.1f steps/s, EV paid %.0f of fee %.0f wei",
                    event.steps,
                    event.steps_per_second,
                    float(event.ev_paid),
                    float(event.fee),
                )
                return "success"
            if isinstance(event, JobError):
                log.info("job error %s: %s", event.code, event.message)
                err = from_job_error(event.code, event.message)
                self._publish_error(job, event.code, event.message, err.status)
                return event.code
            self._count(job, event, spent, labels)
            json_event = event_json(
                event, (spent.earlier_paid, spent.earlier_fee, spent.earlier_tickets)
            )
            if json_event is not None:
                job.stream.publish(json_event)
            if isinstance(event, Accepted):
                log.info("accepted: %d steps, fee %.0f wei", event.steps, float(event.fee))
        self._publish_error(job, ErrorCode.INTERNAL_ERROR.value, "the job ended early", 500)
        return ErrorCode.INTERNAL_ERROR.value

    def _publish_orchestrator(self, job: GatewayJob, url: str | None, extra: JsonEvent) -> None:
        job.orchestrator = url
        status = self.runner.discovery.status(url) if url else None
        info = status.info if status is not None else None
        address = "0x" + info.orchestrator.hex() if info is not None else None
        log.info("running on %s (%s)", url, address)
        job.stream.publish(
            {"type": "orchestrator_changed", "url": url, "address": address, **extra}
        )

    def _moved(self, job: GatewayJob, change: OrchestratorChanged, spent: _Spent) -> None:
        """The job left `change.old`: what it was paid stays in the cost so far."""
        self.metrics.failovers.inc()
        spent.earlier_paid += change.paid
        spent.earlier_fee += change.step_fee * change.delivered_steps
        spent.earlier_tickets += spent.session_tickets
        spent.session_paid, spent.session_tickets = Fraction(0), 0
        spent.last_step, spent.last_progress_at = change.from_step, None
        log.info(
            "moved from %s: %s (%s); %s",
            change.old,
            change.reason,
            change.detail,
            f"resumed at step {change.from_step}" if change.resumed else "restarted",
        )
        self._publish_orchestrator(
            job,
            change.new,
            {
                "reason": change.reason,
                "detail": change.detail,
                "previous": change.old,
                "resumed": change.resumed,
                "from_step": change.from_step,
                "previous_delivered_steps": change.delivered_steps,
                "previous_paid_wei": wei(change.paid),
            },
        )

    def _count(self, job: GatewayJob, event: Event, spent: _Spent, labels: tuple[str, str]) -> None:
        """The gateway's metrics for one event."""
        if isinstance(event, ProgressUpdate):
            now = time.monotonic()
            done = event.step - spent.last_step
            if done > 0:
                if spent.last_progress_at is not None:
                    per_step = (now - spent.last_progress_at) / done
                    self.metrics.step_seconds.labels(*labels).observe(per_step)
                self.metrics.steps.labels(*labels).inc(done)
            spent.last_step, spent.last_progress_at = event.step, now
        elif isinstance(event, PreviewFrame):
            if not spent.seen_preview:
                spent.seen_preview = True
                self.metrics.time_to_first_preview.labels(*labels).observe(
                    time.monotonic() - job.submitted
                )
            self.metrics.previews.labels(*labels).inc()
            self.metrics.preview_bytes.labels(*labels).inc(len(event.image))
        elif isinstance(event, PaymentSent):
            self.metrics.tickets_sent.inc(event.tickets)
            self.metrics.ev_paid.inc(float(event.ev_paid - spent.session_paid))
            spent.session_paid, spent.session_tickets = event.ev_paid, event.tickets_total

    def _store(self, req: GatewayRequest, result: JobResult, model_id: str) -> list[dict[str, Any]]:
        """Outputs to storage: a PNG per image, with its parameters inside (as A1111 writes
        them), or one MP4 of all frames for video."""
        if result.frames:
            frames = [Image.open(io.BytesIO(f.image)) for f in result.frames]
            fps = result.fps or getattr(req, "fps", 6)
            key = self.storage.put(".mp4", encode_mp4(frames, fps))
            first = result.frames[0]
            return [{"key": key, "seed": first.seed, "nsfw": any(f.nsfw for f in result.frames)}]
        out = []
        for img in result.images:
            data = encode_image(img.image, "PNG", _parameters(req, model_id, img.seed, img))
            out.append({"key": self.storage.put(".png", data), "seed": img.seed, "nsfw": img.nsfw})
        return out

    # ------------------------------------------------------------------ events

    def _result_event(
        self, job: GatewayJob, result: JobResult, images: list[dict[str, Any]]
    ) -> JsonEvent:
        return {
            "type": "result",
            "images": [
                {"url": f"{job.base_url}outputs/{i['key']}", "seed": i["seed"], "nsfw": i["nsfw"]}
                for i in images
            ],
            "steps": result.steps,
            "fee_wei": wei(result.fee),
            "ev_paid_wei": wei(result.ev_paid),
            "tickets_sent": result.tickets_sent,
            "seconds": result.seconds,
            "steps_per_second": result.steps_per_second,
            "time_to_first_preview": result.time_to_first_preview,
        }

    def _publish_error(self, job: GatewayJob, code: str, message: str, status: int) -> None:
        job.stream.publish({"type": "error", "code": code, "message": message, "status": status})


def _parameters(req: GatewayRequest, model_id: str, seed: int, image: Any) -> str:
    """What made an image, as AUTOMATIC1111 writes it into its PNGs."""
    if isinstance(req, ImageToVideoRequest):
        return parameters_text("", {"Seed": seed, "Model": model_id})
    fields: dict[str, object] = {
        "Steps": req.num_inference_steps,
        "CFG scale": req.guidance_scale,
        "Seed": seed,
        "Size": f"{image.width}x{image.height}",
        "Model": model_id,
    }
    if not isinstance(req, TextToImageRequest):
        fields["Denoising strength"] = req.strength
    return parameters_text(req.prompt, fields, req.negative_prompt)
