"""Metadata written into a trained LoRA: kohya's ``ss_*`` keys and Stability's ``modelspec.*`` keys.

Key names and value formats follow kohya-ss/sd-scripts (``train_network.py``) and the SAI model
spec 1.0.0 (``library/sai_model_spec.py`` there); every value is a string, as safetensors requires.
The keys that name the base family (``modelspec.architecture``, ``ss_base_model_version`` …) are
written by ``pipelines.lora_formats.save_kohya`` from ``LoraWeights.family``.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from pipelines.training.config import TrainSpec
from pipelines.training.orthogonal import BasisSlot


@dataclass(frozen=True)
class RunInfo:
    """Facts about one finished run that the metadata records."""

    family: str
    model_name: str
    resolution: tuple[int, int]
    prediction_type: str
    num_images: int
    num_class_images: int
    batches_per_epoch: int
    steps: int
    started_at: float
    finished_at: float
    final_loss: float
    captions: tuple[str, ...]
    dataset_name: str = "images"
    dataset_dirs: tuple[tuple[str, int, int], ...] = ()  # (folder, repeats, pictures); empty: one folder
    caption_dirs: tuple[str, ...] = ()  # the dataset folder of each caption; empty: all dataset_name
    basis: BasisSlot | None = None
    mixed_precision: str = "no"  # what ran: no, fp16 or bf16


def thumbnail_data_url(path: Path, max_side: int = 256) -> str:
    """A PNG data URL of a picture shrunk to at most ``max_side`` (modelspec.thumbnail)."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        img.thumbnail((max_side, max_side))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def text_encoder_lr(spec: TrainSpec) -> float:
    """The text encoder's learning rate (0 when it is frozen)."""
    if not spec.train_text_encoder:
        return 0.0
    return spec.learning_rate if spec.text_encoder_lr is None else spec.text_encoder_lr


def _network_args(spec: TrainSpec, info: RunInfo) -> dict[str, str]:
    """kohya's ``ss_network_args``: the options beyond rank and alpha."""
    args = {"algo": "lora", "targets": ",".join(spec.unet_targets)}
    if spec.use_dora:  # LyCORIS' spelling, as kohya's DoRA files carry it
        args["dora_wd"] = "True"
        args["wd_on_output"] = "True"
    if spec.use_rslora:
        args["rs_lora"] = "True"
    if spec.lora_plus_ratio != 1.0:
        args["loraplus_lr_ratio"] = str(spec.lora_plus_ratio)
    if spec.lora_dropout:
        args["dropout"] = str(spec.lora_dropout)
    if info.basis is not None:
        args["orthogonal_basis"] = json.dumps(
            {"seed": info.basis.seed, "start": info.basis.start, "rank": info.basis.rank}
        )
    return args


def _tag_frequencies(info: RunInfo, count: Callable[[Sequence[str]], dict[str, int]]) -> dict[str, Any]:
    """kohya's ``ss_tag_frequency``: tag counts per dataset folder."""
    dirs = info.caption_dirs or (info.dataset_name,) * len(info.captions)
    names = dict.fromkeys(dirs) or {info.dataset_name: None}
    return {n: count([c for c, d in zip(info.captions, dirs, strict=True) if d == n]) for n in names}


def _dataset_dirs(info: RunInfo) -> dict[str, dict[str, int]]:
    """kohya's ``ss_dataset_dirs``: repeats and picture count per folder."""
    dirs = info.dataset_dirs or ((info.dataset_name, 1, info.num_images),)
    return {name: {"n_repeats": repeats, "img_count": n} for name, repeats, n in dirs}


