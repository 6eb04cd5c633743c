"""Stable Diffusion 1.5's scheduler and pipeline assembly, shared by the offline model builders."""

from __future__ import annotations

from typing import Any

from diffusers import DDIMScheduler, StableDiffusionPipeline


def build_scheduler() -> DDIMScheduler:
    """DDIM with Stable Diffusion 1.5's betas and settings."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def sd_pipeline(vae: Any, text_encoder: Any, unet: Any, tokenizer: Any) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline of given parts, no safety checker, progress bars off."""
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
