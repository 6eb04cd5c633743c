"""``klora``: K-LoRA (Ouyang et al., arXiv 2502.18461)."""

from __future__ import annotations

import torch

from pipelines.fusion.base import Factor, FusionContext, FusionPolicy, register, whole_number
from pipelines.recipe import finite_number


def dense(f: Factor) -> torch.Tensor:
    """ΔW of a factor (low-rank or already dense)."""
    return f if isinstance(f, torch.Tensor) else f.delta()


def topk_abs_sum(delta: torch.Tensor, k: int) -> float:
    """Σ of the k largest |ΔW| entries (K-LoRA eq. 4)."""
    flat = delta.abs().flatten()
    return float(torch.topk(flat, min(k, flat.numel())).values.sum())


def time_factor(progress: float, alpha: float = 1.5, beta: float = 0.5) -> float:
    """τ(p) = αp + β: favours the content LoRA early and the style LoRA late (K-LoRA §3.3)."""
    return alpha * progress + beta


@register
class KLora(FusionPolicy):
    """Per layer and step, keep the delta with the larger top-k score; adapter 0 is the content LoRA."""

    name = "klora"
    static = False

    def __init__(self, k: int = 64, alpha: float = 1.5, beta: float = 0.5) -> None:
        super().__init__(k=k, alpha=alpha, beta=beta)
        self.k = whole_number(k, "klora k (how many of the largest |ΔW| entries to score)", 1)
        self.alpha, self.beta = finite_number(alpha, "klora alpha"), finite_number(beta, "klora beta")
        self.scores: torch.Tensor | None = None  # (layers × adapters), balanced, 0 where absent

    def prepare(self, ctx: FusionContext):
        super().prepare(ctx)
        n_l, n_a = len(ctx.layers), len(ctx.adapters)
        topk = torch.zeros(n_l, n_a)
        total = torch.zeros(n_l, n_a)
        for (li, ai), f in ctx.factors.items():
            d = dense(f)
            topk[li, ai] = topk_abs_sum(d, self.k)
            total[li, ai] = float(d.abs().sum())
        both = (total[:, :1] > 0) & (total > 0)
        ratio = torch.where(both, total[:, :1] / total.clamp_min(1e-30), torch.zeros(()))
        # γ_a: mean over shared layers of Σ|ΔW_content| / Σ|ΔW_a| (K-LoRA's average_ratio)
        gamma = ratio.sum(0) / both.sum(0).clamp_min(1)
        gamma[0] = 1.0
        self.scores = topk * gamma[None, :]
        return ctx.factors

    def gates(self, step, num_steps, timestep=None, prompt_embeds=None) -> torch.Tensor:
        assert self.ctx is not None and self.scores is not None
        tau = time_factor(step / max(1, num_steps), self.alpha, self.beta)
        scaled = self.scores.clone()
        scaled[:, 1:] *= tau
        scaled[scaled == 0] = -1.0  # an adapter without this layer never wins it
        winner = torch.nn.functional.one_hot(scaled.argmax(1), len(self.ctx.adapters)).float()
        table = self.ctx.base_table()
        unet = self.ctx.unet_rows()[:, None]
        return torch.where(unet, table * winner, table)
