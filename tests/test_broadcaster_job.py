"""The broadcaster's job machine with plain messages: quote checks, payments, events."""

from __future__ import annotations

import dataclasses
from fractions import Fraction

from protocol.broadcaster_job import (
    BroadcasterJob,
    Emit,
    EndConnection,
    Phase,
    SendCancel,
    SendPayment,
    check_offer,
)
from protocol.credit import ticket_odds
from protocol.job_events import (
    Accepted,
    JobError,
    JobResult,
    JobStatus,
    PaymentSent,
    PreviewFrame,
    ProgressUpdate,
)
from protocol.messages import (
    AwaitingPayment,
    Cancelled,
    Capability,
    Credit,
    ImageToVideoParams,
    JobAccepted,
    JobRequest,
    Latents,
    Preview,
    Progress,
    Result,
    ResultFrame,
    ResultImage,
    Status,
    TextToImageParams,
    TicketParams,
)
from protocol.orchestrator_job import make_quote, window_fee
from protocol.pm import MAX_UINT256

STEPS, EVERY, PIXELS, PRICE = 8, 2, 64 * 64, Fraction(3)
STEP_FEE = PRICE * PIXELS
ORCH = b"\x0a" * 20
CAP = Capability("text-to-image", "m", True, 1, 0, PRICE)


def request(every: int = EVERY) -> JobRequest:
    return JobRequest(
        job_id="j",
        pipeline="text-to-image",
        model_id="m",
        params=TextToImageParams(prompt="p", width=64, height=64, num_inference_steps=STEPS),
        preview_every=every,
    )


def params(window: Fraction = STEP_FEE * EVERY, recipient: bytes = ORCH) -> TicketParams:
    face, win_prob = ticket_odds(window, 10**15)
    return TicketParams(recipient, face, win_prob, bytes(32), bytes(32), 100)


def quote(**changes: object) -> JobAccepted:
    base = make_quote(
        request(),
        steps=STEPS,
        pixels_per_step=PIXELS,
        price_per_pixel_step=PRICE,
        seed=7,
        ticket_params=params(),
    )
    return dataclasses.replace(base, **changes)


def new_job(**kw: object) -> BroadcasterJob:
    return BroadcasterJob(request(), CAP, ORCH, pixels_per_step=PIXELS, now=0.0, **kw)  # type: ignore[arg-type]


def events(outputs: list) -> list:
    return [o.event for o in outputs if isinstance(o, Emit)]


def progress(step: int, **kw: object) -> Progress:
    return Progress(job_id="j", step=step, total_steps=STEPS, covered_steps=STEPS, **kw)  # type: ignore[arg-type]


def test_offers_are_checked_before_the_job_is_sent() -> None:
    assert check_offer(None, "text-to-image", "m", None).code.value == "unknown_model"  # type: ignore[union-attr]
    assert check_offer(CAP, "text-to-image", "m", PRICE - 1).code.value == "price_too_high"  # type: ignore[union-attr]
    assert check_offer(CAP, "text-to-image", "m", PRICE) is None


def test_a_good_quote_pays_the_first_window_and_then_one_per_window() -> None:
    job = new_job()
    out = job.on_message(quote(), 1.0)
    assert events(out) == [
        Accepted(
            job_id="j",
            steps=STEPS,
            pixels_per_step=PIXELS,
            price_per_pixel_step=PRICE,
            fee=STEP_FEE * STEPS,
            window_steps=EVERY,
            seed=7,
        )
    ]
    first = job.payments()
    assert isinstance(first[0], SendPayment) and first[0].count == 1
    sent = first[1].event
    assert isinstance(sent, PaymentSent) and sent.tickets_total == 1
    assert job.payments() == []  # asked twice, paid once
    # Lead 1, window 2: window 2 is paid once step 1 arrives; nothing more at step 2.
    job.on_message(progress(1), 2.0)
    assert [type(o) for o in job.payments()] == [SendPayment, Emit]
    job.on_message(progress(2), 3.0)
    assert job.payments() == []


def test_awaiting_payment_alone_never_makes_the_broadcaster_pay() -> None:
    job = new_job()
    job.on_message(quote(), 1.0)
    job.payments()
    wait = AwaitingPayment(job_id="j", next_step=1, covered_steps=0, timeout_ms=1000)
    assert job.on_message(wait, 2.0) == [] and job.payments() == []


def refused(q: JobAccepted, code: str) -> None:
    job = new_job()
    out = job.on_message(q, 1.0)
    assert isinstance(out[0], SendCancel)
    error = out[1].event
    assert isinstance(error, JobError) and error.code == code, error
    assert job.phase is Phase.DRAINING and job.payments() == []
    # Whatever O still sends is read, not reported, until the job ends.
    assert job.on_message(progress(1), 2.0) == []
    assert job.on_message(Cancelled(job_id="j", steps=0), 2.0) == [] and job.ended


