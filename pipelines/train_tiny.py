"""`python -m pipelines.train_tiny`: make stepstream/tiny-shapes' weights from nothing.

Deterministic for a seed: the same torch, diffusers and transformers
versions, CPU and thread count give the same bytes. Other library versions
give other bytes (the committed weights were written with transformers
5.24.0; a rerun with 5.25.0 differs) that pass the same tests
(tests/test_tiny_shapes.py). About 50 CPU-minutes, 27 minutes on a 2-core CPU. Stages,
each timed (wall and CPU):

1. VAE: AutoencoderKL on freshly drawn shape images: L1 + MSE, a small KL,
   and a term that keeps each latent cell's mean colour a linear function of
   its 4 values (a throwaway 4x3 probe), so latent_rgb previews can work.
2. Latents: a fixed set of images encoded once; scaling_factor = 1 / their std,
   as SD's 0.18215 was chosen, so the UNet sees unit-variance latents.
3. UNet + text encoder: v prediction on SD's noise schedule, prompts
   dropped 10% of the time so classifier-free guidance works; EMA weights kept.
4. Preview decoder: TAESD's architecture (AutoencoderTiny) distilled from the
   VAE: its decoder learns the VAE's decodes of the latents, its encoder the
   latents of the images.
5. latent_rgb: the 4x3 matrix and bias that best map a latent cell to the
   mean colour of its 8x8 patch in the VAE's decode, by least squares (how
   the published SD factors were fitted), in the [-1, 1] space previews use.

Writes WEIGHTS_DIR (or --out) in diffusers' layout, fp16 safetensors, plus
taesd/, latent_rgb.json and recipe.json (the settings and each file's sha256).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pipelines import shapes_data, tiny_shapes
from pipelines.tiny import quiet_diffusers


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the weights besides the code."""

    seed: int = 0
    threads: int = 2
    vae_steps: int = 1000
    vae_batch: int = 16
    vae_lr: float = 1e-3
    vae_kl: float = 1e-4
    vae_linear: float = 0.5
    latent_images: int = 120 * 48
    unet_steps: int = 2500
    unet_batch: int = 64
    unet_lr: float = 1e-3
    ema: float = 0.999
    drop_prompt: float = 0.1
    drop_background: float = 0.05
    taesd_decoder_steps: int = 1500
    taesd_encoder_steps: int = 400
    taesd_batch: int = 32
    taesd_lr: float = 1e-3
    fit_latents: int = 1024

    def scaled(self, factor: float) -> Recipe:
        """The same recipe with every step count multiplied by `factor` (for quick trials)."""
        fields = asdict(self)
        steps = {k: max(1, round(v * factor)) for k, v in fields.items() if k.endswith("_steps")}
        return Recipe(**{**fields, **steps})


