"""Does each addition to the learned gate help? An ablation on the pocket world's object×style pairs.

Three gates are trained for the concept LoRAs star, heart, striped and outline on the TRAINING pairs
(star, striped) and (heart, outline): ``full`` (timestep + prompt inputs), ``no_time`` and
``no_prompt``. Each is judged, next to ``linear``, with the composition benchmark's machinery on the
training pairs and on the HELD-OUT pairs (star, outline) and (heart, striped): both concepts present
(``both_rate``) and the prompt's own colour and background kept (``prompt_rate``). The rows
``first alone`` / ``second alone`` (skip with ``--no-alone``) run each LoRA by itself on the pair's
prompts: how often it draws its own concept is about as high as any fusion can be expected to go.
``--static-grid`` adds every pair of static weights from ``STATIC_GRID`` (rows ``static a/b``) and the
per-block weightings of ``BLOCK_GRID`` (rows ``blocks …``: down / mid / up weights of the object LoRA,
then of the style LoRA): the best of them per pair, chosen with hindsight, is what scaling each adapter,
or each adapter per UNet block, can reach.

Resumable: the LoRAs' own pictures, each gate and each judged (policy, pair) row are cached under
``--work`` (default runs/gate/<model>); delete a file to redo that part.

    python benchmarks/gate_composition.py                  # pocket model (needs its weights)
    python benchmarks/gate_composition.py --quick          # tiny pipeline, random LoRAs: a smoke test
    python benchmarks/gate_composition.py --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.composition import judge_pair, lora_path, pair_scenes, run_pair
from pipelines.gate.network import GateNetwork
from pipelines.gate.prompts import concept_prompts
from pipelines.gate.train import (
    GateLora,
    GateTrainConfig,
    decode_latents,
    lora_latents,
    mix_latents,
    train_gate,
)
from pipelines.pocket import classifier as judge
from pipelines.pocket.evaluate import CLASSIFIER_PATH, LORA_DIR, SampleConfig

CONCEPT_ORDER = ("star", "heart", "striped", "outline")
TRAIN_PAIRS = [("star", "striped"), ("heart", "outline")]
HELD_OUT_PAIRS = [("star", "outline"), ("heart", "striped")]
VARIANTS: dict[str, dict[str, Any]] = {
    "full": {"use_time": True, "use_prompt": True},
    "no_time": {"use_time": False, "use_prompt": True},
    "no_prompt": {"use_time": True, "use_prompt": False},
    # full + the two-concept term: linear mixes of the training pairs the judge accepts
    "mix": {"use_time": True, "use_prompt": True, "mixes": True},
    # mix with the exclusion hinge at a tenth of its weight (the hinge alone closes both doors)
    "mix_soft": {"use_time": True, "use_prompt": True, "mixes": True, "hinge_weight": 0.1},
    # the two-concept term alone: the gate learns only from accepted compositions
    "mix_only": {"use_time": True, "use_prompt": True, "mixes": True, "fit_weight": 0.0, "hinge_weight": 0.0},
}
STATIC_GRID = [(a, b) for a in (1.0, 1.25, 1.5) for b in (0.75, 1.0, 1.25) if (a, b) != (1.0, 1.0)]
# (down, mid, up) weights of the first (object) and the second (style) LoRA: is there a split of the
# UNet where the object is drawn and one where the style is, as B-LoRA found for SDXL?
BLOCK_GRID = [
    ((1.5, 1.5, 1.0), (0.5, 0.5, 1.0)),
    ((1.0, 1.0, 1.0), (0.0, 0.0, 1.0)),
    ((1.0, 1.0, 1.0), (1.0, 1.0, 0.5)),
    ((1.0, 1.0, 0.0), (1.0, 1.0, 1.0)),
]
MIX_PICTURES = 64  # linear-mix pictures made per training pair before the judge keeps the good ones


@dataclass(frozen=True)
class AblationConfig:
    """One ablation run: the model, sampling of the judged pictures and the gates' training."""

    model: str = "pocket"
    n: int = 24
    seed: int = 31
    sample: SampleConfig = field(default_factory=lambda: SampleConfig(steps=25, guidance=5.0, batch_size=24))
    train: GateTrainConfig = field(default_factory=GateTrainConfig)
    family: str | None = "pocket"


