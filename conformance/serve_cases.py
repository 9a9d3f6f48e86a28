"""Cases for broadcasters: how the conformance orchestrator misbehaves, and how each is judged.

Each case serves one job. `script` is the orchestrator's side, honest but
for the one fault the case is about; `judge` reads the record of what the
broadcaster did (conformance/served_job.py) and names what it got wrong:
paid too early, paid too much, paid a bad quote, kept paying after a stall...
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from conformance.served_job import JobRecord, PaymentSeen, ServedJob
from conformance.verdicts import Verdict
from protocol.messages import error_message

Judgement = tuple[Verdict, str]


@dataclass(frozen=True)
class ServeCase:
    name: str
    ids: tuple[str, ...]
    title: str
    script: Callable[[ServedJob, Any], Awaitable[None]]
    judge: Callable[[JobRecord, Any], Judgement]
    first_window: bool = False
    """The orchestrator issues first-window parameters (spec 8.11) on the case's connection."""


SERVE_CASES: list[ServeCase] = []


def serve_case(
    name: str,
    *ids: str,
    title: str,
    judge: Callable[[JobRecord, Any], Judgement],
    first_window: bool = False,
):
    def register(script: Callable[[ServedJob, Any], Awaitable[None]]):
        SERVE_CASES.append(ServeCase(name, ids, title, script, judge, first_window))
        return script

    return register


def _wei(amount: Fraction) -> str:
    return f"{float(amount):,.0f} wei"


def completed(record: JobRecord) -> Judgement | None:
    """FAIL when the broadcaster did not pay its way to the end of an honest job."""
    if record.delivered < record.steps:
        how = "left" if record.gone else "stopped paying"
        return Verdict.FAIL, f"the broadcaster {how} at step {record.delivered} of {record.steps}"
    return None


# ------------------------------------------------------------------ honest jobs


async def honest(job: ServedJob, options: Any) -> None:
    await job.accept()
    await job.steps(1, job.record.steps)
    await job.finish()
    await job.observe(options.observe)  # payments crossing the result still count (C4)


def judge_exposure(r: JobRecord, options: Any) -> Judgement:
    worst, at = Fraction(0), None
    for p in r.payments:
        paid = r.carried + sum((q.ev for q in r.payments if q.at <= p.at), Fraction(0))
        ahead = paid - p.delivered * r.f
        bound = (r.window + r.lead) * r.f + p.ticket_ev
        if ahead - bound > worst or at is None:
            worst, at = ahead - bound, (p, paid, ahead, bound)
        if ahead > bound:
            return Verdict.FAIL, (
                f"paid too early: {_wei(paid)} paid after step {p.delivered}, "
                f"{_wei(ahead)} ahead of delivery, the bound (N + L) x f + EV is {_wei(bound)} "
                f"(N={r.window}, L={r.lead})"
            )
    return completed(r) or (Verdict.PASS, f"{len(r.payments)} payments, within the bound")


@serve_case(
    "C3-paid-ahead-within-the-bound",
    "C3",
    title="never more than (N + L) x f + EV paid for steps not yet delivered",
    judge=judge_exposure,
)
async def exposure(job: ServedJob, options: Any) -> None:
    await honest(job, options)


def judge_total(r: JobRecord, options: Any) -> Judgement:
    failed = completed(r)
    if failed:
        return failed
    ev = max((p.ticket_ev for p in r.payments), default=Fraction(0))
    if r.paid < r.fee:
        return Verdict.FAIL, f"paid too little: {_wei(r.paid)} for a fee of {_wei(r.fee)}"
    if r.paid > r.fee + ev:
        return Verdict.FAIL, (
            f"paid too much: {_wei(r.paid)} for a fee of {_wei(r.fee)}, "
            f"more than one ticket ({_wei(ev)}) over"
        )
    return Verdict.PASS, f"paid {float(r.paid / r.fee):.3f}x the fee"


@serve_case(
    "C4-paid-the-fee-at-the-end",
    "C4",
    title="at the end, between the fee and the fee plus one ticket's EV paid",
    judge=judge_total,
)
async def total(job: ServedJob, options: Any) -> None:
    await honest(job, options)


@serve_case(
    "C8-carried-credit-counted-as-paid",
    "C8",
    title="a quote that carries all but one step's fee (7.5): B pays only the rest",
    judge=judge_total,
)
async def carried(job: ServedJob, options: Any) -> None:
    r = job.record
    await job.accept(credit=r.fee - r.f)
    await job.steps(1, r.steps)
    await job.finish()
    await job.observe(options.observe)


