"""The Catalog tab: search and browse with filters, the detail view, curation, imports."""

from __future__ import annotations

import math
import re
import urllib.parse
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import adapters_db
from adapters_db import AdapterRecord, ImportResult, ImportSummary
from adapters_db.models import UNSEARCHABLE_KINDS
from adapters_db.repository import LICENCE_FLAGS, SORTS
from studio.handlers import html
from studio.handlers.state import SessionState
from studio.services import Services

LOCATIONS = ("all", "local", "remote")
# the type filter, as Civitai names the types → the catalog's ``kind`` (None: every type)
KINDS: dict[str, str | None] = {
    "any": None,
    "LoRA": "lora",
    "LoCon": "locon",
    "LyCORIS": "lycoris",
    "DoRA": "dora",
    "gate": "gate",
}
PAGE_SIZE = 24
_HF_REPO = re.compile(r"^(?:https?://huggingface\.co/)?([A-Za-z0-9][\w.-]*/[\w.-]+)/?$")


@dataclass(frozen=True)
class CatalogQuery:
    """What the catalog's search box and filters say."""

    text: str = ""
    base_family: str | None = None
    tags: tuple[str, ...] = ()
    include_nsfw: bool = False
    licence: tuple[str, ...] = ()
    location: str = "all"
    kind: str | None = None  # a value of KINDS
    sort: str = "relevance"
    page: int = 1
    page_size: int = PAGE_SIZE

    def __post_init__(self) -> None:
        if self.kind not in KINDS.values():
            types = ", ".join(k for k in KINDS.values() if k)
            raise ValueError(f"unknown adapter type {self.kind!r}: use one of {types}")
        if self.location not in LOCATIONS:
            raise ValueError(f"location must be one of {', '.join(LOCATIONS)}, got {self.location!r}")
        if self.sort not in SORTS:
            raise ValueError(f"unknown sort {self.sort!r}: use one of {', '.join(SORTS)}")
        unknown = [f for f in self.licence if f not in LICENCE_FLAGS]
        if unknown:
            raise ValueError(f"unknown licence filter(s) {unknown}: use {', '.join(LICENCE_FLAGS)}")
        if self.page < 1 or not 1 <= self.page_size <= 200:
            raise ValueError("pages start at 1 and hold 1 to 200 adapters")
        if self.base_family is not None:
            object.__setattr__(self, "base_family", adapters_db.normalize_family(self.base_family))

    @property
    def local_only(self) -> bool | None:
        """The repository's ``local_only`` filter for the location choice."""
        return {"all": None, "local": True, "remote": False}[self.location]

    def filters(self) -> dict[str, Any]:
        """The filters as keyword arguments of ``search``, ``search_by_image`` and ``list_adapters``."""
        return dict(
            base_family=self.base_family,
            include_nsfw=self.include_nsfw,
            tags=self.tags or None,
            licence=self.licence or None,
            local_only=self.local_only,
            kind=self.kind,
        )


def split_tags(text: str) -> tuple[str, ...]:
    """Comma-separated tags → a tuple of lower-case tags."""
    return tuple(t.strip().lower() for t in (text or "").split(",") if t.strip())


@dataclass
class CatalogPage:
    """One page of results: the records, why each matched (searches), and paging."""

    items: list[AdapterRecord]
    why: dict[int, str]
    page: int
    total: int | None  # None when a search has no exact total (more pages may exist)
    has_next: bool
    page_size: int = PAGE_SIZE
    title: str = ""  # what the page shows, when it is not a page of the text search (a picture search)

    def label(self) -> str:
        """``page 2 of 5 (113 adapters)`` or ``page 2`` (or the page's own title)."""
        if self.title:
            return self.title
        if self.total is None:
            return f"page {self.page}" + (" · more on the next page" if self.has_next else "")
        pages = max(1, math.ceil(self.total / self.page_size))
        return f"page {self.page} of {pages} ({self.total} adapter{'s' if self.total != 1 else ''})"


