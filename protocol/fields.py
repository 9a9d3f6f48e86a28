"""Field constraints for protocol messages.

Message fields are annotated with these markers (``Annotated[int, Int(0, 9)]``)
so that one table, the dataclass itself, says both the Python type and what
the codec accepts on the wire. spec/PROTOCOL.md names the same aliases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated


@dataclass(frozen=True)
class Int:
    """A msgpack integer in [min, max]."""

    min: int
    max: int


@dataclass(frozen=True)
class Float:
    """A finite number in [min, max]; msgpack ints are accepted too."""

    min: float
    max: float


@dataclass(frozen=True)
class Str:
    """A UTF-8 string whose length in characters is in [min_len, max_len]."""

    min_len: int
    max_len: int


@dataclass(frozen=True)
class Bin:
    """A byte string whose length is in [min_len, max_len]."""

    min_len: int
    max_len: int


@dataclass(frozen=True)
class Wide:
    """An unsigned 256-bit integer, sent as 32 big-endian bytes (msgpack ints stop at 64 bits)."""


@dataclass(frozen=True)
class Items:
    """A list whose length is in [min_items, max_items]."""

    min_items: int
    max_items: int


@dataclass(frozen=True)
class KeyedBy:
    """A structure whose class is picked by a sibling field decoded before it.

    ``choices`` maps the sibling's value to a dataclass; any other value
    decodes the field as ``other`` (a structure that ignores its keys), so a
    peer can refuse a value it does not know at the job level rather than
    failing the frame.
    """

    key: str
    choices: tuple[tuple[str, type], ...]
    other: type


@dataclass(frozen=True)
class Added:
    """An optional field added by a minor revision (spec section 12).

    Encoders leave it out of the frame while it holds its default, so a frame
    that does not use the new feature is byte-identical to the older revision's.
    """


UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1

UInt32 = Annotated[int, Int(0, UINT32_MAX)]
UInt64 = Annotated[int, Int(0, UINT64_MAX)]
U256 = Annotated[int, Wide()]
Address = Annotated[bytes, Bin(20, 20)]
Hash32 = Annotated[bytes, Bin(32, 32)]
JobId = Annotated[str, Str(1, 64)]
ModelId = Annotated[str, Str(1, 256)]
Name = Annotated[str, Str(1, 64)]
