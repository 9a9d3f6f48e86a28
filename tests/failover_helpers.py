"""Shared set-up for the failover tests: runners that try a chosen orchestrator first."""

from __future__ import annotations

import io
import secrets
from collections.abc import Sequence

import numpy as np
from PIL import Image

from broadcaster.discovery import Discovery
from broadcaster.failover import FailoverPolicy, JobRunner
from broadcaster.metrics_store import MetricsStore
from broadcaster.selection import SelectionConfig, Weights
from broadcaster.suspension import Suspensions
from pipelines.tiny import TINY_SD
from protocol.job_events import Event, JobResult, OrchestratorChanged, PaymentSent, ProgressUpdate
from protocol.messages import TextToImageParams

TEST_POLICY = FailoverPolicy(stall_floor=10.0, first_step_timeout=60.0, max_orchestrators=3)
"""Floors far above a step even on a loaded 2-core machine (a 30 ms step was seen to take
seconds there); stalling orchestrators block until cancelled, so only the stall tests wait."""


def small(steps: int = 8, **kw: object) -> TextToImageParams:
    fields: dict = dict(prompt="a lighthouse at dusk", width=64, height=64, seed=7)
    return TextToImageParams(num_inference_steps=steps, **{**fields, **kw})


async def runner_trying_first(
    first: str, urls: Sequence[str], policy: FailoverPolicy = TEST_POLICY, **kw: object
) -> JobRunner:
    """A runner whose selection picks `first` (all stake on it), then any other."""
    metrics = MetricsStore()
    for url in urls:  # measured, so the stake-only draw decides rather than exploration
        metrics.record_speed(url, TINY_SD, 64 * 64 * 20.0)
    discovery = Discovery(list(urls), secrets.token_bytes(32))
    await discovery.refresh()
    selection = SelectionConfig(
        weights=Weights(stake=1.0, price=0.0, speed=0.0, random=0.0), stakes={first: 1}
    )
    return JobRunner(
        discovery,
        secrets.token_bytes(32),
        metrics=metrics,
        suspensions=Suspensions(penalty=3600.0),
        selection=selection,
        policy=policy,
        **kw,  # type: ignore[arg-type]
    )


async def collect(runner: JobRunner, params: TextToImageParams, every: int, **kw: object) -> list:
    return [e async for e in runner.generate(params, model_id=TINY_SD, preview_every=every, **kw)]


def split_at_change(events: list[Event]) -> tuple[list[Event], OrchestratorChanged, list[Event]]:
    changes = [i for i, e in enumerate(events) if isinstance(e, OrchestratorChanged)]
    assert len(changes) == 1, [type(e).__name__ for e in events]
    i = changes[0]
    change = events[i]
    assert isinstance(change, OrchestratorChanged)
    return events[:i], change, events[i + 1 :]


def assert_old_paid_at_most_one_window_ahead(before: list[Event], change: OrchestratorChanged):
    """What the old orchestrator got is the windows it delivered into, plus at most one."""
    delivered = max((e.step for e in before if isinstance(e, ProgressUpdate)), default=0)
    assert change.delivered_steps == delivered
    payments = [e for e in before if isinstance(e, PaymentSent)]
    tickets = payments[-1].tickets_total if payments else 0
    assert change.paid == (payments[-1].ev_paid if payments else 0)
    n = change.window_steps
    windows_delivered_into = -(-delivered // n)
    assert tickets <= windows_delivered_into + 1
    # Each ticket is one window's fee rounded up by less than a wei (spec K1).
    assert change.paid <= tickets * (change.step_fee * n + 1)


def pixels(result: JobResult) -> np.ndarray:
    with Image.open(io.BytesIO(result.images[0].image)) as img:
        return np.asarray(img.convert("RGB")).copy()
