"""Repository: the only code that reads and writes catalog rows. Takes a session, returns frozen DTOs.

The caller owns the session (and so the transaction): nothing here commits. Every change bumps the
catalog revision, which the derived search indexes compare against.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Select, bindparam, delete, event, func, insert, or_, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, selectinload

from adapters_db.catalog import bump_revision
from adapters_db.dto import (
    AdapterRecord,
    FileRecord,
    ImageRecord,
    LicenceFlags,
    Stats,
    VersionRecord,
)
from adapters_db.families import normalize_family
from adapters_db.models import (
    Adapter,
    AdapterFile,
    AdapterVersion,
    PreviewImage,
    SearchDocument,
    Tag,
    TriggerWord,
    adapter_tags,
)
from adapters_db.sanitize import html_to_text, sanitize_html
from adapters_db.specs import AdapterSpec, FileSpec, ImageSpec, VersionSpec
from adapters_db.store import FileStore, autov2

if TYPE_CHECKING:
    from adapters_db.catalog import Catalog

SORTS = ("relevance", "downloads", "rating", "newest", "name")
LICENCE_FLAGS = ("commercial", "derivatives", "no_credit", "different_license")
# what update_metadata may change; a re-import keeps what a person changed (``extra["curated"]``)
CURATED_FIELDS = (
    "name",
    "description_html",
    "tags",
    "trigger_words",
    "base_family",
    "nsfw_level",
    "creator",
    "licence",
)


class NotFoundError(LookupError):
    """No adapter with that id."""


# ----------------------------------------------------------------------------------------- reading


def _full_query() -> Select[tuple[Adapter]]:
    versions = selectinload(Adapter.versions)
    return select(Adapter).options(
        selectinload(Adapter.tags),
        versions.selectinload(AdapterVersion.files),
        versions.selectinload(AdapterVersion.trigger_words),
        versions.selectinload(AdapterVersion.images),
    )


def _file_record(row: Any, store: FileStore) -> FileRecord:
    """A file (ORM object or Core row) → :class:`FileRecord`."""
    local = store.path_for(row.sha256) if row.stored and row.sha256 else None
    return FileRecord(
        id=row.id,
        file_name=row.file_name,
        size_bytes=row.size_bytes,
        sha256=row.sha256,
        autov2=row.autov2,
        format=row.format,
        primary=row.primary,
        stored=row.stored,
        remote_url=row.remote_url,
        local_path=local,
        rank=row.rank,
        header_metadata=dict(row.header_metadata or {}),
    )


def _image_record(row: Any, store: FileStore) -> ImageRecord:
    """A preview picture (ORM object or Core row) → :class:`ImageRecord`."""
    local = None
    if row.local_sha256:
        local = store.path_for(row.local_sha256, "images", row.local_ext or "")
    return ImageRecord(
        id=row.id,
        version_id=row.version_id,
        kind=row.kind,
        url=row.url,
        local_path=local,
        width=row.width,
        height=row.height,
        nsfw_level=row.nsfw_level,
        prompt=row.prompt,
        negative_prompt=row.negative_prompt,
        params=dict(row.params or {}),
        civitai_image_id=row.civitai_image_id,
    )


def _version_record(
    row: Any, store: FileStore, trigger_words: Iterable[str], files: Iterable[Any], images: Iterable[Any]
) -> VersionRecord:
    """A version (ORM object or Core row) with its trigger words, files and pictures → a record."""
    return VersionRecord(
        id=row.id,
        name=row.name,
        base_model=row.base_model,
        base_family=row.base_family,
        civitai_version_id=row.civitai_version_id,
        download_url=row.download_url,
        trigger_words=tuple(trigger_words),
        files=tuple(_file_record(f, store) for f in files),
        images=tuple(_image_record(i, store) for i in images),
        created_at=row.created_at,
    )


def _is_cover(image: ImageRecord, max_nsfw: int) -> bool:
    """Whether a picture may be an adapter's cover (the same rule in SQL: ``_summary_queries().covers``)."""
    return image.kind != "caption" and image.nsfw_level <= max_nsfw and bool(image.url or image.local_path)


def to_record(row: Adapter, store: FileStore, *, max_nsfw: int = 3) -> AdapterRecord:
    """An ORM adapter (with versions and their pictures loaded) → its full :class:`AdapterRecord`
    (summaries without versions: :func:`get_adapters`)."""
    versions = tuple(
        _version_record(v, store, (t.word for t in v.trigger_words), v.files, v.images) for v in row.versions
    )
    cover = next((i for v in versions for i in v.images if _is_cover(i, max_nsfw)), None)
    return _adapter_record(row, tuple(t.name for t in row.tags), versions, cover, keep_versions=True)


def _grouped(rows: Iterable[Any], key: str) -> dict[int, list[Any]]:
    out: dict[int, list[Any]] = {}
    for row in rows:
        out.setdefault(getattr(row, key), []).append(row)
    return out


@dataclass(frozen=True)
class _SummaryQueries:
    """The statements of :func:`_summaries`, built once: an expanding ``ids`` parameter keeps one
    compiled form, and a statement object reused skips SQLAlchemy's construction and cache-key work
    (more than half of the time of a search's ten hit records: 3.7 → 1.7 ms)."""

    adapters: Select[Any]
    tags: Select[Any]
    versions: Select[Any]
    triggers: Select[Any]
    files: Select[Any]
    covers: Select[Any]


