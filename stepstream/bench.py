"""`stepstream bench`: what the network costs a job, measured side by side.

Each run times the same job twice on the same loaded model: once with the
pipeline called directly in-process (no previews, no payments), once
through an orchestrator on loopback with a preview and a payment every
window. Runs alternate the order so that drift on a noisy machine hits both
sides alike; the report is the medians and their ratio.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import time
from dataclasses import dataclass

import anyio
import torch
from tqdm import tqdm

from broadcaster.events import JobError, JobResult
from broadcaster.session import BroadcasterSession
from pipelines.loader import LoadedModel, load_model
from pipelines.text_to_image import run_text_to_image
from protocol.messages import TextToImageParams


class _FreeSteps:
    """Hooks that never wait: the baseline pipeline call."""

    def wait_for_step(self, step: int) -> None:
        pass

    def on_step_end(self, step: int, latents: torch.Tensor) -> None:
        pass


@dataclass
class BenchResult:
    direct: list[float]
    network: list[float]

    @property
    def ratio(self) -> float:
        return statistics.median(self.network) / statistics.median(self.direct)


def time_direct(model: LoadedModel, params: TextToImageParams) -> float:
    start = time.perf_counter()
    run_text_to_image(model, params, _FreeSteps(), seed=params.seed or 0)
    return time.perf_counter() - start


async def time_network(url: str, model_id: str, params: TextToImageParams, every: int) -> float:
    async with BroadcasterSession(url, secrets.token_bytes(32)) as session:
        start = time.perf_counter()
        async for event in session.generate(params, model_id=model_id, preview_every=every):
            if isinstance(event, JobError):
                raise RuntimeError(f"bench job failed: {event.code}: {event.message}")
            if isinstance(event, JobResult):
                return time.perf_counter() - start
    raise RuntimeError("bench job ended without a result")


async def bench(
    model: LoadedModel, params: TextToImageParams, runs: int, every: int
) -> BenchResult:
    # Imported here: the bench's orchestrator shares this process and its model.
    from orchestrator.config import ModelEntry
    from orchestrator.server import Orchestrator, OrchestratorConfig

    entry = ModelEntry("text-to-image", model.model_id, True, 1, price_per_pixel_step=1)
    orch = Orchestrator(OrchestratorConfig([entry], private_key=secrets.token_bytes(32)))
    next(iter(orch.slots.values())).model = model
    result = BenchResult([], [])
    async with orch.serve("127.0.0.1", 0) as server:
        url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        await time_network(url, model.model_id, params, every)  # warm-up, not counted
        for i in tqdm(range(runs), unit="run", desc="bench (direct + network)"):
            if i % 2 == 0:
                result.direct.append(await anyio.to_thread.run_sync(time_direct, model, params))
                result.network.append(await time_network(url, model.model_id, params, every))
            else:
                result.network.append(await time_network(url, model.model_id, params, every))
                result.direct.append(await anyio.to_thread.run_sync(time_direct, model, params))
    return result


def run_bench(args: argparse.Namespace) -> int:
    with tqdm(total=1, unit="model", desc=f"loading {args.model}") as bar:
        model = load_model(args.model)
        bar.update(1)
    params = TextToImageParams(
        prompt="a lighthouse at dusk",
        width=args.size,
        height=args.size,
        num_inference_steps=args.steps,
        seed=1,
    )
    result = anyio.run(bench, model, params, args.runs, args.preview_every)
    d, n = statistics.median(result.direct), statistics.median(result.network)
    print(
        f"model {args.model}, {args.size}x{args.size}, {args.steps} steps, preview and payment "
        f"every {args.preview_every} steps, {args.runs} runs, device {model.device}\n"
        f"  direct pipeline call    median {d * 1000:8.1f} ms  ({args.steps / d:6.1f} steps/s)\n"
        f"  through the network     median {n * 1000:8.1f} ms  ({args.steps / n:6.1f} steps/s)\n"
        f"  overhead ratio          {result.ratio:.3f}x  (network / direct)"
    )
    from stepstream.bench_tickets import measure, report

    print(report(measure()))
    return 0
