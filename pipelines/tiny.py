"""A tiny Stable-Diffusion-1.5-layout pipeline built from configs: seeded, offline, for tests."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from pipelines.sd_parts import sd_pipeline
from pipelines.tokenizer import clip_tokenizer


def build_tiny_pipeline(seed: int = 0, cross_attention_dim: int = 32) -> StableDiffusionPipeline:
    """SD-1.5's block pattern at toy width (../shared/STACK.md): 17 MB, builds in about a second."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=cross_attention_dim,
            intermediate_size=37,
            num_hidden_layers=5,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            projection_dim=cross_attention_dim,
        )
    )
    return sd_pipeline(vae, text_encoder, unet, clip_tokenizer())


def save_tiny_pipeline(path: Path, seed: int = 0) -> Path:
    """Build the tiny pipeline and save it as a diffusers folder at ``path``."""
    build_tiny_pipeline(seed).save_pretrained(path, safe_serialization=True)
    return path
