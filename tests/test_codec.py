"""Tests of protocol.codec: round trips of every message and each decode error, by code."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import typing
from fractions import Fraction
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import codec
from protocol.errors import ErrorCode, ProtocolError
from protocol.fields import UINT32_MAX, UINT64_MAX, Added
from protocol.messages import (
    MAX_PREVIEW_BYTES,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    AwaitingPayment,
    Cancel,
    Cancelled,
    Capability,
    Credit,
    Device,
    Error,
    Hello,
    Info,
    InfoRequest,
    JobAccepted,
    JobRequest,
    Message,
    Payment,
    Preview,
    Progress,
    Queued,
    Result,
    ResultFrame,
    ResultImage,
    SignedTicket,
    Status,
    TextToImageParams,
    TicketParams,
)

U256_MAX = 2**256 - 1
ADDR = bytes(range(1, 21))
HASH = bytes(range(32))

PARAMS = TicketParams(
    recipient=ADDR,
    face_value=U256_MAX,
    win_prob=2**255 + 1,
    recipient_rand_hash=HASH,
    seed=bytes(reversed(HASH)),
    expiration_block=UINT64_MAX,
    creation_round=7,
    creation_round_block_hash=b"\xab" * 32,
)
PROMPT = TextToImageParams(
    prompt="a lighthouse at dusk, 35mm",
    negative_prompt="blurry",
    width=512,
    height=768,
    guidance_scale=4.25,
    num_inference_steps=30,
    seed=UINT32_MAX,
    num_images_per_prompt=2,
)

SAMPLES: list[Message] = [
    Hello(sender=ADDR, agent="stepstream-test/1"),
    Hello(sender=bytes(20)),
    Info(
        orchestrator=ADDR,
        capabilities=(
            Capability(
                pipeline="text-to-image",
                model_id="stabilityai/sd-turbo",
                warm=True,
                capacity=4,
                in_use=1,
                price_per_pixel_step=Fraction(4_768_371, 13_107_200),
            ),
            Capability(
                pipeline="text-to-image",
                model_id="ümlaut/模型",
                warm=False,
                capacity=0,
                in_use=0,
                price_per_pixel_step=Fraction(U256_MAX, 1),
            ),
        ),
        ticket_params=PARAMS,
        max_frame_bytes=UINT32_MAX,
        agent="orch",
    ),
    Info(
        orchestrator=ADDR,
        capabilities=(),
        ticket_params=dataclasses.replace(PARAMS, face_value=0, win_prob=0),
        max_frame_bytes=0,
    ),
    JobRequest(job_id="job-1", pipeline="text-to-image", model_id="m", params=PROMPT),
    JobRequest(
        job_id="j" * 64,
        pipeline="text-to-image",
        model_id="m" * 256,
        params=TextToImageParams(prompt="p"),
        preview_every=1000,
        preview_method="taesd",
        preview_format="png",
    ),
    JobAccepted(
        job_id="job-1",
        steps=30,
        pixels_per_step=512 * 768 * 2,
        price_per_pixel_step=Fraction(1, 3),
        fee=Fraction(512 * 768 * 2 * 30, 3),
        window_steps=5,
        seed=0,
        ticket_params=PARAMS,
    ),
    Payment(
        job_id="job-1",
        sender=ADDR,
        ticket_params=PARAMS,
        tickets=(
            SignedTicket(sender_nonce=1, sig=b"\x01" * 65),
            SignedTicket(sender_nonce=UINT32_MAX, sig=b"\xff" * 65),
        ),
    ),
    Credit(
        job_id="job-1", credit=Fraction(10**40, 7), covered_steps=10, tickets_accepted=2, winners=0
    ),
    Progress(job_id="job-1", step=3, total_steps=30, covered_steps=10),
    AwaitingPayment(job_id="job-1", next_step=11, covered_steps=10, timeout_ms=30_000),
    Preview(job_id="job-1", step=3, image=b"RIFF\x00\x00WEBP", format="webp", width=64, height=96),
    Result(
        job_id="job-1",
        images=(
            ResultImage(image=b"\x89PNG" * 10, format="png", width=512, height=768, seed=1),
            ResultImage(image=b"x", format="png", width=512, height=768, seed=2, nsfw=True),
        ),
        steps=30,
        pixel_steps=UINT64_MAX,
        fee=Fraction(0),
    ),
    Cancel(job_id="job-1"),
    Cancelled(job_id="job-1", steps=0),
    Error(code="no_capacity", message="busy", job_id="job-1"),
    Error(code="malformed_frame", message=""),
    ResultFrame(
        job_id="job-1",
        index=24,
        frame=ResultImage(image=b"\x89PNG", format="png", width=1024, height=576, seed=3),
    ),
    Status(job_id="job-1", phase="decoding", next_within_ms=2000),
    InfoRequest(),
    Queued(job_id="job-1", position=3, estimated_start_ms=12_500, next_within_ms=4000),
    Info(
        orchestrator=ADDR,
        capabilities=(
            Capability(
                pipeline="text-to-image",
                model_id="m",
                warm=True,
                capacity=2,
                in_use=2,
                price_per_pixel_step=Fraction(1, 3),
                queued=1,
                step_seconds=0.031,
                step_pixels=1024 * 1024,
            ),
        ),
        ticket_params=PARAMS,
        max_frame_bytes=1 << 20,
        devices=(
            Device(
                name="cuda:0", gpu="NVIDIA H100", vram_total=80 << 30, vram_free=1, models=("m",)
            ),
            Device(name="cpu", gpu="cpu"),
        ),
        features=("info_request",),
    ),
]


def _raw(**fields: Any) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


def _frame_of(msg: Message, /, **changes: Any) -> bytes:
    """The message's frame as a map, with keys replaced (or removed when the value is ...)."""
    raw = msgpack.unpackb(codec.encode(msg), raw=False)
    for key, value in changes.items():
        if value is ...:
            del raw[key]
        else:
            raw[key] = value
    return msgpack.packb(raw, use_bin_type=True)


