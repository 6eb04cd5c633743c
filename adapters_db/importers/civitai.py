"""Civitai REST API records (``GET /api/v1/models`` items) → :class:`AdapterSpec`, and batch import.

A record becomes one adapter with its versions, files (hashes, download URL: catalogued as
"remote" until the bytes are imported), trained words, preview images and their generation
parameters. Files whose SHA-256 is already in the local store are marked as stored.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from adapters_db.bulk import insert_new
from adapters_db.dto import ImportResult, ImportSummary, LicenceFlags, Stats
from adapters_db.families import family_from_civitai
from adapters_db.importers.common import ImportErrorBase, progress, run_item
from adapters_db.models import Adapter
from adapters_db.repository import write_adapter
from adapters_db.specs import AdapterSpec, FileSpec, ImageSpec, VersionSpec

if TYPE_CHECKING:
    from adapters_db.catalog import Catalog

LORA_TYPES: dict[str, str] = {"lora": "lora", "locon": "locon", "lycoris": "lycoris", "dora": "dora"}
MODEL_FILE_TYPES = {"model", "pruned model"}
IMAGE_NSFW: dict[str, int] = {"none": 0, "false": 0, "soft": 1, "mature": 2, "true": 2, "x": 3}
FORMATS: dict[str, str] = {
    "safetensor": "safetensors",
    "safetensors": "safetensors",
    "pickletensor": "pickle",
    "other": "other",
}


class CivitaiRecordError(ImportErrorBase):
    """A Civitai record that cannot be catalogued (missing fields, not a LoRA, bad JSON)."""


def _require(record: dict[str, Any], key: str, where: str) -> Any:
    if key not in record or record[key] in (None, ""):
        raise CivitaiRecordError(f"{where}: missing field {key!r}")
    return record[key]


def _parse_time(value: Any) -> datetime | None:
    if not value or not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _nsfw_level(value: Any) -> int:
    if isinstance(value, bool):
        return 2 if value else 0
    if isinstance(value, int):
        return max(0, min(3, value))
    return IMAGE_NSFW.get(str(value or "none").strip().lower(), 0)


def _commercial(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, list):
        return ",".join(str(v) for v in value) if value else "None"
    return str(value)


def _listed(value: Any) -> list[Any]:
    """A JSON list as is; a string as its comma-separated parts (never its characters); else nothing."""
    if isinstance(value, str):
        return value.split(",")
    return value if isinstance(value, list) else []


def _tags(value: Any) -> tuple[str, ...]:
    out = []
    for tag in _listed(value):
        name = tag.get("name") if isinstance(tag, dict) else tag
        if isinstance(name, str) and name.strip():
            out.append(name.strip().lower())
    return tuple(dict.fromkeys(out))


def file_spec(raw: dict[str, Any], version_url: str | None, local: set[str] | None = None) -> FileSpec | None:
    """One Civitai file entry → :class:`FileSpec` (``None`` for training data, configs, …)."""
    ftype = str(raw.get("type") or "Model").strip().lower()
    if ftype not in MODEL_FILE_TYPES:
        return None
    hashes = {str(k): str(v) for k, v in (raw.get("hashes") or {}).items() if v}
    sha = hashes.get("SHA256", "").lower() or None
    fmt_raw = str((raw.get("metadata") or {}).get("format") or "").strip().lower()
    size_kb = raw.get("sizeKB")
    return FileSpec(
        file_name=str(raw.get("name") or "unnamed.safetensors"),
        sha256=sha if sha and len(sha) == 64 else None,
        size_bytes=round(float(size_kb) * 1024) if isinstance(size_kb, int | float) else None,
        hashes=hashes,
        format=FORMATS.get(fmt_raw, fmt_raw or None),
        primary=bool(raw.get("primary", True)),
        remote_url=raw.get("downloadUrl") or version_url,
        stored=bool(local and sha and sha in local),
    )


def image_spec(raw: dict[str, Any]) -> ImageSpec:
    """One Civitai image entry → :class:`ImageSpec` (prompt and generation parameters from ``meta``)."""
    meta = dict(raw.get("meta") or {})
    prompt = meta.pop("prompt", None)
    negative = meta.pop("negativePrompt", None)
    return ImageSpec(
        url=raw.get("url"),
        width=raw.get("width") if isinstance(raw.get("width"), int) else None,
        height=raw.get("height") if isinstance(raw.get("height"), int) else None,
        nsfw_level=_nsfw_level(raw.get("nsfwLevel", raw.get("nsfw"))),
        blurhash=raw.get("hash") if isinstance(raw.get("hash"), str) else None,
        prompt=prompt if isinstance(prompt, str) and prompt.strip() else None,
        negative_prompt=negative if isinstance(negative, str) and negative.strip() else None,
        params=meta,
        civitai_image_id=raw.get("id") if isinstance(raw.get("id"), int) else None,
    )


def version_spec(raw: dict[str, Any], where: str, local: set[str] | None = None) -> VersionSpec:
    """One Civitai ``modelVersions`` entry → :class:`VersionSpec`."""
    vid = _require(raw, "id", where)
    url = raw.get("downloadUrl")
    files = tuple(f for f in (file_spec(x, url, local) for x in raw.get("files") or []) if f is not None)
    words = tuple(w.strip() for w in _listed(raw.get("trainedWords")) if isinstance(w, str) and w.strip())
    return VersionSpec(
        name=str(raw.get("name") or ""),
        civitai_version_id=int(vid),
        base_model=raw.get("baseModel"),
        base_family=family_from_civitai(raw.get("baseModel")),
        description_html=str(raw.get("description") or ""),
        download_url=url,
        created_at=_parse_time(raw.get("createdAt") or raw.get("publishedAt")),
        download_count=int((raw.get("stats") or {}).get("downloadCount") or 0),
        trigger_words=words,
        files=files,
        images=tuple(image_spec(im) for im in raw.get("images") or [] if isinstance(im, dict)),
    )


def civitai_spec(record: dict[str, Any], local: set[str] | None = None) -> AdapterSpec:
    """A Civitai model record → :class:`AdapterSpec`; raises :class:`CivitaiRecordError` if unusable."""
    if not isinstance(record, dict):
        raise CivitaiRecordError(f"expected a JSON object, got {type(record).__name__}")
    try:
        return _civitai_spec(record, local)
    except CivitaiRecordError:
        raise
    except (AttributeError, TypeError, ValueError, KeyError, ArithmeticError) as exc:
        # a field of the wrong JSON type or range ("hashes": "x", "sizeKB": 1e308, "id": "abc")
        where = f"model {record.get('id')!r}" if "id" in record else "record"
        raise CivitaiRecordError(f"{where}: malformed record ({type(exc).__name__}: {exc})") from exc


def _civitai_spec(record: dict[str, Any], local: set[str] | None) -> AdapterSpec:
    """:func:`civitai_spec` of a JSON object, raising whatever a field of the wrong type makes it raise."""
    mid = _require(record, "id", "record")
    where = f"model {mid}"
    name = str(_require(record, "name", where))
    mtype = str(record.get("type") or "LORA").strip().lower()
    if mtype not in LORA_TYPES:
        raise CivitaiRecordError(f"{where} ({name!r}) is a {record.get('type')}, not a LoRA; skipped")
    versions = tuple(version_spec(v, f"{where} version", local) for v in record.get("modelVersions") or [])
    if not versions:
        raise CivitaiRecordError(f"{where} ({name!r}) has no modelVersions")
    stats = record.get("stats") or {}
    creator = record.get("creator") or {}
    image_levels = [im.nsfw_level for v in versions for im in v.images]
    return AdapterSpec(
        name=name,
        source="civitai",
        kind=LORA_TYPES[mtype],
        description_html=str(record.get("description") or ""),
        base_family=versions[0].base_family,
        base_model=versions[0].base_model,
        nsfw_level=max([_nsfw_level(record.get("nsfw"))] + ([min(image_levels)] if image_levels else [])),
        creator=creator.get("username") if isinstance(creator, dict) else None,
        civitai_model_id=int(mid),
        source_url=f"https://civitai.com/models/{int(mid)}",
        licence=LicenceFlags(
            license=None,
            allow_no_credit=record.get("allowNoCredit"),
            allow_commercial_use=_commercial(record.get("allowCommercialUse")),
            allow_derivatives=record.get("allowDerivatives"),
            allow_different_license=record.get("allowDifferentLicense"),
        ),
        stats=Stats(
            int(stats.get("downloadCount") or 0),
            int(stats.get("favoriteCount") or 0),
            int(stats.get("commentCount") or 0),
            int(stats.get("ratingCount") or 0),
            float(stats.get("rating") or 0.0),
        ),
        poi=bool(record.get("poi", False)),
        tags=_tags(record.get("tags")),
        created_at=max((v.created_at for v in versions if v.created_at), default=None),
        versions=versions,
    )


def read_records(path: Path) -> Iterator[tuple[str, dict[str, Any] | Exception]]:
    """Records of a ``.jsonl[.gz]`` dump or a ``.json`` API page/list as ``(where, record or error)``.

    A line that is not UTF-8 or not JSON is one error; a compressed file that is truncated or not gzip
    at all yields the records read so far, then one error naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    stem = path.name.removesuffix(".gz")
    lineno = 0
    try:
        with opener(path, "rb") as fh:  # type: ignore[operator]
            if stem.endswith(".json"):
                yield from _json_records(path.name, fh.read())
                return
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    yield f"{path.name}:{lineno}", _json_line(line, lineno)
    except (OSError, EOFError, zlib.error) as exc:
        after = f" after line {lineno}" if lineno else ""
        problem = f"truncated or corrupt{after} ({type(exc).__name__}: {exc})"
        yield path.name, CivitaiRecordError(f"{path.name}: {problem}")


