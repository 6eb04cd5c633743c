"""Reading any supported LoRA file into LoraWeights, and header-only inspection."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines.lora_formats import diffusers_peft, kohya
from pipelines.lora_formats.detect import components_of, detect_family, detect_format, trigger_words
from pipelines.lora_formats.errors import LoraFormatError, UnknownFormatError, in_file, some
from pipelines.lora_formats.safetensors_io import check_finite, read_header, read_tensors, refuse_pickle
from pipelines.lora_weights import COMPONENTS, LoraWeights

UNKNOWN_FAMILY = "unknown"  # LoraWeights.family when neither metadata, names nor shapes decide it
WEIGHT_FILES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors")
PICKLED_WEIGHT_FILES = ("adapter_model.bin", "pytorch_lora_weights.bin")
_CHECKPOINT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")
_EMBEDDING_KEYS = ("emb_params", "clip_l", "clip_g", "string_to_param", "string_to_token")


@dataclass(frozen=True)
class LoraFileInfo:
    """What a LoRA file's header says, without reading its tensor data.

    ``rank`` is the largest rank ``load`` would produce (for LoHa/LoKr the exact rank of the
    materialised update, e.g. up to r² for a LoHa of dim r).
    """

    path: Path
    format: str
    family: str | None
    metadata: dict[str, str]
    trigger_words: list[str]
    rank: int
    num_modules: int
    components: set[str]
    size_bytes: int


def resolve(path: Path | str) -> tuple[Path, Path | None]:
    """(weights file, adapter_config.json or None) for a LoRA file or a PEFT/diffusers folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    weights = _weights_in(path) if path.is_dir() else path
    config = weights.with_name("adapter_config.json")
    is_peft = weights.name == "adapter_model.safetensors" and config.is_file()
    return weights, (config if is_peft else None)


def _weights_in(folder: Path) -> Path:
    """The one LoRA weights file in a folder."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    for name in PICKLED_WEIGHT_FILES:
        if (folder / name).is_file():
            refuse_pickle(folder / name, b"")
    candidates = sorted(folder.glob("*.safetensors"))
    if len(candidates) != 1:
        found = "no" if not candidates else f"{len(candidates)}"
        raise LoraFormatError(f"{folder}: {found} .safetensors files; expected one LoRA weights file")
    return candidates[0]


def read_config(path: Path) -> dict[str, Any]:
    """A PEFT ``adapter_config.json`` (must be a LoRA config)."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, too-long ints, deep nesting
        raise LoraFormatError(f"{path}: not a valid JSON adapter config ({e})") from None
    if not isinstance(config, dict):
        raise LoraFormatError(f"{path}: the adapter config is not a JSON object")
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise UnknownFormatError(f"{path}: PEFT adapter type {config['peft_type']!r} is not LoRA")
    return config


def load(path: Path | str, *, adapter_config: Path | None = None) -> LoraWeights:
    """Load a LoRA file or PEFT/diffusers folder of any supported format as float32 CPU LoraWeights."""
    weights_file, found_config = resolve(path)
    config_file = Path(adapter_config) if adapter_config is not None else found_config
    try:
        config = read_config(config_file) if config_file is not None else None
        tensors, metadata = read_tensors(weights_file)
        return _load(tensors, metadata, config)
    except LoraFormatError as e:
        raise in_file(e, weights_file) from e


def load_state_dict(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> LoraWeights:
    """Pure: an in-memory state dict (any supported naming) → LoraWeights; ``sd`` is left untouched."""
    return _load(sd, dict(metadata or {}), None)


def _load(
    sd: Mapping[str, torch.Tensor], metadata: dict[str, str], config: dict[str, Any] | None
) -> LoraWeights:
    """Validate, detect format and family, and parse with the matching converter."""
    if not sd:
        raise UnknownFormatError("holds no tensors")
    check_finite(sd)
    fmt = detect_format(sd)
    is_kohya = any(kohya.is_kohya_key(k) for k in sd)  # kohya names get kohya's own, specific errors
    if fmt is None and not is_kohya:
        raise UnknownFormatError(not_a_lora_message(list(sd)))
    family = detect_family({k: tuple(v.shape) for k, v in sd.items()}, metadata)
    if is_kohya:
        layers = kohya.parse(sd, family)
    else:
        configs = (
            dict.fromkeys(COMPONENTS, config) if config else diffusers_peft.configs_from_metadata(metadata)
        )
        layers = diffusers_peft.parse(sd, configs)
        fmt = "peft" if config and fmt in ("diffusers", "diffusers_legacy") else fmt
    return LoraWeights(
        layers=layers, family=family or UNKNOWN_FAMILY, metadata=dict(metadata), format=fmt or "kohya"
    )


def not_a_lora_message(keys: list[str]) -> str:
    """Why a set of tensor names is not a LoRA, naming what it looks like instead."""
    if any(k.startswith(_CHECKPOINT_PREFIXES) for k in keys):
        return f"this is a full model checkpoint ({len(keys)} tensors such as {some(keys, 2)}), not a LoRA"
    if all(k.split(".")[0] in _EMBEDDING_KEYS for k in keys):
        return f"this is a textual-inversion embedding ({some(keys, 3)}), not a LoRA"
    return (
        f"{len(keys)} tensors such as {some(keys, 3)} follow no known LoRA naming "
        "(kohya lora_down/lora_up, diffusers/PEFT lora_A/lora_B, LyCORIS hada_/lokr_)"
    )


def inspect(path: Path | str) -> LoraFileInfo:
    """Format, family, metadata, trigger words, rank and modules of a LoRA file, from its header only."""
    weights_file, config = resolve(path)
    try:
        header = read_header(weights_file)
        return _info(weights_file, header.shapes(), header.metadata, header.size_bytes, config is not None)
    except LoraFormatError as e:
        raise in_file(e, weights_file) from e


def _info(
    path: Path, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str], size: int, peft: bool
) -> LoraFileInfo:
    """LoraFileInfo from tensor shapes and metadata (names resolved and parts checked as ``load`` does)."""
    fmt = detect_format(shapes)
    is_kohya = any(kohya.is_kohya_key(k) for k in shapes)
    if fmt is None and not is_kohya:
        raise UnknownFormatError(not_a_lora_message(list(shapes)) if shapes else "holds no tensors")
    family = detect_family(shapes, metadata)
    if is_kohya:
        groups, rank_of = kohya.group_modules(shapes), kohya.module_rank
        kohya.module_paths(groups, family)
    else:
        groups, rank_of = diffusers_peft.group_modules(shapes), diffusers_peft.module_rank
        fmt = "peft" if peft and fmt in ("diffusers", "diffusers_legacy") else fmt
    ranks = []
    for name, parts in groups.items():
        try:
            ranks.append(rank_of({part: shapes[key] for part, key in parts.items()}))
        except (ValueError, KeyError, IndexError) as e:
            raise UnknownFormatError(f"module {name!r}: {e}") from None
    return LoraFileInfo(
        path=path,
        format=fmt or "kohya",
        family=family,
        metadata=metadata,
        trigger_words=trigger_words(metadata),
        rank=max(ranks, default=0),
        num_modules=len(groups),
        components=components_of(shapes),
        size_bytes=size,
    )
