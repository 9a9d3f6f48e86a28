"""The three Livepeer AI request shapes, parsed and validated.

Field names and defaults are ai-runner's (runner/openapi.yaml): text-to-image
is a JSON body, image-to-image and image-to-video are multipart forms with
the image. Unknown fields are ignored, as FastAPI does there; a wrong type or
a value out of range is an `invalid_request` error naming the field.
Our extensions: `preview_every` (how often the job streams a preview) and,
for image-to-video, `num_frames` (ai-runner leaves it to the model).

Two of ai-runner's fields ask for what no orchestrator here does, and are
refused rather than ignored: `safety_check: true` (no safety checker runs,
so no image could be flagged) and an `image_guidance_scale` other than its
default 1.5 (it steers instruct-pix2pix models only, and none runs here).
The Livepeer AI SDK sends both defaults on every request, so an SDK user
passes `safety_check=False`.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from broadcaster.gateway.errors import ApiError, invalid
from protocol.messages import MAX_FRAMES

MAX_UPLOAD_BYTES = 12 << 20
DEFAULT_PREVIEW_EVERY = 5
DEFAULT_NUM_FRAMES = 25
"""ai-runner sends no frame count: SVD-XT, its default model, makes 25 frames."""
DEFAULT_IMAGE_GUIDANCE_SCALE = 1.5
MAX_PROMPT_CHARS = 4000
"""The wire's limit on a prompt (protocol/messages.py)."""

PIPELINES = ("text-to-image", "image-to-image", "image-to-video")


@dataclass(frozen=True)
class Upload:
    """An uploaded image, checked to decode."""

    data: bytes
    width: int
    height: int
    format: str


@dataclass(frozen=True)
class TextToImageRequest:
    prompt: str
    model_id: str = ""
    loras: str = ""
    height: int = 576
    width: int = 1024
    guidance_scale: float = 7.5
    negative_prompt: str = ""
    safety_check: bool = False
    seed: int | None = None
    num_inference_steps: int = 50
    num_images_per_prompt: int = 1
    preview_every: int = DEFAULT_PREVIEW_EVERY

    pipeline = "text-to-image"


@dataclass(frozen=True)
class ImageToImageRequest:
    prompt: str
    image: Upload
    model_id: str = ""
    loras: str = ""
    strength: float = 0.8
    guidance_scale: float = 7.5
    image_guidance_scale: float = DEFAULT_IMAGE_GUIDANCE_SCALE
    negative_prompt: str = ""
    safety_check: bool = False
    seed: int | None = None
    num_inference_steps: int = 100
    num_images_per_prompt: int = 1
    preview_every: int = DEFAULT_PREVIEW_EVERY

    pipeline = "image-to-image"


@dataclass(frozen=True)
class ImageToVideoRequest:
    image: Upload
    model_id: str = ""
    height: int = 576
    width: int = 1024
    fps: int = 6
    motion_bucket_id: int = 127
    noise_aug_strength: float = 0.02
    safety_check: bool = False
    seed: int | None = None
    num_inference_steps: int = 25
    num_frames: int = DEFAULT_NUM_FRAMES
    preview_every: int = DEFAULT_PREVIEW_EVERY

    pipeline = "image-to-video"


GatewayRequest = TextToImageRequest | ImageToImageRequest | ImageToVideoRequest


@dataclass
class _Spec:
    """How one field is read: its type, range and whether it is required."""

    kind: type
    lo: float | None = None
    hi: float | None = None
    required: bool = False
    max_len: int = MAX_PROMPT_CHARS
    nullable: bool = False


