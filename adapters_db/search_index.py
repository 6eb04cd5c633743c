"""The derived search indexes of a catalog: lexical BM25 matrices, trigger phrases, FAISS indexes and
per-adapter arrays for filtering — built from the database, saved beside it, rebuilt when missing,
stale (catalog revision changed) or made by another embedder.

Saved under ``<data_dir>/index/<embedder-name>-<dim>/``: ``manifest.json`` (format, revision,
embedder, dimension, counts), ``lexical.npz``, ``triggers.json`` and one FAISS file per dense
channel (``meta.faiss``, ``prompt.faiss``, ``image.faiss``) with its ids.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
import zipfile
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp
from sqlalchemy import select
from sqlalchemy.orm import Session

from adapters_db import lexical
from adapters_db.lexical import BM25Params, Vocabulary
from adapters_db.models import (
    UNSEARCHABLE_KINDS,
    Adapter,
    AdapterFile,
    AdapterVersion,
    CatalogState,
    PreviewImage,
    Tag,
    TriggerWord,
    adapter_tags,
)
from adapters_db.text import clean_prompt, trigger_phrases, words
from adapters_db.vector_index import VectorIndex, VectorIndexConfig
from adapters_db.vectors import load_vectors
from adapters_db.weightspace import WEIGHT_CHANNELS

if TYPE_CHECKING:
    from adapters_db.embedders import Embedder

log = logging.getLogger(__name__)
FORMAT_VERSION = 7  # 7: CJK runs indexed as character bigrams
META_FIELDS = ("name", "triggers", "tags", "files", "description")
FAMILY_CODES = {None: 0, "sd1": 1, "sd2": 2, "sdxl": 3, "pocket": 4}
MAX_DESCRIPTION_CHARS = 4000


@dataclass(frozen=True)
class IndexConfig:
    """BM25 parameters of the metadata and prompt channels and the FAISS policy."""

    meta_bm25: BM25Params = field(default_factory=BM25Params)
    prompt_bm25: BM25Params = field(default_factory=BM25Params)
    vectors: VectorIndexConfig = field(default_factory=lambda: VectorIndexConfig(exact_threshold=50_000))


def slug(name: str) -> str:
    """A file-system-safe form of an embedder name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "embedder"


@dataclass
class CatalogRows:
    """What the index is built from, read with a few plain queries."""

    adapter_ids: np.ndarray
    fields: dict[str, list[str]]
    triggers: list[list[str]]
    family: np.ndarray
    nsfw: np.ndarray
    downloads: np.ndarray
    creator: np.ndarray
    has_local: np.ndarray
    prompt_image_ids: np.ndarray
    prompt_owner: np.ndarray
    prompts: list[str]


def read_catalog(session: Session) -> CatalogRows:
    """Adapters with their searchable fields, and every preview prompt, ordered by adapter id."""
    rows = session.execute(
        select(
            Adapter.id,
            Adapter.name,
            Adapter.description_text,
            Adapter.base_family,
            Adapter.nsfw_level,
            Adapter.download_count,
            Adapter.creator,
        )
        .where(Adapter.kind.not_in(UNSEARCHABLE_KINDS))
        .order_by(Adapter.id)
    ).all()
    ids = np.array([r[0] for r in rows], dtype=np.int64)
    pos = {int(a): i for i, a in enumerate(ids)}
    n = len(ids)
    tags: list[list[str]] = [[] for _ in range(n)]
    for aid, name in session.execute(select(adapter_tags.c.adapter_id, Tag.name).join(Tag)):
        if aid in pos:
            tags[pos[aid]].append(name)
    triggers: list[list[str]] = [[] for _ in range(n)]
    for aid, word in session.execute(
        select(TriggerWord.adapter_id, TriggerWord.word).order_by(
            TriggerWord.adapter_id, TriggerWord.position
        )
    ):
        if aid in pos:
            triggers[pos[aid]].append(word)
    files: list[list[str]] = [[] for _ in range(n)]
    local = np.zeros(n, bool)
    for aid, vname, fname, stored in session.execute(
        select(
            AdapterVersion.adapter_id, AdapterVersion.name, AdapterFile.file_name, AdapterFile.stored
        ).join(AdapterFile, isouter=True)
    ):
        if aid not in pos:
            continue
        files[pos[aid]].extend(x for x in (Path(fname).stem if fname else None, vname) if x)
        local[pos[aid]] |= bool(stored)
    image_ids, owners, prompts = [], [], []
    for aid, iid, prompt in session.execute(
        select(PreviewImage.adapter_id, PreviewImage.id, PreviewImage.prompt)
        .where(PreviewImage.prompt.is_not(None))
        .order_by(PreviewImage.id)
    ):
        text = clean_prompt(prompt).strip()
        if text and aid in pos:
            image_ids.append(iid)
            owners.append(pos[aid])
            prompts.append(text)
    return CatalogRows(
        adapter_ids=ids,
        fields={
            "name": [r[1] for r in rows],
            "triggers": [", ".join(t) for t in triggers],
            "tags": [", ".join(t) for t in tags],
            "files": [", ".join(dict.fromkeys(f)) for f in files],
            "description": [(r[2] or "")[:MAX_DESCRIPTION_CHARS] for r in rows],
        },
        triggers=triggers,
        family=np.array([FAMILY_CODES.get(r[3], 0) for r in rows], np.int8),
        nsfw=np.array([r[4] for r in rows], np.int8),
        downloads=np.array([r[5] or 0 for r in rows], np.int64),
        creator=_codes([r[6] for r in rows]),
        has_local=local,
        prompt_image_ids=np.array(image_ids, np.int64),
        prompt_owner=np.array(owners, np.int64),
        prompts=prompts,
    )