def quick_config() -> AblationConfig:
    """Tiny pipeline, random LoRAs, a handful of steps: checks the machinery in a couple of minutes."""
    train = GateTrainConfig(steps=6, batch_size=2, images_per_lora=2, sample_steps=2)
    return AblationConfig("tiny", 2, 31, SampleConfig(steps=3, guidance=5.0, batch_size=2), train, None)


def block_spec(weights: tuple[float, float, float]) -> dict[str, float]:
    """(down, mid, up) weights as a diffusers ``set_adapters`` dict for the ``blocks`` policy."""
    return dict(zip(("down", "mid", "up"), weights, strict=True))


def block_row_name(first: tuple[float, ...], second: tuple[float, ...]) -> str:
    """The row name of a per-block weighting, e.g. ``blocks 1.5/1.5/1 + 0.5/0.5/1``."""
    return "blocks " + " + ".join("/".join(f"{w:g}" for w in ws) for ws in (first, second))


def gate_pairs() -> list[tuple[int, int]]:
    """The training pairs as ordered index pairs into CONCEPT_ORDER, both directions."""
    idx = {c: i for i, c in enumerate(CONCEPT_ORDER)}
    return [p for a, b in TRAIN_PAIRS for p in ((idx[a], idx[b]), (idx[b], idx[a]))]


def tiny_setup(seed: int = 0) -> tuple[Any, dict[str, Any], judge.ConceptClassifier]:
    """The tiny pipeline with one random attention LoRA per concept, and the judge (an untrained one
    when the pocket classifier is not there: its rates then mean nothing)."""
    from pipelines.lora_weights import LoraLayer, LoraWeights
    from pipelines.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed)
    pipe.set_progress_bar_config(disable=True)
    loras = {}
    for k, concept in enumerate(CONCEPT_ORDER):
        g = torch.Generator().manual_seed(100 + k)
        layers = {}
        for name, mod in pipe.unet.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
                down = torch.randn(4, mod.in_features, generator=g) * 0.3
                layers[f"unet.{name}"] = LoraLayer(
                    down, torch.randn(mod.out_features, 4, generator=g) * 0.3, 4
                )
        loras[concept] = LoraWeights(layers, "unknown")
    if CLASSIFIER_PATH.is_file():
        model = judge.load(CLASSIFIER_PATH)
    else:
        print("note: no pocket classifier yet; an untrained judge scores the --quick run", file=sys.stderr)
        torch.manual_seed(seed)
        model = judge.ConceptClassifier().eval()
    return pipe, loras, model


def pocket_setup(lora_dir: Path) -> tuple[Any, dict[str, Any], judge.ConceptClassifier]:
    """The pocket pipeline, its concept LoRAs and the trained judge."""
    from pipelines import lora_formats
    from pipelines.models import load_pipeline

    pipe = load_pipeline("pocket", torch.device("cpu"), torch.float32)
    loras = {c: lora_formats.load(lora_path(c, lora_dir)) for c in CONCEPT_ORDER}
    return pipe, loras, judge.load(CLASSIFIER_PATH)


def cached_pictures(
    work: Path, stem: str, make: Callable[[], tuple[torch.Tensor, list[str], dict[str, Any]]]
) -> tuple[torch.Tensor, list[str]]:
    """Latents + prompts kept as ``<stem>.safetensors`` + ``<stem>.json`` in ``work``; ``make()`` (latents,
    prompts, extra JSON fields) runs only when they are not there yet."""
    path, meta = work / f"{stem}.safetensors", work / f"{stem}.json"
    if not path.is_file():
        lat, prompts, extra = make()
        save_file({"latents": lat.contiguous()}, str(path))
        meta.write_text(json.dumps({"prompts": prompts, **extra}))
    return load_file(str(path))["latents"], json.loads(meta.read_text())["prompts"]


