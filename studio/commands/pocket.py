"""``python -m studio pocket train|eval``: build and measure the offline pocket model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

STAGES = ("classifier", "vae", "latents", "unet", "export", "loras", "catalog")


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    """Add ``pocket train`` and ``pocket eval``."""
    p = sub.add_parser("pocket", help="train or evaluate the bundled pocket model", description=__doc__)
    psub = p.add_subparsers(dest="pocket_command", required=True, metavar="ACTION")
    t = psub.add_parser(
        "train",
        parents=[parent],
        help="run the resumable training stages",
        description="Train the pocket model stage by stage; each stage resumes from its "
        "last checkpoint in --run-dir, finished stages are skipped.",
    )
    t.add_argument("--run-dir", type=Path, default=Path("runs/pocket"), help="checkpoints and logs")
    t.add_argument("--stage", choices=(*STAGES, "all"), default="all", help="run only this stage")
    add_threads(t)
    t.add_argument("--out", type=Path, default=None, help="export folder (default: the bundled weights)")
    t.set_defaults(func=run_train)
    e = psub.add_parser(
        "eval",
        parents=[parent],
        help="measure prompt following with the judge",
        description="Generate pictures for fresh captions and seeds and let the concept "
        "classifier judge object, colour and background (and each concept LoRA).",
    )
    e.add_argument("--n", type=int, default=200, help="captions of base concepts")
    e.add_argument("--lora-n", type=int, default=50, help="pictures per concept LoRA")
    e.add_argument("--seed", type=int, default=2024)
    e.add_argument("--steps", type=int, default=25)
    e.add_argument("--guidance", type=float, default=5.0)
    e.add_argument(
        "--model", default="pocket", help="a pocket-architecture diffusers folder (default: bundled)"
    )
    e.add_argument("--json", action="store_true", help="print one JSON object")
    add_threads(e)
    e.set_defaults(func=run_eval)


def add_threads(p: argparse.ArgumentParser) -> None:
    """``--threads``: torch CPU threads, one by default so a core stays free."""
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (leave a core free)")


def run_train(args: argparse.Namespace) -> int:
    """Run the requested stages in order; each is resumable and skipped once finished."""
    import torch

    from pipelines.pocket import classifier as judge
    from pipelines.pocket import train as pt
    from pipelines.pocket.evaluate import CLASSIFIER_PATH, WEIGHTS_DIR

    torch.set_num_threads(args.threads)
    cfg = pt.PocketTrainConfig()
    run = args.run_dir
    run.mkdir(parents=True, exist_ok=True)
    stages = STAGES if args.stage == "all" else (args.stage,)
    out = args.out or WEIGHTS_DIR
    for stage in stages:
        if stage == "classifier":
            path = run / "classifier.safetensors"
            if not path.exists():
                judge.train_classifier(judge.ClassifierTrainConfig(), path)
            print(json.dumps({"classifier_accuracy": judge.accuracy(judge.load(path))}))
        elif stage == "vae":
            pt.train_vae(cfg, run)
        elif stage == "latents":
            pt.encode_dataset(cfg, run)
        elif stage == "unet":
            pt.train_unet(cfg, run)
        elif stage == "export":
            pt.export(
                cfg,
                run,
                out,
                classifier_src=run / "classifier.safetensors",
                classifier_dst=out / CLASSIFIER_PATH.name,
            )
            print(f"exported to {out}")
        elif stage in ("loras", "catalog"):
            concept_stage(stage, out, run)
    return 0


def concept_stage(stage: str, out: Path, run: Path) -> None:
    """``loras``: train each missing concept LoRA with the studio's trainer; ``catalog``: previews and
    sidecars for every concept LoRA (both on the exported model in ``out``)."""
    import shutil

    import torch

    from pipelines.models import load_pipeline
    from pipelines.pocket.catalog import write_sidecars
    from pipelines.pocket.concepts import CONCEPTS, train_concept

    pipe = load_pipeline(str(out), torch.device("cpu"), torch.float32)
    pipe.studio_family = "pocket"
    folder = out / "loras"
    folder.mkdir(parents=True, exist_ok=True)
    for trigger in CONCEPTS:
        lora = folder / f"pocket-{trigger}.safetensors"
        if stage == "loras" and not lora.exists():
            train_concept(trigger, pipe, lora, run / "loras")
            shutil.rmtree(folder / f"pocket-{trigger}_diffusers", ignore_errors=True)
        if stage == "catalog" and lora.exists():
            write_sidecars(lora, trigger, pipe)
        print(f"{stage}: {lora.name}")


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate base prompt following and each bundled concept LoRA."""
    import torch
    from tqdm import tqdm

    from pipelines.models import load_pipeline
    from pipelines.pocket import classifier as judge
    from pipelines.pocket.evaluate import CLASSIFIER_PATH, SampleConfig, evaluate_base, lora_concept_rates

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pipe = load_pipeline(args.model, torch.device("cpu"), torch.float32)
    model = judge.load(CLASSIFIER_PATH)
    cfg = SampleConfig(steps=args.steps, guidance=args.guidance)
    with tqdm(total=args.n, desc="base prompts", disable=args.json, file=sys.stderr) as bar:
        base = evaluate_base(
            pipe, model, n=args.n, seed=args.seed, cfg=cfg, progress=lambda i, n: bar.update(i - bar.n)
        )
    concepts = lora_concept_rates(pipe, model, n=args.lora_n, cfg=cfg)
    result = {
        **base,
        "lora_concepts": concepts,
        "images": args.n + args.lora_n * len(concepts),
        "steps": args.steps,
        "guidance": args.guidance,
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key in ("object_acc", "color_acc", "background_acc", "all_acc"):
            print(f"{key:<16}{result[key]:.3f}")
        for name, rate in concepts.items():
            print(f"lora {name:<11}{rate:.3f}")
    return 0
