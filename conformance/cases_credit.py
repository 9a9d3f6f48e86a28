"""The credit window (spec 7): no step without credit, the payment timeout, exact credit."""

from __future__ import annotations

import time

from conformance.context import CaseContext, credits, job_ended, params_ev, progress_steps
from conformance.registry import Registry
from conformance.verdicts import CaseSkipped, check
from protocol.messages import (
    AwaitingPayment,
    Credit,
    Error,
    JobAccepted,
    JobRequest,
    Message,
    Result,
)

cases = Registry()


def unpaid_steps(seen: list[Message], covered: int) -> list[int]:
    return [s for s in progress_steps(seen) if s > covered]


@cases.case(
    "C1-no-step-before-credit",
    "C1",
    title="nothing paid: the orchestrator waits at step 1 and runs none",
)
async def nothing_paid(ctx: CaseContext) -> str | None:
    wire, _ = await ctx.ready()
    request = ctx.request("c1-unpaid", steps=4, every=2)
    accepted = await ctx.start(wire, request)
    carried = carried_steps(ctx, request, accepted)
    if carried >= accepted.steps:
        raise CaseSkipped("the sender's carried credit (7.5) covers the whole job")
    seen = await wire.recv_until(lambda m: isinstance(m, AwaitingPayment | Error))
    ran = unpaid_steps(seen, carried)
    check(not ran, f"ran steps {ran} with no credit for them")
    wait = seen[-1]
    check(isinstance(wait, AwaitingPayment), f"expected awaiting_payment, got {wait.TYPE}")
    assert isinstance(wait, AwaitingPayment)
    check(
        wait.next_step == carried + 1 and wait.covered_steps == carried,
        f"awaiting {wait} with {carried} steps of carried credit and nothing paid",
    )
    return f"{carried} steps carried from the sender's balance" if carried else None