def _decode_error(frame: bytes, max_frame_bytes: int = codec.DEFAULT_MAX_FRAME_BYTES) -> Any:
    with pytest.raises(ProtocolError) as info:
        codec.decode(frame, max_frame_bytes)
    return info.value


# --------------------------------------------------------------------- round trips


def test_samples_cover_every_message_type() -> None:
    assert {type(m).TYPE for m in SAMPLES} == set(MESSAGE_TYPES)


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: m.TYPE)
def test_round_trip(message: Message) -> None:
    frame = codec.encode(message)
    decoded = codec.decode(frame)
    assert decoded == message
    assert type(decoded) is type(message)
    assert codec.encode(decoded) == frame


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: m.TYPE)
def test_frame_layout(message: Message) -> None:
    raw = msgpack.unpackb(codec.encode(message), raw=False)
    assert raw["v"] == PROTOCOL_VERSION
    assert raw["type"] == message.TYPE
    # Fields of a minor revision (fields.Added) are left out while at their default.
    hints = typing.get_type_hints(type(message), include_extras=True)
    expected = {
        f.name
        for f in dataclasses.fields(message)
        if not any(isinstance(m, Added) for m in getattr(hints[f.name], "__metadata__", ()))
        or getattr(message, f.name) != f.default
    }
    assert set(raw) == {"v", "type"} | expected


def test_u256_and_fraction_wire_form() -> None:
    raw = msgpack.unpackb(codec.encode(SAMPLES[2]), raw=False)
    assert raw["ticket_params"]["face_value"] == b"\xff" * 32
    assert raw["ticket_params"]["win_prob"] == (2**255 + 1).to_bytes(32, "big")
    # Fractions are [num, den], each the shortest unsigned big-endian bytes (spec 2).
    price = raw["capabilities"][0]["price_per_pixel_step"]
    assert price == [(4_768_371).to_bytes(3, "big"), (13_107_200).to_bytes(3, "big")]
    assert raw["capabilities"][1]["price_per_pixel_step"] == [b"\xff" * 32, b"\x01"]
    zero = msgpack.unpackb(codec.encode(RESULT), raw=False)["fee"]
    assert zero == [b"\x00", b"\x01"]


def test_fraction_parts_up_to_64_bytes() -> None:
    """Sums of ticket EVs outgrow a uint256, so parts may be up to 512 bits."""
    big = Credit(
        job_id="j",
        credit=Fraction(2**512 - 1, 2**512 - 3),
        covered_steps=1,
        tickets_accepted=1,
        winners=0,
    )
    raw = msgpack.unpackb(codec.encode(big), raw=False)
    assert [len(part) for part in raw["credit"]] == [64, 64]
    assert codec.decode(codec.encode(big)) == big
    for bad in (Fraction(2**512), Fraction(1, 2**512), Fraction(-1, 3)):
        with pytest.raises(ValueError):
            codec.encode(dataclasses.replace(big, credit=bad))


