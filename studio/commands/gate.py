"""``python -m studio gate``: train a learned gate (AutoLoRA-style) for a set of LoRAs, register gate
checkpoints in the catalog and list them.

    python -m studio gate train --lora pocket-star --lora pocket-striped --steps 600 --register
    python -m studio gate train --lora a.safetensors --lora b.safetensors --prompts a=a.txt --prompts b=b.txt
    python -m studio gate register runs/gate/full.safetensors --name pocket-gate
    python -m studio gate list

A LoRA is a catalog name (or hash) or a ``.safetensors`` path. Its prompts come from ``--prompts
NAME=FILE`` (one per line), else the pocket world's captions for a pocket concept LoRA, else the
catalog's sample prompts and training captions, else its trigger words.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.config import DEFAULT_MODEL, StudioConfig

_HEX = re.compile(r"^(sha256:)?([0-9a-fA-F]{10}|[0-9a-fA-F]{64})$")


@dataclass(frozen=True)
class LoraSource:
    """A LoRA to route: its name, file, SHA-256 and the prompts that ask for it."""

    name: str
    path: Path
    sha256: str
    prompts: tuple[str, ...]


def register(sub: Any, parent: argparse.ArgumentParser) -> None:
    """Add the ``gate`` command with its ``train``, ``register`` and ``list`` subcommands."""
    p = sub.add_parser(
        "gate",
        help="learned gate: train, register, list",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gsub = p.add_subparsers(dest="gate_command", required=True, metavar="SUBCOMMAND")

    t = gsub.add_parser("train", parents=[parent], help="train a gate for a set of LoRAs")
    t.add_argument("--model", default=DEFAULT_MODEL, help=f"base model (default {DEFAULT_MODEL})")
    t.add_argument("--lora", action="append", default=[], metavar="NAME_OR_FILE", help="repeat: 2 or more")
    t.add_argument(
        "--pair",
        action="append",
        default=[],
        metavar="I:J",
        help="ordered training pair of --lora positions from 0 (repeatable; default: every ordered pair)",
    )
    t.add_argument("--prompts", action="append", default=[], metavar="NAME=FILE", help="prompts of a LoRA")
    t.add_argument("--no-time", action="store_true", help="no timestep input")
    t.add_argument("--no-prompt", action="store_true", help="no prompt input")
    t.add_argument("--steps", type=int, default=600, help="optimiser steps (default 600)")
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--images-per-lora", type=int, default=32, help="pictures each LoRA makes alone")
    t.add_argument("--sample-steps", type=int, default=20, help="denoising steps of those pictures")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto")
    t.add_argument("--out", type=Path, default=None, help="output .safetensors (default: <data-dir>/gates/…)")
    t.add_argument("--name", default=None, help="catalog name (default: the file stem)")
    t.add_argument("--register", action="store_true", help="store the gate in the catalog")
    t.add_argument("--db-url", default=None, help="SQLAlchemy URL of the catalog")
    t.set_defaults(func=cmd_train)

    r = gsub.add_parser("register", parents=[parent], help="store a gate file in the catalog")
    r.add_argument("file", type=Path)
    r.add_argument("--name", default=None)
    r.add_argument(
        "--family",
        action="append",
        default=[],
        help="base family it fits (repeatable); only for a gate file that records none: a gate runs on "
        "the family it was trained for, so naming another is refused",
    )
    r.add_argument("--lora", action="append", default=[], metavar="NAME[=SHA256]", help="a LoRA it routes")
    r.add_argument("--db-url", default=None)
    r.set_defaults(func=cmd_register)

    ls = gsub.add_parser("list", parents=[parent], help="list the catalog's gate checkpoints")
    ls.add_argument("--family", default=None, help="only gates that fit this base family")
    ls.add_argument("--db-url", default=None)
    ls.set_defaults(func=cmd_list)


def _catalog(args: argparse.Namespace) -> Any:
    import adapters_db

    config = StudioConfig(data_dir=Path(args.data_dir).expanduser())
    return adapters_db.open_catalog(args.db_url or config.catalog_url, config.data_dir)


def parse_pairs(texts: list[str], n: int) -> list[tuple[int, int]]:
    """``I:J`` pairs of LoRA positions (default: every ordered pair of different LoRAs)."""
    if not texts:
        return [(i, j) for i in range(n) for j in range(n) if i != j]
    pairs = []
    for text in texts:
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
        if m is None:
            raise ValueError(f"--pair {text!r}: write I:J with LoRA positions from 0, e.g. 0:1")
        i, j = int(m[1]), int(m[2])
        if i == j or max(i, j) >= n:
            raise ValueError(f"--pair {text!r}: two different positions below {n}")
        pairs.append((i, j))
    return pairs


def parse_prompt_files(texts: list[str]) -> dict[str, tuple[str, ...]]:
    """``NAME=FILE`` options → prompts per LoRA name."""
    from pipelines.gate.prompts import read_prompt_file

    out = {}
    for text in texts:
        name, sep, file = text.partition("=")
        if not sep or not name.strip() or not file.strip():
            raise ValueError(f"--prompts {text!r}: write NAME=FILE")
        path = Path(file.strip()).expanduser()
        try:
            prompts = read_prompt_file(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"--prompts {text!r}: no such file {path}") from exc
        except OSError as exc:  # a folder, no permission
            raise ValueError(f"--prompts {text!r}: cannot read {path} ({exc.strerror or exc})") from exc
        if not prompts:
            raise ValueError(f"--prompts {text!r}: the file holds no prompt")
        out[name.strip()] = prompts
    return out


def _catalog_lora(session: Any, catalog: Any, ref: str) -> Any:
    """A LoRA record by hash or exact name / file stem (gates excluded)."""
    import adapters_db

    record = None
    m = _HEX.match(ref)
    if m is not None:
        record = adapters_db.find_by_hash(session, catalog, m[2])
    if record is None:
        page = adapters_db.list_adapters(session, catalog, text=ref, include_nsfw=True, limit=50)
        want = ref.strip().lower()
        for summary in page.items:
            full = adapters_db.get_adapter(session, catalog, summary.id)
            stems = {f.file_name.rsplit(".", 1)[0].lower() for f in (full.files if full else ())}
            if full is not None and (full.name.lower() == want or want in stems):
                record = full
                break
    if record is not None and record.kind == "gate":
        raise ValueError(f"{ref!r} is a gate checkpoint, not a LoRA")
    return record


def resolve_loras(args: argparse.Namespace) -> list[LoraSource]:
    """The ``--lora`` references as files with prompts (catalog opened only when needed)."""
    from pipelines.gate.prompts import lora_prompts
    from pipelines.hashing import sha256_file

    if len(args.lora) < 2:
        raise ValueError("give at least two --lora (catalog names or .safetensors files)")
    given = parse_prompt_files(args.prompts)
    catalog = None
    out = []
    for ref in args.lora:
        path = Path(ref).expanduser()
        triggers: tuple[str, ...] = ()
        catalog_prompts: list[str] = []
        if path.suffix == ".safetensors" and path.is_file():
            name = path.stem
        else:
            catalog = catalog or _catalog(args)
            with catalog.session() as session:
                record = _catalog_lora(session, catalog, ref)
            bundled = bundled_pocket_lora(ref)
            if record is None and bundled is not None:  # a data dir the studio never seeded
                name, path = bundled.stem, bundled
            elif record is None:
                raise FileNotFoundError(f"--lora {ref!r} is neither a .safetensors file nor in the catalog")
            else:
                from adapters_db import local_file_path

                local = local_file_path(record)
                if local is None:
                    raise FileNotFoundError(f"--lora {ref!r}: the catalog has no local file for it")
                name, path, triggers = record.name, local, record.trigger_words
                catalog_prompts = [i.prompt for i in record.images if i.prompt]
        prompts = given.get(name) or given.get(ref) or lora_prompts(name, triggers, catalog_prompts)
        if not prompts:
            raise ValueError(f"no prompts for LoRA {name!r}: give --prompts {name}=FILE (one per line)")
        out.append(LoraSource(name, path, sha256_file(path), prompts))
    unknown = set(given) - {s.name for s in out} - set(args.lora)
    if unknown:
        raise ValueError(f"--prompts names no --lora: {', '.join(sorted(unknown))}")
    seen: dict[str, str] = {}
    for ref, source in zip(args.lora, out, strict=True):
        if source.sha256 in seen:
            first = seen[source.sha256]
            raise ValueError(f"--lora {first!r} and --lora {ref!r} are the same file")
        seen[source.sha256] = ref
    return out


def bundled_pocket_lora(ref: str) -> Path | None:
    """The pocket model's own concept LoRA file a name stands for (``pocket-star``), or None."""
    from pipelines.gate.prompts import POCKET_PREFIX, pocket_concept
    from pipelines.pocket.evaluate import LORA_DIR

    concept = pocket_concept(ref) if ref.strip().lower().startswith(POCKET_PREFIX) else None
    path = LORA_DIR / f"{POCKET_PREFIX}{concept}.safetensors"
    return path if concept is not None and path.is_file() else None


