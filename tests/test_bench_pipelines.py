"""`stepstream bench pipelines` measures what it says, on the real tiny models."""

from __future__ import annotations

import pytest

from pipelines.tiny_shapes import TINY_SHAPES
from pipelines.tiny_svd import TINY_SVD
from protocol.messages import ImageToVideoParams, TextToImageParams
from stepstream.bench_pipelines import (
    METHODS,
    SHAPES_PROMPT,
    _input_image,
    bench_case,
    format_quality,
    format_table,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)


def test_bench_case_reports_step_and_preview_costs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    monkeypatch.setenv("STEPSTREAM_TAESD_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    params = ImageToVideoParams(
        image=_input_image(64), width=64, height=64, num_frames=2, num_inference_steps=2
    )
    row = bench_case("image-to-video", TINY_SVD, params, runs=1, repeats=1)
    assert row.load_s > 0 and row.step_ms > 0 and row.peak_mib > 0
    assert row.preview_ratios["taesd"] is None  # no weights on disk: not timed, shown n/a
    assert row.preview_ratios["latent_rgb"] > 0 and row.preview_ratios["vae"] > 0
    table = format_table([row], "cpu", "note")
    assert f"| image-to-video | {TINY_SVD} |" in table and "| n/a |" in table
    assert all(f"{m} / step" in table for m in METHODS)


def test_bench_case_judges_each_preview_against_the_final_image() -> None:
    """tiny-shapes: every method at every preview step, closer at the end than at the start."""
    params = TextToImageParams(prompt=SHAPES_PROMPT, width=64, height=64, num_inference_steps=8)
    row = bench_case("text-to-image", TINY_SHAPES, params, runs=1, repeats=1, preview_every=4)
    assert row.quality is not None and row.prompt == SHAPES_PROMPT
    assert {(s.step, s.method) for s in row.quality} == {(k, m) for k in (4, 8) for m in METHODS}
    assert {s.used for s in row.quality} == set(METHODS)  # tiny-shapes ships its own TAESD
    for method in METHODS:
        first, last = (s for s in row.quality if s.method == method)
        assert last.psnr > first.psnr and last.ssim > first.ssim
    table = format_quality(row)
    assert table.splitlines()[0] == "| method | cost / step | step 4 | step 8 |"
    assert len(table.splitlines()) == 2 + len(METHODS)
