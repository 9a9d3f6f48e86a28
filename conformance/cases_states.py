"""Connection states (spec 5): what is allowed when, job ids, late messages."""

from __future__ import annotations

import contextlib
from dataclasses import replace

from conformance.cases_framing import fatal, pack_job
from conformance.context import CaseContext, job_ended
from conformance.registry import Registry
from conformance.verdicts import CaseFailed, check
from conformance.wire import Closed
from protocol import codec
from protocol.messages import (
    Cancel,
    Credit,
    Error,
    Hello,
    Info,
    JobAccepted,
    Result,
    SignedTicket,
)

cases = Registry()


@cases.case("S1-job-before-hello", "S1", title="a job before hello is unexpected_message")
async def job_before_hello(ctx: CaseContext) -> None:
    await fatal(ctx, [pack_job(ctx, "s1")], "unexpected_message")


@cases.case("S1-hello-twice", "S1", title="a second hello is unexpected_message")
async def hello_twice(ctx: CaseContext) -> None:
    await fatal(
        ctx,
        [codec.encode(Hello(sender=ctx.sender.address_bytes))],
        "unexpected_message",
        hello=True,
    )


@cases.case(
    "S1-message-of-the-other-role",
    "S1",
    title="a broadcaster sending an orchestrator's message is unexpected_message",
)
async def wrong_role(ctx: CaseContext) -> None:
    wire, info = await ctx.ready()
    await wire.send_raw(codec.encode(info))
    await wire.expect_fatal("unexpected_message", timeout=ctx.fatal_wait)


@cases.case(
    "S1-second-job-while-one-runs",
    "S1",
    title="a job while another runs on the connection is unexpected_message",
)
async def second_job(ctx: CaseContext) -> None:
    wire, _ = await ctx.ready()
    await ctx.start(wire, ctx.request("s1-first", steps=50))
    await wire.send_raw(pack_job(ctx, "s1-second"))
    await wire.expect_fatal("unexpected_message", timeout=ctx.fatal_wait)


@cases.case(
    "S2-payment-before-any-job",
    "S2",
    title="a payment on a connection that never carried a job is unknown_job",
)
async def payment_before_job(ctx: CaseContext) -> None:
    wire, info = await ctx.ready()
    payment = ctx.pay("never-sent", info.ticket_params, 1)
    await wire.send_raw(codec.encode(payment))
    await wire.expect_fatal("unknown_job", timeout=ctx.fatal_wait)


@cases.case(
    "S2-cancel-before-any-job",
    "S2",
    title="a cancel on a connection that never carried a job is unknown_job",
)
async def cancel_before_job(ctx: CaseContext) -> None:
    wire, _ = await ctx.ready()
    await wire.send_raw(codec.encode(Cancel(job_id="never-sent")))
    await wire.expect_fatal("unknown_job", timeout=ctx.fatal_wait)


@cases.case(
    "S2-payment-for-another-job",
    "S2",
    title="a payment naming another job than the running one is unknown_job",
)
async def payment_other_job(ctx: CaseContext) -> None:
    wire, _ = await ctx.ready()
    accepted = await ctx.start(wire, ctx.request("s2-running", steps=50))
    payment = ctx.pay("s2-other", accepted.ticket_params, 1)
    await wire.send_raw(codec.encode(payment))
    await wire.expect_fatal("unknown_job", timeout=ctx.fatal_wait)


@cases.case("S3-hello-answered-with-info", "S3", title="hello is answered with info")
async def hello_info(ctx: CaseContext) -> str:
    wire = await ctx.connect()
    info = await wire.hello()
    offers = ", ".join(f"{c.pipeline}:{c.model_id}" for c in info.capabilities) or "nothing"
    return f"offers {offers}"


@cases.case(
    "S4-job-error-keeps-the-connection",
    "S4",
    title="a refused job ends with an error naming it, and the connection takes the next job",
)
async def refused_keeps(ctx: CaseContext) -> None:
    wire, _ = await ctx.ready()
    bad = replace(ctx.request("s4-refused", steps=2), model_id="conformance/no-such-model")
    await wire.send(bad)
    reply = await wire.recv()
    check(
        isinstance(reply, Error) and reply.job_id == "s4-refused",
        f"expected an error naming the job, got {reply.TYPE}",
    )
    accepted = await ctx.start(wire, ctx.request("s4-next", steps=2))
    check(accepted.job_id == "s4-next", "the next job's quote names another job")


@cases.case(
    "S5-late-payment-and-cancel-unanswered",
    "S5",
    title="a payment or cancel that crossed the job's end gets no answer; the next job runs",
)
async def late_messages(ctx: CaseContext) -> None:
    wire, _ = await ctx.ready()
    request = ctx.request("s5", steps=2, every=1)
    accepted, seen = await ctx.run_job(wire, request)
    check(isinstance(seen[-1], Result), f"the job ended with {seen[-1].TYPE}")
    good = ctx.pay("s5", accepted.ticket_params, 1)
    forged = replace(good, tickets=(SignedTicket(sender_nonce=99, sig=bytes(64) + b"\x1b"),))
    for late in (good, forged, Cancel(job_id="s5")):
        await wire.send(late)
    await wire.send(ctx.request("s5-next", steps=2, every=1))
    reply = await wire.recv()
    if isinstance(reply, Credit | Error) or not isinstance(reply, JobAccepted):
        what = f"error {reply.code}" if isinstance(reply, Error) else reply.TYPE
        raise CaseFailed(f"a late payment or cancel was answered with {what}")
    await wire.send(Cancel(job_id="s5-next"))
    await wire.recv_until(job_ended)


@cases.case(
    "S7-job-id-of-an-accepted-job-reused",
    "S7",
    title="a job reusing the previous job's id is invalid_field",
)
async def reuse_accepted(ctx: CaseContext) -> None:
    wire, _ = await ctx.ready()
    await ctx.start(wire, ctx.request("s7", steps=50))
    await wire.send(Cancel(job_id="s7"))
    await wire.recv_until(job_ended)
    await wire.send_raw(pack_job(ctx, "s7"))
    await wire.expect_fatal("invalid_field", timeout=ctx.fatal_wait)


@cases.case(
    "S7-job-id-of-a-refused-job-reused",
    "S7",
    title="a refused job's id counts too: reusing it is invalid_field",
)
async def reuse_refused(ctx: CaseContext) -> None:
    wire, _ = await ctx.ready()
    bad = replace(ctx.request("s7-refused", steps=2), model_id="conformance/no-such-model")
    await wire.send(bad)
    reply = await wire.recv()
    check(isinstance(reply, Error), f"a job for an unknown model got {reply.TYPE}")
    await wire.send_raw(pack_job(ctx, "s7-refused"))
    await wire.expect_fatal("invalid_field", timeout=ctx.fatal_wait)


@cases.case("S6-orchestrator-frames-valid", "S6", title="every frame of a job is one B accepts")
async def frames_valid(ctx: CaseContext) -> str:
    wire, info = await ctx.ready()
    check(isinstance(info, Info), "no info")
    request = ctx.request("s6", steps=3, every=2)
    _, seen = await ctx.run_job(wire, request)
    with contextlib.suppress(Closed):
        await wire.send(Cancel(job_id="s6"))  # late: must stay unanswered (S5)
    return f"{len(seen) + 2} frames, all valid in their state"
