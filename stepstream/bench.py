"""`stepstream bench`: what the network costs a job on the path users run, side by side.

A `stepstream orchestrator` process serves the model warm on its managed
runner process, exactly as an operator runs it. Each run times the same job
twice: once through that orchestrator (a BroadcasterSession, a preview and a
payment every window), once as a direct pipeline call on the same model
loaded in this process. Runs alternate the order so that drift on a noisy
machine hits both sides alike; the report is the medians and their ratio.

Beside the totals it reports where a job waits: the time from `accepted` to
the first preview, and the time the runner's steps waited for their grant
(the orchestrator's `stepstream_orchestrator_grant_wait_seconds`, which the
runner reports in each `begin`), first step and later steps apart: a later
step that waits means money, not the device, set the pace. `--matrix` runs
64x64 at a window of 4 and of 1 and 128x128 at 4 in one go, and says what
one more window costs.
"""

from __future__ import annotations

import argparse
import math
import secrets
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import torch
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from broadcaster.session import BroadcasterSession
from pipelines.loader import LoadedModel, load_model
from pipelines.text_to_image import run_text_to_image
from protocol.job_events import Accepted, JobError, JobResult, PreviewFrame
from protocol.messages import TextToImageParams
from stepstream.processes import model_entry, orchestrator_process

GRANT_WAIT = "stepstream_orchestrator_grant_wait_seconds"
GRANT_WAITS = "stepstream_orchestrator_grant_waits"
MATRIX = ((64, 4), (64, 1), (128, 4))
"""(size, window) of the cases `--matrix` runs."""


@dataclass(frozen=True)
class Case:
    size: int
    every: int
    steps: int

    @property
    def windows(self) -> int:
        return math.ceil(self.steps / self.every)

    @property
    def label(self) -> str:
        return f"{self.size}x{self.size}, window {self.every}"

    def params(self) -> TextToImageParams:
        return TextToImageParams(
            prompt="a lighthouse at dusk",
            width=self.size,
            height=self.size,
            num_inference_steps=self.steps,
            seed=1,
        )


class _TimedSteps:
    """Hooks that never wait (the baseline pipeline call) and note when each step ends."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def wait_for_step(self, step: int) -> None:
        pass

    def on_step_end(self, step: int, latents: torch.Tensor) -> None:
        self.ends.append(time.perf_counter())


@dataclass(frozen=True)
class DirectRun:
    seconds: float
    step_interval: float
    """Median time between two step ends: what one step costs, without the network."""


@dataclass(frozen=True)
class GrantWait:
    """Runner steps that waited for their grant, and for how long in all (seconds)."""

    first: float = 0.0
    later: float = 0.0
    later_steps: int = 0

    def __sub__(self, other: GrantWait) -> GrantWait:
        return GrantWait(
            self.first - other.first,
            self.later - other.later,
            self.later_steps - other.later_steps,
        )


@dataclass(frozen=True)
class NetworkRun:
    seconds: float
    """From sending the job (on an open session) to its result."""
    accepted: float
    """From sending the job to `accepted`."""
    first_preview: float | None
    """From `accepted` to the first preview."""
    first_preview_step: int
    grant_wait: GrantWait


@dataclass
class CaseResult:
    case: Case
    direct: list[DirectRun] = field(default_factory=list)
    network: list[NetworkRun] = field(default_factory=list)

    @property
    def direct_median(self) -> float:
        return statistics.median(r.seconds for r in self.direct)

    @property
    def network_median(self) -> float:
        return statistics.median(r.seconds for r in self.network)

    @property
    def ratio(self) -> float:
        return self.network_median / self.direct_median

    @property
    def paired_ratio(self) -> float:
        """Median of each run's network / direct: steadier than `ratio` while the load drifts,
        since the two halves of one run ran side by side."""
        pairs = zip(self.network, self.direct, strict=False)
        return statistics.median(n.seconds / d.seconds for n, d in pairs)

    @property
    def extra(self) -> float:
        return self.network_median - self.direct_median

    @property
    def step_interval(self) -> float:
        return statistics.median(r.step_interval for r in self.direct)

    @property
    def first_preview(self) -> float | None:
        seen = [r.first_preview for r in self.network if r.first_preview is not None]
        return statistics.median(seen) if seen else None

    @property
    def first_preview_step(self) -> int:
        return max((r.first_preview_step for r in self.network), default=0)

    @property
    def first_grant_wait(self) -> float:
        return statistics.median(r.grant_wait.first for r in self.network)

    @property
    def runs_without_later_wait(self) -> int:
        return sum(r.grant_wait.later_steps == 0 for r in self.network)

    @property
    def later_grant_wait(self) -> float:
        return statistics.median(r.grant_wait.later for r in self.network)


def time_direct(model: LoadedModel, params: TextToImageParams) -> DirectRun:
    hooks = _TimedSteps()
    start = time.perf_counter()
    run_text_to_image(model, params, hooks, seed=params.seed or 0)
    seconds = time.perf_counter() - start
    gaps = [b - a for a, b in zip(hooks.ends, hooks.ends[1:], strict=False)]
    return DirectRun(seconds, statistics.median(gaps) if gaps else seconds)


def metrics_url(ws_url: str) -> str:
    return ws_url.replace("ws://", "http://", 1).rstrip("/") + "/metrics"


def grant_wait(url: str) -> GrantWait:
    """The orchestrator's grant-wait counters now (all jobs so far)."""
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    first = later = 0.0
    later_steps = 0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            is_later = sample.labels.get("step") == "later"
            if sample.name == f"{GRANT_WAIT}_total":
                if is_later:
                    later += sample.value
                else:
                    first += sample.value
            elif sample.name == f"{GRANT_WAITS}_total" and is_later:
                later_steps += int(sample.value)
    return GrantWait(first, later, later_steps)


