"""Normalising single factor tensors: float32 copies, alpha scalars, DoRA magnitude layouts."""

from __future__ import annotations

import torch

from pipelines.lora_weights import LoraLayer


def owned(t: torch.Tensor) -> torch.Tensor:
    """A float32 CPU copy that shares no memory with the caller's tensor."""
    return t.detach().to(device="cpu", dtype=torch.float32, copy=True).contiguous()


def alpha_value(alpha: torch.Tensor | None) -> float | None:
    """A stored ``alpha`` scalar as float; absent or 0 means alpha = rank (kohya/LyCORIS convention)."""
    if alpha is None:
        return None
    if alpha.numel() != 1:
        raise ValueError(f"alpha must be one number, got shape {tuple(alpha.shape)}")
    value = float(alpha.reshape(()).to(torch.float64))
    return None if value == 0 else value


def dora_magnitude(scale: torch.Tensor | None, out: int, *, peft: bool) -> torch.Tensor | None:
    """DoRA's per-output magnitude as (out,) (arXiv 2402.09353 eq. 2).

    kohya/LyCORIS store it as (out, 1, …) (``wd_on_output=True``), PEFT as (out,) or (1, out, 1, 1)
    for convs. LyCORIS's older input-axis layout (1, in, …) has no per-output equivalent: refused.
    """
    if scale is None:
        return None
    shape = tuple(scale.shape)
    if peft:
        fits = shape in ((out,), (1, out, 1, 1))
    else:
        fits = scale.numel() == out and (len(shape) == 1 or shape[0] == out)
    if not fits:
        raise ValueError(
            f"DoRA magnitude of shape {shape} is not one value per output channel ({out}); magnitudes "
            "on the input axis (LyCORIS wd_on_output=False) are not supported"
        )
    return owned(scale).reshape(out)


def plain_factors(layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) without a Tucker core: LoCon's ``mid`` is merged into ``down`` exactly
    (LyCORIS modules/locon.py make_weight: ΔW = up ×₁ mid ×₂ down)."""
    if layer.mid is None:
        return layer.down, layer.up
    down = torch.einsum("abkl,bi->aikl", layer.mid, layer.down.reshape(layer.down.shape[0], -1))
    return down, layer.up


def delta_shape(layer: LoraLayer) -> tuple[int, ...]:
    """Shape of the layer's ΔW (the module weight it applies to)."""
    out = int(layer.up.shape[0])
    if layer.mid is not None:
        return (out, int(layer.down.shape[1]), *map(int, layer.mid.shape[2:]))
    return (out, *map(int, layer.down.shape[1:]))
