"""The live Civitai REST API (``/api/v1/models``, ``/api/v1/model-versions/by-hash/…``): page through
LoRA models, catalogue them, optionally download and verify their files, and identify a local file by
its hash. The base URL is configurable (tests run a fake API on 127.0.0.1).
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from adapters_db.dto import ImportResult, ImportSummary
from adapters_db.importers.civitai import import_civitai_records
from adapters_db.importers.common import inspect_lora, run_item
from adapters_db.importers.download import HttpConfig, download_to_store, get_json, url_origin
from adapters_db.importers.sidecars import REFUSED_EXTS
from adapters_db.models import AdapterFile, AdapterVersion
from adapters_db.repository import attach_local_file
from adapters_db.specs import FileSpec

if TYPE_CHECKING:
    from adapters_db.catalog import Catalog


class CivitaiClient:
    """A small client of Civitai's public API."""

    def __init__(
        self,
        base_url: str = "https://civitai.com",
        api_key: str | None = None,
        config: HttpConfig = HttpConfig(),
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.plain_config = config  # for downloads: the key is added per URL (Civitai's hosts only)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.config = replace(config, headers={**config.headers, **headers})

    def _url(self, path: str, params: dict[str, Any] | None = None) -> str:
        query = urllib.parse.urlencode({k: v for k, v in (params or {}).items() if v is not None}, doseq=True)
        return f"{self.base_url}{path}" + (f"?{query}" if query else "")

    def models(
        self,
        *,
        query: str | None = None,
        limit: int = 100,
        page_size: int = 100,
        nsfw: bool = False,
        sort: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        """LoRA model records, following ``metadata.nextPage`` until ``limit`` records."""
        url: str | None = self._url(
            "/api/v1/models",
            {
                "types": "LORA",
                "limit": min(page_size, limit),
                "query": query,
                "nsfw": str(nsfw).lower(),
                "sort": sort,
            },
        )
        seen = empty = 0
        visited: set[str] = set()
        while url and seen < limit:
            visited.add(url)
            page = get_json(url, self.config)
            items = page.get("items") if isinstance(page, dict) else None
            if not isinstance(items, list):
                raise ValueError(f"{url}: not a Civitai models page (no 'items' list)")
            for item in items:
                if seen >= limit:
                    return
                seen += 1
                yield item
            empty = empty + 1 if not items else 0
            if empty >= MAX_EMPTY_PAGES:
                raise ValueError(f"{url}: {empty} empty pages in a row; pagination stopped")
            url = self._next_page(url, page.get("metadata"), visited)

    def _next_page(self, url: str, metadata: Any, visited: set[str]) -> str | None:
        """The page after ``url``: None at the end; raises on a loop or a link off the API's origin
        (the key must not follow it there)."""
        following = metadata.get("nextPage") if isinstance(metadata, dict) else None
        if not following:
            return None
        following = urllib.parse.urljoin(url, str(following))
        if url_origin(following) != url_origin(self.base_url):
            raise ValueError(f"{url}: nextPage {following!r} leaves {self.base_url}; not followed")
        if following in visited:
            raise ValueError(f"{url}: nextPage {following!r} repeats an earlier page (a pagination loop)")
        return following

    def _object(self, url: str) -> dict[str, Any]:
        """A JSON object from the API (raises ``ValueError`` for any other JSON)."""
        data = get_json(url, self.config)
        if not isinstance(data, dict):
            raise ValueError(f"{url}: expected a JSON object, got {type(data).__name__}")
        return data

    def model(self, model_id: int) -> dict[str, Any]:
        """One model record."""
        return self._object(self._url(f"/api/v1/models/{int(model_id)}"))

    def version(self, version_id: int) -> dict[str, Any]:
        """One model-version record (it names its model: ``modelId``)."""
        return self._object(self._url(f"/api/v1/model-versions/{int(version_id)}"))

    def version_by_hash(self, digest: str) -> dict[str, Any]:
        """The model version owning a file with this SHA-256 / AutoV2 hash (raises if unknown)."""
        return self._object(self._url(f"/api/v1/model-versions/by-hash/{urllib.parse.quote(digest)}"))


CIVITAI_HOSTS = ("civitai.com", "www.civitai.com")
MAX_EMPTY_PAGES = 5  # a listing whose pages stay empty is not followed for ever


class PageError(ValueError):
    """A page of the API's model listing that could not be read (the records before it are kept)."""


def client_from_env() -> CivitaiClient:
    """A client of ``$STUDIO_CIVITAI_URL`` (default https://civitai.com) with the key in ``$CIVITAI_API_KEY``
    (some files need one; it is only sent to Civitai's hosts and to the API itself)."""
    base = os.environ.get("STUDIO_CIVITAI_URL") or "https://civitai.com"
    return CivitaiClient(base_url=base, api_key=os.environ.get("CIVITAI_API_KEY") or None)


def _remote_files(
    session: Session, adapter_ids: list[int], civitai_version_ids: list[int] | None = None
) -> list[AdapterFile]:
    query = (
        select(AdapterFile)
        .join(AdapterVersion)
        .where(
            AdapterVersion.adapter_id.in_(adapter_ids),
            AdapterFile.stored.is_(False),
            AdapterFile.sha256.is_not(None),
            AdapterFile.remote_url.is_not(None),
            AdapterFile.primary.is_(True),
        )
        .order_by(AdapterFile.id)
    )
    if civitai_version_ids is not None:
        query = query.where(AdapterVersion.civitai_version_id.in_(civitai_version_ids))
    return list(session.execute(query).scalars())


def download_config(url: str, config: HttpConfig, api_key: str | None) -> HttpConfig:
    """``config`` with Civitai's bearer token when ``url`` is on Civitai (never sent to other hosts)."""
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    if not api_key or host not in CIVITAI_HOSTS:
        return config
    return replace(config, headers={**config.headers, "Authorization": f"Bearer {api_key}"})


def download_files(
    session: Session,
    catalog: Catalog,
    adapter_ids: list[int],
    config: HttpConfig = HttpConfig(),
    *,
    civitai_version_ids: list[int] | None = None,
    api_key: str | None = None,
) -> list[ImportResult]:
    """Download the primary files of catalogued adapters (of the given Civitai versions only, if given),
    verify each SHA-256, then mark them stored; ``api_key`` is sent to Civitai's hosts only.

    Each file is checked with ``inspect_lora`` (header, finite weights) before it is registered; a file
    that fails (HTTP error, hash mismatch, not a LoRA, NaN weights) leaves the entry remote and is reported.
    """
    results = []
    fetched: dict[str, int] = {}  # SHA-256 → the adapter it was downloaded for in this call
    for row in _remote_files(session, adapter_ids, civitai_version_ids):
        url, sha = row.remote_url or "", (row.sha256 or "").lower()
        adapter_id = row.version.adapter_id
        if row.format == "pickle" or Path(row.file_name).suffix.lower() in REFUSED_EXTS:
            why = f"{row.file_name}: pickled checkpoints are refused (not downloaded); only .safetensors"
            results.append(ImportResult(url, "failed", adapter_id, row.file_name, message=why))
            continue
        if sha in fetched:  # one upload listed by several of the adapters: fetched once, stored for all
            why = f"stored with adapter {fetched[sha]} (the same file)"
            results.append(ImportResult(url, "updated", adapter_id, row.file_name, sha, why))
            continue
        auth = download_config(url, config, api_key)
        if row.size_bytes and row.size_bytes > 0:  # the record's size, with slack for its rounding
            cap = row.size_bytes + row.size_bytes // 20 + (1 << 20)
            auth = replace(auth, max_bytes=min(auth.max_bytes, cap))
        result = run_item(
            session,
            url,
            lambda u=url, h=sha, n=row.file_name, c=auth: _download_one(session, catalog, u, h, n, c),
        )
        if result.ok:  # reported for the adapter asked for, not the first one listing the same file
            result = replace(result, adapter_id=adapter_id)
            fetched[sha] = adapter_id
        else:
            result = replace(result, adapter_id=adapter_id, name=result.name or row.file_name)
        results.append(result)
    return results


def _download_one(
    session: Session, catalog: Catalog, url: str, sha256: str, name: str, config: HttpConfig
) -> ImportResult:
    stored = download_to_store(url, catalog.store, expected_sha256=sha256, config=config)
    try:
        info = inspect_lora(stored.path)
        spec = FileSpec(
            file_name=name,
            sha256=stored.sha256,
            size_bytes=stored.size_bytes,
            format=info.format,
            stored=True,
            header_metadata=dict(info.metadata),
            rank=info.rank or None,
            num_modules=info.num_modules,
            components=tuple(sorted(info.components)),
        )
        adapter_id = attach_local_file(session, stored.sha256, spec)
    except Exception:  # whatever failed, the new blob must not outlive its rolled-back row
        if not stored.existed:
            stored.path.unlink(missing_ok=True)
        raise
    return ImportResult(url, "updated", adapter_id, name, stored.sha256, "downloaded and verified")


def _records(
    client: CivitaiClient, query: str | None, limit: int
) -> Iterator[tuple[str, dict[str, Any] | Exception]]:
    """The API's records for the importer; an item that is not an object, or a page that fails (HTTP
    error, not a page, a pagination loop), becomes one failed record and the records before it stay."""
    pages = client.models(query=query, limit=limit)
    n = 0
    while True:
        try:
            record = next(pages)
        except StopIteration:
            return
        except (OSError, ValueError) as exc:
            yield f"{client.base_url} models (after {n} records)", PageError(str(exc))
            return
        n += 1
        if isinstance(record, dict):
            yield f"{client.base_url} model {record.get('id')}", record
        else:
            yield f"{client.base_url} models, item {n}", TypeError(f"not a JSON object: {record!r:.80}")


def import_from_api(
    session: Session,
    catalog: Catalog,
    client: CivitaiClient,
    *,
    query: str | None = None,
    limit: int = 100,
    download: bool = False,
    show_progress: bool = False,
) -> ImportSummary:
    """Catalogue LoRAs from the live API (as remote entries), optionally downloading their files; a page
    that fails ends the listing as one failed result, keeping the records before it."""
    records = _records(client, query, limit)
    summary = import_civitai_records(session, catalog, records, show_progress=show_progress, total=limit)
    if not download:
        return summary
    ids = [r.adapter_id for r in summary.results if r.ok and r.adapter_id is not None]
    downloads = download_files(session, catalog, ids, client.plain_config, api_key=client.api_key)
    return ImportSummary(summary.results + tuple(downloads))


_PAGE = re.compile(r"/models/(\d+)(?:/[^/]*)?/?$")
_DOWNLOAD = re.compile(r"/api/download/models/(\d+)/?$")


CivitaiRef = tuple[int | None, int | None]  # (model id, version id)


def parse_civitai_url(url: str, base_url: str = "https://civitai.com") -> CivitaiRef | None:
    """(model id, version id) of a Civitai model page (``/models/4384/name?modelVersionId=128713``) or
    download link (``/api/download/models/128713``) on Civitai or ``base_url``'s host; None otherwise."""
    parts = urllib.parse.urlsplit(url.strip())
    hosts = {*CIVITAI_HOSTS, urllib.parse.urlsplit(base_url).netloc.lower()}
    if parts.scheme not in ("http", "https") or parts.netloc.lower() not in hosts:
        return None
    version = urllib.parse.parse_qs(parts.query).get("modelVersionId", [""])[0]
    if m := _DOWNLOAD.search(parts.path):
        return None, int(m[1])
    if m := _PAGE.search(parts.path):
        return int(m[1]), int(version) if version.isdigit() else None
    return None


def import_civitai_url(session: Session, catalog: Catalog, client: CivitaiClient, url: str) -> ImportSummary:
    """Catalogue the model of a Civitai page or download link and download its version's file (the
    page's ``modelVersionId``, else the newest version), verified as in :func:`download_files`."""
    found = parse_civitai_url(url, client.base_url)
    if found is None:
        raise ValueError(f"{url} is not a Civitai model page or download link")
    model_id, version_id = found
    if model_id is None:
        model_id = int(client.version(version_id or 0).get("modelId") or 0)
    record = client.model(model_id)
    versions = [v for v in record.get("modelVersions") or [] if isinstance(v, dict)]
    if version_id is None and versions:
        version_id = int(versions[0].get("id") or 0)  # Civitai lists the newest version first
    if version_id not in {v.get("id") for v in versions}:
        raise ValueError(f"Civitai model {model_id} has no version {version_id}")
    summary = import_civitai_records(session, catalog, [(url, record)])
    ids = [r.adapter_id for r in summary.results if r.ok and r.adapter_id is not None]
    downloads = download_files(
        session, catalog, ids, client.plain_config, civitai_version_ids=[version_id], api_key=client.api_key
    )
    return ImportSummary(summary.results + tuple(downloads))


def identify_file(client: CivitaiClient, path: Path) -> dict[str, Any]:
    """Civitai's model-version record of a local file, looked up by its SHA-256."""
    from adapters_db.store import sha256_file

    return client.version_by_hash(sha256_file(Path(path)))
