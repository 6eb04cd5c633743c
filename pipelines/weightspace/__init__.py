"""Weight-space views of a LoRA: training-free SVD features and a learned encoder into text space.

``svd``: per-layer singular values and a fixed random sketch of ΔW (factorisation-invariant), PCA,
and label propagation from neighbours that have text (arXiv 2412.05148: LoRA deltas cluster by
style). ``encoder``: :class:`WeightEncoder`, probes pushed through B·A → layer tokens → a small
transformer → the text-embedding space, trained with symmetric InfoNCE (AutoLoRA, arXiv 2508.02107).
"""

from __future__ import annotations

from pipelines.weightspace.encoder import (
    EncoderConfig,
    EncoderTrainConfig,
    WeightEncoder,
    covered,
    encode_weights,
    load_encoder,
    save_encoder,
    train_encoder,
)
from pipelines.weightspace.svd import (
    Pca,
    SvdConfig,
    fit_pca,
    layer_factors,
    propagate_labels,
    svd_features,
)

__all__ = [
    "EncoderConfig",
    "EncoderTrainConfig",
    "Pca",
    "SvdConfig",
    "WeightEncoder",
    "covered",
    "encode_weights",
    "fit_pca",
    "layer_factors",
    "load_encoder",
    "propagate_labels",
    "save_encoder",
    "svd_features",
    "train_encoder",
]
