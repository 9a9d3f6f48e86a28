"""Make a model's outputs independent of how many jobs share its batch.

A job batched with others must give the bytes it gives alone (issue 14). The
per-row arithmetic of most layers does not depend on the batch, but a BLAS or
oneDNN picks its kernel by shape, and two shapes differ in the last bits:

- a Linear over a few rows (the timestep embedding, each resnet's
  `time_emb_proj`: one row per image) takes a small-M path below some M;
- a convolution over one image takes another algorithm than over several.

Measured on this project's CPU build (tests/test_batching.py); other devices
choose kernels by their own rules, so whether a model is batch-invariant is
checked on its device when it loads (pipelines/batching.py) and batching stays
off where it is not. These hooks give every such layer the same shape class
whatever the batch: a few-row Linear gets its rows padded to a multiple of
LINEAR_ROWS, a one-image convolution a second (copied) image. Outputs are
sliced back; the padding costs a few rows of the smallest layers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

LINEAR_ROWS = 8
"""Few-row Linears run on a multiple of this many rows (4 and 8 already agree on
this CPU; 1 and 2 do not)."""

_MARK = "_stepstream_batch_invariant"


def _pad_rows(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    x = args[0]
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] % LINEAR_ROWS == 0:
        return None
    rows = x.shape[0]
    pad = LINEAR_ROWS - rows % LINEAR_ROWS
    module._stepstream_rows = rows  # type: ignore[assignment]
    return (torch.cat([x, x[-1:].expand(pad, -1)]), *args[1:])


def _cut_rows(module: nn.Module, _args: tuple[Any, ...], out: torch.Tensor) -> Any:
    rows = module.__dict__.pop("_stepstream_rows", None)
    return out if rows is None else out[:rows]


def _pad_image(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    x = args[0]
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] != 1:
        return None
    module._stepstream_rows = 1  # type: ignore[assignment]
    return (torch.cat([x, x]), *args[1:])


def make_batch_invariant(*modules: nn.Module) -> int:
    """Hook every Linear and Conv2d under `modules` (once); the number hooked."""
    hooked = 0
    for root in modules:
        for module in root.modules():
            if getattr(module, _MARK, False):
                continue
            if isinstance(module, nn.Linear):
                module.register_forward_pre_hook(_pad_rows)
            elif isinstance(module, nn.Conv2d):
                module.register_forward_pre_hook(_pad_image)
            else:
                continue
            module.register_forward_hook(_cut_rows)
            setattr(module, _MARK, True)
            hooked += 1
    return hooked
