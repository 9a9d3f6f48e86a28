"""The gateway's HTTP surface: Livepeer AI routes, job streams, outputs, page, metrics.

Routes (spec/GATEWAY.md is the reference):
  POST /text-to-image, /image-to-image, /image-to-video   Livepeer AI API, waits for the result
  POST /jobs/{pipeline}          same bodies; answers 202 with a job id at once
  GET /jobs/{id}, DELETE /jobs/{id}, GET /jobs/{id}/events (SSE), WS /jobs/{id}/ws
  GET /outputs/{key}, GET /openapi.json, GET /metrics, GET /health, GET / (the page)
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import anyio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection, Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from broadcaster.discovery import DEFAULT_REFRESH_SECONDS
from broadcaster.failover import JobRunner
from broadcaster.gateway.errors import ApiError, from_job_error, invalid
from broadcaster.gateway.jobs import GatewayJob, JobManager
from broadcaster.gateway.metrics import GatewayMetrics
from broadcaster.gateway.openapi import openapi_document
from broadcaster.gateway.requests import (
    MAX_UPLOAD_BYTES,
    PIPELINES,
    GatewayRequest,
    build_request,
)
from broadcaster.gateway.storage import OutputNotFound, Storage

log = logging.getLogger(__name__)

OPEN_PATHS = ("/", "/health", "/openapi.json", "/metrics")


class Gateway:
    """Everything one gateway holds; `app` is its ASGI application.

    Jobs run through `runner` (selection, failover, resume); while the app
    runs, the runner's discovery asks the orchestrators for their info every
    `refresh_seconds`.
    """

    def __init__(
        self,
        runner: JobRunner,
        storage: Storage,
        token: str | None = None,
        metrics: GatewayMetrics | None = None,
        refresh_seconds: float = DEFAULT_REFRESH_SECONDS,
    ) -> None:
        self.metrics = metrics or GatewayMetrics()
        self.storage = storage
        self.token = token
        self.runner = runner
        self.refresh_seconds = refresh_seconds
        self.jobs = JobManager(runner, storage, self.metrics)
        self.app = Starlette(
            routes=[
                Route("/", self.page),
                Route("/health", self.health),
                Route("/openapi.json", self.openapi),
                Route("/metrics", self.scrape),
                Route("/text-to-image", self.livepeer_route, methods=["POST"]),
                Route("/image-to-image", self.livepeer_route, methods=["POST"]),
                Route("/image-to-video", self.livepeer_route, methods=["POST"]),
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
        return JSONResponse({"status": "OK"})

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
        job = self.jobs.submit(await self._parse(request, pipeline), str(request.base_url))
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
        job = self.jobs.submit(parsed, str(request.base_url), wait_for_subscriber=hold)
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
        """Server-Sent Events: `event: <type>` and `data: <json>` per job event."""
        job = self._job(request)

        async def stream() -> AsyncIterator[str]:
            with job.stream.subscribe() as sub:
                while (event := await sub.next()) is not None:
                    yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def job_socket(self, ws: WebSocket) -> None:
        """Events as JSON text messages; `{"type": "cancel"}` from the client cancels."""
        try:
            job = self._job(ws)
        except ApiError as err:
            await ws.close(code=1008, reason=err.code)  # policy violation: no such job, no token
            return
        await ws.accept()

        async with anyio.create_task_group() as tg:

            async def read_commands() -> None:
                with contextlib.suppress(WebSocketDisconnect):
                    while True:
                        try:
                            command = json.loads(await ws.receive_text())
                        except ValueError:
                            command = None
                        if isinstance(command, dict) and command.get("type") == "cancel":
                            await self.jobs.cancel(job)
                        else:
                            await ws.send_json(
                                {"type": "warning", "message": 'send {"type": "cancel"} to cancel'}
                            )
                tg.cancel_scope.cancel()  # the client left: stop sending

            tg.start_soon(read_commands)
            with job.stream.subscribe() as sub, contextlib.suppress(WebSocketDisconnect):
                while (event := await sub.next()) is not None:
                    await ws.send_json(event)
                await ws.close(1000)
            tg.cancel_scope.cancel()
