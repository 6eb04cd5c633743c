"""Frozen records that leave the catalog (ORM rows never do)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

NSFW_LEVELS: dict[str, int] = {"none": 0, "soft": 1, "mature": 2, "x": 3}


@dataclass(frozen=True)
class LicenceFlags:
    """Permission flags as Civitai states them (``None``: not stated) and a licence id when known."""

    license: str | None = None
    allow_no_credit: bool | None = None
    allow_commercial_use: str | None = None
    allow_derivatives: bool | None = None
    allow_different_license: bool | None = None

    @property
    def commercial_ok(self) -> bool:
        """Whether some commercial use is allowed (Civitai: anything but "None")."""
        value = (self.allow_commercial_use or "").strip().lower()
        return bool(value) and value not in ("none", "false", "[]")


@dataclass(frozen=True)
class Stats:
    """Community statistics (Civitai's counters; zero for local files)."""

    downloads: int = 0
    favorites: int = 0
    comments: int = 0
    ratings: int = 0
    rating: float = 0.0


@dataclass(frozen=True)
class FileRecord:
    """One adapter file: its hashes and where it is (stored locally and/or a remote URL)."""

    id: int
    file_name: str
    size_bytes: int | None
    sha256: str | None
    autov2: str | None
    format: str | None
    primary: bool
    stored: bool
    remote_url: str | None
    local_path: Path | None
    rank: int | None = None
    header_metadata: dict[str, str] = field(default_factory=dict)

    @property
    def is_local(self) -> bool:
        """Whether the bytes are in the local store."""
        return self.stored and self.local_path is not None


@dataclass(frozen=True)
class ImageRecord:
    """A preview image (or training sample / caption) with the generation parameters people used."""

    id: int
    version_id: int
    kind: str
    url: str | None
    local_path: Path | None
    width: int | None
    height: int | None
    nsfw_level: int
    prompt: str | None
    negative_prompt: str | None
    params: dict[str, Any]
    civitai_image_id: int | None = None


@dataclass(frozen=True)
class VersionRecord:
    """One version of an adapter with its files, trigger words and preview images."""

    id: int
    name: str
    base_model: str | None
    base_family: str | None
    civitai_version_id: int | None
    download_url: str | None
    trigger_words: tuple[str, ...]
    files: tuple[FileRecord, ...]
    images: tuple[ImageRecord, ...]
    created_at: datetime | None = None


@dataclass(frozen=True)
class AdapterRecord:
    """An adapter as the studio sees it; ``versions`` is empty in search-hit summaries."""

    id: int
    name: str
    kind: str
    source: str
    description_html: str
    description_text: str
    base_family: str | None
    base_model: str | None
    tags: tuple[str, ...]
    trigger_words: tuple[str, ...]
    nsfw_level: int
    creator: str | None
    licence: LicenceFlags
    stats: Stats
    civitai_model_id: int | None
    civitai_version_ids: tuple[int, ...]
    hf_repo: str | None
    source_url: str | None
    created_at: datetime | None
    updated_at: datetime | None
    versions: tuple[VersionRecord, ...] = ()
    has_local_file: bool = False
    cover_image: ImageRecord | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def files(self) -> tuple[FileRecord, ...]:
        """Every file of every version, newest version first."""
        return tuple(f for v in self.versions for f in v.files)

    @property
    def images(self) -> tuple[ImageRecord, ...]:
        """Every preview image of every version."""
        return tuple(i for v in self.versions for i in v.images)

    @property
    def downloadable(self) -> bool:
        """No local file, but a primary file with a download link and a SHA-256 to verify it against."""
        return not self.has_local_file and any(f.remote_url and f.sha256 and f.primary for f in self.files)


@dataclass(frozen=True)
class SearchHit:
    """One retrieved adapter: a summary record, the fused score, why it matched and per-channel ranks."""

    adapter: AdapterRecord
    score: float
    why: str
    channels: dict[str, float]
    rank: int = 0


@dataclass(frozen=True)
class ImportResult:
    """Outcome of importing one item (a file, a sidecar group, a Civitai record)."""

    source: str
    status: str  # "imported" | "updated" | "duplicate" | "failed" | "skipped"
    adapter_id: int | None = None
    name: str | None = None
    sha256: str | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        """Whether the item is in the catalog now (imported, updated or already there)."""
        return self.status in ("imported", "updated", "duplicate")


@dataclass(frozen=True)
class ImportSummary:
    """Results of a batch import, with counts per status."""

    results: tuple[ImportResult, ...]

    def count(self, status: str) -> int:
        """How many items ended with ``status``."""
        return sum(1 for r in self.results if r.status == status)

    @property
    def failed(self) -> tuple[ImportResult, ...]:
        """The items that failed (each with its error message)."""
        return tuple(r for r in self.results if r.status == "failed")

    def describe(self) -> str:
        """One-line summary: ``imported 10, updated 0, duplicate 2, skipped 0, failed 1``."""
        parts = [f"{s} {self.count(s)}" for s in ("imported", "updated", "duplicate", "skipped", "failed")]
        return ", ".join(parts)
