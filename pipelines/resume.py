"""Continue a text-to-image job from the latents of a step that ran elsewhere.

A job that fails over keeps what it paid for: the new orchestrator starts
from the last delivered step's latents instead of from noise. The result
equals the uninterrupted run only when the scheduler's whole state is the
step index and the latents, which holds for Euler (first order, no noise
with the default s_churn of 0), not for multistep schedulers that keep a
history of model outputs (PNDM, DPM-Solver multistep, LMS) nor ancestral
ones that draw fresh noise each step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

RESUMABLE_SCHEDULERS = frozenset({"EulerDiscreteScheduler"})
"""Schedulers whose state after step k is only (k, latents)."""

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True)
class ResumePoint:
    """Latents after `step` steps (1-based) of the full schedule."""

    step: int
    latents: torch.Tensor


def resume_scheduler_name(pipe: Any) -> str:
    """The scheduler a job of this pipeline can be resumed with, or "" when it cannot."""
    name = type(pipe.scheduler).__name__
    return name if name in RESUMABLE_SCHEDULERS else ""


@functools.cache
def _resuming_class(base: type) -> type:
    """`base` started at a given step: timesteps sliced, begin index set, latents unscaled.

    This is what diffusers' img2img does with `set_begin_index`; the initial
    noise scale is 1 because the latents passed in are already mid-schedule
    (multiplying by 1.0 keeps them bit-exact).
    """

    class Resuming(base):  # type: ignore[misc, valid-type]
        start_step = 0

        @property
        def init_noise_sigma(self) -> float:
            return 1.0

        def set_timesteps(self, *args: Any, **kwargs: Any) -> None:
            super().set_timesteps(*args, **kwargs)
            self.timesteps = self.timesteps[self.start_step :]
            super().set_begin_index(self.start_step)

        def set_begin_index(self, begin_index: int = 0) -> None:
            # Pipelines count from their first timestep (SDXL sets 0 before its
            # loop); here that timestep is step `start_step` of the schedule.
            super().set_begin_index(self.start_step + begin_index)

    Resuming.__name__ = Resuming.__qualname__ = base.__name__
    return Resuming


def resuming_scheduler(scheduler: Any, start_step: int) -> Any:
    """A fresh scheduler like `scheduler` whose run skips the first `start_step` steps."""
    name = type(scheduler).__name__
    if name not in RESUMABLE_SCHEDULERS:
        raise ValueError(f"{name} cannot resume a job (it keeps state beyond the latents)")
    resumed = _resuming_class(type(scheduler)).from_config(scheduler.config)
    resumed.start_step = start_step
    return resumed


def latents_to_bytes(latents: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    """(dtype name, shape, little-endian bytes) of a latents tensor, for the wire."""
    tensor = latents.detach().to("cpu").contiguous()
    dtype = next((k for k, v in DTYPES.items() if v == tensor.dtype), None)
    if dtype is None:
        raise ValueError(f"latents of dtype {tensor.dtype} cannot be sent")
    return dtype, tuple(tensor.shape), tensor.view(torch.uint8).numpy().tobytes()


def latents_later(latents: torch.Tensor) -> Callable[[], tuple[str, tuple[int, ...], bytes]]:
    """`latents_to_bytes` in two halves, so that a GPU step need not wait for the copy.

    On a GPU the copy to (pinned) host memory is queued now without a device
    sync, and the call returned waits for it; on the CPU the bytes are taken
    now (one copy, as a snapshot would cost) and the call returns them.
    """
    if latents.device.type != "cuda":
        ready = latents_to_bytes(latents)
        return lambda: ready
    host = torch.empty(latents.shape, dtype=latents.dtype, pin_memory=True)
    host.copy_(latents.detach(), non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(latents.device))

    def finish() -> tuple[str, tuple[int, ...], bytes]:
        copied.synchronize()
        return latents_to_bytes(host)

    return finish


def latents_from_bytes(dtype: str, shape: tuple[int, ...], data: bytes) -> torch.Tensor:
    """The tensor `latents_to_bytes` described; ValueError when the parts disagree."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown latents dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    count = 1
    for side in shape:
        count *= side
    if count * torch_dtype.itemsize != len(data):
        raise ValueError(f"{len(data)} bytes do not hold {dtype} latents of shape {shape}")
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return raw.view(torch_dtype).reshape(shape).clone()
