"""Where a cold model goes: pure decisions over device memory and measured footprints.

A device's pool is its memory (or a configured budget); each resident model
holds its footprint, measured when it was loaded. A model whose footprint is
not known yet (never loaded here) counts as zero until it has been measured.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Resident:
    model_id: str
    footprint: int
    busy: bool
    """A job is running on it, or it is a warm (pinned) model: never evicted."""
    last_used: float


@dataclass(frozen=True)
class DevicePool:
    name: str
    memory: int
    residents: tuple[Resident, ...]

    @property
    def free(self) -> int:
        return self.memory - sum(r.footprint for r in self.residents)


@dataclass(frozen=True)
class Placement:
    device: str
    evict: tuple[str, ...]
    """Idle cold models to unload first, least recently used first."""


def place(devices: list[DevicePool], need: int) -> Placement | None:
    """The device to load a model of `need` bytes on, evicting as few idle models as needed.

    Prefers a device where it fits as is (the one with most free memory);
    otherwise the one needing the fewest evictions of idle models, least
    recently used first. None when no device can hold it.
    """
    fits = [d for d in devices if d.free >= need]
    if fits:
        return Placement(max(fits, key=lambda d: d.free).name, ())
    best: Placement | None = None
    for device in devices:
        free, evict = device.free, []
        for resident in sorted(device.residents, key=lambda r: r.last_used):
            if free >= need:
                break
            if not resident.busy:
                free += resident.footprint
                evict.append(resident.model_id)
        if free >= need and (best is None or len(evict) < len(best.evict)):
            best = Placement(device.name, tuple(evict))
    return best
