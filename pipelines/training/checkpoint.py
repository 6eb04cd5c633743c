"""Training checkpoints: LoRA tensors, optimiser, LR schedule, RNG state and step, written atomically.

Files are ``step_000100.pt`` in one folder, read back with ``torch.load(weights_only=True)`` (tensors
and plain containers only; nothing is unpickled). The newest readable file wins; a torn write never
replaces a good checkpoint because every write goes through a temporary file and a rename.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

_NAME = re.compile(r"^step_(\d{6,})\.pt$")


def checkpoint_path(folder: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives."""
    return folder / f"step_{step:06d}.pt"


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint in the folder, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def save_checkpoint(folder: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` for ``step`` (temp file + fsync + rename), then keep only the newest ``keep``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(folder, step)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        torch.save({**state, "step": step}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    for _, old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_latest(folder: Path) -> dict[str, Any] | None:
    """The newest checkpoint that loads, or None when there is none."""
    last_error: Exception | None = None
    for _, path in reversed(list_checkpoints(folder)):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as exc:  # unreadable: try older
            last_error = exc
    if last_error is not None:
        raise RuntimeError(f"no readable checkpoint in {folder}: {last_error}")
    return None


def rng_state() -> dict[str, Any]:
    """The global torch RNG states (CPU and every CUDA device)."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
