"""Warnings about a mix before it runs: adapters for another base family, and layers where two adapters
pull in opposite directions (their weighted sum partly cancels, the interference TIES-merging and
orthogonal merging address)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pipelines.lora_weights import LoraLayer, LoraWeights, family_name

CONFLICT_COSINE = -0.3  # cosine of two ΔW below this: they oppose each other
CONFLICT_SHARE = 0.25  # warn when at least this share of the shared layers oppose


def _factors(layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(up as out×r, scale·down as r×in) of a plain LoRA layer, or None for Tucker layers."""
    if layer.mid is not None:
        return None
    down = layer.down.float().reshape(layer.down.shape[0], -1)
    up = layer.up.float().reshape(layer.up.shape[0], -1)
    return up, down * layer.scale


def delta_shape(layer: LoraLayer) -> tuple[int, ...]:
    """Shape of a layer's ΔW (out, in, *kernel) read from its factors, never forming ΔW."""
    kernel = (layer.mid if layer.mid is not None else layer.down).shape[2:]
    return (int(layer.up.shape[0]), int(layer.down.shape[1]), *(int(k) for k in kernel))


def delta_cosine(a: LoraLayer, b: LoraLayer) -> float:
    """Cosine of two LoRA updates ⟨ΔA, ΔB⟩_F / (‖ΔA‖‖ΔB‖) from the factors, never forming ΔW:
    ⟨U_a D_a, U_b D_b⟩ = Σ (U_aᵀU_b) ⊙ (D_a D_bᵀ) (trace identity; Hu et al. 2021 low-rank form)."""
    fa, fb = _factors(a), _factors(b)
    if fa is None or fb is None:
        da, db = a.delta().float().flatten(), b.delta().float().flatten()
        denom = float(da.norm() * db.norm())
        return float(da @ db) / denom if denom > 0 else 0.0
    (ua, va), (ub, vb) = fa, fb

    def inner(u1: torch.Tensor, d1: torch.Tensor, u2: torch.Tensor, d2: torch.Tensor) -> float:
        return float(((u1.T @ u2) * (d1 @ d2.T)).sum())

    denom = (max(inner(ua, va, ua, va), 0.0) * max(inner(ub, vb, ub, vb), 0.0)) ** 0.5
    return inner(ua, va, ub, vb) / denom if denom > 0 else 0.0


@dataclass(frozen=True)
class PairConflict:
    """How two adapters of a mix interact on the layers both adapt."""

    first: str
    second: str
    shared: int
    opposing: tuple[str, ...]  # module paths whose updates oppose (cosine < CONFLICT_COSINE)

    @property
    def share(self) -> float:
        """Fraction of the shared layers that oppose."""
        return len(self.opposing) / self.shared if self.shared else 0.0


def pair_conflict(first: tuple[str, LoraWeights], second: tuple[str, LoraWeights]) -> PairConflict:
    """Compare two adapters layer by layer on the modules both adapt with updates of the same shape
    (adapters made for another base model share module names, not shapes)."""
    (name_a, a), (name_b, b) = first, second
    shared = sorted(
        p for p in set(a.layers) & set(b.layers) if delta_shape(a.layers[p]) == delta_shape(b.layers[p])
    )
    opposing = tuple(p for p in shared if delta_cosine(a.layers[p], b.layers[p]) < CONFLICT_COSINE)
    return PairConflict(name_a, name_b, len(shared), opposing)


def conflict_warning(conflict: PairConflict, blocks: dict[str, str] | None = None) -> str | None:
    """A warning for a pair whose opposing layers reach :data:`CONFLICT_SHARE`, else None."""
    if not conflict.opposing or conflict.share < CONFLICT_SHARE:
        return None
    where = ""
    if blocks:
        ids = sorted({blocks.get(p, "?") for p in conflict.opposing})
        where = f" (blocks {', '.join(ids[:8])}{'…' if len(ids) > 8 else ''})"
    return (
        f"{conflict.first!r} and {conflict.second!r} conflict: {len(conflict.opposing)} of the "
        f"{conflict.shared} layers both adapt pull in opposite directions{where}, so a plain sum partly "
        "cancels them; lower one weight or try the orthogonal, ties or switch policy."
    )


def family_warnings(model_family: str | None, adapters: Sequence[tuple[str, str | None]]) -> list[str]:
    """Warnings for adapters made for another base family than the model (or than each other)."""
    out = []
    for name, family in adapters:
        if model_family and family and family != model_family:
            out.append(
                f"{name!r} is made for {family_name(family)}, but the loaded model is "
                f"{family_name(model_family)}: it will not load."
            )
    known = {f for _, f in adapters if f}
    if not model_family and len(known) > 1:
        out.append(f"the mix combines adapters of different base families ({', '.join(sorted(known))}).")
    return out