def test_check_reports_what_the_peer_would_answer() -> None:
    codec.check(SAMPLES[0])
    with pytest.raises(ProtocolError) as info:
        codec.check(Hello(sender=b"short"))
    assert info.value.code is ErrorCode.INVALID_FIELD
    assert info.value.message.startswith("hello.sender:")


def test_optional_none_and_defaults() -> None:
    message = JobRequest(
        job_id="j", pipeline="text-to-image", model_id="m", params=TextToImageParams("x")
    )
    raw = msgpack.unpackb(codec.encode(message), raw=False)
    assert raw["params"]["seed"] is None
    assert codec.decode(codec.encode(message)) == message
    # Optional and defaulted fields may be left out entirely.
    del raw["params"]["seed"], raw["params"]["width"], raw["preview_every"]
    assert codec.decode(msgpack.packb(raw, use_bin_type=True)) == message
    error = codec.decode(_raw(v=1, type="error", code="c", message="m"))
    assert error == Error(code="c", message="m", job_id=None)


def test_guidance_scale_int_accepted_as_float() -> None:
    decoded = codec.decode(_frame_of(JOB, params={**JOB_PARAMS, "guidance_scale": 7}))
    assert isinstance(decoded, JobRequest)
    assert decoded.params.guidance_scale == 7.0
    assert type(decoded.params.guidance_scale) is float


def test_unknown_keys_ignored() -> None:
    frame = _frame_of(Cancel("j"), future_field=[1, {"a": b"b"}], another=None)
    assert codec.decode(frame) == Cancel("j")


def test_fraction_is_normalised() -> None:
    frame = _raw(
        v=1,
        type="credit",
        job_id="j",
        credit=[(6).to_bytes(32, "big"), b"\x00\x04"],  # leading zeros are tolerated
        covered_steps=1,
        tickets_accepted=1,
        winners=0,
    )
    decoded = codec.decode(frame)
    assert isinstance(decoded, Credit)
    assert decoded.credit == Fraction(3, 2)


# --------------------------------------------------------------------- decode errors


def test_frame_too_large_checked_first() -> None:
    frame = codec.encode(SAMPLES[0])
    assert codec.decode(frame, max_frame_bytes=len(frame)) == SAMPLES[0]
    err = _decode_error(frame, max_frame_bytes=len(frame) - 1)
    assert err.code is ErrorCode.FRAME_TOO_LARGE
    # Size is checked before parsing: even garbage gets FRAME_TOO_LARGE.
    assert _decode_error(b"\xc1" * 10, max_frame_bytes=9).code is ErrorCode.FRAME_TOO_LARGE


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\xc1", id="reserved-byte"),
        pytest.param(b"\x81\xa1v", id="truncated-map"),
        pytest.param(msgpack.packb([1, "hello"]), id="list"),
        pytest.param(msgpack.packb(1), id="int"),
        pytest.param(msgpack.packb("hello"), id="str"),
        pytest.param(msgpack.packb(None), id="nil"),
        pytest.param(_raw(type="cancel", job_id="j"), id="missing-v"),
        pytest.param(_raw(v="1", type="cancel", job_id="j"), id="string-v"),
        pytest.param(_raw(v=True, type="cancel", job_id="j"), id="bool-v"),
        pytest.param(_raw(v=1.0, type="cancel", job_id="j"), id="float-v"),
        pytest.param(codec.encode(Cancel("j")) + b"\x00", id="trailing-byte"),
        pytest.param(codec.encode(Cancel("j")) * 2, id="two-frames"),
        pytest.param(
            msgpack.packb({"v": 1, "type": "cancel", "job_id": "j", "x": msgpack.ExtType(5, b"")}),
            id="ext-type",
        ),
        pytest.param(
            msgpack.packb({"v": 1, "type": "cancel", "job_id": msgpack.ExtType(1, b"j")}),
            id="ext-in-field",
        ),
        pytest.param(msgpack.packb({1: 1, "v": 1, "type": "cancel"}), id="int-key"),
        pytest.param(b"\x83\xa1v\x01\xa4type\xa6cancel\xa6job_id\xa2\xff\xfe", id="bad-utf8"),
    ],
)
def test_malformed_frame(frame: bytes) -> None:
    assert _decode_error(frame).code is ErrorCode.MALFORMED_FRAME


