"""Does a LoRA trained with defaults teach the pocket model a new concept without breaking the old ones?

    python benchmarks/train_quality.py                      # star, defaults, 20 pictures
    python benchmarks/train_quality.py --concept heart --images 20 --n 200
    python benchmarks/train_quality.py --orthogonal         # + star & heart merged: orthogonal vs plain

1. Render ~20 procedural pictures of a LoRA-only concept (``star`` by default) with captions that
   name it by a new trigger word, and train a LoRA on the pocket model with ``TrainSpec`` defaults.
2. Concept rate: pictures from prompts with the trigger (random colours, backgrounds, sizes) in which
   the pocket classifier sees the concept. Target ≥ 80 %.
3. Knowledge preservation (as CAT measures it): per-attribute classifier accuracy of base prompts
   (no trigger) with the LoRA loaded against the same prompts and seeds without it. Target: every
   attribute within 5 points.
4. ``--orthogonal``: train star and heart twice (plain, and Orthogonal Adaptation with disjoint
   bases), load both at weight 1, and measure each concept's rate under its own trigger: how much
   the merge interferes, measured rather than assumed.

Needs the pocket model (``pipelines/pocket/weights``) and its classifier
(``pipelines/pocket/weights/classifier.safetensors``). ``--model``/``--classifier`` point elsewhere.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.pocket import classifier as judge  # noqa: E402
from pipelines.pocket import world  # noqa: E402

BASE_ATTRIBUTES = ("object", "color", "background", "size")


def concept_folder(folder: Path, concept: str, trigger: str, n: int, seed: int) -> Path:
    """``n`` pictures of a LoRA-only object with captions that call it ``trigger``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        scene = world.sample_scene(rng, objects=(concept,))
        world.render(scene).save(folder / f"{concept}_{i:03d}.png")
        (folder / f"{concept}_{i:03d}.txt").write_text(scene.caption().replace(concept, trigger))
    return folder


def prompts(
    n: int, seed: int, objects: Sequence[str], rename: dict[str, str] | None = None
) -> tuple[list[str], list[world.Scene]]:
    """``n`` random scenes over ``objects`` and their captions (objects renamed to trigger words)."""
    rng = np.random.default_rng(seed)
    scenes = [world.sample_scene(rng, objects=tuple(objects)) for _ in range(n)]
    caps = [s.caption() for s in scenes]
    for old, new in (rename or {}).items():
        caps = [c.replace(f" {old} ", f" {new} ") for c in caps]
    return caps, scenes