def test_quotes_that_break_the_offer_or_the_request_are_refused() -> None:
    refused(quote(price_per_pixel_step=PRICE + 1), "price_too_high")
    refused(quote(fee=STEP_FEE * STEPS + 1), "price_too_high")
    refused(quote(pixels_per_step=PIXELS * 2, fee=STEP_FEE * 2 * STEPS), "price_too_high")
    refused(quote(window_steps=EVERY + 1), "price_too_high")
    refused(quote(steps=STEPS + 1, fee=STEP_FEE * (STEPS + 1)), "invalid_request")
    # A ticket worth more than a window, or one payable to someone else.
    refused(quote(ticket_params=params(window=STEP_FEE * 4)), "invalid_ticket_params")
    refused(quote(ticket_params=params(recipient=b"\x0b" * 20)), "invalid_ticket_params")
    sure = dataclasses.replace(params(), face_value=10**20, win_prob=MAX_UINT256)
    refused(quote(ticket_params=sure), "invalid_ticket_params")


def test_fresh_parameters_are_checked_then_used() -> None:
    job = new_job()
    job.on_message(quote(), 1.0)
    job.payments()
    fresh = dataclasses.replace(params(), seed=b"\x02" * 32)
    job.on_message(progress(1, ticket_params=fresh), 2.0)
    pay = job.payments()[0]
    assert isinstance(pay, SendPayment) and pay.params == fresh
    job = new_job()
    job.on_message(quote(), 1.0)
    job.payments()
    out = job.on_message(progress(1, ticket_params=params(window=STEP_FEE * 8)), 2.0)
    assert isinstance(out[0], SendCancel) and events(out)[0].code == "invalid_ticket_params"


def test_progress_and_previews_become_events_with_rate_and_latents() -> None:
    latents = Latents("EulerDiscreteScheduler", "float32", (1, 4, 8, 8), bytes(1024))
    job = new_job()
    job.on_message(quote(), 1.0)
    shown = Preview(job_id="j", step=2, image=b"x", format="webp", width=8, height=8)
    assert events(job.on_message(shown, 1.5)) == [
        PreviewFrame(job_id="j", step=2, image=b"x", format="webp", width=8, height=8)
    ]
    job.on_message(progress(1), 2.0)
    update = events(job.on_message(progress(2, latents=latents), 2.5))[0]
    assert isinstance(update, ProgressUpdate) and update.latents == latents
    assert update.steps_per_second == 2 / 1.5  # steps 0..2 from 1.0 s to 2.5 s


def test_a_cancel_stops_payment_even_for_delivered_steps() -> None:
    job = new_job()
    job.on_message(quote(), 1.0)
    job.payments()
    job.on_message(progress(1), 2.0)  # a window is now due...
    assert job.cancel() == [SendCancel()]
    assert job.payments() == []  # ...but the caller cancelled before it was paid
    assert job.cancel() == []
    error = events(job.on_message(Cancelled(job_id="j", steps=1), 3.0))[0]
    assert isinstance(error, JobError) and error.code == "cancelled" and job.ended


def test_the_result_sums_what_was_paid_and_won() -> None:
    job = new_job()
    job.on_message(quote(), 1.0)
    job.payments()
    job.on_message(
        Credit(job_id="j", credit=STEP_FEE * 2, covered_steps=2, tickets_accepted=1, winners=1), 1.1
    )
    shown = Preview(job_id="j", step=2, image=b"x", format="webp", width=8, height=8)
    job.on_message(shown, 1.5)
    done = events(job.on_message(good_result(), 4.0))[0]
    assert isinstance(done, JobResult)
    assert (done.winners, done.tickets_sent, done.seconds) == (1, 1, 4.0)
    assert done.ev_paid == job.schedule.paid and done.time_to_first_preview == 1.5  # type: ignore[union-attr]
    assert job.ended and job.on_message(progress(1), 5.0) == []


def test_a_failed_connection_ends_the_job_once() -> None:
    job = new_job()
    job.on_message(quote(), 1.0)
    from protocol.errors import ErrorCode

    assert events(job.fail(ErrorCode.INTERNAL_ERROR, "gone"))[0].code == "internal_error"
    assert job.fail(ErrorCode.INTERNAL_ERROR, "again") == []
    assert window_fee(STEP_FEE, EVERY, STEPS) == STEP_FEE * EVERY


def test_credit_carried_from_earlier_jobs_counts_as_paid() -> None:
    """Two windows' credit left by earlier jobs: nothing is paid until the third."""
    job = new_job()
    job.on_message(quote(credit=STEP_FEE * 4), 1.0)
    assert job.payments() == []
    job.on_message(progress(1), 2.0)
    assert job.payments() == []
    job.on_message(progress(3), 3.0)  # steps 1..6 now due: one window beyond the credit
    pay = job.payments()
    assert isinstance(pay[0], SendPayment) and pay[0].count == 1
    assert job.paid_here == job.schedule.paid - STEP_FEE * 4  # type: ignore[union-attr]


