"""Prometheus metrics of one gateway, in its own registry (several may share a process).

Every label takes a bounded set of values, whatever clients send and
orchestrators answer: `pipeline` is one of the gateway's routes, `model` a
model some orchestrator offers (else `other`, see JobManager.model_label),
and `outcome` `success` or a known error code (else `other`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from protocol.errors import ErrorCode

STEP_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
RATE_BUCKETS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

OUTCOMES = frozenset({"success", "too_many_jobs", "not_found", *(code.value for code in ErrorCode)})
"""The values of the `outcome` label; an orchestrator may answer any error code."""


def outcome_label(outcome: str) -> str:
    return outcome if outcome in OUTCOMES else "other"


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        job = ["pipeline", "model"]
        self.jobs = Counter(
            "stepstream_gateway_jobs",
            "Jobs finished, by outcome (success, or the error code)",
            [*job, "outcome"],
            registry=r,
        )
        self.steps = Counter("stepstream_gateway_steps", "Steps delivered", job, registry=r)
        self.step_seconds = Histogram(
            "stepstream_gateway_step_duration_seconds",
            "Seconds per step between progress reports",
            job,
            buckets=STEP_SECONDS_BUCKETS,
            registry=r,
        )
        self.steps_per_second = Histogram(
            "stepstream_gateway_steps_per_second",
            "Observed steps per second of finished jobs",
            job,
            buckets=RATE_BUCKETS,
            registry=r,
        )
        self.time_to_first_preview = Histogram(
            "stepstream_gateway_time_to_first_preview_seconds",
            "Seconds from submission to the first preview",
            job,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.preview_bytes = Counter(
            "stepstream_gateway_preview_bytes", "Bytes of previews received", job, registry=r
        )
        self.previews = Counter("stepstream_gateway_previews", "Previews received", job, registry=r)
        self.tickets_sent = Counter(
            "stepstream_gateway_tickets_sent", "Payment tickets sent", registry=r
        )
        self.ev_paid = Counter(
            "stepstream_gateway_ev_paid_wei", "Expected value paid in tickets, wei", registry=r
        )
        self.failovers = Counter(
            "stepstream_gateway_failovers",
            "Moves of a job to another orchestrator (stall, disconnect, error, refusal)",
            registry=r,
        )
