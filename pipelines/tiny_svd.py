"""A tiny random-weight Stable Video Diffusion pipeline built in code.

The same real classes as stabilityai's SVD (a spatio-temporal UNet over
8 channels: 4 noisy + 4 image latents, a temporal-decoder VAE with scale
factor 8, a CLIP vision encoder for the conditioning image), with tiny
widths, so image-to-video runs offline in seconds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pipelines.tiny import WEIGHT_SEED, quiet_diffusers

if TYPE_CHECKING:
    from diffusers import StableVideoDiffusionPipeline

TINY_SVD = "stepstream/tiny-svd"
"""Reserved model id: load_model() builds this pipeline instead of reading disk."""

EMBED_DIM = 32
"""CLIP image embedding width = the UNet's cross-attention width."""


def _unet() -> object:
    from diffusers import UNetSpatioTemporalConditionModel

    return UNetSpatioTemporalConditionModel(
        sample_size=8,
        in_channels=8,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        # Attention only at half resolution: at ai-runner's default 1024x576 the full-
        # resolution latents are 9216 tokens a frame, too many for a CPU test model.
        down_block_types=("DownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal"),
        up_block_types=("CrossAttnUpBlockSpatioTemporal", "UpBlockSpatioTemporal"),
        cross_attention_dim=EMBED_DIM,
        num_attention_heads=(2, 4),
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=3 * 8,  # fps, motion bucket, noise aug
        num_frames=25,
    )


def _vae() -> object:
    """Four encoder blocks, so vae_scale_factor is 8 as in real SVD (32 channels: the
    temporal decoder's group norms need 32)."""
    from diffusers import AutoencoderKLTemporalDecoder

    return AutoencoderKLTemporalDecoder(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        sample_size=64,
    )


def _scheduler() -> object:
    """SVD's scheduler: Euler, v-prediction, continuous timesteps, Karras sigmas."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        interpolation_type="linear",
        prediction_type="v_prediction",
        sigma_max=700.0,
        sigma_min=0.002,
        steps_offset=1,
        timestep_spacing="leading",
        timestep_type="continuous",
        use_karras_sigmas=True,
    )


def _image_encoder() -> tuple[object, object]:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=32,
        projection_dim=EMBED_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=224,  # the pipeline resizes the conditioning image to 224x224
        patch_size=32,
        intermediate_size=37,
    )
    return CLIPVisionModelWithProjection(config), CLIPImageProcessor(crop_size=224, size=224)


def build_tiny_svd() -> StableVideoDiffusionPipeline:
    """Build the tiny SVD pipeline on CPU in float32; global RNG state is left untouched."""
    with quiet_diffusers(), torch.random.fork_rng(devices=[]):
        from diffusers import StableVideoDiffusionPipeline

        torch.manual_seed(WEIGHT_SEED)
        unet = _unet()
        torch.manual_seed(WEIGHT_SEED)
        vae = _vae()
        torch.manual_seed(WEIGHT_SEED)
        image_encoder, feature_extractor = _image_encoder()
        pipe = StableVideoDiffusionPipeline(
            vae=vae,
            image_encoder=image_encoder,
            unet=unet,
            scheduler=_scheduler(),
            feature_extractor=feature_extractor,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe
