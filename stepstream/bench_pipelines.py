"""`stepstream bench pipelines`: per pipeline and model, what a step and a preview cost,
and how good each preview is.

For each (pipeline, model) it reports the load time, the median time of one
denoising step (hooks that do nothing, so the step alone), each preview
method's median cost as a ratio of that step (measured on real mid-job
latents), and peak memory: GPU memory where there is a GPU, otherwise the
process's peak resident size so far (a high-water mark over the whole run).

For each text-to-image model it then judges the previews: at every preview
step, each method's preview (as sent: scaled, encoded, then decoded) against
the job's final image, PSNR and SSIM averaged over --runs seeds, beside the
method's cost (pipelines/preview_quality.py). Only stepstream/tiny-shapes has
trained weights; the other tiny models draw noise, so their numbers say how
fast the latents settle, not whether the preview shows a picture.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from pipelines.dispatch import run_job
from pipelines.loader import load_model
from pipelines.preview_quality import PreviewScore, score_previews
from pipelines.previews import render_preview
from pipelines.taesd import TAESD_DIR_ENV, taesd_for
from pipelines.tiny import TINY_SD, TINY_SDXL
from pipelines.tiny_shapes import TINY_SHAPES
from pipelines.tiny_svd import TINY_SVD
from protocol.messages import ImageToImageParams, ImageToVideoParams, JobParams, TextToImageParams

METHODS = ("latent_rgb", "taesd", "vae")
SHAPES_PROMPT = "a red circle on a blue background"


class _StepClock:
    """Hooks that never wait; they time each step and keep the middle step's latents."""

    def __init__(self, middle: int) -> None:
        self.middle = middle
        self.ends: list[float] = []
        self.started = 0.0
        self.latents: torch.Tensor | None = None

    def wait_for_step(self, step: int) -> None:
        if step == 1:
            self.started = time.perf_counter()

    def on_step_end(self, step: int, latents: torch.Tensor) -> None:
        self.ends.append(time.perf_counter())
        if step == self.middle:
            self.latents = latents.clone()

    def step_times(self) -> list[float]:
        marks = [self.started, *self.ends]
        return [b - a for a, b in zip(marks, marks[1:], strict=False)]


@dataclass
class Row:
    pipeline: str
    model_id: str
    load_s: float
    step_ms: float
    preview_ratios: dict[str, float | None]
    peak_mib: float
    quality: list[PreviewScore] | None = None
    """Text-to-image only: each method's preview at each preview step, means over seeds."""
    prompt: str = ""


def _input_image(size: int) -> bytes:
    img = Image.new("RGB", (size, size))
    img.putdata(
        [(x * 7 % 256, y * 5 % 256, (x + y) % 256) for y in range(size) for x in range(size)]
    )
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _cases(size: int, steps: int, frames: int) -> list[tuple[str, str, JobParams]]:
    image = _input_image(size)
    t2i = TextToImageParams(
        prompt="a lighthouse", width=size, height=size, num_inference_steps=steps
    )
    i2i = ImageToImageParams(
        prompt="in winter", image=image, strength=1.0, num_inference_steps=steps
    )
    i2v = ImageToVideoParams(
        image=image, width=size, height=size, num_frames=frames, num_inference_steps=steps
    )
    shapes = TextToImageParams(
        prompt=SHAPES_PROMPT, width=size, height=size, num_inference_steps=steps
    )
    return [
        ("text-to-image", TINY_SHAPES, shapes),
        ("text-to-image", TINY_SD, t2i),
        ("image-to-image", TINY_SD, i2i),
        ("text-to-image", TINY_SDXL, t2i),
        ("image-to-image", TINY_SDXL, i2i),
        ("image-to-video", TINY_SVD, i2v),
    ]


def _peak_mib(device: str) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def mean_scores(runs: list[list[PreviewScore]]) -> list[PreviewScore]:
    """Per (step, method), the mean PSNR (capped at 100 dB), SSIM and seconds over runs."""
    out = []
    for scores in zip(*runs, strict=True):
        first = scores[0]
        out.append(
            PreviewScore(
                first.step,
                first.method,
                first.used,
                statistics.fmean(min(s.psnr, 100.0) for s in scores),
                statistics.fmean(s.ssim for s in scores),
                statistics.fmean(s.seconds for s in scores),
            )
        )
    return out


