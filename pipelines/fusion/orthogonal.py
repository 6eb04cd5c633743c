"""``orthogonal``: orthogonalise the adapters' deltas per layer before summing them.

Two variants: ``gram_schmidt`` projects each adapter's up-projection off the output space of the
adapters before it, in priority order (Orthogonal Adaptation, arXiv 2312.02432, applied post hoc);
``symmetric`` is Löwdin's order-free orthogonalisation of the weighted deltas in the Frobenius
inner product (Löwdin 1950), expressed as a mixing of the adapters' gates.
"""

from __future__ import annotations

from typing import Any

import torch

from pipelines.fusion.base import Factor, FusionContext, FusionPolicy, register
from pipelines.lora_weights import LoraLayer


def _up2(f: LoraLayer) -> torch.Tensor:
    """Up-projection as a 2-d (out × r) matrix."""
    return f.up.flatten(1) if f.up.dim() == 4 else f.up


def _down2(f: LoraLayer) -> torch.Tensor:
    """Down-projection as a 2-d (r × in·k) matrix (Tucker mid folded)."""
    from pipelines.multilora import fold_tucker

    d = fold_tucker(f.down, f.mid) if f.mid is not None else f.down
    return d.flatten(1)


def lowrank_inner(u1: torch.Tensor, d1: torch.Tensor, u2: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
    """⟨U₁D₁, U₂D₂⟩_F = Σ (U₁ᵀU₂) ⊙ (D₁D₂ᵀ), without forming the dense products."""
    return ((u1.T @ u2) * (d1 @ d2.T)).sum()


def project_out(up: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """Remove from ``up``'s columns their component in span(basis) (classical Gram–Schmidt, twice)."""
    if basis is None:
        return up
    for _ in range(2):  # re-orthogonalise once for numerical safety ("twice is enough")
        up = up - basis @ (basis.T @ up)
    return up


def extend_basis(basis: torch.Tensor | None, up: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """Orthonormal basis of span(basis) ∪ span(up)."""
    q, r = torch.linalg.qr(up.double())
    diag = r.diagonal().abs()
    keep = diag > rtol * float(diag.max()) if diag.numel() else diag.bool()
    q = q[:, keep].to(up.dtype)
    return q if basis is None else torch.cat([basis, q], dim=1)


def factors_2d(f: Factor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(up, down, scale) of any factor; a dense ΔW is its own up with an identity down."""
    if isinstance(f, torch.Tensor):
        return f.flatten(1), torch.eye(f.flatten(1).shape[1], dtype=f.dtype), 1.0
    return _up2(f), _down2(f), f.scale


@register
class Orthogonal(FusionPolicy):
    """Deltas made mutually orthogonal per layer; reports retained energy and prior overlap."""

    name = "orthogonal"

    def __init__(self, mode: str = "gram_schmidt", order: list[int] | None = None) -> None:
        super().__init__(mode=mode, order=order)
        if mode not in ("gram_schmidt", "symmetric"):
            raise ValueError("orthogonal mode must be 'gram_schmidt' or 'symmetric'")
        self.mode, self.order = mode, order
        self.sym_table: torch.Tensor | None = None  # symmetric: gates of the mixed deltas
        self.stats: list[dict[str, Any]] = []

    def _layer_groups(self, ctx: FusionContext) -> dict[int, list[int]]:
        """Adapters present at each layer, in priority order."""
        order = self.order or list(range(len(ctx.adapters)))
        if sorted(order) != list(range(len(ctx.adapters))):
            raise ValueError(f"orthogonal order must be a permutation of 0..{len(ctx.adapters) - 1}")
        groups: dict[int, list[int]] = {}
        for li, ai in ctx.factors:
            groups.setdefault(li, []).append(ai)
        return {li: sorted(ais, key=order.index) for li, ais in groups.items()}

    def prepare(self, ctx: FusionContext):
        super().prepare(ctx)
        self.stats = []
        groups = self._layer_groups(ctx)
        if self.mode == "symmetric":
            return self._prepare_symmetric(ctx, groups)
        out: dict[tuple[int, int], Factor] = dict(ctx.factors)
        for li, ais in groups.items():
            basis = None
            energy, overlap = {}, _overlaps(ctx, li, ais)
            for ai in ais:
                f = ctx.factors[(li, ai)]
                up, down, _ = factors_2d(f)
                new_up = project_out(up, basis)
                before = float(lowrank_inner(up, down, up, down))
                after = float(lowrank_inner(new_up, down, new_up, down))
                energy[ctx.adapters[ai].name] = after / before if before > 0 else 1.0
                basis = extend_basis(basis, new_up)
                out[(li, ai)] = _rebuild(f, new_up)
            self.stats.append({"layer": ctx.layers[li].path, "retained_energy": energy, "overlap": overlap})
        return out

    def _prepare_symmetric(self, ctx: FusionContext, groups: dict[int, list[int]]):
        table = ctx.base_table()
        self.sym_table = torch.zeros_like(table)
        for li, ais in groups.items():
            mix = symmetric_mixing(ctx, li, ais, table[li])
            self.sym_table[li, ais] = mix.sum(dim=1)  # Σ_i u_i = Σ_j (Σ_i M[j, i]) ΔW_j
            overlap = _overlaps(ctx, li, ais)
            self.stats.append(
                {
                    "layer": ctx.layers[li].path,
                    "overlap": overlap,
                    "retained_energy": {ctx.adapters[a].name: 1.0 for a in ais},
                }
            )
        return ctx.factors

    def gates(self, step, num_steps, timestep=None, prompt_embeds=None) -> torch.Tensor:
        assert self.ctx is not None
        return self.sym_table.clone() if self.sym_table is not None else self.ctx.base_table()

    def report(self) -> dict[str, Any]:
        return {"mode": self.mode, "layers": self.stats}


def _gram(ctx: FusionContext, li: int, ais: list[int]) -> torch.Tensor:
    """Frobenius Gram matrix of the (scaled) deltas of adapters ``ais`` at layer ``li``."""
    parts = [factors_2d(ctx.factors[(li, a)]) for a in ais]
    g = torch.zeros(len(ais), len(ais), dtype=torch.float64)
    for x, (u1, d1, s1) in enumerate(parts):
        for y, (u2, d2, s2) in enumerate(parts):
            g[x, y] = float(lowrank_inner(u1.double(), d1.double(), u2.double(), d2.double())) * s1 * s2
    return g


def _overlaps(ctx: FusionContext, li: int, ais: list[int]) -> dict[str, float]:
    """|cos| between every pair of original deltas at one layer."""
    g = _gram(ctx, li, ais)
    out = {}
    for x in range(len(ais)):
        for y in range(x + 1, len(ais)):
            den = float((g[x, x] * g[y, y]).sqrt())
            name = f"{ctx.adapters[ais[x]].name}|{ctx.adapters[ais[y]].name}"
            out[name] = abs(float(g[x, y])) / den if den > 0 else 0.0
    return out


def symmetric_mixing(ctx: FusionContext, li: int, ais: list[int], gates: torch.Tensor) -> torch.Tensor:
    """Löwdin: u_i = ‖v_i‖ Σ_j S_ji v_j/‖v_j‖ with S = G^{-1/2} of the normalised v = g·ΔW.

    Returns M with u_i = Σ_j M[j, i] ΔW_j (so the gate of ΔW_j is Σ_i M[j, i]).
    """
    g = _gram(ctx, li, ais)
    w = gates[ais].double()
    gw = g * (w[:, None] * w[None, :])
    norms = gw.diagonal().clamp_min(1e-300).sqrt()
    gn = gw / (norms[:, None] * norms[None, :])
    evals, evecs = torch.linalg.eigh(gn)
    s = evecs @ torch.diag(evals.clamp_min(1e-12).rsqrt()) @ evecs.T
    # u_i = norms_i Σ_j s[j, i] (w_j ΔW_j) / norms_j
    m = s * (norms[None, :] / norms[:, None]) * w[:, None]
    return m.float()


def _rebuild(f: Factor, new_up: torch.Tensor) -> Factor:
    """The factor with its up-projection replaced (shape restored)."""
    if isinstance(f, torch.Tensor):
        return new_up.view_as(f)
    up = new_up.view_as(f.up)
    return LoraLayer(
        down=f.down, up=up, alpha=f.alpha, mid=f.mid, dora_scale=f.dora_scale, dora_axis=f.dora_axis
    )


def orthogonalised_deltas(policy: Orthogonal, li: int) -> dict[int, torch.Tensor]:
    """The dense per-adapter contributions at layer ``li`` after orthogonalisation (for checks)."""
    ctx = policy.ctx
    assert ctx is not None
    ais = [a for (lj, a) in ctx.factors if lj == li]
    table = ctx.base_table()[li]
    if policy.mode == "gram_schmidt":
        factors = policy.prepare(ctx)
        return {a: table[a] * _dense(factors[(li, a)]) for a in ais}
    mix = symmetric_mixing(ctx, li, ais, table)
    deltas = [_dense(ctx.factors[(li, a)]) for a in ais]
    return {ai: sum(mix[b, i] * deltas[b] for b in range(len(ais))) for i, ai in enumerate(ais)}


def _dense(f: Factor) -> torch.Tensor:
    return f if isinstance(f, torch.Tensor) else f.delta()
