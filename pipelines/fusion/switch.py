"""``switch``: LoRA Switch (Zhong et al., arXiv 2402.16843)."""

from __future__ import annotations

import torch

from pipelines.fusion.base import FusionPolicy, register, whole_number


@register
class Switch(FusionPolicy):
    """One adapter active in the UNet per step, rotating every τ steps (Multi-LoRA Composition §3)."""

    name = "switch"
    static = False

    def __init__(self, period: int = 5, order: list[int] | None = None) -> None:
        super().__init__(period=period, order=order)
        self.period = whole_number(period, "switch period (steps per adapter)", 1)
        self.order = order

    def prepare(self, ctx):
        super().prepare(ctx)
        n = len(ctx.adapters)
        if self.order is not None and (
            not isinstance(self.order, list | tuple)
            or not self.order
            or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in self.order)
        ):
            raise ValueError(f"switch order must list adapter indices from 0 to {n - 1}, got {self.order!r}")
        return ctx.factors

    def active(self, step: int) -> int:
        """Index of the adapter active at ``step``."""
        assert self.ctx is not None
        order = self.order or list(range(len(self.ctx.adapters)))
        return order[(step // self.period) % len(order)]

    def gates(self, step, num_steps, timestep=None, prompt_embeds=None) -> torch.Tensor:
        assert self.ctx is not None
        table = self.ctx.base_table()
        mask = torch.zeros(len(self.ctx.adapters))
        mask[self.active(step)] = 1.0
        unet = self.ctx.unet_rows()[:, None]
        return torch.where(unet, table * mask[None, :], table)
