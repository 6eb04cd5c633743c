"""``gate``: the learned per-layer, per-channel, per-step, per-prompt gate (AutoLoRA, arXiv 2508.02107)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pipelines.fusion.base import FusionPolicy, register
from pipelines.gate.network import GateNetwork, LayerGate, timestep_features


class GateMismatchError(ValueError):
    """A gate checkpoint trained for another base model (family or layer shapes)."""


def check_gate_fits(network: GateNetwork, family: str | None, shapes: Mapping[str, torch.Size]) -> None:
    """Refuse a gate whose family differs from the model's, or whose layers the model lacks or sizes
    differently (the message says which)."""
    if network.family and family and network.family != family:
        raise GateMismatchError(
            f"the gate checkpoint was trained for {network.family!r} models; this model is {family!r} "
            "(train a gate for this model with `python -m studio gate train`)"
        )
    for path, channels in network.channels.items():
        shape = shapes.get(path)
        if shape is None or int(shape[0]) != channels:
            found = "has no such layer" if shape is None else f"has {int(shape[0])} channels there"
            raise GateMismatchError(
                f"the gate checkpoint (family {network.family or 'unknown'}) gates {path} with {channels} "
                f"channels; this model {found}"
            )


@register
class Gate(FusionPolicy):
    """Activation-dependent gates from a trained :class:`GateNetwork`; ``force`` pins g·w_out (tests)."""

    name = "gate"
    static = False
    uses_prompt = True

    def __init__(
        self, checkpoint: str | None = None, network: GateNetwork | None = None, force: float | None = None
    ) -> None:
        super().__init__(checkpoint=checkpoint, force=force)
        if network is None and force is None and not (isinstance(checkpoint, str) and checkpoint.strip()):
            given = "" if checkpoint is None else f" (got {checkpoint!r})"
            raise ValueError(
                "the gate policy needs a checkpoint: a trained gate file, or a gate's name or hash in the "
                f"catalog{given}"
            )
        self.network = (
            network if network is not None else (GateNetwork.load(Path(checkpoint)) if checkpoint else None)
        )
        self.force = force
        self._temb: torch.Tensor | None = None
        self._prompt: torch.Tensor | None = None
        self._step = 0
        self._table: torch.Tensor | None = None
        self._applied: dict[int, dict[int, torch.Tensor]] = {}

    def prepare(self, ctx):
        super().prepare(ctx)
        self._applied = {}
        return ctx.factors

    def check_model(self, family: str | None, shapes: Mapping[str, torch.Size]) -> None:
        if self.network is not None:
            check_gate_fits(self.network, family, shapes)

    def install(self, wrappers: list[Any]) -> None:
        assert self.ctx is not None
        if self.network is not None and wrappers:  # a loaded checkpoint starts on the CPU
            self.network.to(wrappers[0].slot_scale.device)
        for w in wrappers:
            path = self.ctx.layers[w.row].path
            if not path.startswith("unet."):
                continue
            layer = self.network.layer(path) if self.network is not None else None
            if layer is None and self.force is None:
                continue  # no gate trained for this layer: it stays linear
            w.mixer = self._mixer(w.row, layer)

    def _mixer(self, row: int, layer: LayerGate | None):
        def mix(y0: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
            if layer is None:
                self._record(row, torch.full((ys.shape[-2],), float(self.force)))
                return y0 + float(self.force) * ys.sum(dim=-2)
            y, g = layer(y0, ys.to(layer.b.dtype), self._temb, self._prompt)
            self._record(row, (g * layer.w_out).detach().flatten(0, -3).mean(dim=(0, 2)))
            return y.to(y0.dtype)

        return mix

    def _record(self, row: int, per_adapter: torch.Tensor) -> None:
        self._applied.setdefault(self._step, {})[row] = per_adapter.float().cpu()

    def gates(self, step, num_steps, timestep=None, prompt_embeds=None) -> torch.Tensor:
        assert self.ctx is not None
        self._step = step
        net = self.network
        if net is not None and timestep is not None and net.cfg.use_time:
            device = next(net.parameters()).device
            self._temb = timestep_features(torch.tensor([float(timestep)], device=device), net.cfg.time_dim)
        if net is not None and prompt_embeds is not None and net.cfg.use_prompt:
            self._prompt = prompt_embeds.float().mean(dim=1).to(next(net.parameters()).device)
        self._table = self.ctx.base_table()
        return self._table

    def applied(self, logged: torch.Tensor) -> torch.Tensor:
        """Mean of w_out ⊙ gᵢ per layer and step, times the adapter weight; logged tables elsewhere."""
        out = logged.clone()
        for step, rows in self._applied.items():
            if step < out.shape[0]:
                for row, values in rows.items():
                    out[step, row] = logged[step, row] * values
        return out
