"""kohya-ss / A1111 / Civitai LoRA, LoCon (incl. Tucker ``lora_mid``), DoRA and LyCORIS LoHa/LoKr.

Keys are ``{kohya_name}.{part}``, e.g. ``lora_unet_down_blocks_0_…_to_q.lora_down.weight``.
kohya names are module paths with dots turned into underscores, so they are resolved against the
real module names of every known family (architectures.kohya_name_table, as A1111 does with the
loaded model). Names not found there — SDXL files use SGM/LDM block names such as
``lora_unet_input_blocks_4_1_…`` — go through diffusers' own converters
(``_maybe_map_sgm_blocks_to_diffusers``, ``_convert_unet_lora_key``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from types import SimpleNamespace
from typing import Any

import torch
from diffusers.loaders.lora_conversion_utils import (
    _convert_text_encoder_lora_key,
    _convert_unet_lora_key,
    _maybe_map_sgm_blocks_to_diffusers,
)
from diffusers.utils.state_dict_utils import (
    DIFFUSERS_OLD_TO_PEFT,
    convert_state_dict,
    convert_unet_state_dict_to_peft,
)

from pipelines.lora_formats.architectures import (
    canonical_path,
    kernel_size,
    kohya_name_table,
    layers_per_block,
)
from pipelines.lora_formats.detect import KOHYA_PREFIXES
from pipelines.lora_formats.errors import UnknownFormatError, some
from pipelines.lora_formats.factors import alpha_value, dora_magnitude, owned
from pipelines.lora_formats.lycoris import loha_factors, lokr_factors, lokr_rank_dim, lowrank_to_lora
from pipelines.lora_weights import LoraLayer

LORA_PARTS = frozenset({"lora_down.weight", "lora_up.weight", "lora_mid.weight"})
LOHA_PARTS = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"})
LOKR_PARTS = frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"})
COMMON_PARTS = frozenset({"alpha", "dora_scale"})
KOHYA_PARTS = LORA_PARTS | LOHA_PARTS | LOKR_PARTS | COMMON_PARTS
_UNSUPPORTED = {
    "diff": "LyCORIS full fine-tune ('full')",
    "diff_b": "LyCORIS full fine-tune ('full')",
    "oft_blocks": "LyCORIS OFT",
    "oft_diag": "LyCORIS OFT",
    "w_norm": "LyCORIS norm layers",
    "b_norm": "LyCORIS norm layers",
    "scalar": "LyCORIS use_scalar (saved without folding it into the factors)",
    "bias": "a bias update (LyCORIS full or (IA)³)",
    "on_input": "LyCORIS (IA)³",
    "weight": "LyCORIS (IA)³ or full",
}


def is_kohya_key(key: str) -> bool:
    """True for ``lora_unet_…``/``lora_te…_`` names."""
    return key.startswith(KOHYA_PREFIXES)


def group_modules(keys: Iterable[str]) -> dict[str, dict[str, str]]:
    """kohya name → {part: key}; every key must be a kohya key with a known part."""
    groups: dict[str, dict[str, str]] = {}
    for key in keys:
        name, _, part = key.partition(".")
        if not is_kohya_key(key) or not part:
            raise UnknownFormatError(f"tensor {key!r} is not a kohya LoRA tensor name")
        if part not in KOHYA_PARTS:
            what = _UNSUPPORTED.get(part.split(".")[0])
            why = f"is a part of {what}, which is not supported" if what else "is no known LoRA part"
            raise UnknownFormatError(f"tensor {key!r}: {part!r} {why}")
        groups.setdefault(name, {})[part] = key
    return groups


def module_paths(names: Iterable[str], family: str | None) -> dict[str, str]:
    """kohya name → module path; raises when two names land on one module."""
    table = kohya_name_table()
    names = list(names)
    paths = {name: table[name] for name in names if name in table}
    paths.update(_converted_paths([n for n in names if n not in table], family))
    seen: dict[str, str] = {}
    for name, path in paths.items():
        if seen.setdefault(path, name) != name:
            raise UnknownFormatError(f"{seen[path]!r} and {name!r} both adapt module {path!r}")
    return paths


_SGM_BLOCKS = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks)_")
_DIFFUSERS_BLOCKS = re.compile(r"^lora_unet_(down_blocks|mid_block|up_blocks)_")
# SD 1.x/2.x's first up level has no attention, so its upsampler is output_blocks_2_1_conv (kohya-ss
# networks/lora.py's compvis names); diffusers' SGM map takes index 1 for an attention.
_FIRST_UPSAMPLER = re.compile(r"^(lora_unet_output_blocks_\d+)_1_conv$")


def _converted_paths(names: list[str], family: str | None) -> dict[str, str]:
    """Paths of names outside the known layouts, through diffusers' SGM and key converters, one name
    at a time (diffusers gathers SGM block ids by prefix: ``input_blocks_1`` would take ``_10``, ``_11``)."""
    unet = [n for n in names if n.startswith("lora_unet_")]
    if any(map(_SGM_BLOCKS.match, unet)) and any(map(_DIFFUSERS_BLOCKS.match, unet)):
        raise UnknownFormatError(f"mixes SGM and diffusers block names: {some(unet)}")
    config = SimpleNamespace(layers_per_block=layers_per_block(family))
    paths = {}
    for name in names:
        if name.startswith("lora_unet_"):
            sgm = _FIRST_UPSAMPLER.sub(r"\1_2_conv", name)
            try:
                (key,) = _maybe_map_sgm_blocks_to_diffusers({f"{sgm}.lora_down.weight": name}, config)
            except (ValueError, IndexError, KeyError) as e:
                raise UnknownFormatError(f"cannot map SGM block name {name!r}: {e}") from None
            (key,) = convert_unet_state_dict_to_peft({f"unet.{_convert_unet_lora_key(key)}": name})
        else:
            component = "text_encoder_2" if name.startswith("lora_te2_") else "text_encoder"
            key = _convert_text_encoder_lora_key(f"{name}.lora_down.weight", name)
            (key,) = convert_state_dict({f"{component}.{key}": name}, DIFFUSERS_OLD_TO_PEFT)
        if not key.endswith(".lora_A.weight"):
            raise UnknownFormatError(f"cannot resolve the module of kohya name {name!r}")
        paths[name] = canonical_path(key.removesuffix(".lora_A.weight"))
    return paths


def parse(state_dict: Mapping[str, torch.Tensor], family: str | None) -> dict[str, LoraLayer]:
    """Pure: kohya state dict → {module path: LoraLayer}; every key is consumed or an error raised."""
    groups = group_modules(state_dict)
    paths = module_paths(groups, family)
    layers = {}
    for name, parts in groups.items():
        tensors = {part: state_dict[key] for part, key in parts.items()}
        try:
            layers[paths[name]] = build_layer(tensors, paths[name], family)
        except (ValueError, RuntimeError) as e:
            raise UnknownFormatError(f"module {name!r}: {e}") from None
    return layers


def build_layer(parts: Mapping[str, torch.Tensor], path: str, family: str | None) -> LoraLayer:
    """One module's parts → LoraLayer (LoRA/LoCon kept as is; LoHa/LoKr converted exactly)."""
    kinds = [
        kind
        for kind, names in (("lora", LORA_PARTS), ("loha", LOHA_PARTS), ("lokr", LOKR_PARTS))
        if names & parts.keys()
    ]
    if len(kinds) != 1:
        raise ValueError(f"parts {sorted(parts)} do not form one LoRA, LoHa or LoKr module")
    build = {"lora": _lora_layer, "loha": _loha_layer, "lokr": _lokr_layer}[kinds[0]]
    return build(parts, path, family)


