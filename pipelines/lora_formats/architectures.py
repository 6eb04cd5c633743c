"""The real module layout of each base family, built from its published config on the meta device.

No weights are allocated (``torch.device("meta")``), so even SDXL's 2.6 B-parameter UNet builds in
well under a second. The layouts give the exact module names (to split kohya's underscore names
without guessing, as A1111 does with the loaded model) and every weight shape (to check a LoRA
against a family without loading it).
"""

from __future__ import annotations

import math
from functools import cache
from types import MappingProxyType
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from pipelines.pocket.model import PocketConfig, build_text_encoder, build_unet

# UNet configs as published with runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1
# and stabilityai/stable-diffusion-xl-base-1.0 (unet/config.json; defaults left out).
_SD_BLOCKS = {
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "layers_per_block": 2,
}
UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "sd1": {**_SD_BLOCKS, "attention_head_dim": 8, "cross_attention_dim": 768, "sample_size": 64},
    "sd2": {
        **_SD_BLOCKS,
        "attention_head_dim": (5, 10, 20, 20),
        "cross_attention_dim": 1024,
        "sample_size": 96,
        "use_linear_projection": True,
        "upcast_attention": True,
    },
    "sdxl": {
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256,
        "attention_head_dim": (5, 10, 20),
        "block_out_channels": (320, 640, 1280),
        "cross_attention_dim": 2048,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "layers_per_block": 2,
        "projection_class_embeddings_input_dim": 2816,
        "sample_size": 128,
        "transformer_layers_per_block": (1, 2, 10),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "use_linear_projection": True,
    },
}
# CLIP text encoders: OpenAI ViT-L/14 (SD 1.x, SDXL's first), OpenCLIP ViT-H/14 (SD 2.x),
# OpenCLIP ViT-bigG/14 with projection (SDXL's second).
_CLIP_L = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
_CLIP_H = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "projection_dim": 512,
    "hidden_act": "gelu",
}
_CLIP_BIGG = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}
TEXT_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "sd1": {"text_encoder": _CLIP_L},
    "sd2": {"text_encoder": _CLIP_H},
    "sdxl": {"text_encoder": _CLIP_L, "text_encoder_2": _CLIP_BIGG},
}
ARCHITECTURE_FAMILIES = ("sd1", "sd2", "sdxl", "pocket")
POCKET = PocketConfig()


def component_shapes(module: nn.Module, component: str) -> dict[str, torch.Size]:
    """Weight shapes of every Linear/Conv2d under ``module``, keyed ``component.name``.

    PEFT-wrapped layers are seen through: ``….to_q.base_layer`` counts as ``….to_q`` and the
    adapter's own ``lora_A``/``lora_B`` layers are skipped.
    """
    shapes: dict[str, torch.Size] = {}
    for name, sub in module.named_modules():
        if not isinstance(sub, nn.Linear | nn.Conv2d) or ".lora_" in f".{name}":
            continue
        shapes[f"{component}.{name.removesuffix('.base_layer')}"] = sub.weight.shape
    return shapes


def _family_modules(family: str) -> dict[str, nn.Module]:
    """Meta-device UNet and text encoder(s) of a family."""
    with torch.device("meta"):
        if family == "pocket":
            return {"unet": build_unet(POCKET), "text_encoder": build_text_encoder(POCKET)}
        modules: dict[str, nn.Module] = {"unet": UNet2DConditionModel(**UNET_CONFIGS[family])}
        for component, cfg in TEXT_CONFIGS[family].items():
            cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
            modules[component] = cls(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **cfg))
        return modules


@cache
def _shapes(family: str) -> MappingProxyType[str, torch.Size]:
    """Cached, read-only shapes of one family."""
    shapes: dict[str, torch.Size] = {}
    for component, module in _family_modules(family).items():
        shapes.update(component_shapes(module, component))
    return MappingProxyType(shapes)


