"""Jobs (spec 6, 9): refusals before payment, the quote, previews, results."""

from __future__ import annotations

import io
import math
from dataclasses import replace
from typing import Any

from conformance.context import CaseContext, job_ended
from conformance.registry import Registry
from conformance.verdicts import CaseFailed, CaseSkipped, Info, check
from conformance.wire import Wire
from protocol.messages import (
    Error,
    ImageToImageParams,
    JobAccepted,
    JobRequest,
    Message,
    Preview,
    Progress,
    Result,
)
from protocol.result_check import png_size

cases = Registry()


async def refused(ctx: CaseContext, request: JobRequest, code: str) -> None:
    """The job must be refused with `code`, naming it, before any quote (spec J1)."""
    wire, _ = await ctx.ready()
    await wire.send(request)
    reply = await wire.recv()
    if isinstance(reply, JobAccepted):
        raise CaseFailed(f"the job was accepted (fee {float(reply.fee):.0f} wei), not {code}")
    check(isinstance(reply, Error), f"expected error {code}, got {reply.TYPE}")
    assert isinstance(reply, Error)
    check(reply.job_id == request.job_id, f"the error names job {reply.job_id!r}")
    check(reply.code == code, f"refused with {reply.code} ({reply.message[:120]}), not {code}")


def offer(ctx: CaseContext, pipeline: str) -> Any:
    for c in ctx.info.capabilities:
        if c.pipeline == pipeline:
            return c
    raise CaseSkipped(f"the orchestrator does not offer {pipeline}")


@cases.case("J1-unsupported-pipeline", "J1", title="an unoffered pipeline is unsupported_pipeline")
async def unsupported_pipeline(ctx: CaseContext) -> None:
    from protocol.messages import ImageToVideoParams

    offered = {c.pipeline for c in ctx.info.capabilities}
    model = ctx.capability.model_id
    if "image-to-video" not in offered:
        video = ImageToVideoParams(image=tiny_png(), width=64, height=64, num_frames=2)
        request = JobRequest("j1-pipeline", "image-to-video", model, video)
    elif "image-to-image" not in offered:
        image = ImageToImageParams(prompt="p", image=tiny_png(), num_inference_steps=4)
        request = JobRequest("j1-pipeline", "image-to-image", model, image)
    else:
        raise CaseSkipped("every pipeline of spec 4.4 is offered")
    await refused(ctx, request, "unsupported_pipeline")


@cases.case("J1-unknown-model", "J1", title="a model not offered for the pipeline is unknown_model")
async def unknown_model(ctx: CaseContext) -> None:
    request = replace(ctx.request("j1-model"), model_id="conformance/no-such-model")
    await refused(ctx, request, "unknown_model")


@cases.case(
    "J1-size-not-a-multiple-of-8", "J1", title="a width not a multiple of 8 is invalid_request"
)
async def not_multiple(ctx: CaseContext) -> None:
    await refused(ctx, ctx.request("j1-size", width=ctx.options.size + 4), "invalid_request")


@cases.case(
    "J1-too-many-pixels-per-image", "J1", title="more than 2048x2048 per image is invalid_request"
)
async def too_big_image(ctx: CaseContext) -> None:
    await refused(ctx, ctx.request("j1-image", width=2056, height=2048), "invalid_request")


@cases.case(
    "J1-too-many-pixels-per-job", "J1", title="more than 4 Mi output pixels is invalid_request"
)
async def too_big_job(ctx: CaseContext) -> None:
    request = ctx.request("j1-job", width=1024, height=1024, num_images_per_prompt=5)
    await refused(ctx, request, "invalid_request")


@cases.case("J1-unknown-preview-method", "J1", title="an unknown preview method is invalid_request")
async def bad_method(ctx: CaseContext) -> None:
    await refused(ctx, ctx.request("j1-method", preview_method="oracle"), "invalid_request")


@cases.case("J1-unknown-preview-format", "J1", title="an unknown preview format is invalid_request")
async def bad_format(ctx: CaseContext) -> None:
    await refused(ctx, ctx.request("j1-format", preview_format="bmp"), "invalid_request")


@cases.case(
    "J1-preview-frame-of-an-image-job",
    "J1",
    title="preview_frame on an image job is invalid_request",
)
async def preview_frame(ctx: CaseContext) -> None:
    await refused(ctx, ctx.request("j1-frame", preview_frame=0), "invalid_request")


def image_to_image(ctx: CaseContext, job_id: str, **changes: Any) -> JobRequest:
    cap = offer(ctx, "image-to-image")
    params = ImageToImageParams(prompt="p", image=tiny_png(), num_inference_steps=4, seed=1)
    return JobRequest(job_id, "image-to-image", cap.model_id, replace(params, **changes))


