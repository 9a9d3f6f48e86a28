"""A tiny random-weight Stable Diffusion pipeline built in code.

Model hubs are unreachable in tests and in the demo, so this builds the same
kind of pipeline diffusers' own tests use (``get_dummy_components``): real
classes, real shapes (4 latent channels, VAE scale factor 8, 77-token CLIP),
tiny widths. Weights are seeded, so every machine builds the same model and
the same seed gives the same image everywhere the kernels agree.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

TINY_SD = "stepstream/tiny-sd"
"""Reserved model id: load_model() builds this pipeline instead of reading disk."""
TINY_SDXL = "stepstream/tiny-sdxl"
"""Reserved: a tiny SDXL pipeline (two text encoders, text_time conditioning)."""

VOCAB_SIZE = 1000
MAX_TOKENS = 77
WEIGHT_SEED = 0
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def _bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes (GPT-2/CLIP table)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def tokenizer_files() -> tuple[dict[str, int], list[str]]:
    """A CLIP-style vocab and merge list of exactly VOCAB_SIZE tokens.

    Every byte appears alone and as a word end (``</w>``), so any prompt
    tokenizes without unknowns; letter-pair merges fill the rest of the
    vocabulary so real words become a few tokens, as with the real CLIP vocab.
    """
    alphabet = _bytes_to_unicode()
    tokens = alphabet + [c + "</w>" for c in alphabet]
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    merges: list[str] = []
    budget = VOCAB_SIZE - len(tokens) - 2
    for a in letters:
        for b in letters:
            if len(merges) >= budget:
                break
            merges.append(f"{a} {b}")
            tokens.append(a + b)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    assert len(vocab) == VOCAB_SIZE
    return vocab, merges


def build_tokenizer() -> CLIPTokenizer:
    """Write vocab.json and merges.txt to a temporary directory and load them."""
    from transformers import CLIPTokenizer

    vocab, merges = tokenizer_files()
    with tempfile.TemporaryDirectory(prefix="stepstream-tiny-tok-") as tmp:
        root = Path(tmp)
        (root / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (root / "merges.txt").write_text(
            "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
        )
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=MAX_TOKENS)


def _text_config(projection_dim: int = 512) -> object:
    from transformers import CLIPTextConfig

    vocab, _ = tokenizer_files()
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        layer_norm_eps=1e-5,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
        projection_dim=projection_dim,
    )


def _text_encoder() -> CLIPTextModel:
    from transformers import CLIPTextModel

    return CLIPTextModel(_text_config())


def _unet() -> UNet2DConditionModel:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def _sdxl_unet() -> UNet2DConditionModel:
    """SDXL's conditioning: both encoders' states (32 + 32) and text_time embeddings."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids + pooled text
        cross_attention_dim=64,
        norm_num_groups=8,
    )


def _vae() -> AutoencoderKL:
    """Four blocks, so vae_scale_factor is 8 as in real SD: 64x64 pixels <-> 8x8 latents."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=64,
    )


def _scheduler() -> EulerDiscreteScheduler:
    """Euler runs exactly num_inference_steps steps (PNDM, SD 1.5's default, runs one more)."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )


@contextlib.contextmanager
def quiet_diffusers() -> Iterator[None]:
    """Silence import, build and load chatter from diffusers/transformers; keep errors.

    Importing diffusers' SD pipelines warns that torchvision is missing,
    building prints deprecation notes, loading draws progress bars; none of it
    is actionable (load_model reports its time instead). Only the two
    libraries' loggers drop to ERROR and their bars are off, only inside the
    block (not thread-safe: other threads are quiet meanwhile too); exceptions
    are never swallowed.
    """
    # Import first: each library resets its root logger's level when it initialises.
    import diffusers.utils.logging
    import transformers.utils.logging

    libs = (diffusers.utils.logging, transformers.utils.logging)
    loggers = [logging.getLogger(n) for n in ("diffusers", "transformers")]
    levels = [lg.level for lg in loggers]
    bars = [lib.is_progress_bar_enabled() for lib in libs]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        for lib in libs:
            lib.disable_progress_bar()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        for lib, enabled in zip(libs, bars, strict=True):
            if enabled:
                lib.enable_progress_bar()


def build_tiny_sd() -> StableDiffusionPipeline:
    """Build the tiny pipeline on CPU in float32; the caller moves it to a device.

    Global torch RNG state is saved and restored so building a model does not
    perturb anything else that draws random numbers.
    """
    with quiet_diffusers(), torch.random.fork_rng(devices=[]):
        from diffusers import StableDiffusionPipeline

        torch.manual_seed(WEIGHT_SEED)
        unet = _unet()
        torch.manual_seed(WEIGHT_SEED)
        vae = _vae()
        torch.manual_seed(WEIGHT_SEED)
        text_encoder = _text_encoder()
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=build_tokenizer(),
            unet=unet,
            scheduler=_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            image_encoder=None,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_sdxl() -> StableDiffusionXLPipeline:
    """The tiny SDXL pipeline, CPU float32, built like build_tiny_sd."""
    with quiet_diffusers(), torch.random.fork_rng(devices=[]):
        from diffusers import StableDiffusionXLPipeline
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        torch.manual_seed(WEIGHT_SEED)
        unet = _sdxl_unet()
        torch.manual_seed(WEIGHT_SEED)
        vae = _vae()
        torch.manual_seed(WEIGHT_SEED)
        text_encoder = CLIPTextModel(_text_config(32))
        torch.manual_seed(WEIGHT_SEED + 1)
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(32))
        tokenizer = build_tokenizer()
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=unet,
            scheduler=_scheduler(),
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe
