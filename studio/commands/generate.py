"""``python -m studio generate``: one image from a prompt and a mix of LoRAs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pipelines.fusion import REGISTRY
from pipelines.models import SAMPLERS
from pipelines.recipe import MAX_SEED, AdapterSpec, MixRecipe, parse_lora_tags, random_seed


def parse_lora_arg(text: str) -> AdapterSpec:
    """``PATH[:W[:UNET_W]]`` → an adapter spec (``W`` is the text-encoder weight when ``UNET_W`` is given)."""
    parts = text.split(":")
    nums: list[float] = []
    while len(parts) > 1 and len(nums) < 2:
        try:
            nums.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    path = ":".join(parts)
    if not nums:
        return AdapterSpec(ref=path)
    if len(nums) == 1:
        return AdapterSpec(ref=path, weight=nums[0])
    te, unet = nums
    return AdapterSpec(ref=path, weight=1.0, te=te, unet=unet)


def parse_size(text: str) -> tuple[int, int]:
    """``WxH`` → (width, height)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"size must look like 512x512, got {text!r}") from exc
    return w, h


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    """Add the ``generate`` command."""
    p = sub.add_parser(
        "generate", parents=[parent], help="generate an image with a mix of LoRAs", description=__doc__
    )
    p.add_argument(
        "--model", default="pocket", help="pocket, a diffusers folder, a .safetensors file or a Hub id"
    )
    p.add_argument(
        "--prompt",
        default=None,
        help="the prompt; A1111 <lora:name:w> tags name LoRAs of the --data-dir catalog (name, file stem "
        "or hash), as in the studio's prompt box",
    )
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:W[:UNET_W]]",
        help="a LoRA file and its weight (repeatable)",
    )
    p.add_argument(
        "--fusion",
        default="linear",
        help=f"fusion policy: {', '.join(sorted(REGISTRY))} (gate needs "
        '--fusion-args \'{"checkpoint": "GATE"}\': a file from `studio gate train`, or the name or '
        "hash of a gate in the --data-dir catalog)",
    )
    p.add_argument(
        "--fusion-args", default="{}", help='policy parameters as JSON, e.g. \'{"blocks": "OUTD"}\''
    )
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 50, diffusers' default)")
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the CPU torch.Generator; -1 (the default for a new prompt, as in A1111) draws a "
        "random one, which is printed and recorded in the PNG; a replayed --recipe keeps its own seed",
    )
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default 7.5)")
    p.add_argument("--size", type=parse_size, default=None, help="WxH (default: the model's native size)")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default=None, help="default: the model's scheduler")
    p.add_argument("--batch", type=int, default=1, help="images per prompt")
    p.add_argument(
        "--clip-skip",
        type=int,
        default=None,
        metavar="N",
        help="A1111's Clip skip: 1 = the text encoder's last layer (default), 2 = the penultimate one "
        "(SD 1.x and pocket; SD 2.x and SDXL ignore it, as A1111 does)",
    )
    p.add_argument("--recipe", type=Path, default=None, help="replay the recipe embedded in a studio PNG")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", help="auto, fp32, fp16, bf16")
    p.add_argument("--out", type=Path, required=True, help="output PNG (batches get -1, -2 … suffixes)")
    p.set_defaults(func=run)


def check_replayed_refs(recipe: MixRecipe, source: Path) -> None:
    """Refuse a replayed recipe's adapter path that exists here but is no ``.safetensors`` file or folder:
    a PNG can come from anyone, and ``/etc/passwd`` is no LoRA while ``/dev/zero`` would be hashed forever."""
    for i, spec in enumerate(recipe.adapters, 1):
        if spec.ref.startswith("sha256:"):
            continue
        try:
            path = Path(spec.ref).expanduser()
            ok = (
                not path.exists()
                or path.is_dir()
                or (path.is_file() and path.suffix.lower() == ".safetensors")
            )
        except (OSError, ValueError, RuntimeError):  # a NUL in the path, a user ~ that does not exist
            ok = False
        if not ok:
            raise ValueError(
                f"{source}: recipe adapter {i} field 'ref' {spec.ref[:200]!r} is not a .safetensors LoRA "
                "file or a LoRA folder; it is not read"
            )


