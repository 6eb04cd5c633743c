"""Multi-LoRA layers: every active adapter of one Linear/Conv2d concatenated along the rank axis.

y = W₀x + B_cat · (g_rank ⊙ (A_cat · x)) costs two matmuls per layer whatever the adapter count.
g_rank expands the per-adapter gate vector of this layer to rank slots. Gates live in a shared
:class:`GateTable`; a layer re-derives what it needs only when the table's version changes.
A layer runs one of two paths, chosen per layer by cost (:mod:`pipelines.path_plan`):
``unfused`` (the two extra matmuls on every call) or ``fused`` (W_t = W₀ + B·diag(g)·A built once
per gate version, then one matmul). The base module is never written to.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.lora_weights import LoraLayer


class GateTable:
    """Gates of every wrapped layer for the current step: a (layers × adapters) tensor + a version."""

    def __init__(self, n_layers: int, n_adapters: int, device: torch.device | str = "cpu") -> None:
        self.values = torch.zeros(n_layers, n_adapters, device=device)
        self.row_version = [0] * n_layers

    def set(self, table: torch.Tensor) -> None:
        """Copy a new (layers × adapters) gate table in; bumps the version of the rows that changed."""
        table = table.to(self.values.device, self.values.dtype)
        changed = (table != self.values).any(dim=1).nonzero().flatten().tolist()
        if changed:
            self.values.copy_(table)
            for row in changed:
                self.row_version[row] += 1


def fold_tucker(down: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
    """One conv kernel for LoCon's Tucker form: down' = mid ∘ down (LyCORIS ``lora_mid``)."""
    return torch.einsum("rskl,si->rikl", mid, down[:, :, 0, 0])


def conform(base: nn.Module, down: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors shaped for the base op: 1×1-conv LoRAs on Linear layers and back (SD-2 proj_in/out)."""
    if isinstance(base, nn.Linear) and down.dim() == 4:
        if down.shape[2:] != (1, 1):
            raise ValueError(f"a {tuple(down.shape[2:])} conv LoRA cannot adapt a Linear layer")
        return down[:, :, 0, 0], up.flatten(1)
    if isinstance(base, nn.Conv2d) and down.dim() == 2:
        return down[:, :, None, None], up[:, :, None, None]
    if isinstance(base, nn.Conv2d) and up.dim() == 2:
        return down, up[:, :, None, None]
    return down, up


def expand_gates(gates: torch.Tensor, slot_adapter: torch.Tensor, slot_scale: torch.Tensor) -> torch.Tensor:
    """Per-rank-slot multipliers g_rank = g[adapter(slot)] · alpha/rank (LoRA eq. 4, per adapter)."""
    return gates.index_select(0, slot_adapter) * slot_scale


def fused_weight(
    w0: torch.Tensor, up: torch.Tensor, down: torch.Tensor, g_rank: torch.Tensor
) -> torch.Tensor:
    """W_t = W₀ + B · diag(g_rank) · A, for Linear (2-d) and Conv (4-d) weights (LoRA merge, eq. 3)."""
    if w0.dim() == 2:
        return torch.addmm(w0, up * g_rank, down)
    delta = (up[:, :, 0, 0] * g_rank) @ down.flatten(1)
    return w0 + delta.view_as(w0)


@dataclass
class _Cache:
    version: int = -1
    weight: torch.Tensor | None = None
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    fuses: int = 0


