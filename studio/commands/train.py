"""``python -m studio train``: train a LoRA from a folder of pictures, with a progress bar.

The run is an ordinary training job (a row in the jobs table, pictures stored by hash, checkpoints
in ``<data-dir>/jobs/<id>``); Ctrl-C cancels it at the next step and keeps the checkpoint, and
``--resume JOB_ID`` continues it.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

from studio.config import DEFAULT_MODEL, StudioConfig, default_data_dir

# argparse destination → TrainSpec field, for the options that map one to one.
SPEC_OPTIONS: dict[str, str] = {
    "class_word": "class_word",
    "rank": "rank",
    "alpha": "alpha",
    "steps": "steps",
    "epochs": "epochs",
    "lr": "learning_rate",
    "text_encoder_lr": "text_encoder_lr",
    "lr_scheduler": "lr_scheduler",
    "warmup": "lr_warmup_steps",
    "lora_plus_ratio": "lora_plus_ratio",
    "batch_size": "batch_size",
    "grad_accum": "grad_accum",
    "resolution": "resolution",
    "captions": "caption_source",
    "caption_template": "caption_template",
    "caption_dropout": "caption_dropout",
    "keep_tokens": "keep_tokens",
    "keep_tokens_separator": "keep_tokens_separator",
    "caption_separator": "caption_separator",
    "caption_tag_dropout": "caption_tag_dropout",
    "targets": "targets",
    "num_class_images": "num_class_images",
    "prior_loss_weight": "prior_loss_weight",
    "prior_caption_dropout": "prior_caption_dropout",
    "prior_target": "prior_target",
    "noise_offset": "noise_offset",
    "mixed_precision": "mixed_precision",
    "clip_skip": "clip_skip",
    "seed": "seed",
    "sample_every": "sample_every",
    "checkpoint_every": "checkpoint_every",
    "name": "name",
}
FLAGS: dict[str, tuple[str, bool]] = {  # flag → (field, value when given)
    "rslora": ("use_rslora", True),
    "dora": ("use_dora", True),
    "train_text_encoder": ("train_text_encoder", True),
    "no_bucketing": ("bucketing", False),
    "no_cache_latents": ("cache_latents", False),
    "gradient_checkpointing": ("gradient_checkpointing", True),
    "orthogonal": ("orthogonal", True),
    "shuffle_caption": ("shuffle_caption", True),
    "flip_aug": ("flip_aug", True),
    "color_aug": ("color_aug", True),
    "random_crop": ("random_crop", True),
}

FLAG_HELP: dict[str, str] = {
    "shuffle_caption": "shuffle each caption's comma-separated tags every step (kohya's shuffle_caption)",
    "flip_aug": "train on the mirror image of a picture half the time (works with cached latents)",
    "color_aug": "small random hue or gamma changes (needs --no-cache-latents)",
    "random_crop": "crop at a random place instead of the centre (needs --no-cache-latents)",
}


def _add_spec_options(p: argparse.ArgumentParser) -> None:
    """The training options (unset ones keep the preset's value)."""
    from pipelines.training import config as c

    g = p.add_argument_group("training options (defaults: the preset)")
    g.add_argument("--preset", choices=sorted(c.PRESETS), default="balanced")
    g.add_argument(
        "--class-word",
        help="what the subject is (e.g. 'dog'); turns on prior preservation "
        "(the pocket model has one from its own domain without it)",
    )
    for name, typ in (
        ("rank", int),
        ("alpha", float),
        ("steps", int),
        ("epochs", int),
        ("lr", float),
        ("text-encoder-lr", float),
        ("warmup", int),
        ("lora-plus-ratio", float),
        ("batch-size", int),
        ("grad-accum", int),
        ("resolution", int),
        ("caption-dropout", float),
        ("prior-caption-dropout", float),
        ("num-class-images", int),
        ("prior-loss-weight", float),
        ("noise-offset", float),
        ("clip-skip", int),
        ("seed", int),
        ("sample-every", int),
        ("checkpoint-every", int),
    ):
        g.add_argument(f"--{name}", type=typ)
    g.add_argument("--min-snr-gamma", type=float, help="min-SNR γ (0 turns the weighting off)")
    g.add_argument("--lr-scheduler", choices=c.LR_SCHEDULERS)
    g.add_argument("--captions", choices=c.CAPTION_SOURCES, help="where captions come from (default auto)")
    g.add_argument("--caption-template", help="e.g. 'a photo of {trigger} {class_word}'")
    g.add_argument(
        "--keep-tokens",
        type=int,
        metavar="N",
        help="with --shuffle-caption / --caption-tag-dropout: the first N tags stay in place (kohya's "
        "keep_tokens; 1 keeps a leading trigger first)",
    )
    g.add_argument(
        "--keep-tokens-separator",
        metavar="MARK",
        help="tags before MARK (and after a second MARK) stay in place, e.g. '|||' (kohya's form)",
    )
    g.add_argument("--caption-separator", metavar="SEP", help="what splits a caption into tags (default ',')")
    g.add_argument(
        "--caption-tag-dropout",
        "--caption-tag-dropout-rate",
        dest="caption_tag_dropout",
        type=float,
        metavar="P",
        help="drop each tag that is not kept with probability P (a tag with the trigger never)",
    )
    g.add_argument("--targets", choices=sorted(c.UNET_TARGETS))
    g.add_argument("--target-modules", help="comma-separated UNet module names (overrides --targets)")
    g.add_argument("--mixed-precision", choices=c.MIXED_PRECISION)
    g.add_argument("--sample-prompt", action="append", help="a prompt to sample during training (repeatable)")
    g.add_argument(
        "--prior-target",
        choices=c.PRIOR_TARGETS,
        help="what class images train towards: the added noise (DreamBooth) or the base model's "
        "own prediction (distillation; the pocket model's default)",
    )
    g.add_argument("--no-prior", action="store_true", help="no prior preservation even with a class word")
    g.add_argument(
        "--class-prompt",
        help="prompt of the class images; {caption}: each picture's caption "
        "with the trigger → class word (default)",
    )
    g.add_argument(
        "--prior-prompt",
        action="append",
        help="a prompt for class images (repeatable; replaces --class-prompt)",
    )
    g.add_argument("--name", help="adapter name (default: the trigger)")
    for flag in FLAGS:
        g.add_argument(f"--{flag.replace('_', '-')}", action="store_true", help=FLAG_HELP.get(flag))


def register(sub: Any, parent: argparse.ArgumentParser) -> None:
    """Add the ``train`` command."""
    p = sub.add_parser(
        "train",
        parents=[parent],
        help="train a LoRA from a folder of pictures",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--images", type=Path, help="folder of pictures (with optional same-name .txt captions)")
    p.add_argument("--trigger", help="the word that calls up the new concept")
    p.add_argument(
        "--model", default=None, help=f"base model: pocket or a diffusers folder (default {DEFAULT_MODEL})"
    )
    p.add_argument("--out", type=Path, help="output .safetensors (default: inside the job folder)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-register", action="store_true", help="do not add the adapter to the catalog")
    p.add_argument("--resume", metavar="JOB_ID", help="continue a cancelled, failed or interrupted job")
    _add_spec_options(p)
    p.set_defaults(func=run)


def spec_from_args(args: argparse.Namespace) -> Any:
    """A TrainSpec from the preset and the options given on the command line."""
    from pipelines.training import preset

    if not args.trigger:
        raise ValueError("--trigger is required")
    overrides = {f: getattr(args, a) for a, f in SPEC_OPTIONS.items() if getattr(args, a) is not None}
    overrides |= {f: v for flag, (f, v) in FLAGS.items() if getattr(args, flag)}
    if args.min_snr_gamma is not None:
        overrides["min_snr_gamma"] = args.min_snr_gamma or None
    if args.target_modules:
        overrides["target_modules"] = tuple(m.strip() for m in args.target_modules.split(",") if m.strip())
    if args.sample_prompt:
        overrides["sample_prompts"] = tuple(args.sample_prompt)
    if args.class_prompt:
        overrides["class_prompt"] = args.class_prompt
    if args.prior_prompt:
        overrides["prior_prompts"] = tuple(args.prior_prompt)
    if args.no_prior:
        overrides["prior_preservation"] = False
    return preset(args.preset, args.trigger, **overrides)


class ProgressBar:
    """A tqdm bar over training steps whose label follows the phase."""

    def __init__(self) -> None:
        self.bar: Any = None

    def __call__(self, p: Any) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=p.total, initial=p.step, unit="step", dynamic_ncols=True)
        self.bar.set_description(p.phase)
        self.bar.total = p.total
        self.bar.n = p.step
        if p.loss is not None:
            self.bar.set_postfix(loss=f"{p.loss:.4f}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _submit(runner: Any, args: argparse.Namespace) -> str:
    """Queue a new job from the command line's folder and options."""
    from studio.jobs import folder_files

    if args.images is None:
        raise ValueError("--images is required (or --resume JOB_ID)")
    if args.out is not None and args.out.exists() and not args.overwrite:
        raise ValueError(f"{args.out} exists; pass --overwrite to replace it")
    if args.out is not None and args.out.suffix != ".safetensors":
        raise ValueError(f"--out must end in .safetensors, got {args.out.name}")
    return runner.submit(
        spec_from_args(args),
        folder_files(args.images),
        model=args.model,
        out=None if args.out is None else args.out.expanduser().resolve(),
        device=args.device,
        register=not args.no_register,
    )


def run(args: argparse.Namespace) -> int:
    """Train in this process; returns 0 when the adapter was written, 1 when cancelled or failed."""
    from studio.jobs import JobRunner, register_in_catalog

    data_dir = Path(args.data_dir).expanduser().resolve()  # rows keep paths that work from any cwd
    config = StudioConfig(data_dir=data_dir, model=args.model or DEFAULT_MODEL, device=args.device)
    runner = JobRunner(config, registrar=None if args.no_register else register_in_catalog)
    if args.resume:
        try:
            runner.status(args.resume)
        except KeyError:
            raise ValueError(f"no training job {args.resume!r} in {data_dir}") from None
        if owner := runner.live_elsewhere(args.resume):
            raise ValueError(
                f"job {args.resume} is running in another process ({owner}); cancel it there, or wait"
            )
        runner.recover()
        if runner.status(args.resume).status in ("cancelled", "failed"):
            runner.resume(args.resume)
        job_id = args.resume
    else:
        job_id = _submit(runner, args)
    print(f"job {job_id}", file=sys.stderr)
    previous = signal.signal(signal.SIGINT, lambda *_: runner.cancel(job_id))
    bar = ProgressBar()
    try:
        status = runner.run_job(job_id, progress=bar)
    finally:
        bar.close()
        signal.signal(signal.SIGINT, previous)
    return _report(status, data_dir)


def resume_command(job_id: str, data_dir: Path) -> str:
    """The command line that resumes a job (``--data-dir`` named when it is not the default)."""
    words = ["python", "-m", "studio", "train", "--resume", job_id]
    if data_dir.resolve() != default_data_dir().expanduser().resolve():
        words += ["--data-dir", str(data_dir.resolve())]
    return shlex.join(words)


def _report(status: Any, data_dir: Path) -> int:
    """Print how the job ended."""
    if status.status == "done":
        print(status.out_path)
        if status.adapter_id:
            print(f"registered in the catalog as {status.adapter_id}", file=sys.stderr)
        return 0
    print(f"{status.status}: {status.reason}", file=sys.stderr)
    if status.status == "cancelled":
        print(f"resume with: {resume_command(status.id, data_dir)}", file=sys.stderr)
    return 1
