"""Writing LoraWeights as kohya (A1111/ComfyUI/Civitai), diffusers and PEFT files, atomically."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig

from pipelines.lora_formats.architectures import canonical_path, kohya_text_name
from pipelines.lora_formats.detect import family_from_metadata
from pipelines.lora_formats.diffusers_peft import DIFFUSERS_METADATA_KEY, PEFT_PREFIX
from pipelines.lora_formats.errors import LoraFormatError
from pipelines.lora_formats.factors import plain_factors
from pipelines.lora_formats.safetensors_io import atomic_write, check_finite, write_safetensors
from pipelines.lora_weights import COMPONENTS, LoraLayer, LoraWeights

KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
ARCHITECTURE = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-512",
    "sdxl": "stable-diffusion-xl-v1-base",
    "pocket": "adapter-studio-pocket",
}
BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "pocket": "pocket_v1"}
RESOLUTION = {"sd1": "512x512", "sd2": "512x512", "sdxl": "1024x1024", "pocket": "64x64"}
IMPLEMENTATION = {"sdxl": "https://github.com/Stability-AI/generative-models"}
# Metadata that describes the file it came from and would be wrong in a rewritten one.
_STALE = (
    "sshs_model_hash",
    "sshs_legacy_hash",
    "modelspec.hash_sha256",
    "ss_network_args",
    "format",
    DIFFUSERS_METADATA_KEY,
)


# SDXL's added-condition MLP under kohya-ss's SGM names: diffusers' kohya converter strips the index of
# ``add_embedding_linear_1``/``_2`` (its ``emb`` rule), so both would land on one non-existent module.
_KOHYA_UNET_NAMES = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def kohya_name(path: str, sdxl: bool) -> str:
    """kohya module name of a module path, as diffusers' ``convert_state_dict_to_kohya`` names it, with
    kohya's own spellings: ``text_model_`` text-encoder names, ``lora_te1_`` only for SDXL, SDXL's
    ``label_emb``."""
    component, name = _split(path)
    prefix = "lora_te1" if sdxl and component == "text_encoder" else KOHYA_PREFIX[component]
    name = _KOHYA_UNET_NAMES.get(name, name) if component == "unet" else kohya_text_name(name)
    return f"{prefix}_{name.replace('.', '_')}"


def diffusers_path(path: str) -> str:
    """Module path as diffusers files spell it: text encoders under ``text_model.`` (readable by
    ComfyUI, older diffusers, and diffusers 0.42, which strips it for flattened CLIP models)."""
    component, name = _split(path)
    return path if component == "unet" else f"{component}.{kohya_text_name(name)}"


def _split(path: str) -> tuple[str, str]:
    """(component, module name) of a module path, which must start with a known component."""
    component, _, name = path.partition(".")
    if component not in COMPONENTS or not name:
        raise LoraFormatError(f"module path {path!r} does not start with one of {', '.join(COMPONENTS)}")
    return component, name


def _checked(weights: LoraWeights) -> None:
    """Refuse to write an empty adapter, non-finite factors or factors that do not fit together."""
    if not weights.layers:
        raise LoraFormatError("the adapter has no layers to write")
    for path, layer in weights.layers.items():
        _split(path)
        check_finite({f"{path}.down": layer.down, f"{path}.up": layer.up})
        if layer.up.shape[1] != layer.down.shape[0]:
            raise LoraFormatError(
                f"{path}: up {tuple(layer.up.shape)} and down {tuple(layer.down.shape)} differ in rank"
            )


def _alpha(layer: LoraLayer) -> float:
    """The layer's alpha with kohya's default (alpha = rank)."""
    return float(layer.rank if layer.alpha is None else layer.alpha)


def family_metadata(weights: LoraWeights) -> dict[str, str]:
    """modelspec / kohya fields naming the base family (kept from the file when they agree)."""
    family = weights.family
    if family not in ARCHITECTURE:
        return {"modelspec.sai_model_spec": "1.0.0"}
    fields = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{ARCHITECTURE[family]}/lora",
        "modelspec.implementation": IMPLEMENTATION.get(family, "diffusers"),
        "modelspec.resolution": RESOLUTION[family],
        "ss_base_model_version": BASE_MODEL_VERSION[family],
    }
    if family in ("sd1", "sd2"):
        fields["ss_v2"] = str(family == "sd2")
    own = {k: weights.metadata[k] for k in fields if k in weights.metadata}
    return {**fields, **own} if family_from_metadata(own) == family else fields


def _carried(weights: LoraWeights) -> dict[str, str]:
    """The file's own metadata minus fields that would be stale in a rewritten file."""
    return {k: v for k, v in weights.metadata.items() if k not in _STALE}


