"""`stepstream bench failover`: how long a stall costs, and how much money, over repeated runs.

Two `stepstream orchestrator` processes, each with its runner process, as
operators run them: the runner of one stalls after step `--stall-after` of
every job (runner/faults.py, set through $STEPSTREAM_RUNNER_FAULTS), the
other is healthy. Each run puts all stake on the staller, so every job
starts there and must fail over. Per run it reports the time from the stall
(the last progress the staller sent) to the first progress from the new
orchestrator, as a multiple of the run's median step interval, the EV paid
to the staller beyond the steps it delivered, in windows, and whether the
job resumed where it stopped.

With `--false-stalls` it counts the opposite error instead: `--jobs` jobs on
two healthy orchestrator processes while a child process keeps one core
busy (bounded in time), and every job that moved anyway is a false stall.
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import anyio
from tqdm import tqdm

from broadcaster.discovery import Discovery
from broadcaster.failover import FailoverPolicy, JobRunner
from broadcaster.metrics_store import MetricsStore
from broadcaster.selection import SelectionConfig, Weights
from broadcaster.suspension import Suspensions
from protocol.job_events import (
    Accepted,
    JobError,
    JobResult,
    OrchestratorChanged,
    ProgressUpdate,
)
from protocol.messages import TextToImageParams
from runner.faults import FAULTS_ENV, FaultPlan
from stepstream.processes import model_entry, orchestrator_process


@dataclass(frozen=True)
class FailoverRun:
    recovery_seconds: float
    detection_seconds: float
    """From the stall to the move (OrchestratorChanged): the stall deadline's share."""
    accept_seconds: float
    """From the move to the new orchestrator's `accepted`: leaving the old, reaching the new."""
    median_step_seconds: float
    windows_paid_beyond_delivered: float
    windows_paid_beyond_kept: float
    resumed: bool

    @property
    def recovery_in_steps(self) -> float:
        return self.recovery_seconds / self.median_step_seconds


async def one_run(
    urls: tuple[str, str],
    model_id: str,
    params: TextToImageParams,
    every: int,
    policy: FailoverPolicy,
) -> FailoverRun:
    bad, good = urls
    key = secrets.token_bytes(32)
    discovery = Discovery([bad, good], key)
    await discovery.refresh()
    metrics = MetricsStore()
    for url in (bad, good):
        metrics.record_speed(url, model_id, params.width * params.height * 10.0)
    runner = JobRunner(
        discovery,
        key,
        metrics=metrics,
        selection=SelectionConfig(weights=Weights(1.0, 0.0, 0.0, 0.0), stakes={bad: 1}),
        policy=policy,
    )
    arrivals: list[tuple[float, int]] = []
    stall_at = recovered_at = moved_at = accepted_at = None
    change: OrchestratorChanged | None = None
    result: JobResult | None = None
    async for event in runner.generate(params, model_id=model_id, preview_every=every):
        now = time.perf_counter()
        if isinstance(event, ProgressUpdate):
            if change is None:
                stall_at = now
            elif recovered_at is None:
                recovered_at = now
            arrivals.append((now, event.step))
        elif isinstance(event, OrchestratorChanged):
            change, moved_at = event, now
        elif isinstance(event, Accepted) and change is not None:
            accepted_at = now
        elif isinstance(event, JobResult):
            result = event
        elif isinstance(event, JobError):
            raise RuntimeError(f"bench job failed: {event.code}: {event.message}")
    if (
        change is None
        or result is None
        or stall_at is None
        or recovered_at is None
        or moved_at is None
        or accepted_at is None
    ):
        raise RuntimeError("the bench job did not fail over and finish")
    intervals = [
        t1 - t0
        for (t0, s0), (t1, s1) in zip(arrivals, arrivals[1:], strict=False)
        if s1 == s0 + 1 and not t0 <= stall_at < t1
    ]
    window_fee = change.step_fee * change.window_steps
    beyond_delivered = change.paid - change.delivered_steps * change.step_fee
    beyond_kept = change.paid - change.from_step * change.step_fee
    return FailoverRun(
        recovered_at - stall_at,
        moved_at - stall_at,
        accepted_at - moved_at,
        statistics.median(intervals),
        float(beyond_delivered / window_fee) if window_fee else 0.0,
        float(beyond_kept / window_fee) if window_fee else 0.0,
        change.resumed,
    )


def _policy(args: argparse.Namespace) -> FailoverPolicy:
    return FailoverPolicy(stall_factor=args.stall_factor, stall_floor=args.stall_floor)


def _params(args: argparse.Namespace) -> TextToImageParams:
    return TextToImageParams(
        prompt="a lighthouse at dusk",
        width=args.size,
        height=args.size,
        num_inference_steps=args.steps,
        seed=1,
    )