@lru_cache(maxsize=1)
def _summary_queries() -> _SummaryQueries:
    """The statements of :func:`_summaries` (parameters ``ids``, ``version_ids``, ``max_nsfw``)."""
    a, v, f, t, tag = (m.__table__ for m in (Adapter, AdapterVersion, AdapterFile, TriggerWord, Tag))
    p = PreviewImage.__table__
    ids = bindparam("ids", expanding=True)
    version_columns = (v.c.id, v.c.adapter_id, v.c.name, v.c.base_model, v.c.base_family)
    version_columns += (v.c.civitai_version_id, v.c.download_url, v.c.created_at)
    # each adapter's cover: its first shown picture (versions, then pictures, in their order) within
    # ``max_nsfw`` (the rule of :func:`_is_cover`), one row per adapter, picked by a window function
    order = (v.c.position, v.c.id, p.c.position, p.c.id)
    ranked = (
        select(p.c.id, func.row_number().over(partition_by=p.c.adapter_id, order_by=order).label("n"))
        .join(v, p.c.version_id == v.c.id)
        .where(
            p.c.adapter_id.in_(ids),
            p.c.kind != "caption",
            p.c.nsfw_level <= bindparam("max_nsfw"),
            (func.coalesce(p.c.url, "") != "") | (func.coalesce(p.c.local_sha256, "") != ""),
        )
        .subquery()
    )
    return _SummaryQueries(
        adapters=select(a).where(a.c.id.in_(ids)),
        tags=select(adapter_tags.c.adapter_id, tag.c.name)
        .join(tag, tag.c.id == adapter_tags.c.tag_id)
        .where(adapter_tags.c.adapter_id.in_(ids))
        .order_by(tag.c.name),
        versions=select(*version_columns).where(v.c.adapter_id.in_(ids)).order_by(v.c.position, v.c.id),
        triggers=select(t.c.version_id, t.c.word)
        .where(t.c.adapter_id.in_(ids))
        .order_by(t.c.position, t.c.id),
        files=select(f).where(f.c.version_id.in_(bindparam("version_ids", expanding=True))).order_by(f.c.id),
        covers=select(p).join(ranked, ranked.c.id == p.c.id).where(ranked.c.n == 1),
    )


def _summaries(
    session: Session, store: FileStore, ids: Sequence[int], max_nsfw: int
) -> dict[int, AdapterRecord]:
    """Summary records (no versions kept, no pictures but the cover) read with plain Core queries, one
    per table and no ORM objects: a search's ten hits cost a few milliseconds, not a dozen."""
    if session.autoflush:
        session.flush()  # Core statements do not autoflush; pending changes must be visible as with ORM reads
    q, by_ids = _summary_queries(), {"ids": list(ids)}
    adapters = session.execute(q.adapters, by_ids).all()
    tags = _grouped(session.execute(q.tags, by_ids), "adapter_id")
    versions = _grouped(session.execute(q.versions, by_ids), "adapter_id")
    triggers = _grouped(session.execute(q.triggers, by_ids), "version_id")
    version_ids = [row.id for rows in versions.values() for row in rows]
    files = _grouped(session.execute(q.files, {"version_ids": version_ids}), "version_id")
    covers = {
        row.adapter_id: _image_record(row, store)
        for row in session.execute(q.covers, {**by_ids, "max_nsfw": max_nsfw})
    }
    out = {}
    for row in adapters:
        records = tuple(
            _version_record(ver, store, (w.word for w in triggers.get(ver.id, ())), files.get(ver.id, ()), ())
            for ver in versions.get(row.id, ())
        )
        names = tuple(x.name for x in tags.get(row.id, ()))
        out[row.id] = _adapter_record(row, names, records, covers.get(row.id), keep_versions=False)
    return out


def _adapter_record(
    row: Any,
    tags: tuple[str, ...],
    versions: tuple[VersionRecord, ...],
    cover: ImageRecord | None,
    keep_versions: bool,
) -> AdapterRecord:
    """An adapter (ORM object or Core row) with its tags, versions and cover → :class:`AdapterRecord`."""
    triggers = tuple(dict.fromkeys(w for v in versions for w in v.trigger_words))
    return AdapterRecord(
        id=row.id,
        name=row.name,
        kind=row.kind,
        source=row.source,
        description_html=row.description_html,
        description_text=row.description_text,
        base_family=row.base_family,
        base_model=row.base_model,
        tags=tags,
        trigger_words=triggers,
        nsfw_level=row.nsfw_level,
        creator=row.creator,
        licence=LicenceFlags(
            row.license,
            row.allow_no_credit,
            row.allow_commercial_use,
            row.allow_derivatives,
            row.allow_different_license,
        ),
        stats=Stats(row.download_count, row.favorite_count, row.comment_count, row.rating_count, row.rating),
        civitai_model_id=row.civitai_model_id,
        civitai_version_ids=tuple(v.civitai_version_id for v in versions if v.civitai_version_id),
        hf_repo=row.hf_repo,
        source_url=row.source_url,
        created_at=row.created_at,
        updated_at=row.updated_at,
        versions=versions if keep_versions else (),
        has_local_file=any(f.is_local for v in versions for f in v.files),
        cover_image=cover,
        extra=dict(row.extra or {}),
    )


