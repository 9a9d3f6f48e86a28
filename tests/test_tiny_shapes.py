"""stepstream/tiny-shapes draws what it is asked, and its previews turn into the picture.

Everything runs the committed weights through the project's own code
(load_model, run_text_to_image, StepPreviews' preview path) at 64x64. An
image passes when, by pixel statistics, the asked colour is dominant in the
centre box every training shape covers and the asked background colour at
the border no shape reaches (pipelines/shapes_data.py). Random weights, in
tiny-sd and in tiny-shapes' own architecture, fail the same test.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import shapes_data
from pipelines.loader import LoadedModel, load_model
from pipelines.preview_quality import psnr, score_previews, ssim
from pipelines.previews import LATENT_RGB, latent_rgb
from pipelines.text_to_image import run_text_to_image
from pipelines.tiny import TINY_SD
from pipelines.tiny_shapes import (
    TINY_SHAPES,
    WEIGHTS_DIR,
    build_tokenizer,
    build_untrained,
)
from pipelines.train_tiny import Recipe, train
from protocol.messages import TextToImageParams
from stepstream.processes import model_entry, orchestrator_process

ROOT = Path(__file__).resolve().parents[1]

STEPS = 16
SEEDS = (0, 1, 2)
PROMPTS = [
    shapes_data.ShapeSpec("circle", "red", "blue"),
    shapes_data.ShapeSpec("square", "red", "white"),
    shapes_data.ShapeSpec("circle", "yellow", "black"),
    shapes_data.ShapeSpec("square", "yellow", "green"),
    shapes_data.ShapeSpec("triangle", "white", "red"),
    shapes_data.ShapeSpec("diamond", "blue", "yellow"),
]
"""Two shapes in two colours on four backgrounds, and the other two shapes once."""
CENTRE_SHARE = 0.6
BORDER_SHARE = 0.6
"""A colour is dominant when at least this share of the region's pixels is nearest to it."""


class NoWait:
    """Step hooks for a job nobody pays for: never wait, never cancel."""

    def wait_for_step(self, step: int) -> None:
        pass

    def on_step_end(self, step: int, latents: torch.Tensor) -> None:
        pass


@pytest.fixture(scope="module")
def shapes_model() -> LoadedModel:
    return load_model(TINY_SHAPES, device="cpu")


def params(spec: shapes_data.ShapeSpec, steps: int = STEPS) -> TextToImageParams:
    return TextToImageParams(prompt=spec.prompt, width=64, height=64, num_inference_steps=steps)


def as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255


def shares(image: Image.Image, spec: shapes_data.ShapeSpec) -> tuple[float, float]:
    """(share of the centre nearest the shape's colour, of the border nearest the background's)."""
    pixels = as_tensor(image)
    centre = shapes_data.nearest_colour_share(shapes_data.centre_region(pixels), spec.colour)
    border = shapes_data.nearest_colour_share(shapes_data.border_region(pixels), spec.background)
    return centre, border


def draws(image: Image.Image, spec: shapes_data.ShapeSpec) -> bool:
    centre, border = shares(image, spec)
    return centre >= CENTRE_SHARE and border >= BORDER_SHARE


def generate(model: LoadedModel, spec: shapes_data.ShapeSpec, seed: int) -> Image.Image:
    return run_text_to_image(model, params(spec), NoWait(), seed)[0]


# ------------------------------------------------------------------ the model draws


@pytest.mark.parametrize("spec", PROMPTS, ids=lambda s: s.prompt.replace(" ", "-"))
def test_tiny_shapes_draws_the_asked_colours(
    shapes_model: LoadedModel, spec: shapes_data.ShapeSpec
) -> None:
    for seed in SEEDS:
        image = generate(shapes_model, spec, seed)
        centre, border = shares(image, spec)
        assert centre >= CENTRE_SHARE, f"seed {seed}: {spec.colour} covers {centre:.2f} of centre"
        assert border >= BORDER_SHARE, f"seed {seed}: {spec.background} is {border:.2f} of border"


def test_seeds_vary_the_drawing_not_its_colours(shapes_model: LoadedModel) -> None:
    spec = PROMPTS[0]
    images = [np.asarray(generate(shapes_model, spec, seed), dtype=np.int16) for seed in SEEDS]
    assert any(np.abs(images[0] - other).max() > 16 for other in images[1:])


