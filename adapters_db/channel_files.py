"""Files of the learned search channels (prompt classifier, prompt ↔ metadata matcher): one safetensors
file each, tagged with its format in the header, written atomically, read without unpickling anything."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save_tagged(path: Path, tensors: dict[str, np.ndarray], fmt: str, metadata: dict[str, str]) -> Path:
    """Write ``tensors`` as one safetensors file whose header says ``format = fmt`` (plus ``metadata``),
    atomically (temp file, then rename)."""
    from safetensors.numpy import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": fmt, **metadata})
    tmp.replace(path)
    return path


def load_tagged(path: Path, fmt: str, what: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Arrays and header metadata of a :func:`save_tagged` file; ``ValueError`` ("not a ``what``") when
    its header does not say ``fmt``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as fh:
        meta = fh.metadata() or {}
        if meta.get("format") != fmt:
            raise ValueError(f"{path}: not a {what}")
        arrays = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    return arrays, meta
