"""The adapter catalog: what people browse and what the studio retrieves from.

Open a catalog with :func:`open_catalog` (SQLite file by default, any SQLAlchemy URL); the caller owns
sessions (``with catalog.session() as s:``) and passes them to the repository, importer and search
functions below. Everything returned is a frozen DTO; ORM rows never leave this package.
"""

from __future__ import annotations

from adapters_db.catalog import Catalog, open_catalog
from adapters_db.dto import (
    AdapterRecord,
    FileRecord,
    ImageRecord,
    ImportResult,
    ImportSummary,
    LicenceFlags,
    SearchHit,
    Stats,
    VersionRecord,
)
from adapters_db.embedders import (
    Embedder,
    HashingEmbedder,
    MiniLMEmbedder,
    OpenClipEmbedder,
    resolve_embedder,
)
from adapters_db.families import FAMILIES, family_from_civitai, normalize_family
from adapters_db.importers.civitai import import_civitai_jsonl, import_civitai_records
from adapters_db.importers.files import import_file, import_folder, import_paths
from adapters_db.importers.trained import register_trained_adapter
from adapters_db.maintenance import repair
from adapters_db.repository import (
    NotFoundError,
    Page,
    delete_adapter,
    find_by_civitai_id,
    find_by_hash,
    get_adapter,
    list_adapters,
    local_file_path,
    update_metadata,
)
from adapters_db.retrieval import search, search_by_image
from adapters_db.vectors import embed_missing

__all__ = [
    "FAMILIES",
    "AdapterRecord",
    "Catalog",
    "Embedder",
    "FileRecord",
    "HashingEmbedder",
    "ImageRecord",
    "ImportResult",
    "ImportSummary",
    "LicenceFlags",
    "MiniLMEmbedder",
    "NotFoundError",
    "OpenClipEmbedder",
    "Page",
    "SearchHit",
    "Stats",
    "VersionRecord",
    "delete_adapter",
    "embed_missing",
    "family_from_civitai",
    "find_by_civitai_id",
    "find_by_hash",
    "get_adapter",
    "import_civitai_jsonl",
    "import_civitai_records",
    "import_file",
    "import_folder",
    "import_paths",
    "list_adapters",
    "local_file_path",
    "normalize_family",
    "open_catalog",
    "register_trained_adapter",
    "repair",
    "resolve_embedder",
    "search",
    "search_by_image",
    "update_metadata",
]
