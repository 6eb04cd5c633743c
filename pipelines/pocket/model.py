"""Architecture of the pocket model: Stable Diffusion's parts at pocket size."""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from pipelines.sd_parts import build_scheduler  # noqa: F401  (the pocket model's scheduler)


@dataclass(frozen=True)
class PocketConfig:
    """Sizes of the pocket model's VAE, UNet and text encoder."""

    vae_channels: tuple[int, ...] = (16, 32, 64)
    latent_channels: int = 8
    unet_channels: tuple[int, ...] = (32, 64, 128)
    attention_head_dim: int = 8
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 2
    image_size: int = 64

    @property
    def latent_size(self) -> int:
        """Side of the latent grid (the VAE halves the picture once per extra block)."""
        return self.image_size // 2 ** (len(self.vae_channels) - 1)


def build_vae(cfg: PocketConfig) -> AutoencoderKL:
    """An AutoencoderKL with one ResNet layer per block."""
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=16,
        sample_size=cfg.image_size,
    )


def build_unet(cfg: PocketConfig) -> UNet2DConditionModel:
    """A UNet2DConditionModel in SD-1.5's pattern: cross-attention at the fine levels."""
    n = len(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=cfg.latent_size,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        block_out_channels=cfg.unet_channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=cfg.text_hidden,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=16,
    )


def build_text_encoder(cfg: PocketConfig) -> CLIPTextModel:
    """A CLIPTextModel over the full 49,408-token CLIP vocabulary."""
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=cfg.text_hidden,
            intermediate_size=cfg.text_hidden * 4,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            projection_dim=cfg.text_hidden,
        )
    )
