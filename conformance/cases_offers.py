"""What a node offers (spec 4.5): devices told honestly, `info_request` answered."""

from __future__ import annotations

from conformance.context import CaseContext
from conformance.registry import Registry
from conformance.verdicts import CaseSkipped, check
from protocol.messages import FEATURE_INFO_REQUEST, Info, InfoRequest

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
