"""TAESD previews: diffusers' AutoencoderTiny, when its weights are on disk.

TAESD decodes latents almost as well as the full VAE at a fraction of the
cost. Nothing is downloaded: weights are read from the directory in
$STEPSTREAM_TAESD_DIR (subdirectories `taesd` for SD 1.x/2.x and SVD,
`taesdxl` for SDXL) or from the Hugging Face cache (madebyollin/taesd,
madebyollin/taesdxl). A model that ships its own preview decoder (its
LoadedModel.taesd_dir, e.g. stepstream/tiny-shapes) uses that one instead.
Without any the caller falls back to latent_rgb.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Any

import torch

from pipelines.tiny import quiet_diffusers

log = logging.getLogger(__name__)

TAESD_DIR_ENV = "STEPSTREAM_TAESD_DIR"
REPOS = {"sd1": "madebyollin/taesd", "svd": "madebyollin/taesd", "sdxl": "madebyollin/taesdxl"}
"""The TAESD that matches each latent family (SVD shares SD's latent space)."""

_cache: dict[tuple[str, str, str], Any] = {}
_lock = threading.Lock()


def _local_dir(family: str) -> str | None:
    root = os.environ.get(TAESD_DIR_ENV)
    if not root:
        return None
    sub = Path(root).expanduser() / REPOS[family].split("/")[1]
    return str(sub) if (sub / "config.json").is_file() else None


def _load(family: str, device: str, dtype: torch.dtype, own: str | None) -> Any | None:
    from diffusers import AutoencoderTiny

    from pipelines.loader import hub_cache_dir

    local = own or _local_dir(family)
    with quiet_diffusers(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # huggingface_hub's deprecation chatter
        try:
            if local is not None:
                vae = AutoencoderTiny.from_pretrained(local, torch_dtype=dtype)
            else:
                vae = AutoencoderTiny.from_pretrained(
                    REPOS[family],
                    torch_dtype=dtype,
                    local_files_only=True,
                    cache_dir=hub_cache_dir(),
                )
        except (OSError, ValueError) as exc:
            log.info("no TAESD weights for %s on disk (%s)", family, type(exc).__name__)
            return None
    return vae.to(device).eval()


def taesd_for(
    family: str, device: str, dtype: torch.dtype, model_dir: str | None = None
) -> Any | None:
    """The AutoencoderTiny for `family` on `device`, or None when its weights are not on disk.

    `model_dir`, a model's own preview decoder (LoadedModel.taesd_dir), wins
    over the family's. Looked up once per (family or model_dir, device, dtype)
    and per directory setting.
    """
    if model_dir is None and family not in REPOS:
        return None
    source = model_dir or os.environ.get(TAESD_DIR_ENV, "")
    key = (family, f"{device}/{dtype}", source)
    with _lock:
        if key not in _cache:
            _cache[key] = _load(family, device, dtype, model_dir)
        return _cache[key]


def taesd_decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """(B, 4, h, w) latents in the UNet's space to (B, 3, 8h, 8w) RGB in 0..1."""
    with torch.inference_mode():
        lat = latents.detach().to(vae.device, vae.dtype) / vae.config.scaling_factor
        out = vae.decode(lat, return_dict=False)[0]
    return ((out.float() + 1) / 2).clamp(0, 1)
