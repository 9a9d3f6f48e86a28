"""Offers filtered by the hardware a node says it has (spec 4.5): `--min-vram` and `--gpu`.

Pure: reads `info.devices` and decides. A warm model is judged by the
devices that hold it; a cold one by any of the node's devices, since it
could be loaded on any of them. A node that lists no device passes no
active filter: it has not said what it runs on.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from protocol.messages import Capability, Device, Info

GIB = 1 << 30


class HardwareFilterError(ValueError):
    """A filter value that cannot be used; the message names it."""


@dataclass(frozen=True)
class HardwareFilter:
    min_vram_bytes: int = 0
    gpu: str | None = None
    """A shell-style pattern (`*4090*`, `NVIDIA H100*`), case-insensitive; a pattern
    without wildcards matches any GPU name containing it."""

    @classmethod
    def parse(cls, min_vram_gib: float | str | None, gpu: str | None) -> HardwareFilter:
        """From a GiB figure (a number or its text) and a pattern; HardwareFilterError if bad."""
        vram = 0
        if min_vram_gib not in (None, ""):
            try:
                gib = float(min_vram_gib)  # type: ignore[arg-type]
            except ValueError:
                raise HardwareFilterError(f"min VRAM {min_vram_gib!r} is not a number") from None
            if not 0 <= gib < 1 << 20:
                raise HardwareFilterError(f"min VRAM must be 0..1048575 GiB, got {gib:g}")
            vram = int(gib * GIB)
        pattern = (gpu or "").strip() or None
        if pattern is not None and len(pattern) > 128:
            raise HardwareFilterError("GPU pattern longer than 128 characters")
        return cls(vram, pattern)

    @property
    def active(self) -> bool:
        return self.min_vram_bytes > 0 or self.gpu is not None

    def describe(self) -> str:
        parts = []
        if self.min_vram_bytes:
            parts.append(f"at least {self.min_vram_bytes / GIB:g} GiB of VRAM")
        if self.gpu is not None:
            parts.append(f"a GPU matching {self.gpu!r}")
        return " and ".join(parts) or "any hardware"

    def matches(self, device: Device) -> bool:
        if (device.vram_total or 0) < self.min_vram_bytes:
            return False
        if self.gpu is None:
            return True
        pattern = self.gpu.lower()
        if not any(ch in pattern for ch in "*?["):
            pattern = f"*{pattern}*"
        return fnmatch.fnmatchcase(device.gpu.lower(), pattern)

    def refusal(self, info: Info, cap: Capability) -> str | None:
        """Why the node's offer of `cap` fails the filter, or None when it passes."""
        if not self.active:
            return None
        devices = [d for d in info.devices if cap.model_id in d.models] or list(info.devices)
        if not devices:
            return f"lists no device, so cannot show {self.describe()}"
        if any(self.matches(d) for d in devices):
            return None
        seen = ", ".join(describe_device(d) for d in devices)
        return f"has no device with {self.describe()} ({seen})"


def describe_device(device: Device) -> str:
    if device.vram_total is None:
        return f"{device.name}: {device.gpu}"
    return f"{device.name}: {device.gpu} {device.vram_total / GIB:.1f} GiB"
