"""Gateway jobs: choose an orchestrator, run the job through a session, publish its events.

Each job runs as a task in the gateway's task group; its events go to the
job's `JobStream` as JSON-ready dicts (the WebSocket and SSE routes and the
synchronous REST routes all read from there), its outputs go to storage,
and its numbers go to the gateway's metrics. Every log line of the task
carries the job id.
"""

from __future__ import annotations

import base64
import io
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
from PIL import Image

from broadcaster.events import (
    Accepted,
    Event,
    JobError,
    JobResult,
    PaymentSent,
    PreviewFrame,
    ProgressUpdate,
)
from broadcaster.gateway.errors import ApiError, from_job_error
from broadcaster.gateway.hub import JobStream, JsonEvent
from broadcaster.gateway.metrics import GatewayMetrics
from broadcaster.gateway.params import checked_params
from broadcaster.gateway.requests import GatewayRequest
from broadcaster.gateway.selection import Chosen, OrchestratorChoice
from broadcaster.gateway.storage import Storage
from broadcaster.gateway.video import encode_mp4
from broadcaster.session import BroadcasterSession
from protocol.errors import ErrorCode
from protocol.messages import JobParams
from stepstream.logs import current_job_id

log = logging.getLogger(__name__)

MAX_KEPT_JOBS = 1000
HOLD_TIMEOUT = 30.0


@dataclass
class GatewayJob:
    job_id: str
    request: GatewayRequest
    params: JobParams
    base_url: str
    stream: JobStream = field(default_factory=JobStream)
    done: anyio.Event = field(default_factory=anyio.Event)
    orchestrator: str | None = None
    session: BroadcasterSession | None = None
    accepted: bool = False
    cancel_requested: bool = False
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    submitted: float = field(default_factory=time.monotonic)

    def status(self) -> dict[str, Any]:
        terminal = self.stream.terminal
        return {
            "job_id": self.job_id,
            "pipeline": self.request.pipeline,
            "state": "running" if terminal is None else terminal["type"],
            "orchestrator": self.orchestrator,
            "result": terminal,
        }


def _data_url(fmt: str, data: bytes) -> str:
    return f"data:image/{fmt};base64,{base64.b64encode(data).decode('ascii')}"


