"""The one step callback every pipeline uses: report the step, then wait for the next.

diffusers calls `callback_on_step_end(pipe, i, t, kwargs)` after each
scheduler step. SD, SD img2img and SDXL also honour `pipe._interrupt`, but
Stable Video Diffusion does not, so a stop is always an exception raised
from here: it leaves the pipeline call at once, for every pipeline alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch


class StepHooks(Protocol):
    """What the job calls between steps; the orchestrator's credit gate and preview tap."""

    def wait_for_step(self, step: int) -> None:
        """Block until step `step` (1-based) may execute; raise to abort the job."""

    def on_step_end(self, step: int, latents: torch.Tensor) -> None:
        """Step `step` (1-based) has completed; may raise to cancel.

        `latents` is the pipeline's live tensor: read or copy it, never modify it.
        """


Callback = Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]


def step_callback(hooks: StepHooks, planned_steps: int) -> Callback:
    """A callback_on_step_end calling hooks.on_step_end(k) then hooks.wait_for_step(k + 1).

    The pipeline's own count (`num_timesteps`, after strength or scheduler
    order) wins over `planned_steps` when it has one.
    """

    def on_step_end(pipe: Any, i: int, _t: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        step = i + 1
        hooks.on_step_end(step, callback_kwargs["latents"])
        total = getattr(pipe, "num_timesteps", None) or planned_steps
        if step < total:
            hooks.wait_for_step(step + 1)
        return callback_kwargs

    return on_step_end


def generators(device: str, seed: int, count: int) -> list[torch.Generator]:
    """Output i uses seed + i, as go-livepeer's ai-runner does, so any one can be redone alone."""
    return [torch.Generator(device=device).manual_seed((seed + i) % 2**64) for i in range(count)]
