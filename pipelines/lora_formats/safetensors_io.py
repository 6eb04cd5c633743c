"""Safe reading and atomic writing of safetensors files; pickled checkpoints are refused unread.

The header is validated before any tensor is touched (length field, JSON, dtypes, offsets against
the file size), so a truncated or foreign file gets a specific error instead of a crash deep
inside a library, and ``inspect`` can describe a file from its header alone.
"""

from __future__ import annotations

import json
import math
import os
import struct
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from pipelines.lora_formats.errors import NonFiniteWeightsError, NotSafetensorsError, PickledFileError

PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"})
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header describes it."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated safetensors header: tensors in file order, string metadata, file size."""

    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    size_bytes: int

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor name → shape."""
        return {name: entry.shape for name, entry in self.tensors.items()}


def refuse_pickle(path: Path, head: bytes) -> None:
    """Raise PickledFileError for a pickle suffix or pickle / torch-zip magic bytes."""
    is_pickle = len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5
    is_torch_zip = head.startswith(b"PK\x03\x04")
    if path.suffix.lower() in PICKLE_SUFFIXES or is_pickle or is_torch_zip:
        raise PickledFileError(
            f"{path}: is a pickled PyTorch checkpoint. Pickle files can run arbitrary code when opened, "
            "so they are never opened here; convert it to .safetensors with a tool you trust."
        )


def read_header(path: Path | str) -> SafetensorsHeader:
    """Read and validate a safetensors header without reading any tensor data."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        refuse_pickle(path, head)
        if size == 0:
            raise NotSafetensorsError(f"{path}: the file is empty (0 bytes)")
        if size < 8:
            raise NotSafetensorsError(f"{path}: {size} bytes is too short for a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length == 0 or length > MAX_HEADER_BYTES or 8 + length > size:
            raise NotSafetensorsError(
                f"{path}: not a safetensors file, or truncated: its header length field says {length} bytes "
                f"but the file holds {size} bytes"
            )
        raw = f.read(length)
    return _parse_header(path, raw, size, size - 8 - length)


def _parse_header(path: Path, raw: bytes, size: int, data_size: int) -> SafetensorsHeader:
    """Decode the JSON header and check every entry against the data section's size."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, too-long ints, deep nesting
        raise NotSafetensorsError(f"{path}: not a safetensors file: its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise NotSafetensorsError(f"{path}: not a safetensors file: its header is not a JSON object")
    metadata = _metadata(path, header.pop("__metadata__", None) or {})
    tensors = {name: _entry(path, name, value) for name, value in header.items()}
    _check_layout(path, tensors, data_size)
    return SafetensorsHeader(tensors=tensors, metadata=metadata, size_bytes=size)


def _metadata(path: Path, raw: object) -> dict[str, str]:
    """The ``__metadata__`` table, which the format requires to map strings to strings."""
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
    ):
        raise NotSafetensorsError(
            f"{path}: malformed safetensors header: __metadata__ must map strings to strings"
        )
    return dict(raw)


def _entry(path: Path, name: str, value: object) -> TensorEntry:
    """Validate one tensor entry: known dtype, integer shape, offsets spanning exactly its bytes."""
    bad = f"{path}: malformed safetensors header entry {name!r}"
    if not isinstance(value, dict):
        raise NotSafetensorsError(f"{bad}: not an object")
    dtype, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise NotSafetensorsError(f"{bad}: unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise NotSafetensorsError(f"{bad}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise NotSafetensorsError(f"{bad}: data_offsets {offsets!r} are not two integers")
    start, end = offsets
    needed = math.prod(shape) * DTYPE_BYTES[dtype]
    if not 0 <= start <= end or end - start != needed:
        raise NotSafetensorsError(
            f"{bad}: shape {tuple(shape)} in {dtype} needs {needed} bytes but its offsets span {end - start}"
        )
    return TensorEntry(dtype=dtype, shape=tuple(shape), start=start, end=end)


def _check_layout(path: Path, tensors: Mapping[str, TensorEntry], data_size: int) -> None:
    """Tensors must tile the data section exactly: no gap, no overlap, nothing past the end."""
    position = 0
    for name, entry in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)):
        if entry.end > data_size:
            raise NotSafetensorsError(
                f"{path}: the file is truncated: tensor {name!r} ends at byte {entry.end} of the data "
                f"section but only {data_size} bytes of tensor data are present"
            )
        if entry.start != position:
            raise NotSafetensorsError(
                f"{path}: malformed safetensors file: tensor {name!r} does not start "
                f"where the previous one ends (byte {entry.start}, expected {position})"
            )
        position = entry.end
    if position != data_size:
        raise NotSafetensorsError(
            f"{path}: malformed safetensors file: {data_size - position} bytes after the last tensor"
        )


def read_tensors(path: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Validate the header, then load every tensor on the CPU (file order) and the metadata."""
    path = Path(path)
    header = read_header(path)
    try:
        loaded = safetensors.torch.load_file(str(path), device="cpu")
    except (safetensors.SafetensorError, OSError, RuntimeError) as e:
        raise NotSafetensorsError(f"{path}: could not read tensor data: {e}") from None
    return {name: loaded[name] for name in header.tensors}, header.metadata


def check_finite(tensors: Mapping[str, torch.Tensor]) -> None:
    """Raise NonFiniteWeightsError naming the first floating tensor that holds NaN or Inf."""
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            continue
        if tensor.element_size() == 1:  # torch has no isfinite/isnan for float8 types
            tensor = tensor.float()
        if not bool(torch.isfinite(tensor).all()):
            kind = "NaN" if bool(torch.isnan(tensor).any()) else "infinite"
            count = int((~torch.isfinite(tensor)).sum())
            raise NonFiniteWeightsError(f"tensor {name!r} holds {count} {kind} value(s)")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` on a temporary file beside ``path`` and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Atomically save contiguous, unshared CPU copies of ``tensors`` with string ``metadata``."""
    owned = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    atomic_write(path, lambda tmp: safetensors.torch.save_file(owned, str(tmp), metadata=dict(metadata)))
