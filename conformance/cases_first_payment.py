"""The first window paid with the job (spec 8.11, feature `first_payment`): K18."""

from __future__ import annotations

from dataclasses import replace

from conformance.context import CaseContext, credits, job_ended, params_ev, progress_steps
from conformance.registry import Registry
from conformance.verdicts import CaseSkipped, check
from pipelines.requests import planned_steps
from protocol.credit import plan_first_payment
from protocol.messages import (
    FEATURE_FIRST_PAYMENT,
    Credit,
    Error,
    FirstPayment,
    Info,
    JobAccepted,
    JobRequest,
    Message,
    Payment,
)

cases = Registry()
FEATURES = (FEATURE_FIRST_PAYMENT,)


def attach(ctx: CaseContext, info: Info, request: JobRequest) -> tuple[JobRequest, Payment]:
    """The request with its first window's tickets, as a broadcaster plans them (C9)."""
    if not info.first_params:
        raise CaseSkipped("the orchestrator issues no first-window parameters (8.11 is optional)")
    steps = planned_steps(request.params)
    window = ctx.step_fee(request) * min(request.preview_every, steps)
    plan = plan_first_payment([params_ev(p) for p in info.first_params], window)
    if plan is None:
        raise CaseSkipped("no first-window parameters fit this job's window")
    payment = ctx.pay(request.job_id, info.first_params[plan.index], plan.tickets)
    first = FirstPayment(ticket_params=payment.ticket_params, tickets=payment.tickets)
    return replace(request, first_payment=first), payment


@cases.case(
    "K18-first-payment-credited-after-accepted",
    "K18",
    title="the job's attached payment is credited after `accepted` and its steps run unasked",
)
async def first_payment_credited(ctx: CaseContext) -> str:
    wire, info = await ctx.ready(features=FEATURES)
    request, payment = attach(ctx, info, ctx.request("k18", steps=4, every=2))
    await wire.send(request)
    seen = await wire.recv_until(lambda m: isinstance(m, Credit) or job_ended(m))
    check(
        isinstance(seen[0], JobAccepted),
        f"the job was answered with {seen[0].TYPE}"
        + (f" {seen[0].code}" if isinstance(seen[0], Error) else ""),
    )
    accepted = seen[0]
    assert isinstance(accepted, JobAccepted)
    got = credits(seen)
    check(len(got) == 1, "no credit for the attached payment before the job ended")
    ev = params_ev(payment.ticket_params) * len(payment.tickets)
    check(
        got[0].credit == accepted.credit + ev and got[0].tickets_accepted == len(payment.tickets),
        f"credit {got[0].credit} for {got[0].tickets_accepted} tickets; attached"
        f" {len(payment.tickets)} worth {ev} beside {accepted.credit} carried",
    )
    covered = got[0].covered_steps
    check(covered >= min(2, accepted.steps), f"the attached window covers {covered} steps")

    def window_done(m: Message) -> bool:
        return job_ended(m) or (m.TYPE == "progress" and getattr(m, "step", 0) >= covered)

    after = await wire.recv_until(window_done)
    check(
        progress_steps(after)[:covered] == list(range(1, covered + 1)),
        f"steps {progress_steps(after)} with {covered} covered and no separate payment",
    )
    await ctx.end(wire)
    return f"{len(payment.tickets)} ticket(s) attached covered {covered} steps"


@cases.case(
    "K18-first-params-of-another-connection",
    "K18",
    "K2",
    title="tickets made against another connection's first-window parameters: refused",
)
async def first_params_elsewhere(ctx: CaseContext) -> str:
    _, other = await ctx.ready(features=FEATURES)
    wire, info = await ctx.ready(features=FEATURES)
    if not info.first_params:
        raise CaseSkipped("the orchestrator issues no first-window parameters (8.11 is optional)")
    request, _ = attach(ctx, other, ctx.request("k18-other", steps=4, every=2))
    await wire.send(request)
    reply = await wire.recv_until(lambda m: job_ended(m) or isinstance(m, JobAccepted))
    end = reply[-1]
    check(
        isinstance(end, Error) and end.code == "invalid_ticket_params",
        f"answered with {end.TYPE}" + (f" {end.code}" if isinstance(end, Error) else ""),
    )
    return "invalid_ticket_params before any quote"


@cases.case(
    "K18-no-first-params-without-the-feature",
    "K18",
    "V1",
    title="a hello without `first_payment` gets no first-window parameters",
)
async def no_feature(ctx: CaseContext) -> str:
    _, info = await ctx.ready()
    check(not info.first_params, f"{len(info.first_params)} first-window parameters unasked")
    _, asked = await ctx.ready(features=FEATURES)
    return f"{len(asked.first_params)} sets when asked"
