"""Training-free weight-space features of a LoRA: per layer, the top singular values of ΔW and a
fixed random sketch G₁ ΔW G₂ᵀ, both computed from the factors (so invariant to how ΔW is factored:
up·R, R⁻¹·down gives the same features), stacked over a fixed layer list, plus PCA and label
propagation. Deltas of LoRAs cluster by the style they learned (arXiv 2412.05148).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipelines.lora_weights import LoraLayer, LoraWeights


@dataclass(frozen=True)
class SvdConfig:
    """How many singular values and how wide a sketch per layer."""

    top_k: int = 4
    sketch: int = 6
    seed: int = 0


def layer_factors(layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, V)`` with ΔW (as an out × in·kh·kw matrix) = U @ V, scale folded into U (LoRA eq. 3)."""
    if layer.down.dim() == 2:
        return layer.up.float() * layer.scale, layer.down.float()
    if layer.mid is None:  # conv: (out, r, 1, 1) ∘ (r, in, kh, kw)
        return layer.up[:, :, 0, 0].float() * layer.scale, layer.down.flatten(1).float()
    dense = layer.delta().float().flatten(1)  # Tucker (LyCORIS): materialise, rank = its own
    return dense, torch.eye(dense.shape[1])


def layer_shape(layer: LoraLayer) -> tuple[int, int]:
    """``(out, in)`` of ΔW seen as a matrix."""
    u, v = layer_factors(layer)
    return int(u.shape[0]), int(v.shape[1])


def top_singular_values(u: torch.Tensor, v: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest singular values of U @ V via QR of both factors (Golub & Van Loan §5.4)."""
    _, ru = torch.linalg.qr(u.double())
    _, rv = torch.linalg.qr(v.double().T)
    s = torch.linalg.svdvals(ru @ rv.T).float()
    return torch.nn.functional.pad(s[:k], (0, max(0, k - len(s))))


def _gaussian(name: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    """A fixed Gaussian matrix per (layer name, shape, seed), scaled 1/√rows (Johnson–Lindenstrauss)."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{rows}\0{cols}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.randn(rows, cols, generator=g) / rows**0.5


def sketch(name: str, u: torch.Tensor, v: torch.Tensor, size: int, seed: int = 0) -> torch.Tensor:
    """``G₁ (U V) G₂ᵀ`` flattened: a linear sketch of ΔW that keeps norms and inner products in
    expectation (Johnson–Lindenstrauss), so it weighs about as much as the singular values."""
    g1 = _gaussian(f"{name}/out", size, u.shape[0], seed)
    g2 = _gaussian(f"{name}/in", size, v.shape[1], seed)
    return ((g1 @ u) @ (v @ g2.T)).flatten()


def layer_features(name: str, layer: LoraLayer, config: SvdConfig) -> torch.Tensor:
    """Singular values and sketch of one layer (arXiv 2412.05148, weight-space features)."""
    u, v = layer_factors(layer)
    values = top_singular_values(u, v, config.top_k)
    return torch.cat([values, sketch(name, u, v, config.sketch, config.seed)])


def features_per_layer(config: SvdConfig) -> int:
    """Length of one layer's feature block."""
    return config.top_k + config.sketch * config.sketch


def svd_features(
    weights: LoraWeights, layers: Sequence[str] | None = None, config: SvdConfig = SvdConfig()
) -> np.ndarray:
    """Stacked per-layer features over ``layers`` (default: the adapter's own, sorted); zeros for a
    layer the adapter lacks (arXiv 2412.05148)."""
    names = sorted(weights.layers) if layers is None else list(layers)
    width = features_per_layer(config)
    out = np.zeros((len(names), width), np.float32)
    with torch.no_grad():
        for i, name in enumerate(names):
            layer = weights.layers.get(name)
            if layer is not None:
                out[i] = layer_features(name, layer, config).numpy()
    return out.reshape(-1)


@dataclass(frozen=True)
class Pca:
    """Mean and principal axes (rows) of a feature set."""

    mean: np.ndarray
    components: np.ndarray

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Project rows onto the axes."""
        return (np.asarray(x, np.float32) - self.mean) @ self.components.T


def fit_pca(x: np.ndarray, n: int) -> Pca:
    """PCA by SVD of the centred rows (Pearson 1901), at most ``min(n, rows, cols)`` axes."""
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    return Pca(mean.astype(np.float32), vt[: min(n, len(vt))].astype(np.float32))


def l2_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def propagate_labels(
    query_features: np.ndarray,
    reference_features: np.ndarray,
    reference_vectors: np.ndarray,
    k: int = 5,
    temperature: float = 0.05,
) -> np.ndarray:
    """Pseudo text vectors: softmax(cos/τ)-weighted mean of the text vectors of the ``k`` nearest
    references in (reference-centred) feature space, L2-normalised (label propagation, Zhu 2002)."""
    ref = np.atleast_2d(np.asarray(reference_features, np.float32))
    mean = ref.mean(axis=0) if ref.shape[0] > 1 else np.zeros(ref.shape[1], np.float32)
    q, r = l2_rows(np.atleast_2d(query_features) - mean), l2_rows(ref - mean)
    sims = q @ r.T
    k = min(k, r.shape[0])
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    s = np.take_along_axis(sims, top, axis=1) / temperature
    w = np.exp(s - s.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    pseudo = np.einsum("qk,qkd->qd", w, np.asarray(reference_vectors, np.float32)[top])
    return l2_rows(pseudo)