def kohya_metadata(spec: TrainSpec, info: RunInfo) -> dict[str, str]:
    """The ``ss_*`` keys kohya's trainer writes, filled from this run."""
    from pipelines.training.data import tag_frequency

    epochs = -(-info.steps * spec.grad_accum // max(1, info.batches_per_epoch))  # micro-batches run
    meta = {
        "ss_session_id": str(int(info.started_at * 1000) % 2**31),
        "ss_training_started_at": str(info.started_at),
        "ss_training_finished_at": str(info.finished_at),
        "ss_output_name": spec.output_name,
        "ss_sd_model_name": info.model_name,
        "ss_network_module": "lycoris.kohya" if spec.use_dora else "networks.lora",
        "ss_network_dim": str(spec.rank),
        "ss_network_alpha": f"{spec.kohya_alpha:g}",
        "ss_network_args": json.dumps(_network_args(spec, info)),
        "ss_learning_rate": str(spec.learning_rate),
        "ss_unet_lr": str(spec.learning_rate),
        "ss_text_encoder_lr": str(text_encoder_lr(spec)),
        "ss_network_train_unet_only": str(not spec.train_text_encoder),
        "ss_lr_scheduler": spec.lr_scheduler,
        "ss_lr_warmup_steps": str(spec.lr_warmup_steps),
        "ss_optimizer": f"torch.optim.AdamW(weight_decay={spec.weight_decay})",
        "ss_max_train_steps": str(info.steps),
        "ss_steps": str(info.steps),
        "ss_epoch": str(epochs),
        "ss_num_epochs": str(epochs),
        "ss_num_train_images": str(info.num_images),
        "ss_num_reg_images": str(info.num_class_images),
        "ss_num_batches_per_epoch": str(info.batches_per_epoch),
        "ss_batch_size_per_device": str(spec.batch_size),
        "ss_gradient_accumulation_steps": str(spec.grad_accum),
        "ss_resolution": str(info.resolution),
        "ss_enable_bucket": str(spec.bucketing),
        "ss_cache_latents": str(spec.cache_latents),
        "ss_gradient_checkpointing": str(spec.gradient_checkpointing),
        "ss_mixed_precision": info.mixed_precision,
        "ss_max_grad_norm": str(spec.max_grad_norm),
        "ss_seed": str(spec.seed),
        "ss_noise_offset": str(spec.noise_offset),
        "ss_min_snr_gamma": str(spec.min_snr_gamma),
        "ss_caption_dropout_rate": str(spec.caption_dropout),
        "ss_caption_tag_dropout_rate": str(spec.caption_tag_dropout),
        "ss_shuffle_caption": str(spec.shuffle_caption),
        "ss_keep_tokens": str(spec.keep_tokens),
        "ss_flip_aug": str(spec.flip_aug),
        "ss_color_aug": str(spec.color_aug),
        "ss_random_crop": str(spec.random_crop),
        "ss_prior_loss_weight": str(spec.prior_loss_weight if spec.uses_prior else 0.0),
        "ss_clip_skip": str(spec.clip_skip),
        "ss_tag_frequency": json.dumps(_tag_frequencies(info, tag_frequency)),
        "ss_dataset_dirs": json.dumps(_dataset_dirs(info)),
        "ss_training_comment": f"trigger: {spec.trigger}; final loss {info.final_loss:.5f}"
        + (
            "; prior targets: the base model's predictions"
            if spec.uses_prior and spec.prior_target == "base"
            else ""
        ),
    }
    return meta


def modelspec_metadata(spec: TrainSpec, info: RunInfo, thumbnail: Path | None) -> dict[str, str]:
    """The ``modelspec.*`` keys (SAI model spec 1.0.0) with trigger phrase and thumbnail."""
    h, w = info.resolution
    meta = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.title": spec.output_name,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(info.finished_at)),
        "modelspec.resolution": f"{w}x{h}",
        "modelspec.prediction_type": info.prediction_type,
        "modelspec.trigger_phrase": spec.trigger,
        "modelspec.description": f"LoRA for '{spec.trigger}'"
        + (f" ({spec.class_word})" if spec.class_word else "")
        + f", trained by Adapter Studio on {info.num_images} pictures for {info.steps} steps",
        "modelspec.tags": ", ".join(t for t in ("lora", spec.trigger, spec.class_word) if t),
    }
    if thumbnail is not None:
        meta["modelspec.thumbnail"] = thumbnail_data_url(thumbnail)
    return meta


def training_metadata(spec: TrainSpec, info: RunInfo, thumbnail: Path | None) -> dict[str, str]:
    """All metadata of a trained adapter, plus the full spec as ``studio_train_spec``."""
    return {
        **kohya_metadata(spec, info),
        **modelspec_metadata(spec, info, thumbnail),
        "studio_train_spec": spec.to_json(),
    }
