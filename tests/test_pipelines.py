"""pipelines/ against the real tiny SD pipeline: no mocks, CPU, 64x64."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.errors import InvalidRequest
from pipelines.loader import LoadedModel, ModelNotFound, hub_cache_dir, load_model
from pipelines.previews import encode_preview, render_preview
from pipelines.text_to_image import executed_steps, run_text_to_image, validate_text_to_image
from pipelines.tiny import TINY_SD, quiet_diffusers
from protocol.messages import TextToImageParams

# diffusers' Euler scheduler calls np.array() on a torch tensor (numpy 2 / torch 2.13 chatter).
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)


class Recorder:
    """Hooks that log every call and keep a copy of the latents after each step."""

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


class Cancelled(Exception):
    pass


def params(**kw: object) -> TextToImageParams:
    base: dict[str, object] = {
        "prompt": "a lighthouse at dusk",
        "width": 64,
        "height": 64,
        "num_inference_steps": 4,
    }
    base.update(kw)
    return TextToImageParams(**base)  # type: ignore[arg-type]


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return load_model(TINY_SD, device="cpu")


def test_tiny_model_builds_offline(model: LoadedModel) -> None:
    assert model.family == "sd1"
    assert model.device == "cpu" and model.dtype == torch.float32
    assert model.pipe.vae_scale_factor == 8
    assert model.pipe.tokenizer.model_max_length == 77
    assert executed_steps(params(), model) == 4 == executed_steps(params())


def test_steps_interleave_with_hooks(model: LoadedModel) -> None:
    hooks = Recorder()
    images = run_text_to_image(model, params(width=64, height=48), hooks, seed=7)
    assert [im.size for im in images] == [(64, 48)]
    expected = [(kind, k) for k in range(1, 5) for kind in ("wait", "end")]
    assert hooks.calls == expected
    assert hooks.latents[4].shape == (1, 4, 6, 8)


def test_same_seed_same_bytes_different_seed_differs(model: LoadedModel) -> None:
    a = run_text_to_image(model, params(), Recorder(), seed=123)
    b = run_text_to_image(model, params(), Recorder(), seed=123)
    c = run_text_to_image(model, params(), Recorder(), seed=124)
    assert png(a[0]) == png(b[0])
    assert png(a[0]) != png(c[0])


def test_batch_image_i_uses_seed_plus_i(model: LoadedModel) -> None:
    """Image i starts from seed + i's noise exactly; batched kernels move pixels by <= 1 LSB."""
    batch_hooks, single_hooks = Recorder(), Recorder()
    batch = run_text_to_image(model, params(num_images_per_prompt=2), batch_hooks, seed=40)
    single = run_text_to_image(model, params(), single_hooks, seed=41)
    assert len(batch) == 2
    torch.testing.assert_close(
        batch_hooks.latents[1][1], single_hooks.latents[1][0], rtol=1e-4, atol=1e-4
    )
    diff = np.abs(np.asarray(batch[1], dtype=int) - np.asarray(single[0], dtype=int))
    assert diff.max() <= 2


def test_raising_hook_cancels_and_propagates(model: LoadedModel) -> None:
    hooks = Recorder(fail_at_wait=3)
    with pytest.raises(Cancelled) as info:
        run_text_to_image(model, params(), hooks, seed=1)
    assert info.value.args == (3,)
    assert [k for kind, k in hooks.calls if kind == "end"] == [1, 2]
    assert hooks.calls[-1] == ("wait", 3)


def test_raising_before_first_step_runs_nothing(model: LoadedModel) -> None:
    hooks = Recorder(fail_at_wait=1)
    with pytest.raises(Cancelled):
        run_text_to_image(model, params(), hooks, seed=1)
    assert hooks.calls == [("wait", 1)]


@pytest.fixture(scope="module")
def wide_latents(model: LoadedModel) -> torch.Tensor:
    """Step-2 latents of a 2-image 128x64 job: a batch with a non-square aspect."""
    hooks = Recorder(fail_at_wait=3)
    with pytest.raises(Cancelled):
        run_text_to_image(
            model, params(width=128, height=64, num_images_per_prompt=2), hooks, seed=5
        )
    return hooks.latents[2]


@pytest.mark.parametrize("method", ["latent_rgb", "vae"])
@pytest.mark.parametrize("fmt", ["webp", "jpeg"])
def test_previews_decode_under_cap(
    model: LoadedModel, wide_latents: torch.Tensor, method: str, fmt: str
) -> None:
    shown = render_preview(model, wide_latents, method, fmt, 512, 64 * 1024)
    data, width, height = shown.data, shown.width, shown.height
    assert len(data) <= 64 * 1024
    decoded = Image.open(io.BytesIO(data))
    decoded.load()
    assert decoded.format == fmt.upper()
    assert decoded.size == (width, height) == (256, 64)  # two 128x64 images side by side


