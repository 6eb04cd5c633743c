"""``schedule``: per-step weights from keyframes, in sd-webui-loractl syntax."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import torch

from pipelines.fusion.base import FusionPolicy, is_number_list, per_adapter, plain_number, register


def parse_keyframes(spec: Any) -> tuple[list[float], list[float]] | float:
    """``"0.8@0,0.2@0.5,0@1"`` → (positions, weights) sorted by position; a bare number stays a constant and
    a bare weight after a keyframe sits at position 1 (cheald/sd-webui-loractl ``sorted_positions``)."""
    if spec is None:
        return 1.0
    if isinstance(spec, int | float):
        return _finite([float(spec)], spec)[0]
    if isinstance(spec, list | tuple):
        if not all(isinstance(wp, list | tuple) and len(wp) == 2 for wp in spec):
            raise ValueError(
                f"bad keyframes {spec!r}: expected [[weight, position], …] or 'weight@position, …'"
            )
        pairs = [(float(w), float(p)) for w, p in spec]
    else:
        parts = [p.strip() for p in re.split(r"[,;]", str(spec)) if p.strip()]
        try:
            raw = [[float(x) for x in p.split("@")] for p in parts]
        except ValueError as exc:
            raise ValueError(f"bad keyframes {spec!r}: expected weight@position, …") from exc
        if len(raw) == 1 and len(raw[0]) == 1:
            return _finite(raw[0], spec)[0]
        if raw and len(raw[0]) == 1:
            raise ValueError(
                f"bad keyframes {spec!r}: a bare weight must stand alone (loractl would run {raw[0][0]:g} "
                "throughout and drop the rest); write weight@position for every keyframe"
            )
        if any(len(r) > 2 for r in raw):
            raise ValueError(f"bad keyframe in {spec!r}")
        pairs = [(r[0], r[1] if len(r) == 2 else 1.0) for r in raw]
    if not pairs:
        raise ValueError(f"bad keyframes {spec!r}: expected weight@position, …")
    _finite([x for pair in pairs for x in pair], spec)
    pairs.sort(key=lambda wp: wp[1])
    return [p for _, p in pairs], [w for w, _ in pairs]


def _finite(values: list[float], spec: Any) -> list[float]:
    """``values``, or a ValueError when one is NaN or infinite (a NaN weight blacks out the image)."""
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"bad keyframes {spec!r}: weights and positions must be finite numbers")
    return values


def keyframe_value(frames: tuple[list[float], list[float]] | float, step: int, num_steps: int) -> float:
    """Weight at ``step`` (0-based): linear interpolation, clamped to the first/last keyframe's weight.

    As in cheald/sd-webui-loractl ``calculate_weight``: when the last position is ≤ 1 all positions are
    fractions of the run, else step numbers. Fraction p falls on step p·(num_steps − 1), so 0 is the first
    step and 1 the last; loractl divides A1111's step counter (one step behind, ending at steps − 2) by
    steps − 2, which also puts 0 and 1 on the first and last steps but lands interior keyframes and step
    numbers up to one step later than here.
    """
    if isinstance(frames, float):
        return frames
    pos, weights = frames
    x = float(step)
    if pos[-1] <= 1.0:
        x = step / max(1, num_steps - 1)
    return float(np.interp(x, pos, weights))


def to_loractl(frames: tuple[list[float], list[float]] | float) -> str:
    """Keyframes in loractl syntax (cheald/sd-webui-loractl): plain decimals that parse back exactly."""
    if isinstance(frames, int | float):
        return plain_number(frames)
    return ",".join(f"{plain_number(w)}@{plain_number(p)}" for p, w in zip(*frames, strict=True))


def loractl_entry(te: str, unet: str | None = None) -> str | dict[str, str]:
    """One adapter's schedule from an A1111 tag's ``te`` and ``unet`` weights (cheald/sd-webui-loractl
    ``params_to_weights``: ``unet`` falls back to ``te``); text encoders are the ``BASE`` block."""
    if unet is None or unet.strip() == te.strip():
        return te.strip()
    return {"BASE": te.strip(), "default": unet.strip()}


@register
class Schedule(FusionPolicy):
    """Per-step keyframed weights (cheald/sd-webui-loractl), per adapter or per adapter and block,
    optionally times per-block weights (LoRA Block Weight); text encoders use the step-0 value.

    An adapter's schedule is loractl text (``"1@0,0.2@1"``), a number, or a dict of them by block id
    (``{"IN01": "1@0,0@1", "default": "0.5"}``): per-block, per-step keyframes. The text encoders are
    block ``BASE``, so loractl's ``te=…:unet=…`` is ``{"BASE": te, "default": unet}`` (``loractl_entry``).
    A list of plain numbers is one constant per adapter. loractl's ``hr``/``hrte``/``hrunet`` (hires pass)
    have no counterpart: there is no hires pass.
    """

    name = "schedule"
    static = False

    def __init__(self, schedule: Any = None, blocks: Any = None) -> None:
        super().__init__(schedule=schedule, blocks=blocks)
        self.spec = schedule
        self.block_spec = blocks
        self.frames: list[dict[str, Any]] = []  # per adapter: block id (or "default") → keyframes
        self.block_mult: torch.Tensor | None = None

    def prepare(self, ctx):
        super().prepare(ctx)
        n = len(ctx.adapters)
        spec = self.spec
        if is_number_list(spec):  # [0.5, 1.0]: one constant per adapter (keyframe lists are [[w, pos], …])
            spec = [plain_number(v) for v in spec]
        self.frames = [_frames_by_block(s) for s in per_adapter(spec, n, "schedule")]
        known = {layer.block for layer in ctx.layers} | {"default"}
        for f in self.frames:
            if unknown := set(f) - known - set(ctx.layout.all_ids() if ctx.layout else ()):
                raise ValueError(f"schedule names unknown blocks {sorted(unknown)}")
        if self.block_spec is not None:
            from pipelines.fusion.blocks import Blocks

            blocks = Blocks(blocks=self.block_spec)
            blocks.prepare(ctx)
            self.block_mult = blocks.multipliers
        return ctx.factors

    def _value(self, adapter: int, block: str, step: int, num_steps: int) -> float:
        frames = self.frames[adapter]
        return keyframe_value(frames.get(block, frames["default"]), step, num_steps)

    def gates(self, step, num_steps, timestep=None, prompt_embeds=None) -> torch.Tensor:
        assert self.ctx is not None
        blocks = sorted({layer.block for layer in self.ctx.layers})
        values = {
            (a, b): (self._value(a, b, step, num_steps), self._value(a, b, 0, num_steps))
            for a in range(len(self.frames))
            for b in blocks
        }
        table = self.ctx.base_table()
        for li, layer in enumerate(self.ctx.layers):
            now_or_first = 0 if layer.is_unet else 1
            table[li] *= torch.tensor(
                [values[(a, layer.block)][now_or_first] for a in range(len(self.frames))]
            )
        return table if self.block_mult is None else table * self.block_mult


def _frames_by_block(spec: Any) -> dict[str, Any]:
    """One adapter's schedule as {block id or "default": keyframes}."""
    if isinstance(spec, dict):
        out = {str(k): parse_keyframes(v) for k, v in spec.items()}
        out.setdefault("default", 1.0)
        return out
    return {"default": parse_keyframes(spec)}
