"""Weight-space retrieval: can a LoRA with no text at all be found by a caption of what it draws?

    python benchmarks/weight_retrieval.py                     # pocket model, 85 LoRAs, 12 held out
    python benchmarks/weight_retrieval.py --limit 45          # the first round alone (33 to fit on)
    python benchmarks/weight_retrieval.py --quick             # tiny pipeline smoke check (minutes)
    python benchmarks/weight_retrieval.py --json              # one JSON object on stdout

1. Variants of the pocket world's LoRA-only concepts (star, heart, striped, outline, neon), each
   crossed with colour and background restrictions ("red star", "star on a black background",
   "purple star on a white background", "striped green shapes", …; 17 per concept, 85 in all): per
   variant, pictures of the world, and a rank-4 LoRA (attention layers, no text encoder, no prior)
   trained on them with the studio's own trainer (cached under ``--work``: an interrupted run resumes,
   a finished LoRA is never retrained). The training captions leave out the variant's pinned colour
   and background, so the trigger learns them: a "red star" LoRA draws red stars when asked for a
   star. (With them in every caption the base model already draws the colour, a variant's LoRA learns
   the same thing as the free one, and no retriever can tell them apart.)
2. Split train / held-out by ``--seed``. Fit the :class:`~pipelines.weightspace.WeightEncoder` on
   the training LoRAs against the offline text embedder's vectors of their captions (the variant's
   caption and some of its pictures' captions), symmetric InfoNCE. The encoder is saved to
   ``<work>/encoder`` (usable as a catalog's ``weight_encoder``).
3. Held-out LoRAs lose all text. Query = the variant's caption; candidates = all held-out LoRAs.
   Recall@1 / Recall@5 for: the learned encoder, the training-free SVD channel (label propagation
   from the training LoRAs' captions, arXiv 2412.05148), both averaged, and chance.
   Targets (issue 7): learned Recall@1 ≥ 0.6 and Recall@5 ≥ 0.9.

Pocket scale (measured on this 2-core box while another training job held one core): one 200-step
LoRA (rank 4, batch 4, 56 attention layers) takes ~28 s, the 85 LoRAs ~40 min. The encoder fits at ~9
steps/s on 73 LoRAs (1500 steps ≈ 3 min). Timings are printed (``train_s_per_lora``, ``encoder_fit_s``).
``--quick`` uses a freshly built tiny pipeline (random weights), 20 variants,
8 pictures at 32 px, 20 steps: a smoke check of the whole path, not a measurement of the method.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.pocket import world  # noqa: E402
from pipelines.pocket.concepts import CONCEPTS, KINDS  # noqa: E402
from pipelines.weightspace import (  # noqa: E402
    EncoderConfig,
    EncoderTrainConfig,
    encode_weights,
    propagate_labels,
    save_encoder,
    svd_features,
    train_encoder,
)
from pipelines.weightspace.svd import l2_rows  # noqa: E402

COLOURS = ("red", "green", "blue", "yellow")
BACKGROUNDS = ("black", "sky", "gray")
COMBO = ("purple", "white")
# the second round (appended, so the first 45 keep their seeds): the world's other two colours, its
# fourth background, and five more colour + background pairs
MORE_COLOURS = ("purple", "orange")
MORE_BACKGROUNDS = ("white",)
MORE_COMBOS = (("red", "black"), ("blue", "sky"), ("yellow", "gray"), ("green", "white"), ("orange", "black"))


@dataclass(frozen=True)
class Variant:
    """One LoRA to train: a concept, optionally pinned to a colour and/or a background."""

    concept: str
    color: str | None = None
    background: str | None = None

    @property
    def name(self) -> str:
        """File-system name, e.g. ``star-red-any``."""
        return f"{self.concept}-{self.color or 'any'}-{self.background or 'any'}"

    def caption(self) -> str:
        """What the LoRA draws, in the world's words: "a red star", "neon shapes on a sky background"."""
        colour = f"{self.color} " if self.color else ""
        if KINDS[self.concept] == "object":
            text = f"a {colour}{self.concept}"
        elif KINDS[self.concept] == "style":
            text = f"{colour}{self.concept} shapes"
        else:
            text = f"{self.concept} {colour}shapes"
        return text + (f" on a {self.background} background" if self.background else "")

    def pinned(self) -> dict[str, str]:
        """Attributes every picture of this variant has."""
        fixed = dict(CONCEPTS[self.concept])
        if self.color:
            fixed["color"] = self.color
        if self.background:
            fixed["background"] = self.background
        return fixed