@cases.case(
    "J1-image-to-image-without-image",
    "J1",
    title="image-to-image without an input image is invalid_request",
)
async def no_image(ctx: CaseContext) -> None:
    await refused(ctx, image_to_image(ctx, "j1-noimage", image=None), "invalid_request")


@cases.case(
    "J1-image-to-image-undecodable-image",
    "J1",
    title="an input image that does not decode is invalid_request",
)
async def bad_image(ctx: CaseContext) -> None:
    request = image_to_image(ctx, "j1-badimage", image=b"not an image at all")
    await refused(ctx, request, "invalid_request")


@cases.case(
    "J1-image-to-image-no-steps",
    "J1",
    title="num_inference_steps x strength below 1 is invalid_request",
)
async def no_steps(ctx: CaseContext) -> None:
    request = image_to_image(ctx, "j1-nosteps", num_inference_steps=2, strength=0.25)
    await refused(ctx, request, "invalid_request")


@cases.case(
    "J1-no-capacity",
    "J1",
    title="with every slot of the model busy, a job is no_capacity",
)
async def no_capacity(ctx: CaseContext) -> str:
    cap = ctx.capability
    free = cap.capacity - cap.in_use
    if free > 16:
        raise CaseSkipped(f"{free} free slots: too many to fill")
    holders: list[Wire] = []
    for i in range(max(0, free)):
        wire, _ = await ctx.ready()
        reply_request = ctx.request(f"j1-hold-{i}", steps=50)
        await wire.send(reply_request)
        reply = await wire.recv()
        if isinstance(reply, Error) and reply.code == "no_capacity":
            break  # someone else holds a slot: the refusal came sooner
        check(isinstance(reply, JobAccepted), f"filling the slots: job refused with {reply}")
        holders.append(wire)
    await refused(ctx, ctx.request("j1-capacity"), "no_capacity")
    return f"capacity {cap.capacity}, {len(holders)} slots filled by the suite"


@cases.case("P1-quote-follows-6.1", "P1", title="the quote's fee is W x H x I x S x price")
async def quote_fee(ctx: CaseContext) -> str:
    wire, _ = await ctx.ready()
    request = ctx.request("p1", steps=5, every=2, num_images_per_prompt=2)
    accepted = await ctx.start(wire, request)
    size = ctx.options.size
    pixels = size * size * 2
    check(
        accepted.price_per_pixel_step == ctx.price,
        f"quoted price {accepted.price_per_pixel_step} is not the advertised {ctx.price}",
    )
    check(
        accepted.pixels_per_step == pixels,
        f"pixels_per_step {accepted.pixels_per_step}, not {size}x{size}x2 = {pixels}",
    )
    want = pixels * accepted.steps * ctx.price
    check(
        accepted.fee == want,
        f"fee {accepted.fee} is not {pixels} x {accepted.steps} steps x {ctx.price} = {want}"
        f" (off by {accepted.fee - want} wei)",
    )
    check(accepted.window_steps == 2, f"window_steps {accepted.window_steps}, asked 2")
    check(accepted.steps >= 1, "the quote runs no step")
    return f"{accepted.steps} steps quoted for 5 asked, fee {accepted.fee} wei"


def tiny_png(width: int = 64, height: int = 64) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 80, 40)).save(out, format="PNG")
    return out.getvalue()


def previews(seen: list[Message]) -> list[Preview]:
    return [m for m in seen if isinstance(m, Preview)]


@cases.case(
    "J2-preview-every-n-steps",
    "J2",
    title="a preview after every N-th step and the last, each before its progress",
)
async def preview_count(ctx: CaseContext) -> str:
    wire, _ = await ctx.ready()
    request = ctx.request("j2", steps=5, every=2)
    accepted, seen = await ctx.run_job(wire, request)
    check(isinstance(seen[-1], Result), f"the job ended with {seen[-1].TYPE}")
    s, n = accepted.steps, 2
    want = sorted({*range(n, s + 1, n), s})
    got = [p.step for p in previews(seen)]
    check(
        got == want, f"previews after steps {got}, want {want} (ceil({s}/{n}) = {math.ceil(s / n)})"
    )
    for p in previews(seen):
        index = seen.index(p)
        later = [m for m in seen[index:] if isinstance(m, Progress)]
        check(
            bool(later) and later[0].step == p.step,
            f"the preview of step {p.step} does not come before that step's progress",
        )
    return f"{len(got)} previews for {s} steps"


@cases.case("J2-no-previews-with-method-none", "J2", title="preview_method none sends no preview")
async def preview_none(ctx: CaseContext) -> None:
    wire, _ = await ctx.ready()
    _, seen = await ctx.run_job(
        wire, ctx.request("j2-none", steps=3, every=1, preview_method="none")
    )
    check(isinstance(seen[-1], Result), f"the job ended with {seen[-1].TYPE}")
    check(not previews(seen), f"{len(previews(seen))} previews with preview_method none")


