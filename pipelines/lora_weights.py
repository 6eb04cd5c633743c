"""The one normalised in-memory form of a LoRA, whatever file format it came from.

Module paths are diffusers module names with the component as first part:
``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``,
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``, ``text_encoder_2.…`` (SDXL).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

FAMILIES: dict[str, str] = {
    "sd1": "Stable Diffusion 1.x",
    "sd2": "Stable Diffusion 2.x",
    "sdxl": "Stable Diffusion XL",
    "pocket": "the pocket model",
}
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def family_name(family: str) -> str:
    """Human name of a base family, e.g. ``sdxl`` → ``Stable Diffusion XL``."""
    return FAMILIES.get(family, family)


@dataclass(frozen=True)
class LoraLayer:
    """One adapted module: ΔW = scale · up · (mid ∘) down, with scale = alpha / rank.

    Linear: ``down`` (r, in), ``up`` (out, r). Conv: ``down`` (r, in, kh, kw) and ``up``
    (out, r, 1, 1), or with a LoCon/Tucker ``mid`` (r, r, kh, kw): ``down`` (r, in, 1, 1).
    ``dora_scale`` is DoRA's magnitude vector (arXiv 2402.09353), or None: one value per output channel
    (``dora_axis`` 0: PEFT, kohya ``wd_on_output=True``) or per input channel (``dora_axis`` 1: LyCORIS'
    and OneTrainer's default, the only layout A1111 reads).
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None
    mid: torch.Tensor | None = None
    dora_scale: torch.Tensor | None = None
    dora_axis: int = 0

    @property
    def rank(self) -> int:
        """Number of rank-one components."""
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """alpha / rank (kohya convention: alpha None means alpha = rank)."""
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    @property
    def is_conv(self) -> bool:
        """True for Conv2d layers (4-d factors)."""
        return self.down.dim() == 4

    def delta(self) -> torch.Tensor:
        """The dense weight update ΔW in the layer's weight shape (without DoRA's rescaling)."""
        return lora_delta(self.down, self.up, self.scale, self.mid)


@dataclass(frozen=True)
class LoraWeights:
    """A whole adapter: layers by module path, its base family and file metadata."""

    layers: dict[str, LoraLayer]
    family: str
    metadata: dict[str, str] = field(default_factory=dict)
    format: str = "kohya"

    @property
    def rank(self) -> int:
        """Largest layer rank."""
        return max((layer.rank for layer in self.layers.values()), default=0)

    def components(self) -> set[str]:
        """Which pipeline components it adapts (``unet``, ``text_encoder``, …)."""
        return {path.split(".", 1)[0] for path in self.layers}


def lora_delta(
    down: torch.Tensor, up: torch.Tensor, scale: float = 1.0, mid: torch.Tensor | None = None
) -> torch.Tensor:
    """Dense ΔW = scale · up @ down (Hu et al. 2021, LoRA eq. 3); conv and Tucker forms (LyCORIS)."""
    if down.dim() == 2:
        return scale * (up @ down)
    if mid is None:  # conv: (out, r, 1, 1) ∘ (r, in, kh, kw)
        return scale * torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
    # Tucker: up (out, r), mid (r, r, kh, kw), down (r, in)
    return scale * torch.einsum("or,rskl,si->oikl", up[:, :, 0, 0], mid, down[:, :, 0, 0])