async def time_network(url: str, model_id: str, case: Case) -> NetworkRun:
    scrape = metrics_url(url)
    before = await anyio.to_thread.run_sync(grant_wait, scrape)
    accepted: float | None = None
    first: float | None = None
    first_step = 0
    async with BroadcasterSession(url, secrets.token_bytes(32)) as session:
        start = time.perf_counter()
        events = session.generate(case.params(), model_id=model_id, preview_every=case.every)
        async for event in events:
            now = time.perf_counter()
            if isinstance(event, Accepted):
                accepted = now
            elif isinstance(event, PreviewFrame) and first is None:
                first, first_step = now, event.step
            elif isinstance(event, JobError):
                raise RuntimeError(f"bench job failed: {event.code}: {event.message}")
            elif isinstance(event, JobResult):
                assert accepted is not None
                waited = await anyio.to_thread.run_sync(grant_wait, scrape)
                return NetworkRun(
                    now - start,
                    accepted - start,
                    None if first is None else first - accepted,
                    first_step,
                    waited - before,
                )
    raise RuntimeError("bench job ended without a result")


async def bench_case(model: LoadedModel, url: str, case: Case, runs: int) -> CaseResult:
    result = CaseResult(case)
    params = case.params()
    await time_network(url, model.model_id, case)  # warm-up, not counted
    await anyio.to_thread.run_sync(time_direct, model, params)
    for i in tqdm(range(runs), unit="run", desc=f"bench {case.label} (direct + network)"):
        if i % 2 == 0:
            result.direct.append(await anyio.to_thread.run_sync(time_direct, model, params))
            result.network.append(await time_network(url, model.model_id, case))
        else:
            result.network.append(await time_network(url, model.model_id, case))
            result.direct.append(await anyio.to_thread.run_sync(time_direct, model, params))
    return result


async def bench(model: LoadedModel, url: str, cases: Sequence[Case], runs: int) -> list[CaseResult]:
    return [await bench_case(model, url, case, runs) for case in cases]


def _ms(seconds: float | None) -> str:
    return "none" if seconds is None else f"{seconds * 1000:.1f} ms"