class Stopwatch:
    """Wall and CPU seconds per stage, printed as each stage ends."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, float]] = []

    def stage(self, name: str) -> Stopwatch._Stage:
        return Stopwatch._Stage(self, name)

    class _Stage:
        def __init__(self, watch: Stopwatch, name: str) -> None:
            self.watch, self.name = watch, name

        def __enter__(self) -> None:
            print(f"[{self.name}]", flush=True)
            self.wall, self.cpu = time.perf_counter(), time.process_time()

        def __exit__(self, *exc: object) -> None:
            wall = time.perf_counter() - self.wall
            cpu = time.process_time() - self.cpu
            self.watch.rows.append((self.name, wall, cpu))
            print(f"[{self.name}] {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)

    def summary(self) -> str:
        wall = sum(r[1] for r in self.rows)
        cpu = sum(r[2] for r in self.rows)
        return f"total {wall:.1f} s wall ({wall / 60:.1f} min), {cpu:.1f} s CPU"


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def _train(
    params: list[torch.nn.Parameter],
    steps: int,
    lr: float,
    loss_at: Callable[[int], torch.Tensor],
    label: str,
    after_step: Callable[[], None] | None = None,
) -> float:
    """AdamW with warm-up and cosine decay; returns the mean loss of the last 10% of steps."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _cosine_lr(s, steps, max(1, steps // 20))
    )
    tail: list[float] = []
    for step in range(steps):
        loss = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if after_step is not None:
            after_step()
        if step >= steps - max(1, steps // 10):
            tail.append(loss.item())
        if (step + 1) % max(1, steps // 10) == 0:
            print(f"  {label} {step + 1}/{steps} loss {loss.item():.4f}", flush=True)
    return sum(tail) / len(tail)


def _images(count: int, gen: torch.Generator) -> tuple[torch.Tensor, list[shapes_data.ShapeSpec]]:
    """Shape images in [-1, 1], as diffusers' VAEs take them."""
    images, specs = shapes_data.sample(count, gen)
    return images * 2 - 1, specs


def train_vae(recipe: Recipe, gen: torch.Generator) -> Any:
    vae = tiny_shapes.vae().train()
    with torch.no_grad():
        # Start with a narrow posterior (std e^-3): with diffusers' default (std 1) the
        # decoder first sees only noise and training idles for hundreds of steps.
        vae.encoder.conv_out.bias[vae.config.latent_channels :].fill_(-6.0)

    def loss_at(_: int) -> torch.Tensor:
        x, _specs = _images(recipe.vae_batch, gen)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        out = vae.decode(z).sample
        recon = (out - x).abs().mean() + (out - x).pow(2).mean()
        kl = posterior.kl().mean() / z[0].numel()
        # Keep each cell's mean colour a linear function of its latents, so that
        # latent_rgb previews (a 4x3 matrix) can show it; the probe is thrown away.
        patch = F.avg_pool2d(x, 8)
        linear = torch.einsum("bchw,cr->brhw", z, probe[:4]) + probe[4].view(1, 3, 1, 1)
        return recon + recipe.vae_kl * kl + recipe.vae_linear * (linear - patch).pow(2).mean()

    probe = torch.nn.Parameter(torch.zeros(5, 3))
    params = [*vae.parameters(), probe]
    loss = _train(params, recipe.vae_steps, recipe.vae_lr, loss_at, "vae")
    print(f"  vae final loss {loss:.4f}")
    return vae.eval()


@dataclass
class LatentSet:
    """Encoded training images: posterior means and stds (unscaled) and their prompts."""

    mean: torch.Tensor
    std: torch.Tensor
    specs: list[shapes_data.ShapeSpec]


@torch.no_grad()
def encode_latents(vae: Any, recipe: Recipe, gen: torch.Generator) -> LatentSet:
    means, stds, specs = [], [], []
    for start in range(0, recipe.latent_images, 256):
        x, batch_specs = _images(min(256, recipe.latent_images - start), gen)
        dist = vae.encode(x).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
        specs += batch_specs
    return LatentSet(torch.cat(means), torch.cat(stds), specs)


def _prompt(spec: shapes_data.ShapeSpec, recipe: Recipe, rng: random.Random) -> str:
    """The caption, sometimes dropped (for guidance) or without its background."""
    roll = rng.random()
    if roll < recipe.drop_prompt:
        return ""
    if roll < recipe.drop_prompt + recipe.drop_background:
        return f"a {spec.colour} {spec.shape}"
    return spec.prompt


def _alphas_cumprod() -> torch.Tensor:
    """SD's training noise schedule (scaled_linear, 0.00085..0.012, 1000 steps)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


class _Ema:
    """An exponential moving average of a module's parameters (what gets saved)."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.module, self.decay = module, decay
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self) -> None:
        for avg, live in zip(self.shadow.parameters(), self.module.parameters(), strict=True):
            avg.lerp_(live, 1 - self.decay)


def train_unet(
    latents: LatentSet, scaling: float, recipe: Recipe, gen: torch.Generator
) -> tuple[Any, Any]:
    """The UNet and text encoder, trained together; returns their EMA copies."""
    unet = tiny_shapes.unet().train()
    text = tiny_shapes.text_encoder().train()
    tokenizer = tiny_shapes.build_tokenizer()
    ids: dict[str, torch.Tensor] = {}
    rng = random.Random(recipe.seed)
    alphas = _alphas_cumprod()
    emas = [_Ema(unet, recipe.ema), _Ema(text, recipe.ema)]

    def token_ids(prompts: list[str]) -> torch.Tensor:
        for p in prompts:
            if p not in ids:
                ids[p] = tokenizer(
                    p, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt",
                ).input_ids[0]  # fmt: skip
        return torch.stack([ids[p] for p in prompts])

    def loss_at(_: int) -> torch.Tensor:
        pick = torch.randint(len(latents.specs), (recipe.unet_batch,), generator=gen)
        mean, std = latents.mean[pick], latents.std[pick]
        x0 = (mean + std * torch.randn(mean.shape, generator=gen)) * scaling
        t = torch.randint(0, len(alphas), (recipe.unet_batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        prompts = [_prompt(latents.specs[i], recipe, rng) for i in pick.tolist()]
        states = text(token_ids(prompts))[0]
        pred = unet(noisy, t, encoder_hidden_states=states).sample
        target = a.sqrt() * noise - (1 - a).sqrt() * x0  # v (Salimans & Ho, 2022)
        # Min-SNR-5 weighting (Hang et al., 2023), in its form for v targets.
        snr = alphas[t] / (1 - alphas[t])
        weight = torch.clamp(snr, max=5.0) / (snr + 1)
        return (weight * (pred - target).pow(2).mean(dim=(1, 2, 3))).mean()

    def after_step() -> None:
        for ema in emas:
            ema.update()

    params = list(unet.parameters()) + list(text.parameters())
    loss = _train(params, recipe.unet_steps, recipe.unet_lr, loss_at, "unet", after_step)
    print(f"  unet final loss {loss:.4f}")
    return emas[0].shadow, emas[1].shadow


@torch.no_grad()
def _decode(vae: Any, scaled: torch.Tensor, scaling: float) -> torch.Tensor:
    out = [vae.decode(chunk / scaling).sample for chunk in scaled.split(256)]
    return torch.cat(out).clamp(-1, 1)


def train_preview_decoder(
    vae: Any, latents: LatentSet, scaling: float, recipe: Recipe, gen: torch.Generator
) -> Any:
    """AutoencoderTiny: decoder to the VAE's decodes, encoder to the latents (scaled space)."""
    taesd = tiny_shapes.preview_decoder().train()
    count = min(len(latents.specs), 2048)
    scaled = latents.mean[:count] * scaling
    targets = _decode(vae, scaled, scaling)

    def decoder_loss(_: int) -> torch.Tensor:
        pick = torch.randint(count, (recipe.taesd_batch,), generator=gen)
        out = taesd.decoder(scaled[pick])
        diff = out - targets[pick]
        return diff.abs().mean() + diff.pow(2).mean()

    def encoder_loss(_: int) -> torch.Tensor:
        x, _specs = _images(recipe.taesd_batch, gen)
        with torch.no_grad():
            target = vae.encode(x).latent_dist.mean * scaling
        return (taesd.encoder(x) - target).pow(2).mean()

    lr = recipe.taesd_lr
    _train([*taesd.decoder.parameters()], recipe.taesd_decoder_steps, lr, decoder_loss, "decoder")
    _train([*taesd.encoder.parameters()], recipe.taesd_encoder_steps, lr, encoder_loss, "encoder")
    return taesd.eval()


@torch.no_grad()
def fit_latent_rgb(
    vae: Any, latents: LatentSet, scaling: float, recipe: Recipe
) -> tuple[list[list[float]], list[float], float]:
    """Least squares: latent cell (4 values, scaled space) -> its 8x8 patch's mean decoded colour.

    Returns the 4x3 matrix, the bias and the fit's RMS error (in [-1, 1] units).
    """
    count = min(len(latents.specs), recipe.fit_latents)
    scaled = latents.mean[-count:] * scaling
    decoded = F.avg_pool2d(_decode(vae, scaled, scaling), 8)  # (N, 3, 8, 8)
    x = scaled.permute(0, 2, 3, 1).reshape(-1, 4).double()
    y = decoded.permute(0, 2, 3, 1).reshape(-1, 3).double()
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    solution = torch.linalg.lstsq(design, y).solution  # (5, 3)
    rms = float((design @ solution - y).pow(2).mean().sqrt())
    matrix = [[round(float(v), 6) for v in row] for row in solution[:4]]
    bias = [round(float(v), 6) for v in solution[4]]
    return matrix, bias, rms


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(root: Path) -> Iterator[Path]:
    return (p for p in sorted(root.rglob("*")) if p.is_file() and p.name != "recipe.json")


def save(
    out: Path,
    vae: Any,
    text: Any,
    unet: Any,
    taesd: Any,
    factors: tuple[list[list[float]], list[float]],
    recipe: Recipe,
) -> dict[str, str]:
    """Write the model directory; returns {relative path: sha256} of what was written."""
    if out.exists():
        if not (out / "model_index.json").is_file():
            raise SystemExit(f"{out} exists and is not a model directory; refusing to replace it")
        shutil.rmtree(out)
    with quiet_diffusers():
        pipe = tiny_shapes.assemble(vae, text, unet).to(torch.float16)
        pipe.save_pretrained(out, safe_serialization=True)
    # The tokenizer as written by hand (vocab.json, merges.txt), not transformers' tokenizer.json.
    shutil.rmtree(out / "tokenizer")
    tiny_shapes.write_tokenizer(out / "tokenizer")
    with quiet_diffusers():
        taesd.to(torch.float16).save_pretrained(out / tiny_shapes.TAESD_SUBDIR)
    matrix, bias = factors
    (out / tiny_shapes.LATENT_RGB_FILE).write_text(
        json.dumps({"matrix": matrix, "bias": bias}, indent=2) + "\n", encoding="utf-8"
    )
    hashes = {str(p.relative_to(out)): _sha256(p) for p in _files(out)}
    (out / "recipe.json").write_text(
        json.dumps({"recipe": asdict(recipe), "sha256": hashes}, indent=2) + "\n",
        encoding="utf-8",
    )
    return hashes


@contextlib.contextmanager
def _deterministic(threads: int) -> Iterator[None]:
    """A fixed thread count and a private RNG, both restored after.

    CPU kernels give the same bytes for the same inputs and thread count.
    torch.use_deterministic_algorithms is not needed for that on the CPU, and
    it makes convolution backward passes about 3x slower there.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(before)


def train(recipe: Recipe, out: Path) -> Stopwatch:
    """Every stage, then save(); prints each stage's wall and CPU time."""
    watch = Stopwatch()

    def gen(stage: int) -> torch.Generator:
        return torch.Generator().manual_seed(recipe.seed * 1000 + stage)

    with _deterministic(recipe.threads), quiet_diffusers():
        torch.manual_seed(recipe.seed)
        with watch.stage("vae"):
            vae = train_vae(recipe, gen(1))
            vae.requires_grad_(False)
        with watch.stage("latents"):
            latents = encode_latents(vae, recipe, gen(2))
            scaling = round(1.0 / float((latents.mean).std()), 5)
            vae.register_to_config(scaling_factor=scaling)
            print(f"  {len(latents.specs)} images, scaling_factor {scaling}")
        with watch.stage("unet"):
            unet, text = train_unet(latents, scaling, recipe, gen(3))
        with watch.stage("preview decoder"):
            taesd = train_preview_decoder(vae, latents, scaling, recipe, gen(4))
        with watch.stage("latent_rgb"):
            matrix, bias, rms = fit_latent_rgb(vae, latents, scaling, recipe)
            print(f"  matrix {matrix}\n  bias {bias}\n  rms error {rms:.4f}")
        with watch.stage("save"):
            hashes = save(out, vae, text, unet, taesd, (matrix, bias), recipe)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    for name, digest in hashes.items():
        print(f"  {digest[:16]}  {(out / name).stat().st_size:>9,}  {name}")
    print(f"wrote {out}: {total / 2**20:.2f} MiB; {watch.summary()}")
    return watch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=Recipe.seed)
    parser.add_argument("--out", type=Path, default=tiny_shapes.WEIGHTS_DIR)
    parser.add_argument(
        "--threads", type=int, default=Recipe.threads,
        help="torch threads; the bytes written depend on it (default 2)",
    )  # fmt: skip
    parser.add_argument(
        "--scale", type=float, default=1.0,
        help="multiply every stage's step count (e.g. 0.1 for a quick trial)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    recipe = Recipe(seed=args.seed, threads=args.threads).scaled(args.scale)
    train(recipe, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
