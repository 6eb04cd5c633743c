"""What an importer produces: plain, frozen descriptions of an adapter to write (no database in sight).

Each importer is a converter (a safetensors header, a Civitai record, a sidecar folder, a Hugging
Face repo → :class:`AdapterSpec`); :func:`adapters_db.repository.write_adapter` is the one place that
turns a spec into rows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from adapters_db.dto import LicenceFlags, Stats


@dataclass(frozen=True)
class FileSpec:
    """One adapter file (``stored``: its bytes are in the local store under ``sha256``)."""

    file_name: str
    sha256: str | None = None
    size_bytes: int | None = None
    hashes: dict[str, str] = field(default_factory=dict)
    format: str | None = None
    primary: bool = True
    remote_url: str | None = None
    stored: bool = False
    header_metadata: dict[str, str] = field(default_factory=dict)
    rank: int | None = None
    num_modules: int | None = None
    components: tuple[str, ...] = ()


@dataclass(frozen=True)
class ImageSpec:
    """A preview image (remote URL and/or a local copy in the store) with its generation parameters."""

    url: str | None = None
    local_sha256: str | None = None
    local_ext: str | None = None
    width: int | None = None
    height: int | None = None
    nsfw_level: int = 0
    blurhash: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    civitai_image_id: int | None = None
    kind: str = "preview"


@dataclass(frozen=True)
class VersionSpec:
    """One version: files, trigger words, preview images."""

    name: str = ""
    civitai_version_id: int | None = None
    base_model: str | None = None
    base_family: str | None = None
    description_html: str = ""
    download_url: str | None = None
    created_at: datetime | None = None
    download_count: int = 0
    trigger_words: tuple[str, ...] = ()
    files: tuple[FileSpec, ...] = ()
    images: tuple[ImageSpec, ...] = ()


@dataclass(frozen=True)
class AdapterSpec:
    """Everything known about one adapter; ``description_html`` is raw (sanitised when written)."""

    name: str
    source: str
    kind: str = "lora"
    description_html: str = ""
    base_family: str | None = None
    base_model: str | None = None
    nsfw_level: int = 0
    creator: str | None = None
    civitai_model_id: int | None = None
    hf_repo: str | None = None
    source_url: str | None = None
    licence: LicenceFlags = field(default_factory=LicenceFlags)
    stats: Stats = field(default_factory=Stats)
    poi: bool = False
    tags: tuple[str, ...] = ()
    created_at: datetime | None = None
    versions: tuple[VersionSpec, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """SHA-256 of the spec's content (re-importing an unchanged record is a no-op)."""
        blob = json.dumps(asdict(self), sort_keys=True, default=str, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    @property
    def sha256s(self) -> tuple[str, ...]:
        """SHA-256 of every file that has one."""
        return tuple(f.sha256 for v in self.versions for f in v.files if f.sha256)
