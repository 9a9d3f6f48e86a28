"""Framing and decoding (spec 3): error codes and their order, close codes, encodings."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import msgpack

from conformance.context import CaseContext, job_ended
from conformance.registry import Registry
from conformance.verdicts import CaseFailed, CaseSkipped, check
from protocol import codec
from protocol.fields import Added
from protocol.messages import (
    MESSAGE_TYPES,
    Cancel,
    Error,
    Hello,
    Info,
    JobAccepted,
    JobRequest,
    Message,
    OtherParams,
)

cases = Registry()


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


async def fatal(ctx: CaseContext, frames: list[bytes | str], code: str, *, hello: bool = False):
    """Send `frames` on a fresh connection (after hello/info when `hello`); the reply must be
    the fatal `error` `code` without a job_id (spec F1). Returns the wire."""
    wire = await ctx.connect()
    if hello:
        await wire.hello()
    for frame in frames:
        await wire.send_raw(frame)
    await wire.expect_fatal(code, timeout=ctx.fatal_wait)
    return wire


def hello_map(ctx: CaseContext, **changes: Any) -> dict[str, Any]:
    return {"v": 1, "type": "hello", "sender": ctx.sender.address_bytes, **changes}


@cases.case("F1-text-frame", "F1", title="a text frame is malformed_frame (3.1)")
async def text_frame(ctx: CaseContext) -> None:
    await fatal(ctx, ['{"v": 1, "type": "hello"}'], "malformed_frame")


@cases.case("F1-not-msgpack", "F1", title="bytes that are not msgpack are malformed_frame")
async def not_msgpack(ctx: CaseContext) -> None:
    await fatal(ctx, [b"\xc1\x00\x01"], "malformed_frame")


@cases.case("F1-two-values", "F1", title="two msgpack values in one frame are malformed_frame")
async def two_values(ctx: CaseContext) -> None:
    frame = pack(hello_map(ctx)) + pack(hello_map(ctx))
    await fatal(ctx, [frame], "malformed_frame")


@cases.case("F1-not-a-map", "F1", title="a msgpack value that is not a map is malformed_frame")
async def not_a_map(ctx: CaseContext) -> None:
    await fatal(ctx, [pack([1, "hello"])], "malformed_frame")


@cases.case("F1-extension-type", "F1", title="a msgpack extension type anywhere is malformed_frame")
async def extension_type(ctx: CaseContext) -> None:
    frame = pack(hello_map(ctx, agent=msgpack.ExtType(5, b"future")))
    await fatal(ctx, [frame], "malformed_frame")


@cases.case(
    "F1-timestamp-extension", "F1", title="msgpack's Timestamp extension is malformed_frame"
)
async def timestamp(ctx: CaseContext) -> None:
    frame = pack(hello_map(ctx, agent=msgpack.Timestamp(1, 0)))
    await fatal(ctx, [frame], "malformed_frame")


@cases.case("F1-v-missing", "F1", title="a frame without v is malformed_frame")
async def v_missing(ctx: CaseContext) -> None:
    raw = hello_map(ctx)
    del raw["v"]
    await fatal(ctx, [pack(raw)], "malformed_frame")


@cases.case("F1-v-not-an-integer", "F1", title="a v that is not an integer is malformed_frame")
async def v_not_int(ctx: CaseContext) -> None:
    await fatal(ctx, [pack(hello_map(ctx, v="1"))], "malformed_frame")


@cases.case("F1-unsupported-version", "F1", title="v = 2 is unsupported_version")
async def unsupported_version(ctx: CaseContext) -> None:
    await fatal(ctx, [pack(hello_map(ctx, v=2))], "unsupported_version")


@cases.case("F1-unknown-message-type", "F1", title="an unknown type is unknown_message_type")
async def unknown_type(ctx: CaseContext) -> None:
    await fatal(ctx, [pack(hello_map(ctx, type="launch"))], "unknown_message_type")


@cases.case("F1-missing-field", "F1", title="a required field missing is invalid_field")
async def missing_field(ctx: CaseContext) -> None:
    raw = hello_map(ctx)
    del raw["sender"]
    await fatal(ctx, [pack(raw)], "invalid_field")


@cases.case("F1-field-out-of-range", "F1", title="an Address of 19 bytes is invalid_field")
async def field_range(ctx: CaseContext) -> None:
    await fatal(ctx, [pack(hello_map(ctx, sender=bytes(19)))], "invalid_field")


@cases.case("F1-field-wrong-type", "F1", title="a bool sent as 0/1 is invalid_field")
async def field_type(ctx: CaseContext) -> None:
    wire = await ctx.connect()
    await wire.hello()
    job = pack_job(ctx, "f1-type", want_latents=1)
    await wire.send_raw(job)
    await wire.expect_fatal("invalid_field", timeout=ctx.fatal_wait)


@cases.case(
    "F1-frame-too-large", "F1", title="a frame over max_frame_bytes is frame_too_large, unparsed"
)
async def too_large(ctx: CaseContext) -> None:
    # Not msgpack either: the size check comes first (3.2 check 1).
    await fatal(ctx, [oversized(ctx)], "frame_too_large", hello=True)


MAX_SENT_FRAME = 64 << 20
"""The largest frame the suite sends: a node advertising more is not sent one over its cap."""


def oversized(ctx: CaseContext) -> bytes:
    cap = ctx.info.max_frame_bytes
    if cap >= MAX_SENT_FRAME:
        raise CaseSkipped(f"max_frame_bytes is {cap}: the suite sends at most {MAX_SENT_FRAME}")
    return b"\xc1" * (cap + 1)


@cases.case(
    "F1-order-version-before-type", "F1", title="bad v and unknown type: unsupported_version"
)
async def order_version(ctx: CaseContext) -> None:
    await fatal(ctx, [pack(hello_map(ctx, v=2, type="launch"))], "unsupported_version")


@cases.case(
    "F1-order-type-before-fields", "F1", title="unknown type and bad fields: unknown_message_type"
)
async def order_type(ctx: CaseContext) -> None:
    await fatal(ctx, [pack(hello_map(ctx, type="launch", sender=5))], "unknown_message_type")


@cases.case(
    "F1-order-fields-before-state",
    "F1",
    title="a bad field in a message not allowed now: invalid_field, not unexpected_message",
)
async def order_state(ctx: CaseContext) -> None:
    frame = pack({"v": 1, "type": "cancel", "job_id": 7})
    await fatal(ctx, [frame], "invalid_field")


@cases.case("F2-unknown-keys-ignored", "F2", title="keys a receiver does not know are ignored")
async def unknown_keys(ctx: CaseContext) -> None:
    wire = await ctx.connect()
    hello = Hello(sender=ctx.sender.address_bytes)
    await wire.send_raw(pack(hello_map(ctx, **{"x-future-field": [1, 2]})), counts_as=hello)
    info = await wire.recv()
    check(isinstance(info, Info), f"hello with an unknown key got {info.TYPE}, not info")
    request = ctx.request("f2-job", steps=2, every=1)
    await wire.send_raw(pack_job(ctx, "f2-job", **{"x-future-field": True}), counts_as=request)
    reply = await wire.recv()
    check(isinstance(reply, JobAccepted), f"a job with an unknown key got {reply.TYPE}")


async def fatal_then_close(ctx: CaseContext, frames: list, code: str, close: int, hello: bool):
    wire = await fatal(ctx, frames, code, hello=hello)
    got = await wire.expect_close(timeout=ctx.fatal_wait)
    check(got == close, f"closed with {got}, not {close}, after {code}")


@cases.case(
    "F3-close-1002-after-malformed-frame", "F3", title="a fatal frame error closes with 1002"
)
async def close_malformed(ctx: CaseContext) -> None:
    await fatal_then_close(ctx, [b"\xc1"], "malformed_frame", 1002, hello=False)


@cases.case("F3-close-1009-after-frame-too-large", "F3", title="frame_too_large closes with 1009")
async def close_too_large(ctx: CaseContext) -> None:
    await fatal_then_close(ctx, [oversized(ctx)], "frame_too_large", 1009, hello=True)


@cases.case("F3-close-1002-after-unexpected-message", "F3", title="a state error closes with 1002")
async def close_unexpected(ctx: CaseContext) -> None:
    hello = pack(hello_map(ctx))
    await fatal_then_close(ctx, [hello, hello], "unexpected_message", 1002, hello=False)


def pack_job(ctx: CaseContext, job_id: str, **extra: Any) -> bytes:
    request = ctx.request(job_id, steps=2, every=1)
    raw = msgpack.unpackb(codec.encode(request), raw=False)
    return pack({**raw, **extra})


@cases.case(
    "F5-params-decoded-by-pipeline",
    "F5",
    title="text-to-image params are TextToImageParams: a string width is invalid_field",
)
async def params_structure(ctx: CaseContext) -> None:
    raw = msgpack.unpackb(pack_job(ctx, "f5"), raw=False)
    raw["params"]["width"] = str(raw["params"]["width"])
    await fatal(ctx, [pack(raw)], "invalid_field", hello=True)


@cases.case(
    "F5-unknown-pipeline-refused-as-a-job",
    "F5",
    "J1",
    title="params of an unknown pipeline are not checked: the job is unsupported_pipeline",
)
async def unknown_pipeline(ctx: CaseContext) -> None:
    wire, _ = await ctx.ready()
    raw = msgpack.unpackb(pack_job(ctx, "f5-other"), raw=False)
    raw.update(pipeline="conformance-upscale", params={"scale": 4, "anything": [None]})
    request = JobRequest(
        job_id="f5-other",
        pipeline="conformance-upscale",
        model_id=ctx.capability.model_id,
        params=OtherParams(),
    )
    await wire.send_raw(pack(raw), counts_as=request)
    reply = await wire.recv()
    check(
        isinstance(reply, Error) and reply.job_id == "f5-other",
        f"expected a job-level error, got {reply.TYPE}",
    )
    assert isinstance(reply, Error)
    check(reply.code == "unsupported_pipeline", f"got {reply.code}, not unsupported_pipeline")


@cases.case(
    "F7-canonical-frames", "F7", title="every frame of a job is its canonical encoding (3.2.1)"
)
async def canonical(ctx: CaseContext) -> str:
    wire, _ = await ctx.ready()
    await ctx.run_job(wire, ctx.request("f7", steps=2, every=1))
    for frame in wire.frames:
        message = codec.decode(frame)
        again = codec.encode(message)
        if again != frame:
            raise CaseFailed(
                f"{message.TYPE} is not canonical: got {frame[:80].hex()}..., "
                f"canonical {again[:80].hex()}..."
            )
    return f"{len(wire.frames)} frames"


def _uint64(value: int) -> bytes:
    return b"\xcf" + value.to_bytes(8, "big")


def _map(items: list[tuple[str, bytes]]) -> bytes:
    """A msgpack map from already-packed values, in the order given."""
    assert len(items) < 16
    return bytes([0x80 | len(items)]) + b"".join(pack(k) + v for k, v in items)


@cases.case(
    "F8-non-canonical-frames-accepted",
    "F8",
    title="fields in another order, nil and long integers are accepted",
)
async def non_canonical(ctx: CaseContext) -> None:
    wire = await ctx.connect()
    hello = _map(
        [("sender", pack(ctx.sender.address_bytes)), ("type", pack("hello")), ("v", _uint64(1))]
    )
    await wire.send_raw(hello, counts_as=Hello(sender=ctx.sender.address_bytes))
    info = await wire.recv()
    check(isinstance(info, Info), f"a reordered hello got {info.TYPE}")
    request = ctx.request("f8", steps=2, every=1)
    params = msgpack.unpackb(codec.encode(request), raw=False)["params"]
    params_items = [(k, pack(v)) for k, v in reversed(params.items())]
    params_items.append(("seed", pack(None)))
    params_items = [(k, v) for k, v in params_items if k != "num_inference_steps"]
    params_items.append(("num_inference_steps", _uint64(2)))
    job = _map(
        [
            ("preview_frame", pack(None)),
            ("params", _map(params_items)),
            ("preview_every", _uint64(1)),
            ("model_id", pack(request.model_id)),
            ("pipeline", pack(request.pipeline)),
            ("job_id", pack("f8")),
            ("type", pack("job")),
            ("v", _uint64(1)),
        ]
    )
    await wire.send_raw(job, counts_as=request)
    reply = await wire.recv()
    check(isinstance(reply, JobAccepted), f"a non-canonical job got {_what(reply)}")
    await wire.send(Cancel(job_id="f8"))
    await wire.recv_until(job_ended)


def _what(message: Message) -> str:
    return f"error {message.code}" if isinstance(message, Error) else message.TYPE


def added_fields_present(raw: Any, cls: type) -> list[str]:
    """Fields added by a minor revision that hold their default yet are in the frame (V1)."""
    if not isinstance(raw, dict) or not dataclasses.is_dataclass(cls):
        return []
    hints = typing.get_type_hints(cls, include_extras=True)
    found = []
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        hint = hints[f.name]
        added = any(isinstance(m, Added) for m in getattr(hint, "__metadata__", ()))
        if added and raw[f.name] == f.default:
            found.append(f"{cls.__name__}.{f.name}")
        inner = _struct_of(hint)
        if inner is not None:
            values = raw[f.name] if isinstance(raw[f.name], list) else [raw[f.name]]
            for value in values:
                found += added_fields_present(value, inner)
    return found


def _struct_of(hint: Any) -> type | None:
    for arg in [hint, *typing.get_args(hint)]:
        if dataclasses.is_dataclass(arg):
            return arg  # type: ignore[return-value]
        for inner in typing.get_args(arg):
            if dataclasses.is_dataclass(inner):
                return inner  # type: ignore[return-value]
    return None


@cases.case(
    "V1-added-fields-left-out",
    "V1",
    title="fields a minor revision added are left out while they hold their default",
)
async def added_left_out(ctx: CaseContext) -> str:
    wire, _ = await ctx.ready()
    await ctx.run_job(wire, ctx.request("v1", steps=2, every=1))
    present = []
    for frame in wire.frames:
        raw = msgpack.unpackb(frame, raw=False)
        present += added_fields_present(raw, MESSAGE_TYPES[raw["type"]])
    check(not present, f"sent at their default: {sorted(set(present))}")
    return f"{len(wire.frames)} frames"