_COMMON: dict[str, _Spec] = {
    "model_id": _Spec(str, max_len=256),
    "negative_prompt": _Spec(str),
    "loras": _Spec(str),
    "guidance_scale": _Spec(float, 0.0, 50.0),
    "safety_check": _Spec(bool),
    "seed": _Spec(int, 0, 2**32 - 1, nullable=True),
    "num_images_per_prompt": _Spec(int, 1, 16),
    "preview_every": _Spec(int, 1, 1000),
    "height": _Spec(int, 8, 4096),
    "width": _Spec(int, 8, 4096),
}
_SPECS: dict[str, dict[str, _Spec]] = {
    "text-to-image": {
        **_COMMON,
        "prompt": _Spec(str, required=True),
        "num_inference_steps": _Spec(int, 1, 1000),
    },
    "image-to-image": {
        **{k: v for k, v in _COMMON.items() if k not in ("height", "width")},
        "prompt": _Spec(str, required=True),
        "strength": _Spec(float, 0.0, 1.0),
        "image_guidance_scale": _Spec(float, 0.0, 50.0),
        "num_inference_steps": _Spec(int, 1, 1000),
    },
    "image-to-video": {
        "model_id": _COMMON["model_id"],
        "height": _COMMON["height"],
        "width": _COMMON["width"],
        "fps": _Spec(int, 1, 120),
        "motion_bucket_id": _Spec(int, 0, 1023),
        "noise_aug_strength": _Spec(float, 0.0, 10.0),
        "safety_check": _COMMON["safety_check"],
        "seed": _COMMON["seed"],
        "num_inference_steps": _Spec(int, 1, 1000),
        "num_frames": _Spec(int, 1, MAX_FRAMES),
        "preview_every": _COMMON["preview_every"],
    },
}
_CLASSES = {
    "text-to-image": TextToImageRequest,
    "image-to-image": ImageToImageRequest,
    "image-to-video": ImageToVideoRequest,
}


def _typed(name: str, value: Any, spec: _Spec, from_form: bool) -> Any:
    """JSON values must have the right type; form values are strings to convert."""
    if value is None and spec.nullable:
        return None
    if from_form and isinstance(value, str) and spec.kind is not str:
        text = value.strip()
        if spec.nullable and text == "":
            return None
        try:
            if spec.kind is bool:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                value = text.lower() in ("true", "1")
            elif spec.kind is int:
                value = int(text)
            else:
                value = float(text)
        except ValueError:
            raise invalid(f"{name} must be a {spec.kind.__name__}, got {value!r}") from None
    ok = (
        isinstance(value, bool)
        if spec.kind is bool
        else isinstance(value, int) and not isinstance(value, bool)
        if spec.kind is int
        else isinstance(value, int | float) and not isinstance(value, bool)
        if spec.kind is float
        else isinstance(value, str)
    )
    if not ok:
        raise invalid(f"{name} must be a {spec.kind.__name__}, got {value!r}")
    if spec.kind is float:
        value = float(value)
    if spec.kind is str and len(value) > spec.max_len:
        raise invalid(f"{name} is longer than {spec.max_len} characters")
    if spec.lo is not None and spec.kind is not str and not spec.lo <= value <= spec.hi:
        raise invalid(f"{name} must be between {spec.lo:g} and {spec.hi:g}, got {value}")
    return value


def parse_fields(pipeline: str, fields: Mapping[str, Any], from_form: bool) -> dict[str, Any]:
    """Check each known field; missing required ones are errors, unknown ones ignored."""
    specs = _SPECS[pipeline]
    out: dict[str, Any] = {}
    for name, spec in specs.items():
        if name not in fields:
            if spec.required:
                raise invalid(f"{name} is required")
            continue
        out[name] = _typed(name, fields[name], spec, from_form)
    if "prompt" in out and not out["prompt"].strip():
        raise invalid("prompt must not be empty")
    if out.get("loras"):
        raise invalid("loras are not supported by this gateway")
    if out.get("safety_check"):
        raise invalid(
            "safety_check: no safety checker runs on this gateway's orchestrators, so no "
            "image could be flagged; send safety_check=false (the Livepeer SDK sends true "
            "unless told otherwise)"
        )
    igs = out.get("image_guidance_scale", DEFAULT_IMAGE_GUIDANCE_SCALE)
    if igs != DEFAULT_IMAGE_GUIDANCE_SCALE:
        raise invalid(
            f"image_guidance_scale: {igs:g} would be ignored: it steers instruct-pix2pix "
            f"models, and none runs here; leave it out or at {DEFAULT_IMAGE_GUIDANCE_SCALE}"
        )
    return out


def read_upload(data: bytes) -> Upload:
    if not data:
        raise invalid("image is empty")
    if len(data) > MAX_UPLOAD_BYTES:
        raise ApiError(413, "invalid_request", f"image is larger than {MAX_UPLOAD_BYTES} bytes")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return Upload(data, img.width, img.height, (img.format or "").lower())
    except (UnidentifiedImageError, OSError, ValueError):
        raise invalid("image is not a readable image file") from None


def build_request(
    pipeline: str, fields: Mapping[str, Any], image: bytes | None, from_form: bool
) -> GatewayRequest:
    values = parse_fields(pipeline, fields, from_form)
    if pipeline != "text-to-image":
        if image is None:
            raise invalid("image is required (a file in the multipart form)")
        values["image"] = read_upload(image)
    return _CLASSES[pipeline](**values)
