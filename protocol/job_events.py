"""What a broadcaster job reports to its caller, one event per thing that happened.

Keyword-only, so that an event is never rebuilt from positional arguments
that silently land in the wrong field.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from protocol.messages import Latents, ResultImage


@dataclass(frozen=True, kw_only=True)
class Accepted:
    job_id: str
    steps: int
    pixels_per_step: int
    price_per_pixel_step: Fraction
    fee: Fraction
    window_steps: int
    seed: int
    credit: Fraction = Fraction(0)
    """What the job starts with from the sender's balance at this orchestrator (spec 7.5)."""


@dataclass(frozen=True, kw_only=True)
class ProgressUpdate:
    job_id: str
    step: int
    total_steps: int
    steps_per_second: float
    """Moving average over recent progress events; 0.0 until two have arrived."""
    pixel_steps_per_second: float
    latents: Latents | None = None
    """The job's state after this step, when the job asked for it (spec 15.3)."""


@dataclass(frozen=True, kw_only=True)
class PreviewFrame:
    job_id: str
    step: int
    image: bytes
    format: str
    width: int
    height: int
    method: str | None = None
    """Set when the orchestrator used another method than asked (a fallback)."""
    frames: int = 1
    """Video frames shown (all of them animated or in a grid, or 1)."""


@dataclass(frozen=True, kw_only=True)
class JobStatus:
    """The job is alive in a phase without steps (a model loading, frames decoding)."""

    job_id: str
    phase: str
    next_within_ms: int
    """The orchestrator's promise: another message for the job within this many ms."""
    queue_position: int | None = None
    """Phase `queued` (spec 4.6): 1 is the next job to start there."""
    estimated_start_ms: int | None = None
    """Phase `queued`: when the orchestrator expects the job to start; 0: no estimate."""


@dataclass(frozen=True, kw_only=True)
class PaymentSent:
    job_id: str
    tickets: int
    tickets_total: int
    ev_paid: Fraction
    """Expected value paid for the job so far, in wei."""
    fee: Fraction


@dataclass(frozen=True, kw_only=True)
class JobResult:
    job_id: str
    images: tuple[ResultImage, ...]
    steps: int
    fee: Fraction
    ev_paid: Fraction
    tickets_sent: int
    seconds: float
    time_to_first_preview: float | None
    steps_per_second: float
    winners: int = 0
    """Winning tickets among those paid, as the orchestrator's credit messages counted
    (after a failover, those of the orchestrator that finished the job)."""
    frames: tuple[ResultImage, ...] = ()
    """Video jobs: the frames in order (then `images` is empty)."""
    fps: int = 0
    ev_carried: Fraction = Fraction(0)
    """Credit the job started with, left at the orchestrator by earlier jobs (spec 7.5);
    `ev_paid` is what this job paid in its own tickets."""


@dataclass(frozen=True, kw_only=True)
class JobError:
    job_id: str
    code: str
    message: str


@dataclass(frozen=True, kw_only=True)
class OrchestratorChanged:
    """The job moved: `old` stopped being paid and was cancelled, `new` continues it.

    With `resumed` the new orchestrator continues from step `from_step`; otherwise
    it restarts from step 0. `paid` is the EV paid to `old`, `delivered_steps`
    the steps it reported, each step costing `step_fee` at its price.
    """

    job_id: str
    old: str
    new: str
    reason: str
    detail: str
    resumed: bool
    from_step: int
    delivered_steps: int
    paid: Fraction
    step_fee: Fraction
    window_steps: int


Event = (
    Accepted
    | JobStatus
    | ProgressUpdate
    | PreviewFrame
    | PaymentSent
    | JobResult
    | JobError
    | OrchestratorChanged
)
