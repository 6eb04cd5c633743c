"""Training the gate as AutoLoRA does (arXiv 2508.02107 §3.3): pairs of LoRAs, images each LoRA
generates itself, and a loss that makes the gate route by prompt:

    L = MSE(ε̂(x₁ₜ, p₁), ε) + λ · max(0, m − MSE(ε̂(x₁ₜ, p₂), ε))

x₁ is an image of LoRA 1 made with its own prompt p₁; p₂ is a prompt of LoRA 2. Only the gate's
parameters train; prompts are dropped to "" at a small rate (classifier-free guidance).

Our addition, for prompts that ask for both concepts: ``mixes`` — pictures of a pair mixed linearly
from two-concept prompts, kept only where a judge finds both concepts (rejection sampling) — add
``mix_weight · MSE(ε̂(x₁₂ₜ, p₁₂), ε)`` with both LoRAs on, so the gate learns to let both through
when both are asked for, instead of closing both (the hinge alone teaches only exclusion).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.engine import attach
from pipelines.fusion.base import AdapterInfo
from pipelines.fusion.gate import Gate
from pipelines.gate.network import GateConfig, GateNetwork, timestep_features
from pipelines.lora_weights import LoraWeights
from pipelines.path_plan import PathPlanner


@dataclass(frozen=True)
class GateTrainConfig:
    """Options of a gate training run."""

    steps: int = 600
    batch_size: int = 8
    lr: float = 2e-3
    margin: float = 0.5
    fit_weight: float = 1.0  # weight of the first term (MSE for prompt 1 on LoRA 1's picture)
    hinge_weight: float = 1.0
    empty_prompt_rate: float = 0.1
    use_time: bool = True
    use_prompt: bool = True
    mix_weight: float = 1.0  # weight of the two-concept term (used when mixes are given)
    images_per_lora: int = 32
    sample_steps: int = 20
    guidance: float = 5.0
    seed: int = 0

    def _weights(self) -> tuple[float, float, float]:
        """The loss terms' weights."""
        return self.fit_weight, self.hinge_weight, self.mix_weight

    def __post_init__(self) -> None:
        checks = [
            (self.steps >= 1, f"steps must be ≥ 1, got {self.steps}"),
            (self.batch_size >= 1, f"batch_size must be ≥ 1, got {self.batch_size}"),
            (math.isfinite(self.lr) and self.lr > 0, f"lr must be a finite number > 0, got {self.lr}"),
            (self.images_per_lora >= 1, f"images_per_lora must be ≥ 1, got {self.images_per_lora}"),
            (self.sample_steps >= 1, f"sample_steps must be ≥ 1, got {self.sample_steps}"),
            (
                all(math.isfinite(w) for w in (self.margin, *self._weights())) and min(self._weights()) >= 0,
                "margin and the term weights must be finite (weights ≥ 0)",
            ),
            (math.isfinite(self.guidance), f"guidance must be finite, got {self.guidance}"),
            (
                0 <= self.empty_prompt_rate <= 1,
                f"empty_prompt_rate must be in [0, 1], got {self.empty_prompt_rate}",
            ),
        ]
        for ok, problem in checks:
            if not ok:
                raise ValueError(f"invalid gate training option: {problem}")


@dataclass(frozen=True)
class GateLora:
    """A LoRA the gate learns to route, with prompts that ask for its concept."""

    name: str
    weights: LoraWeights
    prompts: tuple[str, ...]


def lora_latents(
    pipe: Any, lora: GateLora, n: int, cfg: GateTrainConfig, seed: int
) -> tuple[torch.Tensor, list[str]]:
    """Latents of ``n`` pictures the LoRA makes alone (weight 1) from its own prompts."""
    rng = np.random.default_rng(seed)
    prompts = [lora.prompts[i] for i in rng.integers(0, len(lora.prompts), n)]
    return mix_latents(pipe, [lora], prompts, [seed * 10_000 + i for i in range(n)], cfg), prompts


@torch.no_grad()
def mix_latents(
    pipe: Any, loras: Sequence[GateLora], prompts: Sequence[str], seeds: Sequence[int], cfg: GateTrainConfig
) -> torch.Tensor:
    """Latents of pictures the LoRAs make mixed linearly (weight 1 each), one seed per prompt."""
    from pipelines.fusion import make_policy

    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    with attach(pipe, [(AdapterInfo(lo.name), lo.weights) for lo in loras], make_policy("linear")):
        out = pipe(
            list(prompts),
            num_inference_steps=cfg.sample_steps,
            guidance_scale=cfg.guidance,
            generator=gens,
            output_type="latent",
        )
    return out.images.detach().float().cpu()


@torch.no_grad()
def decode_latents(pipe: Any, latents: torch.Tensor) -> np.ndarray:
    """uint8 N×H×W×3 pictures of latents (for judging them)."""
    vae = pipe.vae
    images = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def gate_layers(pipe: Any, loras: Sequence[GateLora]) -> dict[str, int]:
    """UNet layers any of the LoRAs adapts, with their output channels."""
    from pipelines.engine import model_modules

    modules = model_modules(pipe)
    paths = {p for lo in loras for p in lo.weights.layers if p.startswith("unet.")}
    return {p: int(modules[p].weight.shape[0]) for p in modules if p in paths}


