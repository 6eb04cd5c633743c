"""The gate network: per LoRA-patched layer, per channel, per step and per prompt.

AutoLoRA's gate at layer l for adapter i (y₀ base output, yᵢ the adapter's output):
    gᵢ = σ(w_l ⊙ LN(yᵢ) + w_c ⊙ (LN(y₀) ⊙ LN(yᵢ)) + b_l [+ T_l·temb(t)] [+ (P_l·e) ⊙ LN(yᵢ)])
    y  = y₀ + Σᵢ w_out ⊙ gᵢ ⊙ yᵢ
The two bracketed terms are this project's additions: a timestep embedding projected to a
per-layer bias, and the pooled prompt embedding projected to a per-layer modulation of the
adapter's normalised output. Initialised so that gᵢ · w_out = 1: an untrained gate is ``linear``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding
from safetensors.torch import load_file, save_file
from torch import nn


@dataclass(frozen=True)
class GateConfig:
    """Which inputs the gate sees and their sizes."""

    use_time: bool = True
    use_prompt: bool = True
    time_dim: int = 32
    prompt_dim: int = 64


def layer_key(path: str) -> str:
    """A module path as a ModuleDict key."""
    return path.replace(".", "__")


def normalise(y: torch.Tensor) -> torch.Tensor:
    """LN without affine over the channel (last) axis (Ba et al. 2016)."""
    return F.layer_norm(y, y.shape[-1:])


def timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal timestep embedding (DDPM / diffusers ``get_timestep_embedding``)."""
    return get_timestep_embedding(t.float().flatten(), dim, flip_sin_to_cos=True, downscale_freq_shift=0)


class LayerGate(nn.Module):
    """The gate parameters of one layer with ``channels`` outputs."""

    def __init__(self, channels: int, cfg: GateConfig) -> None:
        super().__init__()
        self.w_l = nn.Parameter(torch.zeros(channels))
        self.w_c = nn.Parameter(torch.zeros(channels))
        self.b = nn.Parameter(torch.zeros(channels))
        self.w_out = nn.Parameter(torch.full((channels,), 2.0))
        self.time = nn.Linear(cfg.time_dim, channels) if cfg.use_time else None
        self.prompt = nn.Linear(cfg.prompt_dim, channels, bias=False) if cfg.use_prompt else None
        for lin in (self.time, self.prompt):
            if lin is not None:
                nn.init.zeros_(lin.weight)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)

    def gates(
        self, y0: torch.Tensor, ys: torch.Tensor, temb: torch.Tensor | None, prompt: torch.Tensor | None
    ) -> torch.Tensor:
        """gᵢ for outputs ``ys`` (batch, …, adapters, channels) given y₀ (batch, …, channels)."""
        ln_y = normalise(ys)
        ln_0 = normalise(y0).unsqueeze(-2)
        logit = self.w_l * ln_y + self.w_c * (ln_0 * ln_y) + self.b
        extra = [1] * (ys.dim() - 2)  # broadcast per-sample terms over tokens/positions and adapters
        if self.time is not None and temb is not None:
            logit = logit + self.time(temb).view(temb.shape[0], *extra, -1)
        if self.prompt is not None and prompt is not None:
            logit = logit + self.prompt(prompt).view(prompt.shape[0], *extra, -1) * ln_y
        return torch.sigmoid(logit)

    def forward(
        self, y0: torch.Tensor, ys: torch.Tensor, temb: torch.Tensor | None, prompt: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, g): y = y₀ + Σᵢ w_out ⊙ gᵢ ⊙ yᵢ."""
        g = self.gates(y0, ys, temb, prompt)
        return y0 + (self.w_out * g * ys).sum(dim=-2), g


class GateNetwork(nn.Module):
    """Gates for a set of layers (by module path), trained for one base model family."""

    def __init__(
        self, channels: dict[str, int], cfg: GateConfig = GateConfig(), family: str | None = None
    ) -> None:
        super().__init__()
        self.cfg, self.family = cfg, family
        self.channels = dict(channels)
        self.layers = nn.ModuleDict({layer_key(p): LayerGate(c, cfg) for p, c in channels.items()})

    def layer(self, path: str) -> LayerGate | None:
        """The gate of a layer, or None when the network has none for it."""
        return self.layers[layer_key(path)] if layer_key(path) in self.layers else None  # noqa: SIM401

    def save(self, path: Path) -> Path:
        """Write weights + config + layer table as one safetensors file (atomic)."""
        meta = {
            "format": "adapter-studio-gate",
            "config": json.dumps(asdict(self.cfg)),
            "channels": json.dumps(self.channels),
            "family": self.family or "",
        }
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(tmp), metadata=meta)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> GateNetwork:
        """Read a gate written by :meth:`save` (safetensors only, header validated before any tensor is
        read; nothing is unpickled). A damaged or foreign file raises ``ValueError`` naming it."""
        from pipelines.lora_formats.safetensors_io import read_header

        meta = read_header(path).metadata
        if meta.get("format") != "adapter-studio-gate":
            raise ValueError(f"{path}: not an adapter-studio gate checkpoint")
        try:
            net = cls(
                json.loads(meta["channels"]),
                GateConfig(**json.loads(meta["config"])),
                meta.get("family") or None,
            )
            net.load_state_dict(load_file(str(path)))
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # json, config or tensors damaged
            raise ValueError(f"{path}: damaged gate checkpoint ({type(exc).__name__}: {exc})") from exc
        bad = [k for k, v in net.state_dict().items() if not bool(torch.isfinite(v).all())]
        if bad:
            raise ValueError(f"{path}: gate weights hold NaN or infinite values ({bad[0]!r}); retrain it")
        return net

    def parameter_count(self) -> int:
        """Number of trainable gate parameters."""
        return sum(p.numel() for p in self.parameters())