def _require(parts: Mapping[str, Any], *names: str) -> list[Any]:
    """The named parts, or an error listing the missing ones."""
    missing = [n for n in names if n not in parts]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    return [parts[n] for n in names]


def _lora_layer(parts: Mapping[str, torch.Tensor], path: str, family: str | None) -> LoraLayer:
    """lora_down/lora_up (+ lora_mid Tucker core, alpha, dora_scale)."""
    down, up = (owned(t) for t in _require(parts, "lora_down.weight", "lora_up.weight"))
    mid = None if parts.get("lora_mid.weight") is None else owned(parts["lora_mid.weight"])
    if down.dim() == 4 and up.dim() == 2:
        up = up[:, :, None, None]
    rank = down.shape[0]
    if up.shape[1] != rank or (mid is not None and tuple(mid.shape[:2]) != (rank, rank)):
        raise ValueError(
            f"lora_down has rank {rank} but lora_up is {tuple(up.shape)}"
            + ("" if mid is None else f" and lora_mid is {tuple(mid.shape)}")
        )
    if down.dim() != up.dim() or (mid is not None and (down.dim() != 4 or tuple(down.shape[2:]) != (1, 1))):
        raise ValueError(f"factor shapes {tuple(down.shape)}, {tuple(up.shape)} do not fit together")
    dora, axis = dora_magnitude(parts.get("dora_scale"), up.shape[0], int(down.shape[1]), peft=False)
    return LoraLayer(
        down=down, up=up, alpha=alpha_value(parts.get("alpha")), mid=mid, dora_scale=dora, dora_axis=axis
    )