def architecture_shapes(family: str) -> dict[str, torch.Size]:
    """Weight shape of every adaptable module of a family (``sd1``, ``sd2``, ``sdxl``, ``pocket``)."""
    if family not in ARCHITECTURE_FAMILIES:
        raise KeyError(
            f"no built-in architecture for family {family!r}; known: {', '.join(ARCHITECTURE_FAMILIES)}"
        )
    return dict(_shapes(family))


@cache
def layers_per_block(family: str | None) -> int:
    """ResNets per UNet level, which SGM block numbering depends on (2 for every SD family)."""
    if family == "pocket":
        with torch.device("meta"):
            return int(build_unet(POCKET).config.layers_per_block)
    return int(UNET_CONFIGS.get(family or "", UNET_CONFIGS["sd1"])["layers_per_block"])


@cache
def text_model_prefix(component: str) -> str:
    """``text_model.`` if the installed transformers nests the component's CLIP transformer under
    ``text_model`` (CLIPTextModelWithProjection, and CLIPTextModel before transformers 5), else ``""``."""
    names = {path.split(".", 1)[1] for path in _shapes("sdxl") if path.startswith(f"{component}.")}
    return "text_model." if any(name.startswith("text_model.") for name in names) else ""


def canonical_path(path: str) -> str:
    """A module path in the installed layout: text-encoder paths gain or lose ``text_model.`` so that
    ``text_encoder.text_model.encoder.…`` (kohya, transformers 4) and ``text_encoder.encoder.…``
    (transformers 5's flattened CLIPTextModel) both name the module ``named_modules()`` reports."""
    component, _, name = path.partition(".")
    if component not in ("text_encoder", "text_encoder_2"):
        return path
    bare = name.removeprefix("text_model.")
    prefix = "" if bare.startswith("text_projection") else text_model_prefix(component)
    return f"{component}.{prefix}{bare}"


def kohya_text_name(name: str) -> str:
    """A text-encoder module name in the layout kohya-ss and A1111 use (transformers 4's
    ``text_model.…``, with ``text_projection`` outside it)."""
    bare = name.removeprefix("text_model.")
    return bare if bare.startswith("text_projection") else f"text_model.{bare}"


KOHYA_PREFIXES_BY_COMPONENT = {
    "unet": ("lora_unet",),
    "text_encoder": ("lora_te", "lora_te1"),
    "text_encoder_2": ("lora_te2",),
}


@cache
def kohya_name_table() -> MappingProxyType[str, str]:
    """kohya module name → module path over all families (``lora_te2_text_model_…`` → ``text_encoder_2.…``).

    Built from real module names, so underscores inside names (``to_q``, ``down_blocks``) never have
    to be guessed. Text-encoder modules are listed under kohya's ``text_model_`` spelling and under
    the installed layout's. Raises if two different paths would share a kohya name.
    """
    table: dict[str, str] = {}
    for family in ARCHITECTURE_FAMILIES:
        for path in _shapes(family):
            component, name = path.split(".", 1)
            spellings = {name} if component == "unet" else {name, kohya_text_name(name)}
            for prefix in KOHYA_PREFIXES_BY_COMPONENT[component]:
                for spelling in spellings:
                    key = f"{prefix}_{spelling.replace('.', '_')}"
                    if table.setdefault(key, path) != path:
                        raise RuntimeError(f"kohya name {key!r} is ambiguous: {table[key]!r} and {path!r}")
    return MappingProxyType(table)


def kernel_size(path: str, family: str | None) -> tuple[int, ...] | None:
    """Kernel dims of a module's weight (``()`` for Linear), from the family's layout or, where all
    families agree, from any; None where unknown or ambiguous (SD 1.x's 1×1-conv ``proj_in`` is a
    Linear in SD 2.x/SDXL)."""
    families = [family] if family in ARCHITECTURE_FAMILIES else list(ARCHITECTURE_FAMILIES)
    kernels = {tuple(_shapes(f)[path][2:]) for f in families if path in _shapes(f)}
    return kernels.pop() if len(kernels) == 1 else None


def flat_width(shape: tuple[int, ...]) -> int:
    """Input width of a weight seen as a matrix: in·kh·kw."""
    return math.prod(shape[1:])
