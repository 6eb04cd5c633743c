"""Catalog commands: ``import``, ``import-civitai``, ``import-hf``, ``search`` and ``catalog`` (stats, repair,
reindex, show, delete)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from studio.config import StudioConfig


def _catalog(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    import adapters_db

    config = StudioConfig(data_dir=Path(args.data_dir).expanduser())
    url = args.db_url or config.catalog_url
    embedder = args.embedder or os.environ.get("STUDIO_EMBEDDER") or None
    return adapters_db.open_catalog(url, config.data_dir, embedder=embedder)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--db-url",
        default=None,
        help="SQLAlchemy URL of the catalog (default: $STUDIO_DB_URL, else "
        "catalog.sqlite in the data dir); e.g. postgresql+psycopg2://user@host/db",
    )
    p.add_argument(
        "--embedder",
        default=None,
        help="auto (default), minilm, hashing[-DIM], open_clip:MODEL:TAG_OR_CHECKPOINT, "
        "open_clip:local-dir:FOLDER",
    )


def _print_summary(summary: Any, verbose: bool) -> int:
    for result in summary.results:
        if result.status == "failed" or verbose:
            where = result.source or result.name or ""
            detail = f" — {result.message}" if result.message else ""
            print(f"{result.status:9} {where}{detail}", file=sys.stderr)
    print(f"summary: {summary.describe()}")
    return 1 if summary.count("failed") and not any(r.ok for r in summary.results) else 0


def _embed(catalog: Any, args: argparse.Namespace) -> None:
    if args.no_embed:
        return
    from adapters_db import embed_missing

    made = embed_missing(catalog, show_progress=True)
    if made:
        print(f"embedded {made} text(s)/image(s) with {catalog.embedder.name}", file=sys.stderr)


# ---------------------------------------------------------------------------------------- import
def cmd_import(args: argparse.Namespace) -> int:
    """Import .safetensors files and A1111/ComfyUI LoRA folders."""
    from adapters_db import import_paths

    extra: dict[str, Any] = {}
    if args.name:
        extra["name"] = args.name
    if args.tag:
        extra["tags"] = args.tag
    if args.trigger:
        extra["trigger_words"] = args.trigger
    if args.base:
        extra["base_family"] = args.base
    catalog = _catalog(args)
    try:
        with catalog.session() as s:
            paths = [Path(p) for p in args.paths]
            summary = import_paths(s, catalog, paths, show_progress=True, commit_each=True, **extra)
    except KeyboardInterrupt:
        return interrupted()
    _embed(catalog, args)
    return _print_summary(summary, args.verbose)


INTERRUPTED = 130  # the shell's exit status for Ctrl-C (128 + SIGINT)


def interrupted() -> int:
    """Say what an import stopped with Ctrl-C keeps (imports commit each item); the exit status."""
    print(
        "\ninterrupted: the items imported before it are kept in the catalog; run the same command again "
        "to go on (those already in are reported as duplicates or updated)",
        file=sys.stderr,
    )
    return INTERRUPTED


def cmd_import_civitai(args: argparse.Namespace) -> int:
    """Import Civitai API dumps (.jsonl, .jsonl.gz, .json) or query the live API."""
    from adapters_db import import_civitai_jsonl
    from adapters_db.dto import ImportResult, ImportSummary

    catalog = _catalog(args)
    results = []
    if args.api:
        from adapters_db.importers.civitai_api import CivitaiClient, import_from_api

        client = CivitaiClient(base_url=args.base_url, api_key=os.environ.get("CIVITAI_API_KEY"))
        with catalog.session() as s:
            summary = import_from_api(
                s,
                catalog,
                client,
                query=args.query,
                limit=args.limit or 100,
                download=args.download,
                show_progress=True,
            )
        results.extend(summary.results)
    for path in args.files:
        if not Path(path).is_file():  # one failed item; the other files still run
            results.append(ImportResult(str(path), "failed", message=f"no such file: {path}"))
            continue
        try:
            with catalog.session() as s:
                summary = import_civitai_jsonl(
                    s, catalog, Path(path), limit=args.limit, show_progress=True, commit_each=True
                )
        except KeyboardInterrupt:
            return interrupted()
        results.extend(summary.results)
    if not args.api and not args.files:
        raise ValueError("give one or more dump files, or --api")
    _embed(catalog, args)
    return _print_summary(ImportSummary(tuple(results)), args.verbose)


def cmd_import_hf(args: argparse.Namespace) -> int:
    """Import the LoRA files of Hugging Face model repos."""
    from adapters_db.dto import ImportSummary
    from adapters_db.importers.huggingface import HuggingFaceClient, import_hf_repo

    catalog = _catalog(args)
    client = HuggingFaceClient(base_url=args.base_url, token=os.environ.get("HF_TOKEN"))
    results = []
    for repo in args.repos:
        with catalog.session() as s:
            results.extend(import_hf_repo(s, catalog, client, repo, revision=args.revision).results)
    _embed(catalog, args)
    return _print_summary(ImportSummary(tuple(results)), args.verbose)


# ---------------------------------------------------------------------------------------- search
def _lines(handle: Any, where: str) -> Iterator[str]:
    """The non-blank lines of a binary stream as UTF-8 text (a BOM and CRLF endings dropped); a line that
    is not UTF-8 raises ``ValueError`` naming ``where`` and the line."""
    for number, raw in enumerate(handle, 1):
        try:
            line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError as exc:
            raise ValueError(f"{where}, line {number}: not UTF-8 text ({exc.reason})") from None
        line = line.removesuffix("\n").removesuffix("\r")
        if number == 1:
            line = line.removeprefix("\ufeff")  # Notepad's byte-order mark
        if line.strip():
            yield line


def _prompts(args: argparse.Namespace) -> Iterator[str] | list[str]:
    """The prompts to run: ``--queries`` (a file, read now; ``-``: stdin, read as it comes) or the PROMPT."""
    if args.queries and args.prompt is not None:
        raise ValueError("give a PROMPT or --queries FILE, not both")
    if args.queries == "-":
        return _lines(getattr(sys.stdin, "buffer", sys.stdin), "<stdin>")
    if args.queries:
        try:
            with open(args.queries, "rb") as handle:
                return list(_lines(handle, args.queries))
        except OSError as exc:
            raise ValueError(f"cannot read --queries {args.queries}: {exc.strerror or exc}") from None
    if args.prompt is None:
        raise ValueError("give a PROMPT or --queries FILE")
    return [args.prompt]


def hit_json(hit: Any) -> dict[str, Any]:
    """One hit as the batch JSON format has it."""
    a = hit.adapter
    return {
        "id": a.id,
        "name": a.name,
        "score": round(hit.score, 4),
        "civitai_model_id": a.civitai_model_id,
        "base_family": a.base_family,
        "why": hit.why,
    }


def cmd_search(args: argparse.Namespace) -> int:
    """Find adapters for prompts."""
    from adapters_db import search

    if args.k < 1:
        raise ValueError(f"-k must be at least 1 (got {args.k})")
    if args.offset < 0:
        raise ValueError(f"--offset must be 0 or more (got {args.offset})")
    if args.image is not None:
        return _search_image(args)
    prompts = _prompts(args)  # a bad --queries file fails here, before the index loads
    catalog = _catalog(args)
    licence = args.licence or None
    with catalog.session() as s:
        if catalog.search_index(s, show_progress=sys.stderr.isatty()).size == 0:
            where = catalog.engine.url.render_as_string()  # a password shows as ***
            print(
                f"note: the catalog at {where} has no adapters to search; import some first", file=sys.stderr
            )
        for prompt in prompts:
            hits = search(
                s,
                catalog,
                prompt,
                k=args.k,
                base_family=args.base,
                include_nsfw=args.nsfw,
                tags=args.tag or None,
                licence=licence,
                local_only=True if args.local else None,
                sort=args.sort,
                offset=args.offset,
            )
            if args.json:
                print(
                    json.dumps({"query": prompt, "hits": [hit_json(h) for h in hits]}, ensure_ascii=False),
                    flush=True,
                )
            else:
                _print_hits(prompt, hits, args.offset)
    return 0


def _search_image(args: argparse.Namespace) -> int:
    """``search --image FILE``: the adapters whose previews, prompts and descriptions are closest to a
    picture (an open_clip catalog); the same output as a text search, the file as its query."""
    from adapters_db import search_by_image

    if args.prompt is not None or args.queries:
        raise ValueError("give a PROMPT, --queries FILE or --image FILE, one of them")
    if args.sort != "relevance" or args.offset:
        raise ValueError("--image ranks by likeness: --sort and --offset do not apply")
    if not args.image.is_file():
        raise FileNotFoundError(f"--image {args.image}: no such file")
    catalog = _catalog(args)
    if not catalog.embedder.supports_images:
        raise ValueError(
            f"the catalog's embedder {catalog.embedder.name} reads text only: search by picture needs "
            "--embedder open_clip:MODEL:TAG (or a local checkpoint)"
        )
    with catalog.session() as s:
        hits = search_by_image(
            s,
            catalog,
            str(args.image),
            args.k,
            base_family=args.base,
            include_nsfw=args.nsfw,
            tags=args.tag or None,
            licence=args.licence or None,
            local_only=True if args.local else None,
        )
    if args.json:
        print(json.dumps({"query": str(args.image), "hits": [hit_json(h) for h in hits]}, ensure_ascii=False))
    else:
        _print_hits(f"(picture) {args.image}", hits)
    return 0


# Bidirectional-text controls: shown raw they reorder what a terminal displays ("Trojan Source").
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _plain(text: str) -> str:
    """Text safe to print on a terminal: control characters (escape sequences, line breaks) become ``?`` or
    a space, bidirectional controls are dropped."""
    out = []
    for ch in text:
        if ch in _BIDI:
            continue
        if unicodedata.category(ch) in ("Cc", "Zl", "Zp"):
            ch = " " if ch.isspace() else "?"
        out.append(ch)
    return "".join(out)


def _cell(text: str, width: int) -> str:
    """``text`` cut (with ``…``) and padded to ``width`` terminal columns (CJK characters take two)."""
    cols = [2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1 for ch in text]
    if sum(cols) > width:
        used, cut = 0, 0
        while cut < len(text) and used + cols[cut] <= width - 1:
            used, cut = used + cols[cut], cut + 1
        text, cols = text[:cut] + "…", [*cols[:cut], 1]
    return text + " " * (width - sum(cols))


def _print_hits(prompt: str, hits: list[Any], offset: int = 0) -> None:
    print(f"query: {_plain(prompt)}")
    if not hits:
        print("  (no matching adapters)")
    for position, h in enumerate(hits, offset + 1):
        a = h.adapter
        where = (
            f"civitai {a.civitai_model_id}"
            if a.civitai_model_id
            else ("local" if a.has_local_file else a.source)
        )
        print(
            f"  {position:>2}. {h.score:7.3f}  {_cell(_plain(a.name), 60)}  "
            f"[{_plain(a.base_family or '?')}; id {a.id}; {_plain(str(where))}]"
        )
        print(f"      {_plain(h.why)}")


# ---------------------------------------------------------------------------------------- catalog
MAX_ID = 2**63 - 1  # the database's 64-bit integer keys


def cmd_catalog(args: argparse.Namespace) -> int:
    """Catalog maintenance and inspection."""
    from sqlalchemy.exc import DBAPIError

    from adapters_db.catalog import is_read_only_error

    for adapter_id in args.id or ():
        if not -MAX_ID <= adapter_id <= MAX_ID:
            raise ValueError(f"--id {adapter_id} is out of range (adapter ids are 64-bit integers)")
    edits = _edit_changes(args)
    if args.action != "edit" and edits:
        flags = ", ".join(EDIT_FLAGS[k] for k in edits)
        raise ValueError(f"'catalog {args.action}' does not take {flags} (they are for 'catalog edit')")
    if args.keep_files and args.action != "delete":
        raise ValueError(f"--keep-files only applies to 'catalog delete', not 'catalog {args.action}'")
    catalog = _catalog(args)
    try:
        return _catalog_action(catalog, args)
    except DBAPIError as exc:
        if not is_read_only_error(exc):
            raise
        where = catalog.engine.url.render_as_string(hide_password=True)
        raise RuntimeError(
            f"the catalog database at {where} is read-only; 'catalog {args.action}' needs to write to it"
        ) from None


def _catalog_action(catalog: Any, args: argparse.Namespace) -> int:
    """Run one ``catalog`` action in a session (committed when it returns)."""
    import adapters_db
    from adapters_db.repository import catalog_counts

    with catalog.session() as s:
        if args.action == "stats":
            where = catalog.engine.url.render_as_string(hide_password=True)  # a password shows as ***
            print(json.dumps({**catalog_counts(s), "revision": catalog.revision(s), "url": where}, indent=1))
        elif args.action == "repair":
            report = adapters_db.repair(s, catalog, grace_s=args.grace, verify=args.verify)
            print(report.describe())
        elif args.action == "reindex":
            from adapters_db.weightspace import embed_weight_channels

            adapters_db.embed_missing(catalog, session=s, show_progress=True)
            index = catalog.search_index(s, show_progress=True)
            if index.last_event != "rebuilt":  # it was current: a forced rebuild, weight channels too
                embed_weight_channels(catalog, s, catalog.embedder)
                index.rebuild(s, show_progress=True)
            print(f"rebuilt the search index of {index.size} adapters in {index.directory}")
        elif args.action == "classifier":
            from adapters_db.classifier import build_classifier, classifier_path

            classifier = build_classifier(s, catalog, show_progress=True)
            print(
                f"trained the prompt classifier on {len(classifier.adapter_ids)} adapters "
                f"({len(classifier.vocab)} terms): {classifier_path(catalog)}"
            )
        elif args.action == "matcher":
            from adapters_db.matcher import build_matcher, matcher_path

            matcher = build_matcher(s, catalog, show_progress=True)
            print(
                f"trained the prompt matcher ({len(matcher.query_vocab)} prompt terms, "
                f"{len(matcher.meta_vocab)} metadata terms): {matcher_path(catalog)}"
            )
        elif args.action in ("show", "delete", "edit"):
            if not args.id or len(args.id) > 1:
                raise ValueError(f"catalog {args.action} needs one --id")
            if args.action == "edit":
                return _edit(s, catalog, args.id[0], _edit_changes(args))
            return _show_or_delete(s, catalog, args.action, args.id[0], keep_files=args.keep_files)
        elif args.action == "download":
            return _download(s, catalog, args)
    return 0


def _download(s: Any, catalog: Any, args: argparse.Namespace) -> int:
    """Download and verify the files of remote adapters (``--id``, repeatable); 1 if one failed."""
    from adapters_db.dto import ImportSummary
    from adapters_db.importers.civitai_api import client_from_env, download_files

    if not args.id:
        raise ValueError("catalog download needs --id (repeatable)")
    client = client_from_env()
    results = download_files(s, catalog, list(args.id), client.plain_config, api_key=client.api_key)
    found = {r.adapter_id for r in results}
    missing = [i for i in args.id if i not in found]
    for adapter_id in missing:
        print(f"adapter {adapter_id}: nothing to download (no such adapter, already stored, or no link)")
    summary = ImportSummary(tuple(results))
    _print_summary(summary, verbose=True)
    return 1 if summary.failed or missing else 0


EDIT_FLAGS = {
    "name": "--name",
    "description": "--description",
    "add_tag": "--add-tag",
    "remove_tag": "--remove-tag",
    "clear_tags": "--clear-tags",
    "trigger": "--trigger",
    "clear_triggers": "--clear-triggers",
    "base": "--base",
    "nsfw_level": "--nsfw-level",
    "creator": "--creator",
}


def _edit_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The curation flags of ``catalog edit`` given on the command line (flag name → value)."""
    values = {key: getattr(args, key) for key in EDIT_FLAGS}
    return {k: v for k, v in values.items() if v is not None and v is not False and v != []}  # 0 is a value


