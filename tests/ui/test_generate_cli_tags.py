"""``studio generate`` with A1111 ``<lora:name:w>`` tags in ``--prompt``: they name catalog LoRAs (as in the
Create tab's prompt box), and a recipe made in the studio (``sha256:`` references) replays from the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.pngmeta import read_recipe, read_text_chunks
from studio.cli import main as cli


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_prompt_tags_name_catalog_loras_and_catalog_recipes_replay(
    studio_model: str, lora_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ["--data-dir", str(tmp_path / "data")]
    assert cli(["import", str(lora_files["Alpha Stars"]), "--embedder", "hashing", "--no-embed", *data]) == 0
    run = ["generate", "--model", studio_model, "--steps", "2", "--size", "32x32", "--seed", "1", *data]
    run += ["--device", "cpu"]
    first = tmp_path / "tagged.png"
    assert cli([*run, "--prompt", "a zq star <lora:alpha_stars:0.8>", "--out", str(first)]) == 0
    recipe = read_recipe(first)
    assert recipe.prompt == "a zq star" and recipe.fusion == "linear"
    assert [(a.name, a.weight * a.te, a.weight * a.unet) for a in recipe.adapters] == [
        ("Alpha Stars", 0.8, 0.8)
    ]
    assert recipe.adapters[0].ref.startswith("sha256:")
    assert read_text_chunks(first)["parameters"].splitlines()[0] == "a zq star <lora:alpha_stars:0.8>"
    plain = tmp_path / "plain.png"
    assert cli([*run, "--prompt", "a zq star", "--out", str(plain)]) == 0
    assert not np.array_equal(_pixels(first), _pixels(plain))  # the tag's LoRA was applied

    again = tmp_path / "again.png"  # a recipe of catalog adapters replays through the catalog
    assert cli(["generate", "--recipe", str(first), "--device", "cpu", *data, "--out", str(again)]) == 0
    assert np.array_equal(_pixels(first), _pixels(again))

    ramp = tmp_path / "ramp.png"
    assert cli([*run, "--prompt", "a zq star <lora:Alpha Stars:0@0,1@1>", "--out", str(ramp)]) == 0
    keyed = read_recipe(ramp)
    assert keyed.fusion == "schedule" and keyed.fusion_args["schedule"] == ["0@0,1@1"]
    assert keyed.adapters[0].weight == 1.0

    capsys.readouterr()
    assert cli([*run, "--prompt", "a star <lora:nope:1>", "--out", str(tmp_path / "x.png")]) == 2
    assert "no adapter 'nope'" in capsys.readouterr().err
    code = cli([*run, "--prompt", "a <lora:Alpha Stars:0@0,1@1>", "--fusion", "klora", "--out", str(ramp)])
    assert code == 2 and "schedule policy" in capsys.readouterr().err