def video_job() -> BroadcasterJob:
    """A two-frame 8x8 video job, quoted, that listed the feature result_frames."""
    video = JobRequest(
        job_id="j",
        pipeline="image-to-video",
        model_id="m",
        params=ImageToVideoParams(
            image=png(8, 8), width=8, height=8, num_frames=2, num_inference_steps=STEPS
        ),
        preview_every=EVERY,
    )
    cap = Capability("image-to-video", "m", True, 1, 0, PRICE)
    job = BroadcasterJob(video, cap, ORCH, pixels_per_step=PIXELS, now=0.0)
    job.on_message(dataclasses.replace(quote(), job_id="j"), 1.0)
    return job


def test_streamed_frames_must_come_in_order_and_all() -> None:
    """Spec J9 and 9.4: frames ahead of the result, in order; anything else fails J7."""
    frame = ResultImage(image=png(8, 8), format="png", width=8, height=8, seed=7)
    result = Result(
        job_id="j", images=(), steps=STEPS, pixel_steps=1, fee=STEP_FEE * STEPS, streamed_frames=2
    )
    job = video_job()
    for i in range(2):
        assert job.on_message(ResultFrame(job_id="j", index=i, frame=frame), 2.0) == []
    done = events(job.on_message(result, 3.0))[0]
    assert isinstance(done, JobResult) and done.frames == (frame, frame)
    # Out of order: the result check fails, and B ends the connection.
    job = video_job()
    out = job.on_message(ResultFrame(job_id="j", index=1, frame=frame), 2.0)
    assert any(isinstance(o, EndConnection) for o in out)
    assert events(out)[0].code == "invalid_result"
    # A count that disagrees: an error, not a result.
    job = video_job()
    job.on_message(ResultFrame(job_id="j", index=0, frame=frame), 2.0)
    bad = events(job.on_message(result, 3.0))[0]
    assert isinstance(bad, JobError) and bad.code == "invalid_result" and "2 frames" in bad.message


def test_status_is_reported() -> None:
    job = new_job()
    (status,) = events(
        job.on_message(Status(job_id="j", phase="loading", next_within_ms=4000), 0.5)
    )
    assert isinstance(status, JobStatus) and status.phase == "loading"


def png(width: int = 64, height: int = 64) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height)).save(out, format="PNG")
    return out.getvalue()


def good_result(**changes: object) -> Result:
    image = ResultImage(image=png(), format="png", width=64, height=64, seed=7)
    base = Result(
        job_id="j", images=(image,), steps=STEPS, pixel_steps=PIXELS * STEPS, fee=STEP_FEE * STEPS
    )
    return dataclasses.replace(base, **changes)


def test_a_result_that_does_not_match_the_request_ends_the_connection() -> None:
    """Spec J7: the caller never sees it; B tells O with a fatal invalid_result."""
    wrong_size = ResultImage(image=png(72, 64), format="png", width=72, height=64, seed=7)
    lying_size = ResultImage(image=png(72, 64), format="png", width=64, height=64, seed=7)
    not_png = ResultImage(image=b"GIF89a" + bytes(40), format="png", width=64, height=64, seed=7)
    bad = {
        "wrong size": good_result(images=(wrong_size,)),
        "fields that lie": good_result(images=(lying_size,)),
        "not a png": good_result(images=(not_png,)),
        "one image too many": good_result(images=good_result().images * 2),
        "steps": good_result(steps=STEPS - 1),
        "fee": good_result(fee=STEP_FEE * STEPS + 1),
    }
    for why, result in bad.items():
        job = new_job(output_size=(64, 64))
        job.on_message(quote(), 1.0)
        outputs = job.on_message(result, 2.0)
        ends = [o for o in outputs if isinstance(o, EndConnection)]
        assert len(ends) == 1 and ends[0].error.code == "invalid_result", why
        (error,) = events(outputs)
        assert isinstance(error, JobError) and error.code == "invalid_result", why
        assert job.ended
    job = new_job(output_size=(64, 64))
    job.on_message(quote(), 1.0)
    assert isinstance(events(job.on_message(good_result(), 2.0))[0], JobResult)


def test_an_attached_first_window_counts_as_paid() -> None:
    """Spec 8.11, C9: the tickets sent with the job are paid; none more until window 2."""
    from protocol.credit import AttachPlan

    attached = AttachPlan(index=0, tickets=3, ev=STEP_FEE * EVERY + 5)
    job = new_job(attached=attached)
    out = job.on_message(quote(), 1.0)
    accepted, sent = events(out)
    assert isinstance(accepted, Accepted)
    assert isinstance(sent, PaymentSent) and sent.tickets == sent.tickets_total == 3
    assert sent.ev_paid == attached.ev and job.paid_here == attached.ev
    assert job.payments() == []  # the first window is paid already
    job.on_message(progress(1), 2.0)  # the lead: window 2 is due now, one job ticket
    (pay,) = job.payments()[:1]
    assert isinstance(pay, SendPayment) and pay.count == 1
    assert job.schedule is not None and job.schedule.tickets_sent == 4
    # At most a window and a ticket ahead of delivery, the attached window included (C3).
    assert job.paid_here - STEP_FEE * 1 <= job.schedule.max_exposure()
