"""Per-layer choice between the unfused multi-LoRA path and re-fusing W once per gate change.

Unfused costs T·R·(in·k + out) multiply-adds per call (T input vectors, R total rank, k kernel
taps); re-fusing from the factors costs out·in·k·R once per gate change, then the base op alone;
re-fusing from ``stacked`` dense per-adapter deltas ΔWᵢ (built once per mix) costs out·in·k·(n+1)
for n adapters — far less than R when ranks are high — at the price of n copies of W in memory
(bounded by ``stack_budget`` bytes). Layers with many tokens (self-attention at high resolution)
re-fuse; layers with few (cross-attention keys and values over 77 text tokens) stay unfused unless
stacking is cheaper. ``measure`` times the paths on the layer's first real input and caches the
verdict per shape (so a replay takes the same path).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pipelines.multilora import MultiLoraLayer


def flop_costs(
    tokens: int, rank: int, fan_in: int, fan_out: int, calls_per_change: float
) -> tuple[float, float]:
    """(unfused, fused) extra multiply-adds per gate change for one layer."""
    unfused = calls_per_change * tokens * rank * (fan_in + fan_out)
    fused = fan_out * fan_in * rank + fan_out * fan_in
    return unfused, fused


def stacked_cost(adapters: int, fan_in: int, fan_out: int) -> float:
    """Extra multiply-adds per gate change of W₀ + Σᵢ gᵢ·ΔWᵢ over stacked dense deltas."""
    return fan_out * fan_in * (adapters + 1)


def _shape_key(layer: MultiLoraLayer, x: torch.Tensor) -> str:
    w = layer.base.weight
    return f"{x.device.type}|{x.dtype}|{tuple(x.shape)}|{tuple(w.shape)}|{layer.rank}"


class PathPlanner:
    """Chooses ``fused`` or ``unfused`` for each layer on its first call."""

    def __init__(
        self,
        static: bool,
        mode: str = "cost",
        calls_per_change: float = 1.0,
        cache_file: Path | None = None,
        stack_budget: int = 2 << 30,
    ) -> None:
        if mode not in ("cost", "measure", "fused", "unfused", "stacked"):
            raise ValueError(f"unknown path mode {mode!r}")
        self.static, self.mode, self.calls = static, mode, calls_per_change
        self.cache_file = cache_file
        self.stack_budget = stack_budget
        self.stacked_bytes = 0
        self._verdicts: dict[str, str] = {}
        self._lock = threading.Lock()
        if cache_file is not None and cache_file.exists():
            self._verdicts = json.loads(cache_file.read_text())

    def __call__(self, layer: MultiLoraLayer, x: torch.Tensor) -> str:
        if self.mode in ("fused", "unfused", "stacked"):
            return self._claim(layer, self.mode)
        if layer.dense is not None or self.static:
            return "fused"  # static gates: W is built once for the whole generation
        if self.mode == "measure":
            return self._claim(layer, self._measured(layer, x))
        w = layer.base.weight
        unfused, fused = flop_costs(layer.tokens(x), layer.rank, w[0].numel(), w.shape[0], self.calls)
        costs = {"unfused": unfused, "fused": fused}
        if self._fits(layer):
            costs["stacked"] = stacked_cost(len(layer._downs), w[0].numel(), w.shape[0])
        return self._claim(layer, min(costs, key=costs.get))

    def _fits(self, layer: MultiLoraLayer) -> bool:
        """Whether the layer's stacked deltas fit in what is left of the budget."""
        return self.stacked_bytes + layer.stack_bytes() <= self.stack_budget

    def _claim(self, layer: MultiLoraLayer, path: str) -> str:
        """Book the memory of a stacked layer (falls back to ``fused`` past the budget)."""
        if path == "stacked":
            if not self._fits(layer) and self.mode != "stacked":
                return "fused"
            with self._lock:
                self.stacked_bytes += layer.stack_bytes()
        return path

    def _measured(self, layer: MultiLoraLayer, x: torch.Tensor) -> str:
        key = _shape_key(layer, x)
        if key not in self._verdicts:
            self._verdicts[key] = _time_paths(layer, x, self.calls, stacked=self._fits(layer))
            self._save()
        if self._verdicts[key] != "stacked":
            layer._stack = None  # built only to be timed
        return self._verdicts[key]

    def _save(self) -> None:
        if self.cache_file is None:
            return
        with self._lock:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self._verdicts, indent=0, sort_keys=True))
            tmp.replace(self.cache_file)


def _sync(x: torch.Tensor) -> None:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


@torch.no_grad()
def _time_paths(
    layer: MultiLoraLayer, x: torch.Tensor, calls: float, repeats: int = 3, stacked: bool = False
) -> str:
    """Median wall time of one gate change + ``calls`` forwards on each path."""
    from pipelines.multilora import fused_weight

    g = layer.gate_ranks().clone()
    g[g == 0] = 1.0

    def fused() -> None:
        w = fused_weight(layer.base.weight, layer.up, layer.down, g)
        for _ in range(max(1, round(calls))):
            layer.base_forward(x, w)

    def unfused() -> None:
        up = layer.up * (g.view(1, -1) if layer.up.dim() == 2 else g.view(1, -1, 1, 1))
        for _ in range(max(1, round(calls))):
            layer.base(x) + layer.lora_forward(x, layer.down, up)

    def stacked_path() -> None:
        w = layer.stacked_weight(torch.ones(len(layer._downs), dtype=g.dtype, device=g.device))
        for _ in range(max(1, round(calls))):
            layer.base_forward(x, w)

    paths = [("fused", fused), ("unfused", unfused)] + ([("stacked", stacked_path)] if stacked else [])
    times = {}
    for name, fn in paths:
        fn()
        _sync(x)
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            _sync(x)
            runs.append(time.perf_counter() - t0)
        times[name] = sorted(runs)[len(runs) // 2]
    return min(times, key=times.get)