def browse(services: Services, q: CatalogQuery) -> CatalogPage:
    """Search (a query: the catalog's hybrid search) or list (no query) with the filters and sort; a page
    past the end (the next button on the last page) shows the last page instead."""
    page = _browse(services, q)
    if page.items or q.page == 1:
        return page
    if page.total is not None:
        last = max(1, math.ceil(page.total / q.page_size))
        return _browse(services, replace(q, page=last)) if last < q.page else page
    back = _browse(services, replace(q, page=q.page - 1))  # a search has no total: one step back
    return back if back.items else _browse(services, replace(q, page=1))


def _browse(services: Services, q: CatalogQuery) -> CatalogPage:
    """One page of a search or a listing, as asked."""
    catalog, offset = services.catalog, (q.page - 1) * q.page_size
    with catalog.session() as session:
        if q.text.strip() and q.kind not in UNSEARCHABLE_KINDS:
            hits = adapters_db.search(
                session,
                catalog,
                q.text,
                q.page_size + 1,
                **q.filters(),
                sort=q.sort,
                offset=offset,
                matching_only=True,  # a catalog text search lists what matches, not the rest by popularity
            )
            shown = hits[: q.page_size]
            return CatalogPage(
                [h.adapter for h in shown],
                {h.adapter.id: h.why for h in shown},
                q.page,
                None,
                len(hits) > q.page_size,
                q.page_size,
            )
        sort = "downloads" if q.sort == "relevance" else q.sort
        page = adapters_db.list_adapters(  # gate checkpoints are listed by name, never searched
            session,
            catalog,
            text=q.text.strip() or None,
            **q.filters(),
            sort=sort,
            offset=offset,
            limit=q.page_size,
        )
    return CatalogPage(
        list(page.items), {}, q.page, page.total, offset + len(page.items) < page.total, q.page_size
    )


def picture_search_note(services: Services) -> str:
    """What the Search by picture panel says before a search: how, or why it cannot."""
    embedder = services.catalog.embedder
    if embedder.supports_images:
        return "Upload or paste a picture: the adapters whose previews look most like it are listed here."
    return (
        f"The catalog's embedder ({embedder.name}) reads text only: start the studio with "
        "`--embedder open_clip:MODEL:TAG` (or a local checkpoint) to search by picture."
    )


def find_by_picture(services: Services, picture: str | None, q: CatalogQuery) -> CatalogPage:
    """The adapters whose preview pictures, prompts and descriptions are closest to an uploaded picture
    (the catalog's open_clip image tower), with the query's filters; the text and the sort are not used."""
    if not picture:
        raise ValueError("choose a picture to search by (upload or paste one)")
    catalog = services.catalog
    if not catalog.embedder.supports_images:
        raise ValueError(
            f"the catalog's embedder {catalog.embedder.name} reads text only: start the studio with "
            "--embedder open_clip:MODEL:TAG (or a local checkpoint) to search by picture"
        )
    if q.kind in UNSEARCHABLE_KINDS:
        raise ValueError(f"{q.kind} checkpoints are listed by name, never searched")
    with catalog.session() as session:
        hits = adapters_db.search_by_image(session, catalog, picture, q.page_size, **q.filters())
    title = f"the {len(hits)} adapter{'s' if len(hits) != 1 else ''} closest to the picture"
    why = {h.adapter.id: h.why for h in hits}
    return CatalogPage([h.adapter for h in hits], why, 1, len(hits), False, q.page_size, title=title)


def page_data(page: CatalogPage) -> list[dict[str, Any]]:
    """Plain data of a page (the API's view)."""
    return [
        {
            "id": r.id,
            "name": r.name,
            "base_model": r.base_model or r.base_family,
            "tags": list(r.tags),
            "trigger_words": list(r.trigger_words),
            "local": r.has_local_file,
            "downloads": r.stats.downloads,
            "rating": r.stats.rating,
            "nsfw_level": r.nsfw_level,
            "why": page.why.get(r.id, ""),
        }
        for r in page.items
    ]


