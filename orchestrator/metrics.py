"""Prometheus metrics of one orchestrator, in its own registry, served on its port.

`GET /metrics` on the orchestrator's WebSocket port answers in the
Prometheus text format (websockets' `process_request` hook), so no second
port is needed.
"""

from __future__ import annotations

from http import HTTPStatus

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

STEP_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
RATE_BUCKETS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500)


class OrchestratorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        job = ["pipeline", "model"]
        self.jobs = Counter(
            "stepstream_orchestrator_jobs",
            "Jobs ended, by outcome (result, cancelled, an error code, or refused:<code>)",
            [*job, "outcome"],
            registry=r,
        )
        self.steps = Counter(
            "stepstream_orchestrator_steps", "Denoising steps executed", job, registry=r
        )
        self.step_seconds = Histogram(
            "stepstream_orchestrator_step_duration_seconds",
            "Mean seconds per executed step of each job (waits for credit included)",
            job,
            buckets=STEP_SECONDS_BUCKETS,
            registry=r,
        )
        self.steps_per_second = Histogram(
            "stepstream_orchestrator_steps_per_second",
            "Steps per second of each job",
            job,
            buckets=RATE_BUCKETS,
            registry=r,
        )
        self.grant_wait = Counter(
            "stepstream_orchestrator_grant_wait_seconds",
            "Seconds runner steps, ready to run, waited for their grant (step: first or later)",
            [*job, "step"],
            registry=r,
        )
        self.grant_waits = Counter(
            "stepstream_orchestrator_grant_waits",
            "Runner steps that waited for their grant (step: first or later)",
            [*job, "step"],
            registry=r,
        )
        self.preview_bytes = Counter(
            "stepstream_orchestrator_preview_bytes", "Bytes of previews sent", job, registry=r
        )
        self.tickets_received = Counter(
            "stepstream_orchestrator_tickets_received", "Tickets accepted", registry=r
        )
        self.tickets_won = Counter(
            "stepstream_orchestrator_tickets_won", "Winning tickets received", registry=r
        )
        self.ev_received = Counter(
            "stepstream_orchestrator_ev_received_wei", "Expected value received, wei", registry=r
        )
        self.redemptions = Counter(
            "stepstream_orchestrator_redemptions",
            "Winning tickets redeemed on chain (none without a chain)",
            registry=r,
        )
        self.fee_pool = Gauge(
            "stepstream_orchestrator_fee_pool_wei",
            "Fees the chain holds for this orchestrator (the BondingManager's pendingFees)",
            registry=r,
        )
        self.runner_restarts = Counter(
            "stepstream_orchestrator_runner_restarts",
            "Managed runner processes restarted after a crash or a failed health check",
            registry=r,
        )

    def observe_redemptions(self, redeemed: int, fee_pool: int | None) -> None:
        """A redeemer pass: tickets redeemed, and the fee pool the chain now records."""
        self.redemptions.inc(redeemed)
        if fee_pool is not None:
            self.fee_pool.set(fee_pool)

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Answer `GET /metrics` as plain HTTP; let every other request go on to the handshake."""
        if request.path.split("?", 1)[0] != "/metrics":
            return None
        response = connection.respond(HTTPStatus.OK, "")
        body = generate_latest(self.registry)
        response.body = body
        del response.headers["Content-Type"]
        del response.headers["Content-Length"]
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        response.headers["Content-Length"] = str(len(body))
        return response