def _common(values: list[float]) -> str:
    """One value as kohya writes it, or ``Dynamic`` when layers differ (kohya's resize_lora.py)."""
    distinct = set(values)
    return f"{distinct.pop():g}" if len(distinct) == 1 else "Dynamic"


def _dora_layout(layer: LoraLayer, down: torch.Tensor, peft: bool) -> torch.Tensor:
    """DoRA magnitude as stored: kohya/LyCORIS (out, 1, …) or, per input channel, (1, in, …); PEFT (out,)
    or (1, out, 1, 1) for convs (PEFT has no per-input-channel form: refused)."""
    magnitude = layer.dora_scale
    assert magnitude is not None
    n = magnitude.numel()
    if layer.dora_axis == 1:
        if peft:
            raise LoraFormatError(
                "DoRA magnitudes per input channel (LyCORIS/OneTrainer layout) have no PEFT/diffusers form; "
                "save it as a kohya file"
            )
        return magnitude.reshape(1, n, *[1] * (down.dim() - 2))
    if down.dim() == 2:
        return magnitude.reshape(n, 1) if not peft else magnitude.reshape(n)
    return magnitude.reshape(1, n, 1, 1) if peft else magnitude.reshape(n, 1, 1, 1)


def _as_str(value: Any) -> str:
    """Metadata values are strings; anything else is stored as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def save_kohya(weights: LoraWeights, path: Path | str, metadata: Mapping[str, str] | None = None) -> None:
    """Atomically write a kohya/A1111 LoRA (``lora_down``/``lora_up``/``alpha`` [+ ``dora_scale``]) with
    ``ss_*``/``modelspec.*`` metadata.

    Every module gets the same alpha (the most common one, kohya's single ``network_alpha``); a
    module whose own alpha differs has the ratio folded into ``lora_up``, so ΔW is unchanged and
    diffusers 0.42 — which drops per-module alphas of attention layers in kohya files — reads it
    right. LoCon Tucker cores are merged into ``lora_down`` exactly, for readers without LoCon.
    """
    path = Path(path)
    _checked(weights)
    sdxl = weights.family == "sdxl" or "text_encoder_2" in weights.components()
    alphas = Counter(_alpha(layer) for layer in weights.layers.values() if _alpha(layer) != 0)
    alpha = alphas.most_common(1)[0][0] if alphas else 1.0
    tensors: dict[str, torch.Tensor] = {}
    for module, layer in weights.layers.items():
        name = kohya_name(module, sdxl)
        down, up = plain_factors(layer)
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up if _alpha(layer) == alpha else up * (_alpha(layer) / alpha)
        tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        if layer.dora_scale is not None:
            tensors[f"{name}.dora_scale"] = _dora_layout(layer, down, peft=False)
    header = {**_carried(weights), **family_metadata(weights), **_kohya_fields(weights, path, alpha)}
    header.update({k: _as_str(v) for k, v in (metadata or {}).items()})
    write_safetensors(path, tensors, header)


def _kohya_fields(weights: LoraWeights, path: Path, alpha: float) -> dict[str, str]:
    """kohya-ss training fields A1111/ComfyUI/Civitai read."""
    layers = list(weights.layers.values())
    dora = any(layer.dora_scale is not None for layer in layers)
    fields = {
        "format": "pt",
        "ss_network_module": "lycoris.kohya" if dora else "networks.lora",
        "ss_network_dim": _common([layer.rank for layer in layers]),
        "ss_network_alpha": f"{alpha:g}",
        "modelspec.title": weights.metadata.get("modelspec.title", path.stem),
    }
    if dora:
        on_output = all(layer.dora_axis == 0 for layer in layers if layer.dora_scale is not None)
        fields["ss_network_args"] = json.dumps(
            {"algo": "lora", "dora_wd": "True", "wd_on_output": str(on_output)}
        )
    return fields


def _dora_all_or_none(layers: list[LoraLayer]) -> bool:
    """True if every layer is DoRA; PEFT/diffusers configs cannot mix DoRA and plain layers."""
    flags = {layer.dora_scale is not None for layer in layers}
    if len(flags) > 1:
        raise LoraFormatError(
            "some layers are DoRA and some are not; a PEFT/diffusers config cannot express that"
        )
    return flags.pop()


def save_diffusers(weights: LoraWeights, path: Path | str) -> None:
    """Atomically write diffusers' single-file naming (``unet.….lora_A.weight``), as
    ``StableDiffusionPipeline.save_lora_weights`` does; alpha/rank is folded into ``lora_B`` so that
    ``load_lora_weights`` gives the same ΔW with no adapter config."""
    path = Path(path)
    _checked(weights)
    _dora_all_or_none(list(weights.layers.values()))
    tensors: dict[str, torch.Tensor] = {}
    for module, layer in weights.layers.items():
        down, up = plain_factors(layer)
        name = diffusers_path(module)
        tensors[f"{name}.lora_A.weight"] = down
        tensors[f"{name}.lora_B.weight"] = up * layer.scale
        if layer.dora_scale is not None:
            tensors[f"{name}.lora_magnitude_vector"] = _dora_layout(layer, down, peft=True)
    header = {**_carried(weights), **family_metadata(weights), "format": "pt"}
    write_safetensors(path, tensors, header)


def save_peft(weights: LoraWeights, directory: Path | str, component: str = "unet") -> None:
    """Write one component as a PEFT adapter folder: ``adapter_model.safetensors`` + ``adapter_config.json``
    (r, lora_alpha, rank/alpha patterns, target_modules, use_dora), each file atomically."""
    directory = Path(directory)
    _checked(weights)
    layers = {
        canonical_path(path).split(".", 1)[1]: layer
        for path, layer in weights.layers.items()
        if _split(path)[0] == component
    }
    if not layers:
        raise LoraFormatError(
            f"the adapter has no {component} layers (it adapts {sorted(weights.components())})"
        )
    dora = _dora_all_or_none(list(layers.values()))
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        down, up = plain_factors(layer)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = down
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = up
        if layer.dora_scale is not None:
            tensors[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = _dora_layout(layer, down, peft=True)
    config = json.dumps(peft_config(layers, dora), indent=2, sort_keys=True)
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / "adapter_model.safetensors", tensors, {**_carried(weights), "format": "pt"})
    atomic_write(directory / "adapter_config.json", lambda tmp: tmp.write_text(config + os.linesep))


def peft_config(layers: Mapping[str, LoraLayer], dora: bool) -> dict[str, Any]:
    """A LoraConfig dict (through PEFT's own LoraConfig) with the most common rank/alpha and patterns
    for the rest, as diffusers' ``get_peft_kwargs`` builds them."""
    ranks = {name: layer.rank for name, layer in layers.items()}
    alphas = {name: _alpha(layer) for name, layer in layers.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = LoraConfig(
        r=r,
        lora_alpha=_number(alpha),
        target_modules=sorted(layers),
        rank_pattern={name: rank for name, rank in ranks.items() if rank != r},
        alpha_pattern={name: _number(a) for name, a in alphas.items() if a != alpha},
        use_dora=dora,
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=True,
    ).to_dict()
    return {key: sorted(value) if isinstance(value, set) else value for key, value in config.items()}


def _number(value: float) -> int | float:
    """Integral floats as ints, as PEFT configs usually hold them."""
    return int(value) if float(value).is_integer() else value
