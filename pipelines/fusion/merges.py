"""``ties`` and ``dare``: static task-arithmetic merges of the deltas, one merged ΔW per layer."""

from __future__ import annotations

import torch
from peft.utils import merge_utils

from pipelines.fusion.base import Factor, FusionContext, FusionPolicy, register
from pipelines.fusion.klora import dense


class _Merge(FusionPolicy):
    """Merge every layer's weighted deltas into one dense ΔW (gate 1 in a single ``merged`` column)."""

    def merge(self, deltas: torch.Tensor, weights: torch.Tensor, layer: int) -> torch.Tensor:
        """Stacked (adapters × …) deltas → one merged delta."""
        raise NotImplementedError

    def prepare(self, ctx: FusionContext):
        super().prepare(ctx)
        table = ctx.base_table()
        groups: dict[int, list[int]] = {}
        for li, ai in ctx.factors:
            groups.setdefault(li, []).append(ai)
        merged: dict[tuple[int, int], Factor] = {}
        for li, ais in groups.items():
            deltas = torch.stack([dense(ctx.factors[(li, a)]).float() for a in ais])
            merged[(li, 0)] = self.merge(deltas, table[li, ais], li)
        self.merged_rows = torch.tensor([li in groups for li in range(len(ctx.layers))])
        return merged

    def columns(self) -> list[str]:
        return [f"{self.name} merge"]

    def gates(self, step, num_steps, timestep=None, prompt_embeds=None) -> torch.Tensor:
        return self.merged_rows.float()[:, None]


@register
class Ties(_Merge):
    """TIES-merging: trim to top-``density``, elect signs, disjoint mean (Yadav et al., arXiv 2306.01708)."""

    name = "ties"

    def __init__(self, density: float = 0.2, majority_sign_method: str = "total") -> None:
        super().__init__(density=density, majority_sign_method=majority_sign_method)
        if not 0.0 < float(density) <= 1.0:
            raise ValueError("ties density must be in (0, 1]")
        self.density, self.method = float(density), majority_sign_method

    def merge(self, deltas, weights, layer):
        return merge_utils.ties(list(deltas), weights, self.density, self.method)


@register
class Dare(_Merge):
    """DARE: drop deltas at random, rescale by 1/density, then sum or TIES (Yu et al., arXiv 2311.03099)."""

    name = "dare"

    def __init__(self, density: float = 0.5, seed: int = 0, ties: bool = False) -> None:
        super().__init__(density=density, seed=seed, ties=ties)
        if not 0.0 < float(density) <= 1.0:
            raise ValueError("dare density must be in (0, 1]")
        self.density, self.seed, self.use_ties = float(density), int(seed), bool(ties)

    def merge(self, deltas, weights, layer):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 100_003 + layer)
            if self.use_ties:
                return merge_utils.dare_ties(list(deltas), weights, self.density)
            return merge_utils.dare_linear(list(deltas), weights, self.density)