class MultiLoraLayer(nn.Module):
    """Base class: holds the base module, concatenated factors and the gate-table row it reads."""

    def __init__(
        self,
        base: nn.Module,
        layers: list[tuple[int, LoraLayer | torch.Tensor]],
        table: GateTable,
        row: int,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.base = base
        self.table = table
        self.row = row
        device = base.weight.device
        downs, ups, slot_adapter, slot_scale, factor_adapter = [], [], [], [], []
        dense, dense_adapter = [], []
        for adapter, layer in layers:
            if isinstance(layer, torch.Tensor):  # a dense ΔW (DoRA, merges), already scaled
                dense.append(layer.reshape(base.weight.shape))
                dense_adapter.append(adapter)
                continue
            down = fold_tucker(layer.down, layer.mid) if layer.mid is not None else layer.down
            down, up = conform(base, down, layer.up)
            downs.append(down)
            ups.append(up)
            factor_adapter.append(adapter)
            slot_adapter += [adapter] * layer.rank
            slot_scale += [layer.scale] * layer.rank
        # Factors stay per adapter until a path needs them concatenated: attaching a mix copies
        # nothing, and a static mix is fused adapter by adapter on its first call.
        self._downs = [d.to(device, dtype) for d in downs]
        self._ups = [u.to(device, dtype) for u in ups]
        self._ranks = [d.shape[0] for d in downs]
        self._cat: tuple[torch.Tensor, torch.Tensor] | None = None
        self._factor_adapter = torch.tensor(factor_adapter, dtype=torch.long, device=device)
        self._stack: torch.Tensor | None = None
        self.register_buffer(
            "slot_adapter", torch.tensor(slot_adapter, dtype=torch.long, device=device), persistent=False
        )
        self.register_buffer(
            "slot_scale", torch.tensor(slot_scale, device=device, dtype=dtype), persistent=False
        )
        self.register_buffer(
            "dense", torch.stack(dense).to(device, dtype) if dense else None, persistent=False
        )
        self.register_buffer(
            "dense_adapter", torch.tensor(dense_adapter, dtype=torch.long, device=device), persistent=False
        )
        self.path = "unfused"
        self.planner: Callable[[MultiLoraLayer, torch.Tensor], str] | None = None
        self.mixer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        self._cache = _Cache()
        self._up_by_adapter: tuple[torch.Tensor, torch.Tensor] | None = None
        self.calls = 0

    @property
    def rank(self) -> int:
        """Total rank of all adapters at this layer."""
        return sum(self._ranks)

    def _concat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_cat, B_cat), built once per mix on first use."""
        if self._cat is None:
            w = self.base.weight
            if self._downs:
                self._cat = (torch.cat(self._downs), torch.cat(self._ups, dim=1))
            else:
                empty_down = w.new_zeros((0, *w.shape[1:]))
                empty_up = (
                    w.new_zeros((w.shape[0], 0, 1, 1)) if w.dim() == 4 else w.new_zeros((w.shape[0], 0))
                )
                self._cat = (empty_down, empty_up)
        return self._cat

    @property
    def down(self) -> torch.Tensor:
        """A_cat: every adapter's down-projection stacked along the rank axis."""
        return self._concat()[0]

    @property
    def up(self) -> torch.Tensor:
        """B_cat: every adapter's up-projection side by side along the rank axis."""
        return self._concat()[1]

    def _fuse_per_adapter(self, g_rank: torch.Tensor) -> torch.Tensor:
        """W₀ + Σᵢ Bᵢ·diag(gᵢ)·Aᵢ without concatenating the factors (for one-off fusing)."""
        w, start = self.base.weight, 0
        for down, up, r in zip(self._downs, self._ups, self._ranks, strict=True):
            g = g_rank[start : start + r]
            start += r
            if bool((g != 0).any()):
                w = fused_weight(w, up, down, g)
        return w

    def stack_bytes(self) -> int:
        """Memory the ``stacked`` path needs: one dense ΔW per low-rank adapter."""
        w = self.base.weight
        return len(self._downs) * w.numel() * w.element_size()

    def _stacked(self) -> torch.Tensor:
        """(adapters × W.shape): each adapter's ΔWᵢ = Bᵢ·(α/r)·Aᵢ, built once per mix (no gates)."""
        if self._stack is None:
            w, start, deltas = self.base.weight, 0, []
            for down, up, r in zip(self._downs, self._ups, self._ranks, strict=True):
                scale = self.slot_scale[start : start + r]
                start += r
                deltas.append(fused_weight(torch.zeros_like(w), up, down, scale))
            self._stack = torch.stack(deltas) if deltas else w.new_zeros((0, *w.shape))
        return self._stack

    def stacked_weight(self, gates: torch.Tensor) -> torch.Tensor:
        """W₀ + Σᵢ gᵢΔWᵢ in one fused pass over the stacked deltas (``gates``: one per low-rank adapter)."""
        w0, stack = self.base.weight, self._stacked()
        return torch.addmv(w0.reshape(-1), stack.reshape(len(stack), -1).t(), gates).view_as(w0)

    def gate_ranks(self) -> torch.Tensor:
        """Current per-slot multipliers."""
        g = self.table.values[self.row].to(self.slot_scale.dtype)
        return expand_gates(g, self.slot_adapter, self.slot_scale)

    def _refresh(self) -> _Cache:
        """Re-derive fused weight or active factors when the gate table changed."""
        c = self._cache
        version = self.table.row_version[self.row]
        if c.version == version:
            return c
        g_rank = self.gate_ranks()
        c.version = version
        c.weight = c.down = c.up = c.dense = None
        active = g_rank != 0
        if self.dense is not None:
            g = self.table.values[self.row].to(self.dense.dtype).index_select(0, self.dense_adapter)
            if bool((g != 0).any()):
                c.dense = torch.tensordot(g, self.dense, dims=1)
        if self.path in ("fused", "stacked"):
            c.weight = self._fused(g_rank, active)
            if c.dense is not None:
                c.weight = (self.base.weight if c.weight is None else c.weight) + c.dense
        elif active.any():
            idx = active.nonzero().flatten()
            c.down = self.down.index_select(0, idx)
            up = self.up.index_select(1, idx)
            shape = (1, -1) if up.dim() == 2 else (1, -1, 1, 1)
            c.up = up * g_rank.index_select(0, idx).view(shape)
        return c

    def _fused(self, g_rank: torch.Tensor, active: torch.Tensor) -> torch.Tensor | None:
        """W₀ + Σ gᵢΔWᵢ: from the stacked dense deltas (k·out·in per change) or from the factors
        (out·in·R); ``None`` when no adapter is active."""
        if not bool(active.any()):
            return None
        self._cache.fuses += 1
        if self.path == "stacked":
            g = self.table.values[self.row].to(self.slot_scale.dtype).index_select(0, self._factor_adapter)
            return self.stacked_weight(g)
        if self._cat is None and self._cache.fuses == 1:  # one-off: no need to concatenate the factors
            return self._fuse_per_adapter(g_rank)
        return fused_weight(self.base.weight, self.up, self.down, g_rank)

    def choose_path(self, x: torch.Tensor) -> None:
        """Let the planner pick this layer's path on its first call (it sees the real input)."""
        if self.planner is not None and self.calls == 0:
            self.path = self.planner(self, x)
            self._cache = _Cache()
        self.calls += 1

    def tokens(self, x: torch.Tensor) -> int:
        """How many input vectors one call multiplies (T in the cost model)."""
        raise NotImplementedError

    def base_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base op with a given weight."""
        raise NotImplementedError

    def lora_forward(self, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """B · (A · x) for the active slots."""
        raise NotImplementedError

    def dense_forward(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """ΔW · x for a dense delta (no bias)."""
        raise NotImplementedError

    def up_by_adapter(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(index adapters × r_max into the rank axis, R for padding; up adapters × out × r_max), cached.

        Adapters' rank slots padded to the largest rank, so each adapter's output is one batched
        matmul over its own slots: cost tokens·out·n·r_max (= ·R at equal ranks), not ·n·R.
        """
        if self._up_by_adapter is None:
            n, up = self.table.values.shape[1], self.up.flatten(1)
            rank_of = torch.bincount(self.slot_adapter, minlength=n)
            r_max = max(int(rank_of.max()), 1)
            order = torch.argsort(self.slot_adapter, stable=True)
            start = torch.cumsum(rank_of, 0) - rank_of
            pos = torch.arange(len(order), device=order.device) - start[self.slot_adapter[order]]
            index = torch.full((n, r_max), up.shape[1], dtype=torch.long, device=up.device)
            index[self.slot_adapter[order], pos] = order
            padded = torch.cat([up, up.new_zeros(up.shape[0], 1)], 1)[:, index]  # out × n × r_max
            self._up_by_adapter = (index, padded.permute(1, 0, 2).contiguous())
        return self._up_by_adapter

    def adapter_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Each adapter's gated output B_i·(g·A_i·x), channel-last: (…, adapters, out), no loop."""
        if self.dense is not None:
            raise ValueError("activation-dependent gates need low-rank adapters, not dense deltas")
        u = self.down_project(x)
        if not isinstance(self, MultiLoraLinear):
            u = u.permute(0, 2, 3, 1)
        index, up = self.up_by_adapter()
        u = F.pad(u * self.gate_ranks(), (0, 1))[..., index]  # (…, n, r_max), zeros in the padding
        return torch.einsum("...nr,nor->...no", u, up)

    def down_project(self, x: torch.Tensor) -> torch.Tensor:
        """A_cat · x (channel axis last for Linear, second for Conv2d)."""
        raise NotImplementedError

    def mixed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = mixer(y₀, Y): an activation-dependent gate over the adapters' separate outputs."""
        assert self.mixer is not None
        y0 = self.base(x)
        outputs = self.adapter_outputs(x)
        if isinstance(self, MultiLoraLinear):
            return self.mixer(y0, outputs)
        return self.mixer(y0.permute(0, 2, 3, 1), outputs).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mixer is not None:
            return self.mixed_forward(x)
        self.choose_path(x)
        c = self._refresh()
        if c.weight is not None:
            return self.base_forward(x, c.weight)
        y = self.base(x)
        if c.down is not None:
            y = y + self.lora_forward(x, c.down, c.up)
        if c.dense is not None:
            y = y + self.dense_forward(x, c.dense)
        return y


