"""The gateway's HTTP surface: Livepeer AI routes, job streams, outputs, page, metrics.

Routes (spec/GATEWAY.md is the reference):
  POST /text-to-image, /image-to-image, /image-to-video   Livepeer AI API, waits for the result
  POST /upscale, /llm, ...       Livepeer routes not served here: an error that says so
  POST /jobs/{pipeline}          same bodies; answers 202 with a job id at once
  GET /jobs/{id}, DELETE /jobs/{id}, GET /jobs/{id}/events (SSE), WS /jobs/{id}/ws
  GET /offers, GET /outputs/{key}, GET /openapi.json, GET /metrics, GET /health, GET / (page)

Every request first passes the RequestGuard (origins, hosts, CORS).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Sequence
from fractions import Fraction
from importlib import resources
from typing import Any

import anyio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from broadcaster.discovery import DEFAULT_REFRESH_SECONDS
from broadcaster.failover import JobRunner
from broadcaster.gateway.errors import ApiError, from_job_error, invalid
from broadcaster.gateway.guard import RequestGuard
from broadcaster.gateway.jobs import DEFAULT_MAX_JOBS_PER_CLIENT, GatewayJob, JobManager
from broadcaster.gateway.metrics import GatewayMetrics
from broadcaster.gateway.offers import offer_list
from broadcaster.gateway.openapi import openapi_document
from broadcaster.gateway.requests import (
    MAX_UPLOAD_BYTES,
    PIPELINES,
    GatewayRequest,
    build_request,
)
from broadcaster.gateway.storage import OutputNotFound, Storage
from broadcaster.gateway.streams import sse_stream, websocket_stream
from broadcaster.hardware import HardwareFilter, HardwareFilterError

log = logging.getLogger(__name__)

OPEN_PATHS = ("/", "/health", "/offers", "/openapi.json", "/metrics")
UNSERVED_LIVEPEER_ROUTES = (
    "audio-to-text",
    "image-to-text",
    "live-video-to-video",
    "llm",
    "segment-anything-2",
    "text-to-speech",
    "upscale",
)
"""Livepeer AI API routes this gateway does not serve: they answer an error that says so."""
HEARTBEAT_SECONDS = 15.0


class Gateway:
    """Everything one gateway holds; `app` is its ASGI application.

    Jobs run through `runner` (selection, failover, resume); while the app
    runs, the runner's discovery asks the orchestrators for their info every
    `refresh_seconds`. Without a `token` the gateway answers loopback hosts
    only; `allow_origins` are the other sites whose pages may use it.
    """

    def __init__(
        self,
        runner: JobRunner,
        storage: Storage,
        token: str | None = None,
        metrics: GatewayMetrics | None = None,
        refresh_seconds: float = DEFAULT_REFRESH_SECONDS,
        *,
        allow_origins: Sequence[str] = (),
        max_jobs_per_client: int = DEFAULT_MAX_JOBS_PER_CLIENT,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
    ) -> None:
        self.metrics = metrics or GatewayMetrics()
        self.storage = storage
        self.token = token
        self.runner = runner
        self.refresh_seconds = refresh_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.jobs = JobManager(
            runner, storage, self.metrics, max_jobs_per_client=max_jobs_per_client
        )
        guard = Middleware(
            RequestGuard, allow_origins=allow_origins, loopback_hosts_only=token is None
        )
        unserved = [
            Route(f"/{name}", self.unserved_route, methods=["POST"])
            for name in UNSERVED_LIVEPEER_ROUTES
        ]
        self.app = Starlette(
            middleware=[guard],
            routes=[
                Route("/", self.page),
                Route("/health", self.health),
                Route("/offers", self.offers),
                Route("/openapi.json", self.openapi),
                Route("/metrics", self.scrape),
                Route("/text-to-image", self.livepeer_route, methods=["POST"]),
                Route("/image-to-image", self.livepeer_route, methods=["POST"]),
                Route("/image-to-video", self.livepeer_route, methods=["POST"]),
                *unserved,
                Route("/jobs/{pipeline}", self.submit_job, methods=["POST"]),
                Route("/jobs/{job_id}", self.job_status, methods=["GET"]),
                Route("/jobs/{job_id}", self.cancel_job, methods=["DELETE"]),
                Route("/jobs/{job_id}/events", self.job_events, methods=["GET"]),
                WebSocketRoute("/jobs/{job_id}/ws", self.job_socket),
                Route("/outputs/{key}", self.output),
            ],
            exception_handlers={
                ApiError: self._api_error,
                HTTPException: self._http_error,
                Exception: self._server_error,
            },
            lifespan=self._lifespan,
        )

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            await tg.start(self.runner.discovery.run, self.refresh_seconds)
            self.jobs.attach(tg)
            try:
                yield
            finally:
                self.jobs.attach(None)
                tg.cancel_scope.cancel()

    # ---------------------------------------------------------------- errors

    async def _api_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return exc.response()

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return ApiError(exc.status_code, code, str(exc.detail)).response()

    async def _server_error(self, request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return ApiError(500, "internal_error", "Internal Server Error").response()

    def _authorize(self, conn: HTTPConnection) -> None:
        """An optional bearer token; streams may pass ?token= (browsers cannot set headers)."""
        if self.token is None:
            return
        header = conn.headers.get("authorization", "")
        bearer = header.lower().startswith("bearer ")
        given = header[7:] if bearer else conn.query_params.get("token")
        if not given or not hmac.compare_digest(given.encode(), self.token.encode()):
            raise ApiError(401, "unauthorized", "a valid bearer token is required")

    # ---------------------------------------------------------------- plain routes

    async def page(self, request: Request) -> Response:
        html = resources.files("broadcaster.gateway").joinpath("static/index.html").read_text()
        return HTMLResponse(html)

    async def health(self, request: Request) -> Response:
        """OK while some orchestrator answered its last info request; else 503 degraded."""
        statuses = self.runner.discovery.statuses
        reachable = sum(1 for s in statuses if s.reachable)
        body = {
            "status": "OK" if reachable else "degraded",
            "orchestrators": len(self.runner.discovery.urls),
            "reachable": reachable,
        }
        if not reachable:
            body["detail"] = "no orchestrator answered when last asked: jobs cannot run"
        return JSONResponse(body, status_code=200 if reachable else 503)

    async def offers(self, request: Request) -> Response:
        """What the orchestrators offer now: pipelines, models, prices and hardware, for model
        lists; `?min_vram=GiB&gpu=PATTERN` narrow it further than the gateway's own flags."""
        max_price: Fraction | None = self.runner.max_price
        own = self.runner.hardware or HardwareFilter()
        query = request.query_params
        try:
            asked = HardwareFilter.parse(query.get("min_vram"), query.get("gpu"))
        except HardwareFilterError as exc:
            raise ApiError(400, "invalid_request", f"min_vram/gpu: {exc}") from None
        hardware = HardwareFilter(
            max(own.min_vram_bytes, asked.min_vram_bytes), asked.gpu or own.gpu
        )
        statuses = self.runner.discovery.statuses
        if asked.gpu and own.gpu:  # both patterns must hold
            statuses = [
                s for s in statuses if s.info is None or any(own.matches(d) for d in s.info.devices)
            ]
        return JSONResponse(
            {
                "offers": offer_list(statuses, max_price, hardware),
                "max_price_per_pixel_step_wei": None if max_price is None else str(max_price),
                "hardware": hardware.describe(),
            }
        )

    async def unserved_route(self, request: Request) -> Response:
        name = request.url.path.strip("/")
        raise ApiError(
            404,
            "unsupported_pipeline",
            f"this gateway does not serve the Livepeer {name} route; "
            f"it serves {', '.join(PIPELINES)}",
        )

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document())

    async def scrape(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def output(self, request: Request) -> Response:
        try:
            data, content_type = self.storage.get(request.path_params["key"])
        except OutputNotFound:
            raise ApiError(404, "not_found", "no such output") from None
        return Response(data, media_type=content_type)

    # ---------------------------------------------------------------- jobs

    async def _parse(self, request: Request, pipeline: str) -> GatewayRequest:
        if pipeline not in PIPELINES:
            raise ApiError(404, "unsupported_pipeline", f"no pipeline {pipeline!r} here")
        content_type = request.headers.get("content-type", "")
        if pipeline == "text-to-image":
            if "json" not in content_type:
                raise invalid("text-to-image takes a JSON body (Content-Type: application/json)")
            try:
                body = json.loads(await request.body())
            except (ValueError, UnicodeDecodeError):
                raise invalid("the body is not valid JSON") from None
            if not isinstance(body, dict):
                raise invalid("the body must be a JSON object")
            return build_request(pipeline, body, None, from_form=False)
        if "multipart/form-data" not in content_type:
            raise invalid(f"{pipeline} takes a multipart/form-data body with the image")
        async with request.form(max_files=2, max_fields=64) as form:
            fields: dict[str, Any] = {}
            image: bytes | None = None
            for name, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if name == "image":
                        image = await value.read(MAX_UPLOAD_BYTES + 1)
                else:
                    fields[name] = value
        return build_request(pipeline, fields, image, from_form=True)

    async def livepeer_route(self, request: Request) -> Response:
        """A Livepeer AI route: run the job and answer `{"images": [...]}` when it ends."""
        self._authorize(request)
        pipeline = request.url.path.strip("/")
        job = self.jobs.submit(
            await self._parse(request, pipeline), str(request.base_url), client=_client(request)
        )
        await job.done.wait()
        terminal = job.stream.terminal
        assert terminal is not None
        if terminal["type"] == "error":
            err = from_job_error(terminal["code"], terminal["message"])
            err.status = terminal.get("status", err.status)
            raise err
        return JSONResponse({"images": terminal["images"]})

    async def submit_job(self, request: Request) -> Response:
        self._authorize(request)
        pipeline = request.path_params["pipeline"]
        parsed = await self._parse(request, pipeline)
        hold = request.query_params.get("wait_for_subscriber", "").lower() in ("1", "true")
        job = self.jobs.submit(
            parsed, str(request.base_url), wait_for_subscriber=hold, client=_client(request)
        )
        return JSONResponse(
            {
                "job_id": job.job_id,
                "status_url": f"/jobs/{job.job_id}",
                "events_url": f"/jobs/{job.job_id}/events",
                "ws_url": f"/jobs/{job.job_id}/ws",
            },
            status_code=202,
        )

    def _job(self, conn: HTTPConnection) -> GatewayJob:
        self._authorize(conn)
        return self.jobs.get(conn.path_params["job_id"])

    async def job_status(self, request: Request) -> Response:
        return JSONResponse(self._job(request).status())

    async def cancel_job(self, request: Request) -> Response:
        job = self._job(request)
        await self.jobs.cancel(job)
        return JSONResponse({"job_id": job.job_id, "cancelling": True}, status_code=202)

    async def job_events(self, request: Request) -> Response:
        """Server-Sent Events, resumable with Last-Event-ID (spec/GATEWAY.md section 3)."""
        job = self._job(request)
        given = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
        after = 0
        if given:
            try:
                after = int(given)
            except ValueError:
                raise invalid(
                    f"Last-Event-ID must be an event id (an integer), got {given!r}"
                ) from None
        return StreamingResponse(
            sse_stream(job.stream, after, self.heartbeat_seconds),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def job_socket(self, ws: WebSocket) -> None:
        """Events as JSON text messages, previews as binary frames; `{"type": "cancel"}` cancels.

        A job that does not exist (or a missing token) is told as the stream's
        `error` event, then the socket closes with 4000 + the HTTP status.
        """
        await ws.accept()
        try:
            job = self._job(ws)
        except ApiError as err:
            error = {
                "type": "error",
                "code": err.code,
                "message": err.message,
                "status": err.status,
            }
            with contextlib.suppress(WebSocketDisconnect):
                await ws.send_json(error)
                await ws.close(code=4000 + err.status, reason=err.code)
            return
        await websocket_stream(ws, job, self.jobs.cancel)


def _client(conn: HTTPConnection) -> str:
    """Who a request comes from, for the per-client limit: its remote address."""
    return conn.client.host if conn.client is not None else ""