def _codes(values: list[str | None]) -> np.ndarray:
    """Integer codes of values (equal values, equal codes; ``None`` gets a code of its own per row)."""
    seen: dict[str, int] = {}
    out = np.zeros(len(values), np.int64)
    for i, value in enumerate(values):
        key = value.strip().lower() if value else f"\0{i}"
        out[i] = seen.setdefault(key, len(seen))
    return out


def owner_sum(counts: sp.csr_matrix, owner: np.ndarray, n_owners: int) -> sp.csr_matrix:
    """Sum rows of a count matrix per owner (prompt counts → one document per adapter)."""
    agg = sp.csr_matrix(
        (np.ones(len(owner), np.float32), (owner, np.arange(len(owner)))), shape=(n_owners, counts.shape[0])
    )
    return (agg @ counts).tocsr()


class LexicalIndex:
    """BM25 matrices of the metadata fields, the prompts and the per-adapter prompt documents."""

    def __init__(
        self,
        vocab: Vocabulary,
        fields: dict[str, sp.csc_matrix],
        field_idf: dict[str, np.ndarray],
        prompts: sp.csc_matrix,
        prompt_counts: sp.csr_matrix,
        prompt_idf: np.ndarray,
        docs: sp.csc_matrix,
        doc_counts: sp.csr_matrix,
        doc_idf: np.ndarray,
        doc_avg_len: float,
        meta_idf: np.ndarray,
        meta_all: sp.csc_matrix,
        meta_counts: sp.csr_matrix | None = None,
    ) -> None:
        self.vocab = vocab
        self.fields = fields
        self.field_idf = field_idf
        self.prompts = prompts
        self.prompt_counts = prompt_counts
        self.prompt_idf = prompt_idf
        self.docs = docs
        self.doc_counts = doc_counts
        self.doc_idf = doc_idf
        self.doc_avg_len = doc_avg_len
        self.meta_idf = meta_idf
        self.meta_all = meta_all
        n = meta_all.shape[0]
        self.meta_counts = meta_counts if meta_counts is not None else sp.csr_matrix((n, len(vocab)))

    @classmethod
    def build(cls, rows: CatalogRows, config: IndexConfig) -> LexicalIndex:
        """Count, remap to a compact vocabulary, compute idf and saturate every matrix."""
        n = len(rows.adapter_ids)
        raw = {f: lexical.count_matrix(rows.fields[f]) for f in META_FIELDS}
        raw_prompts = lexical.count_matrix(rows.prompts)
        vocab = Vocabulary.of(*raw.values(), raw_prompts)
        counts = {f: vocab.remap(m) for f, m in raw.items()}
        prompt_counts = vocab.remap(raw_prompts)
        doc_counts = owner_sum(prompt_counts, rows.prompt_owner, n)
        doc_lengths = np.asarray(doc_counts.sum(axis=1)).ravel()
        with_prompts = doc_lengths[doc_lengths > 0]
        doc_avg = float(with_prompts.mean()) if len(with_prompts) else 1.0
        meta_all = sum(counts.values()) if counts else sp.csr_matrix((n, len(vocab)))
        return cls(
            vocab=vocab,
            fields={f: lexical.saturate(m, config.meta_bm25) for f, m in counts.items()},
            field_idf={f: lexical.idf_from_counts(m) for f, m in counts.items()},
            prompts=lexical.saturate(prompt_counts, config.prompt_bm25),
            prompt_counts=prompt_counts.tocsr(),
            prompt_idf=lexical.idf_from_counts(prompt_counts),
            docs=lexical.saturate(doc_counts, config.prompt_bm25, doc_avg),
            doc_counts=doc_counts,
            doc_idf=lexical.idf_from_counts(doc_counts[doc_lengths > 0])
            if len(with_prompts)
            else np.zeros(len(vocab), np.float32),
            doc_avg_len=doc_avg,
            meta_idf=lexical.idf_from_counts(sp.csr_matrix(meta_all)),
            meta_all=lexical.saturate(sp.csr_matrix(meta_all), config.meta_bm25),
            meta_counts=sp.csr_matrix(meta_all, dtype=np.float32),
        )

    def arrays(self) -> dict[str, np.ndarray]:
        """Everything as named arrays for ``np.savez``."""
        out: dict[str, np.ndarray] = {
            "vocab": self.vocab.hashes,
            "prompt_idf": self.prompt_idf,
            "doc_idf": self.doc_idf,
            "meta_idf": self.meta_idf,
            "doc_avg_len": np.array([self.doc_avg_len]),
        }
        for f in META_FIELDS:
            out.update(lexical.save_sparse(f"field_{f}", self.fields[f]))
            out[f"idf_{f}"] = self.field_idf[f]
        out.update(lexical.save_sparse("meta_all", self.meta_all))
        out.update(lexical.save_sparse("meta_counts", self.meta_counts))
        out.update(lexical.save_sparse("prompts", self.prompts))
        out.update(lexical.save_sparse("prompt_counts", self.prompt_counts))
        out.update(lexical.save_sparse("docs", self.docs))
        out.update(lexical.save_sparse("doc_counts", self.doc_counts))
        return out

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> LexicalIndex:
        """Inverse of :meth:`arrays`."""
        return cls(
            vocab=Vocabulary(a["vocab"]),
            fields={f: lexical.load_sparse(a, f"field_{f}") for f in META_FIELDS},
            field_idf={f: a[f"idf_{f}"] for f in META_FIELDS},
            prompts=lexical.load_sparse(a, "prompts"),
            prompt_counts=lexical.load_sparse(a, "prompt_counts", "csr"),
            prompt_idf=a["prompt_idf"],
            docs=lexical.load_sparse(a, "docs"),
            doc_counts=lexical.load_sparse(a, "doc_counts", "csr"),
            doc_idf=a["doc_idf"],
            doc_avg_len=float(a["doc_avg_len"][0]),
            meta_idf=a["meta_idf"],
            meta_all=lexical.load_sparse(a, "meta_all"),
            meta_counts=lexical.load_sparse(a, "meta_counts", "csr"),
        )


