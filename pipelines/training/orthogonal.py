"""Orthogonal Adaptation (Po et al. 2023, arXiv 2312.02432): frozen, mutually orthogonal down-projections.

Every layer has one seeded random orthonormal basis of its input space, the same for every adapter
of the studio. Each self-trained adapter owns a disjoint block of its rows: its down-projection A is
frozen to that block and only the up-projection B trains, so two adapters' deltas act on orthogonal
input subspaces and merging them by summation interferes less. The registry of used blocks is a
small JSON file (the studio keeps it in its data directory).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft.tuners.lora import LoraLayer

DEFAULT_SEED = 20231204  # the studio-wide basis seed (any fixed number; arXiv 2312.02432's date)


class OrthogonalCapacityError(ValueError):
    """A layer's input space has no free orthogonal rows left for another adapter of this rank."""


@dataclass(frozen=True)
class BasisSlot:
    """Rows [start, start + rank) of the studio's seeded per-layer bases."""

    seed: int
    start: int
    rank: int


def layer_seed(seed: int, layer: str) -> int:
    """A 64-bit seed for one layer's basis, derived from the studio seed and the module path."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{layer}".encode()).digest()[:8], "little")


def orthonormal_rows(seed: int, layer: str, dim: int, start: int, rank: int) -> torch.Tensor:
    """Rows [start, start+rank) of a seeded random orthonormal basis of R^dim (2312.02432 §3.2; QR).

    The Gaussian is drawn row by row and Householder QR's first k columns depend only on the first k
    columns of its input, so every adapter sees the same basis whatever its block.
    """
    if start < 0 or rank < 1 or start + rank > dim:
        raise OrthogonalCapacityError(
            f"{layer}: rows {start}..{start + rank} do not fit its {dim}-dimensional input space "
            f"(at most {dim // max(rank, 1)} orthogonal adapters of rank {rank})"
        )
    gauss = np.random.default_rng(layer_seed(seed, layer)).standard_normal((start + rank, dim))
    q, _ = np.linalg.qr(gauss.T)  # dim × (start + rank), orthonormal columns
    return torch.from_numpy(np.ascontiguousarray(q[:, start:].T)).float()


def subspace_overlap(a1: torch.Tensor, a2: torch.Tensor) -> float:
    """‖A1 A2ᵀ‖_F / (‖A1‖_F ‖A2‖_F): 0 for orthogonal row spaces (flattened conv kernels)."""
    a1, a2 = a1.reshape(a1.shape[0], -1).double(), a2.reshape(a2.shape[0], -1).double()
    return float(torch.linalg.matrix_norm(a1 @ a2.T) / (a1.norm() * a2.norm()))


def lora_modules(model: torch.nn.Module, adapter: str = "default") -> Iterator[tuple[str, LoraLayer]]:
    """(module path, PEFT LoRA layer) for every layer that carries ``adapter``."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            yield name, module


@torch.no_grad()
def freeze_down_projections(
    model: torch.nn.Module, prefix: str, slot: BasisSlot, adapter: str = "default"
) -> int:
    """Set every lora_A to its orthonormal block and freeze it; returns how many layers."""
    count = 0
    for name, module in lora_modules(model, adapter):
        weight = module.lora_A[adapter].weight
        rows = orthonormal_rows(slot.seed, f"{prefix}.{name}", weight[0].numel(), slot.start, slot.rank)
        weight.copy_(rows.reshape(weight.shape).to(weight.dtype))
        weight.requires_grad_(False)
        count += 1
    return count


class BasisRegistry:
    """Which row blocks the studio's adapters hold, per base family, in one locked JSON file."""

    def __init__(self, path: str | Path, seed: int = DEFAULT_SEED) -> None:
        self.path = Path(path)
        self.default_seed = seed

    @contextmanager
    def _locked(self) -> Iterator[dict]:
        """Read-modify-write the registry under an exclusive file lock."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = json.loads(self.path.read_text()) if self.path.exists() else {}
            data.setdefault("seed", self.default_seed)
            data.setdefault("families", {})
            yield data
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, self.path)

    def allocate(self, family: str, adapter_id: str, rank: int) -> BasisSlot:
        """The block of ``adapter_id`` (a new one after all blocks in use; the same on a second call)."""
        with self._locked() as data:
            fam = data["families"].setdefault(family, {})
            if adapter_id in fam:
                start, held = fam[adapter_id]
                if held != rank:
                    raise ValueError(f"{adapter_id} holds a rank-{held} block, not rank {rank}")
                return BasisSlot(data["seed"], start, rank)
            start = max((s + r for s, r in fam.values()), default=0)
            fam[adapter_id] = [start, rank]
            return BasisSlot(data["seed"], start, rank)

    def release(self, adapter_id: str, family: str | None = None) -> None:
        """Give an adapter's block back (one family, or every family)."""
        with self._locked() as data:
            for name, fam in data["families"].items():
                if family is None or name == family:
                    fam.pop(adapter_id, None)

    def holders(self, family: str) -> dict[str, tuple[int, int]]:
        """adapter id → (start, rank) for one family."""
        if not self.path.exists():
            return {}
        fam = json.loads(self.path.read_text()).get("families", {}).get(family, {})
        return {k: (int(s), int(r)) for k, (s, r) in fam.items()}