def get_adapter(session: Session, catalog: Catalog, adapter_id: int) -> AdapterRecord | None:
    """The full record of one adapter, or ``None``."""
    row = session.execute(_full_query().where(Adapter.id == adapter_id)).scalar_one_or_none()
    return None if row is None else to_record(row, catalog.store)


def get_adapters(
    session: Session, catalog: Catalog, ids: Sequence[int], *, full: bool = False, max_nsfw: int = 3
) -> dict[int, AdapterRecord]:
    """Several adapters by id (``full=False``: summaries without versions, whose pictures are never
    loaded but for the cover of each)."""
    if not ids:
        return {}
    if not full:
        return _summaries(session, catalog.store, ids, max_nsfw)
    rows = session.execute(_full_query().where(Adapter.id.in_(list(ids)))).scalars().all()
    return {r.id: to_record(r, catalog.store, max_nsfw=max_nsfw) for r in rows}


def adapter_ids_named(session: Session, name: str, *, tag_unsafe: str = "") -> list[int]:
    """Ids of adapters whose name is ``name`` (case-insensitive; also with each character of
    ``tag_unsafe`` in it written as ``_``) or with a file ``name`` or ``name.<ext>``. SQLite lower-cases
    ASCII only."""
    text = name.strip()
    want = text.lower()
    file_name = func.lower(AdapterFile.file_name)
    by_file = (
        select(AdapterVersion.adapter_id)
        .join(AdapterFile, AdapterFile.version_id == AdapterVersion.id)
        .where(or_(file_name == want, file_name.startswith(f"{want}.", autoescape=True)))
    )
    tagged, key = Adapter.name, want
    for ch in tag_unsafe:
        tagged, key = func.replace(tagged, ch, "_"), key.replace(ch, "_")
    conds = [Adapter.name == text, func.lower(Adapter.name) == want, Adapter.id.in_(by_file)]
    if tag_unsafe:
        conds.append(func.lower(tagged) == key.strip())
    return list(session.execute(select(Adapter.id).where(or_(*conds))).scalars())


def find_by_hash(session: Session, catalog: Catalog, digest: str) -> AdapterRecord | None:
    """The adapter owning a file with this SHA-256 (64 hex) or AutoV2 (10 hex) hash."""
    digest = digest.strip().lower()
    cond = AdapterFile.sha256 == digest if len(digest) == 64 else func.lower(AdapterFile.autov2) == digest
    adapter_id = session.execute(
        select(AdapterVersion.adapter_id).join(AdapterFile).where(cond).limit(1)
    ).scalar_one_or_none()
    return None if adapter_id is None else get_adapter(session, catalog, adapter_id)


def find_by_civitai_id(session: Session, catalog: Catalog, model_id: int) -> AdapterRecord | None:
    """The adapter imported from Civitai model ``model_id``."""
    adapter_id = session.execute(
        select(Adapter.id).where(Adapter.civitai_model_id == model_id)
    ).scalar_one_or_none()
    return None if adapter_id is None else get_adapter(session, catalog, adapter_id)


def local_file_path(record: AdapterRecord) -> Path | None:
    """Path of the adapter's primary local file (newest version first), or ``None`` if only remote."""
    files = [f for f in record.files if f.is_local]
    primary = [f for f in files if f.primary]
    chosen = (primary or files or [None])[0]
    return None if chosen is None else chosen.local_path


@dataclass(frozen=True)
class Page:
    """One page of a listing and the total number of matches."""

    items: tuple[AdapterRecord, ...]
    total: int
    offset: int
    limit: int


def _licence_conditions(licence: str | Iterable[str] | None) -> list[Any]:
    flags = [licence] if isinstance(licence, str) else list(licence or [])
    conds: list[Any] = []
    for flag in flags:
        key = flag.strip().lower().replace("-", "_")
        if key == "commercial":
            conds.append(Adapter.allow_commercial_use.is_not(None))
            conds.append(func.lower(Adapter.allow_commercial_use).not_in(["none", "false", "[]", ""]))
        elif key == "derivatives":
            conds.append(Adapter.allow_derivatives.is_(True))
        elif key == "no_credit":
            conds.append(Adapter.allow_no_credit.is_(True))
        elif key == "different_license":
            conds.append(Adapter.allow_different_license.is_(True))
        else:
            raise ValueError(f"unknown licence filter {flag!r}: use {', '.join(LICENCE_FLAGS)}")
    return conds


def filter_conditions(
    *,
    base_family: str | None = None,
    include_nsfw: bool = False,
    tags: Iterable[str] | None = None,
    licence: str | Iterable[str] | None = None,
    local_only: bool | None = None,
    source: str | None = None,
    kind: str | None = None,
) -> list[Any]:
    """SQL conditions on ``Adapter`` shared by browsing and search filters (``kind``: e.g. ``gate``)."""
    conds: list[Any] = []
    family = normalize_family(base_family)
    if family is not None:
        conds.append(Adapter.base_family == family)
    if not include_nsfw:
        conds.append(Adapter.nsfw_level == 0)
    for tag in tags or ():
        conds.append(Adapter.tags.any(Tag.name == clean_tag(tag)))
    conds.extend(_licence_conditions(licence))
    if local_only is not None:
        has_local = (
            select(AdapterFile.id)
            .join(AdapterVersion)
            .where(AdapterVersion.adapter_id == Adapter.id, AdapterFile.stored.is_(True))
            .exists()
        )
        conds.append(has_local if local_only else ~has_local)
    if source is not None:
        conds.append(Adapter.source == source)
    if kind is not None:
        conds.append(Adapter.kind == kind)
    return conds


def _order(sort: str) -> list[Any]:
    if sort not in SORTS:
        raise ValueError(f"unknown sort {sort!r}: use one of {', '.join(SORTS)}")
    return {
        "downloads": [Adapter.download_count.desc(), Adapter.id],
        "relevance": [Adapter.download_count.desc(), Adapter.id],
        "rating": [Adapter.rating.desc(), Adapter.rating_count.desc(), Adapter.id],
        "newest": [Adapter.created_at.desc(), Adapter.id.desc()],
        "name": [func.lower(Adapter.name), Adapter.id],
    }[sort]


def list_adapters(
    session: Session,
    catalog: Catalog,
    *,
    text: str | None = None,
    base_family: str | None = None,
    include_nsfw: bool = False,
    tags: Iterable[str] | None = None,
    licence: str | Iterable[str] | None = None,
    local_only: bool | None = None,
    source: str | None = None,
    kind: str | None = None,
    sort: str = "downloads",
    offset: int = 0,
    limit: int = 50,
) -> Page:
    """Browse: filters, an optional full-text condition (all words must match), sort and pagination."""
    from adapters_db.fulltext import match_all_ids

    conds = filter_conditions(
        base_family=base_family,
        include_nsfw=include_nsfw,
        tags=tags,
        licence=licence,
        local_only=local_only,
        source=source,
        kind=kind,
    )
    if text and text.strip():
        conds.append(Adapter.id.in_(match_all_ids(session, text)))
    total = session.execute(select(func.count(Adapter.id)).where(*conds)).scalar_one()
    ids = (
        session.execute(
            select(Adapter.id).where(*conds).order_by(*_order(sort)).offset(max(0, offset)).limit(limit)
        )
        .scalars()
        .all()
    )
    records = get_adapters(session, catalog, ids, full=False, max_nsfw=3 if include_nsfw else 0)
    return Page(tuple(records[i] for i in ids), int(total), offset, limit)


def catalog_counts(session: Session) -> dict[str, int]:
    """How many adapters, versions, files (stored locally), preview images and prompts."""

    def count(stmt: Any) -> int:
        return int(session.execute(stmt).scalar_one())

    return {
        "adapters": count(select(func.count(Adapter.id))),
        "versions": count(select(func.count(AdapterVersion.id))),
        "files": count(select(func.count(AdapterFile.id))),
        "local_files": count(select(func.count(AdapterFile.id)).where(AdapterFile.stored.is_(True))),
        "images": count(select(func.count(PreviewImage.id))),
        "prompts": count(select(func.count(PreviewImage.id)).where(PreviewImage.prompt.is_not(None))),
    }


# ----------------------------------------------------------------------------------------- writing


def clean_tag(name: str) -> str:
    """A tag as the catalog keeps it: lower case, each run of whitespace one space, at most 200 characters."""
    return " ".join(name.lower().split())[:200].rstrip()


def clean_tags(names: Iterable[str]) -> list[str]:
    """Distinct clean tags, in order, blank ones left out."""
    return [t for t in dict.fromkeys(clean_tag(n) for n in names if n) if t]


def create_missing_tags(session: Session, names: Sequence[str]) -> None:
    """Create the tags (clean names) the catalog lacks (no error for one a concurrent transaction creates)."""
    have = set(session.execute(select(Tag.name).where(Tag.name.in_(list(names)))).scalars())
    missing = [{"name": n} for n in dict.fromkeys(names) if n not in have]
    if not missing:
        return
    upsert = {"postgresql": pg_insert, "sqlite": sqlite_insert}.get(session.get_bind().dialect.name)
    table = Tag.__table__
    stmt = insert(table) if upsert is None else upsert(table).on_conflict_do_nothing(index_elements=["name"])
    session.execute(stmt, missing)


def _tag_rows(session: Session, names: Iterable[str]) -> list[Tag]:
    clean = clean_tags(names)
    if not clean:
        return []
    create_missing_tags(session, clean)
    rows = {t.name: t for t in session.execute(select(Tag).where(Tag.name.in_(clean))).scalars()}
    return [rows[name] for name in sorted(clean)]  # the order the relationship loads them in


def clip_text(value: str | None, size: int) -> str | None:
    """A text cut to its column's size (PostgreSQL refuses a longer one, SQLite would keep it)."""
    return None if value is None else str(value)[:size]


def _file_row(spec: FileSpec) -> AdapterFile:
    sha = spec.sha256.lower() if spec.sha256 else None
    return AdapterFile(
        file_name=spec.file_name[:500],
        size_bytes=spec.size_bytes,
        sha256=sha,
        autov2=autov2(sha) if sha else (spec.hashes.get("AutoV2") or None),
        hashes=dict(spec.hashes),
        format=spec.format,
        primary=spec.primary,
        remote_url=spec.remote_url,
        stored=spec.stored,
        header_metadata=dict(spec.header_metadata),
        rank=spec.rank,
        num_modules=spec.num_modules,
        components=list(spec.components),
    )