@pytest.mark.parametrize("version", [0, 2, -1, 255, UINT64_MAX])
def test_unsupported_version(version: int) -> None:
    err = _decode_error(_raw(v=version, type="cancel", job_id="j"))
    assert err.code is ErrorCode.UNSUPPORTED_VERSION
    assert str(version) in err.message


def test_version_checked_before_type() -> None:
    assert _decode_error(_raw(v=2, type="nope")).code is ErrorCode.UNSUPPORTED_VERSION


@pytest.mark.parametrize("name", ["nope", "", "Hello", None, 5, b"hello", ["hello"]])
def test_unknown_message_type(name: Any) -> None:
    frame = msgpack.packb({"v": 1, "type": name}, use_bin_type=True)
    assert _decode_error(frame).code is ErrorCode.UNKNOWN_MESSAGE_TYPE


def test_missing_type() -> None:
    assert _decode_error(_raw(v=1)).code is ErrorCode.UNKNOWN_MESSAGE_TYPE


HELLO = Hello(sender=ADDR)
PROGRESS = Progress(job_id="j", step=1, total_steps=2, covered_steps=1)
JOB = JobRequest(job_id="j", pipeline="text-to-image", model_id="m", params=PROMPT)
JOB_PARAMS = msgpack.unpackb(codec.encode(JOB), raw=False)["params"]
ACCEPTED = SAMPLES[6]
ACCEPTED_RAW = msgpack.unpackb(codec.encode(ACCEPTED), raw=False)
PAYMENT = SAMPLES[7]
PAYMENT_RAW = msgpack.unpackb(codec.encode(PAYMENT), raw=False)
RESULT = SAMPLES[12]
RESULT_RAW = msgpack.unpackb(codec.encode(RESULT), raw=False)


def _u(n: int) -> bytes:
    return n.to_bytes(32, "big")


