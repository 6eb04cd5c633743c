"""``blocks``: per-block weights (LoRA Block Weight vectors and presets, diffusers-style dicts)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from pipelines import blocks as B
from pipelines.fusion.base import FusionContext, FusionPolicy, per_adapter, plain_number, register

_PATH = re.compile(r"^unet\.(down_blocks|up_blocks)\.(\d+)\.(?:attentions|resnets)\.(\d+)")


def _diffusers_scale(spec: Mapping[str, Any], path: str) -> float:
    """Scale of one module under a diffusers ``set_adapters`` dict (missing parts default to 1)."""
    if not path.startswith("unet."):
        return float(spec.get("text_encoder", 1.0))
    unet = spec.get("unet", spec)
    if not isinstance(unet, Mapping):
        return float(unet)
    if path.startswith("unet.mid_block"):
        return float(unet.get("mid", 1.0))
    m = _PATH.match(path)
    if m is None:
        return 1.0
    part = unet.get("down" if m[1] == "down_blocks" else "up", 1.0)
    if not isinstance(part, Mapping):
        return float(part)
    block = part.get(f"block_{m[2]}", 1.0)
    if isinstance(block, list | tuple):
        return float(block[int(m[3])])
    return float(block)


def parse_block_spec(spec: Any, layout: B.UnetLayout) -> dict[str, float] | Mapping[str, Any]:
    """A block-weight spec → {block id: weight}; diffusers dicts are returned as given.

    Accepts a preset name (``"OUTD"``), an LBW vector as text (``"1,0,0,…"``, with LBW's ``X``/``X±d``;
    an ``lbw=`` prefix as in an A1111 tag is dropped) or list, a dict of block ids (``{"IN01": 0.5}``,
    others 1) or a diffusers ``{"down": …, "mid": …, "up": …}`` dict.
    """
    if spec is None:
        return dict.fromkeys(layout.all_ids(), 1.0)
    if isinstance(spec, str):
        text = re.sub(r"^\s*lbw\s*=", "", spec).strip()
        if "," in text or re.fullmatch(r"[\d.+-]+", text):
            return B.vector_weights(B.parse_vector(text), layout)
        return B.preset(text, layout)
    if isinstance(spec, list | tuple):
        return B.vector_weights([float(v) for v in spec], layout)
    if isinstance(spec, Mapping):
        keys = set(spec)
        if keys <= {"text_encoder", "unet", "down", "mid", "up"}:
            return spec
        unknown = keys - set(layout.all_ids())
        if unknown:
            raise ValueError(
                f"unknown block ids {sorted(unknown)}; this model has {', '.join(layout.all_ids())}"
            )
        return dict.fromkeys(layout.all_ids(), 1.0) | {k: float(v) for k, v in spec.items()}
    raise ValueError(f"cannot read a block-weight spec of type {type(spec).__name__}")


def to_lbw(weights: Mapping[str, float], layout: B.UnetLayout) -> str:
    """Block weights as an LBW vector (hako-mikan/sd-webui-lora-block-weight): the short one (17 values for
    SD 1.x, 12 for SDXL) when every block outside it is 0, else the full one (26, 20); exact decimals."""
    short = layout.attention_ids()
    ids = short if all(weights.get(b, 0.0) == 0.0 for b in layout.all_ids() if b not in short) else None
    return ",".join(plain_number(weights.get(b, 0.0)) for b in ids or layout.all_ids())


@register
class Blocks(FusionPolicy):
    """Per-block weights (hako-mikan/sd-webui-lora-block-weight; diffusers ``set_adapters`` dicts).

    As in LBW, BASE is the text encoder(s) and a short vector switches off the blocks it does not list;
    modules in no LBW block (time/added embeddings, conv_norm_out, conv_out) keep the adapter's weight.
    """

    name = "blocks"

    def __init__(self, blocks: Any = None) -> None:
        super().__init__(blocks=blocks)
        self.spec = blocks
        self.multipliers: torch.Tensor | None = None

    def prepare(self, ctx: FusionContext):
        super().prepare(ctx)
        if ctx.layout is None:
            raise ValueError("the blocks policy needs a UNet layout")
        specs = []
        given = per_adapter(self.spec, len(ctx.adapters), "blocks")
        for adapter, spec in zip(ctx.adapters, given, strict=True):
            try:
                specs.append(parse_block_spec(spec, ctx.layout))
            except ValueError as exc:  # name the adapter: a mix has several vectors
                raise ValueError(f"block weights of {adapter.name!r}: {exc}") from None
        mult = torch.ones(len(ctx.layers), len(ctx.adapters))
        for li, layer in enumerate(ctx.layers):
            for ai, spec in enumerate(specs):
                if set(spec) <= {"text_encoder", "unet", "down", "mid", "up"}:
                    mult[li, ai] = _diffusers_scale(spec, layer.path)
                elif not B.in_lbw_block(layer.path):
                    mult[li, ai] = 1.0  # time embeddings, conv_out: LBW leaves them at full weight
                else:
                    mult[li, ai] = spec.get(layer.block, 0.0)
        self.multipliers = mult
        return ctx.factors

    def gates(self, step, num_steps, timestep=None, prompt_embeds=None) -> torch.Tensor:
        assert self.ctx is not None and self.multipliers is not None
        return self.ctx.base_table() * self.multipliers
