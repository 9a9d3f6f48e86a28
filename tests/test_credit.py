"""Tests of protocol.credit (the credit window) and protocol.pricing."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest

from protocol.credit import JobCredit, PaymentSchedule, ev_fits_window, ticket_odds
from protocol.errors import ErrorCode, ProtocolError
from protocol.pm import MAX_UINT256, ticket_ev
from protocol.pricing import REFERENCE_STEPS, job_fee, pixel_steps, price_from_ai_models

# --------------------------------------------------------------------- JobCredit


def test_covered_steps_floor_and_cap() -> None:
    credit = JobCredit(fee_per_step=Fraction(10, 3), total_steps=5)
    assert credit.covered_steps == 0
    credit.add(Fraction(10, 3) - Fraction(1, 10**30))
    assert credit.covered_steps == 0
    credit.add(Fraction(1, 10**30))
    assert credit.covered_steps == 1
    credit.add(Fraction(10, 3) * Fraction(3, 2))
    assert credit.covered_steps == 2  # 2.5 steps' worth floors to 2
    credit.add(Fraction(1000))
    assert credit.covered_steps == 5  # never past the job's end
    assert credit.may_execute(5) and not credit.may_execute(6)


def test_execute_in_order_within_credit() -> None:
    credit = JobCredit(fee_per_step=Fraction(7), total_steps=3)
    credit.add(Fraction(14))
    credit.execute(1)
    credit.execute(2)
    assert credit.executed == 2
    assert credit.earned == 14
    with pytest.raises(ProtocolError) as info:
        credit.execute(3)
    assert info.value.code is ErrorCode.PAYMENT_TIMEOUT
    assert credit.executed == 2  # the refused step did not run
    credit.add(Fraction(7))
    credit.execute(3)
    assert credit.earned == 21


@pytest.mark.parametrize(("done", "step"), [(0, 2), (0, 0), (1, 1), (1, 3), (2, -1)])
def test_execute_out_of_order(done: int, step: int) -> None:
    credit = JobCredit(fee_per_step=Fraction(1), total_steps=10, credit=Fraction(10))
    for k in range(1, done + 1):
        credit.execute(k)
    with pytest.raises(ValueError, match="out of order"):
        credit.execute(step)
    assert credit.executed == done


def test_out_of_order_checked_before_credit() -> None:
    credit = JobCredit(fee_per_step=Fraction(1), total_steps=10)
    with pytest.raises(ValueError, match="out of order"):
        credit.execute(2)


def test_zero_fee_job_is_always_covered() -> None:
    credit = JobCredit(fee_per_step=Fraction(0), total_steps=4)
    assert credit.covered_steps == 4
    for step in range(1, 5):
        credit.execute(step)
    assert credit.earned == 0


def test_job_credit_rejects_bad_values() -> None:
    with pytest.raises(ValueError):
        JobCredit(fee_per_step=Fraction(-1), total_steps=1)
    with pytest.raises(ValueError):
        JobCredit(fee_per_step=Fraction(1), total_steps=0)
    credit = JobCredit(fee_per_step=Fraction(1), total_steps=1)
    with pytest.raises(ValueError):
        credit.add(Fraction(-1))


# --------------------------------------------------------------------- PaymentSchedule


def test_schedule_targets() -> None:
    sched = PaymentSchedule(
        fee_per_step=Fraction(1),
        total_steps=10,
        window_steps=4,
        ticket_ev=Fraction(1),
        lead_steps=1,
    )
    # Window w+1 is due once delivered >= w*N - lead.
    assert [sched.target_steps(d) for d in range(11)] == [4, 4, 4, 8, 8, 8, 8, 10, 10, 10, 10]
    assert sched.tickets_due(0) == 4
    sched.record_sent(4)
    assert sched.tickets_due(2) == 0
    assert sched.tickets_due(3) == 4
    assert sched.max_exposure() == 4 + 1 + 1


@pytest.mark.parametrize(
    ("window", "lead", "clamped"),
    [(4, -3, 0), (4, 0, 0), (4, 2, 2), (4, 3, 3), (4, 4, 3), (4, 99, 3), (1, 0, 0), (1, 1, 1),
     (1, 5, 1), (2, 1, 1), (2, 2, 1)],
)  # fmt: skip
def test_lead_clamped_below_window_or_to_one(window: int, lead: int, clamped: int) -> None:
    # L < N, except that a window of one step may be paid one step ahead (spec 7.3).
    sched = PaymentSchedule(Fraction(1), 10, window, Fraction(1), lead_steps=lead)
    assert sched.lead_steps == clamped


def test_at_a_window_of_one_the_next_step_is_paid_while_one_runs() -> None:
    sched = PaymentSchedule(Fraction(1), 10, 1, Fraction(1), lead_steps=1)
    assert [sched.target_steps(d) for d in range(4)] == [2, 3, 4, 5]
    assert sched.max_exposure() == 2 + 1  # (N + L) f + EV


def test_schedule_rejects_bad_values() -> None:
    with pytest.raises(ValueError):
        PaymentSchedule(Fraction(1), 10, 0, Fraction(1))
    with pytest.raises(ValueError):
        PaymentSchedule(Fraction(1), 10, 2, Fraction(0))


def _simulate(
    steps: int,
    window: int,
    lead: int,
    lag: int,
    pixels: int = 512 * 512,
    price: Fraction = Fraction(4_768_371, 13_107_200),
    face_value: int = 10**12,
) -> tuple[PaymentSchedule, JobCredit, list[int]]:
    """Run one job; the broadcaster sees the orchestrator's progress `lag` steps late.

    Returns the schedule, the orchestrator's ledger and the steps it had to wait at.
    """
    fee_per_step = job_fee(pixels, 1, price)
    # Parameters sized to one window, min(N, S) steps (spec 8.2).
    fv, wp = ticket_odds(min(window, steps) * fee_per_step, face_value)
    ev = ticket_ev(fv, wp)
    sched = PaymentSchedule(fee_per_step, steps, window, ev, lead_steps=lead)
    ledger = JobCredit(fee_per_step=fee_per_step, total_steps=steps)
    blocked: list[int] = []

    def pay(seen: int) -> None:
        due = sched.tickets_due(seen)
        if due:
            sched.record_sent(due)
            ledger.add(due * ev)  # the recipient credits each ticket's EV
        # (a) never more than the bound paid and not delivered
        assert sched.paid - seen * fee_per_step <= sched.max_exposure()

    pay(0)
    for step in range(1, steps + 1):
        # The broadcaster has seen progress up to step - 1 - lag when step is due.
        seen = max(0, step - 1 - lag)
        pay(seen)
        if not ledger.may_execute(step):
            blocked.append(step)
            pay(step - 1)  # it waits for the broadcaster to catch up
        ledger.execute(step)
    pay(steps)
    assert sched.tickets_due(steps) == 0
    return sched, ledger, blocked


CASES = [
    # (steps, window, lead)
    (1, 1, 0),
    (4, 1, 0),
    (50, 5, 1),
    (50, 5, 4),
    (50, 7, 2),
    (30, 10, 3),
    (30, 30, 0),
    (25, 40, 5),
    (97, 8, 7),
    (1000, 50, 10),
]


@pytest.mark.parametrize(("steps", "window", "lead"), CASES)
def test_simulated_job(steps: int, window: int, lead: int) -> None:
    sched, ledger, blocked = _simulate(steps, window, lead, lag=sched_lead(window, lead))
    fee_per_step = sched.fee_per_step
    # (b) tickets arrive before the orchestrator needs them.
    assert blocked == []
    assert ledger.executed == steps
    # (c) total paid is the fee, plus less than one ticket.
    fee = steps * fee_per_step
    assert fee <= sched.paid < fee + sched.ticket_ev
    assert ledger.credit == sched.paid
    # One ticket is one window's fee rounded up by < 1 wei, so each window costs one ticket.
    window_fee = min(window, steps) * fee_per_step
    assert window_fee <= sched.ticket_ev < window_fee + 1
    assert ev_fits_window(sched.ticket_ev, window_fee)
    assert sched.tickets_sent == math.ceil(steps / window)


def sched_lead(window: int, lead: int) -> int:
    """The lead as PaymentSchedule clamps it: the lag it absorbs."""
    return max(0, min(lead, window - 1))


@pytest.mark.parametrize(("steps", "window", "lead"), [c for c in CASES if c[0] > c[1]])
def test_no_lag_never_blocks(steps: int, window: int, lead: int) -> None:
    _sched, ledger, blocked = _simulate(steps, window, lead, lag=0)
    assert blocked == [] and ledger.executed == steps


def test_lag_beyond_lead_blocks() -> None:
    """The lead is exactly the latency the schedule absorbs: one more step stalls the GPU."""
    _sched, ledger, blocked = _simulate(steps=20, window=4, lead=1, lag=2)
    assert blocked == [5, 9, 13, 17]
    assert ledger.executed == 20


def test_sure_ticket_schedule() -> None:
    """A window dearer than the face value pays with whole-wei sure tickets."""
    sched, _ledger, blocked = _simulate(
        steps=12, window=3, lead=1, lag=1, pixels=1000, price=Fraction(7, 9), face_value=100
    )
    assert blocked == []
    assert sched.ticket_ev == math.ceil(3 * 1000 * Fraction(7, 9)) == 2334
    assert sched.tickets_sent == 4


# --------------------------------------------------------------------- ticket_odds


@pytest.mark.parametrize(
    "window_fee",
    [Fraction(1, 3), Fraction(1), Fraction(999), Fraction(10**15 - 1), Fraction(12345, 7)],
)
def test_ticket_odds_keeps_face_value(window_fee: Fraction) -> None:
    face = 10**15
    fv, wp = ticket_odds(window_fee, face)
    assert fv == face
    assert 1 <= wp < MAX_UINT256
    # The smallest win probability whose EV reaches the window's fee (spec 8.2, K1)...
    ev = ticket_ev(fv, wp)
    assert ev >= window_fee
    assert ticket_ev(fv, wp - 1) < window_fee
    # ...so the EV exceeds the fee by less than one wei, which the broadcaster accepts.
    assert ev - window_fee < ticket_ev(face, 1) < 1
    assert ev_fits_window(ev, window_fee)


@pytest.mark.parametrize(
    "window_fee",
    [Fraction(10**15), Fraction(10**15 + 1), Fraction(5 * 10**18, 3), Fraction(10**15 * 7 + 1, 7)],
)
def test_ticket_odds_sure_ticket(window_fee: Fraction) -> None:
    fv, wp = ticket_odds(window_fee, 10**15)
    assert (fv, wp) == (math.ceil(window_fee), MAX_UINT256)
    ev = ticket_ev(fv, wp)
    assert ev == fv
    assert window_fee <= ev < window_fee + 1


def test_ticket_odds_tiny_window_gets_smallest_probability() -> None:
    fv, wp = ticket_odds(Fraction(0), 10**15)
    assert (fv, wp) == (10**15, 1)
    assert ev_fits_window(ticket_ev(fv, wp), Fraction(0))


def test_ticket_odds_sure_ticket_when_window_exceeds_face_value() -> None:
    assert ticket_odds(Fraction(10**16), 10**15) == (10**16, MAX_UINT256)


def test_execute_beyond_the_job_is_refused() -> None:
    credit = JobCredit(Fraction(0), 1)
    credit.execute(1)
    with pytest.raises(ValueError, match="beyond the job"):
        credit.execute(2)


def test_ev_fits_window() -> None:
    assert ev_fits_window(Fraction(10), Fraction(10))
    assert ev_fits_window(Fraction(10) + Fraction(999, 1000), Fraction(10))
    assert not ev_fits_window(Fraction(11), Fraction(10))
    assert ev_fits_window(Fraction(1, 2), Fraction(10))


def test_ticket_odds_rejects_bad_face_value() -> None:
    for face in (0, -1):
        with pytest.raises(ValueError):
            ticket_odds(Fraction(1), face)


# --------------------------------------------------------------------- pricing


def test_price_from_ai_models_divides_by_reference_steps() -> None:
    # 4768371 wei per 1 pixel on go-livepeer -> per pixel-step at 50 reference steps.
    price = price_from_ai_models(4_768_371, 1, "text-to-image")
    assert price == Fraction(4_768_371, 50)
    # A job at the reference steps costs what go-livepeer charges for its pixels.
    pixels = 1024 * 576
    assert job_fee(pixels, REFERENCE_STEPS["text-to-image"], price) == 4_768_371 * pixels
    assert price_from_ai_models(3, 4, "image-to-image") == Fraction(3, 4 * 80)
    assert price_from_ai_models(1, 1, "image-to-video") == Fraction(1, 25)
    assert price_from_ai_models(0, 7, "text-to-image") == 0


@pytest.mark.parametrize(
    ("price", "pixels", "pipeline"),
    [
        (-1, 1, "text-to-image"),
        (1, 0, "text-to-image"),
        (1, -5, "text-to-image"),
        (1, 1, "upscale"),
        (1, 1, ""),
    ],
)
def test_price_from_ai_models_errors(price: int, pixels: int, pipeline: str) -> None:
    with pytest.raises(ValueError):
        price_from_ai_models(price, pixels, pipeline)


def test_pixel_steps_and_job_fee() -> None:
    assert pixel_steps(1024, 576, 1, 50) == 1024 * 576 * 50
    assert pixel_steps(512, 512, 4, 30) == 512 * 512 * 4 * 30
    assert pixel_steps(512, 512, 4, 0) == 0
    price = Fraction(1, 3)
    assert job_fee(10, 3, price) == 10
    assert job_fee(10, 1, price) == Fraction(10, 3)
    assert isinstance(job_fee(10, 1, price), Fraction)
    assert job_fee(7, 0, price) == 0


def test_the_first_window_plan_fits_a_window() -> None:
    """Spec 8.11, C9: parameters no dearer than the window, ceil(W / EV) tickets of them,
    so less than a window and a ticket is attached; none when nothing fits."""
    from protocol.credit import (
        MAX_ATTACHED_TICKETS,
        first_window_evs,
        plan_first_payment,
        ticket_odds,
    )
    from protocol.pm import ticket_ev

    face = 10**15
    evs = [ticket_ev(*ticket_odds(Fraction(ev), face)) for ev in first_window_evs(face)]
    assert len(evs) == 15 and evs[0] >= 4**10 and evs[-1] <= face
    for window in (
        Fraction(4**10),
        Fraction(1_562_000_000),
        Fraction(7, 3) * 10**12,
        Fraction(face),
    ):
        plan = plan_first_payment(evs, window)
        assert plan is not None
        ev = evs[plan.index]
        assert ev < window + 1 and plan.tickets == -(-window // ev) <= 4
        assert window <= plan.ev < window + ev
    assert plan_first_payment(evs, Fraction(4**10 - 5)) is None  # cheaper than every set
    assert plan_first_payment(evs, Fraction(face) * (MAX_ATTACHED_TICKETS + 1)) is None
    assert plan_first_payment(evs, Fraction(0)) is None
