"""How close each preview is to the final image: previews judged, not just timed.

A preview is worth sending when it already shows what the job will end as.
This runs a text-to-image job, keeps the latents at each preview step, makes
the preview every method would have sent at that step (the same noise
scaling, encoding and caps as StepPreviews), decodes it as a viewer would,
and scores it against the final image: PSNR and SSIM (Wang et al. 2004,
Gaussian window of 11 pixels, sigma 1.5, on 0..255 values, averaged over
R, G and B).
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from pipelines.previews import render_preview
from pipelines.text_to_image import run_text_to_image

if TYPE_CHECKING:
    from pipelines.loader import LoadedModel
    from protocol.messages import TextToImageParams

PEAK = 255.0


def _pixels(image: Image.Image, size: tuple[int, int] | None = None) -> np.ndarray:
    """An RGB image as float64 (H, W, 3), resized (bilinear) to `size` when given."""
    rgb = image.convert("RGB")
    if size is not None and rgb.size != size:
        rgb = rgb.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.float64)


def psnr(image: Image.Image, reference: Image.Image) -> float:
    """Peak signal-to-noise ratio in dB (inf when identical); `image` resized to the reference."""
    a, b = _pixels(image, reference.size), _pixels(reference)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(PEAK**2 / mse)


def _gaussian_blur(x: np.ndarray, sigma: float = 1.5, radius: int = 5) -> np.ndarray:
    """Separable Gaussian filter over the first two axes, valid region only."""
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-(offsets**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    width = 2 * radius + 1
    rows = sum(kernel[i] * x[i : x.shape[0] - width + 1 + i] for i in range(width))
    return sum(kernel[i] * rows[:, i : rows.shape[1] - width + 1 + i] for i in range(width))


def ssim(image: Image.Image, reference: Image.Image) -> float:
    """Mean structural similarity (1.0 when identical); `image` resized to the reference."""
    a, b = _pixels(image, reference.size), _pixels(reference)
    c1, c2 = (0.01 * PEAK) ** 2, (0.03 * PEAK) ** 2
    mu_a, mu_b = _gaussian_blur(a), _gaussian_blur(b)
    var_a = _gaussian_blur(a * a) - mu_a**2
    var_b = _gaussian_blur(b * b) - mu_b**2
    cov = _gaussian_blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return float(np.mean(num / den))


@dataclass(frozen=True)
class PreviewScore:
    """One method's preview at one step, scored against the job's final image."""

    step: int
    method: str
    """The method asked for; `used` is what made the preview (TAESD falls back)."""
    used: str
    psnr: float
    ssim: float
    seconds: float
    """Time to render and encode this preview."""


class _KeepLatents:
    """Step hooks that never wait and keep a copy of the latents at the chosen steps."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps
        self.latents: dict[int, torch.Tensor] = {}

    def wait_for_step(self, step: int) -> None:
        pass

    def on_step_end(self, step: int, latents: torch.Tensor) -> None:
        if step in self.steps:
            self.latents[step] = latents.detach().clone()


def preview_steps(total: int, every: int) -> list[int]:
    """The steps that get a preview (spec 9.3): every N-th and the last."""
    return sorted({*range(every, total + 1, every), total})


def score_previews(
    model: LoadedModel,
    params: TextToImageParams,
    seed: int,
    every: int,
    methods: tuple[str, ...],
    fmt: str = "webp",
) -> tuple[Image.Image, list[PreviewScore]]:
    """Run the job once; score every method's preview at every preview step.

    Returns the final image (the first of the batch) and the scores, in step
    order, methods in the order given. Previews are made as StepPreviews
    makes them: latents divided by the scheduler's noise scale for the step.
    """
    from pipelines.previews import PREVIEW_MAX_BYTES, PREVIEW_MAX_SIDE, noise_scales

    scales = noise_scales(model, params.num_inference_steps)
    total = len(scales) - 1
    hooks = _KeepLatents(set(preview_steps(total, every)))
    final = run_text_to_image(model, params, hooks, seed)[0]
    scores = []
    for step in sorted(hooks.latents):
        lat = hooks.latents[step] / scales[step]
        for method in methods:
            start = time.perf_counter()
            shown = render_preview(model, lat, method, fmt, PREVIEW_MAX_SIDE, PREVIEW_MAX_BYTES)
            seconds = time.perf_counter() - start
            with Image.open(io.BytesIO(shown.data)) as decoded:
                preview = decoded.convert("RGB")
            scores.append(
                PreviewScore(
                    step, method, shown.method, psnr(preview, final), ssim(preview, final), seconds
                )
            )
    return final, scores