def _json_line(line: bytes, lineno: int) -> dict[str, Any] | Exception:
    try:
        return json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as exc:
        reason = f"not UTF-8: {exc.reason} at byte {exc.start}"
        return CivitaiRecordError(f"line {lineno}: invalid JSON ({reason})")
    except json.JSONDecodeError as exc:
        return CivitaiRecordError(f"line {lineno}: invalid JSON ({exc.msg})")
    except (ValueError, RecursionError) as exc:  # an int of too many digits, nesting too deep
        return CivitaiRecordError(f"line {lineno}: invalid JSON ({exc})")


def _json_records(name: str, raw: bytes) -> Iterator[tuple[str, dict[str, Any] | Exception]]:
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        yield name, CivitaiRecordError(f"{name}: invalid JSON (not UTF-8: {exc.reason} at byte {exc.start})")
        return
    except json.JSONDecodeError as exc:
        yield name, CivitaiRecordError(f"{name}: invalid JSON ({exc.msg} at line {exc.lineno})")
        return
    except (ValueError, RecursionError) as exc:  # an int of too many digits, nesting too deep
        yield name, CivitaiRecordError(f"{name}: invalid JSON ({exc})")
        return
    items = data.get("items", [data]) if isinstance(data, dict) else data
    if not isinstance(items, list):
        got = type(items).__name__
        yield name, CivitaiRecordError(f"{name}: expected a list of records or an API page, got {got}")
        return
    for i, item in enumerate(items):
        yield f"{name}[{i}]", item