@dataclass
class TriggerTable:
    """Trigger phrases (word tuples joined by spaces) → adapter rows, with a specificity weight each."""

    rows: dict[str, list[int]]
    weight: dict[str, float]
    phrase_count: np.ndarray
    max_words: int = 6
    _row_arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(cls, triggers: list[list[str]], lex: LexicalIndex) -> TriggerTable:
        """Phrase weight: the idf (over all metadata) of the phrase's rarest term, so generic phrases
        such as "1girl" count little and "qiqidef" counts a lot."""
        rows: dict[str, list[int]] = defaultdict(list)
        count = np.zeros(len(triggers), np.int32)
        for row, words_of_row in enumerate(triggers):
            phrases = trigger_phrases(words_of_row)
            count[row] = len(phrases)
            for phrase in phrases:
                rows[" ".join(phrase)].append(row)
        weight = {}
        for phrase in rows:
            cols = lex.vocab.columns(np.unique(lexical.term_ids(phrase)))
            weight[phrase] = float(lex.meta_idf[cols].max()) if len(cols) else 0.0
        return cls(dict(rows), weight, count)

    def match(self, query: str) -> dict[str, np.ndarray]:
        """The trigger phrases that occur in the query (as whole word sequences), in order of
        appearance, each with the adapter rows that have it."""
        toks = words(query)
        found: dict[str, np.ndarray] = {}
        for start in range(len(toks)):
            for length in range(1, min(self.max_words, len(toks) - start) + 1):
                phrase = " ".join(toks[start : start + length])
                if phrase in self.rows and phrase not in found:
                    found[phrase] = self.row_array(phrase)
        return found

    def row_array(self, phrase: str) -> np.ndarray:
        """The rows of a phrase as an int64 array (cached)."""
        if phrase not in self._row_arrays:
            self._row_arrays[phrase] = np.asarray(self.rows[phrase], np.int64)
        return self._row_arrays[phrase]

    def to_json(self) -> dict[str, Any]:
        """Plain data for ``triggers.json``."""
        return {"rows": self.rows, "weight": self.weight, "phrase_count": self.phrase_count.tolist()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TriggerTable:
        """Inverse of :meth:`to_json`."""
        return cls(
            {k: list(v) for k, v in data["rows"].items()},
            dict(data["weight"]),
            np.array(data["phrase_count"], np.int32),
        )


@dataclass
class Manifest:
    """What an index directory holds and what it was built from."""

    format: int
    revision: int
    embedder: str
    dim: int
    adapters: int
    prompts: int
    vectors: dict[str, int]
    kinds: dict[str, str]
    built_at: float
    build_seconds: float


class SearchIndex:
    """All derived indexes of one catalog for one embedder (see module docstring)."""

    def __init__(self, root: Path, embedder: Embedder, config: IndexConfig = IndexConfig()) -> None:
        self.root = Path(root)
        self.embedder = embedder
        self.config = config
        self.directory = self.root / f"{slug(embedder.name)}-{embedder.dim}"
        self.manifest: Manifest | None = None
        self.adapter_ids = np.zeros(0, np.int64)
        self.family = np.zeros(0, np.int8)
        self.nsfw = np.zeros(0, np.int8)
        self.log_downloads = np.zeros(0, np.float32)
        self.has_local = np.zeros(0, bool)
        self.creator = np.zeros(0, np.int64)
        self.prompt_image_ids = np.zeros(0, np.int64)
        self.prompt_owner = np.zeros(0, np.int64)
        self.n_prompts = np.zeros(0, np.int32)
        self.lexical: LexicalIndex | None = None
        self.triggers: TriggerTable | None = None
        self.dense: dict[str, VectorIndex] = {}
        self.dense_owner: dict[str, np.ndarray] = {}
        self.last_event = "none"

    # ------------------------------------------------------------------ freshness
    def is_current(self, session: Session) -> bool:
        """Whether the index in memory matches the catalog's revision."""
        return self.manifest is not None and self.manifest.revision == _revision(session)

    def try_load(self, session: Session) -> bool:
        """Load the saved index if it matches this catalog revision and embedder."""
        ok = self._try_load(_revision(session))
        if ok:
            self.last_event = "loaded"
        return ok

    def ensure_current(self, session: Session, *, show_progress: bool = False) -> None:
        """Load from disk or rebuild so that the index matches the catalog's current revision."""
        if self.is_current(session) or self.try_load(session):
            return
        self.rebuild(session, show_progress=show_progress)

    def _try_load(self, revision: int) -> bool:
        path = self.directory / "manifest.json"
        try:
            text = path.read_text()
            manifest = Manifest(**json.loads(text))
        except (OSError, TypeError, ValueError):  # absent, being swapped by another process, or damaged
            return False
        if (
            manifest.format != FORMAT_VERSION
            or manifest.revision != revision
            or manifest.embedder != self.embedder.name
            or manifest.dim != self.embedder.dim
        ):
            return False
        try:
            self._load(manifest)
            if path.read_text() != text:  # another process swapped in a new index while this one read
                raise ValueError("replaced while loading")
        except (OSError, KeyError, ValueError, EOFError, RuntimeError, zipfile.BadZipFile) as exc:
            # RuntimeError: FAISS on a damaged file; EOFError, BadZipFile: NumPy on an empty .npy, a cut .npz
            log.warning("search index in %s unreadable (%s); rebuilding", self.directory, exc)
            self.manifest = None
            return False
        return True

    def _load(self, manifest: Manifest) -> None:
        with np.load(self.directory / "lexical.npz") as npz:
            arrays = {k: npz[k] for k in npz.files}
        self.lexical = LexicalIndex.from_arrays(arrays)
        self._set_arrays(arrays)
        self.triggers = TriggerTable.from_json(json.loads((self.directory / "triggers.json").read_text()))
        self.dense = {}
        self.dense_owner = {}
        for channel in manifest.vectors:
            self.dense[channel] = VectorIndex.load(self.directory, channel)
            self.dense_owner[channel] = np.load(self.directory / f"{channel}.owner.npy")
        _check_loaded(self, manifest)
        self.manifest = manifest

    def _set_arrays(self, a: dict[str, np.ndarray]) -> None:
        self.adapter_ids = a["adapter_ids"]
        self.family = a["family"]
        self.nsfw = a["nsfw"]
        self.log_downloads = a["log_downloads"]
        self.has_local = a["has_local"]
        self.creator = a["creator"]
        self.prompt_image_ids = a["prompt_image_ids"]
        self.prompt_owner = a["prompt_owner"]
        self.n_prompts = np.bincount(self.prompt_owner, minlength=len(self.adapter_ids)).astype(np.int32)

    # ------------------------------------------------------------------ building
    def rebuild(self, session: Session, revision: int | None = None, *, show_progress: bool = False) -> None:
        """Rebuild everything from the database (vectors must already be stored; see embed_missing)."""
        started = time.time()
        revision = _revision(session) if revision is None else revision
        rows = read_catalog(session)
        lex = LexicalIndex.build(rows, self.config)
        arrays = {
            "adapter_ids": rows.adapter_ids,
            "family": rows.family,
            "nsfw": rows.nsfw,
            "log_downloads": np.log1p(rows.downloads.astype(np.float64)).astype(np.float32),
            "has_local": rows.has_local,
            "creator": rows.creator,
            "prompt_image_ids": rows.prompt_image_ids,
            "prompt_owner": rows.prompt_owner,
        }
        triggers = TriggerTable.build(rows.triggers, lex)
        dense, owners = self._build_dense(session, rows)
        self.lexical, self.triggers, self.dense, self.dense_owner = lex, triggers, dense, owners
        self._set_arrays(arrays)
        self.manifest = Manifest(
            format=FORMAT_VERSION,
            revision=revision,
            embedder=self.embedder.name,
            dim=self.embedder.dim,
            adapters=len(rows.adapter_ids),
            prompts=len(rows.prompts),
            vectors={k: v.size for k, v in dense.items()},
            kinds={k: v.kind for k, v in dense.items()},
            built_at=time.time(),
            build_seconds=round(time.time() - started, 3),
        )
        try:
            self._save({**lex.arrays(), **arrays}, triggers)
        except OSError as exc:  # derived data: search goes on with the index in memory
            log.warning("could not save the search index in %s (%s); it is rebuilt next time", self.root, exc)
        self.last_event = "rebuilt"

    def _build_dense(
        self, session: Session, rows: CatalogRows
    ) -> tuple[dict[str, VectorIndex], dict[str, np.ndarray]]:
        dense: dict[str, VectorIndex] = {}
        owners: dict[str, np.ndarray] = {}
        channels = ("meta", "prompt", "image") if self.embedder.supports_images else ("meta", "prompt")
        for channel in channels + WEIGHT_CHANNELS:
            stored = load_vectors(session, self.embedder.name, self.embedder.dim, channel)
            if channel in WEIGHT_CHANNELS and len(stored.adapter_ids) == 0:
                continue
            row_of = np.searchsorted(rows.adapter_ids, stored.adapter_ids)
            valid = (
                (row_of < len(rows.adapter_ids))
                & (rows.adapter_ids[np.clip(row_of, 0, len(rows.adapter_ids) - 1)] == stored.adapter_ids)
                if len(row_of) and len(rows.adapter_ids)
                else row_of > 0
            )
            ids = stored.adapter_ids if channel in ("meta", *WEIGHT_CHANNELS) else stored.image_ids
            dense[channel] = VectorIndex.build(stored.vectors[valid], ids[valid], self.config.vectors)
            owners[channel] = row_of[valid].astype(np.int64)
        return dense, owners

    def _save(self, arrays: dict[str, np.ndarray], triggers: TriggerTable) -> None:
        """Write into a temp directory, then swap it in (readers never see a half-written index)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(f".{self.directory.name}.*-*"):  # left by a rebuild that was killed
            with contextlib.suppress(OSError):
                if stale.stat().st_mtime < time.time() - 3600:
                    shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.directory.name}.tmp-", dir=self.root))
        try:
            self._write(tmp, arrays, triggers)
            self._swap_in(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _write(self, tmp: Path, arrays: dict[str, np.ndarray], triggers: TriggerTable) -> None:
        """Every file of the index into ``tmp``, the manifest last."""
        np.savez(tmp / "lexical.npz", **arrays)
        (tmp / "triggers.json").write_text(json.dumps(triggers.to_json()))
        for channel, index in self.dense.items():
            index.save(tmp, channel)
            np.save(tmp / f"{channel}.owner.npy", self.dense_owner[channel])
        assert self.manifest is not None
        (tmp / "manifest.json").write_text(json.dumps(asdict(self.manifest), indent=1))

    def _swap_in(self, tmp: Path, attempts: int = 20) -> None:
        """Rename ``tmp`` to the index directory, moving the current one aside under a unique name (another
        process may be swapping in its own index at the same time: the last one wins)."""
        for _ in range(attempts):
            old = self.root / f".{self.directory.name}.old-{uuid.uuid4().hex}"
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.directory, old)
            try:
                os.replace(tmp, self.directory)
                return
            except OSError:
                if not self.directory.exists():
                    raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        raise OSError(f"{self.directory}: replaced by other processes {attempts} times in a row")

    # ------------------------------------------------------------------ lookups
    def rows_of(self, adapter_ids: np.ndarray) -> np.ndarray:
        """Row numbers of adapter ids (−1 for ids not in the index)."""
        return positions_in(self.adapter_ids, adapter_ids)

    def prompt_rows_of(self, image_ids: np.ndarray) -> np.ndarray:
        """Prompt row numbers of preview-image ids (−1 where the image has no indexed prompt)."""
        return positions_in(self.prompt_image_ids, image_ids)

    @property
    def size(self) -> int:
        """Number of adapters indexed."""
        return len(self.adapter_ids)


def positions_in(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Positions of ``ids`` in the ascending array ``sorted_ids`` (−1 for ids not in it)."""
    ids = np.asarray(ids, np.int64)
    if len(sorted_ids) == 0:
        return np.full(len(ids), -1, np.int64)
    pos = np.clip(np.searchsorted(sorted_ids, ids), 0, len(sorted_ids) - 1)
    return np.where(sorted_ids[pos] == ids, pos, -1)


def _check_loaded(index: SearchIndex, manifest: Manifest) -> None:
    """Raise ``ValueError`` where the loaded files disagree with their manifest or with each other."""
    n = len(index.adapter_ids)
    if n != manifest.adapters or any(len(a) != n for a in (index.family, index.nsfw, index.has_local)):
        raise ValueError(f"{n} adapters in the arrays, {manifest.adapters} in the manifest")
    for channel, vectors in index.dense.items():
        owner = index.dense_owner[channel]
        if vectors.size != manifest.vectors[channel] or len(owner) != vectors.size:
            raise ValueError(f"{channel}: {vectors.size} vectors, {len(owner)} owners")
        if vectors.size and (vectors.dim != manifest.dim or owner.min() < 0 or owner.max() >= n):
            raise ValueError(f"{channel}: dimension {vectors.dim} or owner rows out of range")


def _revision(session: Session) -> int:
    value = session.execute(
        select(CatalogState.value).where(CatalogState.key == "revision")
    ).scalar_one_or_none()
    return int(value) if value is not None else 0
