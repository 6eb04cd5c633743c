"""Keeping the catalog and its file store consistent: orphan blobs, missing or corrupted files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from adapters_db.catalog import bump_revision
from adapters_db.models import AdapterFile
from adapters_db.repository import stored_hashes
from adapters_db.store import sha256_file

if TYPE_CHECKING:
    from adapters_db.catalog import Catalog


@dataclass(frozen=True)
class RepairReport:
    """What :func:`repair` did."""

    removed_orphans: tuple[Path, ...]
    missing_files: tuple[str, ...]
    corrupted_files: tuple[str, ...]
    reattached_files: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for the CLI."""
        return (
            f"removed {len(self.removed_orphans)} orphan file(s); {len(self.missing_files)} missing and "
            f"{len(self.corrupted_files)} corrupted file(s) marked remote-only; "
            f"{len(self.reattached_files)} file(s) found in the store marked stored again"
        )


def repair(
    session: Session, catalog: Catalog, *, grace_s: float = 3600.0, verify: bool = False
) -> RepairReport:
    """Garbage-collect store blobs no row references (older than ``grace_s``: an import in flight
    elsewhere keeps its file), and mark rows whose blob is gone (or, with ``verify``, whose bytes no
    longer hash to their SHA-256) as not stored, and rows said not to be whose verified blob is there as
    stored. The caller commits."""
    missing, corrupted = [], []
    reattached = _reattach(session, catalog)
    rows = session.execute(select(AdapterFile).where(AdapterFile.stored.is_(True))).scalars().all()
    for row in rows:
        if not row.sha256:
            continue
        path = catalog.store.path_for(row.sha256)
        if not path.is_file():
            missing.append(row.sha256)
            row.stored = False
        elif verify and sha256_file(path) != row.sha256:
            corrupted.append(row.sha256)
            row.stored = False
            path.unlink(missing_ok=True)
    if missing or corrupted or reattached:
        bump_revision(session)
    session.flush()
    referenced = stored_hashes(session)
    removed = catalog.store.collect_garbage(referenced, kind="lora", grace_s=grace_s)
    removed += catalog.store.collect_garbage(referenced, kind="images", grace_s=grace_s)
    return RepairReport(tuple(removed), tuple(missing), tuple(corrupted), tuple(reattached))


def _reattach(session: Session, catalog: Catalog) -> list[str]:
    """Mark stored the rows said not to be whose verified blob is in the store (a download killed between
    writing its file and committing), so the blob is not collected as an orphan."""
    found: dict[str, bool] = {}
    rows = session.execute(
        select(AdapterFile).where(AdapterFile.stored.is_(False), AdapterFile.sha256.is_not(None))
    ).scalars()
    for row in rows:
        sha = str(row.sha256).lower()
        if sha not in found:
            try:
                path = catalog.store.path_for(sha)
            except ValueError:  # a remote record's malformed hash: nothing of it can be in the store
                found[sha] = False
                continue
            found[sha] = path.is_file() and sha256_file(path) == sha
        if found[sha]:
            row.stored = True
    return [sha for sha, ok in found.items() if ok]