def import_civitai_records(
    session: Session,
    catalog: Catalog,
    records: Iterable[tuple[str, dict[str, Any] | Exception]],
    *,
    show_progress: bool = False,
    total: int | None = None,
    batch_size: int = 500,
    commit_each: bool = False,
) -> ImportSummary:
    """Import records: each is converted and checked first (a bad one is reported, the rest go on);
    new adapters are inserted in batches, known Civitai ids are updated one by one, and a record whose
    file is the local file of an adapter without a Civitai id is merged into that adapter. A batch that
    hits a database error is rolled back and retried record by record, so only the culprit fails.
    With ``commit_each`` the session commits after every batch and update, so an interrupted import
    keeps what was done (a re-run updates those records)."""
    from adapters_db.repository import local_adapter_hashes, stored_hashes

    local = stored_hashes(session)
    local_adapters = local_adapter_hashes(session)
    known = set(
        session.execute(
            select(Adapter.civitai_model_id).where(Adapter.civitai_model_id.is_not(None))
        ).scalars()
    )
    results: dict[int, ImportResult] = {}
    batch: list[tuple[int, str, AdapterSpec]] = []
    for n, (where, record) in enumerate(progress(records, show_progress, total, "civitai records")):
        try:
            if isinstance(record, Exception):
                raise record
            spec = civitai_spec(record, local)
        except (ValueError, TypeError, KeyError) as exc:
            results[n] = ImportResult(where, "failed", message=f"{type(exc).__name__}: {exc}")
            continue
        owner = next((local_adapters[h] for h in spec.sha256s if h in local_adapters), None)
        if spec.civitai_model_id in known:
            _flush(session, batch, results)
            results[n] = _one(session, where, spec)
        elif owner is not None:
            _flush(session, batch, results)
            results[n] = _link(session, where, spec, owner)
            local_adapters = {h: a for h, a in local_adapters.items() if a != owner}
        else:
            batch.append((n, where, spec))
            if len(batch) < batch_size:
                known.add(spec.civitai_model_id)
                continue
            _flush(session, batch, results)
        known.add(spec.civitai_model_id)
        if commit_each:
            session.commit()
    _flush(session, batch, results)
    return ImportSummary(tuple(results[i] for i in sorted(results)))


