"""Does Orthogonal Adaptation (arXiv 2312.02432) make self-trained LoRAs merge with less interference?

    python benchmarks/orthogonal_training.py [--rank 6] [--n 24] [--policies linear]

Trains the pocket world's five concept LoRAs twice with the same options (the bundled concepts'
recipe, ``pipelines.pocket.concepts.concept_spec``, at one rank): plainly, and orthogonally, every
down-projection frozen to its own block of a shared seeded basis (``BasisRegistry``), so that the five
adapters' input subspaces are mutually orthogonal. Then the composition benchmark
(``benchmarks/composition.py``: object×style and object×palette pairs, judged by the pocket
classifier) runs on both sets with the same prompts and seeds. It prints each set's single-concept
rates (each adapter alone), the pair rates under each policy, and the mean overlap of down-projection
row spaces between adapters (0 for the orthogonal set). Five adapters must fit in the narrowest
adapted layer's input width (32 on the pocket UNet): rank ≤ 6.

Needs the pocket model and its classifier (``python -m studio pocket train``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import composition  # noqa: E402

from pipelines import lora_formats  # noqa: E402
from pipelines.engine import attach  # noqa: E402
from pipelines.fusion import AdapterInfo, make_policy  # noqa: E402
from pipelines.pocket import classifier as judge  # noqa: E402
from pipelines.pocket.concepts import CONCEPTS, concept_scenes, concept_spec, write_dataset  # noqa: E402
from pipelines.pocket.evaluate import CLASSIFIER_PATH, SampleConfig, sample  # noqa: E402
from pipelines.training import train_lora  # noqa: E402
from pipelines.training.orthogonal import BasisRegistry, subspace_overlap  # noqa: E402


def train_set(pipe: Any, folder: Path, rank: int, orthogonal: bool) -> dict[str, Path]:
    """The five concept LoRAs as ``folder/pocket-<trigger>.safetensors``."""
    registry = BasisRegistry(folder / "basis.json")
    out = {}
    for trigger in CONCEPTS:
        spec = concept_spec(trigger, rank=rank, orthogonal=orthogonal)
        data = write_dataset(trigger, folder / "data" / trigger)
        path = folder / f"pocket-{trigger}.safetensors"
        train_lora(
            spec,
            pipe,
            data,
            path,
            work_dir=folder / "work" / trigger,
            device="cpu",
            basis=lambda family, t=trigger, s=spec: registry.allocate(family, t, s.rank),
        )
        out[trigger] = path
        print(f"  trained {path.name} ({'orthogonal' if orthogonal else 'plain'})", flush=True)
    return out


def mean_overlap(loras: dict[str, Any]) -> float:
    """Mean down-projection subspace overlap over adapter pairs and shared layers."""
    values = []
    for a, b in itertools.combinations(loras.values(), 2):
        values += [subspace_overlap(a.layers[k].down, b.layers[k].down) for k in a.layers if k in b.layers]
    return float(np.mean(values))


def single_rates(
    pipe: Any, model: Any, loras: dict[str, Any], n: int, seed: int, cfg: SampleConfig
) -> dict[str, float]:
    """Each concept's rate with its adapter alone."""
    rates = {}
    for trigger, weights in loras.items():
        scenes = concept_scenes(trigger, n, seed)
        with attach(
            pipe,
            [(AdapterInfo(trigger), weights)],
            make_policy("linear"),
            family="pocket",
            num_steps=cfg.steps,
        ):
            images = sample(pipe, [s.caption() for s in scenes], [seed * 1000 + i for i in range(n)], cfg)
        attr, value = next(iter(CONCEPTS[trigger].items()))
        rates[trigger] = float(np.mean([p == value for p in judge.predict(model, images)[attr]]))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=6)
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--seed", type=int, default=31)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--policies", default="linear")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--keep", type=Path, help="keep the trained LoRAs here")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from pipelines.models import load_pipeline

    pipe = load_pipeline("pocket", torch.device("cpu"), torch.float32)
    model = judge.load(CLASSIFIER_PATH)
    cfg = SampleConfig(steps=args.steps, guidance=args.guidance, batch_size=args.n)
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        for mode in ("plain", "orthogonal"):
            paths = train_set(pipe, root / mode, args.rank, mode == "orthogonal")
            loras = {t: lora_formats.load(p) for t, p in paths.items()}
            rows = [
                {
                    "policy": policy,
                    "pair": f"{a}×{b}",
                    **composition.run_pair(
                        pipe,
                        model,
                        policy,
                        composition.POLICIES.get(policy, {}),
                        (a, b),
                        loras,
                        args.n,
                        args.seed,
                        cfg,
                    )[0],
                }
                for policy in args.policies.split(",")
                for a, b in composition.PAIRS
            ]
            report[mode] = {
                "overlap": mean_overlap(loras),
                "single": single_rates(pipe, model, loras, args.n, args.seed, cfg),
                "pairs": composition.summary(rows, args.policies.split(",")),
            }
    for mode, r in report.items():
        print(f"\n== {mode} (rank {args.rank}): mean down-projection overlap {r['overlap']:.3f}")
        print("   alone: " + ", ".join(f"{t} {v:.2f}" for t, v in r["single"].items()))
        for row in r["pairs"]:
            print(
                f"   {row['policy']:<10}{row['group']:<16}both {row['both_rate']:.2f}  "
                f"first {row['first_rate']:.2f}  second {row['second_rate']:.2f}  "
                f"prompt {row['prompt_rate']:.2f}"
            )
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
