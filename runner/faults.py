"""Faults a runner injects on purpose, for failover tests and `stepstream bench failover`.

They act where a real GPU node fails: in the runner, between steps. A stall
blocks after step n until the orchestrator stops the job (a cancel, a lost
connection), never on a timer; `exit_after` ends the runner process, as a
crash would. A managed runner reads its plan from $STEPSTREAM_RUNNER_FAULTS
(JSON), which it inherits from the orchestrator that starts it, so a real
`stepstream orchestrator` can be made to misbehave without other code paths.
In-process tests pass a plan to RunnerServer.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, fields

FAULTS_ENV = "STEPSTREAM_RUNNER_FAULTS"


class InjectedFault(Exception):
    """Raised in the pipeline thread: the job fails as a broken model would."""


@dataclass(frozen=True)
class FaultPlan:
    """What goes wrong, and after which step of each job (None: never)."""

    stall_after: int | None = None
    """After step n: make no progress, answer nothing, until the job is stopped."""
    slow_after: int | None = None
    slow_step_seconds: float = 0.0
    """Extra seconds per step once `slow_after` steps are done (slows down partway)."""
    step_seconds: float = 0.0
    """Extra seconds every step: a slower GPU than it claims."""
    first_step_seconds: float = 0.0
    """Extra seconds before the first step: a 'warm' model that still has to load."""
    decode_seconds: float = 0.0
    """Extra seconds after the last step, before the output: a slow decode."""
    load_seconds: float = 0.0
    """Extra seconds every model load takes on this runner: a big model from a slow disk."""
    error_after: int | None = None
    """After step n: the pipeline raises (the job ends with pipeline_failed)."""
    exit_after: int | None = None
    """After step n: the runner process exits at once (the job ends with runner_lost)."""
    freeze_orchestrator_after: int | None = None
    """After step n of the schedule (resumed jobs count from their resume step): SIGSTOP the
    process that started this runner, a managed runner's orchestrator, as a hung node would
    be; the runner itself goes on."""

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> FaultPlan | None:
        """The plan in $STEPSTREAM_RUNNER_FAULTS, or None; ValueError when it is malformed."""
        text = (environ if environ is not None else os.environ).get(FAULTS_ENV)
        if not text:
            return None
        raw = json.loads(text)
        known = {f.name for f in fields(cls)}
        if not isinstance(raw, dict) or set(raw) - known:
            raise ValueError(f"{FAULTS_ENV} must be a JSON object with keys among {sorted(known)}")
        return cls(**raw)

    def to_env(self) -> str:
        return json.dumps({f.name: getattr(self, f.name) for f in fields(self)})


class Faults:
    """A plan applied to one job's steps, in the pipeline thread."""

    def __init__(self, plan: FaultPlan, fired: list[str] | None = None) -> None:
        self.plan = plan
        self.fired = fired if fired is not None else []
        """Faults that fired, shared by the runner's jobs."""

    def before_step(self, step: int) -> None:
        if step == 1 and self.plan.first_step_seconds:
            time.sleep(self.plan.first_step_seconds)  # the simulated model load

    def after_step(
        self,
        step: int,
        wait_until_stopped: Callable[[], None],
        schedule_offset: int = 0,
        last: bool = False,
    ) -> None:
        """Called once step `step` (of the job; `schedule_offset` steps ran before it
        elsewhere) and its messages are out; `last` when no step follows."""
        plan = self.plan
        if last and plan.decode_seconds:
            time.sleep(plan.decode_seconds)  # the simulated slow decode
        extra = plan.step_seconds
        if plan.slow_after is not None and step > plan.slow_after:
            extra += plan.slow_step_seconds
        if extra:
            time.sleep(extra)  # the simulated slow GPU step
        if step == plan.stall_after:
            self.fired.append("stall")
            wait_until_stopped()
        if step == plan.error_after:
            self.fired.append("error")
            raise InjectedFault("injected fault: the GPU fell off the bus")
        if step == plan.exit_after:
            os._exit(3)
        if plan.freeze_orchestrator_after == schedule_offset + step:
            self.fired.append("freeze")
            os.kill(os.getppid(), signal.SIGSTOP)