def _weight_shape(
    out: int, width: int, kernel: tuple[int, ...] | None, path: str, family: str | None
) -> tuple:
    """Weight shape (out, in, *kernel) of a flattened out×width update; the kernel comes from the
    factors or, for flattened conv factors, from the family's layout."""
    if not kernel:
        kernel = kernel_size(path, family) or ()
        if width % math.prod(kernel):
            kernel = ()
    if width % math.prod(kernel):
        raise ValueError(f"update width {width} does not fit kernel {kernel}")
    return (out, width // math.prod(kernel), *kernel)


def _to_lora(
    u: torch.Tensor,
    v: torch.Tensor,
    kernel: tuple[int, ...] | None,
    scale: float,
    parts: Mapping[str, torch.Tensor],
    path: str,
    family: str | None,
) -> LoraLayer:
    """Exact LoRA of scale·U·V shaped for the module (alpha = rank, so scale 1)."""
    shape = _weight_shape(u.shape[0], v.shape[1], kernel, path, family)
    down, up = lowrank_to_lora(u, v, scale, shape)
    dora, axis = dora_magnitude(parts.get("dora_scale"), shape[0], shape[1], peft=False)
    return LoraLayer(down=down, up=up, alpha=float(down.shape[0]), dora_scale=dora, dora_axis=axis)


def _loha_layer(parts: Mapping[str, torch.Tensor], path: str, family: str | None) -> LoraLayer:
    """LoHa: ΔW = alpha/r · (w1a·w1b) ∘ (w2a·w2b) (LyCORIS modules/loha.py)."""
    w1a, w1b, w2a, w2b = _require(parts, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    u, v, kernel = loha_factors(w1a, w1b, w2a, w2b, parts.get("hada_t1"), parts.get("hada_t2"))
    alpha = alpha_value(parts.get("alpha"))
    scale = 1.0 if alpha is None else alpha / w1b.shape[0]
    return _to_lora(u, v, kernel, scale, parts, path, family)


def _lokr_layer(parts: Mapping[str, torch.Tensor], path: str, family: str | None) -> LoraLayer:
    """LoKr: ΔW = alpha/dim · kron(w1, w2), each half full or a low-rank product (LyCORIS modules/lokr.py)."""
    get = parts.get
    u, v, kernel = lokr_factors(
        get("lokr_w1"),
        get("lokr_w1_a"),
        get("lokr_w1_b"),
        get("lokr_w2"),
        get("lokr_w2_a"),
        get("lokr_w2_b"),
        get("lokr_t2"),
    )
    alpha, dim = alpha_value(parts.get("alpha")), lokr_rank_dim(get("lokr_w1_b"), get("lokr_w2_b"))
    scale = 1.0 if alpha is None or dim is None else alpha / dim
    return _to_lora(u, v, kernel, scale, parts, path, family)


def module_rank(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Rank of the LoraLayer ``build_layer`` makes, from part shapes alone (for header-only inspection);
    raises ValueError for parts that do not form a module."""
    kinds = [names for names in (LORA_PARTS, LOHA_PARTS, LOKR_PARTS) if names & shapes.keys()]
    if len(kinds) != 1:
        raise ValueError(f"parts {sorted(shapes)} do not form one LoRA, LoHa or LoKr module")
    if kinds[0] is LORA_PARTS:
        down, up = _require(shapes, "lora_down.weight", "lora_up.weight")
        if up[1] != down[0]:
            raise ValueError(f"lora_down has rank {down[0]} but lora_up is {tuple(up)}")
        return int(down[0])
    if kinds[0] is LOHA_PARTS:
        return _loha_rank(shapes)
    halves = [_lokr_half(shapes, i) for i in (1, 2)]
    out, width = halves[0][1] * halves[1][1], halves[0][2] * halves[1][2]
    return min(halves[0][0] * halves[1][0], out, width)


def _loha_rank(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """min(r1·r2, out, in·kh·kw) of a LoHa module from its part shapes."""
    w1a, w1b, _, w2b = _require(shapes, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    if "hada_t1" in shapes:  # Tucker: w1a (r, out), w1b (r, in), t1 (r, r, kh, kw)
        out, width = w1a[1], w1b[1] * math.prod(shapes["hada_t1"][2:])
    else:
        out, width = w1a[0], math.prod(w1b[1:])
    return min(w1b[0] * w2b[0], out, width)


def _lokr_half(shapes: Mapping[str, tuple[int, ...]], i: int) -> tuple[int, int, int]:
    """(rank, rows, flat columns) of LoKr half ``i`` from its part shapes."""
    full = shapes.get(f"lokr_w{i}")
    if full is not None:
        rows, cols = full[0], math.prod(full[1:])
        return min(rows, cols), rows, cols
    a, b, t = shapes[f"lokr_w{i}_a"], shapes[f"lokr_w{i}_b"], shapes.get(f"lokr_t{i}")
    if t is not None:
        return b[0], a[1], b[1] * math.prod(t[2:])
    return b[0], a[0], math.prod(b[1:])