@pytest.mark.parametrize(
    ("frame", "path"),
    [
        pytest.param(_frame_of(PROGRESS, step="1"), "progress.step", id="str-for-int"),
        pytest.param(_frame_of(PROGRESS, step=True), "progress.step", id="bool-for-int"),
        pytest.param(_frame_of(PROGRESS, step=1.0), "progress.step", id="float-for-int"),
        pytest.param(_frame_of(PROGRESS, step=None), "progress.step", id="nil-for-int"),
        pytest.param(_frame_of(PROGRESS, step=-1), "progress.step", id="negative-uint32"),
        pytest.param(_frame_of(PROGRESS, step=UINT32_MAX + 1), "progress.step", id="uint32-over"),
        pytest.param(_frame_of(PROGRESS, step=...), "progress.step", id="missing-required"),
        pytest.param(_frame_of(PROGRESS, job_id=""), "progress.job_id", id="str-too-short"),
        pytest.param(_frame_of(PROGRESS, job_id="j" * 65), "progress.job_id", id="str-too-long"),
        pytest.param(_frame_of(PROGRESS, job_id=b"j"), "progress.job_id", id="bin-for-str"),
        pytest.param(_frame_of(HELLO, sender=bytes(19)), "hello.sender", id="bin-too-short"),
        pytest.param(_frame_of(HELLO, sender=bytes(21)), "hello.sender", id="bin-too-long"),
        pytest.param(_frame_of(HELLO, sender="0x" + "00" * 20), "hello.sender", id="str-for-bin"),
        pytest.param(_frame_of(HELLO, agent="a" * 129), "hello.agent", id="agent-too-long"),
        pytest.param(
            _frame_of(JOB, params={**JOB_PARAMS, "guidance_scale": math.nan}),
            "job.params.guidance_scale",
            id="nan-float",
        ),
        pytest.param(
            _frame_of(JOB, params={**JOB_PARAMS, "guidance_scale": math.inf}),
            "job.params.guidance_scale",
            id="inf-float",
        ),
        pytest.param(
            _frame_of(JOB, params={**JOB_PARAMS, "guidance_scale": 50.001}),
            "job.params.guidance_scale",
            id="float-over",
        ),
        pytest.param(
            _frame_of(JOB, params={**JOB_PARAMS, "guidance_scale": True}),
            "job.params.guidance_scale",
            id="bool-for-float",
        ),
        pytest.param(
            _frame_of(JOB, params={**JOB_PARAMS, "width": 4097}),
            "job.params.width",
            id="width-over",
        ),
        pytest.param(
            _frame_of(JOB, params={**JOB_PARAMS, "seed": -1}), "job.params.seed", id="seed-neg"
        ),
        pytest.param(
            _frame_of(JOB, params={k: v for k, v in JOB_PARAMS.items() if k != "prompt"}),
            "job.params.prompt",
            id="nested-missing",
        ),
        pytest.param(_frame_of(JOB, params=[1, 2]), "job.params", id="list-for-struct"),
        pytest.param(
            _frame_of(ACCEPTED, fee=[b"\x01", b"\x00"]), "accepted.fee", id="fraction-den-zero"
        ),
        pytest.param(_frame_of(ACCEPTED, fee=[_u(1)]), "accepted.fee", id="fraction-one-item"),
        pytest.param(
            _frame_of(ACCEPTED, fee=[_u(1), _u(1), _u(1)]), "accepted.fee", id="fraction-3-items"
        ),
        pytest.param(_frame_of(ACCEPTED, fee=[1, 2]), "accepted.fee.num", id="fraction-of-ints"),
        pytest.param(
            _frame_of(ACCEPTED, fee=[_u(1), b""]), "accepted.fee.den", id="fraction-empty-den"
        ),
        pytest.param(
            _frame_of(ACCEPTED, fee=[bytes(65), b"\x01"]),
            "accepted.fee.num",
            id="fraction-65-bytes",
        ),
        pytest.param(
            _frame_of(ACCEPTED, fee=[b"\x01", "2"]), "accepted.fee.den", id="fraction-str-den"
        ),
        pytest.param(
            _frame_of(ACCEPTED, fee=[b"\x01", bytes(64)]), "accepted.fee", id="fraction-den-zeros"
        ),
        pytest.param(_frame_of(ACCEPTED, fee=1), "accepted.fee", id="int-for-fraction"),
        pytest.param(
            _frame_of(ACCEPTED, ticket_params={**ACCEPTED_RAW["ticket_params"], "face_value": 5}),
            "accepted.ticket_params.face_value",
            id="int-for-u256",
        ),
        pytest.param(
            _frame_of(
                ACCEPTED, ticket_params={**ACCEPTED_RAW["ticket_params"], "win_prob": bytes(33)}
            ),
            "accepted.ticket_params.win_prob",
            id="u256-33-bytes",
        ),
        pytest.param(
            _frame_of(
                ACCEPTED,
                ticket_params={**ACCEPTED_RAW["ticket_params"], "expiration_block": -1},
            ),
            "accepted.ticket_params.expiration_block",
            id="uint64-negative",
        ),
        pytest.param(
            _frame_of(ACCEPTED, ticket_params={**ACCEPTED_RAW["ticket_params"], "seed": bytes(31)}),
            "accepted.ticket_params.seed",
            id="hash-wrong-length",
        ),
        pytest.param(_frame_of(PAYMENT, tickets=[]), "payment.tickets", id="too-few-items"),
        pytest.param(
            _frame_of(PAYMENT, tickets=[PAYMENT_RAW["tickets"][0]] * 1025),
            "payment.tickets",
            id="too-many-items",
        ),
        pytest.param(
            _frame_of(PAYMENT, tickets={"0": PAYMENT_RAW["tickets"][0]}),
            "payment.tickets",
            id="map-for-list",
        ),
        pytest.param(
            _frame_of(
                PAYMENT,
                tickets=[PAYMENT_RAW["tickets"][0], {"sender_nonce": 2, "sig": bytes(64)}],
            ),
            "payment.tickets[1].sig",
            id="item-field",
        ),
        pytest.param(
            _frame_of(RESULT, images=[{**RESULT_RAW["images"][0], "nsfw": 0}]),
            "result.images[0].nsfw",
            id="int-for-bool",
        ),
        pytest.param(
            _frame_of(RESULT, images=[{**RESULT_RAW["images"][0], "image": b""}]),
            "result.images[0].image",
            id="empty-image",
        ),
        pytest.param(
            _frame_of(Preview("j", 1, b"x", "webp", 1, 1), image=b"x" * (MAX_PREVIEW_BYTES + 1)),
            "preview.image",
            id="preview-too-big",
        ),
        pytest.param(
            _frame_of(Error("c", "m"), message="m" * 1025), "error.message", id="error-too-long"
        ),
        pytest.param(_frame_of(Error("c", "m"), job_id=""), "error.job_id", id="optional-invalid"),
    ],
)
def test_invalid_field(frame: bytes, path: str) -> None:
    err = _decode_error(frame)
    assert err.code is ErrorCode.INVALID_FIELD
    assert err.message.startswith(path + ":"), err.message


