"""Fusion policies by name: linear, blocks, schedule, switch, klora, orthogonal, ties, dare, gate."""

from __future__ import annotations

from pipelines.fusion import blocks, gate, klora, linear, merges, orthogonal, schedule, switch  # noqa: F401
from pipelines.fusion.base import (
    REGISTRY,
    AdapterInfo,
    FusionContext,
    FusionPolicy,
    LayerInfo,
    make_policy,
    register,
)

__all__ = [
    "REGISTRY",
    "AdapterInfo",
    "FusionContext",
    "FusionPolicy",
    "LayerInfo",
    "make_policy",
    "register",
]