def get_record(services: Services, adapter_id: int | str) -> AdapterRecord:
    """The full record of one adapter."""
    try:
        key = int(adapter_id)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not an adapter id: {adapter_id!r}") from exc
    with services.catalog.session() as session:
        record = adapters_db.get_adapter(session, services.catalog, key)
    if record is None:
        raise LookupError(f"no adapter with id {key} in the catalog (deleted?)")
    return record


def open_detail(
    services: Services, state: SessionState, adapter_id: int | str
) -> tuple[SessionState, AdapterRecord]:
    """Open an adapter in the detail view."""
    record = get_record(services, adapter_id)
    return replace(state, detail_id=record.id), record


def preview_prompt(record: AdapterRecord, image_id: int | str) -> tuple[str, str, dict[str, Any]]:
    """(prompt, negative prompt, parameters) of one of an adapter's preview images ("use this prompt")."""
    image = next((i for i in record.images if str(i.id) == str(image_id)), None)
    if image is None or not image.prompt:
        raise LookupError(f"{record.name!r} has no preview image {image_id} with a prompt")
    return image.prompt, image.negative_prompt or "", dict(image.params)


@dataclass(frozen=True)
class MetadataEdit:
    """What a person may change about an adapter."""

    name: str
    tags: tuple[str, ...] = ()
    trigger_words: tuple[str, ...] = ()
    base_family: str | None = None
    nsfw_level: int = 0
    description_html: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def edit_metadata(services: Services, adapter_id: int, edit: MetadataEdit) -> AdapterRecord:
    """Save a curation edit (the description is sanitised by the catalog)."""
    changes: dict[str, Any] = {
        "name": edit.name,
        "tags": list(edit.tags),
        "trigger_words": list(edit.trigger_words),
        "base_family": edit.base_family or None,
        "nsfw_level": int(edit.nsfw_level),
    }
    if edit.description_html is not None:
        changes["description_html"] = edit.description_html
    with services.catalog.session() as session:
        return adapters_db.update_metadata(session, services.catalog, int(adapter_id), **changes)


def follow_edit(state: SessionState, record: AdapterRecord) -> SessionState:
    """The state with the mix entries of an edited adapter showing its saved name, trigger words and base
    family (weights and per-adapter settings kept); the same state when the mix holds none of it."""
    mix = tuple(
        replace(
            m,
            name=record.name,
            trigger_words=tuple(record.trigger_words),
            family=record.base_family,
        )
        if m.adapter_id == record.id
        else m
        for m in state.mix
    )
    return state if mix == state.mix else state.with_mix(mix)


def delete_question(record: AdapterRecord) -> str:
    """The Markdown question that asks before an adapter is deleted (its name shown as typed)."""
    return f"Delete **{html.md(record.name)}** and its files for good?"


def delete(services: Services, state: SessionState, adapter_id: int) -> tuple[SessionState, str]:
    """Delete an adapter (and its files nothing else uses); the mix loses it too."""
    record = get_record(services, adapter_id)
    with services.catalog.session() as session:
        if not adapters_db.delete_adapter(session, services.catalog, record.id):
            raise LookupError(f"no adapter with id {adapter_id}")
    mix = tuple(m for m in state.mix if m.adapter_id != record.id)
    return replace(state, mix=mix, detail_id=None), f"deleted {record.name!r}"


# ------------------------------------------------------------------------------------------ import
def _embed(services: Services, summary: ImportSummary) -> None:
    """Embed the imported adapters now, so the next search does not pay for it."""
    ids = {r.adapter_id for r in summary.results if r.ok and r.adapter_id is not None}
    if ids:
        with services.catalog.session() as session:
            adapters_db.embed_missing(services.catalog, session=session, adapter_ids=ids)


def import_uploads(services: Services, paths: list[str]) -> ImportSummary:
    """Import uploaded ``.safetensors`` files (each one on its own: a bad file fails alone)."""
    if not paths:
        raise ValueError("choose one or more .safetensors files to import")
    results = []
    for path in paths:
        with services.catalog.session() as session:
            results.append(adapters_db.import_file(session, services.catalog, Path(path)))
    summary = ImportSummary(tuple(results))
    _embed(services, summary)
    return summary


