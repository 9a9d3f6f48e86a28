"""`stepstream bench batching`: does one pipeline run over M jobs beat M runs of one?

The question behind batching (issue: "wait up to N seconds to generate M
images with a single run on the GPU"): for a warm model, one size and one
step count, it times a diffusers call on a batch of B different prompts and
seeds (one generator each, as separate jobs would have) against B = 1, the
batch sizes interleaved run by run so that drift in the machine's speed
hits them all alike. Per batch size it prints the median time of one run
(the latency every job of the batch sees), the throughput in images a
second, and the gain: throughput over batch 1's. This is the most a batching
orchestrator could gain on this hardware; jobs that arrive apart also wait
to be batched, which the gain has to pay for.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipelines.loader import load_model
from pipelines.tiny import quiet_diffusers

BATCH_SIZES = (1, 2, 4, 8)
GAIN_THRESHOLD = 1.2
"""Throughput over batch 1's that batching would have to reach to be worth its wait."""
PROMPTS = (
    "a red circle on a blue background",
    "a yellow triangle on a green background",
    "a blue square on a white background",
    "a green circle on a red background",
)


def _run_once(pipe: object, batch: int, args: argparse.Namespace, run: int) -> float:
    """Seconds for one pipeline call on `batch` jobs (each its own prompt and seed)."""
    device = getattr(pipe, "device", torch.device("cpu"))
    generators = [
        torch.Generator(device=device).manual_seed(1000 * run + job) for job in range(batch)
    ]
    prompts = [PROMPTS[job % len(PROMPTS)] for job in range(batch)]
    started = time.perf_counter()
    pipe(  # type: ignore[operator]
        prompt=prompts,
        width=args.size,
        height=args.size,
        num_inference_steps=args.steps,
        generator=generators,
        output_type="pil",
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def run_bench_batching(args: argparse.Namespace) -> int:
    runs = args.runs or 5
    sizes = tuple(args.batch_sizes or BATCH_SIZES)
    with quiet_diffusers():
        model = load_model(args.model)
    pipe = model.pipe
    pipe.set_progress_bar_config(disable=True)
    device = model.device
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    print(
        f"model {args.model} on {gpu} ({model.dtype}), {args.size}x{args.size}, {args.steps} "
        f"steps, batch sizes {', '.join(map(str, sizes))}, {runs} interleaved runs each, "
        f"torch threads {torch.get_num_threads()}",
        flush=True,
    )
    for batch in sizes:  # warm every shape once: the first call of a shape pays its setup
        _run_once(pipe, batch, args, run=-1)
    times: dict[int, list[float]] = {batch: [] for batch in sizes}
    for run in range(runs):
        for batch in sizes:
            times[batch].append(_run_once(pipe, batch, args, run))
    base = sizes[0]
    base_rate = base / statistics.median(times[base])
    print(f"  {'batch':>5}  {'run (latency)':>14}  {'images/s':>9}  {'gain':>6}")
    for batch in sizes:
        latency = statistics.median(times[batch])
        rate = batch / latency
        print(f"  {batch:>5}  {latency * 1000:>11.1f} ms  {rate:>9.2f}  {rate / base_rate:>5.2f}x")
    best = max(sizes, key=lambda b: b / statistics.median(times[b]))
    gain = (best / statistics.median(times[best])) / base_rate
    verdict = "pays" if gain >= GAIN_THRESHOLD else "does not pay"
    print(
        f"  best: batch {best} at {gain:.2f}x batch {base}'s throughput; against a threshold "
        f"of {GAIN_THRESHOLD:g}x, batching {verdict} here"
    )
    return 0