def _image_row(spec: ImageSpec, adapter: Adapter, position: int) -> PreviewImage:
    return PreviewImage(
        adapter=adapter,
        position=position,
        civitai_image_id=spec.civitai_image_id,
        url=spec.url,
        local_sha256=spec.local_sha256,
        local_ext=spec.local_ext,
        width=spec.width,
        height=spec.height,
        nsfw_level=spec.nsfw_level,
        blurhash=spec.blurhash,
        prompt=spec.prompt,
        negative_prompt=spec.negative_prompt,
        params=dict(spec.params),
        kind=spec.kind,
    )


def _version_row(spec: VersionSpec, adapter: Adapter, position: int) -> AdapterVersion:
    version = AdapterVersion(
        position=position,
        name=spec.name[:400],
        civitai_version_id=spec.civitai_version_id,
        base_model=spec.base_model,
        base_family=spec.base_family,
        description_html=sanitize_html(spec.description_html),
        download_url=spec.download_url,
        created_at=spec.created_at,
        download_count=spec.download_count,
    )
    version.files = [_file_row(f) for f in spec.files]
    version.trigger_words = [
        TriggerWord(adapter=adapter, position=i, word=w) for i, w in enumerate(spec.trigger_words)
    ]
    version.images = [_image_row(im, adapter, i) for i, im in enumerate(spec.images)]
    return version


def curated_fields(row: Adapter) -> set[str]:
    """The fields a person changed with :func:`update_metadata` (``True``, an older catalog's mark: all)."""
    curated = (row.extra or {}).get("curated")
    if curated is True:
        return set(CURATED_FIELDS)
    return set(curated) & set(CURATED_FIELDS) if isinstance(curated, list) else set()


def _apply_spec(session: Session, row: Adapter, spec: AdapterSpec, *, merge: bool) -> None:
    """Write a spec's content into a row; an update (``merge``) keeps what a person curated."""
    kept = curated_fields(row) if merge else set()
    changes: dict[str, Any] = {
        "name": spec.name,
        "description_html": spec.description_html,
        "base_family": spec.base_family,
        "nsfw_level": spec.nsfw_level,
        "creator": spec.creator,
        "licence": spec.licence,
    }
    _set_columns(row, {k: v for k, v in changes.items() if k not in kept})
    row.kind = spec.kind
    row.source = spec.source
    row.base_model = spec.base_model
    row.civitai_model_id = spec.civitai_model_id
    row.hf_repo = spec.hf_repo or row.hf_repo
    row.source_url = spec.source_url
    row.poi = spec.poi
    row.download_count = spec.stats.downloads
    row.favorite_count = spec.stats.favorites
    row.comment_count = spec.stats.comments
    row.rating_count = spec.stats.ratings
    row.rating = spec.stats.rating
    if spec.created_at is not None:
        row.created_at = spec.created_at
    row.extra = {**(row.extra or {}), **spec.extra, "fingerprint": spec_fingerprint(spec)}
    if "tags" not in kept:
        row.tags = _tag_rows(session, spec.tags)
    if merge:
        _merge_versions(row, spec, keep_triggers="trigger_words" in kept)
    else:
        row.versions = [_version_row(v, row, i) for i, v in enumerate(spec.versions)]


def spec_fingerprint(spec: AdapterSpec) -> str:
    """The spec's fingerprint with its files' ``stored`` flags cleared (a file turning local is no change)."""
    versions = tuple(
        replace(v, files=tuple(replace(f, stored=False) for f in v.files)) for v in spec.versions
    )
    return replace(spec, versions=versions).fingerprint()


def _described(spec: VersionSpec, versions: list[AdapterVersion]) -> AdapterVersion | None:
    """The version row a version spec is about: the same Civitai version id, else one without a Civitai
    id (a local import's) that has one of its files."""
    if spec.civitai_version_id is not None:
        found = next((v for v in versions if v.civitai_version_id == spec.civitai_version_id), None)
        if found is not None:
            return found
    hashes = {f.sha256.lower() for f in spec.files if f.sha256}
    return next(
        (v for v in versions if v.civitai_version_id is None and any(f.sha256 in hashes for f in v.files)),
        None,
    )


def _merge_versions(row: Adapter, spec: AdapterSpec, *, keep_triggers: bool = False) -> None:
    """Update the versions a spec describes in place and add its new ones; every other version (a local
    import's, one the record no longer lists) is kept after the version it followed (``keep_triggers``:
    the trigger words a person curated stay, new versions come without theirs)."""
    old = list(row.versions)
    merged: list[AdapterVersion] = []
    for v in spec.versions:
        version = _described(v, [o for o in old if o not in merged])
        if version is None:
            merged.append(_version_row(replace(v, trigger_words=()) if keep_triggers else v, row, 0))
        else:
            _update_version(version, v, row, keep_triggers=keep_triggers)
            merged.append(version)
    previous: AdapterVersion | None = None
    for version in old:
        if version not in merged:
            merged.insert(0 if previous is None else merged.index(previous) + 1, version)
        previous = version
    row.versions = merged
    for i, version in enumerate(merged):
        version.position = i


