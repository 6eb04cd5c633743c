"""Distil a learned gate into per-block, per-step keyframes (the ``schedule`` policy).

The gates a trained network applies (mean of w_out ⊙ gᵢ per layer and step, over a set of
prompts) are averaged per LoRA-Block-Weight block: each adapter gets one keyframe track per block,
exact at every step, which the ``schedule`` policy runs with no per-channel work (the fused path
re-fuses W once per step). What scalar keyframes cannot carry is the gate's per-channel,
per-token and per-prompt variation. For tools that take one schedule and one block vector per
LoRA (sd-webui-loractl + LoRA Block Weight), each (blocks × steps) matrix is also factored as u·vᵀ,
its best rank-one fit (Eckart–Young): u an LBW vector, v loractl keyframes, with the fit's error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pipelines.blocks import UnetLayout
from pipelines.fusion.schedule import to_loractl


@dataclass(frozen=True)
class Distilled:
    """Per adapter: keyframes per block; and the rank-one export (LBW vector, short or full length, +
    loractl keyframes) with its error."""

    per_block: list[dict[str, str]]
    keyframes: list[str]
    lbw_vectors: list[str]
    relative_error: list[float]

    def fusion_args(self) -> dict[str, Any]:
        """Parameters of the ``schedule`` policy that replays the distilled gate."""
        return {"schedule": [dict(b) for b in self.per_block]}

    def rank_one_args(self) -> dict[str, Any]:
        """Parameters of the rank-one approximation (one schedule × one block vector per adapter)."""
        return {"schedule": list(self.keyframes), "blocks": list(self.lbw_vectors)}


def block_step_matrix(gates: torch.Tensor, blocks: Sequence[str], ids: Sequence[str]) -> torch.Tensor:
    """(adapters × blocks × steps) means of a (steps × layers × adapters) gate record."""
    out = torch.zeros(gates.shape[2], len(ids), gates.shape[0])
    for b, block in enumerate(ids):
        rows = [i for i, name in enumerate(blocks) if name == block]
        if rows:
            out[:, b, :] = gates[:, rows, :].mean(dim=1).T
    return out


def rank_one(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative u, v with u·vᵀ the best rank-one fit of a non-negative matrix, max(v) = 1."""
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    a, b = u[:, 0] * s[0], vh[0]
    if b.sum() < 0:
        a, b = -a, -b
    scale = float(b.abs().max()) or 1.0
    return (a * scale).clamp_min(0).float(), (b / scale).clamp_min(0).float()


def _track(values: torch.Tensor, num_steps: int) -> str:
    """A loractl keyframe at every step."""
    positions = [round(s / max(1, num_steps - 1), 4) for s in range(len(values))]
    return to_loractl((positions, [round(float(x), 4) for x in values]))


def distill(gates: torch.Tensor, blocks: Sequence[str], layout: UnetLayout, num_steps: int) -> Distilled:
    """Fit per-block keyframes (and the rank-one export) to a gate record (steps × layers × adapters)."""
    ids = [i for i in layout.all_ids() if i != "BASE" and i in set(blocks)]
    mats = block_step_matrix(gates, blocks, ids)
    per_block, frames, errors, vectors = [], [], [], []
    # LBW's short vector covers only blocks with cross-attention: use it when every gated layer sits
    # there, else the full vector (a short one would switch the other blocks' layers off)
    short = layout.attention_ids()
    order = short if set(ids) <= set(short) else layout.all_ids()
    for m in mats:
        per_block.append({b: _track(m[k], num_steps) for k, b in enumerate(ids)} | {"default": "1"})
        u, v = rank_one(m)
        errors.append(float((torch.outer(u, v) - m).norm() / m.norm().clamp_min(1e-12)))
        weights = {"BASE": 1.0} | {b: float(w) for b, w in zip(ids, u, strict=True)}
        frames.append(_track(v, num_steps))
        vectors.append(",".join(f"{round(weights.get(b, 0.0), 4):g}" for b in order))
    return Distilled(per_block, frames, vectors, errors)


@torch.no_grad()
def record_gates(
    pipe: Any,
    adapters: Sequence[tuple[Any, Any]],
    policy: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    guidance: float,
) -> tuple[torch.Tensor, list[str], list[str]]:
    """Mean gate factors over prompts, the adapters' own weights divided out:
    (steps × layers × adapters), layer paths and block ids of the UNet layers."""
    from pipelines.engine import attach

    total = None
    for prompt, seed in zip(prompts, seeds, strict=True):
        with attach(pipe, adapters, policy, num_steps=steps) as mix:
            pipe(
                prompt,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=torch.Generator("cpu").manual_seed(seed),
                output_type="latent",
            )
            logged = torch.stack(mix.gate_log)
            g = torch.where(logged != 0, mix.gates() / logged.where(logged != 0, torch.ones(())), 0.0)
        total = g if total is None else total + g
    assert total is not None
    unet = [i for i, layer in enumerate(mix.layers) if layer.is_unet]
    return (
        (total / len(prompts))[:, unet, :],
        [mix.layers[i].path for i in unet],
        [mix.layers[i].block for i in unet],
    )
