"""Checkpoint files: atomic, pruned, newest readable one wins, nothing unpickled."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipelines.training.checkpoint import (
    list_checkpoints,
    load_latest,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def test_save_prune_and_load_latest(tmp_path: Path) -> None:
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step))}, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 6]
    latest = load_latest(tmp_path)
    assert latest is not None and latest["step"] == 6 and latest["w"].tolist() == [6.0, 6.0]
    assert not list(tmp_path.glob("*.tmp"))


def test_torn_newest_file_falls_back_to_the_previous(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 2, {"w": torch.zeros(1)}, keep=3)
    path = save_checkpoint(tmp_path, 4, {"w": torch.ones(1)}, keep=3)
    path.write_bytes(path.read_bytes()[:20])
    latest = load_latest(tmp_path)
    assert latest is not None and latest["step"] == 2


def test_only_garbage_raises_and_empty_is_none(tmp_path: Path) -> None:
    assert load_latest(tmp_path / "none") is None
    (tmp_path / "step_000002.pt").write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="no readable checkpoint"):
        load_latest(tmp_path)


def test_rng_state_round_trip() -> None:
    state = rng_state()
    a = torch.rand(3)
    set_rng_state(state)
    assert torch.equal(torch.rand(3), a)