def _update_version(
    version: AdapterVersion, spec: VersionSpec, adapter: Adapter, *, keep_triggers: bool = False
) -> None:
    """Refresh a version from its spec; files and pictures are merged, what the spec lacks is kept."""
    version.name = spec.name[:400] or version.name
    if spec.civitai_version_id is not None:
        version.civitai_version_id = spec.civitai_version_id
    version.base_model = spec.base_model or version.base_model
    version.base_family = spec.base_family or version.base_family
    version.description_html = sanitize_html(spec.description_html) or version.description_html
    version.download_url = spec.download_url or version.download_url
    version.created_at = spec.created_at or version.created_at
    version.download_count = spec.download_count
    if spec.trigger_words and not keep_triggers:
        version.trigger_words = [
            TriggerWord(adapter=adapter, position=i, word=w) for i, w in enumerate(spec.trigger_words)
        ]
    _merge_files(version, spec.files)
    _merge_images(version, spec.images, adapter)


_FILE_COLUMNS = (
    "file_name",
    "size_bytes",
    "sha256",
    "autov2",
    "hashes",
    "format",
    "primary",
    "remote_url",
    "stored",
    "header_metadata",
    "rank",
    "num_modules",
    "components",
)


def _same_file(row: AdapterFile, spec: FileSpec) -> bool:
    """Whether a file row is the file a spec lists: the same SHA-256, else (neither has one) the same name."""
    if spec.sha256:
        return row.sha256 == spec.sha256.lower()
    return row.sha256 is None and row.file_name == spec.file_name[:500]


def _merge_files(version: AdapterVersion, specs: Iterable[FileSpec]) -> None:
    """Add a version's new files and refresh the ones it has; a local copy keeps what its header said."""
    for spec in specs:
        row = next((f for f in version.files if _same_file(f, spec)), None)
        if row is None:
            version.files.append(_file_row(spec))
        elif row.stored:
            row.remote_url = spec.remote_url or row.remote_url
            row.hashes = {**dict(spec.hashes), **dict(row.hashes or {})}
        else:
            fresh = _file_row(spec)
            for column in _FILE_COLUMNS:
                setattr(row, column, getattr(fresh, column))


def _image_keys(
    civitai_image_id: int | None, url: str | None, local_sha256: str | None = None
) -> list[tuple[str, Any]]:
    return [k for k in (("id", civitai_image_id), ("url", url), ("local", local_sha256)) if k[1]]


def _merge_images(version: AdapterVersion, specs: Iterable[ImageSpec], adapter: Adapter) -> None:
    """Append a version's new pictures; one it has (same Civitai image id, else URL, else the same stored
    local copy) is updated instead."""
    known = {
        k: im for im in version.images for k in _image_keys(im.civitai_image_id, im.url, im.local_sha256)
    }
    for spec in specs:
        keys = _image_keys(spec.civitai_image_id, spec.url, spec.local_sha256)
        row = next((known[k] for k in keys if k in known), None)
        if row is None:
            row = _image_row(spec, adapter, len(version.images))
            version.images.append(row)
        else:
            _update_image(row, spec)
        known.update(dict.fromkeys(keys, row))


def _update_image(row: PreviewImage, spec: ImageSpec) -> None:
    """Refresh a known picture from its spec, keeping what the spec lacks (a local copy, a prompt)."""
    row.civitai_image_id = spec.civitai_image_id or row.civitai_image_id
    row.url = spec.url or row.url
    if spec.local_sha256:
        row.local_sha256, row.local_ext = spec.local_sha256, spec.local_ext
    row.width = spec.width or row.width
    row.height = spec.height or row.height
    row.nsfw_level = spec.nsfw_level
    row.blurhash = spec.blurhash or row.blurhash
    row.prompt = spec.prompt or row.prompt
    row.negative_prompt = spec.negative_prompt or row.negative_prompt
    row.params = dict(spec.params) or dict(row.params or {})


def search_document_fields(row: Adapter) -> dict[str, str]:
    """The text the full-text index covers for one adapter (name, tags, triggers, file names, text)."""
    files = [Path(f.file_name).stem for v in row.versions for f in v.files]
    triggers = [t.word for v in row.versions for t in v.trigger_words]
    version_names = [v.name for v in row.versions if v.name]
    return {
        "name": row.name,
        "tags": ", ".join(t.name for t in row.tags),
        "triggers": ", ".join(dict.fromkeys(triggers)),
        "files": ", ".join(dict.fromkeys(files + version_names)),
        "description": row.description_text,
    }


def _write_search_document(session: Session, row: Adapter) -> None:
    fields = search_document_fields(row)
    doc = session.get(SearchDocument, row.id)
    if doc is None:
        session.add(SearchDocument(adapter_id=row.id, **fields))
        return
    for key, value in fields.items():
        setattr(doc, key, value)


