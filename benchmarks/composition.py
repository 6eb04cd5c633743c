"""Composition quality of two-LoRA mixes in the pocket world, per fusion policy.

For object×style and object×palette pairs of the bundled concept LoRAs, over a fixed set of
prompts and seeds, the concept classifier judges each picture: both concepts present, each alone,
and the prompt's own colour and background. One table, one run:

    python benchmarks/composition.py [--n 24] [--policies linear,ties] [--json] [--grid out.png]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines import lora_formats
from pipelines.engine import attach
from pipelines.fusion import AdapterInfo, make_policy
from pipelines.models import load_pipeline
from pipelines.pocket import classifier as judge
from pipelines.pocket import world
from pipelines.pocket.concepts import CONCEPTS
from pipelines.pocket.evaluate import CLASSIFIER_PATH, LORA_DIR, SampleConfig, sample

OBJECT_STYLE = [("star", "striped"), ("star", "outline"), ("heart", "striped"), ("heart", "outline")]
OBJECT_PALETTE = [("star", "neon"), ("heart", "neon")]
PAIRS = OBJECT_STYLE + OBJECT_PALETTE
POLICIES: dict[str, dict[str, Any]] = {
    "linear": {},
    "blocks": {"blocks": ["ALL", "OUTALL"]},  # content everywhere, style in the decoder only
    "schedule": {"schedule": ["1@0,0.4@1", "0.4@0,1@1"]},  # content early, style late
    "switch": {"period": 2},
    "klora": {},
    "orthogonal": {},
    "ties": {"density": 0.5},
    "dare": {"density": 0.5},
}


def lora_path(trigger: str, folder: Path = LORA_DIR) -> Path:
    """The bundled LoRA file of a concept."""
    path = folder / f"pocket-{trigger}.safetensors"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: train the concept LoRAs first (python -m studio pocket train)"
        )
    return path


def pair_scenes(first: str, second: str, n: int, seed: int) -> list[world.Scene]:
    """Fresh scenes showing both concepts of a pair."""
    rng = np.random.default_rng(seed)
    return [world.sample_scene(rng, **CONCEPTS[first], **CONCEPTS[second]) for _ in range(n)]


def judge_pair(
    pred: dict[str, list[str]], scenes: list[world.Scene], first: str, second: str
) -> dict[str, float]:
    """Rates of both concepts, each alone, and the prompt's own colour + background."""

    def has(concept: str, i: int) -> bool:
        attr, value = next(iter(CONCEPTS[concept].items()))
        return pred[attr][i] == value

    n = len(scenes)
    a = np.array([has(first, i) for i in range(n)])
    b = np.array([has(second, i) for i in range(n)])
    own = np.array(
        [pred["color"][i] == s.color and pred["background"][i] == s.background for i, s in enumerate(scenes)]
    )
    return {
        "both_rate": float((a & b).mean()),
        "first_rate": float(a.mean()),
        "second_rate": float(b.mean()),
        "prompt_rate": float(own.mean()),
    }