def run_failover_bench(args: argparse.Namespace) -> int:
    if args.false_stalls:
        return run_false_stall_bench(args)
    params = _params(args)
    policy = _policy(args)
    stall = FaultPlan(stall_after=args.stall_after, step_seconds=args.step_seconds)
    healthy = FaultPlan(step_seconds=args.step_seconds)
    entries = [model_entry(args.model, capacity=1)]
    runner_args = ["--runners", "1"]
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stepstream-fo-")))
        print("starting two `stepstream orchestrator` processes, each with a runner", flush=True)
        bad, good = (
            stack.enter_context(
                orchestrator_process(
                    tmp,
                    entries,
                    name=name,
                    extra_args=runner_args,
                    env={FAULTS_ENV: plan.to_env()},
                )
            )
            for name, plan in (("stalling", stall), ("healthy", healthy))
        )
        urls = (bad.url, good.url)
        runs = [
            anyio.run(one_run, urls, args.model, params, args.preview_every, policy)
            for _ in tqdm(range(args.runs), unit="run", desc="bench failover")
        ]
    rec = [r.recovery_seconds for r in runs]
    detect = [r.detection_seconds / r.median_step_seconds for r in runs]
    accept = [r.accept_seconds for r in runs]
    start = [r.recovery_seconds - r.detection_seconds - r.accept_seconds for r in runs]
    steps = [r.recovery_in_steps for r in runs]
    step_s = statistics.median(r.median_step_seconds for r in runs)
    lost = [r.windows_paid_beyond_delivered for r in runs]
    kept = [r.windows_paid_beyond_kept for r in runs]
    resumed = sum(r.resumed for r in runs)
    print(
        f"model {args.model}, {args.size}x{args.size}, {args.steps} steps, window "
        f"{args.preview_every} steps, stall after step {args.stall_after}, stall deadline "
        f"{policy.stall_factor:g} x interval + {policy.stall_floor:g} s, {args.runs} runs; "
        "orchestrators and runners in their own processes\n"
        f"  median step interval          {step_s * 1000:8.1f} ms\n"
        f"  stall -> next progress        median {statistics.median(rec) * 1000:8.1f} ms, "
        f"max {max(rec) * 1000:8.1f} ms\n"
        f"  ... in step intervals         median {statistics.median(steps):8.1f}, "
        f"max {max(steps):8.1f}\n"
        f"  stall -> move, in intervals   median {statistics.median(detect):8.1f}, "
        f"max {max(detect):8.1f}\n"
        f"  move -> accepted there        median {statistics.median(accept) * 1000:8.1f} ms, "
        f"max {max(accept) * 1000:8.1f} ms\n"
        f"  accepted -> next progress     median {statistics.median(start) * 1000:8.1f} ms, "
        f"max {max(start) * 1000:8.1f} ms\n"
        f"  paid beyond delivered steps   median {statistics.median(lost):.2f} windows, "
        f"max {max(lost):.2f}\n"
        f"  paid beyond resumed-from step median {statistics.median(kept):.2f} windows, "
        f"max {max(kept):.2f}\n"
        f"  resumed in {resumed} of {len(runs)} runs"
    )
    return 0


HOG = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"
"""A child that keeps one core busy, and ends on its own should the bench not end it."""


async def _false_stall_jobs(
    urls: tuple[str, str], args: argparse.Namespace, params: TextToImageParams
) -> list[str]:
    """Run the jobs one after another; the stall detail of every job that moved."""
    first, other = urls
    key = secrets.token_bytes(32)
    discovery = Discovery([first, other], key)
    await discovery.refresh()
    metrics = MetricsStore()  # one broadcaster: what it measured on a job serves the next
    for url in urls:
        metrics.record_speed(url, args.model, params.width * params.height * 10.0)
    moved: list[str] = []
    for i in range(args.jobs):
        runner = JobRunner(
            discovery,
            key,
            metrics=metrics,
            suspensions=Suspensions(),  # every job starts on the same orchestrator
            selection=SelectionConfig(weights=Weights(1.0, 0.0, 0.0, 0.0), stakes={first: 1}),
            policy=_policy(args),
        )
        events = runner.generate(params, model_id=args.model, preview_every=args.preview_every)
        started, why = time.monotonic(), ""
        async for event in events:
            if isinstance(event, OrchestratorChanged):
                why = f"{event.reason}: {event.detail}"
                moved.append(why)
            elif isinstance(event, JobError):
                raise RuntimeError(f"bench job failed: {event.code}: {event.message}")
        # One line a job, so that a run cut short still counts.
        print(
            f"  job {i + 1}/{args.jobs}: {time.monotonic() - started:.1f} s, "
            f"{'moved (' + why + ')' if why else 'stayed'}; {len(moved)} false stalls so far",
            flush=True,
        )
    return moved


def run_false_stall_bench(args: argparse.Namespace) -> int:
    """Healthy orchestrators, one core kept busy: how many jobs move anyway."""
    params = _params(args)
    policy = _policy(args)
    entries = [model_entry(args.model, capacity=1)]
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stepstream-fs-")))
        print("starting two healthy `stepstream orchestrator` processes, each with a runner")
        first, other = (
            stack.enter_context(
                orchestrator_process(tmp, entries, name=name, extra_args=["--runners", "1"])
            )
            for name in ("first", "other")
        )
        hog = subprocess.Popen([sys.executable, "-c", HOG.format(seconds=args.hog_seconds)])
        try:
            started = time.monotonic()
            moved = anyio.run(_false_stall_jobs, (first.url, other.url), args, params)
            seconds = time.monotonic() - started
        finally:
            hog.kill()
            hog.wait()
    print(
        f"model {args.model}, {args.size}x{args.size}, {args.steps} steps, window "
        f"{args.preview_every} steps, stall deadline {policy.stall_factor:g} x interval + "
        f"{policy.stall_floor:g} s, one core kept busy by another process "
        f"(bounded at {args.hog_seconds:g} s)\n"
        f"  {args.jobs} jobs on healthy orchestrators in {seconds:.1f} s: "
        f"{len(moved)} failed over (false stalls)"
    )
    for why in moved:
        print(f"    {why}")
    return 0 if not moved else 1