def write_adapter(session: Session, spec: AdapterSpec, *, adapter_id: int | None = None) -> tuple[int, str]:
    """Insert a spec, or update adapter ``adapter_id`` / the one with the same Civitai id with it.

    An update rewrites the adapter's metadata and the versions the spec describes (by Civitai version
    id, else by a shared file) and keeps every other version, file and picture (:func:`_merge_versions`).
    Returns ``(adapter_id, status)`` with status ``imported``, ``updated`` or ``duplicate`` (an
    identical spec was written before: nothing changes).
    """
    row: Adapter | None = None
    if adapter_id is not None:
        row = session.get(Adapter, adapter_id)
        if row is None:
            raise NotFoundError(f"no adapter with id {adapter_id}")
    elif spec.civitai_model_id is not None:
        row = session.execute(
            select(Adapter).where(Adapter.civitai_model_id == spec.civitai_model_id)
        ).scalar_one_or_none()
    if row is not None and (row.extra or {}).get("fingerprint") == spec_fingerprint(spec):
        return row.id, "duplicate"
    status = "imported" if row is None else "updated"
    if row is None:
        row = Adapter()
        session.add(row)
    _apply_spec(session, row, spec, merge=status == "updated")
    session.flush()
    _write_search_document(session, row)
    bump_revision(session)
    session.flush()
    return row.id, status


def update_metadata(session: Session, catalog: Catalog, adapter_id: int, **changes: Any) -> AdapterRecord:
    """Curate an adapter: change name, description_html, tags, trigger_words, base_family, nsfw_level,
    creator, licence (a :class:`LicenceFlags`) or extra; unknown keys raise ``TypeError``, bad values
    ``ValueError`` before anything changes. A re-import of the adapter's record keeps what was curated.
    """
    unknown = set(changes) - {*CURATED_FIELDS, "extra"}
    if unknown:
        raise TypeError(f"update_metadata got unknown field(s): {', '.join(sorted(unknown))}")
    checked = _checked_changes(changes)
    row = session.execute(_full_query().where(Adapter.id == adapter_id)).scalar_one_or_none()
    if row is None:
        raise NotFoundError(f"no adapter with id {adapter_id}")
    if checked.get("trigger_words") and not row.versions:
        raise ValueError(f"adapter {adapter_id} has no version to hold trigger words")
    _apply_changes(session, row, checked)
    curated = sorted(curated_fields(row) | (set(checked) & set(CURATED_FIELDS)))
    row.extra = {**(row.extra or {}), "curated": curated}
    session.flush()
    _write_search_document(session, row)
    bump_revision(session)
    session.flush()
    return to_record(row, catalog.store)


def _words(value: Any, field: str) -> list[str]:
    """A list of words (tags, trigger words) as given: one string is refused, not split into letters."""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise TypeError(f"{field} must be a list of strings, got {type(value).__name__}")
    return [str(v) for v in value if v is not None]


def _checked_changes(changes: dict[str, Any]) -> dict[str, Any]:
    """A curation edit's values checked and normalised, so that a bad one raises before a row changes."""
    out = dict(changes)
    if "name" in out:
        out["name"] = str(out["name"] or "").strip()[:400]
        if not out["name"]:
            raise ValueError("an adapter name cannot be empty")
    if "tags" in out:
        out["tags"] = clean_tags(_words(out["tags"], "tags"))
    if "trigger_words" in out:
        words = (w.strip() for w in _words(out["trigger_words"], "trigger_words"))
        out["trigger_words"] = list(dict.fromkeys(w for w in words if w))
    if "base_family" in out:
        out["base_family"] = normalize_family(out["base_family"] or None)
    if "nsfw_level" in out:
        out["nsfw_level"] = int(out["nsfw_level"])
        if not 0 <= out["nsfw_level"] <= 3:
            raise ValueError(f"nsfw_level must be 0..3, got {out['nsfw_level']}")
    if out.get("creator") is not None:
        out["creator"] = str(out["creator"]).strip() or None
    if "licence" in out and not isinstance(out["licence"], LicenceFlags):
        raise TypeError(f"licence must be a LicenceFlags, got {type(out['licence']).__name__}")
    if "extra" in out:
        out["extra"] = dict(out["extra"])
    return out


def _set_columns(row: Adapter, values: dict[str, Any]) -> None:
    """Set the adapter columns among name, description_html, base_family, nsfw_level, creator, licence."""
    if "name" in values:
        row.name = values["name"][:400]
    if "description_html" in values:
        row.description_html = sanitize_html(values["description_html"])
        row.description_text = html_to_text(values["description_html"])
    if "base_family" in values:
        row.base_family = values["base_family"]
    if "nsfw_level" in values:
        row.nsfw_level = values["nsfw_level"]
    if "creator" in values:
        row.creator = clip_text(values["creator"], 200)
    if "licence" in values:
        lic: LicenceFlags = values["licence"]
        row.license, row.allow_commercial_use = (
            clip_text(lic.license, 100),
            clip_text(lic.allow_commercial_use, 100),
        )
        row.allow_no_credit, row.allow_derivatives = lic.allow_no_credit, lic.allow_derivatives
        row.allow_different_license = lic.allow_different_license


def _apply_changes(session: Session, row: Adapter, changes: dict[str, Any]) -> None:
    """Write a checked curation edit (:func:`_checked_changes`) into an adapter row."""
    _set_columns(row, changes)
    if "tags" in changes:
        row.tags = _tag_rows(session, changes["tags"])
    if "trigger_words" in changes and row.versions:
        version = row.versions[0]
        for extra_version in row.versions[1:]:
            extra_version.trigger_words.clear()
        version.trigger_words = [
            TriggerWord(adapter_id=row.id, position=i, word=w) for i, w in enumerate(changes["trigger_words"])
        ]
    if "extra" in changes:
        row.extra = {**(row.extra or {}), **changes["extra"]}


