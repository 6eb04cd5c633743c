"""LyCORIS LoHa and LoKr updates as exact low-rank products, and their conversion to plain LoRA.

Both are materialised without ever forming ΔW when its rank is below the layer's width:
a Hadamard product of two rank-r matrices is the face-splitting product of their factors
(rank ≤ r1·r2), a Kronecker product is the Kronecker product of their factors (rank =
rank(w1)·rank(w2)). QR plus an SVD of the small core then gives balanced LoRA factors of exactly
that rank (Halko, Martinsson & Tropp 2011, §5.1), capped at min(out, in·kh·kw).
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


def _f64(t: Tensor | None) -> Tensor | None:
    """float64 copy for exact arithmetic (None passes through)."""
    return None if t is None else t.detach().to(torch.float64)


def tucker_mode1(t: Tensor, down: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """(U, V) with einsum("ij…,jr,ip->pr…", t, down, up) = U·V (LyCORIS general.py rebuild_tucker)."""
    v = torch.einsum("ij...,jr->ir...", t, down)
    return up.T, v.reshape(v.shape[0], -1)


def loha_factors(
    w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor, t1: Tensor | None = None, t2: Tensor | None = None
) -> tuple[Tensor, Tensor, tuple[int, ...] | None]:
    """(U, V, kernel) with (w1a·w1b) ∘ (w2a·w2b) = U·V in float64 (LyCORIS modules/loha.py).

    Tucker form: ``t`` (r, r, kh, kw), ``wa`` (r, out), ``wb`` (r, in). Kernel is None when the
    factors do not say it (non-Tucker conv factors are stored flattened to in·kh·kw).
    """
    w1a, w1b, w2a, w2b, t1, t2 = (_f64(t) for t in (w1a, w1b, w2a, w2b, t1, t2))
    if t1 is not None and t2 is not None:
        (u1, v1), (u2, v2) = tucker_mode1(t1, w1b, w1a), tucker_mode1(t2, w2b, w2a)
        kernel: tuple[int, ...] | None = tuple(t1.shape[2:])
    else:
        kernel = tuple(w1b.shape[2:]) if w1b.dim() > 2 else None
        u1, v1 = w1a.reshape(w1a.shape[0], -1), w1b.reshape(w1b.shape[0], -1)
        u2, v2 = w2a.reshape(w2a.shape[0], -1), w2b.reshape(w2b.shape[0], -1)
    u = (u1[:, :, None] * u2[:, None, :]).reshape(u1.shape[0], -1)
    v = (v1[:, None, :] * v2[None, :, :]).reshape(-1, v1.shape[1])
    return u, v, kernel


def _kron_part(
    full: Tensor | None, a: Tensor | None, b: Tensor | None, t: Tensor | None
) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """(U, V, kernel) of one Kronecker factor: full matrix, a·b, or Tucker t ×₁ aᵀ ×₂ bᵀ."""
    if full is not None:
        m = full.reshape(full.shape[0], -1)
        eye = torch.eye(min(m.shape), dtype=m.dtype)
        u, v = (eye, m) if m.shape[0] <= m.shape[1] else (m, eye)
        return u, v, tuple(full.shape[2:])
    if a is None or b is None:
        raise ValueError("a LoKr factor needs either its full matrix or both of its halves")
    if t is not None:
        u, v = tucker_mode1(t, b, a)
        return u, v, tuple(t.shape[2:])
    return a, b.reshape(b.shape[0], -1), tuple(b.shape[2:])


def lokr_factors(
    w1: Tensor | None = None,
    w1a: Tensor | None = None,
    w1b: Tensor | None = None,
    w2: Tensor | None = None,
    w2a: Tensor | None = None,
    w2b: Tensor | None = None,
    t2: Tensor | None = None,
) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """(U, V, kernel): kron(w1, w2) = U·V = kron(U1, U2)·kron(V1, V2) in float64 (LyCORIS lokr.py)."""
    u1, v1, _ = _kron_part(*(_f64(x) for x in (w1, w1a, w1b, None)))
    u2, v2, kernel = _kron_part(*(_f64(x) for x in (w2, w2a, w2b, t2)))
    pairs = ((u1, u2), (v1, v2))  # torch.kron needs contiguous inputs (Tucker gives a transposed view)
    (u, v) = (torch.kron(a.contiguous(), b.contiguous()) for a, b in pairs)
    return u, v, kernel


def lokr_rank_dim(w1b: Tensor | None, w2b: Tensor | None) -> int | None:
    """The ``dim`` that LoKr's alpha is divided by: the rank of the decomposed half (w2 first), as
    ComfyUI and A1111 apply it; None when both halves are full matrices (scale 1)."""
    if w2b is not None:
        return int(w2b.shape[0])
    return None if w1b is None else int(w1b.shape[0])


def lowrank_to_lora(
    u: Tensor, v: Tensor, scale: float, weight_shape: tuple[int, ...]
) -> tuple[Tensor, Tensor]:
    """(down, up) float32, up·down = scale·U·V at rank min(R, out, in·kh·kw), shaped for ``weight_shape``
    (QR of both factors + SVD of the R×R core; dense SVD when R reaches the layer width)."""
    u, v = u.to(torch.float64) * scale, v.to(torch.float64)
    out, width = u.shape[0], v.shape[1]
    if out != weight_shape[0] or width != math.prod(weight_shape[1:]):
        raise ValueError(
            f"factors give a {out}×{width} update, not one for weight shape {tuple(weight_shape)}"
        )
    if u.shape[1] < min(out, width):
        qu, ru = torch.linalg.qr(u)
        qv, rv = torch.linalg.qr(v.T)
        uc, s, vh = torch.linalg.svd(ru @ rv.T)
        left, right = qu @ uc, vh @ qv.T
    else:
        left, s, right = torch.linalg.svd(u @ v, full_matrices=False)
    root = s.sqrt()
    up, down = left * root, root[:, None] * right
    rank, kernel = root.numel(), weight_shape[2:]
    down = down.reshape(rank, *weight_shape[1:])
    up = up.reshape(out, rank, *([1] * len(kernel)))
    return down.to(torch.float32).contiguous(), up.to(torch.float32).contiguous()
