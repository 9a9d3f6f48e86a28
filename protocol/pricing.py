"""Prices in pixel-steps, and how go-livepeer's aiModels.json prices map to them.

A pixel-step is one output pixel (of one image or video frame) carried
through one executed denoising step. go-livepeer prices an output pixel and
ignores steps, so an aiModels.json price is divided by the pipeline's
reference step count: a job with the pipeline's default steps then costs
what it costs on go-livepeer (spec section 6).
"""

from __future__ import annotations

from fractions import Fraction

REFERENCE_STEPS: dict[str, int] = {
    # Steps that ai-runner's default request executes for each pipeline.
    "text-to-image": 50,
    "image-to-image": 80,  # 100 steps at strength 0.8
    "image-to-video": 25,
}


def pixel_steps(width: int, height: int, images: int, steps: int) -> int:
    """Work of a job: width * height * images (or frames) * executed steps."""
    return width * height * images * steps


def price_from_ai_models(price_per_unit: int, pixels_per_unit: int, pipeline: str) -> Fraction:
    """Wei per pixel-step for an aiModels.json entry (currency WEI)."""
    if price_per_unit < 0:
        raise ValueError("price_per_unit must not be negative")
    if pixels_per_unit <= 0:
        raise ValueError("pixels_per_unit must be positive")
    if pipeline not in REFERENCE_STEPS:
        raise ValueError(f"no reference step count for pipeline {pipeline!r}")
    return Fraction(price_per_unit, pixels_per_unit * REFERENCE_STEPS[pipeline])


def job_fee(pixels_per_step: int, steps: int, price: Fraction) -> Fraction:
    """Exact fee in wei of `steps` steps of a job."""
    return pixels_per_step * steps * price