def report_case(r: CaseResult) -> str:
    c, d, n = r.case, r.direct_median, r.network_median
    step = r.step_interval
    lines = [
        f"{c.label}: {c.size}x{c.size}, {c.steps} steps, a preview and a payment every "
        f"{c.every} steps ({c.windows} windows), {len(r.network)} runs",
        f"  direct pipeline call    median {d * 1000:8.1f} ms  ({c.steps / d:6.1f} steps/s), "
        f"step interval {step * 1000:.1f} ms",
        f"  through the network     median {n * 1000:8.1f} ms  ({c.steps / n:6.1f} steps/s)",
        f"  overhead ratio          {r.ratio:.3f}x  (network / direct), "
        f"{r.extra * 1000:.1f} ms extra per job; median of each run's ratio "
        f"{r.paired_ratio:.3f}x",
        f"  accepted after the job  median {_ms(statistics.median(x.accepted for x in r.network))}",
    ]
    first = r.first_preview
    if first is None:
        lines.append("  first preview           none")
    else:
        k = r.first_preview_step
        lines.append(
            f"  first preview (step {k}) median {_ms(first)} after accepted; minus one step "
            f"interval {_ms(first - step)}; minus its {k} steps {_ms(first - k * step)}"
        )
    lines.append(
        f"  grant wait, first step  median {_ms(r.first_grant_wait)}; later steps: none in "
        f"{r.runs_without_later_wait} of {len(r.network)} runs (median {_ms(r.later_grant_wait)} "
        "a job)"
    )
    return "\n".join(lines)


def per_window(results: Sequence[CaseResult]) -> float | None:
    """Extra seconds one more window costs: two cases of one size and step count."""
    for a in results:
        for b in results:
            same = (a.case.size, a.case.steps) == (b.case.size, b.case.steps)
            if same and a.case.windows > b.case.windows:
                return (a.extra - b.extra) / (a.case.windows - b.case.windows)
    return None


def table(results: Sequence[CaseResult]) -> str:
    rows = [
        "| job | direct | network | ratio (paired) | extra per job | first preview after "
        "accepted (minus one step) | grant wait, first step | runs with no later wait |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        first = r.first_preview
        shown = "none" if first is None else f"{_ms(first)} ({_ms(first - r.step_interval)})"
        rows.append(
            f"| {r.case.label} | {_ms(r.direct_median)} | {_ms(r.network_median)} | "
            f"{r.ratio:.2f}x ({r.paired_ratio:.2f}x) | {_ms(r.extra)} | {shown} | "
            f"{_ms(r.first_grant_wait)} | "
            f"{r.runs_without_later_wait}/{len(r.network)} |"
        )
    return "\n".join(rows)


def cases_of(args: argparse.Namespace) -> list[Case]:
    if args.matrix:
        return [Case(size, every, args.steps) for size, every in MATRIX]
    return [Case(args.size, args.preview_every, args.steps)]


def run_bench(args: argparse.Namespace) -> int:
    cases = cases_of(args)
    with tempfile.TemporaryDirectory(prefix="stepstream-bench-") as tmp:
        print("starting `stepstream orchestrator` with one runner process", flush=True)
        entries = [model_entry(args.model, capacity=1)]
        with orchestrator_process(Path(tmp), entries, extra_args=["--runners", "1"]) as orch:
            with tqdm(total=1, unit="model", desc=f"loading {args.model} here") as bar:
                model = load_model(args.model)
                bar.update(1)
            results = anyio.run(bench, model, orch.url, cases, args.runs)
    print(
        f"model {args.model}, device {model.device}; orchestrator and runner in their own "
        "processes, one session a job (its hello and info not timed), runs interleaved"
    )
    for result in results:
        print(report_case(result))
    if len(results) > 1:
        print(table(results))
        window = per_window(results)
        if window is not None:
            print(f"one more window costs {window * 1000:.1f} ms (from the window 1 and 4 rows)")
    from stepstream.bench_tickets import measure, report

    print(report(measure()))
    return 0
