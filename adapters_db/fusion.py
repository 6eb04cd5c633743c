"""Learned fusion of the retrieval channels: per-adapter feature arrays → one relevance score.

Two scorer kinds share one interface: :class:`LinearScorer` (``Σ w_f · f``) and :class:`MLPScorer`
(standardised features → one hidden GELU layer → a score, learned listwise: softmax over the catalog
with the gold adapter as target). A :class:`Fusion` holds one scorer for queries that use the prompt
channels (``warm``) and one for metadata-only queries (``cold``). The packaged models in
``fusion_models.json`` were fitted by ``benchmarks/retrieval.py --fit`` on split A of the dev pairs;
each is tied to the dense embedder its features came from (``lexical`` models use no dense feature).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

MODELS_FILE = Path(__file__).resolve().parent / "fusion_models.json"


class Scorer(Protocol):
    """Features → scores."""

    features: tuple[str, ...]

    def score(self, feats: Mapping[str, np.ndarray]) -> np.ndarray:
        """One score per adapter row."""
        ...


@dataclass(frozen=True)
class LinearScorer:
    """``Σ w_f · f`` over the features with a weight."""

    weights: dict[str, float]

    @property
    def features(self) -> tuple[str, ...]:
        """The features this scorer reads."""
        return tuple(self.weights)

    def score(self, feats: Mapping[str, np.ndarray]) -> np.ndarray:
        """Weighted sum (features missing from ``feats`` count as 0)."""
        n = len(next(iter(feats.values())))
        out = np.zeros(n, np.float64)
        for name, w in self.weights.items():
            if w and name in feats:
                out += w * feats[name].astype(np.float64)
        return out


def gelu(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (Hendrycks & Gimpel 2016, eq. 2 approx.)."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


@dataclass(frozen=True)
class MLPScorer:
    """``w2 · gelu(((f − mean) / scale) W1 + b1) + b2``."""

    features: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: float = 0.0

    def score(self, feats: Mapping[str, np.ndarray]) -> np.ndarray:
        """Scores of every row (a missing feature is taken as 0 before standardising)."""
        n = len(next(iter(feats.values())))
        x = np.stack([feats[f] if f in feats else np.zeros(n, np.float32) for f in self.features], axis=1)
        x = (x.astype(np.float32) - self.mean) / self.scale
        return (gelu(x @ self.w1 + self.b1) @ self.w2 + self.b2).astype(np.float64)

    def to_json(self) -> dict[str, Any]:
        """Plain data."""
        return {
            "kind": "mlp",
            "features": list(self.features),
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "w1": self.w1.tolist(),
            "b1": self.b1.tolist(),
            "w2": self.w2.tolist(),
            "b2": self.b2,
        }


def average_mlps(scorers: list[MLPScorer]) -> MLPScorer:
    """The mean of MLP scorers that share features and standardisation, as one wider MLP (their
    hidden units side by side, output weights divided by their number): a seed ensemble."""
    first = scorers[0]
    for other in scorers[1:]:
        same = other.features == first.features and np.array_equal(other.mean, first.mean)
        if not same or not np.array_equal(other.scale, first.scale):
            raise ValueError("only MLP scorers with the same features and standardisation can be averaged")
    k = len(scorers)
    return MLPScorer(
        first.features,
        first.mean,
        first.scale,
        np.concatenate([s.w1 for s in scorers], axis=1),
        np.concatenate([s.b1 for s in scorers]),
        np.concatenate([s.w2 for s in scorers]) / k,
        float(np.mean([s.b2 for s in scorers])),
    )


def scorer_from_json(data: Mapping[str, Any]) -> Scorer:
    """A scorer from :meth:`MLPScorer.to_json` or ``{"kind": "linear", "weights": {…}}``."""
    if data.get("kind") == "linear":
        return LinearScorer({k: float(v) for k, v in data["weights"].items()})
    if data.get("kind") == "mlp":
        f32 = np.float32
        return MLPScorer(
            tuple(data["features"]),
            np.array(data["mean"], f32),
            np.array(data["scale"], f32),
            np.array(data["w1"], f32),
            np.array(data["b1"], f32),
            np.array(data["w2"], f32),
            float(data["b2"]),
        )
    raise ValueError(f"unknown scorer kind {data.get('kind')!r}")


def scorer_to_json(scorer: Scorer) -> dict[str, Any]:
    """Inverse of :func:`scorer_from_json`."""
    if isinstance(scorer, LinearScorer):
        return {"kind": "linear", "weights": dict(scorer.weights)}
    if isinstance(scorer, MLPScorer):
        return scorer.to_json()
    raise TypeError(f"cannot serialise {type(scorer).__name__}")


@dataclass(frozen=True)
class Fusion:
    """The scorer of warm queries (prompt channels on) and of cold ones (metadata only)."""

    warm: Scorer
    cold: Scorer
    dense_embedder: str | None = None
    note: str = ""

    def for_mode(self, use_prompts: bool) -> Scorer:
        """The scorer of a mode."""
        return self.warm if use_prompts else self.cold

    @property
    def uses_dense(self) -> bool:
        """Whether any scorer reads a dense feature (then the query must be embedded)."""
        return any(f.startswith(("d_", "r_d_")) for s in (self.warm, self.cold) for f in s.features)

    def to_json(self) -> dict[str, Any]:
        """Plain data."""
        return {
            "warm": scorer_to_json(self.warm),
            "cold": scorer_to_json(self.cold),
            "dense_embedder": self.dense_embedder,
            "note": self.note,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Fusion:
        """Inverse of :meth:`to_json`."""
        return cls(
            scorer_from_json(data["warm"]),
            scorer_from_json(data["cold"]),
            data.get("dense_embedder"),
            str(data.get("note", "")),
        )


# Hand-set fallback when no fitted model is packaged (lexical features only).
HAND_SET = Fusion(
    warm=LinearScorer(
        {
            "p_max": 4.0,
            "p_doc": 8.0,
            "m_files": 6.0,
            "t_frac": 1.4,
            "fts": 2.4,
            "r_p_max": 3.0,
            "r_p_doc": 2.0,
            "r_t_max": 3.0,
            "r_m_all": 0.5,
        }
    ),
    cold=LinearScorer(
        {
            "m_files": 6.0,
            "m_description": 4.0,
            "t_frac": 1.4,
            "fts": 2.8,
            "r_m_all": 1.7,
            "r_m_name": 0.6,
            "r_t_max": 4.2,
        }
    ),
    note="hand-set fallback",
)


@dataclass
class FusionRegistry:
    """Packaged fusion models by name: ``lexical`` and one per dense embedder they were fitted with."""

    models: dict[str, Fusion] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path = MODELS_FILE) -> FusionRegistry:
        """Read the packaged models (an absent file gives the hand-set fallback only)."""
        if not path.is_file():
            return cls({"lexical": HAND_SET})
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls({name: Fusion.from_json(d) for name, d in data.items()})

    def pick(
        self, embedder_name: str, dense: bool, classifier: bool = False, matcher: bool = False
    ) -> Fusion:
        """The model fitted with this embedder's dense features if ``dense`` and one exists, else
        lexical; with ``classifier`` and/or ``matcher``, the variant fitted with those channels'
        features (``+classifier``, ``+matcher``, ``+classifier+matcher``), the most complete packaged."""
        name = embedder_name if dense and embedder_name in self.models else "lexical"
        suffixes = [("+classifier" if classifier else "") + ("+matcher" if matcher else "")]
        if classifier and matcher:
            suffixes += ["+classifier", "+matcher"]
        for suffix in suffixes:
            if suffix and f"{name}{suffix}" in self.models:
                return self.models[f"{name}{suffix}"]
        return self.models.get(name, HAND_SET)

    def save(self, path: Path = MODELS_FILE) -> None:
        """Write all models as JSON."""
        path.write_text(
            json.dumps({k: v.to_json() for k, v in self.models.items()}, indent=1), encoding="utf-8"
        )
