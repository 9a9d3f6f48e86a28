"""Job params keyed by pipeline (spec 4.4, F5), and video results, through the codec."""

from __future__ import annotations

from fractions import Fraction

import msgpack
import pytest

from protocol import codec
from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import (
    MAX_FRAMES,
    ImageToImageParams,
    ImageToVideoParams,
    JobRequest,
    OtherParams,
    Preview,
    Result,
    ResultImage,
    TextToImageParams,
)

PNG = b"\x89PNG\r\n\x1a\n"


def job_frame(pipeline: str, params: object) -> bytes:
    raw = {"v": 1, "type": "job", "job_id": "j", "pipeline": pipeline, "model_id": "m"}
    return msgpack.packb({**raw, "params": params}, use_bin_type=True)


@pytest.mark.parametrize(
    "params",
    [
        TextToImageParams(prompt="p"),
        ImageToImageParams(prompt="p", image=PNG, strength=0.25, seed=3),
        ImageToVideoParams(image=PNG, width=512, height=288, num_frames=14, fps=7),
    ],
)
def test_params_round_trip_under_their_pipeline(params: object) -> None:
    job = JobRequest(job_id="j", pipeline=params.PIPELINE, model_id="m", params=params)  # type: ignore[attr-defined]
    assert codec.decode(codec.encode(job)) == job


def test_params_are_decoded_as_the_pipeline_says() -> None:
    video = codec.decode(job_frame("image-to-video", {}))
    assert isinstance(video, JobRequest)
    assert video.params == ImageToVideoParams()  # ai-runner's defaults, image absent
    assert (video.params.width, video.params.height, video.params.num_frames) == (1024, 576, 25)
    i2i = codec.decode(job_frame("image-to-image", {"prompt": "x", "image": PNG}))
    assert isinstance(i2i, JobRequest)
    assert i2i.params == ImageToImageParams(prompt="x", image=PNG)
    assert (i2i.params.strength, i2i.params.num_inference_steps) == (0.8, 100)


@pytest.mark.parametrize(
    ("pipeline", "params", "path"),
    [
        ("image-to-image", {"image": PNG}, "job.params.prompt"),
        ("image-to-image", {"prompt": "x", "strength": 1.5}, "job.params.strength"),
        ("image-to-image", {"prompt": "x", "strength": -0.1}, "job.params.strength"),
        ("image-to-video", {"image": ""}, "job.params.image"),
        ("image-to-video", {"num_frames": MAX_FRAMES + 1}, "job.params.num_frames"),
        ("text-to-image", {"image": PNG}, "job.params.prompt"),
        ("image-to-video", [1, 2], "job.params"),
    ],
)
def test_params_break_their_pipelines_rules(pipeline: str, params: object, path: str) -> None:
    with pytest.raises(ProtocolError) as info:
        codec.decode(job_frame(pipeline, params))
    assert info.value.code is ErrorCode.INVALID_FIELD
    assert info.value.message.startswith(path + ":")


def test_unknown_pipeline_params_are_any_map() -> None:
    job = codec.decode(job_frame("upscale", {"scale": 4, "image": PNG}))
    assert isinstance(job, JobRequest) and job.params == OtherParams()
    with pytest.raises(ProtocolError):
        codec.decode(job_frame("upscale", "not a map"))


def test_sender_cannot_mix_params_and_pipeline() -> None:
    with pytest.raises(ValueError, match="image-to-video"):
        codec.encode(
            JobRequest(
                job_id="j", pipeline="image-to-video", model_id="m", params=TextToImageParams("p")
            )
        )


def test_video_result_and_preview_fields_round_trip() -> None:
    frame = ResultImage(image=PNG, format="png", width=8, height=8, seed=1)
    result = Result(
        job_id="j",
        images=(),
        steps=2,
        pixel_steps=8 * 8 * MAX_FRAMES * 2,
        fee=Fraction(1),
        frames=(frame,) * MAX_FRAMES,
        fps=6,
    )
    assert codec.decode(codec.encode(result)) == result
    preview = Preview(
        job_id="j",
        step=1,
        image=b"x",
        format="webp",
        width=8,
        height=8,
        method="latent_rgb",
        frames=25,
    )
    assert codec.decode(codec.encode(preview)) == preview
    with pytest.raises(ProtocolError):
        codec.check(
            Result(
                job_id="j",
                images=(),
                steps=1,
                pixel_steps=1,
                fee=Fraction(1),
                frames=(frame,) * (MAX_FRAMES + 1),
            )
        )
