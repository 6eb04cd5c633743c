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


def dora_magnitude(
    scale: torch.Tensor | None, out: int, inp: int, *, peft: bool
) -> tuple[torch.Tensor | None, int]:
    """DoRA's magnitude vector and its axis (0: per output channel, 1: per input channel; arXiv
    2402.09353 eq. 2), told apart by the stored shape as ComfyUI's ``weight_decompose`` does.

    kohya/LyCORIS store (out, 1, …) (``wd_on_output=True``) or (1, in, …) (``wd_on_output=False``,
    LyCORIS' and OneTrainer's default); PEFT stores (out,) or (1, out, 1, 1) for convs.
    """
    if scale is None:
        return None, 0
    shape = tuple(scale.shape)
    if peft:
        if shape in ((out,), (1, out, 1, 1)):
            return owned(scale).reshape(out), 0
    elif scale.numel() == out and (len(shape) == 1 or shape[0] == out):
        return owned(scale).reshape(out), 0
    elif len(shape) >= 2 and shape[0] == 1 and shape[1] == inp and scale.numel() == inp:
        return owned(scale).reshape(inp), 1
    raise ValueError(
        f"DoRA magnitude of shape {shape} is neither one value per output channel ({out}) nor, "
        f"as (1, {inp}, …), one per input channel"
    )


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
