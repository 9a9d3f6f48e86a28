"""Reading go-livepeer's aiModels.json, and saying plainly what is not supported yet."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from protocol.pricing import price_from_ai_models

log = logging.getLogger(__name__)

SUPPORTED_PIPELINES = frozenset({"text-to-image", "image-to-image", "image-to-video"})
KNOWN_FIELDS = frozenset(
    {
        "pipeline",
        "model_id",
        "url",
        "token",
        "warm",
        "capacity",
        "optimization_flags",
        "price_per_unit",
        "pixels_per_unit",
        "currency",
        "max_batch",
        "batch_wait_ms",
    }
)


MAX_BATCH = 64
MAX_BATCH_WAIT_MS = 60_000


class ConfigError(Exception):
    """aiModels.json cannot be used; the message says which entry and why."""


@dataclass(frozen=True)
class ModelEntry:
    pipeline: str
    model_id: str
    warm: bool
    capacity: int
    price_per_pixel_step: Fraction
    url: str | None = None
    """An external runner serving this model (ws:// or wss://; http(s):// is read as ws(s)://)."""
    token: str | None = None
    """The bearer token that runner expects."""
    max_batch: int = 1
    """Jobs that may run as one batch (spec/RUNNER.md 5.2); the runner enables it only
    where a gain it measures pays and batched bytes match; 1: off."""
    batch_wait_ms: int = 0
    """How long a job waits for others to share its batch."""


def _int_field(entry: dict[str, Any], name: str, default: int, where: str) -> int:
    value = entry.get(name, default)
    # go-livepeer accepts prices as JSON numbers or decimal strings.
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: '{name}' must be a whole number, got {value!r}")
    return value


def parse_entry(entry: Any, where: str) -> ModelEntry | None:
    """One aiModels.json entry, or None (with a warning) when it needs an unsupported feature."""
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: each entry must be a JSON object")
    for name in ("pipeline", "model_id"):
        if not isinstance(entry.get(name), str) or not entry[name]:
            raise ConfigError(f"{where}: '{name}' is required and must be a string")
    pipeline, model_id = entry["pipeline"], entry["model_id"]
    label = f"{where} ({pipeline} {model_id})"
    for name in sorted(set(entry) - KNOWN_FIELDS):
        log.warning("%s: unknown field %r ignored", label, name)
    if pipeline not in SUPPORTED_PIPELINES:
        log.warning("%s: pipeline %r is not supported yet; entry skipped", label, pipeline)
        return None
    url = runner_url(entry.get("url"), label)
    token = entry.get("token")
    if token is not None and not isinstance(token, str):
        raise ConfigError(f"{label}: 'token' must be a string")
    if entry.get("optimization_flags"):
        log.warning("%s: optimization_flags are not supported yet and are ignored", label)
    currency = str(entry.get("currency", "WEI")).upper()
    if currency != "WEI":
        raise ConfigError(f"{label}: currency {currency!r} is not supported yet; use WEI")
    warm = entry.get("warm", False)
    if not isinstance(warm, bool):
        raise ConfigError(f"{label}: 'warm' must be true or false")
    capacity = _int_field(entry, "capacity", 1, label)
    if capacity < 1:
        raise ConfigError(f"{label}: 'capacity' must be at least 1")
    price_per_unit = _int_field(entry, "price_per_unit", 0, label)
    pixels_per_unit = _int_field(entry, "pixels_per_unit", 1, label)
    try:
        price = price_from_ai_models(price_per_unit, pixels_per_unit, pipeline)
    except ValueError as exc:
        raise ConfigError(f"{label}: {exc}") from None
    max_batch = _int_field(entry, "max_batch", 1, label)
    if not 1 <= max_batch <= MAX_BATCH:
        raise ConfigError(f"{label}: 'max_batch' must be from 1 to {MAX_BATCH}")
    batch_wait_ms = _int_field(entry, "batch_wait_ms", 0, label)
    if not 0 <= batch_wait_ms <= MAX_BATCH_WAIT_MS:
        raise ConfigError(f"{label}: 'batch_wait_ms' must be from 0 to {MAX_BATCH_WAIT_MS}")
    if max_batch > capacity:
        log.warning("%s: max_batch %d above capacity %d: batches stay below", label, max_batch,
                    capacity)  # fmt: skip
    return ModelEntry(
        pipeline, model_id, warm, capacity, price, url, token, max_batch, batch_wait_ms
    )


def runner_url(value: Any, label: str) -> str | None:
    """An external runner's WebSocket URL from an aiModels.json `url`, or None when absent."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{label}: 'url' must be a string")
    for plain, ws in (("http://", "ws://"), ("https://", "wss://")):
        if value.startswith(plain):
            value = ws + value.removeprefix(plain)
    if not value.startswith(("ws://", "wss://")):
        raise ConfigError(f"{label}: 'url' must be ws://, wss://, http:// or https://")
    return value


def load_ai_models(path: Path) -> list[ModelEntry]:
    """Parse an aiModels.json file; refuses a file with no usable entry."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: expected a JSON list of model entries")
    entries = [parse_entry(e, f"{path}[{i}]") for i, e in enumerate(raw)]
    usable = [e for e in entries if e is not None]
    if not usable:
        raise ConfigError(f"{path}: no entry this orchestrator can serve")
    return usable
