"""What a runner says about its hardware and speed (spec/RUNNER.md 5.1).

The speed claim is measured, never configured: at load, the runner runs the
model's reference job (its default size, the pipeline's default parameters)
for a few steps; step 1 warms up, and the claim is the quickest of the
steps after it (the least disturbed by whatever else shares the machine).
The job is abandoned before its decode, so the cost is a prompt encode and
TIMED_STEPS + 1 steps. A broadcaster takes the claim as a prior only, until
it measures the node itself.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass

import torch
from PIL import Image

from pipelines.dispatch import run_job
from pipelines.loader import LoadedModel
from protocol.messages import ImageToVideoParams, JobParams, TextToImageParams

log = logging.getLogger(__name__)

REFERENCE_PROMPT = "a lighthouse on a cliff at dusk"
TIMED_STEPS = 2
"""Steps timed after the warm-up step; the claim is the quickest."""
LAST_STEP = TIMED_STEPS + 1


@dataclass(frozen=True)
class StepClaim:
    seconds: float
    pixels: int
    """Pixels the step carried: width x height (x frames for a video)."""


@dataclass(frozen=True)
class Hardware:
    gpu: str
    """The GPU's model name; empty on the CPU."""
    vram_bytes: int
    """The GPU's whole memory; 0 on the CPU."""


def hardware(device: str) -> Hardware:
    """What `device` is, as torch sees it."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return Hardware("", 0)
    index = dev.index or 0
    props = torch.cuda.get_device_properties(index)
    return Hardware(str(props.name)[:128], int(props.total_memory))


def reference_size(model: LoadedModel) -> tuple[int, int, int]:
    """(width, height, frames) of the model's default output, as diffusers sizes it."""
    pipe = model.pipe
    sample = getattr(pipe.unet.config, "sample_size", 64)
    side = sample if isinstance(sample, int) else sample[0]
    scale = getattr(pipe, "vae_scale_factor", 8)
    frames = getattr(pipe.unet.config, "num_frames", 1) if model.family == "svd" else 1
    return side * scale, side * scale, frames


def reference_params(model: LoadedModel) -> JobParams:
    width, height, frames = reference_size(model)
    if model.family == "svd":
        buf = io.BytesIO()
        Image.new("RGB", (width, height), (90, 120, 160)).save(buf, format="PNG")
        return ImageToVideoParams(
            image=buf.getvalue(),
            width=width,
            height=height,
            num_frames=frames,
            num_inference_steps=LAST_STEP + 1,
            seed=0,
        )
    return TextToImageParams(
        prompt=REFERENCE_PROMPT,
        width=width,
        height=height,
        num_inference_steps=LAST_STEP + 1,
        seed=0,
    )


class _Timed(Exception):
    """Raised from the step hook once the timed step is over: no decode follows."""


class _Clock:
    """Step hooks that note when each step ends, and stop after the timed one."""

    def __init__(self) -> None:
        self.ends: dict[int, float] = {}

    def wait_for_step(self, step: int) -> None:
        if step == 1:
            self.ends[0] = time.perf_counter()

    def on_step_end(self, step: int, latents: torch.Tensor) -> None:
        if latents.device.type == "cuda":
            torch.cuda.synchronize(latents.device)
        self.ends[step] = time.perf_counter()
        if step >= LAST_STEP:
            raise _Timed


def measure_step(model: LoadedModel) -> StepClaim | None:
    """Time warm steps of the model's reference job; None when the model cannot run it."""
    params = reference_params(model)
    width, height, frames = reference_size(model)
    clock = _Clock()
    try:
        run_job(model, params, clock, seed=0)
    except _Timed:
        pass
    except Exception as exc:  # a model that cannot run its own default: no claim, not a failure
        log.warning("cannot time a step of %s: %s", model.model_id, exc)
        return None
    steps = [clock.ends[k] - clock.ends[k - 1] for k in range(2, LAST_STEP + 1) if k in clock.ends]
    if not steps or 1 not in clock.ends:
        return None
    return StepClaim(seconds=max(min(steps), 1e-6), pixels=width * height * frames)
