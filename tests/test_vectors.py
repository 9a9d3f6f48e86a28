"""spec/vectors/messages.json against protocol.codec, and the generator's reproducibility."""

from __future__ import annotations

import importlib.util
import json
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import msgpack
import pytest

from protocol import codec
from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import MESSAGE_TYPES, PROTOCOL_VERSION

SPEC_VECTORS = Path(__file__).resolve().parents[1] / "spec" / "vectors"
VECTORS_FILE = SPEC_VECTORS / "messages.json"


@cache
def _generator() -> ModuleType:
    path = SPEC_VECTORS / "make_message_vectors.py"
    spec = importlib.util.spec_from_file_location("make_message_vectors", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _doc() -> dict[str, Any]:
    doc = json.loads(VECTORS_FILE.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


@pytest.mark.parametrize("vector", _doc()["vectors"], ids=lambda v: v["name"])
def test_message_vector(vector: dict[str, Any]) -> None:
    message = _generator().message_from_vector(vector)
    frame = bytes.fromhex(vector["frame"])
    assert vector["type"] == type(message).TYPE
    assert codec.encode(message) == frame
    assert codec.decode(frame) == message
    # The JSON form is the field values, independently of the generator's converter.
    raw = msgpack.unpackb(frame, raw=False)
    assert list(raw)[:2] == ["v", "type"]
    assert raw["v"] == PROTOCOL_VERSION and raw["type"] == vector["type"]
    assert list(raw)[2:] == list(vector["fields"])


@pytest.mark.parametrize("entry", _doc()["invalid_frames"], ids=lambda e: e["name"])
def test_invalid_frame(entry: dict[str, Any]) -> None:
    cap = entry.get("max_frame_bytes", codec.DEFAULT_MAX_FRAME_BYTES)
    with pytest.raises(ProtocolError) as info:
        codec.decode(bytes.fromhex(entry["frame"]), cap)
    assert info.value.code is ErrorCode(entry["code"])
    if "path" in entry:
        assert info.value.code is ErrorCode.INVALID_FIELD
        assert info.value.message.startswith(entry["path"] + ":")


def test_vectors_cover_every_type_and_decode_rule() -> None:
    doc = _doc()
    assert {v["type"] for v in doc["vectors"]} == set(MESSAGE_TYPES)
    assert {e["code"] for e in doc["invalid_frames"]} == {
        ErrorCode.FRAME_TOO_LARGE.value,
        ErrorCode.MALFORMED_FRAME.value,
        ErrorCode.UNSUPPORTED_VERSION.value,
        ErrorCode.UNKNOWN_MESSAGE_TYPE.value,
        ErrorCode.INVALID_FIELD.value,
    }
    names = [v["name"] for v in doc["vectors"]] + [e["name"] for e in doc["invalid_frames"]]
    assert len(names) == len(set(names))


def test_json_forms() -> None:
    by_name = {v["name"]: v["fields"] for v in _doc()["vectors"]}
    params = by_name["accepted"]["ticket_params"]
    assert params["face_value"] == str(2**256 - 1)  # U256 as a decimal string
    assert params["recipient"] == "73aed7b5deb30222fa896f399d46cc99c7bee57f"  # bytes as hex
    assert by_name["accepted"]["price_per_pixel_step"] == "4768371/50"
    assert by_name["job"]["params"]["seed"] is None
    assert by_name["error_fatal"]["job_id"] is None
    assert by_name["error_job"]["job_id"] == "job-0001"


def test_generator_reproduces_file(tmp_path: Path) -> None:
    out = tmp_path / "messages.json"
    _generator().main([str(out)])
    assert out.read_bytes() == VECTORS_FILE.read_bytes()
