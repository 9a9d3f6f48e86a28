"""aiModels.json as go-livepeer writes it, and what this orchestrator says about it."""

from __future__ import annotations

import json
import logging
from fractions import Fraction
from pathlib import Path

import pytest

from orchestrator.config import ConfigError, load_ai_models


def write(tmp_path: Path, entries: object) -> Path:
    path = tmp_path / "aiModels.json"
    path.write_text(json.dumps(entries))
    return path


def test_go_livepeer_entry_maps_price_per_pixel_to_pixel_steps(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        [
            {
                "pipeline": "text-to-image",
                "model_id": "stepstream/tiny-sd",
                "warm": True,
                "capacity": 2,
                "price_per_unit": 4768371,
                "pixels_per_unit": 1,
                "currency": "WEI",
            },
            # go-livepeer also accepts prices as decimal strings.
            {
                "pipeline": "text-to-image",
                "model_id": "b",
                "price_per_unit": "100",
                "pixels_per_unit": "2",
            },
        ],
    )
    a, b = load_ai_models(path)
    assert (a.warm, a.capacity) == (True, 2)
    # 50 reference steps for text-to-image (spec P2).
    assert a.price_per_pixel_step == Fraction(4768371, 50)
    assert b.price_per_pixel_step == Fraction(100, 2 * 50)
    assert (b.warm, b.capacity) == (False, 1)
    assert (a.max_batch, a.batch_wait_ms) == (1, 0)  # batching is off unless asked


def test_batching_fields_reach_the_entry(tmp_path: Path) -> None:
    entry = {"pipeline": "text-to-image", "model_id": "m", "capacity": 4, "max_batch": 4,
             "batch_wait_ms": 50}  # fmt: skip
    (parsed,) = load_ai_models(write(tmp_path, [entry]))
    assert (parsed.max_batch, parsed.batch_wait_ms) == (4, 50)


def test_unsupported_entries_are_skipped_and_external_runners_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(
        tmp_path,
        [
            {"pipeline": "text-to-image", "model_id": "ok"},
            {"pipeline": "audio-to-text", "model_id": "whisper"},
            {"pipeline": "text-to-image", "model_id": "ext", "url": "http://r", "token": "t"},
            {"pipeline": "text-to-image", "model_id": "f", "optimization_flags": {"SFAST": True}},
        ],
    )
    with caplog.at_level(logging.WARNING):
        entries = load_ai_models(path)
    assert [e.model_id for e in entries] == ["ok", "ext", "f"]
    assert (entries[1].url, entries[1].token) == ("ws://r", "t")
    text = caplog.text
    assert "'audio-to-text' is not supported yet" in text
    assert "optimization_flags are not supported yet" in text


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"not": "a list"}, "expected a JSON list"),
        ([{"pipeline": "text-to-image"}], "'model_id' is required"),
        (
            [{"pipeline": "text-to-image", "model_id": "m", "currency": "USD"}],
            "'USD' is not supported",
        ),
        ([{"pipeline": "text-to-image", "model_id": "m", "capacity": 0}], "'capacity' must be"),
        ([{"pipeline": "text-to-image", "model_id": "m", "price_per_unit": 1.5}], "whole number"),
        ([{"pipeline": "text-to-image", "model_id": "m", "pixels_per_unit": 0}], "pixels_per_unit"),
        ([{"pipeline": "audio-to-text", "model_id": "w"}], "no entry this orchestrator can serve"),
        ([{"pipeline": "text-to-image", "model_id": "m", "url": "ftp://r"}], "'url' must be"),
        ([{"pipeline": "text-to-image", "model_id": "m", "max_batch": 0}], "'max_batch' must"),
        ([{"pipeline": "text-to-image", "model_id": "m", "max_batch": 65}], "from 1 to 64"),
        ([{"pipeline": "text-to-image", "model_id": "m", "batch_wait_ms": -1}], "'batch_wait_ms'"),
        ([{"pipeline": "text-to-image", "model_id": "m", "batch_wait_ms": 0.5}], "whole number"),
    ],
)
def test_bad_files_get_a_message_naming_the_problem(
    tmp_path: Path, entries: object, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_ai_models(write(tmp_path, entries))


def test_missing_and_invalid_json_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_ai_models(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_ai_models(bad)