def variants(limit: int | None = None, quick: bool = False) -> list[Variant]:
    """Per concept: free, four colours, three backgrounds, one colour+background (9 × 5 = 45), then per
    concept two more colours, one more background and five more pairs (8 × 5 = 40; ``limit=45`` is the
    first round alone); ``quick``: free, two colours, one background (4 × 5 = 20)."""
    colours, backgrounds = (COLOURS[:2], BACKGROUNDS[:1]) if quick else (COLOURS, BACKGROUNDS)
    out = []
    for concept in CONCEPTS:
        out.append(Variant(concept))
        out += [Variant(concept, color=c) for c in colours]
        out += [Variant(concept, background=b) for b in backgrounds]
        if not quick:
            out.append(Variant(concept, *COMBO))
    if not quick:
        for concept in CONCEPTS:
            out += [Variant(concept, color=c) for c in MORE_COLOURS]
            out += [Variant(concept, background=b) for b in MORE_BACKGROUNDS]
            out += [Variant(concept, c, b) for c, b in MORE_COMBOS]
    return out[:limit] if limit else out


def training_caption(caption: str, variant: Variant) -> str:
    """The caption the trainer sees: the scene's caption without the variant's pinned colour and
    background, so they become part of what the trigger means (a "red star" LoRA draws red stars when
    asked for a star), as in a community LoRA whose captions leave out what every picture shares."""
    if variant.color:
        caption = caption.replace(f" {variant.color} ", " ", 1)
    if variant.background:
        caption = caption.replace(f" on a {variant.background} background", "")
    return caption


def write_pictures(variant: Variant, folder: Path, n: int, seed: int) -> list[str]:
    """``n`` pictures of a variant with kohya ``.txt`` captions (:func:`training_caption`); returns the
    scenes' full captions (what the pictures show)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    captions = []
    for i in range(n):
        scene = world.sample_scene(rng, **variant.pinned())
        caption = scene.caption(with_size=i % 4 != 0)
        world.render(scene).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(training_caption(caption, variant))
        captions.append(caption)
    return captions


@dataclass(frozen=True)
class Setup:
    """Sizes of one benchmark run."""

    steps: int = 200
    rank: int = 4
    batch: int = 4
    images: int = 16
    resolution: int | None = None  # None: the model's native size
    held_out: int = 12
    encoder_steps: int = 1500
    captions_per_lora: int = 4
    d_model: int = 64
    depth: int = 2
    dropout: float = 0.1
    weight_decay: float = 0.05


def train_variant(variant: Variant, index: int, pipe: Any, work: Path, setup: Setup) -> dict[str, Any]:
    """Train (or reuse) the LoRA of one variant; returns its path, captions and training seconds."""
    from pipelines.training import TrainSpec, train_lora

    out = work / "loras" / f"{variant.name}.safetensors"
    info_path = out.with_suffix(".json")
    if out.is_file() and info_path.is_file():
        return json.loads(info_path.read_text())
    data = work / "data" / variant.name
    captions = write_pictures(variant, data, setup.images, seed=1000 + index)
    spec = TrainSpec(
        trigger=variant.concept,
        name=variant.name,
        caption_source="auto",
        rank=setup.rank,
        steps=setup.steps,
        learning_rate=4e-4,
        # pinned, not left to the base family: the pocket family's training defaults (every layer kind,
        # the text encoder, a distilled prior of 100 class pictures) made one LoRA take 5–8 minutes
        targets="attn",
        train_text_encoder=False,
        prior_preservation=False,
        batch_size=setup.batch,
        resolution=setup.resolution,
        lr_scheduler="cosine",
        lr_warmup_steps=min(20, setup.steps // 10),
        sample_every=0,
        sample_seeds=(1,),
        sample_steps=2,
        checkpoint_every=max(1, setup.steps // 2),
        seed=index,
    )
    started = time.perf_counter()
    train_lora(spec, pipe, data, out, work_dir=work / "ckpt" / variant.name, device="cpu", model_name="bench")
    info = {
        "name": variant.name,
        "caption": variant.caption(),
        "image_captions": captions,
        "path": str(out),
        "train_s": time.perf_counter() - started,
    }
    info_path.write_text(json.dumps(info, indent=1))
    return info


def ridge_map(x: np.ndarray, y: np.ndarray, query: np.ndarray, lam: float = 10.0) -> np.ndarray:
    """Unit rows of ``query @ W``: a ridge regression (Hoerl & Kennard 1970) from standardised SVD features
    to text vectors, fitted on the training LoRAs — a linear baseline beside the encoder."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    a = (x - mean) / std
    w = a.T @ np.linalg.solve(a @ a.T + lam * np.eye(len(a)), y)  # dual form: rows ≪ features
    return l2_rows(((query - mean) / std) @ w)


