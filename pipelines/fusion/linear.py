"""``linear``: A1111 ``<lora:name:w>`` semantics."""

from __future__ import annotations

import torch

from pipelines.fusion.base import FusionPolicy, register


@register
class Linear(FusionPolicy):
    """Weighted sum of deltas, separate UNet / text-encoder strength (A1111 extra-networks LoRA)."""

    name = "linear"

    def gates(self, step, num_steps, timestep=None, prompt_embeds=None) -> torch.Tensor:
        assert self.ctx is not None
        return self.ctx.base_table()
