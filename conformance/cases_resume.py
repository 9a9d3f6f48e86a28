"""Resume (spec 15, optional): latents with progress, refusals, the same result."""

from __future__ import annotations

from dataclasses import replace

from conformance.context import CaseContext
from conformance.registry import Registry
from conformance.verdicts import CaseSkipped, check
from protocol.messages import Error, JobAccepted, Latents, Progress, Result, ResumeFrom

cases = Registry()
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def scheduler(ctx: CaseContext) -> str:
    name = ctx.capability.resume_scheduler
    if not name:
        raise CaseSkipped(f"{ctx.capability.model_id} advertises no resume scheduler (15.2)")
    return name


@cases.case(
    "M2-latents-with-every-progress",
    "M2",
    title="with want_latents, each progress carries the step's latents and the scheduler",
)
async def latents(ctx: CaseContext) -> str:
    name = scheduler(ctx)
    wire, _ = await ctx.ready()
    _, seen = await ctx.run_job(wire, ctx.request("m2", steps=3, every=1, want_latents=True))
    steps = [m for m in seen if isinstance(m, Progress)]
    check(bool(steps), "no progress")
    size = ctx.options.size // 8
    for p in steps:
        check(p.latents is not None, f"progress {p.step} carries no latents")
        assert p.latents is not None
        lat = p.latents
        check(lat.scheduler == name, f"latents of {lat.scheduler}, advertised {name}")
        check(lat.dtype in DTYPE_BYTES, f"dtype {lat.dtype}")
        check(
            tuple(lat.shape) == (1, 4, size, size),
            f"shape {lat.shape}, want (1, 4, {size}, {size})",
        )
        count = 1
        for n in lat.shape:
            count *= n
        check(len(lat.data) == count * DTYPE_BYTES[lat.dtype], "data is not shape x dtype bytes")
    return f"{len(steps)} steps with {steps[0].latents.dtype} latents"  # type: ignore[union-attr]


async def latents_after(
    ctx: CaseContext, job_id: str, steps: int, k: int
) -> tuple[Latents, Result]:
    wire, _ = await ctx.ready()
    _, seen = await ctx.run_job(wire, ctx.request(job_id, steps=steps, every=1, want_latents=True))
    result = seen[-1]
    check(isinstance(result, Result), f"the job ended with {result.TYPE}")
    at_k = [m for m in seen if isinstance(m, Progress) and m.step == k]
    check(bool(at_k) and at_k[0].latents is not None, f"no latents after step {k}")
    return at_k[0].latents, result  # type: ignore[return-value]


@cases.case(
    "M3-bad-resume-refused",
    "M3",
    title="resume with another scheduler, k >= S or the wrong shape: invalid_request, unpaid",
)
async def bad_resume(ctx: CaseContext) -> str:
    scheduler(ctx)
    lat, _ = await latents_after(ctx, "m3-source", 4, 2)
    bad = {
        "another scheduler": (replace(lat, scheduler="ConformanceScheduler"), 2),
        "k = S": (lat, 4),
        "wrong shape": (replace(lat, shape=(1, 4, 1, 1), data=lat.data[:16]), 2),
    }
    for i, (what, (latents, k)) in enumerate(bad.items()):
        wire, _ = await ctx.ready()
        request = ctx.request(
            f"m3-{i}", steps=4, every=1, resume=ResumeFrom(step=k, latents=latents)
        )
        await wire.send(request)
        reply = await wire.recv()
        check(not isinstance(reply, JobAccepted), f"{what}: the resume was accepted")
        check(
            isinstance(reply, Error) and reply.code == "invalid_request",
            f"{what}: refused with {getattr(reply, 'code', reply.TYPE)}, not invalid_request",
        )
    return ", ".join(bad)


@cases.case(
    "M4-resumed-result-equals-uninterrupted",
    "M4",
    title="a job resumed at step k gives the uninterrupted job's bytes (same node and seed)",
)
async def same_result(ctx: CaseContext) -> str:
    scheduler(ctx)
    lat, whole = await latents_after(ctx, "m4-whole", 4, 2)
    wire, _ = await ctx.ready()
    request = ctx.request("m4-resumed", steps=4, every=1, resume=ResumeFrom(step=2, latents=lat))
    accepted, seen = await ctx.run_job(wire, request)
    check(accepted.steps == 2, f"the resume quoted {accepted.steps} steps for 2 left")
    resumed = seen[-1]
    check(isinstance(resumed, Result), f"the resumed job ended with {resumed.TYPE}")
    assert isinstance(resumed, Result)
    same = [a.image == b.image for a, b in zip(whole.images, resumed.images, strict=False)]
    check(
        len(same) == len(whole.images) and all(same),
        "the resumed image differs from the whole job's",
    )
    return "identical PNG bytes"
