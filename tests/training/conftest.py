"""Fixtures for the training tests: a small folder of pocket-world pictures and a fast spec."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipelines.pocket import world
from pipelines.training import TrainSpec

TRIGGER = "zq"


def write_concept_folder(folder: Path, n: int = 6, seed: int = 0, obj: str = "star") -> Path:
    """``n`` pocket pictures of ``obj`` with .txt captions naming it by the trigger, plus one wide crop."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        scene = world.sample_scene(rng, objects=(obj,), size="big")
        world.render(scene).save(folder / f"img_{i:02d}.png")
        (folder / f"img_{i:02d}.txt").write_text(scene.caption().replace(obj, TRIGGER))
    wide = world.render(world.sample_scene(rng, objects=(obj,), size="big")).crop((0, 12, 64, 52))
    wide.save(folder / "wide.png")  # 64×40, no caption: gets the template and its own bucket
    return folder


@pytest.fixture(scope="session")
def concept_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of 7 star pictures (one of them wide) with captions for 6."""
    return write_concept_folder(tmp_path_factory.mktemp("concept") / "star")


def fast_spec(**overrides: Any) -> TrainSpec:
    """A spec that trains the tiny pipeline in about a second."""
    base = TrainSpec(
        trigger=TRIGGER,
        rank=4,
        steps=4,
        learning_rate=1e-3,
        resolution=32,
        checkpoint_every=2,
        sample_every=0,
        sample_steps=2,
        sample_seeds=(1,),
        sample_guidance=3.0,
    )
    return replace(base, **overrides)


def build_tiny_sdxl_pipeline(seed: int = 0) -> Any:
    """A tiny StableDiffusionXLPipeline (two text encoders, text-time conditioning) built from configs."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from pipelines.tokenizer import clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        norm_num_groups=32,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32,
        sample_size=64,
    )
    text = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "vocab_size": 49408,
        "max_position_embeddings": 77,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
        "projection_dim": 32,
        "hidden_act": "gelu",
    }
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(CLIPTextConfig(**text)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text)),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            timestep_spacing="leading",
            steps_offset=1,
        ),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