def run_pair(
    pipe: Any,
    model: judge.ConceptClassifier,
    policy: str,
    params: dict,
    pair: tuple[str, str],
    loras: dict[str, Any],
    n: int,
    seed: int,
    cfg: SampleConfig,
    family: str | None = "pocket",
) -> tuple[dict, np.ndarray]:
    """Sample and judge one pair under one policy (``params`` may hold objects, e.g. a gate ``network``)."""
    first, second = pair
    scenes = pair_scenes(first, second, n, seed)
    adapters = [(AdapterInfo(first), loras[first]), (AdapterInfo(second), loras[second])]
    t0 = time.perf_counter()
    with attach(pipe, adapters, make_policy(policy, params), family=family, num_steps=cfg.steps):
        images = sample(pipe, [s.caption() for s in scenes], [seed * 1000 + i for i in range(n)], cfg)
    seconds = (time.perf_counter() - t0) / n
    return {**judge_pair(judge.predict(model, images), scenes, first, second), "s_per_image": seconds}, images


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=24, help="pictures per pair and policy")
    ap.add_argument("--seed", type=int, default=31)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument(
        "--extra-policy",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help='add a policy with parameters, e.g. gate=\'{"checkpoint": "…"}\'',
    )
    ap.add_argument("--lora-dir", type=Path, default=LORA_DIR)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--grid", type=Path, default=None, help="also write a PNG grid (pairs × policies)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline("pocket", torch.device("cpu"), torch.float32)
    model = judge.load(CLASSIFIER_PATH)
    loras = {t: lora_formats.load(lora_path(t, args.lora_dir)) for t in {c for p in PAIRS for c in p}}
    policies = {name: POLICIES[name] for name in args.policies.split(",") if name}
    for item in args.extra_policy:
        name, _, raw = item.partition("=")
        policies[name] = json.loads(raw or "{}")
    cfg = SampleConfig(steps=args.steps, guidance=args.guidance, batch_size=args.n)
    rows, grid = [], {}
    for policy, params in policies.items():
        base_name = policy.split(":")[0]
        for pair in PAIRS:
            row, images = run_pair(pipe, model, base_name, params, pair, loras, args.n, args.seed, cfg)
            rows.append({"policy": policy, "pair": f"{pair[0]}×{pair[1]}", **row})
            grid[(policy, pair)] = images[0]
            if not args.json:
                print(f"{policy:<12} {pair[0]}×{pair[1]:<8} both {row['both_rate']:.2f}", file=sys.stderr)
    if args.grid is not None:
        write_grid(grid, list(policies), args.grid)
    if args.json:
        print(json.dumps({"rows": rows, "n": args.n, "steps": args.steps, "guidance": args.guidance}))
    else:
        print_table(rows, list(policies))
    return 0


def summary(rows: list[dict], policies: list[str]) -> list[dict]:
    """Mean rates per policy over object×style pairs, object×palette pairs and all pairs."""
    out = []
    for policy in policies:
        mine = [r for r in rows if r["policy"] == policy]
        for group, pairs in (
            ("object×style", OBJECT_STYLE),
            ("object×palette", OBJECT_PALETTE),
            ("all", PAIRS),
        ):
            names = {f"{a}×{b}" for a, b in pairs}
            sel = [r for r in mine if r["pair"] in names]
            out.append(
                {
                    "policy": policy,
                    "group": group,
                    **{
                        k: float(np.mean([r[k] for r in sel]))
                        for k in ("both_rate", "first_rate", "second_rate", "prompt_rate", "s_per_image")
                    },
                }
            )
    return out


def print_table(rows: list[dict], policies: list[str]) -> None:
    """Per-pair rows, then the per-policy means."""
    head = f"{'policy':<12}{'pair':<16}{'both':>7}{'first':>7}{'second':>8}{'prompt':>8}{'s/img':>8}"
    print(head)
    for r in rows:
        print(
            f"{r['policy']:<12}{r['pair']:<16}{r['both_rate']:>7.2f}{r['first_rate']:>7.2f}"
            f"{r['second_rate']:>8.2f}{r['prompt_rate']:>8.2f}{r['s_per_image']:>8.3f}"
        )
    print()
    print(f"{'policy':<12}{'group':<16}{'both':>7}{'first':>7}{'second':>8}{'prompt':>8}{'s/img':>8}")
    for r in summary(rows, policies):
        print(
            f"{r['policy']:<12}{r['group']:<16}{r['both_rate']:>7.2f}{r['first_rate']:>7.2f}"
            f"{r['second_rate']:>8.2f}{r['prompt_rate']:>8.2f}{r['s_per_image']:>8.3f}"
        )


def write_grid(grid: dict, policies: list[str], path: Path) -> None:
    """One picture per (policy, pair): rows are policies, columns pairs."""
    from PIL import Image

    rows = [np.concatenate([grid[(p, pair)] for pair in PAIRS], axis=1) for p in policies]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


if __name__ == "__main__":
    raise SystemExit(main())
