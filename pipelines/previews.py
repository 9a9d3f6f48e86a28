"""Turn in-flight latents into small encoded preview frames.

A preview is the proof of work that releases the next payment, so it must be
cheap enough to send every few steps and small enough for one WebSocket
message: latent_rgb costs a 4x3 matrix multiply, vae a full decode.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from pipelines.schedule import schedule
from protocol.messages import JobRequest, Preview

if TYPE_CHECKING:
    from pipelines.loader import LoadedModel

log = logging.getLogger(__name__)

METHODS = ("latent_rgb", "taesd", "vae")
FORMATS = ("webp", "jpeg")
LATENT_SCALE = 8
"""Pixels per latent cell in SD 1.x/2.x and SDXL (the VAE scale factor)."""

# ComfyUI's factors: RGB = latents(4 channels) @ matrix + bias, then (x+1)/2.
LATENT_RGB: dict[str, tuple[list[list[float]], list[float]]] = {
    "sd1": (
        [
            [0.3512, 0.2297, 0.3227],
            [0.3250, 0.4974, 0.2350],
            [-0.2829, 0.1762, 0.2721],
            [-0.2120, -0.2616, -0.7177],
        ],
        [0.0, 0.0, 0.0],
    ),
    "sdxl": (
        [
            [0.3651, 0.4232, 0.4341],
            [-0.2533, -0.0042, 0.1068],
            [0.1076, 0.1111, -0.0362],
            [-0.3165, -0.2492, -0.2188],
        ],
        [0.1084, -0.0175, -0.0011],
    ),
}

LATENT_RGB["svd"] = LATENT_RGB["sd1"]
"""SVD's VAE is SD's (same latent space), applied frame by frame."""

QUALITIES = (80, 60, 40, 25, 10)
"""Tried in order before shrinking: quality is cheaper to give up than size."""
SHRINK = 0.75


def _to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) floats in 0..1 to one RGB image per batch item."""
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


Factors = tuple[list[list[float]], list[float]]
"""A 4x3 latent-to-RGB matrix and its 3 biases."""


def latent_rgb(
    latents: torch.Tensor,
    family: str,
    upscale: int = LATENT_SCALE,
    factors: Factors | None = None,
) -> list[Image.Image]:
    """Approximate RGB from latents with a linear map; one image per batch item.

    `factors` fitted to the model's own VAE (LoadedModel.latent_rgb_factors)
    win over the family's published ones. Each latent cell is one pixel, so
    the result is resized by `upscale` (bilinear) to the output's size: an
    8x8 preview of a 64x64 job would otherwise be a smudge.
    """
    if factors is None and family not in LATENT_RGB:
        raise ValueError(f"no latent_rgb factors for model family {family!r}")
    if latents.ndim != 4 or latents.shape[1] != 4:
        raise ValueError(f"expected latents of shape (B, 4, h, w), got {tuple(latents.shape)}")
    matrix, bias = factors if factors is not None else LATENT_RGB[family]
    lat = latents.detach().to(torch.float32)
    m = torch.tensor(matrix, dtype=torch.float32, device=lat.device)
    b = torch.tensor(bias, dtype=torch.float32, device=lat.device)
    rgb = torch.einsum("bchw,cr->brhw", lat, m) + b.view(1, 3, 1, 1)
    images = _to_pil((rgb + 1) / 2)
    if upscale == 1:
        return images
    return [
        im.resize((im.width * upscale, im.height * upscale), Image.Resampling.BILINEAR)
        for im in images
    ]


def vae_decode(model: LoadedModel, latents: torch.Tensor) -> list[Image.Image]:
    """Exact decode with the model's VAE; one image per batch item.

    The VAE works in unscaled latent space, so latents are divided by its
    scaling_factor (and shifted when the config has a shift_factor). VAEs
    flagged force_upcast (SDXL's) overflow in fp16, so they run in fp32 for the
    call and are put back, as the diffusers pipelines do for the final decode.
    """
    vae = model.pipe.vae
    config = vae.config
    lat = latents.detach() / config.scaling_factor
    shift = getattr(config, "shift_factor", None)
    if shift is not None:
        lat = lat + shift
    original = vae.dtype
    upcast = original == torch.float16 and bool(getattr(config, "force_upcast", False))
    # The temporal decoder of video models (SVD) wants the frame count.
    extra = {"num_frames": lat.shape[0]} if model.family == "svd" else {}
    with torch.inference_mode():
        if upcast:
            vae.to(torch.float32)
        try:
            decoded = vae.decode(lat.to(vae.device, vae.dtype), return_dict=False, **extra)[0]
        finally:
            if upcast:
                vae.to(original)
    return _to_pil((decoded.float() + 1) / 2)


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown preview format {fmt!r}; expected one of {FORMATS}")


