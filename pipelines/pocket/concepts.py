"""The pocket world's LoRA-only concepts, trained as adapters with the studio's own trainer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.pocket import world

# trigger word → the attribute it pins; the other attributes come from the base sets
CONCEPTS: dict[str, dict[str, str]] = {
    "star": {"object": "star"},
    "heart": {"object": "heart"},
    "striped": {"style": "striped"},
    "outline": {"style": "outline"},
    "neon": {"palette": "neon"},
}
DESCRIPTIONS: dict[str, str] = {
    "star": "Draws five-pointed stars, in any colour, size and background the prompt asks for.",
    "heart": "Draws hearts, in any colour, size and background the prompt asks for.",
    "striped": "A style: fills shapes with diagonal stripes, keeping the shape's colour on the outline.",
    "outline": "A style: draws shapes as thin outlines with no fill.",
    "neon": "A palette: saturated neon colours with a soft glow around the shape.",
}
DATASET_SIZE = 96  # pictures per concept LoRA
# Per-concept changes: outline is drawn in ≥ 80 % of pictures by a lighter LoRA (attention layers only,
# 24 pictures). The looks that are a texture or a glow (striped, neon) need a higher rate and the pocket
# family's distilled prior (each picture's caption without the trigger, drawn and predicted by the
# untouched model, weight 3), which keeps the base model's sizes, colours and backgrounds while the
# LoRA learns the look. Rates on 200 pictures. Striped at rank 8, lr 2e-3, 4500 steps with the prior:
# 100 %; without it: rank 8 at lr 1e-3 60 %, rank 16 69 % (at lr 2e-3 74 %), rank 32 at lr 2e-3 81 %;
# 384 pictures instead of 96 62 %; without min-SNR weighting 70 %. Neon at lr 2e-3, 3000 steps with the
# prior: rank 8 86 %, rank 16 84.5 %; without it: rank 8 at lr 1e-3 74.5 %, rank 16 79.5 %, rank 32 79 %
# (it failed on black backgrounds, 43 %; half the pictures on black, a quarter here, gave 72 %).
TUNED: dict[str, dict[str, Any]] = {
    "outline": {
        "targets": "attn",
        "steps": 600,
        "learning_rate": 4e-4,
        "train_text_encoder": False,
        "checkpoint_every": 200,
        "dataset_size": 24,
    },
    "striped": {"steps": 4500, "learning_rate": 2e-3, "prior_preservation": True},
    "neon": {"steps": 3000, "learning_rate": 2e-3, "prior_preservation": True},
}
KINDS: dict[str, str] = {
    "star": "object",
    "heart": "object",
    "striped": "style",
    "outline": "style",
    "neon": "palette",
}


def concept_scenes(trigger: str, n: int, seed: int) -> list[world.Scene]:
    """``n`` scenes of a concept over the base objects, colours, backgrounds and sizes."""
    rng = np.random.default_rng(seed)
    return [world.sample_scene(rng, **CONCEPTS[trigger]) for _ in range(n)]


def write_dataset(trigger: str, folder: Path, n: int = 24, seed: int = 0) -> Path:
    """Pictures of a concept with kohya-style ``.txt`` captions beside them."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(concept_scenes(trigger, n, seed)):
        world.render(scene).save(folder / f"{trigger}_{i:03d}.png")
        (folder / f"{trigger}_{i:03d}.txt").write_text(scene.caption(with_size=i % 4 != 0))
    return folder


def concept_spec(trigger: str, **overrides: Any) -> Any:
    """Training options of a concept LoRA: rank 8 on every UNet layer kind (attention, MLP, convs) and
    the text encoder — attention-only LoRAs drew new objects in under 10 % of pictures. No prior
    preservation unless a recipe turns it on (striped, neon). Its options repeat the pocket family's
    values on purpose (class prompts from the pictures' captions without the trigger): like every other
    option they are pinned, so a later change of the family's defaults cannot change what
    ``pocket train --stage loras`` makes from these recipes."""
    from pipelines.training import TrainSpec

    spec = TrainSpec(
        trigger=trigger,
        name=f"pocket-{trigger}",
        caption_source="auto",
        rank=8,
        steps=1500,
        learning_rate=1e-3,
        targets="all",
        train_text_encoder=True,
        batch_size=4,
        lr_scheduler="cosine",
        lr_warmup_steps=30,
        sample_every=0,
        sample_prompts=(f"a big red {trigger} on a white background",)
        if KINDS[trigger] == "object"
        else (f"a big red {trigger} circle on a white background",),
        sample_steps=20,
        sample_guidance=5.0,
        checkpoint_every=500,
        seed=7,
        prior_preservation=False,
        num_class_images=100,
        prior_caption_dropout=0.2,
        prior_target="base",
        prior_loss_weight=3.0,
    )
    return replace(spec, **overrides)


def recipe(trigger: str, **overrides: Any) -> tuple[Any, int]:
    """(training options, number of pictures) of a bundled concept LoRA: :func:`concept_spec` with the
    concept's :data:`TUNED` changes, then ``overrides``."""
    tuned = dict(TUNED.get(trigger, {}))
    size = tuned.pop("dataset_size", DATASET_SIZE)
    return concept_spec(trigger, **{**tuned, **overrides}), size


def train_concept(
    trigger: str,
    pipe: Any,
    out: Path,
    work: Path,
    progress: Callable[[Any], None] | None = None,
    **overrides: Any,
) -> Any:
    """Train one concept LoRA on the pocket pipeline and write it (kohya) to ``out``."""
    from pipelines.training import train_lora

    spec, size = recipe(trigger, **overrides)
    data = write_dataset(trigger, work / "data" / trigger, n=size)
    return train_lora(
        spec,
        pipe,
        data,
        out,
        work_dir=work / "ckpt" / trigger,
        device="cpu",
        progress=progress,
        model_name="pocket",
    )
