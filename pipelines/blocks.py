"""UNet block ids in the A1111 LoRA-Block-Weight convention (BASE, IN00…, M00, OUT00…).

Ids follow the original LDM numbering (``input_blocks.N`` → INnn, ``middle_block`` → M00,
``output_blocks.N`` → OUTnn, text encoders → BASE), derived from the diffusers module path and
the UNet's ``layers_per_block``, so they are right for SD 1.x/2.x (26 ids), SDXL (20 ids) and the
pocket model alike (hako-mikan/sd-webui-lora-block-weight).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# The short vectors of sd-webui-lora-block-weight: blocks that hold attention layers.
BLOCKID17 = (
    "BASE",
    "IN01",
    "IN02",
    "IN04",
    "IN05",
    "IN07",
    "IN08",
    "M00",
    "OUT03",
    "OUT04",
    "OUT05",
    "OUT06",
    "OUT07",
    "OUT08",
    "OUT09",
    "OUT10",
    "OUT11",
)
BLOCKID12 = (
    "BASE",
    "IN04",
    "IN05",
    "IN07",
    "IN08",
    "M00",
    "OUT00",
    "OUT01",
    "OUT02",
    "OUT03",
    "OUT04",
    "OUT05",
)

# Modules in no LBW block: hako-mikan's ``ratiodealer`` matches none of its key prefixes (``encoder``,
# ``diffusion_model_input_blocks_N_``, ``…middle_block_``, ``…output_blocks_N_``) in LDM's ``time_embed``,
# ``label_emb`` and ``out.0``/``out.2`` keys, so they keep ratio 1 under every vector and preset.
_UNBLOCKED = (
    "unet.time_embedding.",
    "unet.time_proj.",
    "unet.add_embedding.",
    "unet.add_time_proj.",
    "unet.class_embedding.",
    "unet.encoder_hid_proj.",
    "unet.conv_norm_out",
    "unet.conv_out",
)
_SPECIAL = re.compile(r"X(?:([+-])(\d*\.?\d+))?")

_DOWN = re.compile(r"^unet\.down_blocks\.(\d+)\.(attentions|resnets|downsamplers)\.(\d+)")
_UP = re.compile(r"^unet\.up_blocks\.(\d+)\.(attentions|resnets|upsamplers)\.(\d+)")


@dataclass(frozen=True)
class UnetLayout:
    """What block ids depend on: the UNet's block types and layers per block."""

    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    layers_per_block: int

    @classmethod
    def from_config(cls, config: Mapping) -> UnetLayout:
        """Layout of a diffusers UNet2DConditionModel config."""
        lpb = config.get("layers_per_block", 2)
        if not isinstance(lpb, int):
            lpb = int(lpb[0])
        return cls(tuple(config["down_block_types"]), tuple(config["up_block_types"]), lpb)

    def all_ids(self) -> tuple[str, ...]:
        """Every block id (26 for SD 1.x, 20 for SDXL)."""
        n_in = (self.layers_per_block + 1) * len(self.down_block_types)
        n_out = (self.layers_per_block + 1) * len(self.up_block_types)
        return ("BASE", *(f"IN{i:02d}" for i in range(n_in)), "M00", *(f"OUT{i:02d}" for i in range(n_out)))

    def attention_ids(self) -> tuple[str, ...]:
        """The short vector: BASE, blocks with cross-attention, M00 (17 for SD 1.x, 12 for SDXL)."""
        lpb = self.layers_per_block
        ins = [
            f"IN{1 + (lpb + 1) * b + j:02d}"
            for b, t in enumerate(self.down_block_types)
            if "CrossAttn" in t
            for j in range(lpb)
        ]
        outs = [
            f"OUT{(lpb + 1) * b + j:02d}"
            for b, t in enumerate(self.up_block_types)
            if "CrossAttn" in t
            for j in range(lpb + 1)
        ]
        return ("BASE", *ins, "M00", *outs)


def in_lbw_block(path: str) -> bool:
    """False for UNet modules LBW's block weights never scale: time/class embeddings, conv_norm_out, conv_out
    (hako-mikan/sd-webui-lora-block-weight ``ratiodealer``); ``block_id`` shows them as IN00 / last OUT."""
    return not (path + ".").startswith(_UNBLOCKED)


def block_id(path: str, layout: UnetLayout) -> str:
    """LBW block id of a module path such as ``unet.down_blocks.1.attentions.0.…``."""
    if not path.startswith("unet."):
        return "BASE"
    lpb = layout.layers_per_block
    if m := _DOWN.match(path):
        b, kind, j = int(m[1]), m[2], int(m[3])
        idx = (lpb + 1) * (b + 1) if kind == "downsamplers" else 1 + (lpb + 1) * b + j
        return f"IN{idx:02d}"
    if m := _UP.match(path):
        b, kind, j = int(m[1]), m[2], int(m[3])
        idx = (lpb + 1) * b + (lpb if kind == "upsamplers" else j)
        return f"OUT{idx:02d}"
    if path.startswith("unet.mid_block"):
        return "M00"
    if path.startswith(("unet.conv_out", "unet.conv_norm_out")):
        return layout.all_ids()[-1]
    return "IN00"  # conv_in, time and added-condition embeddings


