"""Which family a loaded pipeline is, its adaptable modules, and whether a LoRA fits it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from pipelines.lora_formats.architectures import POCKET, component_shapes
from pipelines.lora_formats.errors import FamilyMismatchError, ShapeMismatchError, UnmatchedKeysError, some
from pipelines.lora_formats.factors import delta_shape
from pipelines.lora_weights import COMPONENTS, FAMILIES, LoraWeights, family_name

_CROSS_ATTENTION_FAMILY = {768: "sd1", 1024: "sd2"}


def pipeline_family(pipe: Any) -> str | None:
    """Family of a diffusers pipeline: its ``studio_family`` marker, else its UNet config."""
    marker = getattr(pipe, "studio_family", None)
    if marker:
        return str(marker)
    unet = getattr(pipe, "unet", None)
    config = getattr(unet, "config", None)
    if config is None:
        return None
    width = config.get("cross_attention_dim")
    blocks = tuple(config.get("block_out_channels") or ())
    if width == 2048 and config.get("addition_embed_type") == "text_time":
        return "sdxl"
    if width == POCKET.text_hidden and blocks == tuple(POCKET.unet_channels):
        return "pocket"
    return _CROSS_ATTENTION_FAMILY.get(width) if isinstance(width, int) else None


def module_shapes(pipe: Any) -> dict[str, torch.Size]:
    """Weight shape of every nn.Linear/nn.Conv2d in the pipeline's UNet and text encoders, keyed like
    ``LoraWeights.layers`` (PEFT-wrapped layers are seen through)."""
    shapes: dict[str, torch.Size] = {}
    for component in COMPONENTS:
        module = getattr(pipe, component, None)
        if isinstance(module, torch.nn.Module):
            shapes.update(component_shapes(module, component))
    return shapes


def check_against_model(
    weights: LoraWeights, family: str | None, shapes: Mapping[str, torch.Size | tuple[int, ...]]
) -> None:
    """Raise FamilyMismatchError (both families known and different), UnmatchedKeysError or
    ShapeMismatchError (ΔW shape ≠ weight shape; 1×1 conv ≡ linear) if ``weights`` do not fit."""
    label = _label(weights)
    own = weights.family if weights.family in FAMILIES else None
    if own and family and own != family:
        raise FamilyMismatchError(
            f"{label}is for {family_name(own)}, the loaded model is {family_name(family)}"
        )
    missing = sorted(path for path in weights.layers if path not in shapes)
    if missing:
        raise UnmatchedKeysError(
            f"{label}adapts {len(missing)} module(s) the model does not have: {some(missing)}"
        )
    wrong = [
        f"{path} (model {tuple(shapes[path])}, LoRA {delta_shape(layer)})"
        for path, layer in sorted(weights.layers.items())
        if not same_map(tuple(shapes[path]), delta_shape(layer))
    ]
    if wrong:
        raise ShapeMismatchError(
            f"{label}has {len(wrong)} module(s) of the wrong shape: {'; '.join(wrong[:5])}"
            + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else "")
        )


def same_map(weight: tuple[int, ...], delta: tuple[int, ...]) -> bool:
    """Equal shapes, where a 1×1 conv (out, in, 1, 1) and a linear (out, in) count as the same map."""

    def squeeze(shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape[:2] if len(shape) == 4 and shape[2:] == (1, 1) else shape

    return squeeze(tuple(weight)) == squeeze(tuple(delta))


def _label(weights: LoraWeights) -> str:
    """``this LoRA ('title') `` from the file's own title, for messages."""
    title = weights.metadata.get("modelspec.title") or weights.metadata.get("ss_output_name")
    return f"this LoRA ({title!r}) " if title else "this LoRA "
