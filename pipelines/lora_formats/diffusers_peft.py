"""diffusers and PEFT LoRA files.

Names handled: ``unet.….lora_A.weight`` / ``lora_B`` (diffusers ≥ 0.24, ``save_lora_weights``),
``….lora.down.weight`` and attention-processor names ``….attn1.processor.to_q_lora.down.weight``
(older diffusers), ``….lora_linear_layer.…`` text-encoder names, PEFT's
``base_model.model.….lora_A.weight`` with ``adapter_config.json``, and DoRA's
``lora_magnitude_vector``. Renaming to PEFT names is done by diffusers' own tables
(``convert_unet_state_dict_to_peft``, ``DIFFUSERS_OLD_TO_PEFT``); alpha and rank come from a PEFT
config (``adapter_config.json`` or diffusers' ``lora_adapter_metadata``), honouring
``rank_pattern``/``alpha_pattern`` with PEFT's own pattern matching and ``use_rslora``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from diffusers.utils.state_dict_utils import (
    DIFFUSERS_OLD_TO_PEFT,
    convert_state_dict,
    convert_unet_state_dict_to_peft,
)
from peft.utils.other import get_pattern_key

from pipelines.lora_formats.architectures import canonical_path
from pipelines.lora_formats.detect import TEXT_ROOTS
from pipelines.lora_formats.errors import UnknownFormatError
from pipelines.lora_formats.factors import alpha_value, dora_magnitude, owned
from pipelines.lora_weights import COMPONENTS, LoraLayer

PEFT_PREFIX = "base_model.model."
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
_PART = re.compile(
    r"^(?P<path>.+?)\.(?:(?P<factor>lora_A|lora_B)(?:\.[^.]+)?\.weight|(?P<other>lora_magnitude_vector|alpha)"
    r"(?:\.[^.]+)?(?:\.weight)?)$"
)


def component_of(key: str) -> tuple[str, str]:
    """(component, rest of the key): explicit ``unet.``/``text_encoder….`` prefixes, else PEFT's bare names
    (CLIP's ``text_model.…``/``encoder.…`` are a text encoder, anything else the UNet)."""
    bare = key.removeprefix(PEFT_PREFIX)
    head, _, rest = bare.partition(".")
    if head in COMPONENTS and rest:
        return head, rest
    return ("text_encoder" if bare.startswith(TEXT_ROOTS) else "unet"), bare


def peft_names(keys: Iterable[str]) -> dict[str, str]:
    """Pure: original key → ``component.path.lora_A.weight``-style PEFT name, via diffusers' tables."""
    split: dict[str, dict[str, str]] = {}
    for key in keys:
        component, rest = component_of(key)
        split.setdefault(component, {})[rest] = key
    renamed: dict[str, str] = {}
    for component, names in split.items():
        if component != "unet":  # text encoders: to_q_lora → q_proj, lora_linear_layer → lora_A/B
            names = convert_state_dict(names, DIFFUSERS_OLD_TO_PEFT)
        names = convert_unet_state_dict_to_peft(names)  # processor, to_q_lora, lora.down → lora_A
        renamed.update({original: f"{component}.{name}" for name, original in names.items()})
    return renamed


def group_modules(keys: Iterable[str]) -> dict[str, dict[str, str]]:
    """Module path → {part: original key}, part ∈ lora_A, lora_B, lora_magnitude_vector, alpha."""
    groups: dict[str, dict[str, str]] = {}
    for original, name in peft_names(keys).items():
        match = _PART.match(name)
        if match is None:
            raise UnknownFormatError(f"tensor {original!r} is not a diffusers/PEFT LoRA tensor name")
        part, path = match["factor"] or match["other"], canonical_path(match["path"])
        if groups.setdefault(path, {}).setdefault(part, original) != original:
            raise UnknownFormatError(f"tensors {groups[path][part]!r} and {original!r} are the same part")
    return groups


def configs_from_metadata(metadata: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Per-component LoraConfig dicts from diffusers' ``lora_adapter_metadata`` (``{"unet.r": 4, …}``)."""
    raw = metadata.get(DIFFUSERS_METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, Python's 4300-digit int limit, deep nesting
        raise UnknownFormatError(f"metadata {DIFFUSERS_METADATA_KEY!r} is not JSON: {e}") from None
    configs: dict[str, dict[str, Any]] = {}
    for key, value in flat.items() if isinstance(flat, dict) else ():
        component, _, field = key.partition(".")
        configs.setdefault(component, {})[field] = value
    return configs


def config_alpha(config: Mapping[str, Any] | None, name: str, rank: int) -> float | None:
    """alpha in kohya terms (scale = alpha / rank) for module ``name`` under a PEFT config, or None."""
    if not config:
        return None
    rank_pattern, alpha_pattern = _pattern(config, "rank_pattern"), _pattern(config, "alpha_pattern")
    r = _number(rank_pattern.get(get_pattern_key(rank_pattern.keys(), name), config.get("r", rank)), "r")
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), name), config.get("lora_alpha", r))
    alpha = _number(alpha, "lora_alpha")
    if r != rank:
        raise ValueError(f"the adapter config gives rank {r:g} but the tensors have rank {rank}")
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return float(scale * rank)