def _split(ids: Sequence[str], prefix: str, shallow_first: bool) -> tuple[list[str], list[str]]:
    """(shallow, deep) halves of the IN or OUT attention blocks, as LBW's presets cut them."""
    part = [i for i in ids if i.startswith(prefix)]
    if shallow_first:  # IN: the first ceil(n/2) are shallow
        k = (len(part) + 1) // 2
        return part[:k], part[k:]
    k = len(part) // 2  # OUT: the first floor(n/2) are deep
    return part[k:], part[:k]


def preset(name: str, layout: UnetLayout) -> dict[str, float]:
    """LBW's named presets (NONE, ALL, INS, IND, INALL, MIDD, OUTD, OUTS, OUTALL, ALL0.5) as block weights.

    For SD 1.x all but ALL and ALL0.5 are the extension's 17-value vectors (DEF_WEIGHT_PRESET), with the 9
    blocks outside the short vector at 0 as LBW's ``to26`` sets them. ALL and ALL0.5 here weigh every block
    1 (0.5), the 9 included; LBW's 17-value ALL zeroes them, which differs for LoCon files only. LBW ships
    no SDXL presets (its 17-value ones would land on SDXL blocks by SD 1.x id); other layouts here get the
    same cut of their own attention blocks: for SDXL's 12, INS = IN04-05, IND = IN07-08, OUTD = OUT00-02,
    OUTS = OUT03-05.
    """
    ids = layout.attention_ids()
    ins_s, ins_d = _split(ids, "IN", True)
    outs_s, outs_d = _split(ids, "OUT", False)
    on: dict[str, list[str]] = {
        "NONE": [],
        "ALL": list(ids),
        "INS": ["BASE", *ins_s],
        "IND": ["BASE", *ins_d],
        "INALL": ["BASE", *ins_s, *ins_d],
        "MIDD": ["BASE", *ins_d, "M00", *outs_d],
        "OUTD": ["BASE", *outs_d],
        "OUTS": ["BASE", *outs_s],
        "OUTALL": ["BASE", *outs_d, *outs_s],
    }
    key = name.upper()
    if key == "ALL0.5":
        return dict.fromkeys(layout.all_ids(), 0.5)
    if key not in on:
        raise ValueError(f"unknown block-weight preset {name!r}; known: {', '.join([*on, 'ALL0.5'])}")
    if key == "ALL":
        return dict.fromkeys(layout.all_ids(), 1.0)
    return {i: (1.0 if i in on[key] else 0.0) for i in layout.all_ids()}


def parse_vector(text: str, inherited: float = 1.0) -> list[float]:
    """An LBW vector's values (hako-mikan ``loradealer``): numbers, ``X``/``X+d``/``X-d`` (the inherited
    weight, 1 without ``x=``, plus or minus d); random ``R``/``U`` and empty values are refused."""
    values = []
    for i, raw in enumerate(text.split(","), start=1):
        item = raw.strip()
        if not item:
            raise ValueError(f"block-weight vector {text!r}: value {i} is empty")
        if item in ("R", "U"):
            raise ValueError(
                f"block-weight vector {text!r}: value {i} is {item!r}, LBW's random weight; a recipe must "
                "replay exactly, so write the number"
            )
        if m := _SPECIAL.fullmatch(item):
            offset = float(m[2]) if m[1] else 0.0
            values.append(inherited - offset if m[1] == "-" else inherited + offset)
            continue
        try:
            values.append(float(item))
        except ValueError:
            raise ValueError(
                f"block-weight vector {text!r}: value {i} ({item!r}) is not a number, X, X+d or X-d"
            ) from None
    return values


def vector_weights(values: Sequence[float], layout: UnetLayout) -> dict[str, float]:
    """An LBW vector (short attention vector or the full vector) as block weights; others get 0."""
    short, full = layout.attention_ids(), layout.all_ids()
    if not all(math.isfinite(float(v)) for v in values):
        raise ValueError(f"block weights must be finite numbers, got {list(values)}")
    for ids in (short, full):
        if len(values) == len(ids):
            return dict.fromkeys(full, 0.0) | dict(zip(ids, map(float, values), strict=True))
    raise ValueError(
        f"a block-weight vector for this model needs {len(short)} or {len(full)} values, got {len(values)}"
    )
