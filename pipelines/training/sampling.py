"""Pictures made during training: fixed-seed samples, DreamBooth class images, the loss curve."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

Pipeline = object  # any diffusers text-to-image pipeline (StableDiffusion[XL]Pipeline)


def _render(
    pipe: Pipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    size: tuple[int, int],
    steps: int,
    guidance: float,
) -> list[Image.Image]:
    """One pipeline call; the global RNG is left exactly as it was."""
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    with torch.random.fork_rng(devices=[]):
        out = pipe(
            prompt=list(prompts),
            generator=gens,
            height=size[0],
            width=size[1],  # type: ignore[operator]
            num_inference_steps=steps,
            guidance_scale=guidance,
            output_type="pil",
        )
    return list(out.images)


def _in_eval(models: Sequence[torch.nn.Module]) -> list[bool]:
    """Put models in eval mode; returns their previous training flags."""
    flags = [m.training for m in models]
    for m in models:
        m.eval()
    return flags


def render_samples(
    pipe: Pipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    size: tuple[int, int],
    folder: Path,
    step: int,
    steps: int = 20,
    guidance: float = 7.5,
) -> list[Path]:
    """Every prompt × seed at this training step, saved as ``step_000100_<k>.png``."""
    pairs = [(p, s) for p in prompts for s in seeds]
    models = [m for m in (getattr(pipe, "unet", None), getattr(pipe, "text_encoder", None)) if m is not None]
    flags = _in_eval(models)
    try:
        images = _render(pipe, [p for p, _ in pairs], [s for _, s in pairs], size, steps, guidance)
    finally:
        for m, flag in zip(models, flags, strict=True):
            m.train(flag)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, img in enumerate(images):
        paths.append(folder / f"step_{step:06d}_{k}.png")
        img.save(paths[-1])
    return paths


def generate_class_images(
    pipe: Pipeline,
    prompts: Sequence[str],
    size: tuple[int, int],
    folder: Path,
    seed: int,
    steps: int = 25,
    guidance: float = 7.5,
    batch: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """DreamBooth's prior-preservation pictures, one per prompt, from the base model (kept per folder).

    ``prompts.json`` in the folder records what each picture shows; a picture made for another prompt,
    size, seed or step count is made again.
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"class_{i:04d}.png" for i in range(len(prompts))]
    manifest = folder / "prompts.json"
    settings = {"size": list(size), "seed": seed, "steps": steps, "guidance": guidance}
    old = _read_manifest(manifest)
    done = old.get("prompts", []) if {k: old.get(k) for k in settings} == settings else []
    todo = [i for i, p in enumerate(paths) if not (p.exists() and i < len(done) and done[i] == prompts[i])]
    for i in todo:
        paths[i].unlink(missing_ok=True)
    stale = set(todo)
    kept = [None if i in stale else q for i, q in enumerate(prompts)]
    _write_manifest(manifest, {**settings, "prompts": kept})
    for k in range(0, len(todo), batch):
        chunk = todo[k : k + batch]
        seeds = [seed * 7919 + i for i in chunk]
        images = _render(pipe, [prompts[i] for i in chunk], seeds, size, steps, guidance)
        for i, img in zip(chunk, images, strict=True):
            tmp = paths[i].with_suffix(".tmp.png")
            img.save(tmp)
            tmp.replace(paths[i])
        kept = [prompts[i] if i in chunk else q for i, q in enumerate(kept)]
        _write_manifest(manifest, {**settings, "prompts": kept})
        if progress is not None:
            progress(min(k + batch, len(todo)), len(todo))
    return paths


def _read_manifest(path: Path) -> dict:
    """What ``prompts.json`` says (empty when missing or unreadable: everything is made again)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_manifest(path: Path, data: dict) -> None:
    """Write ``prompts.json`` atomically (temp file + rename)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def write_loss_curve(losses: Sequence[float], path: Path, title: str = "training loss") -> Path:
    """Loss per step with its exponential moving average, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ema, smooth = losses[0] if losses else 0.0, []
    for v in losses:
        ema = 0.95 * ema + 0.05 * v
        smooth.append(ema)
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.plot(range(1, len(losses) + 1), losses, lw=0.6, alpha=0.4, label="loss")
    ax.plot(range(1, len(losses) + 1), smooth, lw=1.6, label="moving average")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend(loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
