"""Test data for the studio UI: LoRAs made for whatever base model the tests run on, a populated
catalog, and pictures to train on."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image

import adapters_db
from pipelines.engine import model_modules
from pipelines.lora_formats import save_kohya
from pipelines.lora_weights import LoraLayer, LoraWeights
from pipelines.models import POCKET_DIR
from pipelines.pocket import world


def base_model_dir(tiny_dir: Path) -> str:
    """``$STUDIO_TEST_MODEL`` if set, else the pocket model when its weights exist, else the tiny test
    pipeline folder."""
    if os.environ.get("STUDIO_TEST_MODEL"):
        return os.environ["STUDIO_TEST_MODEL"]
    return "pocket" if (POCKET_DIR / "model_index.json").is_file() else str(tiny_dir)


def model_folder(model: str) -> Path:
    """The diffusers folder of a model id used by the tests."""
    return POCKET_DIR if model == "pocket" else Path(model)


@dataclass(frozen=True)
class LoraFixture:
    """One LoRA file the tests import, with the metadata it carries."""

    name: str
    trigger: str
    tags: str
    seed: int
    negate: str | None = None  # the name of a LoRA whose exact opposite this one is
    nsfw: int = 0
    preview_prompt: str | None = None


LORAS = (
    LoraFixture("Alpha Stars", "zq star", "star, shape", 1, preview_prompt="a zq star on grass"),
    LoraFixture("Beta Waves", "vx wave", "texture, waves", 2),
    LoraFixture("Gamma Counter", "kt anti", "experiment", 1, negate="Alpha Stars"),
    LoraFixture("Delta Secret", "nsfw thing", "secret", 3, nsfw=2),
)


def attention_layers(model_dir: Path) -> dict[str, torch.Size]:
    """Shapes of the UNet attention projections of a pipeline folder."""
    pipe = DiffusionPipeline.from_pretrained(model_dir)
    return {
        p: m.weight.shape
        for p, m in model_modules(pipe).items()
        if p.startswith("unet.") and ".attn" in p and isinstance(m, torch.nn.Linear)
    }


def lora_weights(shapes: dict[str, torch.Size], seed: int, rank: int = 4, std: float = 0.35) -> LoraWeights:
    """A random LoRA on every given layer (strong enough to change the picture)."""
    g = torch.Generator().manual_seed(seed)
    layers = {
        p: LoraLayer(
            torch.randn(rank, s[1], generator=g) * std,
            torch.randn(s[0], rank, generator=g) * std,
            float(rank),
        )
        for p, s in shapes.items()
    }
    return LoraWeights(layers, "unknown")


def write_loras(folder: Path, model_dir: Path) -> dict[str, Path]:
    """The LoRA files of :data:`LORAS` (kohya format, metadata in the header), previews beside them."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes = attention_layers(model_dir)
    made: dict[str, LoraWeights] = {}
    paths = {}
    for fx in LORAS:
        weights = lora_weights(shapes, fx.seed)
        if fx.negate:
            src = made[fx.negate]
            weights = LoraWeights(
                {p: LoraLayer(x.down, -x.up, x.alpha) for p, x in src.layers.items()}, "unknown"
            )
        made[fx.name] = weights
        stem = fx.name.lower().replace(" ", "_")
        path = folder / f"{stem}.safetensors"
        meta = {
            "modelspec.title": fx.name,
            "modelspec.trigger_phrase": fx.trigger,
            "modelspec.tags": fx.tags,
            "ss_tag_frequency": json.dumps({"data": {fx.trigger: 5, "outdoors": 3}}),
        }
        save_kohya(weights, path, meta)
        if fx.preview_prompt:
            picture = world.render(world.sample_scene(np.random.default_rng(fx.seed)))
            from PIL import PngImagePlugin

            info = PngImagePlugin.PngInfo()
            info.add_text(
                "parameters",
                f"{fx.preview_prompt}\nNegative prompt: blurry\nSteps: 12, Sampler: "
                "Euler, CFG scale: 5, Seed: 7, Size: 64x64",
            )
            picture.save(folder / f"{stem}.preview.png", pnginfo=info)
        paths[fx.name] = path
    return paths


def populate_catalog(catalog: adapters_db.Catalog, loras: dict[str, Path]) -> dict[str, int]:
    """Import the fixture LoRAs (with their previews) into a catalog; returns name → adapter id."""
    ids = {}
    by_name = {fx.name: fx for fx in LORAS}
    for name, path in loras.items():
        with catalog.session() as session:
            from adapters_db.importers.sidecars import find_sidecars

            result = adapters_db.import_file(
                session, catalog, path, sidecars=find_sidecars(path), nsfw_level=by_name[name].nsfw
            )
        assert result.ok, result.message
        ids[name] = int(result.adapter_id)
    with catalog.session() as session:
        adapters_db.embed_missing(catalog, session=session)
    return ids


def training_pictures(folder: Path, n: int = 5, seed: int = 0) -> list[Path]:
    """``n`` small pocket-world pictures of a circle."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        scene = world.sample_scene(rng, objects=("circle",), size="big")
        path = folder / f"pic_{i}.png"
        world.render(scene).save(path)
        out.append(path)
    return out


def pixels(path: str | Path) -> np.ndarray:
    """An image file as an RGB array."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()
