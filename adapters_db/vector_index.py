"""FAISS over unit vectors (inner product = cosine): exact below a size threshold, HNSW above it.

A :class:`VectorIndex` maps FAISS row positions to caller ids (int64) and saves to
``<dir>/<name>.faiss`` + ``<name>.ids.npy``. It is derived data: whoever owns it rebuilds it from the
stored vectors whenever it is missing or stale.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class VectorIndexConfig:
    """When to go approximate, and the HNSW parameters (M links, efConstruction, efSearch)."""

    exact_threshold: int = 20_000
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128


def _faiss():  # type: ignore[no-untyped-def]
    import faiss

    return faiss


class VectorIndex:
    """Inner-product search over L2-normalised float32 vectors with int64 ids."""

    def __init__(self, index: object, ids: np.ndarray, kind: str) -> None:
        self.index = index
        self.ids = np.asarray(ids, dtype=np.int64)
        self.kind = kind

    @property
    def size(self) -> int:
        """Number of vectors."""
        return int(self.ids.shape[0])

    @property
    def dim(self) -> int:
        """Vector dimension."""
        return int(self.index.d)  # type: ignore[attr-defined]

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        ids: np.ndarray,
        config: VectorIndexConfig = VectorIndexConfig(),
        *,
        kind: str | None = None,
    ) -> VectorIndex:
        """Exact (``flat``) index for up to ``exact_threshold`` vectors, else ``hnsw``."""
        faiss = _faiss()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(ids):
            raise ValueError(f"vectors {vectors.shape} and {len(ids)} ids do not match")
        kind = kind or ("flat" if vectors.shape[0] <= config.exact_threshold else "hnsw")
        dim = vectors.shape[1]
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = config.ef_construction
            index.hnsw.efSearch = config.ef_search
        else:
            raise ValueError(f"unknown index kind {kind!r}: flat or hnsw")
        if vectors.shape[0]:
            index.add(vectors)
        return cls(index, ids, kind)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)`` of the ``k`` nearest vectors per query row (id -1 where fewer exist)."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = max(1, min(k, self.size)) if self.size else 1
        if self.size == 0:
            n = queries.shape[0]
            return np.zeros((n, 1), np.float32), np.full((n, 1), -1, np.int64)
        scores, rows = self.index.search(queries, k)  # type: ignore[attr-defined]
        ids = np.where(rows >= 0, self.ids[np.clip(rows, 0, None)], -1)
        return scores, ids

    def set_ef_search(self, ef: int) -> None:
        """HNSW search breadth (recall vs speed); no-op for exact indexes."""
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = ef  # type: ignore[attr-defined]

    def save(self, directory: Path, name: str) -> None:
        """Write ``name.faiss`` and ``name.ids.npy`` atomically (temp + rename)."""
        faiss = _faiss()
        directory.mkdir(parents=True, exist_ok=True)
        tmp_index = directory / f".{name}.faiss.tmp"
        tmp_ids = directory / f".{name}.ids.tmp.npy"
        faiss.write_index(self.index, str(tmp_index))
        np.save(tmp_ids, self.ids)
        os.replace(tmp_ids, directory / f"{name}.ids.npy")
        os.replace(tmp_index, directory / f"{name}.faiss")

    @classmethod
    def load(cls, directory: Path, name: str) -> VectorIndex:
        """Read an index saved by :meth:`save` (raises ``FileNotFoundError`` if absent)."""
        faiss = _faiss()
        path = directory / f"{name}.faiss"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such index")
        index = faiss.read_index(str(path))
        ids = np.load(directory / f"{name}.ids.npy")
        kind = "hnsw" if "HNSW" in type(index).__name__ else "flat"
        if index.ntotal != len(ids):
            raise ValueError(f"{path}: {index.ntotal} vectors but {len(ids)} ids")
        return cls(index, ids, kind)


def recall_at_k(approx: VectorIndex, exact: VectorIndex, queries: np.ndarray, k: int = 10) -> float:
    """Mean fraction of the exact top-k ids the approximate index also returns."""
    _, truth = exact.search(queries, k)
    _, found = approx.search(queries, k)
    hits = [
        len(set(t[t >= 0]) & set(f[f >= 0])) / max(1, int((t >= 0).sum()))
        for t, f in zip(truth, found, strict=True)
    ]
    return float(np.mean(hits)) if hits else 1.0
