"""msgpack codec: messages to bytes and back, validating every field.

A frame is one msgpack map ``{"v": 1, "type": <name>, <field>: <value>...}``.
Decoding checks, in order: the frame size cap, that the bytes are one msgpack
map, the wire version, the message type, then each field's type and range.
Unknown keys are ignored so that a minor revision can add optional fields.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from fractions import Fraction
from functools import cache
from typing import Any

import msgpack

from protocol.errors import ErrorCode, ProtocolError
from protocol.fields import Added, Bin, Float, Int, Items, KeyedBy, Str, Wide
from protocol.messages import MESSAGE_TYPES, PROTOCOL_VERSION, Message

DEFAULT_MAX_FRAME_BYTES = 16 << 20
"""Largest frame either side accepts unless it advertises otherwise (spec 3.1)."""

_U256_MAX = 2**256 - 1

Encoder = Callable[[Any], Any]
Decoder = Callable[[Any, str], Any]


def _invalid(path: str, what: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_FIELD, f"{path}: {what}")


# ------------------------------------------------------------- field codecs


def _int_codec(rule: Int) -> tuple[Encoder, Decoder]:
    def decode(value: Any, path: str) -> int:
        if type(value) is not int:
            raise _invalid(path, f"expected an integer, got {type(value).__name__}")
        if not rule.min <= value <= rule.max:
            raise _invalid(path, f"{value} outside {rule.min}..{rule.max}")
        return value

    return (lambda v: v), decode


def _float_codec(rule: Float) -> tuple[Encoder, Decoder]:
    def decode(value: Any, path: str) -> float:
        if type(value) not in (int, float):
            raise _invalid(path, f"expected a number, got {type(value).__name__}")
        number = float(value)
        if not math.isfinite(number) or not rule.min <= number <= rule.max:
            raise _invalid(path, f"{value} outside {rule.min}..{rule.max}")
        return number

    return float, decode


def _str_codec(rule: Str) -> tuple[Encoder, Decoder]:
    def decode(value: Any, path: str) -> str:
        if type(value) is not str:
            raise _invalid(path, f"expected a string, got {type(value).__name__}")
        if not rule.min_len <= len(value) <= rule.max_len:
            raise _invalid(path, f"length {len(value)} outside {rule.min_len}..{rule.max_len}")
        return value

    return (lambda v: v), decode


def _bin_codec(rule: Bin) -> tuple[Encoder, Decoder]:
    def decode(value: Any, path: str) -> bytes:
        if type(value) is not bytes:
            raise _invalid(path, f"expected bytes, got {type(value).__name__}")
        if not rule.min_len <= len(value) <= rule.max_len:
            raise _invalid(path, f"length {len(value)} outside {rule.min_len}..{rule.max_len}")
        return value

    return bytes, decode


def _u256_encode(value: int) -> bytes:
    return value.to_bytes(32, "big")


def _u256_decode(value: Any, path: str) -> int:
    if type(value) is not bytes or len(value) != 32:
        raise _invalid(path, "expected a uint256 as 32 big-endian bytes")
    return int.from_bytes(value, "big")


FRACTION_PART_BYTES = 64
"""Numerator and denominator are unsigned big-endian, at most 512 bits each: sums of
ticket EVs have denominators near 2^256, so their numerators outgrow a uint256."""


def _uint_bytes(value: int) -> bytes:
    return value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")


def _fraction_encode(value: Fraction) -> list[bytes]:
    if value < 0:
        raise ValueError("fractions on the wire are never negative")
    num, den = _uint_bytes(value.numerator), _uint_bytes(value.denominator)
    if max(len(num), len(den)) > FRACTION_PART_BYTES:
        raise ValueError(f"{value} does not fit in {FRACTION_PART_BYTES}-byte parts")
    return [num, den]


def _fraction_decode(value: Any, path: str) -> Fraction:
    if type(value) is not list or len(value) != 2:
        raise _invalid(path, "expected a [numerator, denominator] pair of byte strings")
    parts = []
    for name, part in zip(("num", "den"), value, strict=True):
        if type(part) is not bytes or not 1 <= len(part) <= FRACTION_PART_BYTES:
            raise _invalid(f"{path}.{name}", f"expected 1..{FRACTION_PART_BYTES} bytes")
        parts.append(int.from_bytes(part, "big"))
    if parts[1] == 0:
        raise _invalid(path, "denominator is zero")
    return Fraction(parts[0], parts[1])


def _bool_decode(value: Any, path: str) -> bool:
    if type(value) is not bool:
        raise _invalid(path, f"expected a boolean, got {type(value).__name__}")
    return value


def _optional_codec(inner: tuple[Encoder, Decoder]) -> tuple[Encoder, Decoder]:
    enc, dec = inner
    return (lambda v: None if v is None else enc(v)), (
        lambda v, p: None if v is None else dec(v, p)
    )


def _tuple_codec(item: tuple[Encoder, Decoder], rule: Items) -> tuple[Encoder, Decoder]:
    enc, dec = item

    def decode(value: Any, path: str) -> tuple[Any, ...]:
        if type(value) is not list:
            raise _invalid(path, f"expected a list, got {type(value).__name__}")
        if not rule.min_items <= len(value) <= rule.max_items:
            raise _invalid(path, f"{len(value)} items outside {rule.min_items}..{rule.max_items}")
        return tuple(dec(v, f"{path}[{i}]") for i, v in enumerate(value))

    return (lambda v: [enc(x) for x in v]), decode


def _codec_for(annotation: Any) -> tuple[Encoder, Decoder]:
    """Build the (encode, decode) pair for one annotated field type."""
    rules: tuple[Any, ...] = ()
    if typing.get_origin(annotation) is typing.Annotated:
        annotation, *extra = typing.get_args(annotation)
        rules = tuple(extra)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported union {annotation}")
        return _optional_codec(_codec_for(args[0]))
    if origin is tuple:
        (item, _ellipsis) = typing.get_args(annotation)
        rule = next(r for r in rules if isinstance(r, Items))
        return _tuple_codec(_codec_for(item), rule)
    if dataclasses.is_dataclass(annotation):
        return _struct_codec(annotation)
    for rule in rules:
        if isinstance(rule, Int):
            return _int_codec(rule)
        if isinstance(rule, Float):
            return _float_codec(rule)
        if isinstance(rule, Str):
            return _str_codec(rule)
        if isinstance(rule, Bin):
            return _bin_codec(rule)
        if isinstance(rule, Wide):
            return _u256_encode, _u256_decode
    if annotation is bool:
        return (lambda v: v), _bool_decode
    if annotation is Fraction:
        return _fraction_encode, _fraction_decode
    raise TypeError(f"field type {annotation} has no codec rule")


def _keyed_rule(annotation: Any) -> KeyedBy | None:
    if typing.get_origin(annotation) is typing.Annotated:
        return next((r for r in typing.get_args(annotation)[1:] if isinstance(r, KeyedBy)), None)
    return None


def _keyed_codec(rule: KeyedBy) -> tuple[Callable[[Any, Any], Any], Callable[[Any, str, Any], Any]]:
    """Codec of a structure chosen by a sibling's value (e.g. a job's params by its pipeline)."""
    choices = dict(rule.choices)

    def pick(key: Any) -> type:
        return choices.get(key, rule.other) if type(key) is str else rule.other

    def encode(value: Any, key: Any) -> Any:
        cls = pick(key)
        if type(value) is not cls:
            raise ValueError(f"{rule.key} {key!r} takes {cls.__name__}, not {type(value).__name__}")
        return _struct_codec(cls)[0](value)

    def decode(value: Any, path: str, key: Any) -> Any:
        return _struct_codec(pick(key))[1](value, path)

    return encode, decode


FieldEncoder = Callable[[Any, Any], Any]
"""(value, the structure holding it) -> wire value."""
FieldDecoder = Callable[[Any, str, dict[str, Any]], Any]
"""(wire value, path, sibling fields decoded so far) -> value."""


def _field_codec(annotation: Any) -> tuple[FieldEncoder, FieldDecoder]:
    """A field's codec; a KeyedBy field also sees its sibling key (declared before it)."""
    keyed = _keyed_rule(annotation)
    if keyed is not None:
        kenc, kdec = _keyed_codec(keyed)
        key = keyed.key

        def enc_keyed(v: Any, obj: Any) -> Any:
            return kenc(v, getattr(obj, key))

        def dec_keyed(v: Any, p: str, kw: dict[str, Any]) -> Any:
            return kdec(v, p, kw.get(key))

        return enc_keyed, dec_keyed
    enc, dec = _codec_for(annotation)

    def enc_plain(v: Any, _obj: Any) -> Any:
        return enc(v)

    def dec_plain(v: Any, p: str, _kw: dict[str, Any]) -> Any:
        return dec(v, p)

    return enc_plain, dec_plain


