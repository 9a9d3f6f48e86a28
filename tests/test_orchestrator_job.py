"""The orchestrator's job machine with plain messages: no socket, no thread, no model."""

from __future__ import annotations

from fractions import Fraction

import pytest

from protocol.credit import ticket_odds
from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import (
    AwaitingPayment,
    Cancelled,
    Credit,
    Error,
    JobRequest,
    Latents,
    Preview,
    Progress,
    Result,
    ResultImage,
    TextToImageParams,
    TicketParams,
)
from protocol.orchestrator_job import (
    Ended,
    OrchestratorJob,
    PaymentInput,
    Phase,
    ToBroadcaster,
    ToRunner,
    make_quote,
    window_fee,
)
from protocol.recipient import MAX_NONCES_PER_RAND
from protocol.runner import Awaiting, Begin, Done, Failed, Grant, Output, Run, RunnerPreview, Stop

STEPS, EVERY, PIXELS, PRICE = 8, 2, 64 * 64, Fraction(3)
STEP_FEE = PRICE * PIXELS
TIMEOUT = 5.0


def params(expires: int = 100, seed: bytes = bytes(32)) -> TicketParams:
    face, win_prob = ticket_odds(window_fee(STEP_FEE, EVERY, STEPS), 10**15)
    return TicketParams(bytes(20), face, win_prob, bytes(32), seed, expires)


def new_job(want_latents: bool = False, expires: int = 100) -> OrchestratorJob:
    req = JobRequest(
        job_id="j",
        pipeline="text-to-image",
        model_id="m",
        params=TextToImageParams(prompt="p", width=64, height=64, num_inference_steps=STEPS),
        preview_every=EVERY,
        want_latents=want_latents,
    )
    quote = make_quote(
        req,
        steps=STEPS,
        pixels_per_step=PIXELS,
        price_per_pixel_step=PRICE,
        seed=7,
        ticket_params=params(expires),
    )
    return OrchestratorJob(req, quote, payment_timeout=TIMEOUT, stop_timeout=10.0)


