"""LoRA training: DreamBooth-style adapters for any Stable-Diffusion-family pipeline.

``train_lora(spec, model, images, out)`` is the one entry point; ``TrainSpec`` (or ``preset``)
holds every option. See ``lora_train`` for the loop and ``orthogonal`` for Orthogonal Adaptation.
"""

from __future__ import annotations

from pipelines.training.config import PRESETS, TrainSpec, preset
from pipelines.training.data import ImageItem, items_from_folder
from pipelines.training.lora_train import (
    TrainingCancelled,
    TrainProgress,
    TrainResult,
    detect_family,
    load_base_pipeline,
    train_lora,
)
from pipelines.training.orthogonal import BasisRegistry, BasisSlot

__all__ = [
    "PRESETS",
    "BasisRegistry",
    "BasisSlot",
    "ImageItem",
    "TrainProgress",
    "TrainResult",
    "TrainSpec",
    "TrainingCancelled",
    "detect_family",
    "items_from_folder",
    "load_base_pipeline",
    "preset",
    "train_lora",
]
