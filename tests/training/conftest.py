"""Fixtures for the training tests: a small folder of pocket-world pictures and a fast spec."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipelines.pocket import world
from pipelines.training import TrainSpec

TRIGGER = "zq"


def write_concept_folder(folder: Path, n: int = 6, seed: int = 0, obj: str = "star") -> Path:
    """``n`` pocket pictures of ``obj`` with .txt captions naming it by the trigger, plus one wide crop."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        scene = world.sample_scene(rng, objects=(obj,), size="big")
        world.render(scene).save(folder / f"img_{i:02d}.png")
        (folder / f"img_{i:02d}.txt").write_text(scene.caption().replace(obj, TRIGGER))
    wide = world.render(world.sample_scene(rng, objects=(obj,), size="big")).crop((0, 12, 64, 52))
    wide.save(folder / "wide.png")  # 64×40, no caption: gets the template and its own bucket
    return folder


@pytest.fixture(scope="session")
def concept_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of 7 star pictures (one of them wide) with captions for 6."""
    return write_concept_folder(tmp_path_factory.mktemp("concept") / "star")


def fast_spec(**overrides: Any) -> TrainSpec:
    """A spec that trains the tiny pipeline in about a second."""
    base = TrainSpec(trigger=TRIGGER, rank=4, steps=4, learning_rate=1e-3, resolution=32, checkpoint_every=2,
                     sample_every=0, sample_steps=2, sample_seeds=(1,), sample_guidance=3.0)
    return replace(base, **overrides)