def import_folder(services: Services, folder: str) -> ImportSummary:
    """Import an A1111/ComfyUI ``models/Lora`` folder on the studio's machine (previews and sidecars too)."""
    root = Path((folder or "").strip()).expanduser()
    if not str(root) or str(root) == ".":
        raise ValueError("type the path of a LoRA folder on the studio's machine")
    with services.catalog.session() as session:
        summary = adapters_db.import_folder(session, services.catalog, root)
    _embed(services, summary)
    return summary


def download_adapter(services: Services, adapter_id: int | str) -> tuple[AdapterRecord, ImportSummary]:
    """Download a remote adapter's file (verified against its SHA-256, checked as a LoRA) so it can be
    used; the entry stays remote, and the reason is raised, when the download fails."""
    from adapters_db.importers.civitai_api import client_from_env, download_files

    record = get_record(services, adapter_id)
    if not record.downloadable:
        why = "its file is already stored" if record.has_local_file else "it has no download link with a hash"
        raise ValueError(f"nothing to download for {record.name!r}: {why}")
    client = client_from_env()
    with services.catalog.session() as session:
        results = download_files(
            session, services.catalog, [record.id], client.plain_config, api_key=client.api_key
        )
    summary = ImportSummary(tuple(results))
    if summary.failed:
        raise ValueError(f"downloading {record.name!r} failed: {summary.failed[0].message}")
    _embed(services, summary)
    return get_record(services, record.id), summary


def import_url(services: Services, url: str) -> ImportSummary:
    """Import from a Civitai model page or download link (the record and its version's file), a direct
    ``http(s)://…safetensors`` link, or a Hugging Face repo (``owner/name``)."""
    from adapters_db.importers.civitai_api import client_from_env, import_civitai_url, parse_civitai_url
    from adapters_db.importers.download import download_to_store
    from adapters_db.importers.huggingface import HuggingFaceClient, import_hf_repo

    text = (url or "").strip()
    parts = urllib.parse.urlsplit(text)
    catalog = services.catalog
    client = client_from_env()
    if parse_civitai_url(text, client.base_url) is not None:
        with catalog.session() as session:
            summary = import_civitai_url(session, catalog, client, text)
    elif parts.scheme in ("http", "https") and parts.path.lower().endswith(".safetensors"):
        stored = download_to_store(text, catalog.store)
        name = urllib.parse.unquote(parts.path.rsplit("/", 1)[-1])
        with catalog.session() as session:
            result = adapters_db.import_file(session, catalog, stored.path, file_name=name, source_url=text)
        if not result.ok and not stored.existed:
            stored.path.unlink(missing_ok=True)
        summary = ImportSummary((replace(result, source=text),))
    elif m := _HF_REPO.match(text):
        with catalog.session() as session:
            summary = import_hf_repo(session, catalog, HuggingFaceClient(), m[1])
    else:
        raise ValueError(
            "give a Civitai model page (https://civitai.com/models/…), a direct link to a .safetensors file "
            "(http/https) or a Hugging Face repo like owner/name"
        )
    _embed(services, summary)
    return summary


def summary_text(summary: ImportSummary, *, short_paths: bool = False) -> str:
    """Markdown report of an import: counts, then one line per item (names and messages come from files
    and the web: shown as text, never as Markdown or HTML). ``short_paths``: name each item by its file
    name in the messages too (uploads, whose paths are the server's temporary folders)."""
    lines = [f"**Import:** {html.md(summary.describe())}"]
    for r in summary.results:
        lines.append(_result_line(r, short_paths))
    return "\n".join(lines)


def _result_line(r: ImportResult, short_paths: bool = False) -> str:
    name = r.name or Path(r.source).name
    message = r.message
    if short_paths and r.source and Path(r.source).name:
        message = message.replace(str(r.source), Path(r.source).name)
    detail = f" — {html.md(message)}" if message else ""
    return f"- {html.md(r.status)}: {html.md(name)}{detail}"
