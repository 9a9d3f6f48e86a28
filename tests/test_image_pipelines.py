"""Image-to-image (SD, SDXL), text-to-image on SDXL and image-to-video (SVD), tiny, on CPU."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from pipelines.dispatch import executed_steps, run_job, supports
from pipelines.errors import InvalidRequest
from pipelines.loader import LoadedModel
from pipelines.previews import LATENT_RGB, render_preview
from pipelines.requests import MAX_PIXELS_PER_JOB, output_shape
from protocol.messages import ImageToImageParams, ImageToVideoParams, TextToImageParams

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)


class Cancelled(Exception):
    pass


class Recorder:
    """Hooks that log every call, keep the latents, and may raise at one wait."""

    def __init__(self, fail_at_wait: int | None = None) -> None:
        self.calls: list[tuple[str, int]] = []
        self.latents: dict[int, torch.Tensor] = {}
        self.fail_at_wait = fail_at_wait

    def wait_for_step(self, step: int) -> None:
        self.calls.append(("wait", step))
        if step == self.fail_at_wait:
            raise Cancelled(step)

    def on_step_end(self, step: int, latents: torch.Tensor) -> None:
        self.calls.append(("end", step))
        self.latents[step] = latents.clone()


def image_bytes(width: int = 64, height: int = 48, fmt: str = "PNG") -> bytes:
    """A deterministic gradient image (random weights need no meaningful picture)."""
    img = Image.new("RGB", (width, height))
    img.putdata(
        [(x * 4 % 256, y * 5 % 256, (x + y) % 256) for y in range(height) for x in range(width)]
    )
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def i2i(**kw: object) -> ImageToImageParams:
    base: dict[str, object] = dict(prompt="the same in winter", image=image_bytes(), strength=0.5)
    base["num_inference_steps"] = 8
    return ImageToImageParams(**{**base, **kw})  # type: ignore[arg-type]


def i2v(**kw: object) -> ImageToVideoParams:
    base: dict[str, object] = dict(image=image_bytes(), width=64, height=64, num_frames=3)
    base["num_inference_steps"] = 3
    return ImageToVideoParams(**{**base, **kw})  # type: ignore[arg-type]


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def steps_ended(hooks: Recorder) -> list[int]:
    return [k for kind, k in hooks.calls if kind == "end"]


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_image_to_image_runs_int_steps_times_strength(
    which: str, tiny_model: LoadedModel, tiny_sdxl_model: LoadedModel
) -> None:
    model = tiny_model if which == "sd" else tiny_sdxl_model
    p = i2i(strength=0.6, num_inference_steps=9)  # int(5.4) = 5 steps
    assert executed_steps(p, model) == 5 == executed_steps(p)
    hooks = Recorder()
    out = run_job(model, p, hooks, seed=3)
    assert [im.size for im in out.images] == [(64, 48)] and not out.video
    assert hooks.calls == [(kind, k) for k in range(1, 6) for kind in ("wait", "end")]
    assert hooks.latents[5].shape == (1, 4, 6, 8)


def test_tiny_sdxl_text_to_image_same_seed_same_bytes(tiny_sdxl_model: LoadedModel) -> None:
    assert tiny_sdxl_model.family == "sdxl"
    p = TextToImageParams(prompt="a lighthouse", width=64, height=64, num_inference_steps=3)
    a = run_job(tiny_sdxl_model, p, Recorder(), seed=9).images
    b = run_job(tiny_sdxl_model, p, Recorder(), seed=9).images
    c = run_job(tiny_sdxl_model, p, Recorder(), seed=10).images
    assert png(a[0]) == png(b[0]) != png(c[0])


def test_image_to_image_same_seed_same_bytes(tiny_model: LoadedModel) -> None:
    a = run_job(tiny_model, i2i(num_images_per_prompt=2), Recorder(), seed=5).images
    b = run_job(tiny_model, i2i(num_images_per_prompt=2), Recorder(), seed=5).images
    assert [png(x) for x in a] == [png(x) for x in b]
    assert png(a[0]) != png(a[1])  # image i uses seed + i


def test_image_to_video_frames_steps_and_determinism(tiny_svd_model: LoadedModel) -> None:
    assert tiny_svd_model.family == "svd"
    assert supports(tiny_svd_model, "image-to-video")
    assert not supports(tiny_svd_model, "text-to-image")
    hooks = Recorder()
    out = run_job(tiny_svd_model, i2v(), hooks, seed=4)
    assert out.video and out.fps == 6
    assert [f.size for f in out.images] == [(64, 64)] * 3
    assert steps_ended(hooks) == [1, 2, 3] and executed_steps(i2v(), tiny_svd_model) == 3
    assert hooks.latents[3].shape == (1, 3, 4, 8, 8)  # (batch, frames, channels, h, w)
    again = run_job(tiny_svd_model, i2v(), Recorder(), seed=4)
    assert [png(f) for f in out.images] == [png(f) for f in again.images]


@pytest.mark.parametrize("which", ["sd-i2i", "sdxl-i2i", "svd"])
def test_raising_from_the_step_hook_stops_every_pipeline(
    which: str,
    tiny_model: LoadedModel,
    tiny_sdxl_model: LoadedModel,
    tiny_svd_model: LoadedModel,
) -> None:
    """SVD ignores pipe._interrupt; raising from the callback stops it within the step."""
    model, p = {
        "sd-i2i": (tiny_model, i2i()),
        "sdxl-i2i": (tiny_sdxl_model, i2i()),
        "svd": (tiny_svd_model, i2v(num_inference_steps=5)),
    }[which]
    hooks = Recorder(fail_at_wait=3)
    with pytest.raises(Cancelled):
        run_job(model, p, hooks, seed=1)
    assert steps_ended(hooks) == [1, 2] and hooks.calls[-1] == ("wait", 3)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        (i2i(image=None), "needs an input image"),
        (i2i(image=b"not an image at all"), "not a decodable"),
        (i2i(image=image_bytes(60, 48)), "multiples of 8"),
        (i2i(strength=0.05, num_inference_steps=10), "runs no step"),
        (i2i(image=image_bytes(64, 64), num_images_per_prompt=16, prompt="x"), None),
        (i2v(image=None), "needs an input image"),
        (i2v(image=image_bytes()[:20]), "not a decodable"),
        (i2v(width=100), "multiples of 8"),
        (i2v(width=2048, height=1024, num_frames=128), "limit per job"),
    ],
)
def test_validation_refuses_before_any_work(
    params: ImageToImageParams | ImageToVideoParams, match: str | None
) -> None:
    if match is None:
        assert output_shape(params).pixels_per_step == 64 * 64 * 16 <= MAX_PIXELS_PER_JOB
        return
    with pytest.raises(InvalidRequest, match=match):
        output_shape(params)


def test_video_pixels_count_every_frame() -> None:
    shape = output_shape(i2v(width=512, height=288, num_frames=25))
    assert shape.video and shape.pixels_per_step == 512 * 288 * 25


def test_svd_latent_rgb_uses_sd_factors() -> None:
    assert LATENT_RGB["svd"] == LATENT_RGB["sd1"]


@pytest.fixture(scope="module")
def video_latents(tiny_svd_model: LoadedModel) -> torch.Tensor:
    hooks = Recorder(fail_at_wait=2)
    with pytest.raises(Cancelled):
        run_job(tiny_svd_model, i2v(num_frames=4), hooks, seed=2)
    return hooks.latents[1]


@pytest.mark.parametrize("method", ["latent_rgb", "vae"])
def test_video_previews_every_frame_or_one(
    tiny_svd_model: LoadedModel, video_latents: torch.Tensor, method: str
) -> None:
    every = render_preview(tiny_svd_model, video_latents, method, "webp", 512, 256 * 1024)
    assert every.frames == 4 and every.method == method
    with Image.open(io.BytesIO(every.data)) as anim:
        assert anim.format == "WEBP" and anim.n_frames == 4 and anim.size == (64, 64)
    grid = render_preview(tiny_svd_model, video_latents, method, "jpeg", 512, 256 * 1024)
    with Image.open(io.BytesIO(grid.data)) as img:
        assert img.format == "JPEG" and img.size == (128, 128)  # 2x2 grid of 64x64
    one = render_preview(tiny_svd_model, video_latents, method, "webp", 512, 256 * 1024, frame=2)
    assert one.frames == 1
    with Image.open(io.BytesIO(one.data)) as img:
        assert img.size == (64, 64) and getattr(img, "n_frames", 1) == 1


def test_taesd_falls_back_to_latent_rgb_and_says_so(
    tiny_model: LoadedModel, monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    monkeypatch.setenv("STEPSTREAM_TAESD_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    shown = render_preview(tiny_model, latents, "taesd", "webp")
    assert shown.method == "latent_rgb"


def test_taesd_decodes_when_weights_are_on_disk(
    tiny_model: LoadedModel, monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    from pathlib import Path

    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    tiny = AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
    )
    tiny.save_pretrained(Path(str(tmp_path)) / "taesd")
    monkeypatch.setenv("STEPSTREAM_TAESD_DIR", str(tmp_path))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    shown = render_preview(tiny_model, latents, "taesd", "webp")
    assert shown.method == "taesd"
    with Image.open(io.BytesIO(shown.data)) as img:
        assert img.size == (128, 64)  # two 64x64 images side by side


def test_a_video_in_one_result_frame_keeps_the_4_mi_pixel_cap() -> None:
    """ai-runner's default video (1024x576x25) runs when its frames stream (spec 9.4),
    and is refused when they must fit one result frame."""
    default = i2v(width=1024, height=576, num_frames=25)
    assert output_shape(default).pixels_per_step == 1024 * 576 * 25
    with pytest.raises(InvalidRequest, match="limit per job"):
        output_shape(default, frames_streamed=False)
