"""`stepstream bench`: what the network costs a job on the path users run, side by side.

A `stepstream orchestrator` process serves the model warm on its managed
runner process, exactly as an operator runs it. Each run times the same job
twice: once through that orchestrator (a BroadcasterSession, a preview and a
payment every window), once as a direct pipeline call on the same model
loaded in this process. Runs alternate the order so that drift on a noisy
machine hits both sides alike; the report is the medians and their ratio.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import torch
from tqdm import tqdm

from broadcaster.session import BroadcasterSession
from pipelines.loader import LoadedModel, load_model
from pipelines.text_to_image import run_text_to_image
from protocol.job_events import JobError, JobResult
from protocol.messages import TextToImageParams
from stepstream.processes import model_entry, orchestrator_process


class _FreeSteps:
    """Hooks that never wait: the baseline pipeline call."""

    def wait_for_step(self, step: int) -> None:
        pass

    def on_step_end(self, step: int, latents: torch.Tensor) -> None:
        pass


@dataclass
class NetworkRun:
    seconds: float
    first_preview: float | None
    """From sending the job to the first preview."""


@dataclass
class BenchResult:
    direct: list[float] = field(default_factory=list)
    network: list[NetworkRun] = field(default_factory=list)

    @property
    def direct_median(self) -> float:
        return statistics.median(self.direct)

    @property
    def network_median(self) -> float:
        return statistics.median(r.seconds for r in self.network)

    @property
    def ratio(self) -> float:
        return self.network_median / self.direct_median

    @property
    def first_preview_median(self) -> float | None:
        seen = [r.first_preview for r in self.network if r.first_preview is not None]
        return statistics.median(seen) if seen else None


def time_direct(model: LoadedModel, params: TextToImageParams) -> float:
    start = time.perf_counter()
    run_text_to_image(model, params, _FreeSteps(), seed=params.seed or 0)
    return time.perf_counter() - start


async def time_network(
    url: str, model_id: str, params: TextToImageParams, every: int
) -> NetworkRun:
    async with BroadcasterSession(url, secrets.token_bytes(32)) as session:
        start = time.perf_counter()
        async for event in session.generate(params, model_id=model_id, preview_every=every):
            if isinstance(event, JobError):
                raise RuntimeError(f"bench job failed: {event.code}: {event.message}")
            if isinstance(event, JobResult):
                return NetworkRun(time.perf_counter() - start, event.time_to_first_preview)
    raise RuntimeError("bench job ended without a result")


async def bench(
    model: LoadedModel, url: str, params: TextToImageParams, runs: int, every: int
) -> BenchResult:
    result = BenchResult()
    await time_network(url, model.model_id, params, every)  # warm-up, not counted
    await anyio.to_thread.run_sync(time_direct, model, params)
    for i in tqdm(range(runs), unit="run", desc="bench (direct + network)"):
        if i % 2 == 0:
            result.direct.append(await anyio.to_thread.run_sync(time_direct, model, params))
            result.network.append(await time_network(url, model.model_id, params, every))
        else:
            result.network.append(await time_network(url, model.model_id, params, every))
            result.direct.append(await anyio.to_thread.run_sync(time_direct, model, params))
    return result


def run_bench(args: argparse.Namespace) -> int:
    params = TextToImageParams(
        prompt="a lighthouse at dusk",
        width=args.size,
        height=args.size,
        num_inference_steps=args.steps,
        seed=1,
    )
    with tempfile.TemporaryDirectory(prefix="stepstream-bench-") as tmp:
        print("starting `stepstream orchestrator` with one runner process", flush=True)
        entries = [model_entry(args.model, capacity=1)]
        with orchestrator_process(Path(tmp), entries, extra_args=["--runners", "1"]) as orch:
            with tqdm(total=1, unit="model", desc=f"loading {args.model} here") as bar:
                model = load_model(args.model)
                bar.update(1)
            result = anyio.run(bench, model, orch.url, params, args.runs, args.preview_every)
    d, n = result.direct_median, result.network_median
    first = result.first_preview_median
    print(
        f"model {args.model}, {args.size}x{args.size}, {args.steps} steps, preview and payment "
        f"every {args.preview_every} steps, {args.runs} runs, device {model.device}; "
        "orchestrator and runner in their own processes\n"
        f"  direct pipeline call    median {d * 1000:8.1f} ms  ({args.steps / d:6.1f} steps/s)\n"
        f"  through the network     median {n * 1000:8.1f} ms  ({args.steps / n:6.1f} steps/s)\n"
        f"  overhead ratio          {result.ratio:.3f}x  (network / direct), "
        f"{(n - d) * 1000:.1f} ms extra per job\n"
        f"  time to first preview   median "
        + (f"{first * 1000:8.1f} ms" if first is not None else "none")
    )
    from stepstream.bench_tickets import measure, report

    print(report(measure()))
    return 0