def stored_hashes(session: Session) -> set[str]:
    """SHA-256 of every file and image the catalog says is in the local store."""
    files = session.execute(select(AdapterFile.sha256).where(AdapterFile.stored.is_(True))).scalars()
    images = session.execute(
        select(PreviewImage.local_sha256).where(PreviewImage.local_sha256.is_not(None))
    ).scalars()
    return {h for h in files if h} | {h for h in images if h}


def local_adapter_hashes(session: Session) -> dict[str, int]:
    """SHA-256 of every locally stored file of an adapter without a Civitai id → that adapter's id."""
    rows = session.execute(
        select(AdapterFile.sha256, AdapterVersion.adapter_id)
        .join(AdapterVersion, AdapterFile.version_id == AdapterVersion.id)
        .join(Adapter, AdapterVersion.adapter_id == Adapter.id)
        .where(
            Adapter.civitai_model_id.is_(None),
            AdapterFile.stored.is_(True),
            AdapterFile.sha256.is_not(None),
        )
    )
    return {sha: adapter_id for sha, adapter_id in rows}


def delete_adapter(session: Session, catalog: Catalog, adapter_id: int, *, delete_files: bool = True) -> bool:
    """Delete an adapter with its versions, files, images and vectors; ``False`` if it did not exist.

    Stored blobs no other adapter references are removed from disk after the transaction commits
    (a rollback keeps them, so rows never point at missing files).
    """
    row = session.get(Adapter, adapter_id)
    if row is None:
        return False
    blobs = _adapter_blobs(session, adapter_id)
    session.execute(delete(SearchDocument).where(SearchDocument.adapter_id == adapter_id))
    session.delete(row)
    session.flush()
    bump_revision(session)
    if delete_files and blobs:
        _remove_after_commit(session, catalog, blobs)
    return True


def _adapter_blobs(session: Session, adapter_id: int) -> list[tuple[str, str, str | None]]:
    files = session.execute(
        select(AdapterFile.sha256)
        .join(AdapterVersion)
        .where(AdapterVersion.adapter_id == adapter_id, AdapterFile.stored.is_(True))
    ).scalars()
    images = session.execute(
        select(PreviewImage.local_sha256, PreviewImage.local_ext).where(
            PreviewImage.adapter_id == adapter_id, PreviewImage.local_sha256.is_not(None)
        )
    ).all()
    return [(s, "lora", None) for s in files if s] + [(s, "images", e or "") for s, e in images]


def _remove_after_commit(
    session: Session, catalog: Catalog, blobs: list[tuple[str, str, str | None]]
) -> None:
    def remove(_session: Session) -> None:
        with catalog.session_factory() as fresh:
            still = stored_hashes(fresh)
        for sha, kind, ext in blobs:
            if sha not in still:
                catalog.store.remove(sha, kind, ext)

    event.listen(session, "after_commit", remove, once=True)


def adapter_ids_matching(session: Session, conds: Sequence[Any]) -> set[int]:
    """Ids of the adapters that satisfy filter conditions (for search-time filtering)."""
    return set(session.execute(select(Adapter.id).where(*conds)).scalars())


def attach_local_file(session: Session, sha256: str, spec: FileSpec) -> int | None:
    """Mark every catalogued remote file with this SHA-256 (one upload can be listed by several adapters) as
    stored locally; returns the adapter id of the first of them."""
    rows = (
        session.execute(
            select(AdapterFile).where(AdapterFile.sha256 == sha256.lower()).order_by(AdapterFile.id)
        )
        .scalars()
        .all()
    )
    if not rows:
        return None
    for row in rows:
        row.stored = True
        row.size_bytes = spec.size_bytes or row.size_bytes
        row.header_metadata = dict(spec.header_metadata) or dict(row.header_metadata or {})
        row.rank = spec.rank if spec.rank is not None else row.rank
        row.num_modules = spec.num_modules if spec.num_modules is not None else row.num_modules
        row.components = list(spec.components) or list(row.components or [])
        row.format = spec.format or row.format
    adapter_id = rows[0].version.adapter_id
    bump_revision(session)
    session.flush()
    return adapter_id


def add_version(
    session: Session, adapter_id: int, spec: VersionSpec, *, merge_into: int | None = None
) -> int:
    """Append a version to an adapter, or merge its files and images into version ``merge_into`` (pictures
    it already has are not added twice). The adapter's fingerprint stays: a re-import of its unchanged
    record keeps what this added (see :func:`write_adapter`)."""
    row = session.execute(_full_query().where(Adapter.id == adapter_id)).scalar_one_or_none()
    if row is None:
        raise NotFoundError(f"no adapter with id {adapter_id}")
    if merge_into is None:
        row.versions.insert(0, _version_row(spec, row, 0))
        for i, version in enumerate(row.versions):
            version.position = i
    else:
        version = next((v for v in row.versions if v.id == merge_into), None)
        if version is None:
            raise NotFoundError(f"adapter {adapter_id} has no version with id {merge_into}")
        _merge_files(version, spec.files)
        _merge_images(version, spec.images, row)
    session.flush()
    _write_search_document(session, row)
    bump_revision(session)
    session.flush()
    return row.id