def recall(scores: np.ndarray, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Recall@k of a (queries × candidates) score matrix whose diagonal holds the right answers."""
    ranks = (scores > np.diag(scores)[:, None]).sum(axis=1)  # 0 = first
    return {f"R@{k}": float(np.mean(ranks < k)) for k in ks}


def evaluate(
    loras: list[Any], infos: list[dict[str, Any]], embedder: Any, setup: Setup, seed: int, work: Path
) -> dict[str, Any]:
    """Split, fit the encoder, and score every channel on the held-out LoRAs."""
    n = len(loras)
    order = np.random.default_rng(seed).permutation(n)
    held, train = sorted(order[: setup.held_out].tolist()), sorted(order[setup.held_out :].tolist())
    rng = np.random.default_rng(seed + 1)
    banks = []
    for i in train:
        extra = list(rng.choice(infos[i]["image_captions"], setup.captions_per_lora, replace=False))
        banks.append(embedder.embed_texts([infos[i]["caption"], *extra]))
    sizes = {"d_model": setup.d_model, "depth": setup.depth, "dropout": setup.dropout}
    config = EncoderConfig.for_adapters([loras[i] for i in train], embedder.dim, embedder.name, **sizes)
    started = time.perf_counter()
    from tqdm import tqdm

    bar = tqdm(total=setup.encoder_steps, desc="fitting encoder", unit="step", file=sys.stderr)

    def tick(step: int, loss: float) -> None:
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss:.3f}")

    fit = EncoderTrainConfig(steps=setup.encoder_steps, weight_decay=setup.weight_decay, seed=seed)
    model, losses = train_encoder([loras[i] for i in train], banks, config, fit, tick)
    bar.close()
    fit_s = time.perf_counter() - started
    save_encoder(model, work / f"encoder-seed{seed}-held{setup.held_out}")  # parallel runs do not collide
    queries = embedder.embed_texts([infos[i]["caption"] for i in held])
    learned = encode_weights(model, [loras[i] for i in held])
    layers = config.layers
    feats = np.stack([svd_features(w, layers) for w in loras])
    train_text = embedder.embed_texts([infos[i]["caption"] for i in train])
    pseudo = propagate_labels(feats[held], feats[train], train_text, k=5)
    both = l2_rows(learned + pseudo)
    linear = ridge_map(feats[train], train_text, feats[held])
    m = len(held)
    rows = {
        "learned encoder": recall(queries @ learned.T),
        "svd (training-free)": recall(queries @ pseudo.T),
        "learned + svd": recall(queries @ both.T),
        "svd → text, linear (ridge)": recall(queries @ linear.T),
        "chance": {"R@1": 1.0 / m, "R@5": min(1.0, 5.0 / m)},
        "learned encoder (train set)": recall(
            train_text @ encode_weights(model, [loras[i] for i in train]).T
        ),
    }
    return {
        "results": rows,
        "held_out": [infos[i]["caption"] for i in held],
        "n_train": len(train),
        "n_held_out": m,
        "encoder_fit_s": fit_s,
        "encoder_loss_first_last": [float(np.mean(losses[:20])), float(np.mean(losses[-20:]))],
    }


def table(report: dict[str, Any]) -> str:
    """The results as a fixed-width table."""
    lines = [f"{'channel':<32} {'R@1':>6} {'R@5':>6}", "-" * 46]
    for name, r in report["results"].items():
        lines.append(f"{name:<32} {r['R@1']:>6.3f} {r['R@5']:>6.3f}")
    lines.append(
        f"{report['n_loras']} LoRAs ({report['n_train']} train / {report['n_held_out']} held out), "
        f"{report['train_s_per_lora']:.1f} s per LoRA ({report['train_s_total']:.0f} s training), "
        f"encoder fit {report['encoder_fit_s']:.0f} s, embedder {report['embedder']}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "pipelines" / "pocket" / "weights"))
    ap.add_argument("--work", default=str(ROOT / "runs" / "weight_retrieval"))
    ap.add_argument("--quick", action="store_true", help="tiny pipeline, fewer steps (smoke check)")
    ap.add_argument("--embedder", default="auto", help="catalog embedder spec (auto: MiniLM offline)")
    ap.add_argument("--steps", type=int, default=None, help="LoRA steps (default 200; quick 20)")
    ap.add_argument("--encoder-steps", type=int, default=None, help="encoder steps (default 1500; quick 600)")
    ap.add_argument("--limit", type=int, default=None, help="train only the first N variants")
    ap.add_argument("--held-out", type=int, default=None, help="held-out LoRAs (default 12; quick 6)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--d-model", type=int, default=64, help="encoder width")
    ap.add_argument("--depth", type=int, default=2, help="encoder transformer layers")
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    setup = Setup(
        steps=args.steps or (20 if args.quick else 200),
        images=8 if args.quick else 16,
        resolution=32 if args.quick else None,
        held_out=args.held_out or (6 if args.quick else 12),
        encoder_steps=args.encoder_steps or (600 if args.quick else 1500),
        d_model=args.d_model,
        depth=args.depth,
        dropout=args.dropout,
        weight_decay=args.weight_decay,
    )
    kind = "quick" if args.quick else "pocket"
    size = f"-px{setup.resolution}" if setup.resolution else ""
    run = f"{kind}-implicit-r{setup.rank}-s{setup.steps}-b{setup.batch}-n{setup.images}{size}"
    work = Path(args.work) / run
    from tqdm import tqdm

    from adapters_db.embedders import resolve_embedder
    from pipelines.lora_formats import load
    from pipelines.training.lora_train import load_base_pipeline

    if args.quick:
        from pipelines.tiny import save_tiny_pipeline

        model_dir = work / "tiny_pipeline"
        if not (model_dir / "model_index.json").is_file():
            save_tiny_pipeline(model_dir, seed=0)
    else:
        model_dir = Path(args.model)
    pipe = load_base_pipeline(model_dir)
    todo = variants(args.limit, quick=args.quick)
    infos = []
    for i, variant in enumerate(tqdm(todo, desc="training LoRAs", unit="lora", file=sys.stderr)):
        infos.append(train_variant(variant, i, pipe, work, setup))
    del pipe
    loras = [load(info["path"]) for info in infos]
    embedder = resolve_embedder(None if args.embedder == "auto" else args.embedder)
    report = evaluate(loras, infos, embedder, setup, args.seed, work)
    train_s = [info["train_s"] for info in infos]
    report.update(
        n_loras=len(loras),
        embedder=embedder.name,
        model=str(model_dir),
        setup=setup.__dict__,
        train_s_total=float(np.sum(train_s)),
        train_s_per_lora=float(np.mean(train_s)),
        targets={"R@1": 0.6, "R@5": 0.9},
    )
    if args.json:
        print(json.dumps(report))
    else:
        print(table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
