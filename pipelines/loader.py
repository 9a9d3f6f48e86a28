"""Resolve a model id to a ready pipeline, offline.

The orchestrator advertises only what it can run without a download, so
loading never touches the network: the reserved tiny ids are built in code
or read from weights shipped in this package, a local directory is read as
is, anything else must already be in the Hugging Face cache. A model
directory may carry its own preview helpers (see pipelines/tiny_shapes.py):
`latent_rgb.json`, factors fitted to its VAE, and `taesd/`, a preview decoder.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipelines.devices import allocated_bytes, tensor_bytes
from pipelines.errors import ModelNotFound
from pipelines.tiny import TINY_SD, TINY_SDXL, build_tiny_sd, build_tiny_sdxl, quiet_diffusers
from pipelines.tiny_shapes import TAESD_SUBDIR, TINY_SHAPES, WEIGHTS_DIR, load_latent_rgb
from pipelines.tiny_svd import TINY_SVD, build_tiny_svd
from pipelines.tokenizers import TokenizerPool

__all__ = [
    "LoadedModel",
    "ModelNotFound",
    "default_device",
    "hub_cache_dir",
    "load_model",
    "pipeline_family",
]

MODEL_INDEX = "model_index.json"
TINY_BUILDERS: dict[str, Any] = {
    TINY_SD: build_tiny_sd,
    TINY_SDXL: build_tiny_sdxl,
    TINY_SVD: build_tiny_svd,
}
"""Reserved model ids built in code, for tests and the demo."""
TINY_DIRS: dict[str, Path] = {TINY_SHAPES: WEIGHTS_DIR}
"""Reserved model ids whose trained weights ship in this package."""


@dataclass
class LoadedModel:
    """A pipeline on its device, with what the job code needs to know about it."""

    model_id: str
    pipe: Any
    """A diffusers pipeline (StableDiffusionPipeline, StableDiffusionXLPipeline, ...)."""
    family: str
    """"sd1" (SD 1.x/2.x), "sdxl" or "svd" (video): picks preview factors and pipelines."""
    device: str
    dtype: torch.dtype
    load_seconds: float
    footprint_bytes: int = 0
    """Memory the model holds on its device, measured at load (GPU allocator delta, else
    its tensors' bytes)."""
    offloaded: bool = False
    latent_rgb_factors: tuple[list[list[float]], list[float]] | None = None
    """latent_rgb's (4x3 matrix, bias) fitted to this model's VAE; None: its family's."""
    taesd_dir: str | None = None
    """A TAESD-architecture preview decoder made for this model; None: its family's TAESD."""
    tokenizers: TokenizerPool = field(init=False, repr=False)
    """Each job in flight borrows its own tokenizers (pipelines/job_pipeline.py)."""

    def __post_init__(self) -> None:
        self.tokenizers = TokenizerPool(self.pipe)


def default_device() -> str:
    """CUDA when there is one; CPU otherwise, so tests and the demo run anywhere."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtype_for(device: str) -> torch.dtype:
    """fp16 halves memory and time on GPUs; CPUs lack fast fp16 kernels."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def hub_cache_dir() -> str:
    """The Hugging Face hub cache, re-reading the environment at call time.

    huggingface_hub.constants freezes HF_HOME / HF_HUB_CACHE when it is first
    imported; reading the variables again lets a caller (or a test) point at
    another cache later. Precedence matches huggingface_hub's.
    """
    from huggingface_hub import constants

    def expand(p: str) -> str:
        return os.path.expandvars(os.path.expanduser(p))

    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return expand(os.environ[var])
    if os.environ.get("HF_HOME"):
        return os.path.join(expand(os.environ["HF_HOME"]), "hub")
    return constants.HF_HUB_CACHE


def _looks_like_path(model_id: str) -> bool:
    """True for filesystem paths; a hub id is "name" or "org/name"."""
    return (
        model_id.startswith(("/", ".", "~"))
        or "\\" in model_id
        or model_id.count("/") > 1
        or os.path.isabs(model_id)
    )


def _hub_repo_dir(cache_dir: str, model_id: str) -> str:
    """Where huggingface_hub keeps a model repo (for error messages)."""
    return os.path.join(cache_dir, "models--" + model_id.replace("/", "--"))


def _cached_in_hub(model_id: str, cache_dir: str) -> bool:
    """Whether the cache holds the repo's model_index.json at its main ref."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        hit = try_to_load_from_cache(model_id, MODEL_INDEX, cache_dir=cache_dir)
    except HFValidationError:
        return False
    return isinstance(hit, str)


def pipeline_family(pipe: Any) -> str:
    """Classify a pipeline's latent space from its class.

    SDXL pipeline classes are all named StableDiffusionXL*; Stable Video
    Diffusion shares SD's latent space but runs on 5-D video latents and
    serves image-to-video only, so it is its own family. Other latent spaces
    (SD3, Flux: 16 channels) have no preview factors here, so they are refused.
    """
    vae = getattr(pipe, "vae", None)
    channels = getattr(getattr(vae, "config", None), "latent_channels", 4)
    if channels != 4:
        raise ValueError(
            f"{type(pipe).__name__} has {channels} latent channels; only 4-channel "
            "SD 1.x/2.x and SDXL pipelines are supported"
        )
    name = type(pipe).__name__
    if "StableVideoDiffusion" in name:
        return "svd"
    return "sdxl" if "StableDiffusionXL" in name else "sd1"


def _from_pretrained(source: str, dtype: torch.dtype, cache_dir: str | None) -> Any:
    with quiet_diffusers():
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(
            source, torch_dtype=dtype, local_files_only=True, cache_dir=cache_dir
        )


def load_model(model_id: str, device: str | None = None, offload: bool = False) -> LoadedModel:
    """Load `model_id` onto `device` (default: CUDA if available, else CPU).

    fp16 on CUDA, fp32 on the CPU. `offload` (CUDA only) keeps the weights in
    CPU memory and moves each submodule to the GPU as it runs
    (diffusers' enable_sequential_cpu_offload): slow, but fits small cards.

    Raises ModelNotFound, naming every place searched, when no local copy
    exists. Errors from a copy that exists but is broken propagate as they are.
    """
    device = device or default_device()
    dtype = _dtype_for(device)
    offload = offload and torch.device(device).type == "cuda"
    before = allocated_bytes(device)
    start = time.perf_counter()
    directory: Path | None = None

    if model_id in TINY_DIRS:
        directory = TINY_DIRS[model_id]
        pipe = _from_pretrained(str(directory), dtype, None)
    elif model_id in TINY_BUILDERS:
        pipe = TINY_BUILDERS[model_id]()
        if dtype != torch.float32:
            # Random weights have nothing to keep in fp32; silence diffusers' advice about it.
            with quiet_diffusers():
                pipe = pipe.to(dtype=dtype)
    else:
        local = Path(model_id).expanduser()
        if local.is_dir():
            if not (local / MODEL_INDEX).is_file():
                raise ModelNotFound(model_id, [str(local.resolve() / MODEL_INDEX)])
            pipe = _from_pretrained(str(local), dtype, None)
            directory = local
        elif _looks_like_path(model_id):
            raise ModelNotFound(model_id, [str(local.resolve())])
        else:
            cache_dir = hub_cache_dir()
            if not _cached_in_hub(model_id, cache_dir):
                searched = [
                    f"local directory {local.resolve()}",
                    f"Hugging Face cache {_hub_repo_dir(cache_dir, model_id)}",
                ]
                raise ModelNotFound(model_id, searched)
            pipe = _from_pretrained(model_id, dtype, cache_dir)

    if offload:
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    after = allocated_bytes(device)
    footprint = after - before if after is not None and before is not None else 0
    return LoadedModel(
        model_id=model_id,
        pipe=pipe,
        family=pipeline_family(pipe),
        device=device,
        dtype=dtype,
        load_seconds=time.perf_counter() - start,
        footprint_bytes=footprint if after is not None else tensor_bytes(pipe),
        offloaded=offload,
        latent_rgb_factors=load_latent_rgb(directory) if directory else None,
        taesd_dir=_taesd_dir(directory),
    )


def _taesd_dir(directory: Path | None) -> str | None:
    """The model's own preview decoder directory, when it ships one."""
    if directory is None or not (directory / TAESD_SUBDIR / "config.json").is_file():
        return None
    return str(directory / TAESD_SUBDIR)