def prepare_out(out: Path) -> Path:
    """Check the output path and create its folder (before anything is trained)."""
    if out.suffix != ".safetensors":
        raise ValueError(f"--out must end in .safetensors, got {out.name}")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; name the .safetensors file to write")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where a folder should be, no permission
        raise ValueError(f"--out {out}: cannot create {out.parent} ({exc.strerror or exc})") from exc
    return out


def check_name_free(args: argparse.Namespace, name: str) -> None:
    """Refuse, before training, a ``--register`` name another catalogued gate already has."""
    from adapters_db.gates import gate_named, name_taken_message

    catalog = _catalog(args)
    try:
        with catalog.session() as session:
            taken = gate_named(session, catalog, name)
    finally:
        catalog.dispose()
    if taken is not None:
        raise ValueError(name_taken_message(taken))


def default_out(args: argparse.Namespace, names: list[str]) -> Path:
    """``<data-dir>/gates/<model>-<lora names>[-no-time][-no-prompt].safetensors``."""
    model = Path(args.model).stem or "model"
    suffix = ("-no-time" if args.no_time else "") + ("-no-prompt" if args.no_prompt else "")
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{model}-{'+'.join(names)}{suffix}")[:150]
    return Path(args.data_dir).expanduser() / "gates" / f"{stem}.safetensors"


