"""Devices and memory: which devices a machine has, their memory, and a model's footprint.

Placement (orchestrator/placement.py) needs numbers, not guesses: a GPU's
memory from torch.cuda, a CPU pool from a configured budget or the system's
memory, and a model's footprint measured once it is loaded.
"""

from __future__ import annotations

import os
from typing import Any

import torch

CPU_SLOTS_DEFAULT = 1
"""Managed runners on a machine without a GPU: one, since every CPU runner shares the cores."""


def cuda_devices() -> list[str]:
    """ "cuda:0", "cuda:1", ... for every visible GPU; empty without CUDA."""
    if not torch.cuda.is_available():
        return []
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def system_memory_bytes() -> int:
    """Physical memory of this machine (Linux and macOS sysconf names)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def device_memory_bytes(device: str, budget: int | None = None) -> int:
    """The pool models on `device` share: `budget` if given, else the GPU's or system's memory."""
    if budget is not None:
        return budget
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.get_device_properties(dev.index or 0).total_memory)
    return system_memory_bytes()


def _modules(pipe: Any) -> list[torch.nn.Module]:
    components = getattr(pipe, "components", {}) or {}
    return [m for m in components.values() if isinstance(m, torch.nn.Module)]


def tensor_bytes(pipe: Any) -> int:
    """Bytes held by a pipeline's weights and buffers (each shared tensor counted once)."""
    seen: set[int] = set()
    total = 0
    for module in _modules(pipe):
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def allocated_bytes(device: str) -> int | None:
    """Memory torch has allocated on a CUDA device; None on the CPU (no allocator to ask)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    return int(torch.cuda.memory_allocated(dev))