@cases.case("J3-result-images", "J3", title="one PNG per image at the requested size")
async def result_images(ctx: CaseContext) -> str:
    wire, _ = await ctx.ready()
    request = ctx.request("j3", steps=2, every=2, num_images_per_prompt=2)
    accepted, seen = await ctx.run_job(wire, request)
    result = seen[-1]
    check(isinstance(result, Result), f"the job ended with {result.TYPE}")
    assert isinstance(result, Result)
    size = ctx.options.size
    check(len(result.images) == 2, f"{len(result.images)} images for 2 asked")
    for i, image in enumerate(result.images):
        check(png_size(image.image) == (size, size), f"image {i} is not a {size}x{size} PNG")
    check(result.steps == accepted.steps, f"result.steps {result.steps} != {accepted.steps}")
    fee = ctx.step_fee(request) * result.steps
    check(
        result.fee == fee, f"result.fee {result.fee} is not the fee of {result.steps} steps, {fee}"
    )
    seeds = [image.seed for image in result.images]
    return f"seeds {seeds}"


@cases.case(
    "J4-fallback-method-named",
    "J4",
    title="a preview made by another method than asked names it",
)
async def fallback(ctx: CaseContext) -> Info:
    wire, _ = await ctx.ready()
    _, seen = await ctx.run_job(wire, ctx.request("j4", steps=2, every=1, preview_method="taesd"))
    methods = {p.method for p in previews(seen)}
    check(bool(previews(seen)), "no preview")
    check(methods <= {None, "latent_rgb", "taesd", "vae"}, f"unknown methods {methods}")
    check(len(methods) == 1, f"previews of one job name different methods: {methods}")
    (method,) = methods
    return Info("made with taesd" if method in (None, "taesd") else f"fell back to {method}")


@cases.case(
    "J5-video-result",
    "J5",
    "V2",
    title="a video result carries num_frames PNG frames in order (no result_frame unasked)",
)
async def video(ctx: CaseContext) -> str:
    cap = offer(ctx, "image-to-video")
    wire, _ = await ctx.ready()
    request = video_request("j5", cap.model_id)
    accepted = await ctx.start(wire, request)
    f = cap.price_per_pixel_step * 64 * 64 * 2
    count = max(1, ctx.tickets_for(accepted, f, 2, accepted.credit))
    await wire.send(ctx.pay("j5", accepted.ticket_params, count))
    seen = await wire.recv_until(job_ended, timeout=ctx.options.timeout * 4)
    result = seen[-1]
    check(isinstance(result, Result), f"the job ended with {result.TYPE}")
    assert isinstance(result, Result)
    check(not result.images and len(result.frames) == 2, "a video result needs 2 frames, no images")
    check(result.fps == 3, f"fps {result.fps}, asked 3")
    for frame in result.frames:
        check(png_size(frame.image) == (64, 64), "a frame is not a 64x64 PNG")
    return f"{len(result.frames)} frames"


def video_request(job_id: str, model_id: str) -> JobRequest:
    from protocol.messages import ImageToVideoParams

    params = ImageToVideoParams(
        image=tiny_png(), width=64, height=64, fps=3, num_inference_steps=2, num_frames=2, seed=3
    )
    return JobRequest(job_id, "image-to-video", model_id, params, preview_every=2)


@cases.case(
    "J9-video-frames-streamed-in-order",
    "J9",
    "V2",
    title="a broadcaster that lists result_frames gets each frame ahead of the result, in order",
)
async def streamed_video(ctx: CaseContext) -> str:
    from protocol.messages import ResultFrame

    cap = offer(ctx, "image-to-video")
    # V2: a name the node does not know is ignored, not refused.
    wire, _ = await ctx.ready(features=("result_frames", "no-such-feature-v0"))
    request = video_request("j9", cap.model_id)
    accepted = await ctx.start(wire, request)
    f = cap.price_per_pixel_step * 64 * 64 * 2
    count = max(1, ctx.tickets_for(accepted, f, 2, accepted.credit))
    await wire.send(ctx.pay("j9", accepted.ticket_params, count))
    seen = await wire.recv_until(job_ended, timeout=ctx.options.timeout * 4)
    result = seen[-1]
    check(isinstance(result, Result), f"the job ended with {result.TYPE}")
    assert isinstance(result, Result)
    frames = [m for m in seen if isinstance(m, ResultFrame)]
    check(
        [m.index for m in frames] == [0, 1],
        f"result_frame indexes {[m.index for m in frames]}, not [0, 1]",
    )
    check(not result.frames and result.streamed_frames == 2, "the result must count 2 streamed")
    for message in frames:
        check(png_size(message.frame.image) == (64, 64), "a frame is not a 64x64 PNG")
    return "2 frames streamed; an unknown feature name was ignored"