def pay(steps: int, error: ProtocolError | None = None) -> PaymentInput:
    return PaymentInput(STEP_FEE * steps, steps // EVERY, 0, error)


def to_b(outputs: list) -> list:
    return [o.message for o in outputs if isinstance(o, ToBroadcaster)]


def to_r(outputs: list) -> list:
    return [o.message for o in outputs if isinstance(o, ToRunner)]


def image() -> ResultImage:
    return ResultImage(image=b"png", format="png", width=64, height=64, seed=7)


def test_the_quote_follows_the_request() -> None:
    job = new_job()
    assert job.quote.fee == STEP_FEE * STEPS and job.quote.window_steps == EVERY
    assert job.window_fee == STEP_FEE * EVERY


def test_the_runner_is_granted_exactly_what_credit_covers() -> None:
    job = new_job()
    assert to_r(job.start(0.0)) == [Run(job.request, 7, 0)]
    out = job.on_payment(pay(2), 0.0)
    credit = to_b(out)[0]
    assert isinstance(credit, Credit) and credit.covered_steps == 2
    assert to_r(out) == [Grant("j", 2)]
    # Less than a step more: credited, no new grant.
    assert to_r(job.on_payment(PaymentInput(STEP_FEE / 2, 1, 0), 0.0)) == []
    assert to_r(job.on_payment(PaymentInput(STEP_FEE / 2, 1, 0), 0.0)) == [Grant("j", 3)]


def test_a_credit_already_covering_the_job_is_granted_with_the_run() -> None:
    job = new_job()
    job.on_payment(pay(4), 0.0)  # nothing to grant yet: the runner has no run
    assert to_r(job.start(0.0)) == [Run(job.request, 7, 4)]


def test_a_step_never_granted_is_a_runner_fault() -> None:
    job = new_job()
    job.start(0.0)
    job.on_payment(pay(2), 0.0)
    assert job.on_runner(Begin("j", 1), 0.0) == []
    out = job.on_runner(Begin("j", 3), 0.0)
    stop = to_r(out)[0]
    assert (
        isinstance(stop, Stop) and stop.code == "internal_error" and "never granted" in stop.message
    )
    assert job.ledger.executed == 1


def test_a_wait_for_a_granted_step_gets_the_grant_again() -> None:
    """The runner waits at a step already granted (our grant crossed its wait): never hang."""
    job = new_job()
    job.start(0.0)
    job.on_payment(pay(2), 0.0)
    assert to_r(job.on_runner(Awaiting("j", 1), 0.0)) == [Grant("j", 2)]
    assert to_b(job.on_runner(Awaiting("j", 2), 0.0)) == []


def test_no_credit_in_time_ends_the_job_with_payment_timeout() -> None:
    job = new_job()
    job.start(0.0)
    job.on_payment(pay(2), 0.0)
    for step in (1, 2):
        job.on_runner(Begin("j", step), 0.0)
    waiting = to_b(job.on_runner(Awaiting("j", 3), 1.0))
    assert waiting == [AwaitingPayment(job_id="j", next_step=3, covered_steps=2, timeout_ms=5000)]
    assert job.deadline == 1.0 + TIMEOUT
    assert job.on_runner(Awaiting("j", 3), 2.0) == []  # announced once
    assert job.on_deadline(5.9) == []
    stop = to_r(job.on_deadline(6.0))[0]
    assert isinstance(stop, Stop) and stop.code == "payment_timeout"
    out = job.on_runner(Failed("j", "payment_timeout", "stopped"), 6.1)
    assert isinstance(out[0], Ended) and out[0].outcome.steps_executed == 2
    error = to_b(out)[0]
    assert isinstance(error, Error) and error.code == "payment_timeout" and error.job_id == "j"
    assert "no credit for step 3" in error.message and "covers 2 steps" in error.message


def test_credit_in_time_clears_the_deadline() -> None:
    job = new_job()
    job.start(0.0)
    job.on_runner(Awaiting("j", 1), 0.0)
    assert job.deadline is not None
    out = job.on_payment(pay(2), 1.0)
    assert job.deadline is None and to_r(out) == [Grant("j", 2)]
    assert job.on_deadline(100.0) == []


def test_progress_reports_each_step_with_latents_only_when_asked() -> None:
    latents = Latents("EulerDiscreteScheduler", "float32", (1, 4, 8, 8), bytes(1024))
    for want in (False, True):
        job = new_job(want_latents=want)
        job.start(0.0)
        job.on_payment(pay(2), 0.0)
        job.on_runner(Begin("j", 1), 0.0)
        progress = to_b(job.on_runner(Done("j", 1, latents), 0.0))[0]
        assert isinstance(progress, Progress)
        assert (progress.step, progress.total_steps, progress.covered_steps) == (1, STEPS, 2)
        assert progress.latents == (latents if want else None)


def test_previews_pass_through() -> None:
    job = new_job()
    job.start(0.0)
    preview = Preview(job_id="j", step=2, image=b"x", format="webp", width=8, height=8)
    assert to_b(job.on_runner(RunnerPreview(preview), 0.0)) == [preview]


def test_fresh_parameters_ride_the_next_progress_once() -> None:
    job = new_job(expires=100)
    job.start(0.0)
    job.on_payment(pay(2), 0.0)
    assert not job.needs_fresh_params(89, nonces_used=0)
    assert job.needs_fresh_params(90, nonces_used=0)
    fresh = params(expires=140, seed=b"\x01" * 32)
    job.use_params(fresh)
    assert not job.needs_fresh_params(200, nonces_used=0)  # one refresh at a time
    first = to_b(job.on_runner(Done("j", 1), 0.0))[0]
    second = to_b(job.on_runner(Done("j", 2), 0.0))[0]
    assert first.ticket_params == fresh and second.ticket_params is None
    assert job.ticket_params == fresh


def test_parameters_worn_to_half_the_nonce_cap_are_refreshed_before_they_run_out() -> None:
    # A long job pays more tickets than one rand takes (600, spec 8.5): fresh parameters
    # go out at half, so B still has nonces to pay with until they reach it.
    job = new_job(expires=100)
    job.start(0.0)
    assert job.refresh_nonces == MAX_NONCES_PER_RAND // 2 == 300
    assert not job.needs_fresh_params(50, nonces_used=299)
    assert job.needs_fresh_params(50, nonces_used=300)


def test_output_ends_the_job_with_its_result_after_capacity_is_freed() -> None:
    job = new_job()
    job.start(0.0)
    job.on_payment(pay(STEPS), 0.0)
    for step in range(1, STEPS + 1):
        job.on_runner(Begin("j", step), 0.0)
    out = job.on_runner(Output("j", (image(),)), 0.0)
    # Ended first: the slot is free before B can send its next job.
    assert isinstance(out[0], Ended) and isinstance(out[1], ToBroadcaster)
    result = out[1].message
    assert isinstance(result, Result)
    assert result.fee == STEP_FEE * STEPS and result.steps == STEPS
    assert result.pixel_steps == PIXELS * STEPS and result.images == (image(),)
    assert job.phase is Phase.ENDED
    assert job.on_payment(pay(2), 0.0) == [] and job.on_runner(Done("j", 3), 0.0) == []


def test_a_video_output_is_frames() -> None:
    job = new_job()
    job.start(0.0)
    job.on_payment(pay(1), 0.0)
    job.on_runner(Begin("j", 1), 0.0)
    result = to_b(job.on_runner(Output("j", (image(), image()), video=True, fps=6), 0.0))[0]
    assert result.images == () and len(result.frames) == 2 and result.fps == 6


def test_a_cancel_before_the_run_ends_the_job_at_once() -> None:
    job = new_job()
    out = job.on_cancel(0.0)
    assert isinstance(out[0], Ended) and to_b(out) == [Cancelled(job_id="j", steps=0)]
    assert job.start(0.0) == []


def test_a_cancel_stops_the_runner_and_reports_the_steps_it_ran() -> None:
    job = new_job()
    job.start(0.0)
    job.on_payment(pay(2), 0.0)
    job.on_runner(Begin("j", 1), 0.0)
    assert to_r(job.on_cancel(1.0)) == [Stop("j", "cancelled", "cancelled by the broadcaster")]
    assert job.steps_at_stop == 1
    # The step in flight completes and is reported; payments are still acknowledged.
    job.on_runner(Begin("j", 2), 1.0)
    assert isinstance(to_b(job.on_runner(Done("j", 2), 1.0))[0], Progress)
    out = job.on_payment(pay(2), 1.0)
    assert isinstance(to_b(out)[0], Credit) and to_r(out) == []
    assert to_b(job.on_runner(Failed("j", "cancelled", ""), 1.0)) == [
        Cancelled(job_id="j", steps=2)
    ]


def test_a_runner_that_never_confirms_a_stop_does_not_hold_the_job() -> None:
    job = new_job()
    job.start(0.0)
    job.on_cancel(1.0)
    assert job.deadline == 11.0
    out = job.on_deadline(11.0)
    assert isinstance(out[0], Ended) and to_b(out) == [Cancelled(job_id="j", steps=0)]


def test_a_refused_ticket_credits_what_came_before_it_then_stops_the_job() -> None:
    job = new_job()
    job.start(0.0)
    bad = ProtocolError(ErrorCode.TICKET_NONCE_REPLAYED, "replayed")
    out = job.on_payment(pay(2, error=bad), 0.0)
    assert isinstance(to_b(out)[0], Credit)
    assert to_r(out) == [Grant("j", 2), Stop("j", "ticket_nonce_replayed", "replayed")]
    error = to_b(job.on_runner(Failed("j", "ticket_nonce_replayed", ""), 0.0))[0]
    assert error.code == "ticket_nonce_replayed"


def test_a_lost_runner_ends_the_job_as_it_was_going_to_end() -> None:
    job = new_job()
    job.start(0.0)
    assert to_b(job.on_runner_lost("gone"))[0].code == "runner_lost"
    job = new_job()
    job.start(0.0)
    job.on_cancel(0.0)
    assert to_b(job.on_runner_lost("gone")) == [Cancelled(job_id="j", steps=0)]


def test_a_runner_failure_keeps_its_code_when_it_is_one() -> None:
    job = new_job()
    job.start(0.0)
    assert to_b(job.on_runner(Failed("j", "pipeline_failed", "boom"), 0.0))[0].code == (
        "pipeline_failed"
    )
    job = new_job()
    job.start(0.0)
    assert to_b(job.on_runner(Failed("j", "no such code", "?"), 0.0))[0].code == ("pipeline_failed")


def test_the_runner_knows_the_job_by_the_orchestrators_id_only() -> None:
    """B picks job ids (unique on its connection only); runner frames use O's own id."""
    job = new_job()
    job.runner_job_id = "r1"  # as the orchestrator sets it at admission
    run = to_r(job.start(0.0))[0]
    assert isinstance(run, Run) and run.request.job_id == "r1"
    assert to_r(job.on_payment(pay(2), 0.0)) == [Grant("r1", 2)]
    preview = Preview(job_id="r1", step=2, image=b"x", format="webp", width=8, height=8)
    shown = to_b(job.on_runner(RunnerPreview(preview), 0.0))[0]
    assert shown.job_id == "j"
    assert to_r(job.on_cancel(0.0))[0].job_id == "r1"


def test_an_attached_payment_is_granted_with_the_job_and_credited_after_accepted() -> None:
    """Spec 8.11, K18: the first window came with the job, so the runner starts at once."""
    job = new_job()
    job.prepay(PaymentInput(STEP_FEE * EVERY + STEP_FEE / 3, 2, 1))
    out = job.start(0.0)
    assert to_r(out) == [Run(job.request, 7, EVERY)]
    (credit,) = to_b(out)
    assert credit == Credit("j", STEP_FEE * EVERY + STEP_FEE / 3, EVERY, 2, 1)
    # The run goes first: the runner need not wait for B's socket.
    assert isinstance(out[0], ToRunner) and isinstance(out[1], ToBroadcaster)
    # Later payments are credited on top, one credit each (C5), granted at once.
    out = job.on_payment(pay(2), 0.0)
    assert to_b(out)[0].covered_steps == 2 * EVERY and to_r(out) == [Grant("j", 2 * EVERY)]


def test_an_attached_payment_is_taken_once_clean_and_only_before_the_start() -> None:
    """A refused one never reaches the job: O answers the `job` with its error (K18)."""
    job = new_job()
    with pytest.raises(ValueError):
        job.prepay(pay(2, ProtocolError(ErrorCode.TICKET_BAD_SIGNATURE, "bad")))
    job.prepay(pay(2))
    with pytest.raises(ValueError):
        job.prepay(pay(2))
    started = new_job()
    started.start(0.0)
    with pytest.raises(ValueError):
        started.prepay(pay(2))


def test_grants_follow_credit_at_once_so_a_runner_paid_ahead_never_waits() -> None:
    """Task 3 of issue 13: B pays window w+1 at step wN - L; the grant goes out with its
    credit, before the runner reaches the boundary, so the runner never sends `awaiting`."""
    job = new_job()
    job.prepay(pay(EVERY))
    assert to_r(job.start(0.0)) == [Run(job.request, 7, EVERY)]
    for step in range(1, STEPS + 1):
        assert job.on_runner(Begin("j", step), 0.0) == []
        if step % EVERY == EVERY - 1 and step + 1 < STEPS:  # the lead: one step early
            out = job.on_payment(pay(EVERY), 0.0)
            assert to_r(out) == [Grant("j", min(STEPS, step + 1 + EVERY))]
        assert job.granted >= step
    assert job.deadline is None