@torch.no_grad()
def generate(
    pipe: Any, captions: Sequence[str], seed: int, steps: int, guidance: float, batch: int = 50
) -> np.ndarray:
    """uint8 N×H×W×3 pictures, one fixed seed per prompt index."""
    out = []
    for k in range(0, len(captions), batch):
        chunk = list(captions[k : k + batch])
        gens = [torch.Generator("cpu").manual_seed(seed * 100_003 + k + i) for i in range(len(chunk))]
        imgs = pipe(
            prompt=chunk, generator=gens, num_inference_steps=steps, guidance_scale=guidance, output_type="np"
        ).images
        out.append((np.clip(imgs, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)


def accuracy(model: Any, images: np.ndarray, scenes: Sequence[world.Scene]) -> dict[str, float]:
    """Per-attribute classifier accuracy against the scenes the prompts described."""
    pred = judge.predict(model, images)
    return {
        a: float(np.mean([p == getattr(s, a) for p, s in zip(pred[a], scenes, strict=True)]))
        for a in BASE_ATTRIBUTES
    }


def concept_rate(model: Any, images: np.ndarray, concept: str) -> float:
    """Fraction of pictures in which the classifier sees ``concept``."""
    return float(np.mean([p == concept for p in judge.predict(model, images)["object"]]))


def evaluate(
    pipe: Any,
    lora: Path | None,
    trigger: str,
    concept: str,
    model: Any,
    *,
    n: int = 100,
    seed: int = 1,
    steps: int = 25,
    guidance: float = 5.0,
    base: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Concept rate under the trigger and base-prompt accuracy, with ``lora`` loaded (None: without)."""
    if lora is not None:
        pipe.load_lora_weights(str(lora), adapter_name="quality_eval")
    try:
        caps, _ = prompts(n, seed, (concept,), {concept: trigger})
        rate = concept_rate(model, generate(pipe, caps, seed, steps, guidance), concept)
        base_caps, base_scenes = prompts(n, seed + 1, world.BASE_OBJECTS)
        acc = accuracy(model, generate(pipe, base_caps, seed + 1, steps, guidance), base_scenes)
    finally:
        if lora is not None:
            pipe.delete_adapters("quality_eval")
    result: dict[str, Any] = {"concept_rate": rate, "base_accuracy": acc}
    if base is not None:
        result["accuracy_drop_points"] = {a: 100 * (base[a] - acc[a]) for a in BASE_ATTRIBUTES}
    return result


def train(pipe: Any, folder: Path, out: Path, trigger: str, **options: Any) -> Path:
    """Train with the studio's defaults (plus ``options``); returns the kohya file."""
    from pipelines.training import TrainSpec, train_lora
    from pipelines.training.orthogonal import BasisRegistry

    spec = TrainSpec(trigger=trigger, **options)
    registry = BasisRegistry(out.parent / "basis.json")
    t0 = time.time()
    result = train_lora(
        spec,
        pipe,
        folder,
        out,
        work_dir=out.with_suffix(".work"),
        basis=lambda family: registry.allocate(family, out.stem, spec.rank),
        progress=_progress(out.stem),
    )
    print(
        f"\n  trained {out.name}: {result.steps} steps in {time.time() - t0:.0f} s, "
        f"final loss {result.losses[-1]:.4f}",
        flush=True,
    )
    return result.kohya_path


def _progress(name: str) -> Any:
    """A one-line progress printer."""

    def show(p: Any) -> None:
        if p.phase == "training" and (p.step % 50 == 0 or p.step == p.total):
            eta = p.eta_s or 0.0
            line = f"\r  {name}: step {p.step}/{p.total} loss {p.loss:.4f} eta {eta:.0f} s"
            print(line, end="", flush=True)

    return show


def merged_rates(
    pipe: Any,
    loras: dict[str, Path],
    triggers: dict[str, str],
    model: Any,
    n: int,
    seed: int,
    steps: int,
    guidance: float,
) -> dict[str, float]:
    """Each concept's rate under its trigger with every LoRA loaded at weight 1 (a plain sum)."""
    names = []
    for concept, path in loras.items():
        pipe.load_lora_weights(str(path), adapter_name=concept)
        names.append(concept)
    pipe.set_adapters(names, [1.0] * len(names))
    try:
        rates = {}
        for concept in loras:
            caps, _ = prompts(n, seed, (concept,), {concept: triggers[concept]})
            rates[concept] = concept_rate(model, generate(pipe, caps, seed, steps, guidance), concept)
    finally:
        pipe.delete_adapters(names)
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pocket")
    ap.add_argument(
        "--classifier",
        type=Path,
        default=ROOT / "pipelines" / "pocket" / "weights" / "classifier.safetensors",
    )
    ap.add_argument("--concept", default="star", choices=world.LORA_OBJECTS)
    ap.add_argument("--trigger", default="zqx")
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--n", type=int, default=100, help="prompts per measurement")
    ap.add_argument("--steps", type=int, default=25, help="denoising steps per picture")
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--orthogonal", action="store_true", help="also measure merge interference")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="OPTION=VALUE",
        help="a training option other than its default (value as JSON), e.g. --set rank=8",
    )
    ap.add_argument(
        "--prior-base",
        type=int,
        default=0,
        metavar="N",
        help="prior prompts: N captions of base scenes (the model's own domain)",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, help="write the numbers here")
    ap.add_argument("--keep", type=Path, metavar="FILE", help="keep the trained LoRA (kohya) here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from pipelines.training import load_base_pipeline

    pipe, model = load_base_pipeline(args.model), judge.load(args.classifier)
    kw = {"n": args.n, "steps": args.steps, "guidance": args.guidance}
    report: dict[str, Any] = {
        "options": options(args.set),
        "base": evaluate(pipe, None, args.trigger, args.concept, model, **kw),
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = concept_folder(Path(tmp) / args.concept, args.concept, args.trigger, args.images, 0)
        out = Path(tmp) / f"{args.concept}.safetensors"
        extra = {"prior_prompts": world.base_captions(args.prior_base, 99)} if args.prior_base else {}
        lora = train(pipe, folder, out, args.trigger, **options(args.set), **extra)
        if args.keep:
            args.keep.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(lora, args.keep)
        report["lora"] = evaluate(
            pipe, lora, args.trigger, args.concept, model, base=report["base"]["base_accuracy"], **kw
        )
        if args.orthogonal:
            report["merge"] = merge_study(pipe, model, Path(tmp), args, kw)
    print_report(report, args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


def options(pairs: Sequence[str]) -> dict[str, Any]:
    """``OPTION=VALUE`` pairs (VALUE as JSON, else a string) as TrainSpec keyword arguments."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set wants OPTION=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def merge_study(pipe: Any, model: Any, tmp: Path, args: argparse.Namespace, kw: dict) -> dict[str, Any]:
    """Star + heart merged by summation, trained plainly and orthogonally."""
    from pipelines import lora_formats
    from pipelines.training.orthogonal import subspace_overlap

    triggers = {"star": "zqs", "heart": "zqh"}
    out: dict[str, Any] = {}
    for mode, options in (("plain", {}), ("orthogonal", {"orthogonal": True})):
        loras = {}
        for concept, trig in triggers.items():
            folder = concept_folder(tmp / f"{mode}-{concept}", concept, trig, args.images, 7)
            loras[concept] = train(pipe, folder, tmp / mode / f"{concept}.safetensors", trig, **options)
        alone = {c: evaluate(pipe, p, triggers[c], c, model, **kw)["concept_rate"] for c, p in loras.items()}
        merged = merged_rates(pipe, loras, triggers, model, args.n, 1, args.steps, args.guidance)
        a, b = (lora_formats.load(p) for p in loras.values())
        overlap = float(np.mean([subspace_overlap(a.layers[k].down, b.layers[k].down) for k in a.layers]))
        out[mode] = {"alone": alone, "merged": merged, "mean_down_overlap": overlap}
    return out


def print_report(r: dict[str, Any], args: argparse.Namespace) -> None:
    """Human-readable summary with the targets."""
    rate, base_rate = r["lora"]["concept_rate"], r["base"]["concept_rate"]
    print(
        f"\nconcept '{args.concept}' under trigger '{args.trigger}': {100 * rate:.1f} % with the LoRA "
        f"({100 * base_rate:.1f} % without); target ≥ 80 % → {'PASS' if rate >= 0.8 else 'FAIL'}"
    )
    drops = r["lora"]["accuracy_drop_points"]
    for a in BASE_ATTRIBUTES:
        print(
            f"  base prompts, {a:<10}: {100 * r['base']['base_accuracy'][a]:5.1f} % → "
            f"{100 * r['lora']['base_accuracy'][a]:5.1f} %  (drop {drops[a]:+.1f} points)"
        )
    worst = max(drops.values())
    verdict = "PASS" if worst <= 5 else "FAIL"
    print(f"knowledge preservation: worst drop {worst:+.1f} points; target ≤ 5 → {verdict}")
    for mode, m in r.get("merge", {}).items():
        print(
            f"merge ({mode}): alone {m['alone']}, merged {m['merged']}, "
            f"mean A-overlap {m['mean_down_overlap']:.3f}"
        )


if __name__ == "__main__":
    main()
