"""Bulk insertion of many new adapters with a few multi-row INSERTs (catalog dumps, the scale benchmark).

Specs are validated by their converters before anything is written; a batch is inserted inside one
savepoint, so a database error (a duplicate id inside the batch, say) rolls the whole batch back and
the caller retries it one spec at a time to find the culprit. The revision is bumped once per batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from adapters_db.catalog import bump_revision
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
from adapters_db.repository import clean_tags, clip_text, create_missing_tags, spec_fingerprint
from adapters_db.sanitize import html_to_text, sanitize_html
from adapters_db.specs import AdapterSpec
from adapters_db.store import autov2


def _adapter_row(spec: AdapterSpec, description_html: str) -> dict[str, Any]:
    lic, st = spec.licence, spec.stats
    row: dict[str, Any] = {
        "name": spec.name[:400],
        "kind": spec.kind,
        "source": spec.source,
        "description_html": description_html,
        "description_text": html_to_text(spec.description_html),
        "base_family": spec.base_family,
        "base_model": spec.base_model,
        "nsfw_level": spec.nsfw_level,
        "creator": clip_text(spec.creator, 200),
        "civitai_model_id": spec.civitai_model_id,
        "hf_repo": spec.hf_repo,
        "source_url": spec.source_url,
        "license": clip_text(lic.license, 100),
        "allow_no_credit": lic.allow_no_credit,
        "allow_commercial_use": clip_text(lic.allow_commercial_use or None, 100),
        "allow_derivatives": lic.allow_derivatives,
        "allow_different_license": lic.allow_different_license,
        "poi": spec.poi,
        "download_count": st.downloads,
        "favorite_count": st.favorites,
        "comment_count": st.comments,
        "rating_count": st.ratings,
        "rating": st.rating,
        "extra": {**spec.extra, "fingerprint": spec_fingerprint(spec)},
    }
    if spec.created_at is not None:
        row["created_at"] = spec.created_at
    return row


def _tag_ids(session: Session, names: set[str]) -> dict[str, int]:
    found: dict[str, int] = {}
    ordered = sorted(n for n in names if n)
    for start in range(0, len(ordered), 500):
        chunk = ordered[start : start + 500]
        create_missing_tags(session, chunk)
        found.update({n: i for i, n in session.execute(select(Tag.id, Tag.name).where(Tag.name.in_(chunk)))})
    return found


def insert_new(session: Session, specs: Sequence[AdapterSpec]) -> list[int]:
    """Insert specs of adapters that are not in the catalog yet; returns their ids in order."""
    if not specs:
        return []
    rows = [_adapter_row(s, sanitize_html(s.description_html)) for s in specs]
    ids = list(
        session.execute(insert(Adapter).returning(Adapter.id, sort_by_parameter_order=True), rows).scalars()
    )
    tags = _tag_ids(session, {t for s in specs for t in clean_tags(s.tags)})
    links = [
        {"adapter_id": a, "tag_id": tags[t]}
        for a, s in zip(ids, specs, strict=True)
        for t in clean_tags(s.tags)
    ]
    if links:
        session.execute(insert(adapter_tags), links)
    version_rows, owners = [], []
    for adapter_id, spec in zip(ids, specs, strict=True):
        for position, v in enumerate(spec.versions):
            version_rows.append(
                {
                    "adapter_id": adapter_id,
                    "position": position,
                    "name": v.name[:400],
                    "civitai_version_id": v.civitai_version_id,
                    "base_model": v.base_model,
                    "base_family": v.base_family,
                    "description_html": sanitize_html(v.description_html),
                    "download_url": v.download_url,
                    "created_at": v.created_at,
                    "download_count": v.download_count,
                }
            )
            owners.append((adapter_id, v))
    version_ids = list(
        session.execute(
            insert(AdapterVersion).returning(AdapterVersion.id, sort_by_parameter_order=True), version_rows
        ).scalars()
    )
    _children(session, version_ids, owners)
    _documents(session, ids, specs)
    bump_revision(session)
    return ids


def _children(session: Session, version_ids: list[int], owners: list[tuple[int, Any]]) -> None:
    files, triggers, images = [], [], []
    for vid, (aid, v) in zip(version_ids, owners, strict=True):
        for f in v.files:
            sha = f.sha256.lower() if f.sha256 else None
            files.append(
                {
                    "version_id": vid,
                    "file_name": f.file_name[:500],
                    "size_bytes": f.size_bytes,
                    "sha256": sha,
                    "autov2": autov2(sha) if sha else (f.hashes.get("AutoV2") or None),
                    "hashes": dict(f.hashes),
                    "format": f.format,
                    "primary": f.primary,
                    "remote_url": f.remote_url,
                    "stored": f.stored,
                    "header_metadata": dict(f.header_metadata),
                    "rank": f.rank,
                    "num_modules": f.num_modules,
                    "components": list(f.components),
                }
            )
        triggers += [
            {"version_id": vid, "adapter_id": aid, "position": i, "word": w}
            for i, w in enumerate(v.trigger_words)
        ]
        images += [
            {
                "version_id": vid,
                "adapter_id": aid,
                "position": i,
                "civitai_image_id": im.civitai_image_id,
                "url": im.url,
                "local_sha256": im.local_sha256,
                "local_ext": im.local_ext,
                "width": im.width,
                "height": im.height,
                "nsfw_level": im.nsfw_level,
                "blurhash": im.blurhash,
                "prompt": im.prompt,
                "negative_prompt": im.negative_prompt,
                "params": dict(im.params),
                "kind": im.kind,
            }
            for i, im in enumerate(v.images)
        ]
    for model, rows in ((AdapterFile, files), (TriggerWord, triggers), (PreviewImage, images)):
        if rows:
            session.execute(insert(model), rows)


def _documents(session: Session, ids: list[int], specs: Sequence[AdapterSpec]) -> None:
    from pathlib import Path

    docs = []
    for adapter_id, spec in zip(ids, specs, strict=True):
        triggers = [w for v in spec.versions for w in v.trigger_words]
        files = [Path(f.file_name).stem for v in spec.versions for f in v.files] + [
            v.name for v in spec.versions if v.name
        ]
        docs.append(
            {
                "adapter_id": adapter_id,
                "name": spec.name,
                "tags": ", ".join(clean_tags(spec.tags)),
                "triggers": ", ".join(dict.fromkeys(triggers)),
                "files": ", ".join(dict.fromkeys(files)),
                "description": html_to_text(spec.description_html),
            }
        )
    session.execute(insert(SearchDocument), docs)