def test_preview_caps_side_and_bytes() -> None:
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (576, 1024, 3), dtype=np.uint8))
    data, width, height = encode_preview([noise], "jpeg", max_side=300, max_bytes=8 * 1024)
    assert len(data) <= 8 * 1024
    assert max(width, height) <= 300
    assert abs(width / height - 1024 / 576) < 0.05


def test_preview_rejects_unknown_method_and_format(
    model: LoadedModel, wide_latents: torch.Tensor
) -> None:
    with pytest.raises(ValueError, match="method"):
        render_preview(model, wide_latents, "taesd-please", "webp", 512, 1 << 18)
    with pytest.raises(ValueError, match="format"):
        render_preview(model, wide_latents, "latent_rgb", "gif", 512, 1 << 18)


def test_missing_hub_id_names_id_and_places(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFound) as info:
        load_model("nobody/no-such-model", device="cpu")
    err = info.value
    assert err.model_id == "nobody/no-such-model"
    assert any(str(cache) in place for place in err.searched)
    assert any(str(tmp_path / "nobody" / "no-such-model") in place for place in err.searched)
    assert "nobody/no-such-model" in str(err)
    assert all(place in str(err) for place in err.searched)


@pytest.fixture(scope="module")
def saved_tiny(model: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline written in diffusers' on-disk layout."""
    path = tmp_path_factory.mktemp("tiny-sd")
    with quiet_diffusers():
        model.pipe.save_pretrained(path)
    return path


def test_loads_local_directory(saved_tiny: Path, model: LoadedModel) -> None:
    loaded = load_model(str(saved_tiny), device="cpu")
    assert loaded.family == "sd1" and loaded.model_id == str(saved_tiny)
    assert torch.equal(loaded.pipe.unet.conv_in.weight, model.pipe.unet.conv_in.weight)
    assert loaded.pipe.tokenizer.model_max_length == 77


def test_loads_from_hub_cache_offline(
    saved_tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An id found in an HF_HOME cache laid out as huggingface_hub lays it out."""
    revision = "0" * 40
    repo = tmp_path / "hf" / "hub" / "models--acme--tiny-sd"
    (repo / "snapshots").mkdir(parents=True)
    (repo / "snapshots" / revision).symlink_to(saved_tiny, target_is_directory=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_cache_dir() == str(tmp_path / "hf" / "hub")
    loaded = load_model("acme/tiny-sd", device="cpu")
    assert loaded.family == "sd1"


def test_missing_local_directory(tmp_path: Path) -> None:
    missing = tmp_path / "models" / "absent"
    with pytest.raises(ModelNotFound) as info:
        load_model(str(missing), device="cpu")
    assert info.value.searched == [str(missing.resolve())]
    assert str(missing.resolve()) in str(info.value)


def test_directory_without_model_index(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound) as info:
        load_model(str(tmp_path), device="cpu")
    assert "model_index.json" in info.value.searched[0]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"width": 65}, "multiples of 8"),
        ({"height": 100}, "multiples of 8"),
        ({"width": 4096, "height": 2048}, "per image"),
        ({"width": 1024, "height": 1024, "num_images_per_prompt": 5}, "per job"),
        ({"prompt": "   "}, "prompt"),
    ],
)
def test_validate_rejects(kw: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidRequest, match=match):
        validate_text_to_image(params(**kw))


def test_validate_accepts_defaults_and_the_caps() -> None:
    validate_text_to_image(TextToImageParams(prompt="x"))
    validate_text_to_image(params(width=2048, height=2048))
    validate_text_to_image(params(width=1024, height=1024, num_images_per_prompt=4))


def test_concurrent_jobs_on_one_model_match_sequential_runs(model: LoadedModel) -> None:
    """Two jobs on one model at once (capacity > 1) must not share scheduler state."""
    from concurrent.futures import ThreadPoolExecutor

    from pipelines.text_to_image import run_text_to_image

    def job(steps: int, seed: int) -> bytes:
        params = TextToImageParams(
            prompt="two at once", width=64, height=64, num_inference_steps=steps
        )
        return png(run_text_to_image(model, params, Recorder(), seed)[0])

    sequential = [job(5, 1), job(9, 2)]
    with ThreadPoolExecutor(2) as pool:
        concurrent = list(pool.map(job, [5, 9], [1, 2]))
    assert concurrent == sequential


def test_noise_scales_bring_euler_latents_to_unit_variance(model: LoadedModel) -> None:
    from pipelines.previews import noise_scales

    scales = noise_scales(model, 6)
    assert len(scales) == 7
    assert scales == sorted(scales, reverse=True)
    assert scales[0] > 2 and scales[-1] == 1.0