def test_type_checked_before_fields() -> None:
    assert _decode_error(_raw(v=1, type="nope", step="x")).code is ErrorCode.UNKNOWN_MESSAGE_TYPE


def test_boundaries_accepted() -> None:
    frame = _frame_of(PROGRESS, step=UINT32_MAX, total_steps=0)
    assert codec.decode(frame) == Progress("j", UINT32_MAX, 0, 1)
    frame = _frame_of(JOB, params={**JOB_PARAMS, "guidance_scale": 50.0, "width": 8})
    decoded = codec.decode(frame)
    assert isinstance(decoded, JobRequest)
    assert (decoded.params.guidance_scale, decoded.params.width) == (50.0, 8)
    assert codec.decode(_frame_of(PROGRESS, job_id="j" * 64)) == dataclasses.replace(
        PROGRESS, job_id="j" * 64
    )


def test_error_message_attributes() -> None:
    err = _decode_error(_frame_of(PROGRESS, step=-1))
    assert str(err) == f"invalid_field: {err.message}"
    assert "-1" in err.message


# --------------------------------------------------------------------- properties

_text = st.text(st.characters(codec="utf-8"), min_size=0, max_size=40)


@st.composite
def _prompts(draw: st.DrawFn) -> TextToImageParams:
    return TextToImageParams(
        prompt=draw(st.text(st.characters(codec="utf-8"), min_size=1, max_size=4000)),
        negative_prompt=draw(_text),
        width=draw(st.integers(8, 4096)),
        height=draw(st.integers(8, 4096)),
        guidance_scale=draw(st.floats(0.0, 50.0, allow_nan=False)),
        num_inference_steps=draw(st.integers(1, 1000)),
        seed=draw(st.none() | st.integers(0, UINT32_MAX)),
        num_images_per_prompt=draw(st.integers(1, 16)),
    )


_job_ids = st.text(st.characters(codec="utf-8"), min_size=1, max_size=64)
_u32 = st.integers(0, UINT32_MAX)


@settings(max_examples=200, deadline=None)
@given(
    params=_prompts(),
    job_id=_job_ids,
    progress=st.tuples(_u32, _u32, _u32),
)
def test_property_round_trip(
    params: TextToImageParams, job_id: str, progress: tuple[int, int, int]
) -> None:
    job = JobRequest(job_id=job_id, pipeline="text-to-image", model_id="m", params=params)
    assert codec.decode(codec.encode(job)) == job
    step, total, covered = progress
    message = Progress(job_id=job_id, step=step, total_steps=total, covered_steps=covered)
    assert codec.decode(codec.encode(message)) == message


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=256))
def test_property_random_bytes_only_protocol_errors(frame: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        codec.decode(frame)


_msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | _text
    | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_text, children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(
    name=st.sampled_from(sorted(MESSAGE_TYPES)),
    fields=st.dictionaries(
        st.sampled_from(
            sorted({f.name for cls in MESSAGE_TYPES.values() for f in dataclasses.fields(cls)})
        ),
        _msgpack_values,
        max_size=8,
    ),
)
def test_property_random_maps_only_protocol_errors(name: str, fields: dict[str, Any]) -> None:
    """Well-formed frames of a known type with junk fields: a message or a ProtocolError."""
    frame = msgpack.packb({**fields, "v": 1, "type": name}, use_bin_type=True)
    try:
        message = codec.decode(frame)
    except ProtocolError as err:
        assert err.code is ErrorCode.INVALID_FIELD
    else:
        assert isinstance(message, MESSAGE_TYPES[name])


def test_timestamp_extension_is_malformed_even_in_an_unknown_key() -> None:
    frame = msgpack.packb({"v": 1, "type": "cancel", "job_id": "j", "x": msgpack.Timestamp(1, 0)})
    with pytest.raises(ProtocolError) as err:
        codec.decode(frame)
    assert err.value.code == ErrorCode.MALFORMED_FRAME