def _edit(s: Any, catalog: Any, adapter_id: int, given: dict[str, Any]) -> int:
    """Curate one adapter from the command line (``adapters_db.update_metadata``) and print the result."""
    import adapters_db
    from adapters_db.repository import clean_tag

    if not given:
        raise ValueError("catalog edit needs a change: " + ", ".join(EDIT_FLAGS.values()))
    record = adapters_db.get_adapter(s, catalog, adapter_id)
    if record is None:
        print(f"no adapter {adapter_id}")
        return 1
    direct = {"name": "name", "description": "description_html", "creator": "creator"}
    direct |= {"base": "base_family", "nsfw_level": "nsfw_level"}  # flag → update_metadata field
    changes: dict[str, Any] = {field: given[key] for key, field in direct.items() if key in given}
    if {"add_tag", "remove_tag", "clear_tags"} & set(given):
        removed = {clean_tag(t) for t in given.get("remove_tag", ())}
        kept = [] if given.get("clear_tags") else [t for t in record.tags if t not in removed]
        changes["tags"] = [*kept, *given.get("add_tag", ())]
    if "trigger" in given or given.get("clear_triggers"):
        changes["trigger_words"] = list(given.get("trigger", ()))
    record = adapters_db.update_metadata(s, catalog, adapter_id, **changes)
    fields = ("id", "name", "tags", "trigger_words", "base_family", "nsfw_level", "creator")
    shown = {f: getattr(record, f) for f in fields}
    print(_terminal_json({**shown, "curated": record.extra.get("curated", [])}))
    return 0


