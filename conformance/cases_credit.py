"""The credit window (spec 7): no step without credit, the payment timeout, exact credit."""

from __future__ import annotations

import time

from conformance.context import CaseContext, credits, job_ended, params_ev, progress_steps
from conformance.registry import Registry
from conformance.verdicts import check
from protocol.messages import AwaitingPayment, Credit, Error, Message, Result

cases = Registry()


def unpaid_steps(seen: list[Message], covered: int) -> list[int]:
    return [s for s in progress_steps(seen) if s > covered]


@cases.case(
    "C1-no-step-before-credit",
    "C1",
    title="nothing paid: the orchestrator waits at step 1 and runs none",
)
async def nothing_paid(ctx: CaseContext) -> None:
    wire, _ = await ctx.ready()
    await ctx.start(wire, ctx.request("c1-unpaid", steps=4, every=2))
    seen = await wire.recv_until(lambda m: isinstance(m, AwaitingPayment | Error))
    ran = progress_steps(seen)
    check(not ran, f"ran steps {ran} with no credit at all")
    wait = seen[-1]
    check(isinstance(wait, AwaitingPayment), f"expected awaiting_payment, got {wait.TYPE}")
    assert isinstance(wait, AwaitingPayment)
    check(wait.next_step == 1 and wait.covered_steps == 0, f"awaiting {wait} before any payment")


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
    count = ctx.tickets_for(accepted, f, 2, 0)
    await wire.send(ctx.pay(request.job_id, accepted.ticket_params, count))
    covered = min(accepted.steps, int(count * params_ev(accepted.ticket_params) // f))

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
    count = ctx.tickets_for(accepted, ctx.step_fee(request), 2, 0)
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
    total = 0
    for count in (1, 2):
        total += count
        await wire.send(ctx.pay(request.job_id, accepted.ticket_params, count))
        seen = await wire.recv_until(lambda m: isinstance(m, Credit | Error))
        credit = seen[-1]
        check(isinstance(credit, Credit), f"payment of {count} answered with {credit.TYPE}")
        assert isinstance(credit, Credit)
        check(
            credit.credit == total * ev,
            f"credit {credit.credit} after {total} tickets, not exactly {total} x EV"
            f" = {total * ev}",
        )
        check(
            credit.tickets_accepted == count,
            f"tickets_accepted {credit.tickets_accepted} for a payment of {count}",
        )
        want = min(accepted.steps, int(total * ev // f))
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
    check(got[0].credit == count * ev, f"credit {got[0].credit}, paid {count * ev} in EV")
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
        got[0].tickets_accepted == 1 and got[0].credit == ev,
        f"credit {got[0].credit} for {got[0].tickets_accepted} tickets: only the first is good",
    )
    end = seen[-1]
    check(
        isinstance(end, Error) and end.code == "ticket_bad_signature",
        f"the job ended with {end.TYPE}" + (f" {end.code}" if isinstance(end, Error) else ""),
    )
    check(seen.index(got[0]) < len(seen) - 1, "the error came before the credit")
    return f"{len(progress_steps(seen))} steps ran on the good ticket's credit"
