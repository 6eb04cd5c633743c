"""Orthogonal Adaptation: seeded bases, disjoint blocks, the registry, frozen down-projections."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from pipelines.tiny import build_tiny_pipeline
from pipelines.training.orthogonal import (
    BasisRegistry,
    BasisSlot,
    OrthogonalCapacityError,
    freeze_down_projections,
    lora_modules,
    orthonormal_rows,
    subspace_overlap,
)


@pytest.mark.parametrize("dim", [32, 320, 1280])
def test_blocks_are_orthonormal_and_disjoint_blocks_orthogonal(dim: int) -> None:
    a = orthonormal_rows(1, "unet.x.to_q", dim, 0, 8).double()
    b = orthonormal_rows(1, "unet.x.to_q", dim, 8, 8).double()
    c = orthonormal_rows(1, "unet.x.to_q", dim, 24, 4).double()
    assert torch.allclose(a @ a.T, torch.eye(8, dtype=torch.float64), atol=1e-6)
    assert subspace_overlap(a, b) < 1e-6 and subspace_overlap(a, c) < 1e-6 and subspace_overlap(b, c) < 1e-6
    again = orthonormal_rows(1, "unet.x.to_q", dim, 0, 8).double()
    assert torch.equal(again, a)
    other_layer = orthonormal_rows(1, "unet.y.to_q", dim, 0, 8).double()
    assert subspace_overlap(a, other_layer) > 1e-3  # each layer has its own basis


def test_random_blocks_overlap_for_reference() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 64, generator=g), torch.randn(8, 64, generator=g)
    assert subspace_overlap(a, b) > 0.1  # what non-orthogonal down-projections look like


def test_capacity_is_enforced() -> None:
    with pytest.raises(OrthogonalCapacityError, match=r"at most 4 orthogonal adapters of rank 8"):
        orthonormal_rows(0, "unet.a", 32, 32, 8)


def test_registry_allocates_disjoint_blocks_persistently(tmp_path: Path) -> None:
    reg = BasisRegistry(tmp_path / "basis.json", seed=5)
    s1 = reg.allocate("pocket", "job-1", 4)
    s2 = reg.allocate("pocket", "job-2", 8)
    assert (s1.start, s2.start, s1.seed) == (0, 4, 5)
    assert reg.allocate("pocket", "job-1", 4) == s1  # idempotent
    assert reg.allocate("sd1", "job-3", 4).start == 0  # families are separate
    with pytest.raises(ValueError, match="holds a rank-4 block"):
        reg.allocate("pocket", "job-1", 8)
    reopened = BasisRegistry(tmp_path / "basis.json")
    assert reopened.holders("pocket") == {"job-1": (0, 4), "job-2": (4, 8)}
    assert reopened.allocate("pocket", "job-4", 2).start == 12
    reopened.release("job-2")
    assert "job-2" not in reopened.holders("pocket")


def test_freeze_sets_every_down_projection_to_its_block() -> None:
    unet = build_tiny_pipeline().unet
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k"]), unet, "a")
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k"]), unet, "b")
    na = freeze_down_projections(unet, "unet", BasisSlot(9, 0, 4), "a")
    nb = freeze_down_projections(unet, "unet", BasisSlot(9, 4, 4), "b")
    assert na == nb > 0
    for _, module in lora_modules(unet, "a"):
        wa, wb = module.lora_A["a"].weight, module.lora_A["b"].weight
        assert not wa.requires_grad and module.lora_B["a"].weight.requires_grad
        assert subspace_overlap(wa, wb) < 1e-6
        assert torch.allclose(wa @ wa.T, torch.eye(4), atol=1e-5)
