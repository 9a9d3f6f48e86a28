"""Image files for people: the format a file name asks for, with the job's parameters inside.

The parameters are written the way AUTOMATIC1111's web UI writes them (and
ComfyUI, Civitai and most image viewers read them): a PNG text chunk named
`parameters`, or the EXIF UserComment of a JPEG or WebP, holding

    a lighthouse
    Negative prompt: fog
    Steps: 20, CFG scale: 7.5, Seed: 3, Size: 512x512, Model: stepstream/tiny-sd

so an image found later says how to make it again.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
"""File suffixes written, and the format each one means."""

_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286


class UnsupportedImageFile(ValueError):
    """A file name whose suffix is not one of FORMATS; the message lists them."""


def format_for(path: Path) -> str:
    """The image format a file name asks for ("PNG", "JPEG" or "WEBP")."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UnsupportedImageFile(
            f"{path.name}: the suffix must be one of {', '.join(FORMATS)} "
            f"(it chooses the format), not {path.suffix or 'none'!r}"
        )
    return fmt


def parameters_text(
    prompt: str,
    fields: Mapping[str, object],
    negative_prompt: str = "",
) -> str:
    """A1111's `parameters` text: the prompt, the negative prompt, then `Key: value, ...`."""
    lines = [prompt] if prompt else []
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    pairs = ", ".join(f"{k}: {v}" for k, v in fields.items() if v is not None and v != "")
    if pairs:
        lines.append(pairs)
    return "\n".join(lines)


def encode_image(data: bytes, fmt: str, parameters: str | None = None) -> bytes:
    """Re-encode image bytes as `fmt`, with `parameters` embedded when given."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        out = io.BytesIO()
        if fmt == "PNG":
            info = PngInfo()
            if parameters:
                info.add_text("parameters", parameters)
            img.save(out, format="PNG", pnginfo=info)
            return out.getvalue()
        rgb = img.convert("RGB")
        exif = Image.Exif()
        if parameters:
            # EXIF UserComment: an 8-byte charset header, then the text (A1111 uses UTF-16).
            exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = b"UNICODE\0" + parameters.encode("utf-16-be")
        if fmt == "JPEG":
            rgb.save(out, format="JPEG", quality=95, exif=exif.tobytes())
        else:
            rgb.save(out, format=fmt, quality=95, exif=exif.tobytes())
        return out.getvalue()


def read_parameters(data: bytes) -> str | None:
    """The `parameters` a file carries (PNG text chunk or EXIF UserComment), or None."""
    with Image.open(io.BytesIO(data)) as img:
        text = img.info.get("parameters")
        if isinstance(text, str):
            return text
        comment = img.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    if isinstance(comment, bytes) and comment.startswith(b"UNICODE\0"):
        return comment[8:].decode("utf-16-be")
    if isinstance(comment, str):
        return comment
    return None


def write_image(path: Path, data: bytes, parameters: str | None = None) -> None:
    """Write image bytes to `path` in the format its suffix names."""
    path.write_bytes(encode_image(data, format_for(path), parameters))
