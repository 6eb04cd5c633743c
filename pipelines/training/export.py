"""From PEFT-wrapped models to the studio's ``LoraWeights``, and onto disk in kohya and diffusers form."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from pipelines.lora_formats import save_diffusers, save_kohya
from pipelines.lora_weights import LoraLayer, LoraWeights
from pipelines.training.orthogonal import lora_modules


def peft_layer_to_lora(module: torch.nn.Module, adapter: str) -> LoraLayer:
    """One PEFT LoRA layer as a ``LoraLayer``; kohya alpha = PEFT scaling × rank (covers rsLoRA)."""
    down = module.lora_A[adapter].weight.detach().float().cpu().clone()
    up = module.lora_B[adapter].weight.detach().float().cpu().clone()
    alpha = float(module.scaling[adapter]) * down.shape[0]
    dora = None
    if adapter in module.lora_magnitude_vector:
        dora = module.lora_magnitude_vector[adapter].weight.detach().float().cpu().reshape(-1).clone()
    return LoraLayer(down=down, up=up, alpha=alpha, dora_scale=dora)


def peft_to_lora_weights(
    components: Mapping[str, torch.nn.Module],
    family: str,
    metadata: Mapping[str, str] | None = None,
    adapter: str = "default",
) -> LoraWeights:
    """Every PEFT layer of ``adapter`` in ``{"unet": unet, "text_encoder": te, …}`` as one LoraWeights."""
    layers = {
        f"{component}.{name}": peft_layer_to_lora(module, adapter)
        for component, model in components.items()
        for name, module in lora_modules(model, adapter)
    }
    if not layers:
        raise ValueError(f"no PEFT layers of adapter {adapter!r} found")
    return LoraWeights(layers=layers, family=family, metadata=dict(metadata or {}), format="kohya")


def remove_lora(model: torch.nn.Module, adapter: str = "default") -> int:
    """Put the original modules back where PEFT wrapped them; returns how many were unwrapped."""
    names = [name for name, _ in lora_modules(model, adapter)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, getattr(parent, child).get_base_layer())
    if hasattr(model, "peft_config"):
        model.peft_config.pop(adapter, None)
        if not model.peft_config:  # no adapter left: the model is plain again (PEFT warns otherwise)
            del model.peft_config
    return len(names)


DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what ``load_lora_weights(folder)`` reads


def diffusers_dir_for(kohya_path: Path) -> Path:
    """Where the diffusers-format copy of ``name.safetensors`` goes: the folder ``name_diffusers/``."""
    return kohya_path.with_name(kohya_path.stem + "_diffusers")


def write_adapter(weights: LoraWeights, kohya_path: Path) -> tuple[Path, Path]:
    """Save the kohya file and the diffusers folder (each written atomically; both or neither)."""
    kohya_path.parent.mkdir(parents=True, exist_ok=True)
    out_dir = diffusers_dir_for(kohya_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_diffusers(weights, out_dir / DIFFUSERS_WEIGHT_NAME)
    try:
        save_kohya(weights, kohya_path, weights.metadata)
    except BaseException:
        (out_dir / DIFFUSERS_WEIGHT_NAME).unlink(missing_ok=True)
        raise
    return kohya_path, out_dir