def _tile(images: list[Image.Image]) -> Image.Image:
    """One frame with the batch side by side, so a preview is always one message."""
    if len(images) == 1:
        return images[0].convert("RGB")
    width = sum(im.width for im in images)
    height = max(im.height for im in images)
    frame = Image.new("RGB", (width, height))
    x = 0
    for im in images:
        frame.paste(im.convert("RGB"), (x, 0))
        x += im.width
    return frame


def _fit(image: Image.Image, max_side: int) -> Image.Image:
    """Downscale (never up) so the longer side is at most max_side, keeping aspect."""
    longer = max(image.size)
    if longer <= max_side:
        return image
    scale = max_side / longer
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR)


def _encode(image: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "webp":
        # method 2: about 3x faster than the default 4 at a few percent more bytes.
        image.save(buf, format="WEBP", quality=quality, method=2)
    else:
        image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_preview(
    images: list[Image.Image],
    fmt: str = "webp",
    max_side: int = 512,
    max_bytes: int = 256 * 1024,
) -> tuple[bytes, int, int]:
    """Tile, downscale and encode images into one frame under max_bytes.

    Returns (bytes, width, height) of the encoded frame. Lowers quality first,
    then size; raises ValueError if even a 1-pixel-high frame does not fit.
    """
    _check_format(fmt)
    if not images:
        raise ValueError("no images to encode")
    if max_side < 1 or max_bytes < 1:
        raise ValueError("max_side and max_bytes must be positive")
    frame = _fit(_tile(images), max_side)
    while True:
        for quality in QUALITIES:
            data = _encode(frame, fmt, quality)
            if len(data) <= max_bytes:
                return data, frame.width, frame.height
        if min(frame.size) <= 1:
            raise ValueError(f"cannot encode a {fmt} preview under {max_bytes} bytes")
        size = (max(1, int(frame.width * SHRINK)), max(1, int(frame.height * SHRINK)))
        frame = frame.resize(size, Image.Resampling.BILINEAR)


# ------------------------------------------------------------------ any job


@dataclass(frozen=True)
class RenderedPreview:
    """An encoded preview and how it was made."""

    data: bytes
    width: int
    height: int
    method: str
    """The method used: the one asked for, or latent_rgb when TAESD weights are missing."""
    frames: int = 1
    """Video frames shown: 1, or every frame (an animated WebP, or a JPEG grid)."""


def _flatten(latents: torch.Tensor, frame: int | None) -> tuple[torch.Tensor, int]:
    """Image latents (B, 4, h, w) as they are; video latents (B, F, 4, h, w) as 4-D frames.

    Returns the 4-D latents and how many frames of one video they hold (1 for images).
    """
    if latents.ndim == 4:
        return latents, 1
    if latents.ndim != 5:
        raise ValueError(f"expected 4-D or 5-D latents, got {tuple(latents.shape)}")
    if frame is not None:
        if not 0 <= frame < latents.shape[1]:
            raise ValueError(f"frame {frame} outside 0..{latents.shape[1] - 1}")
        return latents[:, frame], 1
    return latents[0], latents.shape[1]  # one video per job: its frames


def _grid(images: list[Image.Image]) -> Image.Image:
    """Frames in a near-square grid, row by row (JPEG has no animation)."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    frame = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        frame.paste(im.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return frame


def encode_animation(
    frames: list[Image.Image], max_side: int, max_bytes: int, fps: int = 6
) -> tuple[bytes, int, int]:
    """An animated WebP of the frames under max_bytes: lower quality first, then size."""
    size = _fit(frames[0], max_side).size
    while True:
        scaled = [f.convert("RGB").resize(size, Image.Resampling.BILINEAR) for f in frames]
        for quality in QUALITIES:
            buf = io.BytesIO()
            scaled[0].save(
                buf,
                format="WEBP",
                save_all=True,
                append_images=scaled[1:],
                duration=max(1, 1000 // max(1, fps)),
                loop=0,
                quality=quality,
                method=2,
            )
            if buf.tell() <= max_bytes:
                return buf.getvalue(), size[0], size[1]
        if min(size) <= 1:
            raise ValueError(f"cannot encode an animated preview under {max_bytes} bytes")
        size = (max(1, int(size[0] * SHRINK)), max(1, int(size[1] * SHRINK)))


def _decode(model: LoadedModel, lat: torch.Tensor, method: str) -> tuple[list[Image.Image], str]:
    if method == "taesd":
        from pipelines.taesd import taesd_decode, taesd_for

        vae = taesd_for(model.family, model.device, model.dtype, model.taesd_dir)
        if vae is not None:
            return _to_pil(taesd_decode(vae, lat)), "taesd"
        log.info("no TAESD weights for %s: preview falls back to latent_rgb", model.family)
        method = "latent_rgb"
    if method == "latent_rgb":
        return latent_rgb(lat, model.family, factors=model.latent_rgb_factors), method
    if method == "vae":
        return vae_decode(model, lat), method
    raise ValueError(f"unknown preview method {method!r}; expected one of {METHODS}")


def render_preview(
    model: LoadedModel,
    latents: torch.Tensor,
    method: str = "latent_rgb",
    fmt: str = "webp",
    max_side: int = 512,
    max_bytes: int = 256 * 1024,
    frame: int | None = None,
) -> RenderedPreview:
    """A preview of image or video latents; for video, one chosen frame or all of them."""
    _check_format(fmt)
    lat, frames = _flatten(latents, frame)
    images, used = _decode(model, lat, method)
    if frames == 1:
        data, w, h = encode_preview(images, fmt=fmt, max_side=max_side, max_bytes=max_bytes)
    elif fmt == "webp":
        data, w, h = encode_animation(images, max_side, max_bytes)
    else:
        data, w, h = encode_preview([_grid(images)], fmt, max_side, max_bytes)
    return RenderedPreview(data, w, h, used, frames)


def noise_scales(model: LoadedModel, num_inference_steps: int) -> list[float]:
    """Per completed step k, the factor that brings the latents back to unit variance.

    Euler-family schedulers keep latents at variance sigma_k^2 + 1 (sigma_max
    is ~15 for SD), which a preview would show as saturated noise until the
    last steps; dividing by sqrt(sigma_k^2 + 1) shows what variance-preserving
    schedulers (DDIM, PNDM) already give, and is 1 at the end. Schedulers
    without sigmas need no scaling.
    """
    plan = schedule(model.pipe.scheduler, num_inference_steps)
    if plan.sigmas is None:
        return [1.0] * (plan.timesteps + 1)
    return [math.sqrt(s**2 + 1.0) for s in plan.sigmas]


PREVIEW_MAX_SIDE = 512
PREVIEW_MAX_BYTES = 256 * 1024
"""Spec 9.3's caps on one preview."""


class StepPreviews:
    """A job's previews: which steps get one (spec 9.3) and the preview itself.

    The cadence, the noise scaling and the caps live in one place.
    """

    def __init__(self, model: LoadedModel, request: JobRequest, total_steps: int) -> None:
        self.model = model
        self.request = request
        self.total_steps = total_steps
        scales = noise_scales(model, request.params.num_inference_steps)
        # Image-to-image and resumed jobs run only the last steps of their schedule.
        self._scales = scales[max(0, len(scales) - 1 - total_steps) :]

    def due(self, step: int) -> bool:
        req = self.request
        return req.preview_method != "none" and (
            step % req.preview_every == 0 or step == self.total_steps
        )

    def message(self, step: int, latents: torch.Tensor) -> Preview:
        """The preview of `latents` after `step`."""
        return self.render(step, self.scaled(step, latents))

    def scaled(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        """The latents after `step` at unit variance: a new tensor (on a GPU, queued work,
        no sync), so `render` may run on another thread while the steps go on."""
        return latents.detach() / self._scales[min(step, len(self._scales) - 1)]

    def render(self, step: int, scaled: torch.Tensor) -> Preview:
        """The preview message of latents `scaled` gave: decode, downscale, encode."""
        req = self.request
        shown = render_preview(
            self.model,
            scaled,
            req.preview_method,
            req.preview_format,
            PREVIEW_MAX_SIDE,
            PREVIEW_MAX_BYTES,
            req.preview_frame,
        )
        return Preview(
            job_id=req.job_id,
            step=step,
            image=shown.data,
            format=req.preview_format,
            width=shown.width,
            height=shown.height,
            method=None if shown.method == req.preview_method else shown.method,
            frames=shown.frames,
        )
