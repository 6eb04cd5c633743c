"""``schedule``: per-step weights from keyframes, in sd-webui-loractl syntax."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

from pipelines.fusion.base import FusionPolicy, per_adapter, register


def parse_keyframes(spec: Any) -> tuple[list[float], list[float]] | float:
    """``"0.8@0,0.2@0.5,0@1"`` → (positions, weights); a bare number stays a constant (loractl)."""
    if spec is None:
        return 1.0
    if isinstance(spec, int | float):
        return float(spec)
    if isinstance(spec, list | tuple):
        pairs = [(float(w), float(p)) for w, p in spec]
    else:
        parts = [p.strip() for p in re.split(r"[,;]", str(spec)) if p.strip()]
        try:
            raw = [[float(x) for x in p.split("@")] for p in parts]
        except ValueError as exc:
            raise ValueError(f"bad keyframes {spec!r}: expected weight@position, …") from exc
        if len(raw) == 1 and len(raw[0]) == 1:
            return raw[0][0]
        if any(len(r) > 2 for r in raw):
            raise ValueError(f"bad keyframe in {spec!r}")
        pairs = [(r[0], r[1] if len(r) == 2 else 1.0) for r in raw]
    pairs.sort(key=lambda wp: wp[1])
    return [p for _, p in pairs], [w for w, _ in pairs]


def keyframe_value(frames: tuple[list[float], list[float]] | float, step: int, num_steps: int) -> float:
    """Weight at ``step``: linear interpolation, clamped; positions ≤ 1 are fractions of the run."""
    if isinstance(frames, float):
        return frames
    pos, weights = frames
    x = float(step)
    if pos[-1] <= 1.0:
        x = step / max(1, num_steps - 1)
    return float(np.interp(x, pos, weights))


def to_loractl(frames: tuple[list[float], list[float]] | float) -> str:
    """Keyframes back in loractl syntax."""
    if isinstance(frames, float):
        return f"{frames:g}"
    return ",".join(f"{w:g}@{p:g}" for p, w in zip(*frames, strict=True))


@register
class Schedule(FusionPolicy):
    """Per-step keyframed weights (cheald/sd-webui-loractl); text encoders use the step-0 value."""

    name = "schedule"
    static = False

    def __init__(self, schedule: Any = None) -> None:
        super().__init__(schedule=schedule)
        self.spec = schedule
        self.frames: list[Any] = []

    def prepare(self, ctx):
        super().prepare(ctx)
        self.frames = [parse_keyframes(s) for s in per_adapter(self.spec, len(ctx.adapters))]
        return ctx.factors

    def gates(self, step, num_steps, timestep=None, prompt_embeds=None) -> torch.Tensor:
        assert self.ctx is not None
        now = torch.tensor([keyframe_value(f, step, num_steps) for f in self.frames])
        first = torch.tensor([keyframe_value(f, 0, num_steps) for f in self.frames])
        unet = self.ctx.unet_rows()[:, None]
        return self.ctx.base_table() * torch.where(unet, now[None, :], first[None, :])
