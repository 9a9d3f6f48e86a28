"""What a model's scheduler makes of a step count, worked out once per scheduler.

Planning, pricing, previews and every job ask the same scheduler the same
questions: how many timesteps do n steps run, at which sigmas, and each job
needs a scheduler of its own in its initial state. diffusers' `from_config`
costs milliseconds (it checks and logs the whole config), and a job asked it
four or five times; on a loaded CPU that was tens of milliseconds a job
before its first step. A loaded model's scheduler never changes, so the
answers are kept per scheduler object (weakly: an unloaded model takes them
along), and fresh schedulers are copies of one pristine instance.
"""

from __future__ import annotations

import copy
import threading
import weakref
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Schedule:
    """The scheduler's plan for one `num_inference_steps`."""

    timesteps: int
    """Timesteps it runs: the steps a job executes (PNDM runs one more, Heun about twice)."""
    order: int
    sigmas: tuple[float, ...] | None
    """Noise levels, one per timestep and the final one; None for schedulers without them."""


_lock = threading.Lock()
_pristine: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_schedules: weakref.WeakKeyDictionary[Any, dict[int, Schedule]] = weakref.WeakKeyDictionary()


def fresh_scheduler(scheduler: Any) -> Any:
    """A new scheduler like `scheduler`, in its initial state (a copy, not `from_config`)."""
    with _lock:
        pristine = _pristine.get(scheduler)
    if pristine is None:
        pristine = type(scheduler).from_config(scheduler.config)
        with _lock:
            pristine = _pristine.setdefault(scheduler, pristine)
    return copy.deepcopy(pristine)


def schedule(scheduler: Any, steps: int) -> Schedule:
    """What `scheduler` runs for `steps` inference steps (its count, order and sigmas)."""
    with _lock:
        known = _schedules.get(scheduler, {}).get(steps)
    if known is not None:
        return known
    probe = fresh_scheduler(scheduler)
    probe.set_timesteps(steps, device="cpu")
    sigmas = getattr(probe, "sigmas", None)
    plan = Schedule(
        timesteps=len(probe.timesteps),
        order=getattr(probe, "order", 1),
        sigmas=None if sigmas is None else tuple(float(s) for s in sigmas),
    )
    with _lock:
        _schedules.setdefault(scheduler, {})[steps] = plan
    return plan