class MultiLoraLinear(MultiLoraLayer):
    """Multi-LoRA wrapper of an ``nn.Linear``."""

    def tokens(self, x: torch.Tensor) -> int:
        return x.numel() // x.shape[-1]

    def base_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self.base.bias)

    def lora_forward(self, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, down), up)

    def down_project(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.down)

    def dense_forward(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return F.linear(x, delta)


class MultiLoraConv2d(MultiLoraLayer):
    """Multi-LoRA wrapper of an ``nn.Conv2d`` (LoCon: down carries the kernel, up is 1×1)."""

    def tokens(self, x: torch.Tensor) -> int:
        b = self.base
        h = (x.shape[-2] + 2 * b.padding[0] - b.dilation[0] * (b.kernel_size[0] - 1) - 1) // b.stride[0] + 1
        w = (x.shape[-1] + 2 * b.padding[1] - b.dilation[1] * (b.kernel_size[1] - 1) - 1) // b.stride[1] + 1
        return x.shape[0] * h * w

    def base_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        b = self.base
        return F.conv2d(x, weight, b.bias, b.stride, b.padding, b.dilation, b.groups)

    def lora_forward(self, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        b = self.base
        return F.conv2d(F.conv2d(x, down, None, b.stride, b.padding, b.dilation), up)

    def down_project(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base
        return F.conv2d(x, self.down, None, b.stride, b.padding, b.dilation)

    def dense_forward(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        b = self.base
        return F.conv2d(x, delta, None, b.stride, b.padding, b.dilation, b.groups)


def wrap(
    base: nn.Module,
    layers: list[tuple[int, LoraLayer | torch.Tensor]],
    table: GateTable,
    row: int,
    dtype: torch.dtype,
) -> MultiLoraLayer:
    """The right wrapper for a base Linear or Conv2d."""
    if isinstance(base, nn.Linear):
        return MultiLoraLinear(base, layers, table, row, dtype)
    if isinstance(base, nn.Conv2d):
        if base.groups != 1:
            raise ValueError("LoRA on grouped convolutions is not supported")
        return MultiLoraConv2d(base, layers, table, row, dtype)
    raise TypeError(f"cannot attach a LoRA to {type(base).__name__}")