def _show_or_delete(s: Any, catalog: Any, action: str, adapter_id: int, *, keep_files: bool = False) -> int:
    import dataclasses

    import adapters_db

    if action == "delete":
        ok = adapters_db.delete_adapter(s, catalog, adapter_id, delete_files=not keep_files)
        print(f"deleted adapter {adapter_id}" if ok else f"no adapter {adapter_id}")
        return 0 if ok else 1
    record = adapters_db.get_adapter(s, catalog, adapter_id)
    if record is None:
        print(f"no adapter {adapter_id}")
        return 1
    print(_terminal_json(dataclasses.asdict(record)))
    return 0


def _terminal_json(data: Any) -> str:
    """Indented JSON whose strings cannot drive a terminal: C1 and bidirectional controls and line separators
    are escaped as ``\\uXXXX`` too (``json`` escapes only the C0 ones), so it decodes to the same text."""
    text = json.dumps(data, default=str, indent=1, ensure_ascii=False)
    unsafe = ("Cc", "Zl", "Zp")
    return "".join(
        f"\\u{ord(ch):04x}" if ch in _BIDI or (ch != "\n" and unicodedata.category(ch) in unsafe) else ch
        for ch in text
    )


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    """Add the catalog commands."""
    p = sub.add_parser(
        "import",
        parents=[parent],
        help="import .safetensors LoRAs or A1111/ComfyUI LoRA folders",
        description=cmd_import.__doc__,
    )
    p.add_argument("paths", nargs="+", help="files (.safetensors) and folders (models/Lora trees)")
    p.add_argument("--name", default=None, help="adapter name (single file)")
    p.add_argument("--tag", action="append", default=[], help="tag (repeatable)")
    p.add_argument("--trigger", action="append", default=[], help="trigger word (repeatable)")
    p.add_argument(
        "--base", default=None, help="base family: sd1/sd15, sd2, sdxl, pocket (default: from the file)"
    )
    p.add_argument("--no-embed", action="store_true", help="do not compute vectors now (search will)")
    p.add_argument("-v", "--verbose", action="store_true", help="one line per item, not only failures")
    _add_common(p)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser(
        "import-civitai",
        parents=[parent],
        help="import Civitai API records (dump or live API)",
        description=cmd_import_civitai.__doc__,
    )
    p.add_argument("files", nargs="*", help="FILE.jsonl[.gz] or an API page .json")
    p.add_argument("--limit", type=int, default=None, help="at most this many records per source")
    p.add_argument(
        "--api", action="store_true", help="query the live Civitai API (/api/v1/models?types=LORA)"
    )
    p.add_argument("--query", default=None, help="search text for --api")
    p.add_argument("--download", action="store_true", help="with --api: download and verify the files too")
    p.add_argument("--base-url", default="https://civitai.com", help="Civitai base URL")
    p.add_argument("--no-embed", action="store_true", help="do not compute vectors now (search will)")
    p.add_argument("-v", "--verbose", action="store_true")
    _add_common(p)
    p.set_defaults(func=cmd_import_civitai)

    p = sub.add_parser(
        "import-hf",
        parents=[parent],
        help="import LoRA files of Hugging Face repos",
        description=cmd_import_hf.__doc__,
    )
    p.add_argument("repos", nargs="+", help="repo ids, e.g. user/my-lora")
    p.add_argument("--revision", default="main")
    p.add_argument("--base-url", default="https://huggingface.co")
    p.add_argument("--no-embed", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    _add_common(p)
    p.set_defaults(func=cmd_import_hf)

    p = sub.add_parser(
        "search", parents=[parent], help="find LoRAs for a prompt", description=cmd_search.__doc__
    )
    p.add_argument("prompt", nargs="?", default=None)
    p.add_argument(
        "--queries",
        default=None,
        help="batch: a UTF-8 file, one prompt per line, blank lines skipped ('-': stdin)",
    )
    p.add_argument(
        "--image",
        type=Path,
        default=None,
        metavar="FILE",
        help="search by picture instead of text (a catalog with an open_clip embedder)",
    )
    p.add_argument("-k", type=int, default=10, help="hits per prompt")
    p.add_argument("--base", default=None, help="base family filter: sd15/sd1, sd2, sdxl, pocket")
    p.add_argument("--tag", action="append", default=[], help="require a tag (repeatable)")
    p.add_argument(
        "--licence",
        action="append",
        default=[],
        help="require a permission: commercial, derivatives, no_credit, different_license",
    )
    p.add_argument("--nsfw", action="store_true", help="include NSFW adapters")
    p.add_argument("--local", action="store_true", help="only adapters whose file is stored locally")
    p.add_argument(
        "--sort", default="relevance", choices=("relevance", "downloads", "rating", "newest", "name")
    )
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--json", action="store_true", help="one JSON line per prompt")
    _add_common(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser(
        "catalog",
        parents=[parent],
        help="catalog stats, repair, reindex, classifier / matcher (train a learned search channel), "
        "show, edit (curate an adapter), delete, download (a remote adapter's file, verified)",
        description=cmd_catalog.__doc__,
    )
    p.add_argument(
        "action",
        choices=("stats", "repair", "reindex", "classifier", "matcher", "show", "edit", "delete", "download"),
    )
    p.add_argument(
        "--id",
        type=int,
        action="append",
        help="adapter id (show, delete; download: repeatable; $CIVITAI_API_KEY is sent to Civitai only)",
    )
    p.add_argument(
        "--grace", type=float, default=3600.0, help="repair: keep orphan files younger than this (s)"
    )
    p.add_argument("--verify", action="store_true", help="repair: re-hash every stored file")
    p.add_argument(
        "--keep-files",
        action="store_true",
        help="delete: keep the stored files (catalog repair removes them)",
    )
    edit = p.add_argument_group("edit (a re-import of the adapter's record keeps what is edited)")
    edit.add_argument("--name", default=None, help="new name")
    edit.add_argument("--description", default=None, help="new description (HTML is sanitised)")
    edit.add_argument("--add-tag", action="append", default=[], metavar="TAG", help="add a tag (repeatable)")
    edit.add_argument(
        "--remove-tag", action="append", default=[], metavar="TAG", help="remove a tag (repeatable)"
    )
    edit.add_argument("--clear-tags", action="store_true", help="remove every tag (before --add-tag)")
    edit.add_argument(
        "--trigger", action="append", default=[], metavar="WORD", help="set the trigger words (repeatable)"
    )
    edit.add_argument("--clear-triggers", action="store_true", help="remove every trigger word")
    edit.add_argument("--base", default=None, help="base family: sd1/sd15, sd2, sdxl, pocket")
    edit.add_argument("--nsfw-level", type=int, choices=range(4), default=None, help="0 (none) to 3")
    edit.add_argument("--creator", default=None, help="creator name")
    _add_common(p)
    p.set_defaults(func=cmd_catalog)
