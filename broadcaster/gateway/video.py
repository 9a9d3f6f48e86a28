"""Frames to MP4 with a real codec (PyAV/FFmpeg), as go-livepeer returns video.

H.264 in yuv420p plays in every browser; where the FFmpeg build has no
H.264 encoder, MPEG-4 Part 2 is the fallback. yuv420p needs even sides, so
odd-sized frames are padded by one pixel.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from fractions import Fraction

import av
from PIL import Image

CODECS = ("libx264", "h264", "mpeg4")


def _codec() -> str:
    for name in CODECS:
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # noqa: BLE001 - PyAV raises different types per version
            continue
    raise RuntimeError("this FFmpeg build has no H.264 or MPEG-4 encoder")


def encode_mp4(frames: Sequence[Image.Image], fps: int) -> bytes:
    """An MP4 of the frames at `fps`; all frames take the first frame's size."""
    if not frames:
        raise ValueError("no frames to encode")
    if fps < 1:
        raise ValueError("fps must be at least 1")
    width, height = frames[0].size
    even = (width + width % 2, height + height % 2)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream(_codec(), rate=fps)
        stream.width, stream.height = even
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, fps)
        for index, frame in enumerate(frames):
            rgb = frame.convert("RGB")
            if rgb.size != (width, height):
                rgb = rgb.resize((width, height))
            if even != (width, height):
                padded = Image.new("RGB", even)
                padded.paste(rgb)
                rgb = padded
            video_frame = av.VideoFrame.from_image(rgb)
            video_frame.pts = index
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buf.getvalue()
