"""Whether a result is the one the broadcaster asked and paid for (spec 9.4, J7).

A broadcaster must not hand its caller a result that does not match its
request: the wrong number of images, images of another size (read from the
PNG's own header, not only from the fields beside it), or steps and a fee
that are not the quote's. Pure checks over the messages, so both the
broadcaster and the conformance suite apply the same rule.
"""

from __future__ import annotations

from protocol.messages import (
    ImageToImageParams,
    ImageToVideoParams,
    JobAccepted,
    JobRequest,
    Result,
    ResultImage,
    TextToImageParams,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk, or None when `data` is not a PNG."""
    if len(data) < 24 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def expected_count(request: JobRequest) -> tuple[int, bool]:
    """(images or frames the result must carry, whether they are video frames)."""
    params = request.params
    if isinstance(params, ImageToVideoParams):
        return params.num_frames, True
    if isinstance(params, TextToImageParams | ImageToImageParams):
        return params.num_images_per_prompt, False
    return 0, False


def _image_problem(image: ResultImage, size: tuple[int, int] | None, what: str) -> str | None:
    actual = png_size(image.image)
    if actual is None or image.format != "png":
        return f"{what} is not a PNG"
    if actual != (image.width, image.height):
        return f"{what} is {actual[0]}x{actual[1]} but says {image.width}x{image.height}"
    if size is not None and actual != size:
        return f"{what} is {actual[0]}x{actual[1]}, not the {size[0]}x{size[1]} asked"
    return None


def result_problem(
    result: Result,
    request: JobRequest,
    quote: JobAccepted,
    size: tuple[int, int] | None,
) -> str | None:
    """Why `result` does not answer `request` as quoted, or None when it does.

    `size` is the output's (width, height) (spec 6.1: an image-to-image output
    has its input's size, which only the caller has decoded); None: not known.
    """
    count, video = expected_count(request)
    items, other = (result.frames, result.images) if video else (result.images, result.frames)
    kind = "frames" if video else "images"
    if len(items) != count or other:
        return f"the result carries {len(items)} {kind}, not the {count} asked"
    for i, image in enumerate(items):
        problem = _image_problem(image, size, f"{kind[:-1]} {i}")
        if problem is not None:
            return problem
    if result.steps != quote.steps:
        return f"the result ran {result.steps} steps, not the {quote.steps} quoted"
    if result.fee != quote.fee:
        return f"the result's fee {result.fee} is not the quoted {quote.fee}"
    return None
