"""stepstream/tiny-shapes: a tiny Stable Diffusion pipeline with trained weights that draws.

The weights live in this package (WEIGHTS_DIR, diffusers' save_pretrained
layout, safetensors) and were made by `python -m pipelines.train_tiny` from
the synthetic data set of pipelines/shapes_data.py; loading never trains.
Beside the pipeline the directory holds what previews need for this model:
`taesd/`, a preview decoder in TAESD's architecture (diffusers'
AutoencoderTiny) distilled from this VAE, and `latent_rgb.json`, the 4x3
latent-to-RGB factors fitted to this VAE by least squares.

The architecture is defined here once, for training and for the random-weight
baseline the tests compare against.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipelines.shapes_data import VOCABULARY
from pipelines.tiny import BOS, EOS, MAX_TOKENS, _bytes_to_unicode, quiet_diffusers

if TYPE_CHECKING:
    from diffusers import (
        AutoencoderKL,
        AutoencoderTiny,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

TINY_SHAPES = "stepstream/tiny-shapes"
"""Reserved model id: load_model() reads the committed weights in WEIGHTS_DIR."""
WEIGHTS_DIR = Path(__file__).resolve().parent / "models" / "tiny-shapes"
TAESD_SUBDIR = "taesd"
LATENT_RGB_FILE = "latent_rgb.json"
TEXT_WIDTH = 64
"""Hidden size of the text encoder, so the UNet's cross-attention width."""


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """The symbols byte-level BPE splits `word` into, as CLIPTokenizer.bpe does."""
    symbols = [*word[:-1], word[-1] + "</w>"]
    while len(symbols) > 1:
        neighbours = zip(symbols, symbols[1:], strict=False)
        rank = min(ranks.get(pair, len(ranks)) for pair in neighbours)
        if rank == len(ranks):
            break
        first, second = next(p for p, r in ranks.items() if r == rank)
        merged: list[str] = []
        i = 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == (first, second):
                merged.append(first + second)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def tokenizer_files() -> tuple[dict[str, int], list[str]]:
    """A CLIP byte-level BPE vocab in which every word of VOCABULARY is one token.

    Every byte is a token alone and as a word end, so any prompt tokenizes
    without unknowns. Then, word by word, the two leftmost symbols BPE leaves
    are merged, until the word is one ``word</w>`` token; merges of earlier
    words rank first, so adding one never splits a word already whole.
    """
    alphabet = _bytes_to_unicode()
    tokens = alphabet + [c + "</w>" for c in alphabet]
    ranks: dict[tuple[str, str], int] = {}
    for word in VOCABULARY:
        while len(symbols := _bpe(word, ranks)) > 1:
            ranks[(symbols[0], symbols[1])] = len(ranks)
            tokens.append(symbols[0] + symbols[1])
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, [f"{a} {b}" for a, b in ranks]


def write_tokenizer(directory: Path) -> None:
    """vocab.json, merges.txt and tokenizer_config.json, for CLIPTokenizer.from_pretrained."""
    vocab, merges = tokenizer_files()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
    )
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_TOKENS,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": EOS,
    }
    (directory / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2) + "\n", encoding="utf-8"
    )


def build_tokenizer() -> CLIPTokenizer:
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="stepstream-shapes-tok-") as tmp:
        write_tokenizer(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp)


def text_encoder() -> CLIPTextModel:
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab, _ = tokenizer_files()
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=TEXT_WIDTH,
        intermediate_size=2 * TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        layer_norm_eps=1e-5,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
        projection_dim=TEXT_WIDTH,
    )
    return CLIPTextModel(config)


def unet() -> UNet2DConditionModel:
    """8x8 latents, two levels; the prompt enters by cross-attention at 4x4 and in the middle.

    Attention at 8x8 doubled the cost of a training step for no visible gain.
    """
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def vae() -> AutoencoderKL:
    """64x64 RGB <-> 8x8x4 latents (scale factor 8, as in real SD)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        mid_block_add_attention=False,
    )


def preview_decoder() -> AutoencoderTiny:
    """TAESD's architecture at a sixteenth of its width: decodes 8x8 latents in ~1 ms."""
    from diffusers import AutoencoderTiny

    return AutoencoderTiny(
        encoder_block_out_channels=(16, 16, 16, 16),
        decoder_block_out_channels=(16, 16, 16, 16),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
    )


def scheduler() -> EulerDiscreteScheduler:
    """SD's noise schedule, predicting v (as SD 2.x does), steps placed from t = 999 down.

    v-prediction gives the high-noise steps, where the layout and colours are
    decided, a loss that teaches them (an epsilon target carries almost no
    signal there); "trailing" spacing starts sampling at the noise level the
    model was trained on last. Euler, so jobs resume (pipelines/resume.py).
    """
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        timestep_spacing="trailing",
    )


def assemble(
    vae_model: AutoencoderKL,
    text_model: CLIPTextModel,
    unet_model: UNet2DConditionModel,
) -> StableDiffusionPipeline:
    from diffusers import StableDiffusionPipeline

    with quiet_diffusers():
        pipe = StableDiffusionPipeline(
            vae=vae_model,
            text_encoder=text_model,
            tokenizer=build_tokenizer(),
            unet=unet_model,
            scheduler=scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            image_encoder=None,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_untrained(seed: int = 0) -> StableDiffusionPipeline:
    """tiny-shapes' architecture with seeded random weights: the baseline that cannot draw."""
    with quiet_diffusers(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return assemble(vae(), text_encoder(), unet())


def load_latent_rgb(directory: Path) -> tuple[list[list[float]], list[float]] | None:
    """The fitted latent_rgb factors (matrix 4x3, bias 3) stored beside a model, if any."""
    path = directory / LATENT_RGB_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    matrix = [[float(v) for v in row] for row in data["matrix"]]
    bias = [float(v) for v in data["bias"]]
    if len(matrix) != 4 or any(len(row) != 3 for row in matrix) or len(bias) != 3:
        raise ValueError(f"{path}: expected a 4x3 matrix and 3 biases")
    return matrix, bias
