"""Cancel, isolation between connections, connections that end (spec 3.3, 3.5, 10)."""

from __future__ import annotations

import time

import anyio

from conformance.context import CaseContext, job_ended, progress_steps
from conformance.registry import Registry
from conformance.verdicts import CaseFailed, check
from conformance.wire import Closed, Wire
from protocol.messages import Cancel, Cancelled, Error, Progress, Result

cases = Registry()


@cases.case("X1-cancel-stops-the-job", "X1", title="cancel: cancelled with the steps executed")
async def cancel(ctx: CaseContext) -> str:
    wire, _ = await ctx.ready()
    request = ctx.request("x1", steps=30, every=2)
    accepted = await ctx.start(wire, request)
    seen = await ctx.run(
        wire, request, accepted, stop=lambda m: isinstance(m, Progress) and m.step >= 2
    )
    await wire.send(Cancel(job_id="x1"))
    at_cancel = progress_steps(seen)[-1]
    after = await wire.recv_until(job_ended)
    end = after[-1]
    check(isinstance(end, Cancelled), f"a cancelled job ended with {end.TYPE}")
    assert isinstance(end, Cancelled)
    steps = progress_steps(seen + after)
    check(
        steps == list(range(1, end.steps + 1)),
        f"cancelled.steps {end.steps}, but progress was sent for steps {steps}",
    )
    check(end.steps < accepted.steps, f"all {end.steps} steps ran: the cancel stopped nothing")
    return f"cancel at step {at_cancel}; {end.steps - at_cancel} more step(s) ran"


async def until_closed(wire: Wire, limit: float) -> tuple[Error | None, int | None, float]:
    """(the fatal error, the close code, seconds) once the orchestrator ends the connection."""
    started = time.monotonic()
    error: Error | None = None
    with anyio.move_on_after(limit):
        while True:
            try:
                message = await wire.recv(timeout=limit)
            except Closed as closed:
                return error, closed.code, time.monotonic() - started
            if isinstance(message, Error) and message.job_id is None:
                error = message
    raise CaseFailed(f"the connection was still open after {limit:g} s")


@cases.case(
    "L1-hello-timeout",
    "L1",
    title="no hello within the hello timeout: idle_timeout, close 1000",
    background=True,
)
async def hello_timeout(ctx: CaseContext) -> str:
    wire = await ctx.connect()
    limit = ctx.options.hello_timeout
    error, code, took = await until_closed(wire, limit + max(5.0, limit / 2))
    check(
        error is not None and error.code == "idle_timeout", f"ended with {error}, not idle_timeout"
    )
    check(code == 1000, f"close code {code}, not 1000")
    return f"closed after {took:.1f} s (hello timeout {limit:g} s)"


@cases.case(
    "L1-idle-timeout",
    "L1",
    title="no job within the idle timeout: idle_timeout, close 1000",
    background=True,
)
async def idle_timeout(ctx: CaseContext) -> str:
    wire, _ = await ctx.ready()
    limit = ctx.options.idle_timeout
    error, code, took = await until_closed(wire, limit + max(5.0, limit / 2))
    check(
        error is not None and error.code == "idle_timeout", f"ended with {error}, not idle_timeout"
    )
    check(code == 1000, f"close code {code}, not 1000")
    return f"closed after {took:.1f} s (idle timeout {limit:g} s)"


@cases.case(
    "L2-connections-per-client-capped",
    "L2",
    title="one connection over the cap: too_many_connections, close 1008",
    alone=True,
)
async def connection_cap(ctx: CaseContext) -> str:
    cap = ctx.options.max_connections_per_client
    held = [await ctx.connect() for _ in range(cap)]
    for wire in held:  # each is served: it gets info
        await wire.hello()
    extra = await ctx.connect()
    error, code, _ = await until_closed(extra, ctx.fatal_wait)
    check(
        error is not None and error.code == "too_many_connections",
        f"connection {cap + 1} ended with {error}, not too_many_connections",
    )
    check(code == 1008, f"close code {code}, not 1008")
    return f"cap {cap}"


@cases.case(
    "F4-a-failed-connection-leaves-others-alone",
    "F4",
    title="a fatal error on one connection does not disturb another's job",
)
async def isolation(ctx: CaseContext) -> None:
    wire, _ = await ctx.ready()
    request = ctx.request("f4", steps=6, every=2)
    accepted = await ctx.start(wire, request)
    seen = await ctx.run(
        wire, request, accepted, stop=lambda m: isinstance(m, Progress) and m.step >= 1
    )
    intruder, _ = await ctx.ready()
    await intruder.send_raw(b"\xc1 not msgpack")
    await intruder.expect_fatal("malformed_frame", timeout=ctx.fatal_wait)
    rest = await ctx.run(wire, request, accepted)  # pays on from where it stopped
    end = rest[-1]
    check(isinstance(end, Result), f"the other connection's job ended with {end.TYPE}")
    check(progress_steps(seen + rest)[-1] == accepted.steps, "the job did not run every step")


@cases.case(
    "F6-orchestrator-closes-after-a-fatal-error",
    "F6",
    title="after a fatal error from the broadcaster, the orchestrator closes the socket",
)
async def closes_on_error(ctx: CaseContext) -> str:
    from protocol.messages import error_message

    wire, _ = await ctx.ready()
    await wire.send(error_message("internal_error", "conformance: closing"))
    code = await wire.expect_close(timeout=ctx.fatal_wait)
    return f"closed with {code}"
