"""Prompt following of the pocket model, judged by the concept classifier."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.pocket import classifier as judge
from pipelines.pocket import world

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
CLASSIFIER_PATH = WEIGHTS_DIR / "classifier.safetensors"
LORA_DIR = WEIGHTS_DIR / "loras"


@dataclass(frozen=True)
class SampleConfig:
    """How pictures are sampled for an evaluation (the pocket model's defaults)."""

    steps: int = 25
    guidance: float = 5.0
    batch_size: int = 50


def fresh_scenes(n: int, seed: int, **kwargs: Any) -> list[world.Scene]:
    """``n`` fresh scenes (base concepts unless ``kwargs`` widen the sets)."""
    rng = np.random.default_rng(seed)
    return [world.sample_scene(rng, **kwargs) for _ in range(n)]


@torch.no_grad()
def sample(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    cfg: SampleConfig,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """uint8 N×H×W×3 pictures for prompts, one CPU generator per picture (batched)."""
    out = []
    for i in range(0, len(prompts), cfg.batch_size):
        chunk = list(prompts[i : i + cfg.batch_size])
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i : i + cfg.batch_size]]
        images = pipe(
            chunk,
            num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance,
            generator=gens,
            output_type="np",
        ).images
        out.append((images * 255).round().clip(0, 255).astype(np.uint8))
        if progress is not None:
            progress(min(i + cfg.batch_size, len(prompts)), len(prompts))
    return np.concatenate(out)


def attribute_rates(
    pred: dict[str, list[str]],
    scenes: Sequence[world.Scene],
    attrs: Sequence[str] = ("object", "color", "background"),
) -> dict[str, float]:
    """Share of pictures whose judged attribute matches the scene, per attribute and all together."""
    hits = {a: np.array([p == getattr(s, a) for p, s in zip(pred[a], scenes, strict=True)]) for a in attrs}
    rates = {f"{a}_acc": float(h.mean()) for a, h in hits.items()}
    rates["all_acc"] = float(np.logical_and.reduce(list(hits.values())).mean())
    return rates


def evaluate_base(
    pipe: Any,
    model: judge.ConceptClassifier,
    n: int = 200,
    seed: int = 2024,
    cfg: SampleConfig = SampleConfig(),
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """Object/colour/background accuracy on ``n`` fresh captions of base concepts."""
    scenes = fresh_scenes(n, seed)
    prompts = [s.caption() for s in scenes]
    images = sample(pipe, prompts, [seed * 1000 + i for i in range(n)], cfg, progress)
    return attribute_rates(judge.predict(model, images), scenes)


def concept_of(trigger: str) -> tuple[str, str]:
    """(attribute, value) that a LoRA-only concept's trigger word names, e.g. ``star`` → (object, star)."""
    for attr in ("object", "style", "palette"):
        if trigger in world.ATTRIBUTES[attr]:
            return attr, trigger
    raise ValueError(f"{trigger!r} is not a pocket-world concept")


def concept_scenes(trigger: str, n: int, seed: int) -> list[world.Scene]:
    """Fresh scenes showing a LoRA-only concept (other attributes from the base sets)."""
    attr, value = concept_of(trigger)
    return fresh_scenes(n, seed, **{attr: value})


def evaluate_concept(
    pipe: Any,
    model: judge.ConceptClassifier,
    trigger: str,
    n: int = 50,
    seed: int = 77,
    cfg: SampleConfig = SampleConfig(),
    progress: Callable[[int, int], None] | None = None,
) -> float:
    """Rate at which the judge sees ``trigger``'s concept in pictures prompted with it."""
    attr, value = concept_of(trigger)
    scenes = concept_scenes(trigger, n, seed)
    seeds = [seed * 1000 + i for i in range(n)]
    images = sample(pipe, [s.caption() for s in scenes], seeds, cfg, progress)
    return float(np.mean([p == value for p in judge.predict(model, images)[attr]]))


def bundled_loras(folder: Path = LORA_DIR) -> list[Path]:
    """The concept LoRAs shipped with the pocket model."""
    return sorted(folder.glob("*.safetensors")) if folder.is_dir() else []


def lora_concept_rates(
    pipe: Any,
    model: judge.ConceptClassifier,
    n: int = 50,
    seed: int = 77,
    cfg: SampleConfig = SampleConfig(),
    folder: Path = LORA_DIR,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """For each bundled concept LoRA alone (weight 1): how often its concept appears when triggered;
    ``progress(done, total)`` counts pictures over all the LoRAs."""
    from pipelines import lora_formats
    from pipelines.engine import attach
    from pipelines.fusion import AdapterInfo, make_policy

    rates = {}
    paths = bundled_loras(folder)
    for k, path in enumerate(paths):
        info = lora_formats.inspect(path)
        trigger = info.trigger_words[0]
        weights = lora_formats.load(path)

        def step(done: int, _: int, k: int = k) -> None:
            if progress is not None:
                progress(k * n + done, n * len(paths))

        with attach(pipe, [(AdapterInfo(path.stem), weights)], make_policy("linear"), family="pocket"):
            rates[trigger] = evaluate_concept(pipe, model, trigger, n=n, seed=seed, cfg=cfg, progress=step)
    return rates