def judge_first_window(r: JobRecord, options: Any) -> Judgement:
    attached = [p for p in r.payments if p.attached]
    if not attached:
        return Verdict.SKIP, "the broadcaster attached no payment to its job (8.11 is optional)"
    first = attached[0]
    window = r.f * min(r.window, r.steps)
    most = math.ceil(window / first.ticket_ev)
    if first.ticket_ev >= window + 1:
        return Verdict.FAIL, (
            f"attached tickets of {_wei(first.ticket_ev)} each, dearer than the window's"
            f" fee {_wei(window)}"
        )
    if first.tickets > most:
        return Verdict.FAIL, (
            f"attached {first.tickets} tickets of {_wei(first.ticket_ev)}: the window's fee"
            f" {_wei(window)} takes {most}"
        )
    verdict, detail = judge_exposure(r, options)
    if verdict is not Verdict.PASS:
        return verdict, detail
    return Verdict.PASS, f"{first.tickets} ticket(s) of {_wei(first.ticket_ev)} with the job"


@serve_case(
    "C9-first-window-attached-within-a-window",
    "C9",
    "C3",
    title="the job's attached first window: parameters no dearer than a window, ceil(W/EV)",
    judge=judge_first_window,
    first_window=True,
)
async def first_window(job: ServedJob, options: Any) -> None:
    await honest(job, options)


# ------------------------------------------------------------ quotes to refuse


def judge_refused(r: JobRecord, options: Any) -> Judgement:
    if r.payments:
        return Verdict.FAIL, f"paid a quote it must refuse: {len(r.payments)} payment(s)"
    if r.cancelled_at is not None:
        return Verdict.PASS, "cancelled without paying"
    if r.gone:
        return Verdict.PASS, "left without paying (no cancel)"
    return Verdict.FAIL, f"neither cancelled nor left within {options.observe:g} s"


async def refuse_quote(job: ServedJob, options: Any, **quote: Any) -> None:
    await job.accept(**quote)
    await job.until_refused(options.observe)


@serve_case(
    "P3-price-differs-from-the-offer",
    "P3",
    title="a quote whose price is 1 wei above the advertised one is refused",
    judge=judge_refused,
)
async def price_differs(job: ServedJob, options: Any) -> None:
    await refuse_quote(job, options, price=options.price + 1)


@serve_case(
    "P3-fee-one-wei-off",
    "P3",
    title="a quote whose fee is 1 wei above W x H x I x S x price is refused",
    judge=judge_refused,
)
async def fee_off(job: ServedJob, options: Any) -> None:
    await refuse_quote(job, options, fee_delta=Fraction(1))


@serve_case(
    "P3-pixels-per-step-wrong",
    "P3",
    title="a quote that counts twice the pixels (its fee consistent) is refused",
    judge=judge_refused,
)
async def pixels_wrong(job: ServedJob, options: Any) -> None:
    await refuse_quote(job, options, pixels_factor=2)


@serve_case(
    "K15-quote-ev-above-a-window",
    "K15",
    title="a quote whose ticket is worth a window's fee + 1 wei is refused",
    judge=judge_refused,
)
async def greedy_quote(job: ServedJob, options: Any) -> None:
    await refuse_quote(job, options, params=job.greedy_params("greedy quote"))


# ----------------------------------------------------------------- refreshes


def _after_refresh(r: JobRecord) -> list[PaymentSeen]:
    sent_at = r.marks.get("refresh_at")
    return [] if sent_at is None else [p for p in r.payments if p.at > sent_at]


async def refresh(job: ServedJob, options: Any, what: str) -> None:
    r = job.record
    await job.accept()
    fresh = job.fresh_params() if what == "good" else job.greedy_params("greedy refresh")
    await job.settle(0)
    r.marks["fresh_seed"] = fresh.seed
    await job.step(1, params=fresh)
    r.marks["refresh_at"] = time.monotonic()
    await job.steps(2, r.steps)
    await job.finish()
    await job.observe(options.observe)


def judge_refresh_used(r: JobRecord, options: Any) -> Judgement:
    later = _after_refresh(r)
    fresh = r.marks.get("fresh_seed")
    failed = completed(r)
    if failed:
        return failed
    stale = [p for p in later if p.seed != fresh]
    if stale:
        what = r.issued.get(stale[0].seed, "parameters never issued for the job")
        return Verdict.FAIL, (
            f"{len(stale)} of {len(later)} payments after the refresh used the {what} parameters"
        )
    return Verdict.PASS, f"{len(later)} payments after the refresh, all with the fresh parameters"


@serve_case(
    "K16-pays-with-refreshed-params",
    "K16",
    title="after a progress brings fresh parameters, every payment uses them",
    judge=judge_refresh_used,
)
async def good_refresh(job: ServedJob, options: Any) -> None:
    await refresh(job, options, "good")