@cache
def _struct_codec(cls: type) -> tuple[Encoder, Decoder]:
    """Codec for a dataclass: a msgpack map of its fields."""
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = []
    omit_default: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        enc, dec = _field_codec(hints[f.name])
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        fields.append((f.name, enc, dec, required))
        if any(isinstance(m, Added) for m in getattr(hints[f.name], "__metadata__", ())):
            omit_default[f.name] = f.default

    def encode(value: Any) -> dict[str, Any]:
        return {
            name: enc(getattr(value, name), value)
            for name, enc, _dec, _req in fields
            if name not in omit_default or getattr(value, name) != omit_default[name]
        }

    def decode(value: Any, path: str) -> Any:
        if type(value) is not dict:
            raise _invalid(path, f"expected a map, got {type(value).__name__}")
        kwargs: dict[str, Any] = {}
        for name, _enc, dec, required in fields:
            if name in value:
                kwargs[name] = dec(value[name], f"{path}.{name}", kwargs)
            elif required:
                raise _invalid(f"{path}.{name}", "missing")
        return cls(**kwargs)

    return encode, decode


# ------------------------------------------------------------------ frames


def encode(message: Message) -> bytes:
    """Serialise a message into one frame."""
    enc, _ = _struct_codec(type(message))
    body = enc(message)
    return msgpack.packb({"v": PROTOCOL_VERSION, "type": message.TYPE, **body}, use_bin_type=True)


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError("msgpack extension types are not used by this protocol")


