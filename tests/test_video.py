"""The gateway's MP4 encoder, on synthetic frames (no video pipeline needed)."""

from __future__ import annotations

import io

import av
import pytest
from PIL import Image

from broadcaster.gateway.video import encode_mp4


def frames(count: int, size: tuple[int, int]) -> list[Image.Image]:
    return [
        Image.new("RGB", size, (i * 255 // count, 40, 255 - i * 255 // count)) for i in range(count)
    ]


def test_frames_become_a_playable_mp4() -> None:
    data = encode_mp4(frames(14, (96, 64)), fps=7)
    assert data[4:8] == b"ftyp"
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name in ("h264", "mpeg4")
        assert stream.average_rate == 7
        decoded = [f.to_image() for f in container.decode(video=0)]
    assert len(decoded) == 14
    assert decoded[0].size == (96, 64)
    # The colour ramp survives lossy coding: first frame red-ish, last frame blue-ish.
    r0, _, b0 = decoded[0].getpixel((48, 32))
    r1, _, b1 = decoded[-1].getpixel((48, 32))
    assert r0 < b0 and r1 > b1


def test_odd_sizes_are_padded_and_bad_input_refused() -> None:
    data = encode_mp4(frames(3, (65, 33)), fps=6)
    with av.open(io.BytesIO(data)) as container:
        assert (container.streams.video[0].width, container.streams.video[0].height) == (66, 34)
    with pytest.raises(ValueError):
        encode_mp4([], fps=6)
    with pytest.raises(ValueError):
        encode_mp4(frames(2, (8, 8)), fps=0)