def judge_greedy_refresh(r: JobRecord, options: Any) -> Judgement:
    fresh = r.marks.get("fresh_seed")
    used = [p for p in r.payments if p.seed == fresh]
    if used:
        return Verdict.FAIL, f"paid {len(used)} time(s) with parameters worth more than a window"
    how = "cancelled" if r.cancelled_at is not None else "kept paying with the quote's"
    return Verdict.PASS, f"never used them ({how})"


@serve_case(
    "K15-refreshed-ev-above-a-window",
    "K15",
    title="fresh parameters worth a window + 1 wei are never paid with",
    judge=judge_greedy_refresh,
)
async def greedy_refresh(job: ServedJob, options: Any) -> None:
    await refresh(job, options, "greedy")


# ---------------------------------------------------------- asking for money


def judge_quiet(what: str, to_the_end: bool) -> Callable[[JobRecord, Any], Judgement]:
    """FAIL `what` when a payment came while the orchestrator showed no new step."""

    def judge(r: JobRecord, options: Any) -> Judgement:
        window = r.marks.get("quiet", [])
        if window:
            ev = sum((p.ev for p in window), Fraction(0))
            return Verdict.FAIL, f"{what}: {len(window)} payment(s), {_wei(ev)}"
        return (completed(r) if to_the_end else None) or (
            Verdict.PASS,
            "paid nothing while no step came",
        )

    return judge


@serve_case(
    "C6-awaiting-payment-for-paid-steps",
    "C6",
    title="an awaiting_payment for a step already paid brings no payment",
    judge=judge_quiet("paid on awaiting_payment for steps already paid", to_the_end=True),
)
async def awaiting_paid(job: ServedJob, options: Any) -> None:
    r = job.record
    await job.accept()
    await job.step(1)
    await job.settle(1)
    await job.awaiting(next_step=min(r.steps, 2))
    r.marks["quiet"] = await job.observe(min(options.observe, options.stall / 4))
    await job.steps(2, r.steps)
    await job.finish()


@serve_case(
    "M1-no-payment-after-a-stall",
    "M1",
    title="no progress after step 1: the broadcaster pays nothing more",
    judge=judge_quiet("kept paying after a stall", to_the_end=False),
)
async def stall(job: ServedJob, options: Any) -> None:
    r = job.record
    await job.accept()
    await job.step(1)
    await job.settle(1)
    r.marks["quiet"] = await job.observe(options.stall)
    if r.cancelled_at is not None:
        r.notes.append("cancelled during the stall")
    if not r.gone:
        await job.fail("runner_lost", "conformance: the stall ends the job")


# ------------------------------------------------------------------- results


def judge_bad_result(r: JobRecord, options: Any) -> Judgement:
    failed = completed(r)
    if failed:
        return failed
    err = r.broadcaster_error
    if err is not None and err.code == "invalid_result" and err.job_id is None:
        return Verdict.PASS, "ended the connection with invalid_result"
    if err is not None:
        return (
            Verdict.FAIL,
            f"answered with error {err.code} (job_id {err.job_id}), not a fatal invalid_result",
        )
    if r.next_job_at is not None:
        return Verdict.FAIL, "accepted a result of the wrong size: sent its next job"
    return Verdict.FAIL, "accepted a result of the wrong size: no invalid_result"


@serve_case(
    "J7-result-of-the-wrong-size",
    "J7",
    title="a result 8 px wider than asked is refused with a fatal invalid_result",
    judge=judge_bad_result,
)
async def wrong_size(job: ServedJob, options: Any) -> None:
    await job.accept()
    await job.steps(1, job.record.steps)
    await job.finish(width_delta=8)
    await job.observe(options.observe)


# ------------------------------------------------------------ a fatal error


def judge_closed(r: JobRecord, options: Any) -> Judgement:
    if r.closed_at is not None:
        return Verdict.PASS, "closed the connection"
    if r.next_job_at is not None:
        return Verdict.FAIL, "sent another job on a connection that had failed"
    return Verdict.FAIL, f"kept the connection open for {options.observe:g} s after a fatal error"


@serve_case(
    "F6-broadcaster-closes-after-a-fatal-error",
    "F6",
    title="after a fatal error from the orchestrator (which keeps its side open), B closes",
    judge=judge_closed,
)
async def fatal_error(job: ServedJob, options: Any) -> None:
    r = job.record
    await job.accept()
    await job.step(1)
    await job.settle(1)
    r.ended = True
    await job.send(error_message("internal_error", "conformance: this connection is over"))
    await r.wait_until(
        lambda: r.closed_at is not None or r.next_job_at is not None, options.observe
    )
