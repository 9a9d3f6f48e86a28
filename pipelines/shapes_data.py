"""The synthetic data set stepstream/tiny-shapes learns from: one flat shape on a flat ground.

Every image is 64x64: one shape (circle, square, triangle or diamond) in one
of six colours, centred within a few pixels, on a background of another of
the six colours, with anti-aliased edges. Its prompt says exactly that:
"a red circle on a blue background". The vocabulary is closed and small, so
a model of a few MB can learn all of it; prompts outside it still tokenize
(byte fallback) but the model has never seen them.

Geometry is chosen so two regions are always known without looking at the
image: the centre box (CENTRE_BOX pixels either side of the middle) lies
inside every shape, and the outer BORDER pixels are always background. The
tests judge generated images by the colours found there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SIZE = 64
"""Image side in pixels (8x8 latents with the VAE's scale factor 8)."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
"""The palette, as sRGB bytes; a prompt's colour words are these keys."""

SHAPES = ("circle", "square", "triangle", "diamond")

JITTER = 3
"""The shape's centre moves up to this many pixels along each axis."""
CENTRE_BOX = 4
"""Pixels either side of the image centre that every shape covers."""
BORDER = 4
"""Pixels along each edge that no shape reaches."""

# Sizes in pixels, per shape: the radius of the circle, the half side of the square, the
# inradius of the (equilateral, point-up) triangle and the half diagonal of the diamond.
SIZE_RANGE: dict[str, tuple[float, float]] = {
    "circle": (12.0, 20.0),
    "square": (10.0, 18.0),
    "triangle": (10.0, 12.5),
    "diamond": (15.0, 22.0),
}

VOCABULARY = (
    "a",
    "on",
    "background",
    *COLOURS,
    *SHAPES,
)
"""Every word of every training prompt."""


@dataclass(frozen=True)
class ShapeSpec:
    """What one image shows; `prompt` is its training caption."""

    shape: str
    colour: str
    background: str

    @property
    def prompt(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


def all_specs() -> list[ShapeSpec]:
    """Every (shape, colour, background) with the two colours different: 4 x 6 x 5 = 120."""
    return [
        ShapeSpec(shape, colour, background)
        for shape in SHAPES
        for colour in COLOURS
        for background in COLOURS
        if colour != background
    ]


def colour_tensor(name: str) -> torch.Tensor:
    """A palette colour as a float (3,) tensor in 0..1."""
    return torch.tensor(COLOURS[name], dtype=torch.float32) / 255.0


def _signed_distance(
    shape: str, x: torch.Tensor, y: torch.Tensor, size: torch.Tensor
) -> torch.Tensor:
    """Signed distance in pixels to the shape's edge (negative inside); x, y from its centre."""
    if shape == "circle":
        return torch.sqrt(x * x + y * y) - size
    if shape == "square":
        return torch.maximum(x.abs(), y.abs()) - size
    if shape == "diamond":
        return (x.abs() + y.abs() - size) / math.sqrt(2.0)
    if shape == "triangle":
        # Equilateral, point up, centred on its incentre: three half-planes at inradius `size`.
        c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
        d_base = y - size
        d_left = -c * x - s * y - size
        d_right = c * x - s * y - size
        return torch.maximum(d_base, torch.maximum(d_left, d_right))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(spec: ShapeSpec, size: float, dx: float, dy: float) -> torch.Tensor:
    """One (3, SIZE, SIZE) image in 0..1: the shape of `size` centred at the middle + (dx, dy).

    Edges are anti-aliased by pixel coverage, approximated from the signed
    distance at the pixel centre (clamp(0.5 - d, 0, 1)).
    """
    coords = torch.arange(SIZE, dtype=torch.float32) + 0.5 - SIZE / 2
    y, x = torch.meshgrid(coords - dy, coords - dx, indexing="ij")
    distance = _signed_distance(spec.shape, x, y, torch.tensor(size))
    coverage = (0.5 - distance).clamp(0.0, 1.0)
    fg = colour_tensor(spec.colour).view(3, 1, 1)
    bg = colour_tensor(spec.background).view(3, 1, 1)
    return bg + (fg - bg) * coverage.unsqueeze(0)


def sample(count: int, generator: torch.Generator) -> tuple[torch.Tensor, list[ShapeSpec]]:
    """`count` random images (count, 3, SIZE, SIZE) in 0..1 and what each shows.

    Specs are drawn uniformly from all_specs(); size and offset uniformly
    from their ranges. Everything comes from `generator`, so a seed fixes
    the data set.
    """
    specs = all_specs()
    picks = torch.randint(len(specs), (count,), generator=generator).tolist()
    unit = torch.rand(count, 3, generator=generator).tolist()
    images = []
    chosen = []
    for pick, (u_size, u_dx, u_dy) in zip(picks, unit, strict=True):
        spec = specs[pick]
        low, high = SIZE_RANGE[spec.shape]
        size = low + (high - low) * u_size
        dx = (2 * u_dx - 1) * JITTER
        dy = (2 * u_dy - 1) * JITTER
        images.append(render(spec, size, dx, dy))
        chosen.append(spec)
    return torch.stack(images), chosen


def centre_region(image: torch.Tensor) -> torch.Tensor:
    """The (3, 2*CENTRE_BOX, 2*CENTRE_BOX) centre box of a (3, H, W) image."""
    h, w = image.shape[-2:]
    rows = slice(h // 2 - CENTRE_BOX, h // 2 + CENTRE_BOX)
    cols = slice(w // 2 - CENTRE_BOX, w // 2 + CENTRE_BOX)
    return image[..., rows, cols]


def border_region(image: torch.Tensor) -> torch.Tensor:
    """The (3, N) pixels of a (3, H, W) image within BORDER of an edge."""
    h, w = image.shape[-2:]
    mask = torch.ones(h, w, dtype=torch.bool)
    mask[BORDER : h - BORDER, BORDER : w - BORDER] = False
    return image[..., mask]


def nearest_colour_share(pixels: torch.Tensor, colour: str) -> float:
    """The share of (3, ...) pixels in 0..1 whose nearest palette colour is `colour`."""
    flat = pixels.reshape(3, -1).T
    palette = torch.stack([colour_tensor(c) for c in COLOURS])
    nearest = torch.cdist(flat, palette).argmin(dim=1)
    return float((nearest == list(COLOURS).index(colour)).float().mean())