def carried_steps(ctx: CaseContext, request: JobRequest, accepted: JobAccepted) -> int:
    """Steps the job's carried credit (`accepted.credit`, spec 7.5) covers by itself."""
    return min(accepted.steps, int(accepted.credit // ctx.step_fee(request)))


@cases.case(
    "C1-stops-at-the-credit-boundary",
    "C1",
    title="one window paid: exactly its steps run, then the orchestrator waits",
)
async def one_window(ctx: CaseContext) -> str:
    wire, _ = await ctx.ready()
    request = ctx.request("c1-window", steps=6, every=2)
    accepted = await ctx.start(wire, request)
    f = ctx.step_fee(request)
    count = max(1, ctx.tickets_for(accepted, f, 2, accepted.credit))
    await wire.send(ctx.pay(request.job_id, accepted.ticket_params, count))
    credit = accepted.credit + count * params_ev(accepted.ticket_params)
    covered = min(accepted.steps, int(credit // f))
    if covered >= accepted.steps:
        raise CaseSkipped("the sender's carried credit (7.5) and one ticket cover the job")

    def waits_beyond(m: Message) -> bool:
        return isinstance(m, AwaitingPayment) and m.next_step > covered or job_ended(m)

    seen = await wire.recv_until(waits_beyond)
    extra = unpaid_steps(seen, covered)
    check(not extra, f"ran steps {extra} beyond the {covered} paid for")
    check(
        progress_steps(seen) == list(range(1, covered + 1)),
        f"steps {progress_steps(seen)} for {covered} paid",
    )
    return f"{count} ticket(s) covered {covered} steps"


@cases.case(
    "C2-payment-timeout",
    "C2",
    title="no covering credit within timeout_ms: the job ends with payment_timeout",
)
async def payment_timeout(ctx: CaseContext) -> str:
    wire, _ = await ctx.ready()
    request = ctx.request("c2", steps=6, every=2)
    accepted = await ctx.start(wire, request)
    count = max(1, ctx.tickets_for(accepted, ctx.step_fee(request), 2, accepted.credit))
    await wire.send(ctx.pay(request.job_id, accepted.ticket_params, count))
    seen = await wire.recv_until(lambda m: isinstance(m, AwaitingPayment) and m.next_step > 1)
    wait = seen[-1]
    assert isinstance(wait, AwaitingPayment)
    waited_from = time.monotonic()
    limit = wait.timeout_ms / 1000
    grace = max(5.0, limit / 2)
    end = await wire.recv_until(job_ended, timeout=limit + grace)
    took = time.monotonic() - waited_from
    last = end[-1]
    check(
        isinstance(last, Error) and last.code == "payment_timeout",
        f"the unpaid job ended with {last.TYPE}"
        + (f" {last.code}" if isinstance(last, Error) else ""),
    )
    return f"timeout_ms {wait.timeout_ms}, ended after {took:.1f} s"


@cases.case(
    "C5-exact-cumulative-credit",
    "C5",
    "T1",
    title="credit is the exact sum of EV, cumulative; ticket counts are per payment",
)
async def exact_credit(ctx: CaseContext) -> str:
    wire, _ = await ctx.ready()
    request = ctx.request("c5", steps=6, every=2)
    accepted = await ctx.start(wire, request)
    f = ctx.step_fee(request)
    ev = params_ev(accepted.ticket_params)
    carried, total = accepted.credit, 0
    for count in (1, 2):
        total += count
        await wire.send(ctx.pay(request.job_id, accepted.ticket_params, count))
        seen = await wire.recv_until(lambda m: isinstance(m, Credit | Error))
        credit = seen[-1]
        check(isinstance(credit, Credit), f"payment of {count} answered with {credit.TYPE}")
        assert isinstance(credit, Credit)
        check(
            credit.credit == carried + total * ev,
            f"credit {credit.credit} after {total} tickets, not exactly {carried} carried"
            f" + {total} x EV = {carried + total * ev}",
        )
        check(
            credit.tickets_accepted == count,
            f"tickets_accepted {credit.tickets_accepted} for a payment of {count}",
        )
        want = min(accepted.steps, int((carried + total * ev) // f))
        check(credit.covered_steps == want, f"covered_steps {credit.covered_steps}, not {want}")
    return f"EV per ticket {float(ev):.6g} wei, compared as an exact fraction"


@cases.case(
    "C5-credit-not-capped-at-the-fee",
    "C5",
    title="paying beyond the fee is credited in full, one credit per payment",
)
async def overpaid(ctx: CaseContext) -> str:
    wire, _ = await ctx.ready()
    request = ctx.request("c5-over", steps=4, every=2)
    accepted = await ctx.start(wire, request)
    ev = params_ev(accepted.ticket_params)
    count = 2 * ctx.tickets_for(accepted, ctx.step_fee(request), accepted.steps, 0) + 1
    await wire.send(ctx.pay(request.job_id, accepted.ticket_params, count))
    seen = await wire.recv_until(job_ended)
    got = credits(seen)
    check(len(got) == 1, f"{len(got)} credit messages for one payment")
    paid = accepted.credit + count * ev
    check(got[0].credit == paid, f"credit {got[0].credit}, paid {paid} in EV (carried included)")
    check(got[0].covered_steps == accepted.steps, "an overpaid job does not cover every step")
    check(isinstance(seen[-1], Result), f"the job ended with {seen[-1].TYPE}")
    return f"credited {float(got[0].credit / accepted.fee):.2f}x the fee"


@cases.case(
    "C5-refused-payment-gets-credit-first",
    "C5",
    "K3",
    title="a payment with a refused ticket gets its credit, then the job's error",
)
async def refused_credit(ctx: CaseContext) -> str:
    from dataclasses import replace

    wire, _ = await ctx.ready()
    request = ctx.request("c5-refused", steps=6, every=2)
    accepted = await ctx.start(wire, request)
    payment = ctx.pay(request.job_id, accepted.ticket_params, 3)
    bad = replace(payment.tickets[1], sig=payment.tickets[0].sig)  # signed for another nonce
    payment = replace(payment, tickets=(payment.tickets[0], bad, payment.tickets[2]))
    await wire.send(payment)
    seen = await wire.recv_until(job_ended)
    got = credits(seen)
    check(len(got) == 1, f"{len(got)} credit messages for the payment")
    ev = params_ev(accepted.ticket_params)
    check(
        got[0].tickets_accepted == 1 and got[0].credit == accepted.credit + ev,
        f"credit {got[0].credit} for {got[0].tickets_accepted} tickets: only the first is good",
    )
    end = seen[-1]
    check(
        isinstance(end, Error) and end.code == "ticket_bad_signature",
        f"the job ended with {end.TYPE}" + (f" {end.code}" if isinstance(end, Error) else ""),
    )
    check(seen.index(got[0]) < len(seen) - 1, "the error came before the credit")
    return f"{len(progress_steps(seen))} steps ran on the good ticket's credit"


@cases.case(
    "C7-balance-carried-to-the-next-job",
    "C7",
    title="what a job's credit leaves over its fee starts the sender's next job",
)
async def carried(ctx: CaseContext) -> str:
    first, _ = await ctx.ready()
    request = ctx.request("c7-first", steps=2, every=2)
    accepted = await ctx.start(first, request)
    f = ctx.step_fee(request)
    count = 2 * max(1, ctx.tickets_for(accepted, f, accepted.steps, accepted.credit))
    await first.send(ctx.pay(request.job_id, accepted.ticket_params, count))
    seen = await first.recv_until(job_ended)
    check(isinstance(seen[-1], Result), f"the first job ended with {seen[-1].TYPE}")
    left = credits(seen)[-1].credit - accepted.fee
    check(left > 0, "two windows' tickets for one window left nothing over")
    second, _ = await ctx.ready()  # another connection: the balance is the sender's
    next_request = ctx.request("c7-second", steps=4, every=2)
    following = await ctx.start(second, next_request)
    want = min(left, following.fee)
    check(
        want <= following.credit <= following.fee,
        f"accepted.credit {float(following.credit):.6g} wei after {float(left):.6g} left over;"
        f" expected at least {float(want):.6g} and at most the fee {float(following.fee):.6g}",
    )
    return f"{float(following.credit / following.fee):.2f} of the next fee carried"
