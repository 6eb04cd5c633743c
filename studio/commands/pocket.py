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
    e.add_argument("--n", type=int, default=200, help="captions of base concepts (default 200)")
    e.add_argument(
        "--lora-n", type=int, default=50, help="pictures per concept LoRA (default 50; 0: skip the LoRAs)"
    )
    e.add_argument("--seed", type=int, default=2024)
    e.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    e.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance (default 5)")
    e.add_argument(
        "--model",
        default="pocket",
        help="a pocket-architecture diffusers folder (default: bundled); its classifier.safetensors and "
        "loras/ (what `pocket train --out` writes) are used when it has them",
    )
    e.add_argument("--json", action="store_true", help="print one JSON object")
    add_threads(e)
    e.set_defaults(func=run_eval)


def add_threads(p: argparse.ArgumentParser) -> None:
    """``--threads``: torch CPU threads, one by default so a core stays free."""
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (leave a core free)")


def positive_int(text: str) -> int:
    """An argparse type: an integer ≥ 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def eval_sources(model: str) -> tuple[Path, Path]:
    """(classifier file, concept LoRA folder) of ``pocket eval --model``: the model folder's own when it
    has them (an export of ``pocket train --out``), else the bundled ones."""
    from pipelines.pocket.evaluate import CLASSIFIER_PATH, LORA_DIR

    folder = None if model == "pocket" else Path(model).expanduser()
    if folder is None or not folder.is_dir():
        return CLASSIFIER_PATH, LORA_DIR
    own = folder / CLASSIFIER_PATH.name
    loras = folder / "loras"
    return (own if own.is_file() else CLASSIFIER_PATH), (loras if loras.is_dir() else LORA_DIR)


def check_eval_args(args: argparse.Namespace) -> None:
    """Refuse evaluation options that would measure nothing (before the model is loaded)."""
    import math

    if args.n < 1:
        raise ValueError(f"--n must be ≥ 1, got {args.n}")
    if args.lora_n < 0:
        raise ValueError(f"--lora-n must be ≥ 0 (0 skips the LoRAs), got {args.lora_n}")
    if args.steps < 1:
        raise ValueError(f"--steps must be ≥ 1, got {args.steps}")
    if not math.isfinite(args.guidance) or args.guidance < 0:
        raise ValueError(f"--guidance must be a finite number ≥ 0, got {args.guidance}")


def check_stage_inputs(stage: str, run: Path, out: Path) -> None:
    """Refuse a stage whose earlier stages have not run, naming the one to run first."""
    needs = {
        "latents": [] if (run / "latents.pt").exists() else [(run / "vae.ckpt", "vae")],
        "unet": [(run / "latents.pt", "latents")],
        "export": [
            (run / "classifier.safetensors", "classifier"),
            (run / "latents.pt", "latents"),
            (run / "unet.ckpt", "unet"),
        ],
        "loras": [(out / "model_index.json", "export")],
        "catalog": [(out / "model_index.json", "export")],
    }
    for file, before in needs.get(stage, []):
        if not file.exists():
            raise FileNotFoundError(
                f"stage {stage!r} needs {file} from the {before!r} stage: run `python -m studio pocket "
                f"train --stage {before}` first (with the same --run-dir and --out)"
            )


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
        check_stage_inputs(stage, run, out)
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
    from pipelines.pocket.evaluate import SampleConfig, bundled_loras, evaluate_base, lora_concept_rates

    check_eval_args(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    classifier, loras = eval_sources(args.model)
    pipe = load_pipeline(args.model, torch.device("cpu"), torch.float32)
    model = judge.load(classifier)
    cfg = SampleConfig(steps=args.steps, guidance=args.guidance)
    with tqdm(total=args.n, desc="base prompts", disable=args.json, file=sys.stderr) as bar:
        base = evaluate_base(
            pipe, model, n=args.n, seed=args.seed, cfg=cfg, progress=lambda i, n: bar.update(i - bar.n)
        )
    concepts: dict[str, float] = {}
    if args.lora_n:
        total = args.lora_n * len(bundled_loras(loras))
        with tqdm(total=total, desc="concept LoRAs", disable=args.json, file=sys.stderr) as bar:
            concepts = lora_concept_rates(
                pipe, model, n=args.lora_n, cfg=cfg, folder=loras, progress=lambda i, n: bar.update(i - bar.n)
            )
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