def cmd_train(args: argparse.Namespace) -> int:
    """Train a gate: sample each LoRA's own pictures, fit the gate, write (and register) it."""
    import torch
    from tqdm import tqdm

    from pipelines.adapter_cache import AdapterCache
    from pipelines.gate.train import GateLora, GateTrainConfig, lora_latents, require_gate_layers, train_gate
    from pipelines.models import load_pipeline, model_family, resolve_device

    cfg = GateTrainConfig(  # options checked before anything is loaded
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        use_time=not args.no_time,
        use_prompt=not args.no_prompt,
        images_per_lora=args.images_per_lora,
        sample_steps=args.sample_steps,
        seed=args.seed,
    )
    if args.name is not None and not args.name.strip():
        raise ValueError("--name is empty")
    sources = resolve_loras(args)
    pairs = parse_pairs(args.pair, len(sources))
    out = prepare_out((args.out or default_out(args, [s.name for s in sources])).expanduser())
    if args.register:
        check_name_free(args, (args.name or out.stem).strip())
    pipe = load_pipeline(args.model, resolve_device(args.device), torch.float32)
    family = model_family(pipe)
    cache = AdapterCache()
    loras = [
        GateLora(s.name, cache.device(s.path, pipe.unet.device, torch.float32)[1], s.prompts) for s in sources
    ]
    require_gate_layers(pipe, loras)  # before the LoRAs' pictures are sampled
    data = {}
    for i, lora in enumerate(tqdm(loras, desc="sampling each LoRA alone", unit="lora")):
        data[i] = lora_latents(pipe, lora, cfg.images_per_lora, cfg, cfg.seed + i)
    with tqdm(total=cfg.steps, desc="training gate", unit="step", dynamic_ncols=True) as bar:

        def progress(step: int, total: int, loss: float) -> None:
            bar.update(step - bar.n)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

        net, losses = train_gate(pipe, loras, pairs, cfg, family=family, data=data, progress=progress)
    net.save(out)
    print(out)
    print(
        f"{net.parameter_count()} gate parameters over {len(net.channels)} layers, family {family}, "
        f"final loss {losses[-1]:.4f}",
        file=sys.stderr,
    )
    if args.register:
        from adapters_db.gates import RoutedLora

        gate = _register(args, out, args.name, [RoutedLora(s.name, s.sha256) for s in sources], [])
        print(
            f"registered in the catalog as {gate.name!r} (id {gate.id}, AutoV2 {gate.autov2})",
            file=sys.stderr,
        )
    return 0


def _register(
    args: argparse.Namespace, path: Path, name: str | None, loras: list, families: list[str]
) -> Any:
    from adapters_db.gates import register_gate

    catalog = _catalog(args)
    try:
        with catalog.session() as session:
            return register_gate(session, catalog, path, name=name, families=families, loras=loras)
    finally:
        catalog.dispose()


def cmd_register(args: argparse.Namespace) -> int:
    """Store an existing gate file in the catalog."""
    from adapters_db.gates import RoutedLora

    loras = []
    for text in args.lora:
        name, _, sha = text.partition("=")
        sha = sha.strip().lower()
        if not name.strip() or (sha and _HEX.match(sha) is None):
            raise ValueError(f"--lora {text!r}: write NAME or NAME=SHA256 (64 hex digits, or AutoV2's 10)")
        loras.append(RoutedLora(name.strip(), sha.removeprefix("sha256:") or None))
    gate = _register(args, args.file, args.name, loras, args.family)
    print(f"{gate.id}\t{gate.name}\t{gate.autov2}\t{','.join(gate.families) or 'any'}")
    wanted = (args.name or "").strip()
    if (wanted and wanted != gate.name) or (loras and list(gate.loras) != loras):
        print(
            f"these bytes are already in the catalog as {gate.name!r} (id {gate.id}); nothing was changed",
            file=sys.stderr,
        )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """One line per catalogued gate: id, name, AutoV2 hash, families, routed LoRAs."""
    from adapters_db.gates import list_gates

    catalog = _catalog(args)
    try:
        with catalog.session() as session:
            gates = list_gates(session, catalog, base_family=args.family)
    finally:
        catalog.dispose()
    for g in gates:
        routes = ", ".join(lo.name for lo in g.loras) or "-"
        print(f"{g.id}\t{g.name}\t{g.autov2}\t{','.join(g.families) or 'any'}\t{routes}")
    if not gates:
        print("no gate checkpoints in the catalog", file=sys.stderr)
    return 0
