"""A labelled picture grid of the pocket model for the README: base prompts, each concept LoRA alone,
and one two-LoRA mix per fusion policy (the composition benchmark's pairs and seeds).

    python benchmarks/pocket_grid.py --out docs/pocket_grid.png [--extra-policy gate='{"checkpoint": "…"}']
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.composition import PAIRS, POLICIES, lora_path, run_pair
from pipelines import lora_formats
from pipelines.engine import attach
from pipelines.fusion import AdapterInfo, make_policy
from pipelines.models import load_pipeline
from pipelines.pocket import classifier as judge
from pipelines.pocket.concepts import CONCEPTS, concept_scenes
from pipelines.pocket.evaluate import CLASSIFIER_PATH, SampleConfig, fresh_scenes, sample

CELL, LABEL = 96, 150  # pixels per picture, width of the row labels


def labelled_rows(rows: list[tuple[str, list[np.ndarray], list[str]]]) -> Image.Image:
    """One row per (label, pictures, captions); pictures upscaled to ``CELL`` pixels."""
    width = LABEL + CELL * max(len(p) for _, p, _ in rows)
    sheet = Image.new("RGB", (width, (CELL + 14) * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, pictures, captions) in enumerate(rows):
        y = r * (CELL + 14)
        draw.text((4, y + CELL // 2 - 6), label, fill="black")
        for c, (pic, cap) in enumerate(zip(pictures, captions, strict=True)):
            x = LABEL + c * CELL
            sheet.paste(Image.fromarray(pic).resize((CELL, CELL), Image.NEAREST), (x, y))
            draw.text((x + 2, y + CELL), cap[:17], fill="gray")
    return sheet


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("docs/pocket_grid.png"))
    ap.add_argument("--seed", type=int, default=31)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--extra-policy", action="append", default=[], help="name=JSON, as in composition.py")
    args = ap.parse_args()
    torch.set_num_threads(1)
    pipe = load_pipeline("pocket", torch.device("cpu"), torch.float32)
    model = judge.load(CLASSIFIER_PATH)
    cfg = SampleConfig(steps=args.steps, guidance=args.guidance)
    loras = {t: lora_formats.load(lora_path(t)) for t in CONCEPTS}
    base = fresh_scenes(5, args.seed)
    rows = [
        (
            "base model",
            list(sample(pipe, [s.caption() for s in base], range(5), cfg)),
            [s.caption(with_size=False)[2:] for s in base],
        )
    ]
    pics, caps = [], []
    for i, trigger in enumerate(CONCEPTS):
        scene = concept_scenes(trigger, 1, args.seed + i)[0]
        with attach(pipe, [(AdapterInfo(trigger), loras[trigger])], make_policy("linear"), family="pocket"):
            pics.append(sample(pipe, [scene.caption()], [args.seed * 1000 + i], cfg)[0])
        caps.append(f"LoRA {trigger}")
    rows.append(("each LoRA alone", pics, caps))
    policies = dict(POLICIES)
    for item in args.extra_policy:
        name, _, raw = item.partition("=")
        policies[name] = json.loads(raw or "{}")
    for policy, params in policies.items():
        pics = [
            run_pair(pipe, model, policy.split(":")[0], params, pair, loras, 1, args.seed, cfg)[1][0]
            for pair in PAIRS
        ]
        rows.append((f"mix: {policy}", pics, [f"{a}+{b}" for a, b in PAIRS]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    labelled_rows(rows).save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
