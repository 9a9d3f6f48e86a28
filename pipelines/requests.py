"""What a job asks for, checked before any GPU work: sizes, input images, pixels.

Torch-free, so the orchestrator can refuse a job (and the broadcaster can
check a quote) without touching a model. Every refusal is an InvalidRequest
whose message says what to change.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image

from pipelines.errors import InvalidRequest
from protocol.messages import (
    ImageToImageParams,
    ImageToVideoParams,
    JobParams,
    TextToImageParams,
)

__all__ = [
    "MAX_INPUT_PIXELS",
    "MAX_PIXELS_PER_IMAGE",
    "MAX_PIXELS_PER_JOB",
    "MAX_PIXELS_PER_VIDEO",
    "PIXEL_MULTIPLE",
    "OutputShape",
    "decode_image",
    "output_shape",
    "planned_steps",
]

MAX_PIXELS_PER_IMAGE = 2048 * 2048
"""Past this SD-family UNets produce tiling artefacts and attention memory explodes."""
MAX_PIXELS_PER_JOB = 4 * 1024 * 1024
"""Output pixels of an image job (or of a video job whose frames must fit one result
frame): four 1024x1024 images fit a 24 GB GPU with SDXL in fp16, and their PNGs fit one
16 MiB frame."""
MAX_PIXELS_PER_VIDEO = 64 * 1024 * 1024
"""Output pixels of a video job whose frames are streamed one message each (spec 9.4):
ai-runner's default (25 frames of 1024x576, 14.7 Mpx) with room to spare."""
MAX_INPUT_PIXELS = 4096 * 4096
"""Largest input image decoded at all (a decompression-bomb guard)."""
PIXEL_MULTIPLE = 8
"""The VAE scale factor: latents are (height/8, width/8)."""


@dataclass(frozen=True)
class OutputShape:
    """The output of a job: `count` images (or frames) of width x height."""

    width: int
    height: int
    count: int
    video: bool = False

    @property
    def pixels_per_step(self) -> int:
        """Pixels one denoising step carries: the unit of price (spec 6.1)."""
        return self.width * self.height * self.count


def decode_image(data: bytes | None, pipeline: str) -> Image.Image:
    """The input image as RGB, or InvalidRequest if it is missing or not an image."""
    if not data:
        raise InvalidRequest(f"{pipeline} needs an input image (params.image)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                w, h = probe.size
                if w * h > MAX_INPUT_PIXELS:
                    raise InvalidRequest(
                        f"input image is {w}x{h}; at most {MAX_INPUT_PIXELS} pixels are decoded"
                    )
                image = probe.convert("RGB")
    except InvalidRequest:
        raise
    except Exception as exc:  # PIL raises many unrelated types for bad bytes
        raise InvalidRequest(
            f"params.image is not a decodable PNG, JPEG or WebP image ({type(exc).__name__})"
        ) from None
    return image


def _check_size(w: int, h: int, what: str) -> None:
    if w < PIXEL_MULTIPLE or h < PIXEL_MULTIPLE or w % PIXEL_MULTIPLE or h % PIXEL_MULTIPLE:
        raise InvalidRequest(f"{what} must be positive multiples of {PIXEL_MULTIPLE}, got {w}x{h}")
    if w * h > MAX_PIXELS_PER_IMAGE:
        raise InvalidRequest(
            f"{w}x{h} is {w * h} pixels per image; the limit is {MAX_PIXELS_PER_IMAGE}"
        )


def _check_job_pixels(shape: OutputShape, frames_streamed: bool) -> None:
    total = shape.pixels_per_step
    limit = MAX_PIXELS_PER_VIDEO if shape.video and frames_streamed else MAX_PIXELS_PER_JOB
    if total > limit:
        unit = "frames" if shape.video else "images"
        raise InvalidRequest(
            f"{shape.count} {unit} of {shape.width}x{shape.height} are {total} pixels; "
            f"the limit per job is {limit}"
        )


def output_shape(params: JobParams, frames_streamed: bool = True) -> OutputShape:
    """Validate `params` and return the output's shape; InvalidRequest says what is wrong.

    A video's frames may be streamed one message each (spec 9.4), which lifts the
    per-job cap; `frames_streamed=False` keeps the cap of a result in one frame.
    """
    if isinstance(params, TextToImageParams):
        if not params.prompt.strip():
            raise InvalidRequest("prompt is empty")
        _check_size(params.width, params.height, "width and height")
        shape = OutputShape(params.width, params.height, params.num_images_per_prompt)
    elif isinstance(params, ImageToImageParams):
        if not params.prompt.strip():
            raise InvalidRequest("prompt is empty")
        if not 0.0 <= params.strength <= 1.0:
            raise InvalidRequest(f"strength must be in 0..1, got {params.strength}")
        if int(params.num_inference_steps * params.strength) < 1:
            raise InvalidRequest(
                f"num_inference_steps x strength = "
                f"{params.num_inference_steps} x {params.strength} runs no step; raise either"
            )
        image = decode_image(params.image, "image-to-image")
        _check_size(image.width, image.height, "the input image's width and height")
        shape = OutputShape(image.width, image.height, params.num_images_per_prompt)
    elif isinstance(params, ImageToVideoParams):
        decode_image(params.image, "image-to-video")
        _check_size(params.width, params.height, "width and height")
        shape = OutputShape(params.width, params.height, params.num_frames, video=True)
    else:
        raise InvalidRequest(f"no pipeline here takes {type(params).__name__}")
    _check_job_pixels(shape, frames_streamed)
    return shape


def planned_steps(params: JobParams) -> int:
    """Steps the job asks to execute, before any scheduler is asked (torch-free).

    The model's scheduler may run a few more (pipelines.dispatch.executed_steps);
    the orchestrator's quote says the exact count. Image-to-image runs the tail of
    the schedule that `strength` keeps, as diffusers' get_timesteps does.
    """
    n = params.num_inference_steps
    if isinstance(params, ImageToImageParams):
        return min(int(n * params.strength), n)
    return n