def lora_data(
    pipe: Any, loras: list[GateLora], cfg: GateTrainConfig, work: Path
) -> dict[int, tuple[torch.Tensor, list[str]]]:
    """Each LoRA's own pictures (latents + prompts), shared by every gate variant; cached in ``work``."""

    def make(i: int) -> tuple[torch.Tensor, list[str], dict[str, Any]]:
        return (*lora_latents(pipe, loras[i], cfg.images_per_lora, cfg, cfg.seed + i), {})

    return {
        i: cached_pictures(work, f"data-{lora.name}", lambda i=i: make(i)) for i, lora in enumerate(loras)
    }


def mix_data(
    pipe: Any, loras: list[GateLora], model: judge.ConceptClassifier, cfg: GateTrainConfig, work: Path
) -> dict[tuple[int, int], tuple[torch.Tensor, list[str]]]:
    """Per training pair: linear-mix pictures of fresh two-concept captions that the judge accepts
    (both concepts, the caption's colour and background); cached in ``work``."""
    idx = {c: i for i, c in enumerate(CONCEPT_ORDER)}

    def make(first: str, second: str) -> tuple[torch.Tensor, list[str], dict[str, Any]]:
        scenes = pair_scenes(first, second, MIX_PICTURES, cfg.seed + 500)
        prompts = [s.caption() for s in scenes]
        seeds = [cfg.seed * 7_777 + k for k in range(len(prompts))]
        pair = [loras[idx[first]], loras[idx[second]]]
        lat = torch.cat(
            [
                mix_latents(pipe, pair, prompts[k : k + 16], seeds[k : k + 16], cfg)
                for k in range(0, len(prompts), 16)
            ]
        )
        pred = judge.predict(model, decode_latents(pipe, lat))
        rows = [
            judge_pair({a: [v[k]] for a, v in pred.items()}, [scenes[k]], first, second)
            for k in range(len(scenes))
        ]
        keep = [k for k, r in enumerate(rows) if r["both_rate"] == 1 and r["prompt_rate"] == 1]
        print(f"mix data {first}×{second}: kept {len(keep)} of {len(prompts)}", file=sys.stderr)
        return lat[keep], [prompts[k] for k in keep], {"made": len(prompts)}

    out = {}
    for first, second in TRAIN_PAIRS:
        lat, prompts = cached_pictures(work, f"mix-{first}-{second}", lambda f=first, s=second: make(f, s))
        if prompts:
            out[(idx[first], idx[second])] = (lat, prompts)
    return out


def trained_gate(
    pipe: Any,
    loras: list[GateLora],
    variant: str,
    cfg: AblationConfig,
    work: Path,
    data: dict,
    mixes: dict | None = None,
) -> GateNetwork:
    """Gate ``variant`` (trained now, or loaded from ``work``)."""
    path = work / f"gate-{variant}.safetensors"
    if path.is_file():
        return GateNetwork.load(path)
    options = dict(VARIANTS[variant])
    use_mixes = options.pop("mixes", False)
    train = replace(cfg.train, **options)
    t0 = time.perf_counter()
    net, losses = train_gate(
        pipe, loras, gate_pairs(), train, family=cfg.family, data=data, mixes=mixes if use_mixes else None
    )
    net.save(path)
    log = {"losses": losses, "seconds": time.perf_counter() - t0, "config": asdict(train)}
    (work / f"gate-{variant}.json").write_text(json.dumps(log))
    print(f"trained gate {variant}: final loss {losses[-1]:.4f}", file=sys.stderr)
    return net