@pytest.mark.parametrize("model_id", [TINY_SD, "untrained tiny-shapes"])
def test_random_weights_fail_the_same_test(model_id: str) -> None:
    if model_id == TINY_SD:
        model = load_model(TINY_SD, device="cpu")
    else:
        model = load_model(TINY_SHAPES, device="cpu")
        model.pipe = build_untrained(seed=0)
    passed = [draws(generate(model, spec, seed), spec) for spec in PROMPTS for seed in SEEDS]
    assert sum(passed) <= 1, f"{sum(passed)} of {len(passed)} random-weight images passed"


# ------------------------------------------------------------------ previews


def test_previews_approach_the_final_image(shapes_model: LoadedModel) -> None:
    """For latent_rgb and the preview decoder, each preview is nearer the result than the last."""
    spec = PROMPTS[0]
    _final, scores = score_previews(
        shapes_model, params(spec, steps=20), seed=0, every=4, methods=("latent_rgb", "taesd")
    )
    for method in ("latent_rgb", "taesd"):
        mine = [s for s in scores if s.method == method]
        assert [s.step for s in mine] == [4, 8, 12, 16, 20]
        assert {s.used for s in mine} == {method}  # taesd: the model's own decoder, no fallback
        psnrs = [s.psnr for s in mine]
        ssims = [s.ssim for s in mine]
        assert all(b > a for a, b in zip(psnrs, psnrs[1:], strict=False)), (method, psnrs)
        assert all(b > a for a, b in zip(ssims, ssims[1:], strict=False)), (method, ssims)
        assert psnrs[-1] - psnrs[0] > 6, (method, psnrs)


def test_fitted_latent_rgb_factors_beat_the_published_sd_ones(shapes_model: LoadedModel) -> None:
    factors = shapes_model.latent_rgb_factors
    assert factors is not None and factors != LATENT_RGB["sd1"]
    captured: dict[str, torch.Tensor] = {}

    class Keep(NoWait):
        def on_step_end(self, step: int, latents: torch.Tensor) -> None:
            captured["latents"] = latents.clone()

    final = run_text_to_image(shapes_model, params(PROMPTS[0]), Keep(), seed=0)[0]
    fitted = latent_rgb(captured["latents"], "sd1", factors=factors)[0]
    published = latent_rgb(captured["latents"], "sd1")[0]
    assert psnr(fitted, final) > psnr(published, final) + 3
    assert ssim(fitted, final) > ssim(published, final)


# ------------------------------------------------------------------ the weights


def test_tokenizer_keeps_every_word_of_the_vocabulary_whole() -> None:
    tokenizer = build_tokenizer()
    assert tokenizer.model_max_length == 77
    for word in shapes_data.VOCABULARY:
        assert len(tokenizer(word).input_ids) == 3, word  # BOS, the word, EOS
    assert tokenizer("a lighthouse at dusk").input_ids[-1] == tokenizer.eos_token_id


def test_committed_weights_are_the_ones_the_recipe_lists() -> None:
    recipe = json.loads((WEIGHTS_DIR / "recipe.json").read_text())
    files = {
        str(p.relative_to(WEIGHTS_DIR))
        for p in WEIGHTS_DIR.rglob("*")
        if p.is_file() and p.name != "recipe.json"
    }
    assert files == set(recipe["sha256"])
    for name, digest in recipe["sha256"].items():
        assert hashlib.sha256((WEIGHTS_DIR / name).read_bytes()).hexdigest() == digest, name
    weights = sum(p.stat().st_size for p in WEIGHTS_DIR.rglob("*.safetensors"))
    assert weights < 8 * 2**20


def test_data_set_keeps_the_shape_over_the_centre_and_off_the_border() -> None:
    images, specs = shapes_data.sample(64, torch.Generator().manual_seed(5))
    for image, spec in zip(images, specs, strict=True):
        assert shapes_data.nearest_colour_share(shapes_data.centre_region(image), spec.colour) == 1
        border = shapes_data.border_region(image)
        assert shapes_data.nearest_colour_share(border, spec.background) == 1


# ------------------------------------------------------------------ through the processes