def _pattern(config: Mapping[str, Any], field: str) -> Mapping[str, Any]:
    """A config's ``rank_pattern``/``alpha_pattern`` table (absent: empty); anything else is refused."""
    table = config.get(field) or {}
    if not isinstance(table, Mapping) or not all(isinstance(key, str) for key in table):
        raise ValueError(f"the adapter config's {field} is not a table of module patterns: {table!r}")
    return table


def _number(value: Any, field: str) -> float:
    """A finite number from a config (JSON from the wild may hold strings, lists or null there)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"the adapter config's {field} {value!r} is not a number")
    return float(value)


def parse(
    state_dict: Mapping[str, torch.Tensor], configs: Mapping[str, Mapping[str, Any]]
) -> dict[str, LoraLayer]:
    """Pure: diffusers/PEFT state dict → {module path: LoraLayer}; consumes every key or raises."""
    layers = {}
    for path, parts in group_modules(state_dict).items():
        tensors = {part: state_dict[key] for part, key in parts.items()}
        component, name = path.split(".", 1)
        try:
            layers[path] = _layer(tensors, configs.get(component), name)
        except (ValueError, RuntimeError) as e:
            raise UnknownFormatError(f"module {path!r}: {e}") from None
    return layers


def _layer(parts: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None, name: str) -> LoraLayer:
    """lora_A = down, lora_B = up (+ magnitude, alpha tensor or config alpha)."""
    missing = {"lora_A", "lora_B"} - parts.keys()
    if missing:
        raise ValueError(f"missing {', '.join(sorted(missing))}")
    down, up = owned(parts["lora_A"]), owned(parts["lora_B"])
    if down.dim() == 4 and up.dim() == 2:
        up = up[:, :, None, None]
    if up.shape[1] != down.shape[0] or down.dim() != up.dim():
        raise ValueError(f"lora_A {tuple(down.shape)} and lora_B {tuple(up.shape)} do not fit together")
    alpha = alpha_value(parts["alpha"]) if "alpha" in parts else config_alpha(config, name, down.shape[0])
    dora, _ = dora_magnitude(parts.get("lora_magnitude_vector"), up.shape[0], int(down.shape[1]), peft=True)
    return LoraLayer(down=down, up=up, alpha=alpha, dora_scale=dora)


def module_rank(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Rank of one module from its part shapes; raises ValueError for parts that do not fit together."""
    missing = {"lora_A", "lora_B"} - shapes.keys()
    if missing:
        raise ValueError(f"missing {', '.join(sorted(missing))}")
    if len(shapes["lora_B"]) < 2 or shapes["lora_B"][1] != shapes["lora_A"][0]:
        raise ValueError(
            f"lora_A {tuple(shapes['lora_A'])} and lora_B {tuple(shapes['lora_B'])} do not fit together"
        )
    return int(shapes["lora_A"][0])