def run(
    cfg: AblationConfig,
    variants: list[str],
    work: Path,
    setup: tuple,
    quiet: bool,
    alone: bool = True,
    static_grid: bool = False,
) -> list[dict]:
    """Train (or load) the gates, then judge every (policy, pair); rows are cached in rows.jsonl.
    With ``alone``, also each LoRA by itself on the pair's prompts (the other at weight 0): the rate
    of the weaker one is about as high as any fusion of the two can be expected to go. With
    ``static_grid``, also the static and per-block weights of ``STATIC_GRID`` and ``BLOCK_GRID``."""
    pipe, lora_weights, model = setup
    work.mkdir(parents=True, exist_ok=True)
    loras = [GateLora(c, lora_weights[c], concept_prompts(c, 64, cfg.train.seed)) for c in CONCEPT_ORDER]
    data = lora_data(pipe, loras, cfg.train, work) if variants else {}
    mixes = (
        mix_data(pipe, loras, model, cfg.train, work)
        if any(VARIANTS[v].get("mixes") for v in variants)
        else None
    )
    off = ("fit_weight", "hinge_weight")
    only_mixes = {v for v in variants if all(VARIANTS[v].get(k) == 0 for k in off)}
    if not mixes and only_mixes:
        print(f"no mix picture was accepted: {', '.join(sorted(only_mixes))} skipped", file=sys.stderr)
    gates = {
        v: trained_gate(pipe, loras, v, cfg, work, data, mixes)
        for v in variants
        if mixes or v not in only_mixes
    }
    policies: dict[str, tuple[str, dict[str, Any]]] = {"linear": ("linear", {})}
    if alone:
        policies["first alone"] = ("schedule", {"schedule": ["1", "0"]})
        policies["second alone"] = ("schedule", {"schedule": ["0", "1"]})
    if static_grid:
        policies |= {
            f"static {a:g}/{b:g}": ("schedule", {"schedule": [str(a), str(b)]}) for a, b in STATIC_GRID
        }
        policies |= {
            block_row_name(o, st): ("blocks", {"blocks": [block_spec(o), block_spec(st)]})
            for o, st in BLOCK_GRID
        }
    policies |= {f"gate-{v}": ("gate", {"network": net}) for v, net in gates.items()}
    cache = work / "rows.jsonl"
    done = {}
    if cache.is_file():
        for line in cache.read_text().splitlines():
            row = json.loads(line)
            done[(row["policy"], row["pair"], row["n"], row["steps"])] = row
    rows = []
    for name, (policy, params) in policies.items():
        for split, pairs in (("train", TRAIN_PAIRS), ("held-out", HELD_OUT_PAIRS)):
            for pair in pairs:
                key = (name, f"{pair[0]}×{pair[1]}", cfg.n, cfg.sample.steps)
                if key not in done:
                    row, _ = run_pair(
                        pipe,
                        model,
                        policy,
                        params,
                        pair,
                        lora_weights,
                        cfg.n,
                        cfg.seed,
                        cfg.sample,
                        cfg.family,
                    )
                    done[key] = {"policy": name, "pair": key[1], "n": cfg.n, "steps": cfg.sample.steps, **row}
                    with cache.open("a") as fh:
                        fh.write(json.dumps(done[key]) + "\n")
                rows.append({**done[key], "split": split})
                if not quiet:
                    print(f"{name:<15} {key[1]:<16} both {done[key]['both_rate']:.2f}", file=sys.stderr)
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Mean rates per policy on the training pairs, the held-out pairs and all four."""
    out = []
    for policy in dict.fromkeys(r["policy"] for r in rows):
        for split in ("train", "held-out", "all"):
            sel = [r for r in rows if r["policy"] == policy and split in ("all", r["split"])]
            keys = ("both_rate", "first_rate", "second_rate", "prompt_rate", "s_per_image")
            out.append(
                {"policy": policy, "split": split, **{k: float(np.mean([r[k] for r in sel])) for k in keys}}
            )
    return out


def best_static(rows: list[dict]) -> list[dict]:
    """Per pair, the static or per-block weights (``linear`` included) with the highest both-concepts
    rate: an oracle, chosen on the judged pictures themselves."""
    out = []
    for pair in dict.fromkeys(r["pair"] for r in rows):
        grid = [
            r
            for r in rows
            if r["pair"] == pair
            and (r["policy"] == "linear" or r["policy"].startswith(("static ", "blocks ")))
        ]
        if len(grid) > 1:
            best = max(grid, key=lambda r: (r["both_rate"], r["prompt_rate"]))
            linear = next(r for r in grid if r["policy"] == "linear")
            out.append(
                {
                    "pair": pair,
                    "split": best["split"],
                    "best": best["policy"],
                    "both_rate": best["both_rate"],
                    "prompt_rate": best["prompt_rate"],
                    "linear_both_rate": linear["both_rate"],
                }
            )
    return out


def print_table(rows: list[dict]) -> None:
    """Per-pair rows, then means per policy and split, with the change against linear."""
    w = max(15, *(len(r["policy"]) + 2 for r in rows))
    print(f"{'policy':<{w}}{'split':<10}{'pair':<16}{'both':>7}{'first':>7}", end="")
    print(f"{'second':>8}{'prompt':>8}{'s/img':>8}")
    for r in rows:
        print(
            f"{r['policy']:<{w}}{r['split']:<10}{r['pair']:<16}{r['both_rate']:>7.2f}{r['first_rate']:>7.2f}"
            f"{r['second_rate']:>8.2f}{r['prompt_rate']:>8.2f}{r['s_per_image']:>8.3f}"
        )
    print()
    means = summary(rows)
    linear = {m["split"]: m for m in means if m["policy"] == "linear"}
    print(f"{'policy':<{w}}{'split':<10}{'both':>7}{'Δboth':>8}{'prompt':>8}{'Δprompt':>9}")
    for m in means:
        ref = linear.get(m["split"], m)
        d_both, d_prompt = m["both_rate"] - ref["both_rate"], m["prompt_rate"] - ref["prompt_rate"]
        print(
            f"{m['policy']:<{w}}{m['split']:<10}{m['both_rate']:>7.2f}{d_both:>+8.2f}"
            f"{m['prompt_rate']:>8.2f}{d_prompt:>+9.2f}"
        )
    best = best_static(rows)
    if best:
        head = "best static or per-block"
        print(f"\n{'pair':<16}{'split':<10}{head:<{w}}{'both':>7}{'linear':>8}{'prompt':>8}")
        for b in best:
            print(
                f"{b['pair']:<16}{b['split']:<10}{b['best']:<{w}}{b['both_rate']:>7.2f}"
                f"{b['linear_both_rate']:>8.2f}{b['prompt_rate']:>8.2f}"
            )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny pipeline and random LoRAs (smoke test)")
    ap.add_argument("--work", type=Path, default=None, help="cache folder (default runs/gate/<model>)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="gate variants to train and judge")
    ap.add_argument("--n", type=int, default=None, help="pictures per pair and policy (default 24)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps of judged pictures (default 25)")
    ap.add_argument("--gate-steps", type=int, default=None, help="gate optimiser steps (default 600)")
    ap.add_argument("--lora-dir", type=Path, default=LORA_DIR)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-alone", action="store_true", help="skip the rows of each LoRA by itself")
    ap.add_argument("--static-grid", action="store_true", help="also judge static and per-block weights")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = quick_config() if args.quick else AblationConfig()
    if args.n is not None:
        cfg = replace(cfg, n=args.n, sample=replace(cfg.sample, batch_size=args.n))
    if args.steps is not None:
        cfg = replace(cfg, sample=replace(cfg.sample, steps=args.steps))
    if args.gate_steps is not None:
        cfg = replace(cfg, train=replace(cfg.train, steps=args.gate_steps))
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variant(s) {sorted(unknown)}: use {', '.join(VARIANTS)}")
    work = args.work or Path("runs/gate") / ("tiny-quick" if args.quick else cfg.model)
    setup = tiny_setup() if args.quick else pocket_setup(args.lora_dir)
    rows = run(
        cfg, variants, work, setup, quiet=args.json, alone=not args.no_alone, static_grid=args.static_grid
    )
    if args.json:
        out = {"rows": rows, "summary": summary(rows), "best_static": best_static(rows)}
        print(json.dumps({**out, "config": asdict(cfg), "work": str(work)}))
    else:
        print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
