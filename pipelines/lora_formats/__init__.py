"""Read and write every common LoRA file format as the normalised ``LoraWeights``.

Formats read: kohya-ss / A1111 / Civitai (``lora_unet_…``, ``lora_te[12]_…``; LoCon convs incl.
Tucker ``lora_mid``; SDXL's SGM block names; DoRA ``dora_scale``), LyCORIS LoHa and LoKr (converted
exactly to LoRA), diffusers (``unet.….lora_A.weight``, ``lora.down``, legacy attention-processor
names), PEFT folders (``adapter_config.json`` rank/alpha, patterns, rsLoRA, DoRA). Pickled files
are refused unopened. Formats written: kohya, diffusers, PEFT.
"""

from __future__ import annotations

from pipelines.lora_formats.architectures import architecture_shapes
from pipelines.lora_formats.detect import detect_family, detect_format, trigger_words
from pipelines.lora_formats.errors import (
    FamilyMismatchError,
    LoraFormatError,
    NonFiniteWeightsError,
    NotSafetensorsError,
    PickledFileError,
    ShapeMismatchError,
    UnknownFormatError,
    UnmatchedKeysError,
)
from pipelines.lora_formats.loading import UNKNOWN_FAMILY, LoraFileInfo, inspect, load, load_state_dict
from pipelines.lora_formats.model_check import check_against_model, module_shapes, pipeline_family
from pipelines.lora_formats.writers import save_diffusers, save_kohya, save_peft

__all__ = [
    "UNKNOWN_FAMILY",
    "FamilyMismatchError",
    "LoraFileInfo",
    "LoraFormatError",
    "NonFiniteWeightsError",
    "NotSafetensorsError",
    "PickledFileError",
    "ShapeMismatchError",
    "UnknownFormatError",
    "UnmatchedKeysError",
    "architecture_shapes",
    "check_against_model",
    "detect_family",
    "detect_format",
    "inspect",
    "load",
    "load_state_dict",
    "module_shapes",
    "pipeline_family",
    "save_diffusers",
    "save_kohya",
    "save_peft",
    "trigger_words",
]
