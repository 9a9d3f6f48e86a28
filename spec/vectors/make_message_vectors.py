"""Write spec/vectors/messages.json: exact frames of every message, and invalid frames.

Why: another implementation of the protocol can check its encoder and decoder
byte for byte against ours (spec section 13). Each message vector gives the
fields in JSON form and the frame that protocol.codec.encode produces; each
invalid frame gives the error code that decoding must raise (and, for
invalid_field, the field path the message starts with). All values are fixed,
so running this again gives the same file; tests/test_vectors.py checks that.

JSON forms: bytes are lowercase hex without 0x, U256 fields are decimal
strings, Fractions are "num/den" strings, an optional field set to None is
null (msgpack nil), nested structures are objects and lists. Other integers
are JSON numbers (UInt64 values may exceed 2^53).

Run: .venv/bin/python spec/vectors/make_message_vectors.py [OUT]
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from fractions import Fraction
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import msgpack  # noqa: E402

from protocol import codec  # noqa: E402
from protocol.errors import ErrorCode, ProtocolError  # noqa: E402
from protocol.fields import UINT32_MAX, UINT64_MAX, Added, KeyedBy, Wide  # noqa: E402
from protocol.messages import (  # noqa: E402
    MESSAGE_TYPES,
    AwaitingPayment,
    Cancel,
    Cancelled,
    Capability,
    Credit,
    Device,
    Error,
    Hello,
    ImageToImageParams,
    ImageToVideoParams,
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

OUT = Path(__file__).resolve().parent / "messages.json"

U256_MAX = 2**256 - 1
SENDER = bytes.fromhex("9a5bd0ff6a4e0bd3bd4b2e5ed7ae3ae9a3c0d5e1")
ORCHESTRATOR = bytes.fromhex("73aed7b5deb30222fa896f399d46cc99c7bee57f")
JOB_ID = "job-0001"


def _h32(label: str) -> bytes:
    """A fixed 32-byte value named by `label` (readable in the hex, no hashing needed)."""
    raw = label.encode()
    return (raw * (32 // len(raw) + 1))[:32]


TICKET_PARAMS = TicketParams(
    recipient=ORCHESTRATOR,
    face_value=10**15,
    win_prob=U256_MAX // 3,
    recipient_rand_hash=_h32("rand-hash/"),
    seed=bytes(range(32)),
    expiration_block=19_000_040,
)

JOB_PARAMS = TicketParams(
    recipient=ORCHESTRATOR,
    face_value=U256_MAX,
    win_prob=1,
    recipient_rand_hash=_h32("job-rand-hash/"),
    seed=bytes(range(32, 64)),
    expiration_block=UINT64_MAX,
    creation_round=3_901,
    creation_round_block_hash=_h32("round-block/"),
)

PRICE = Fraction(4_768_371, 50 * 1)  # go-livepeer's 4768371 wei/pixel over 50 steps

MESSAGES: list[tuple[str, Message]] = [
    ("hello", Hello(sender=SENDER, agent="stepstream-broadcaster/0.1")),
    (
        "hello_features",
        Hello(
            sender=SENDER,
            agent="stepstream-broadcaster/0.2",
            features=("result_frames", "status"),
        ),
    ),
    (
        "info",
        Info(
            orchestrator=ORCHESTRATOR,
            capabilities=(
                Capability(
                    pipeline="text-to-image",
                    model_id="stabilityai/sd-turbo",
                    warm=True,
                    capacity=2,
                    in_use=0,
                    price_per_pixel_step=PRICE,
                    load_seconds=2.5,
                ),
                Capability(
                    pipeline="text-to-image",
                    model_id="stabilityai/stable-diffusion-xl-base-1.0",
                    warm=False,
                    capacity=1,
                    in_use=1,
                    price_per_pixel_step=Fraction(U256_MAX, 3),
                ),
            ),
            ticket_params=TICKET_PARAMS,
            max_frame_bytes=16 << 20,
            agent="stepstream-orchestrator/0.1",
        ),
    ),
    (
        "job",
        JobRequest(
            job_id=JOB_ID,
            pipeline="text-to-image",
            model_id="stabilityai/sd-turbo",
            params=TextToImageParams(
                prompt="a lighthouse at dusk, café lights, 灯台, 35mm photo",
                negative_prompt="blurry, text",
                width=512,
                height=512,
                guidance_scale=7.5,
                num_inference_steps=20,
                seed=None,
                num_images_per_prompt=1,
            ),
            preview_every=5,
            preview_method="latent_rgb",
            preview_format="webp",
        ),
    ),
    (
        "accepted",
        JobAccepted(
            job_id=JOB_ID,
            steps=20,
            pixels_per_step=512 * 512,
            price_per_pixel_step=PRICE,
            fee=512 * 512 * 20 * PRICE,
            window_steps=5,
            seed=UINT32_MAX,
            ticket_params=JOB_PARAMS,
        ),
    ),
    (
        "payment",
        Payment(
            job_id=JOB_ID,
            sender=SENDER,
            ticket_params=JOB_PARAMS,
            tickets=(
                SignedTicket(sender_nonce=1, sig=_h32("sig-one/") * 2 + b"\x1b"),
                SignedTicket(sender_nonce=2, sig=_h32("sig-two/") * 2 + b"\x1c"),
            ),
        ),
    ),
    (
        "credit",
        Credit(
            job_id=JOB_ID,
            credit=2 * Fraction(10**15 * 2**250, U256_MAX),  # parts wider than 32 bytes
            covered_steps=5,
            tickets_accepted=2,
            winners=0,
        ),
    ),
    ("progress", Progress(job_id=JOB_ID, step=3, total_steps=20, covered_steps=5)),
    (
        "progress_with_fresh_ticket_params",
        Progress(job_id=JOB_ID, step=8, total_steps=20, covered_steps=10, ticket_params=JOB_PARAMS),
    ),
    (
        "awaiting_payment",
        AwaitingPayment(job_id=JOB_ID, next_step=6, covered_steps=5, timeout_ms=30_000),
    ),
    (
        "preview",
        Preview(
            job_id=JOB_ID,
            step=5,
            image=b"RIFF\x1a\x00\x00\x00WEBPVP8L\x0d\x00\x00\x00/\x00\x00\x00\x10",
            format="webp",
            width=64,
            height=64,
        ),
    ),
    (
        "result",
        Result(
            job_id=JOB_ID,
            images=(
                ResultImage(
                    image=b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
                    format="png",
                    width=512,
                    height=512,
                    seed=42,
                    nsfw=False,
                ),
            ),
            steps=20,
            pixel_steps=512 * 512 * 20,
            fee=512 * 512 * 20 * PRICE,
        ),
    ),
    (
        "job_image_to_image",
        JobRequest(
            job_id=JOB_ID,
            pipeline="image-to-image",
            model_id="stabilityai/sdxl-turbo",
            params=ImageToImageParams(
                prompt="the same lighthouse in winter",
                image=b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
                strength=0.5,
                num_inference_steps=8,
                seed=7,
            ),
            preview_every=2,
        ),
    ),
    (
        "job_image_to_video",
        JobRequest(
            job_id=JOB_ID,
            pipeline="image-to-video",
            model_id="stabilityai/stable-video-diffusion-img2vid-xt",
            params=ImageToVideoParams(
                image=b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", width=512, height=288, seed=3
            ),
            preview_every=5,
            preview_frame=12,
        ),
    ),
    (
        "result_video",
        Result(
            job_id=JOB_ID,
            images=(),
            steps=25,
            pixel_steps=512 * 288 * 2 * 25,
            fee=512 * 288 * 2 * 25 * PRICE,
            frames=tuple(
                ResultImage(
                    image=b"\x89PNG\r\n\x1a\n" + bytes([i]),
                    format="png",
                    width=512,
                    height=288,
                    seed=3,
                )
                for i in range(2)
            ),
            fps=6,
        ),
    ),
    (
        "result_frame",
        ResultFrame(
            job_id=JOB_ID,
            index=0,
            frame=ResultImage(
                image=b"\x89PNG\r\n\x1a\n", format="png", width=1024, height=576, seed=3
            ),
        ),
    ),
    (
        "result_streamed",
        Result(
            job_id=JOB_ID,
            images=(),
            steps=25,
            pixel_steps=1024 * 576 * 25 * 25,
            fee=1024 * 576 * 25 * 25 * PRICE,
            fps=6,
            streamed_frames=25,
        ),
    ),
    ("status", Status(job_id=JOB_ID, phase="decoding", next_within_ms=2000)),
    ("info_request", InfoRequest()),
    (
        "queued",
        Queued(job_id=JOB_ID, position=2, estimated_start_ms=12_500, next_within_ms=4000),
    ),
    (
        "info_hardware",
        Info(
            orchestrator=ORCHESTRATOR,
            capabilities=(
                Capability(
                    pipeline="text-to-image",
                    model_id="stabilityai/sd-turbo",
                    warm=True,
                    capacity=2,
                    in_use=2,
                    price_per_pixel_step=PRICE,
                    load_seconds=4.5,
                    queued=1,
                    step_seconds=0.0625,
                    step_pixels=512 * 512,
                ),
            ),
            ticket_params=TICKET_PARAMS,
            max_frame_bytes=16 << 20,
            agent="stepstream-orchestrator/0.1",
            devices=(
                Device(
                    name="cuda:0",
                    gpu="NVIDIA GeForce RTX 4090",
                    vram_total=24 << 30,
                    vram_free=20 << 30,
                    models=("stabilityai/sd-turbo",),
                ),
                Device(name="cpu", gpu="cpu"),
            ),
            features=("info_request",),
        ),
    ),
    ("cancel", Cancel(job_id=JOB_ID)),
    ("cancelled", Cancelled(job_id=JOB_ID, steps=7)),
    ("error_job", Error(code="no_capacity", message="all slots busy", job_id=JOB_ID)),
    ("error_fatal", Error(code="malformed_frame", message="a frame must be a msgpack map")),
]


# ------------------------------------------------------------------ JSON forms


def _unwrap(annotation: Any) -> tuple[Any, tuple[Any, ...]]:
    """(bare type, constraint markers) of a possibly Annotated field type."""
    if typing.get_origin(annotation) is typing.Annotated:
        bare, *rules = typing.get_args(annotation)
        return bare, tuple(rules)
    return annotation, ()


def _optional_inner(annotation: Any) -> Any | None:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return inner
    return None


def to_json(value: Any, annotation: Any) -> Any:
    """A field value in its JSON form (see the module docstring)."""
    inner = _optional_inner(annotation)
    if inner is not None:
        return None if value is None else to_json(value, inner)
    bare, rules = _unwrap(annotation)
    if any(isinstance(r, KeyedBy) for r in rules):
        return struct_to_json(value)
    if typing.get_origin(bare) is tuple:
        (item, _ellipsis) = typing.get_args(bare)
        return [to_json(v, item) for v in value]
    if dataclasses.is_dataclass(bare):
        return struct_to_json(value)
    if any(isinstance(r, Wide) for r in rules):
        return str(value)
    if bare is bytes:
        return value.hex()
    if bare is Fraction:
        return f"{value.numerator}/{value.denominator}"
    return value


def from_json(data: Any, annotation: Any) -> Any:
    """The inverse of to_json."""
    inner = _optional_inner(annotation)
    if inner is not None:
        return None if data is None else from_json(data, inner)
    bare, rules = _unwrap(annotation)
    if typing.get_origin(bare) is tuple:
        (item, _ellipsis) = typing.get_args(bare)
        return tuple(from_json(v, item) for v in data)
    if dataclasses.is_dataclass(bare):
        return struct_from_json(bare, data)
    if any(isinstance(r, Wide) for r in rules):
        return int(data)
    if bare is bytes:
        return bytes.fromhex(data)
    if bare is Fraction:
        num, den = data.split("/")
        return Fraction(int(num), int(den))
    if bare is float:
        return float(data)
    return data


def struct_to_json(value: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(type(value), include_extras=True)
    return {
        f.name: to_json(getattr(value, f.name), hints[f.name])
        for f in dataclasses.fields(value)
        if not (_added(hints[f.name]) and getattr(value, f.name) == f.default)
    }


def _added(annotation: Any) -> bool:
    """A minor-revision field: left out of frames (and vectors) while at its default."""
    return any(isinstance(m, Added) for m in getattr(annotation, "__metadata__", ()))


def struct_from_json(cls: type, data: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls, include_extras=True)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:  # a field added later, left at its default
            continue
        keyed = next((r for r in _unwrap(hints[f.name])[1] if isinstance(r, KeyedBy)), None)
        if keyed is not None:
            chosen = dict(keyed.choices).get(kwargs[keyed.key], keyed.other)
            kwargs[f.name] = struct_from_json(chosen, data[f.name])
        else:
            kwargs[f.name] = from_json(data[f.name], hints[f.name])
    return cls(**kwargs)


def message_from_vector(vector: dict[str, Any]) -> Message:
    """The message a vector of messages.json describes."""
    message = struct_from_json(MESSAGE_TYPES[vector["type"]], vector["fields"])
    assert isinstance(message, Message)
    return message


# ------------------------------------------------------------------ invalid frames


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _raw(message: Message) -> dict[str, Any]:
    raw = msgpack.unpackb(codec.encode(message), raw=False)
    assert isinstance(raw, dict)
    return raw


def _invalid_frames() -> list[dict[str, Any]]:
    """(name, frame, code, path or None, max_frame_bytes or None) for each decode rule."""
    by_name = dict(MESSAGES)
    progress = _raw(by_name["progress"])
    hello = _raw(by_name["hello"])
    job = _raw(by_name["job"])
    accepted = _raw(by_name["accepted"])
    payment = _raw(by_name["payment"])
    result = _raw(by_name["result"])
    cancel = codec.encode(by_name["cancel"])
    mfb = ErrorCode.MALFORMED_FRAME
    inv = ErrorCode.INVALID_FIELD
    cases: list[tuple[str, bytes, ErrorCode, str | None, int | None]] = [
        ("too_large", codec.encode(by_name["hello"]), ErrorCode.FRAME_TOO_LARGE, None, 16),
        ("empty", b"", mfb, None, None),
        ("reserved_byte", b"\xc1", mfb, None, None),
        ("truncated", cancel[:-1], mfb, None, None),
        ("trailing_byte", cancel + b"\xc0", mfb, None, None),
        ("array_not_map", _pack([1, "cancel", JOB_ID]), mfb, None, None),
        ("nil_not_map", _pack(None), mfb, None, None),
        (
            "ext_type",
            _pack({"v": 1, "type": "cancel", "job_id": msgpack.ExtType(7, b"x")}),
            mfb,
            None,
            None,
        ),
        ("int_map_key", _pack({"v": 1, "type": "cancel", "job_id": JOB_ID, 1: 2}), mfb, None, None),
        ("invalid_utf8", b"\x83\xa1v\x01\xa4type\xa6cancel\xa6job_id\xa2\xff\xfe", mfb, None, None),
        ("missing_v", _pack({"type": "cancel", "job_id": JOB_ID}), mfb, None, None),
        ("string_v", _pack({"v": "1", "type": "cancel", "job_id": JOB_ID}), mfb, None, None),
        ("bool_v", _pack({"v": True, "type": "cancel", "job_id": JOB_ID}), mfb, None, None),
        (
            "v_2",
            _pack({"v": 2, "type": "cancel", "job_id": JOB_ID}),
            ErrorCode.UNSUPPORTED_VERSION,
            None,
            None,
        ),
        (
            "v_0",
            _pack({"v": 0, "type": "cancel", "job_id": JOB_ID}),
            ErrorCode.UNSUPPORTED_VERSION,
            None,
            None,
        ),
        (
            "unknown_type",
            _pack({"v": 1, "type": "hello2"}),
            ErrorCode.UNKNOWN_MESSAGE_TYPE,
            None,
            None,
        ),
        (
            "missing_type",
            _pack({"v": 1, "job_id": JOB_ID}),
            ErrorCode.UNKNOWN_MESSAGE_TYPE,
            None,
            None,
        ),
        (
            "missing_field",
            _pack({k: v for k, v in progress.items() if k != "step"}),
            inv,
            "progress.step",
            None,
        ),
        ("string_for_int", _pack({**progress, "step": "3"}), inv, "progress.step", None),
        ("bool_for_int", _pack({**progress, "step": True}), inv, "progress.step", None),
        ("float_for_int", _pack({**progress, "step": 3.0}), inv, "progress.step", None),
        ("negative_uint32", _pack({**progress, "step": -1}), inv, "progress.step", None),
        (
            "uint32_overflow",
            _pack({**progress, "step": UINT32_MAX + 1}),
            inv,
            "progress.step",
            None,
        ),
        ("job_id_too_long", _pack({**progress, "job_id": "j" * 65}), inv, "progress.job_id", None),
        ("job_id_empty", _pack({**progress, "job_id": ""}), inv, "progress.job_id", None),
        ("address_19_bytes", _pack({**hello, "sender": bytes(19)}), inv, "hello.sender", None),
        (
            "address_as_str",
            _pack({**hello, "sender": "0x" + SENDER.hex()}),
            inv,
            "hello.sender",
            None,
        ),
        (
            "nan_float",
            _pack({**job, "params": {**job["params"], "guidance_scale": float("nan")}}),
            inv,
            "job.params.guidance_scale",
            None,
        ),
        (
            "float_over_range",
            _pack({**job, "params": {**job["params"], "guidance_scale": 50.5}}),
            inv,
            "job.params.guidance_scale",
            None,
        ),
        (
            "nested_missing",
            _pack({**job, "params": {k: v for k, v in job["params"].items() if k != "prompt"}}),
            inv,
            "job.params.prompt",
            None,
        ),
        (
            "fraction_zero_den",
            _pack({**accepted, "fee": [b"\x01", b"\x00"]}),
            inv,
            "accepted.fee",
            None,
        ),
        (
            "fraction_part_65_bytes",
            _pack({**accepted, "fee": [b"\x01" * 65, b"\x01"]}),
            inv,
            "accepted.fee.num",
            None,
        ),
        ("fraction_of_ints", _pack({**accepted, "fee": [1, 2]}), inv, "accepted.fee.num", None),
        (
            "u256_31_bytes",
            _pack(
                {
                    **accepted,
                    "ticket_params": {**accepted["ticket_params"], "face_value": bytes(31)},
                }
            ),
            inv,
            "accepted.ticket_params.face_value",
            None,
        ),
        (
            "u256_as_int",
            _pack({**accepted, "ticket_params": {**accepted["ticket_params"], "win_prob": 1}}),
            inv,
            "accepted.ticket_params.win_prob",
            None,
        ),
        ("no_tickets", _pack({**payment, "tickets": []}), inv, "payment.tickets", None),
        (
            "sig_64_bytes",
            _pack(
                {
                    **payment,
                    "tickets": [payment["tickets"][0], {"sender_nonce": 3, "sig": bytes(64)}],
                }
            ),
            inv,
            "payment.tickets[1].sig",
            None,
        ),
        (
            "int_for_bool",
            _pack({**result, "images": [{**result["images"][0], "nsfw": 0}]}),
            inv,
            "result.images[0].nsfw",
            None,
        ),
        (
            "error_message_too_long",
            _pack({"v": 1, "type": "error", "code": "internal_error", "message": "x" * 1025}),
            inv,
            "error.message",
            None,
        ),
    ]
    frames = []
    for name, frame, code, path, max_frame_bytes in cases:
        entry: dict[str, Any] = {"name": name, "frame": frame.hex(), "code": code.value}
        if path is not None:
            entry["path"] = path
        if max_frame_bytes is not None:
            entry["max_frame_bytes"] = max_frame_bytes
        frames.append(entry)
    return frames


# ------------------------------------------------------------------ document


def build_vectors() -> dict[str, Any]:
    """Build the vectors document in memory, checking each vector against the codec."""
    assert {type(m).TYPE for _, m in MESSAGES} == set(MESSAGE_TYPES)
    vectors = []
    for name, message in MESSAGES:
        frame = codec.encode(message)
        assert codec.decode(frame) == message
        vector = {
            "name": name,
            "type": message.TYPE,
            "fields": struct_to_json(message),
            "frame": frame.hex(),
        }
        assert message_from_vector(vector) == message
        vectors.append(vector)
    invalid = _invalid_frames()
    for entry in invalid:
        try:
            codec.decode(
                bytes.fromhex(entry["frame"]),
                entry.get("max_frame_bytes", codec.DEFAULT_MAX_FRAME_BYTES),
            )
        except ProtocolError as err:
            assert err.code.value == entry["code"], (entry["name"], err)
            assert "path" not in entry or err.message.startswith(entry["path"] + ":")
        else:  # pragma: no cover - a generator bug
            raise AssertionError(f"{entry['name']} decoded")
    return {
        "about": (
            "Message vectors for stepstream wire version 1 (spec/PROTOCOL.md). Each message "
            "vector's 'frame' is the exact msgpack frame (hex) for its 'fields': a map of "
            "v, type, then the fields in declaration order; encoders MUST produce these bytes "
            "and decoders MUST return these fields. JSON forms: bytes are lowercase hex, "
            "U256 fields decimal strings, Fractions 'num/den', an optional None is null (nil on "
            "the wire). Each "
            "invalid frame MUST fail to decode with 'code' (and, for invalid_field, a message "
            "starting with 'path:'), with 'max_frame_bytes' as the cap where given (else "
            "16 MiB). Generated by make_message_vectors.py."
        ),
        "version": 1,
        "vectors": vectors,
        "invalid_frames": invalid,
    }


def render(doc: dict[str, Any]) -> str:
    """Stable JSON text so regenerating yields a byte-identical file."""
    return json.dumps(doc, indent=2) + "\n"


def write(path: Path) -> None:
    path.write_text(render(build_vectors()), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    """Write the vectors file next to this script, or to the path given."""
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0]) if args else OUT
    write(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