def bench_case(
    pipeline: str,
    model_id: str,
    params: JobParams,
    runs: int,
    repeats: int,
    preview_every: int = 4,
) -> Row:
    model = load_model(model_id)
    if torch.device(model.device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    steps: list[float] = []
    latents: torch.Tensor | None = None
    run_job(model, params, _StepClock(1), seed=0)  # warm-up, not counted
    for run in range(runs):
        clock = _StepClock(middle=max(1, params.num_inference_steps // 2))
        run_job(model, params, clock, seed=run)
        steps.extend(clock.step_times())
        latents = clock.latents
    step = statistics.median(steps)
    assert latents is not None
    ratios: dict[str, float | None] = {}
    for method in METHODS:
        own = model.taesd_dir
        if method == "taesd" and taesd_for(model.family, model.device, model.dtype, own) is None:
            ratios[method] = None  # no weights on disk: it would fall back to latent_rgb
            continue
        costs = []
        for _ in range(repeats):
            start = time.perf_counter()
            render_preview(model, latents, method, "webp")
            costs.append(time.perf_counter() - start)
        ratios[method] = statistics.median(costs) / step
    quality, prompt = None, ""
    if isinstance(params, TextToImageParams):
        prompt = params.prompt
        quality = mean_scores(
            [score_previews(model, params, seed, preview_every, METHODS)[1] for seed in range(runs)]
        )
    peak = _peak_mib(model.device)
    return Row(pipeline, model_id, model.load_seconds, step * 1000, ratios, peak, quality, prompt)


def format_table(rows: list[Row], device: str, note: str) -> str:
    head = (
        "| pipeline | model | load s | step ms | "
        + " | ".join(f"{m} / step" for m in METHODS)
        + " | peak MiB |"
    )
    lines = [note, "", head, "|" + "---|" * (5 + len(METHODS))]
    for r in rows:
        cells = [
            "n/a" if r.preview_ratios[m] is None else f"{r.preview_ratios[m]:.3f}" for m in METHODS
        ]
        lines.append(
            f"| {r.pipeline} | {r.model_id} | {r.load_s:.2f} | {r.step_ms:.1f} | "
            + " | ".join(cells)
            + f" | {r.peak_mib:.0f} |"
        )
    return "\n".join(lines)


def format_quality(row: Row) -> str:
    """One table per model: methods down, preview steps across, "PSNR dB / SSIM" in each cell."""
    assert row.quality is not None
    steps = sorted({s.step for s in row.quality})
    head = "| method | cost / step | " + " | ".join(f"step {k}" for k in steps) + " |"
    lines = [head, "|" + "---|" * (2 + len(steps))]
    for method in METHODS:
        scores = {s.step: s for s in row.quality if s.method == method}
        used = {s.used for s in scores.values()}
        ratio = row.preview_ratios[method]
        name = method if used == {method} else f"{method} (as {'/'.join(sorted(used))})"
        cost = "n/a" if ratio is None else f"{ratio:.3f}"
        cells = [f"{scores[k].psnr:.1f} / {scores[k].ssim:.3f}" for k in steps]
        lines.append(f"| {name} | {cost} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@contextlib.contextmanager
def random_taesd() -> Iterator[None]:
    """TAESD's real architecture (diffusers' AutoencoderTiny defaults) with random weights.

    What a preview costs does not depend on the weights, so this measures
    TAESD's cost where its weights cannot be downloaded (the images are noise).
    """
    from diffusers import AutoencoderTiny

    with tempfile.TemporaryDirectory(prefix="stepstream-taesd-") as tmp:
        torch.manual_seed(0)
        vae = AutoencoderTiny()
        for name in ("taesd", "taesdxl"):
            vae.save_pretrained(Path(tmp) / name)
        old = os.environ.get(TAESD_DIR_ENV)
        os.environ[TAESD_DIR_ENV] = tmp
        try:
            yield
        finally:
            if old is None:
                del os.environ[TAESD_DIR_ENV]
            else:
                os.environ[TAESD_DIR_ENV] = old


def run_bench_pipelines(args: argparse.Namespace) -> int:
    taesd = random_taesd() if args.taesd_random_weights else contextlib.nullcontext()
    with taesd:
        rows = [
            bench_case(p, m, params, args.runs, args.repeats, args.preview_every)
            for p, m, params in _cases(args.size, args.steps, args.frames)
        ]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    memory = "GPU max allocated" if device == "cuda" else "process peak RSS so far"
    note = (
        f"device {device}, {args.size}x{args.size}, {args.steps} steps (img2img strength 1.0), "
        f"{args.frames} video frames, {args.runs} runs; preview cost = median of {args.repeats} "
        f"webp previews / median step; peak memory = {memory}; taesd n/a = no weights on disk"
        + ("; taesd: real architecture, random weights" if args.taesd_random_weights else "")
    )
    print(format_table(rows, device, note))
    for row in rows:
        if row.quality is None:
            continue
        print(
            f'\npreview quality, {row.model_id}: "{row.prompt}", {args.size}x{args.size}, '
            f"{args.steps} steps, a preview every {args.preview_every}; each cell: PSNR dB / "
            f"SSIM of the preview (webp, decoded) against the final image, mean of "
            f"{args.runs} seeds; cost / step as above\n"
        )
        print(format_quality(row))
    return 0
