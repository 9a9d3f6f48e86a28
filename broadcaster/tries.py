"""What each orchestrator did for a job, and the job's result summed over all of them.

JobRunner (broadcaster/failover.py) keeps one `Try` per orchestrator it
sends the job to; the record explains a move (OrchestratorChanged), names
each try when the job gives up, and sums money and steps into the result.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from fractions import Fraction

from broadcaster.stall import ProgressClock
from protocol.errors import ErrorCode
from protocol.job_events import (
    Accepted,
    Event,
    JobError,
    JobResult,
    PreviewFrame,
    ProgressUpdate,
)
from protocol.rate import StepRate

QUOTE_ERRORS = frozenset({ErrorCode.PRICE_TOO_HIGH.value, ErrorCode.INVALID_TICKET_PARAMS.value})
REQUEST_REFUSALS = frozenset({ErrorCode.INVALID_REQUEST.value, ErrorCode.INVALID_FIELD.value})
"""Refusals that blame the request, not the orchestrator: never a reason to suspend it."""


@dataclass
class Try:
    """What one orchestrator did for the job: the record behind an OrchestratorChanged."""

    url: str
    model_id: str
    offset: int
    reason: str = ""
    detail: str = ""
    accepted: Accepted | None = None
    delivered: int = 0
    paid: Fraction = Fraction(0)
    tickets: int = 0
    result: JobResult | None = None
    first_preview: float | None = None
    first_step: float | None = None
    """Seconds from sending the job to its first progress here."""
    rate: StepRate = field(default_factory=StepRate)
    """From progress arrivals only: the wait for the first step is not a step's speed."""
    clock: ProgressClock = field(default_factory=ProgressClock)
    """Gaps between progress arrivals: what the stall deadline scales with."""

    @property
    def step_fee(self) -> Fraction:
        a = self.accepted
        return a.fee / a.steps if a is not None and a.steps else Fraction(0)

    def to_client(self, event: Event) -> Event:
        """Steps of a resumed try count from its resume step; the client sees schedule steps."""
        off = self.offset
        if off == 0:
            return event
        if isinstance(event, ProgressUpdate):
            return replace(event, step=event.step + off, total_steps=event.total_steps + off)
        if isinstance(event, PreviewFrame):
            return replace(event, step=event.step + off)
        return event

    def describe(self) -> str:
        return f"{self.url} ({self.reason}: {self.detail})"

    @property
    def refused_the_request(self) -> bool:
        """Whether the orchestrator refused the job because of the request itself."""
        return self.reason == "refused" and self.detail.split(":")[0] in REQUEST_REFUSALS


def classify(error: JobError, accepted: bool) -> tuple[str, str]:
    """(reason, detail) of a try that ended with an error."""
    detail = f"{error.code}: {error.message}"
    if not accepted and error.code not in QUOTE_ERRORS:
        return "refused", detail
    if error.code == ErrorCode.INTERNAL_ERROR.value and error.message.startswith(
        "connection closed"
    ):
        return "disconnect", error.message
    return "error", detail


def give_up(tries: list[Try], why: str) -> str:
    if not tries:
        return why
    listed = "; ".join(f"{i}. {t.describe()}" for i, t in enumerate(tries, 1))
    return f"{why}. Tries: {listed}"


def job_result(job_id: str, tries: list[Try], started: float) -> JobResult:
    """The job's result with money and steps summed over every orchestrator that worked on it."""
    final = tries[-1].result
    assert final is not None
    earlier = tries[:-1]
    first_previews = [t.first_preview for t in tries if t.first_preview is not None]
    return JobResult(
        job_id=job_id,
        images=final.images,
        steps=tries[-1].offset + final.steps,
        fee=final.fee + sum((t.step_fee * t.delivered for t in earlier), Fraction(0)),
        ev_paid=sum((t.paid for t in tries), Fraction(0)),
        ev_carried=sum((t.accepted.credit for t in tries if t.accepted), Fraction(0)),
        tickets_sent=sum(t.tickets for t in tries),
        seconds=time.monotonic() - started,
        time_to_first_preview=first_previews[0] if first_previews else None,
        steps_per_second=final.steps_per_second,
        winners=final.winners,
        frames=final.frames,
        fps=final.fps,
    )