def _one(session: Session, where: str, spec: AdapterSpec) -> ImportResult:
    def work() -> ImportResult:
        adapter_id, status = write_adapter(session, spec)
        return ImportResult(where, status, adapter_id, spec.name)

    return run_item(session, where, work)


def _link(session: Session, where: str, spec: AdapterSpec, adapter_id: int) -> ImportResult:
    """Merge a record into the local adapter that holds its file (one adapter, not two, for one file)."""

    def work() -> ImportResult:
        write_adapter(session, spec, adapter_id=adapter_id)
        message = f"linked to local adapter {adapter_id} (it holds this record's file)"
        return ImportResult(where, "updated", adapter_id, spec.name, message=message)

    return run_item(session, where, work)


def _flush(
    session: Session, batch: list[tuple[int, str, AdapterSpec]], results: dict[int, ImportResult]
) -> None:
    """Insert a batch of new adapters in one savepoint; on a database error retry one by one."""
    if not batch:
        return
    nested = session.begin_nested()
    try:
        ids = insert_new(session, [spec for _, _, spec in batch])
        nested.commit()
    except (SQLAlchemyError, OverflowError):  # SQLite raises a bare OverflowError for an int past 64 bits
        nested.rollback()
        for n, where, spec in batch:
            results[n] = _one(session, where, spec)
    else:
        for (n, where, spec), adapter_id in zip(batch, ids, strict=True):
            results[n] = ImportResult(where, "imported", adapter_id, spec.name)
    session.expunge_all()
    batch.clear()


def import_civitai_jsonl(
    session: Session,
    catalog: Catalog,
    path: Path,
    *,
    limit: int | None = None,
    show_progress: bool = False,
    commit_each: bool = False,
) -> ImportSummary:
    """Import a Civitai dump (``.jsonl``, ``.jsonl.gz`` or a ``.json`` API page); ``commit_each`` as in
    :func:`import_civitai_records`."""
    records: Iterable[tuple[str, dict[str, Any] | Exception]] = read_records(Path(path))
    if limit is not None:
        import itertools

        records = itertools.islice(records, limit)
    return import_civitai_records(
        session, catalog, records, show_progress=show_progress, total=limit, commit_each=commit_each
    )