def _unpack(frame: bytes) -> Any:
    """One msgpack value with no extension types at all.

    msgpack decodes its Timestamp extension (-1) itself, bypassing ext_hook,
    so such values are rejected after the fact, wherever they sit.
    """
    value = msgpack.unpackb(frame, raw=False, strict_map_key=True, ext_hook=_no_ext)
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, msgpack.Timestamp):
            raise ValueError("msgpack extension types are not used by this protocol")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return value


def decode(frame: bytes, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Message:
    """Parse one frame into a message, or raise ProtocolError with the first rule broken."""
    if len(frame) > max_frame_bytes:
        raise ProtocolError(
            ErrorCode.FRAME_TOO_LARGE, f"frame of {len(frame)} bytes exceeds {max_frame_bytes}"
        )
    try:
        raw = _unpack(frame)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(ErrorCode.MALFORMED_FRAME, f"not one msgpack value: {exc}") from None
    if type(raw) is not dict:
        raise ProtocolError(ErrorCode.MALFORMED_FRAME, "a frame must be a msgpack map")
    version = raw.get("v")
    if type(version) is not int:
        raise ProtocolError(ErrorCode.MALFORMED_FRAME, "frame has no integer 'v' (wire version)")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"wire version {version} is not supported; this peer speaks {PROTOCOL_VERSION}",
        )
    name = raw.get("type")
    cls = MESSAGE_TYPES.get(name) if type(name) is str else None
    if cls is None:
        raise ProtocolError(ErrorCode.UNKNOWN_MESSAGE_TYPE, f"unknown message type {name!r:.80}")
    _, dec = _struct_codec(cls)
    return dec(raw, name)


def check(message: Message) -> None:
    """Raise the ProtocolError a peer would answer `message` with, before sending it."""
    decode(encode(message))