def test_a_job_through_a_real_orchestrator_process_draws_the_prompt(tmp_path: Path) -> None:
    spec = shapes_data.ShapeSpec("circle", "red", "blue")
    with orchestrator_process(tmp_path, [model_entry(TINY_SHAPES)]) as child:
        url = child.url
        out = tmp_path / "out.png"
        done = subprocess.run(
            [
                sys.executable, "-m", "stepstream.cli", "generate", "--orchestrator", url,
                "--model", TINY_SHAPES, "--prompt", spec.prompt, "--width", "64",
                "--height", "64", "--steps", "16", "--preview-every", "4",
                "--preview-method", "taesd", "--seed", "1", "--out", str(out),
                "--metrics-db", str(tmp_path / "metrics.sqlite3"),
            ],
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    with Image.open(out) as image:
        assert draws(image, spec), shares(image, spec)
    previews = sorted(tmp_path.glob("out.preview-*.png"))
    assert [p.name for p in previews][-1] == "out.preview-016.png" and len(previews) == 4
    with (
        Image.open(out) as image,
        Image.open(previews[0]) as first,
        Image.open(previews[-1]) as last,
    ):
        assert psnr(last, image) > psnr(first, image)
        assert draws(last, spec)


def test_training_script_is_deterministic_and_writes_a_loadable_model(tmp_path: Path) -> None:
    """The recipe at a few steps: two runs with one seed write the same bytes, which load."""
    recipe = Recipe(
        vae_steps=2, vae_batch=2, latent_images=16, unet_steps=3, unet_batch=4,
        taesd_decoder_steps=2, taesd_encoder_steps=1, taesd_batch=2, fit_latents=8,
    )  # fmt: skip
    threads = torch.get_num_threads()
    for name in ("first", "second"):
        train(recipe, tmp_path / name)
    assert torch.get_num_threads() == threads
    first, second = (
        json.loads((tmp_path / n / "recipe.json").read_text()) for n in ("first", "second")
    )
    assert first == second and "unet/diffusion_pytorch_model.safetensors" in first["sha256"]
    other = replace(recipe, seed=1)
    train(other, tmp_path / "other")
    third = json.loads((tmp_path / "other" / "recipe.json").read_text())
    assert (
        third["sha256"]["unet/diffusion_pytorch_model.safetensors"]
        != (first["sha256"]["unet/diffusion_pytorch_model.safetensors"])
    )
    model = load_model(str(tmp_path / "first"), device="cpu")
    assert model.latent_rgb_factors is not None and model.taesd_dir is not None
    assert model.pipe.scheduler.config.prediction_type == "v_prediction"
    assert (tmp_path / "first" / "tokenizer" / "vocab.json").is_file()
    assert (tmp_path / "first" / "tokenizer" / "merges.txt").is_file()


def test_the_page_defaults_to_tiny_shapes_and_a_prompt_it_knows() -> None:
    page = (ROOT / "broadcaster" / "gateway" / "static" / "index.html").read_text()
    model = re.search(r'<input id="model_id"[^>]* value="([^"]*)"', page)
    prompt = re.search(r'<textarea id="prompt"[^>]*>([^<]*)</textarea>', page)
    sizes = re.findall(r'<input id="(?:width|height)"[^>]* value="(\d+)"', page)
    assert model and model.group(1) == TINY_SHAPES
    assert prompt and set(prompt.group(1).split()) <= set(shapes_data.VOCABULARY)
    assert sizes == ["64", "64"]


@pytest.mark.anyio
async def test_the_page_with_its_defaults_draws_its_prompt(
    shapes_model: LoadedModel, tmp_path: Path
) -> None:
    """The gateway page as a person first sees it, against an orchestrator with tiny-shapes."""
    from playwright.async_api import async_playwright

    from tests.gateway_helpers import gateway_on_loopback
    from tests.loopback import loopback_orchestrator
    from tests.test_gateway_browser import CHROMIUM, CHROMIUM_FLAGS

    async with (
        loopback_orchestrator(shapes_model) as orch,
        gateway_on_loopback([orch.url], tmp_path / "outputs") as gw,
        async_playwright() as pw,
    ):
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = await browser.new_page()
            await page.goto(gw.url + "/")
            prompt = await page.input_value("#prompt")
            await page.fill("#seed", "3")
            await page.click("#submit")
            result = page.locator("#result-media")
            await result.wait_for(state="visible", timeout=60_000)
            source = await result.get_attribute("src")
        finally:
            await browser.close()
        assert source
        async with httpx.AsyncClient() as client:
            response = await client.get(source if "://" in source else gw.url + source)
    words = prompt.split()
    spec = shapes_data.ShapeSpec(words[2], words[1], words[5])
    assert spec.prompt == prompt
    with Image.open(io.BytesIO(response.content)) as image:
        assert image.size == (64, 64) and draws(image, spec), shares(image, spec)