def recipe_from_args(args: argparse.Namespace) -> MixRecipe:
    """The recipe the command line describes (a replayed recipe with explicit overrides applied)."""
    if args.recipe is not None:
        from pipelines.pngmeta import read_recipe

        base = read_recipe(args.recipe)
        check_replayed_refs(base, args.recipe)
    else:
        if not args.prompt:
            raise ValueError("--prompt is required (or --recipe FILE.png to replay)")
        parse_lora_tags(args.prompt)  # a malformed tag is an error before anything loads
        base = MixRecipe(prompt=args.prompt)
    try:
        fusion_args = json.loads(args.fusion_args)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--fusion-args is not valid JSON: {exc}") from exc
    changes: dict = {}
    if args.recipe is None:
        changes = dict(
            negative_prompt=args.negative,
            adapters=tuple(parse_lora_arg(x) for x in args.lora),
            fusion=args.fusion,
            fusion_args=fusion_args,
            model=args.model,
            batch_size=args.batch,
        )
    seed = args.seed if args.seed is not None or args.recipe is not None else -1
    if seed is not None and not -1 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be -1 (random) or 0 to {MAX_SEED} (2^63 - 1), got {seed}")
    for key, value in (
        ("steps", args.steps),
        ("seed", random_seed() if seed == -1 else seed),
        ("guidance", args.guidance),
        ("sampler", args.sampler),
        ("clip_skip", getattr(args, "clip_skip", None)),
    ):
        if value is not None:
            changes[key] = value
    if args.size is not None:
        changes["width"], changes["height"] = args.size
    return base.with_(**changes)


def with_prompt_tags(recipe: MixRecipe, services: Any) -> tuple[MixRecipe, list[str]]:
    """The recipe with its prompt's ``<lora:name:w>`` tags found in ``services.catalog`` (name, file stem
    or hash) and added after the ``--lora`` adapters, as the Create tab does; keyframed tags turn
    ``linear`` into ``schedule``. Returns notes (which adapter an ambiguous name picked)."""
    from studio.handlers.create import schedule_entry
    from studio.handlers.generate import tag_items

    try:
        clean, items, notes = tag_items(services, recipe.prompt)
    except LookupError as exc:  # e.g. a name the catalog does not hold
        raise ValueError(f"{exc.args[0]} (--data-dir {services.config.data_dir}); import it first") from None
    if not items:
        return recipe, notes
    changes: dict[str, Any] = {"prompt": clean, "adapters": (*recipe.adapters, *(i.spec() for i in items))}
    if any(i.schedule not in ("1", "1.0") for i in items):
        if recipe.fusion not in ("linear", "schedule") or "schedule" in recipe.fusion_args:
            raise ValueError(
                "keyframed <lora:…:w@pos,…> tags need the schedule policy without a --fusion-args schedule "
                f"of its own (got --fusion {recipe.fusion})"
            )
        plain = ["1"] * len(recipe.adapters)
        changes["fusion"] = "schedule"
        changes["fusion_args"] = {
            **recipe.fusion_args,
            "schedule": [*plain, *(schedule_entry(i.schedule) for i in items)],
        }
    return recipe.with_(**changes), notes


def run(args: argparse.Namespace) -> int:
    """Generate and write the image(s) with their recipe embedded."""
    from tqdm import tqdm

    from studio.config import StudioConfig
    from studio.services import LazyCatalog, build_engine_services, data_dir

    recipe = recipe_from_args(args)
    config = StudioConfig(
        data_dir=data_dir(args.data_dir), model=recipe.model, device=args.device, dtype=args.dtype
    )
    catalog = LazyCatalog(config)  # catalog adapters (sha256:… refs, prompt tags) and gates, if named
    services = build_engine_services(config, resolve=catalog.resolve, resolve_gate=catalog.resolve_gate)
    if parse_lora_tags(recipe.prompt)[1]:
        services.catalog = catalog()
        recipe, notes = with_prompt_tags(recipe, services)
        for note in notes:
            print(note, file=sys.stderr)
    print(f"seed {recipe.seed}", file=sys.stderr)
    with tqdm(total=recipe.steps, desc="generate", unit="step") as bar:

        def on_step(i: int, n: int) -> None:
            bar.update(i - bar.n)

        result = services.engine.generate(recipe, on_step=on_step)
    for i in range(len(result.images)):
        out = (
            args.out
            if len(result.images) == 1
            else args.out.with_name(f"{args.out.stem}-{i + 1}{args.out.suffix}")
        )
        result.save(out, i)
        print(out)
    return 0
