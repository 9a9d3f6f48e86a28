"""`stepstream bench batching`: does one run over M jobs beat M runs of one?

The question behind batching (issue: "wait up to N seconds to generate M
images with a single run on the GPU"): for a warm model, one size and one
step count, it times the runner's batched path (pipelines/batching.py: the
UNet on the whole batch, prompts encoded and latents decoded per job, the
UNet made batch-invariant) on B jobs, each its own prompt and seed, against
one job alone on the same model, the batch sizes interleaved run by run so
that drift in the machine's speed hits them all alike. Per batch size it
prints the median time of one run (the latency every job of the batch
sees), the throughput in images a second, the gain (throughput over batch
1's), and whether every job's image was byte-identical to its run alone.
Jobs that arrive apart also wait to be batched, which the gain has to pay
for; the runner's own check at load (runner/batcher.py) uses the same gain
threshold.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from pipelines.batching import (
    Member,
    Unwatched,
    prepare_for_batching,
    run_text_to_image_batch,
)
from pipelines.loader import LoadedModel, load_model
from pipelines.text_to_image import run_text_to_image
from pipelines.tiny import quiet_diffusers
from protocol.messages import TextToImageParams
from runner.batcher import BATCH_GAIN_THRESHOLD

BATCH_SIZES = (1, 2, 4, 8)
PROMPTS = (
    "a red circle on a blue background",
    "a yellow triangle on a green background",
    "a blue square on a white background",
    "a green circle on a red background",
)


def _members(batch: int, args: argparse.Namespace, run: int) -> list[Member]:
    return [
        Member(
            TextToImageParams(
                prompt=PROMPTS[job % len(PROMPTS)],
                width=args.size,
                height=args.size,
                num_inference_steps=args.steps,
            ),
            Unwatched(),
            seed=1000 * run + job,
        )
        for job in range(batch)
    ]


def _run_once(model: LoadedModel, members: list[Member]) -> float:
    """Seconds for `members` as one run (one alone when there is one)."""
    started = time.perf_counter()
    if len(members) == 1:
        m = members[0]
        m.image = run_text_to_image(model, m.params, m.hooks, m.seed)[0]
    else:
        run_text_to_image_batch(model, members)
    if model.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started


def _same_bytes(model: LoadedModel, members: list[Member]) -> bool:
    """Whether each member's image is the one its job gives alone."""
    for m in members:
        alone = run_text_to_image(model, m.params, Unwatched(), m.seed)[0]
        if m.image is None or not np.array_equal(np.asarray(m.image), np.asarray(alone)):
            return False
    return True


def run_bench_batching(args: argparse.Namespace) -> int:
    runs = args.runs or 5
    sizes = tuple(args.batch_sizes or BATCH_SIZES)
    with quiet_diffusers():
        model = load_model(args.model)
    model.pipe.set_progress_bar_config(disable=True)
    prepare_for_batching(model)
    device = model.device
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    print(
        f"model {args.model} on {gpu} ({model.dtype}), {args.size}x{args.size}, {args.steps} "
        f"steps, batch sizes {', '.join(map(str, sizes))}, {runs} interleaved runs each, "
        f"torch threads {torch.get_num_threads()}",
        flush=True,
    )
    same: dict[int, bool] = {}
    for batch in sizes:  # warm every shape once (its first call pays its setup); check bytes
        members = _members(batch, args, run=-1)
        _run_once(model, members)
        same[batch] = _same_bytes(model, members)
    times: dict[int, list[float]] = {batch: [] for batch in sizes}
    for run in range(runs):
        for batch in sizes:
            times[batch].append(_run_once(model, _members(batch, args, run)))
    base = sizes[0]
    base_rate = base / statistics.median(times[base])
    print(f"  {'batch':>5}  {'run (latency)':>14}  {'images/s':>9}  {'gain':>6}  bytes as alone")
    for batch in sizes:
        latency = statistics.median(times[batch])
        rate = batch / latency
        print(
            f"  {batch:>5}  {latency * 1000:>11.1f} ms  {rate:>9.2f}  {rate / base_rate:>5.2f}x"
            f"  {'yes' if same[batch] else 'NO'}"
        )
    best = max(sizes, key=lambda b: b / statistics.median(times[b]))
    gain = (best / statistics.median(times[best])) / base_rate
    verdict = "pays" if gain >= BATCH_GAIN_THRESHOLD and same[best] else "does not pay"
    print(
        f"  best: batch {best} at {gain:.2f}x batch {base}'s throughput; against a threshold "
        f"of {BATCH_GAIN_THRESHOLD:g}x, batching {verdict} here"
    )
    return 0