def require_gate_layers(pipe: Any, loras: Sequence[GateLora]) -> dict[str, int]:
    """:func:`gate_layers`, refusing LoRAs that adapt no UNet layer of the model (nothing to gate)."""
    layers = gate_layers(pipe, loras)
    if not layers:
        names = ", ".join(lo.name for lo in loras)
        raise ValueError(
            f"none of the LoRAs ({names}) adapts a UNet layer of this model: a gate routes UNet layers "
            "only (text-encoder-only LoRAs cannot be gated)"
        )
    return layers


@torch.no_grad()
def encode(pipe: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Text-encoder hidden states of prompts (padded to 77 tokens, as the pipeline does)."""
    ids = pipe.tokenizer(
        list(prompts),
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(pipe.text_encoder.device)
    return pipe.text_encoder(ids)[0]


def train_gate(
    pipe: Any,
    loras: Sequence[GateLora],
    pairs: Sequence[tuple[int, int]],
    cfg: GateTrainConfig = GateTrainConfig(),
    *,
    family: str | None = None,
    data: dict[int, tuple[torch.Tensor, list[str]]] | None = None,
    mixes: dict[tuple[int, int], tuple[torch.Tensor, list[str]]] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> tuple[GateNetwork, list[float]]:
    """Train a gate for ``loras`` on ordered ``pairs`` (i, j) of their indices; returns (gate, losses).

    ``mixes``: accepted two-concept pictures (latents, prompts) per pair (i, j), for the mix term.
    """
    if cfg.fit_weight == 0 and cfg.hinge_weight == 0 and not (mixes and cfg.mix_weight):
        raise ValueError("nothing to train: fit_weight and hinge_weight are 0 and no mixes are given")
    layers = require_gate_layers(pipe, loras)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if data is None:
        data = {
            i: lora_latents(pipe, lo, cfg.images_per_lora, cfg, cfg.seed + i) for i, lo in enumerate(loras)
        }
    hidden = int(pipe.text_encoder.config.hidden_size)
    net = GateNetwork(layers, GateConfig(cfg.use_time, cfg.use_prompt, prompt_dim=hidden), family=family)
    net.to(pipe.unet.device)
    for p in (*pipe.unet.parameters(), *pipe.text_encoder.parameters()):
        p.requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.0)
    policy = Gate(network=net)
    sched = pipe.scheduler
    alphas = sched.alphas_cumprod
    losses: list[float] = []
    adapters = [(AdapterInfo(lo.name), lo.weights) for lo in loras]
    with attach(
        pipe, adapters, policy, planner=PathPlanner(static=False, mode="unfused"), track_steps=False
    ) as mix:
        for step in range(cfg.steps):
            i, j = pairs[int(rng.integers(len(pairs)))]
            lat, prompts = data[i]
            idx = rng.integers(0, len(lat), cfg.batch_size)
            x0 = lat[torch.from_numpy(idx)].to(pipe.unet.device)
            p1 = ["" if rng.random() < cfg.empty_prompt_rate else prompts[k] for k in idx]
            p2 = [loras[j].prompts[int(rng.integers(len(loras[j].prompts)))] for _ in idx]
            t = torch.randint(0, len(alphas), (cfg.batch_size,), device=x0.device)
            noise = torch.randn_like(x0)
            xt = sched.add_noise(x0, noise, t)
            # (LoRAs on, noisy latents, their noise, prompts, weight, hinge term?)
            terms = [
                ((i, j), xt, noise, p1, cfg.fit_weight, False),
                ((i, j), xt, noise, p2, cfg.hinge_weight, True),
            ]
            if mixes:
                key = list(mixes)[int(rng.integers(len(mixes)))]
                m_lat, m_prompts = mixes[key]
                m_idx = rng.integers(0, len(m_lat), cfg.batch_size)
                m_p = ["" if rng.random() < cfg.empty_prompt_rate else m_prompts[k] for k in m_idx]
                m_noise = torch.randn_like(x0)
                m_xt = sched.add_noise(m_lat[torch.from_numpy(m_idx)].to(x0.device), m_noise, t)
                terms.append((key, m_xt, m_noise, m_p, cfg.mix_weight, False))
            policy._temb = timestep_features(t, net.cfg.time_dim) if cfg.use_time else None
            loss = torch.zeros((), device=x0.device)
            for on, x_t, eps, prompts_k, weight, hinge in terms:
                if weight == 0:
                    continue  # a switched-off term costs no UNet pass
                table = torch.zeros(len(mix.layers), len(loras))
                table[:, list(on)] = 1.0
                mix.table.set(table)
                emb = encode(pipe, prompts_k)
                policy._prompt = emb.float().mean(dim=1) if cfg.use_prompt else None
                mse = F.mse_loss(pipe.unet(x_t, t, emb).sample.float(), eps)
                loss = loss + weight * (F.relu(cfg.margin - mse) if hinge else mse)
            if not torch.isfinite(loss):
                raise RuntimeError(
                    f"gate training diverged at step {step + 1} (loss {loss.item()}); lower the learning "
                    f"rate (lr {cfg.lr:g})"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            policy._applied.clear()
            losses.append(loss.item())
            if progress is not None:
                progress(step + 1, cfg.steps, losses[-1])
    if not all(bool(torch.isfinite(p).all()) for p in net.parameters()):  # the last step's update
        raise RuntimeError(
            f"gate training diverged (non-finite gate weights); lower the learning rate (lr {cfg.lr:g})"
        )
    return net, losses
