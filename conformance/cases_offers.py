"""What a node offers (spec 4.5): devices told honestly, `info_request` answered."""

from __future__ import annotations

from conformance.context import CaseContext, job_ended
from conformance.registry import Registry
from conformance.verdicts import CaseSkipped, check
from protocol.messages import (
    FEATURE_INFO_REQUEST,
    FEATURE_QUEUE,
    Cancel,
    Cancelled,
    Error,
    Info,
    InfoRequest,
    JobAccepted,
    Queued,
)

cases = Registry()


def _describe(info: Info) -> str:
    devices = ", ".join(
        f"{d.name} {d.gpu}" + (f" {d.vram_total / 2**30:.1f} GiB" if d.vram_total else "")
        for d in info.devices
    )
    return f"devices: {devices or 'none listed'}"


@cases.case(
    "I1-info-request-answered",
    "I1",
    title="info_request between jobs is answered with a fresh info, and a job runs after it",
)
async def info_request(ctx: CaseContext) -> str:
    wire = await ctx.connect()
    info = await wire.hello(features=(FEATURE_INFO_REQUEST,))
    if FEATURE_INFO_REQUEST not in info.features:
        raise CaseSkipped("the orchestrator does not list info_request in info.features")
    await wire.send(InfoRequest())
    fresh = await wire.expect(Info)
    check(fresh.orchestrator == info.orchestrator, "the fresh info names another orchestrator")
    check(
        {(c.pipeline, c.model_id) for c in fresh.capabilities}
        == {(c.pipeline, c.model_id) for c in info.capabilities},
        "the fresh info offers other capabilities",
    )
    await wire.send(InfoRequest())
    await wire.expect(Info)
    return _describe(fresh)


@cases.case(
    "I2-cpu-devices-claim-no-vram",
    "I2",
    title="a device says cpu exactly when it has no VRAM, and free VRAM is within the total",
)
async def devices_honest(ctx: CaseContext) -> str:
    wire = await ctx.connect()
    info = await wire.hello()
    for d in info.devices:
        cpu = d.gpu == "cpu"
        check(
            cpu == (d.vram_total is None),
            f"device {d.name} ({d.gpu}) has vram_total {d.vram_total}",
        )
        check(
            cpu == (d.vram_free is None), f"device {d.name} ({d.gpu}) has vram_free {d.vram_free}"
        )
        if not cpu:
            assert d.vram_total is not None and d.vram_free is not None
            check(d.vram_free <= d.vram_total, f"device {d.name}: more VRAM free than it has")
    for cap in info.capabilities:
        check(
            (cap.step_seconds is None) == (cap.step_pixels == 0),
            f"{cap.model_id}: step_seconds {cap.step_seconds} with step_pixels {cap.step_pixels}",
        )
    return _describe(info)


@cases.case(
    "Q1-queued-job-waits-unpaid-and-may-be-cancelled",
    "Q1",
    title="with every slot busy, a job of a B that listed queue waits unquoted; a cancel ends it",
)
async def queued_unpaid(ctx: CaseContext) -> str:
    cap = ctx.capability
    free = cap.capacity - cap.in_use
    if free > 16:
        raise CaseSkipped(f"{free} free slots: too many to fill")
    held = 0
    for i in range(max(0, free)):  # held by jobs the suite never pays: none of them runs
        wire, _ = await ctx.ready()
        await wire.send(ctx.request(f"q1-hold-{i}", steps=50))
        reply = await wire.recv()
        if isinstance(reply, Error) and reply.code == "no_capacity":
            break
        check(isinstance(reply, JobAccepted), f"filling the slots: job refused with {reply}")
        held += 1
    wire, _ = await ctx.ready(features=(FEATURE_QUEUE,))
    request = ctx.request("q1-queued")
    await wire.send(request)
    first = await wire.recv()
    if isinstance(first, Error) and first.code == "no_capacity":
        raise CaseSkipped("the orchestrator refuses rather than queues (no_capacity)")
    check(isinstance(first, Queued), f"expected queued, got {first.TYPE}")
    assert isinstance(first, Queued)
    check(first.job_id == request.job_id, f"queued names job {first.job_id!r}")
    check(first.position >= 1, f"queued at position {first.position}")
    again = await wire.recv(timeout=first.next_within_ms / 1000 + 2)
    check(isinstance(again, Queued), f"while the slots are held: expected queued, got {again}")
    await wire.send(Cancel(job_id=request.job_id))
    end = (await wire.recv_until(job_ended))[-1]
    check(isinstance(end, Cancelled), f"a cancel while queued ended with {end.TYPE}")
    assert isinstance(end, Cancelled)
    check(end.steps == 0, f"a queued job reports {end.steps} steps executed")
    return f"capacity {cap.capacity}, {held} slots held; queued at position {first.position}"
