"""LRU cache of adapter weights by content hash: disk → host (normalised) → device (compute dtype)."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from pipelines.hashing import addnet_hash, sha256_file
from pipelines.lora_weights import LoraLayer, LoraWeights


def _to(layer: LoraLayer, device: torch.device, dtype: torch.dtype) -> LoraLayer:
    """A layer's tensors on a device and dtype (DoRA magnitudes stay float32)."""

    def mv(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device, dtype)

    return replace(layer, down=mv(layer.down), up=mv(layer.up), mid=mv(layer.mid))


class AdapterCache:
    """Adapters by SHA-256: parsed once from disk, kept on the host and on the device (LRU each)."""

    def __init__(
        self,
        loader: Callable[[Path], LoraWeights] | None = None,
        host_capacity: int = 32,
        device_capacity: int = 16,
    ) -> None:
        if loader is None:
            from pipelines.lora_formats import load as loader
        self.loader = loader
        self.host_capacity, self.device_capacity = host_capacity, device_capacity
        self._hashes: dict[tuple[str, int, int], str] = {}
        self._addnet: dict[tuple[str, str, int, int], str] = {}
        self._host: OrderedDict[str, LoraWeights] = OrderedDict()
        self._device: OrderedDict[tuple[str, str, torch.dtype], LoraWeights] = OrderedDict()
        self._lock = threading.Lock()
        self.disk_reads = 0

    def file_hash(self, path: Path) -> str:
        """SHA-256 of a file, memoised by (path, size, mtime)."""
        st = os.stat(path)
        key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = sha256_file(path)
        return self._hashes[key]

    def short_hash(self, path: Path) -> str:
        """A1111's 12-char ``Lora hashes`` value (hash of the tensor data), memoised."""
        st = os.stat(path)
        key = ("addnet", str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
        if key not in self._addnet:
            self._addnet[key] = addnet_hash(path)[:12]
        return self._addnet[key]

    def host(self, path: Path) -> tuple[str, LoraWeights]:
        """(sha256, weights on the host), reading and converting the file only on a miss."""
        sha = self.file_hash(path)
        with self._lock:
            if sha in self._host:
                self._host.move_to_end(sha)
                return sha, self._host[sha]
        weights = self.loader(Path(path))
        self.disk_reads += 1
        with self._lock:
            self._host[sha] = weights
            while len(self._host) > self.host_capacity:
                self._host.popitem(last=False)
        return sha, weights

    def device(self, path: Path, device: torch.device, dtype: torch.dtype) -> tuple[str, LoraWeights]:
        """(sha256, weights on ``device`` in ``dtype``)."""
        sha, weights = self.host(path)
        key = (sha, str(device), dtype)
        with self._lock:
            if key in self._device:
                self._device.move_to_end(key)
                return sha, self._device[key]
        moved = replace(weights, layers={k: _to(v, device, dtype) for k, v in weights.layers.items()})
        with self._lock:
            self._device[key] = moved
            while len(self._device) > self.device_capacity:
                self._device.popitem(last=False)
        return sha, moved