class JobManager:
    def __init__(
        self,
        choice: OrchestratorChoice,
        storage: Storage,
        metrics: GatewayMetrics,
        preview_format: str = "webp",
    ) -> None:
        self.choice = choice
        self.storage = storage
        self.metrics = metrics
        self.preview_format = preview_format
        self.jobs: OrderedDict[str, GatewayJob] = OrderedDict()
        self._tg: anyio.abc.TaskGroup | None = None

    def attach(self, tg: anyio.abc.TaskGroup | None) -> None:
        """Jobs run in this task group (the app's lifespan); None detaches."""
        self._tg = tg

    def submit(
        self, request: GatewayRequest, base_url: str, wait_for_subscriber: bool = False
    ) -> GatewayJob:
        if self._tg is None:
            raise ApiError(503, "internal_error", "the gateway is not running")
        params = checked_params(request)  # a bad request is a 400 before any job exists
        job = GatewayJob(uuid.uuid4().hex, request, params, base_url)
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
        """Stop the job: ask the orchestrator if it has accepted, else stop here."""
        if job.done.is_set() or job.cancel_requested:
            return
        job.cancel_requested = True
        log.info("cancel requested for job %s", job.job_id)
        if job.accepted and job.session is not None:
            await job.session.cancel(job.job_id)
        elif job.session is None:
            job.scope.cancel()
        # Otherwise the job request is in flight: _run cancels when Accepted arrives.

    # ------------------------------------------------------------------ running

    async def _run(self, job: GatewayJob, wait_for_subscriber: bool) -> None:
        current_job_id.set(job.job_id)
        req = job.request
        labels = (req.pipeline, req.model_id or "-")
        outcome = "internal_error"
        try:
            with job.scope:
                if wait_for_subscriber:
                    with anyio.move_on_after(HOLD_TIMEOUT):
                        await job.stream.first_subscriber.wait()
                chosen = await self.choice.choose(req.pipeline, req.model_id)
            if job.scope.cancelled_caught:
                outcome = ErrorCode.CANCELLED.value
                self._publish_error(job, ErrorCode.CANCELLED.value, "the job was cancelled", 499)
                return
            labels = (req.pipeline, chosen.capability.model_id)
            try:
                outcome = await self._run_on(job, chosen, labels)
            finally:
                await chosen.session.aclose()
        except ApiError as err:
            outcome = err.code
            self._publish_error(job, err.code, err.message, err.status)
        except Exception as exc:  # noqa: BLE001 - the job ends with an error event, not a crash
            log.exception("job failed inside the gateway")
            self._publish_error(job, ErrorCode.INTERNAL_ERROR.value, f"gateway error: {exc}", 500)
        finally:
            self.metrics.jobs.labels(*labels, outcome).inc()
            job.session = None
            job.done.set()
            log.info("job ended: %s", outcome)

    async def _run_on(self, job: GatewayJob, chosen: Chosen, labels: tuple[str, str]) -> str:
        req = job.request
        job.orchestrator = chosen.url
        job.session = chosen.session
        info = chosen.session.info
        assert info is not None
        log.info("running on %s (%s)", chosen.url, "0x" + info.orchestrator.hex())
        job.stream.publish(
            {
                "type": "orchestrator_changed",
                "url": chosen.url,
                "address": "0x" + info.orchestrator.hex(),
                "reason": "selected",
            }
        )
        last_progress: tuple[float, int] | None = None
        ev_paid = 0.0
        seen_preview = False
        async for event in chosen.session.generate(
            job.params,
            model_id=chosen.capability.model_id,
            pipeline=req.pipeline,
            preview_every=req.preview_every,
            preview_format=self.preview_format,
            job_id=job.job_id,
        ):
            if isinstance(event, ProgressUpdate):
                now = time.monotonic()
                if last_progress is not None and event.step > last_progress[1]:
                    per_step = (now - last_progress[0]) / (event.step - last_progress[1])
                    self.metrics.step_seconds.labels(*labels).observe(per_step)
                    self.metrics.steps.labels(*labels).inc(event.step - last_progress[1])
                elif last_progress is None:
                    self.metrics.steps.labels(*labels).inc(event.step)
                last_progress = (now, event.step)
            elif isinstance(event, PreviewFrame):
                if not seen_preview:
                    seen_preview = True
                    self.metrics.time_to_first_preview.labels(*labels).observe(
                        time.monotonic() - job.submitted
                    )
                self.metrics.previews.labels(*labels).inc()
                self.metrics.preview_bytes.labels(*labels).inc(len(event.image))
            elif isinstance(event, PaymentSent):
                self.metrics.tickets_sent.inc(event.tickets)
                self.metrics.ev_paid.inc(float(event.ev_paid) - ev_paid)
                ev_paid = float(event.ev_paid)
            elif isinstance(event, JobResult):
                self.metrics.steps_per_second.labels(*labels).observe(event.steps_per_second)
                images = await anyio.to_thread.run_sync(self._store, req, event)
                job.stream.publish(self._result_event(job, event, images))
                log.info(
                    "result: %d steps, %.1f steps/s, EV paid %.0f of fee %.0f wei",
                    event.steps,
                    event.steps_per_second,
                    float(event.ev_paid),
                    float(event.fee),
                )
                return "success"
            elif isinstance(event, JobError):
                log.info("job error %s: %s", event.code, event.message)
                err = from_job_error(event.code, event.message)
                self._publish_error(job, event.code, event.message, err.status)
                return event.code
            json_event = self._json(event)
            if json_event is not None:
                job.stream.publish(json_event)
            if isinstance(event, Accepted):
                job.accepted = True
                log.info("accepted: %d steps, fee %.0f wei", event.steps, float(event.fee))
                if job.cancel_requested:
                    await chosen.session.cancel(job.job_id)
        self._publish_error(job, ErrorCode.INTERNAL_ERROR.value, "the job ended early", 500)
        return ErrorCode.INTERNAL_ERROR.value

    def _store(self, req: GatewayRequest, result: JobResult) -> list[dict[str, Any]]:
        """Outputs to storage: a PNG per image, or one MP4 of all frames for video."""
        if result.frames:
            frames = [Image.open(io.BytesIO(f.image)) for f in result.frames]
            fps = result.fps or getattr(req, "fps", 6)
            key = self.storage.put(".mp4", encode_mp4(frames, fps))
            first = result.frames[0]
            return [{"key": key, "seed": first.seed, "nsfw": any(f.nsfw for f in result.frames)}]
        out = []
        for img in result.images:
            data = img.image
            if img.format.lower() != "png":
                buf = io.BytesIO()
                Image.open(io.BytesIO(data)).save(buf, format="PNG")
                data = buf.getvalue()
            out.append({"key": self.storage.put(".png", data), "seed": img.seed, "nsfw": img.nsfw})
        return out

    # ------------------------------------------------------------------ events

    def _json(self, event: Event) -> JsonEvent | None:
        if isinstance(event, Accepted):
            return {
                "type": "accepted",
                "job_id": event.job_id,
                "steps": event.steps,
                "pixels_per_step": event.pixels_per_step,
                "price_per_pixel_step_wei": float(event.price_per_pixel_step),
                "fee_wei": float(event.fee),
                "window_steps": event.window_steps,
                "seed": event.seed,
            }
        if isinstance(event, ProgressUpdate):
            rate = event.steps_per_second
            left = event.total_steps - event.step
            return {
                "type": "progress",
                "step": event.step,
                "total_steps": event.total_steps,
                "steps_per_second": rate,
                "eta_seconds": left / rate if rate > 0 else None,
            }
        if isinstance(event, PreviewFrame):
            return {
                "type": "preview",
                "step": event.step,
                "format": event.format,
                "width": event.width,
                "height": event.height,
                "bytes": len(event.image),
                "image": _data_url(event.format, event.image),
            }
        if isinstance(event, PaymentSent):
            return {
                "type": "payment",
                "tickets": event.tickets,
                "tickets_total": event.tickets_total,
                "ev_paid_wei": float(event.ev_paid),
                "fee_wei": float(event.fee),
            }
        return None

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
            "fee_wei": float(result.fee),
            "ev_paid_wei": float(result.ev_paid),
            "tickets_sent": result.tickets_sent,
            "seconds": result.seconds,
            "steps_per_second": result.steps_per_second,
            "time_to_first_preview": result.time_to_first_preview,
        }

    def _publish_error(self, job: GatewayJob, code: str, message: str, status: int) -> None:
        job.stream.publish({"type": "error", "code": code, "message": message, "status": status})
