"""In-memory BM25 over hashed word 1–2-grams: the lexical channels of retrieval (derived data).

Terms are lower-case ``\\w+`` tokens (underscores kept, as in ``looking_at_viewer``; CJK runs as
character bigrams) and bigrams of
consecutive tokens across punctuation (so copied prompt templates match in order); ``<lora:…>`` tags
are dropped. Terms are hashed (CRC-32, 2**22 buckets) and the hashes present in an index are
remapped to compact column numbers (:class:`Vocabulary`), so an index needs no string vocabulary.
Matrices are stored column-major (CSC) with BM25-saturated term frequencies,
tf·(k1+1) / (tf + k1·(1 − b + b·len/avglen)) (Robertson & Zaragoza 2009, eq. 3.15), and a separate
idf vector, so a query is a column slice times its idf weights.
"""

from __future__ import annotations

import itertools
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.sparse import _sparsetools  # csc_matvec: scipy's own compiled CSC × vector loop

from adapters_db.text import clean_prompt, split_cjk

HASH_BITS = 22
N_BUCKETS = 1 << HASH_BITS
_TOKEN = re.compile(r"\w+")


def tokens(text: str) -> list[str]:
    """Lower-case ``\\w+`` tokens of a prompt without its extra-network tags; runs of CJK characters
    (written without spaces) become overlapping character bigrams, so "胶片" finds "胶片风" (the usual
    CJK indexing of Lucene's CJKBigramFilter)."""
    return [t for tok in _TOKEN.findall(clean_prompt(text).lower()) for t in split_cjk(tok)]


def term_ids(text: str) -> np.ndarray:
    """Hashed ids of a text's unigrams and consecutive bigrams (with repeats: counts matter)."""
    toks = tokens(text)
    grams = toks + [f"{a} {b}" for a, b in itertools.pairwise(toks)]
    return np.fromiter(
        (zlib.crc32(g.encode("utf-8")) & (N_BUCKETS - 1) for g in grams), dtype=np.int64, count=len(grams)
    )


def count_matrix(texts: Sequence[str]) -> sp.csr_matrix:
    """Term counts, one row per text (``len(texts)`` × 2**22, CSR, float32)."""
    indptr = [0]
    cols: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    for text in texts:
        ids, counts = np.unique(term_ids(text or ""), return_counts=True)
        cols.append(ids)
        vals.append(counts.astype(np.float32))
        indptr.append(indptr[-1] + len(ids))
    data = np.concatenate(vals) if vals else np.zeros(0, np.float32)
    indices = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    return sp.csr_matrix((data, indices, np.asarray(indptr)), shape=(len(texts), N_BUCKETS))


class Vocabulary:
    """Sorted distinct term hashes of an index; column ``i`` of its matrices is ``hashes[i]``."""

    def __init__(self, hashes: np.ndarray) -> None:
        self.hashes = np.asarray(hashes, dtype=np.int64)

    @classmethod
    def of(cls, *matrices: sp.csr_matrix) -> Vocabulary:
        """The union of the hashed columns used by some count matrices."""
        parts = [m.indices.astype(np.int64) for m in matrices if m.nnz]
        return cls(np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64))

    def __len__(self) -> int:
        return int(self.hashes.shape[0])

    def columns(self, hashed: np.ndarray) -> np.ndarray:
        """Compact column numbers of hashed terms (terms absent from the vocabulary are dropped)."""
        if len(self.hashes) == 0 or len(hashed) == 0:
            return np.zeros(0, np.int64)
        pos = np.searchsorted(self.hashes, hashed)
        pos = np.clip(pos, 0, len(self.hashes) - 1)
        return pos[self.hashes[pos] == hashed]

    def remap(self, counts: sp.csr_matrix) -> sp.csr_matrix:
        """A hashed-column count matrix with compact columns (every column must be in the vocabulary)."""
        cols = np.searchsorted(self.hashes, counts.indices.astype(np.int64))
        return sp.csr_matrix((counts.data, cols, counts.indptr), shape=(counts.shape[0], len(self.hashes)))


@dataclass(frozen=True)
class BM25Params:
    """BM25 saturation ``k1`` and length normalisation ``b``."""

    k1: float = 1.2
    b: float = 0.75


def idf_from_counts(counts: sp.csr_matrix) -> np.ndarray:
    """BM25 idf, log(1 + (N − df + 0.5) / (df + 0.5)), per column (float32)."""
    n = counts.shape[0]
    df = np.bincount(counts.indices, minlength=counts.shape[1]).astype(np.float32)
    return np.log1p((n - df + 0.5) / (df + 0.5)).astype(np.float32)


def saturate(counts: sp.csr_matrix, params: BM25Params, avg_len: float | None = None) -> sp.csc_matrix:
    """BM25 tf saturation of a count matrix, returned column-major for query-time column slicing."""
    counts = counts.tocsr()
    lengths = np.asarray(counts.sum(axis=1)).ravel()
    avg = float(avg_len if avg_len is not None else (lengths.mean() if len(lengths) else 1.0)) or 1.0
    rows = np.repeat(np.arange(counts.shape[0]), np.diff(counts.indptr))
    tf = counts.data
    norm = params.k1 * (1.0 - params.b + params.b * lengths[rows] / avg)
    out = counts.copy()
    out.data = (tf * (params.k1 + 1.0) / (tf + norm)).astype(np.float32)
    return out.tocsc()


def saturate_rows(counts: sp.csr_matrix, params: BM25Params, avg_len: float) -> sp.csr_matrix:
    """Like :func:`saturate` for a few rows with a given average length (row-major result)."""
    return saturate(counts, params, avg_len).tocsr()


@dataclass(frozen=True)
class Query:
    """A query's distinct hashed terms and their idf-based weights."""

    terms: np.ndarray
    weights: np.ndarray

    @property
    def ideal(self) -> float:
        """Best possible BM25 score of this query (every term at full saturation), for normalising."""
        return float(self.weights.sum())


def make_query(text: str, vocab: Vocabulary, idf: np.ndarray) -> Query:
    """Distinct terms of ``text`` weighted by idf (query term frequency ignored, as in BM25 tf_q = 1)."""
    terms = np.unique(vocab.columns(np.unique(term_ids(text))))
    weights = idf[terms] if len(terms) else np.zeros(0, np.float32)
    keep = weights > 0
    return Query(terms[keep], weights[keep].astype(np.float32))


def column_dot(matrix: sp.csc_matrix, columns: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``matrix[:, columns] @ weights`` (in the matrix's float type) by walking the CSC posting lists of
    ``columns`` in scipy's compiled ``csc_matvec``, nothing copied (Manning et al., IR book §6.3.3,
    term-at-a-time scoring)."""
    n = matrix.shape[0]
    dtype = np.float32 if matrix.data.dtype == np.float32 else np.float64
    out = np.zeros(n, dtype)
    columns = np.asarray(columns, np.int64)
    if len(columns) == 0:
        return out
    # csc_matvec walks column j over indptr[j]..indptr[j + 1]. Pointers [s0, e0, s1, e1, …] of the
    # query's columns in descending order make every odd "column" a gap e_i → s_(i+1) ≤ e_i, which
    # is empty: the loop visits only the query's postings, in place (weight 0 on the gaps).
    order = np.argsort(-columns, kind="stable")
    picked = columns[order]
    pointers = np.empty(2 * len(picked), matrix.indices.dtype)
    pointers[0::2], pointers[1::2] = matrix.indptr[picked], matrix.indptr[picked + 1]
    x = np.zeros(len(pointers) - 1, dtype)
    x[0::2] = np.asarray(weights, dtype)[order]
    data = matrix.data if matrix.data.dtype == dtype else matrix.data.astype(dtype)
    _sparsetools.csc_matvec(n, len(x), pointers, matrix.indices, data, x, out)
    return out


def score(matrix: sp.csc_matrix, query: Query, params: BM25Params) -> np.ndarray:
    """BM25 of every row for the query, divided by the query's ideal score (k1 + 1 per unit weight)."""
    if len(query.terms) == 0:
        return np.zeros(matrix.shape[0], np.float32)
    return normalised(column_dot(matrix, query.terms, query.weights), query, params)


def normalised(raw: np.ndarray, query: Query, params: BM25Params) -> np.ndarray:
    """Raw BM25 sums divided by the query's ideal score (k1 + 1 per unit weight), as float32."""
    return (raw / ((params.k1 + 1.0) * query.ideal)).astype(np.float32)


def saturated_tf(tf: np.ndarray, length: float, avg_len: float, params: BM25Params) -> np.ndarray:
    """BM25 tf saturation of raw counts for a document of ``length`` terms (Robertson & Zaragoza eq. 3.15)."""
    norm = params.k1 * (1.0 - params.b + params.b * length / avg_len)
    return tf * (params.k1 + 1.0) / (tf + norm)


def score_rows(rows: sp.csr_matrix, query: Query, params: BM25Params) -> np.ndarray:
    """Normalised BM25 of a few saturated rows (row-major) for the query."""
    if len(query.terms) == 0 or rows.shape[0] == 0:
        return np.zeros(rows.shape[0], np.float32)
    return normalised(np.asarray(rows[:, query.terms] @ query.weights).ravel(), query, params)


def save_sparse(path_prefix: str, matrix: sp.spmatrix) -> dict[str, np.ndarray]:
    """Arrays of a CSC/CSR matrix for ``np.savez`` (keys prefixed)."""
    m = matrix
    return {
        f"{path_prefix}_data": m.data,
        f"{path_prefix}_indices": m.indices.astype(np.int32),
        f"{path_prefix}_indptr": m.indptr.astype(np.int64),
        f"{path_prefix}_shape": np.array(m.shape),
    }


def load_sparse(arrays: dict[str, np.ndarray], prefix: str, fmt: str = "csc") -> sp.spmatrix:
    """Inverse of :func:`save_sparse`."""
    cls = sp.csc_matrix if fmt == "csc" else sp.csr_matrix
    return cls(
        (arrays[f"{prefix}_data"], arrays[f"{prefix}_indices"], arrays[f"{prefix}_indptr"]),
        shape=tuple(int(x) for x in arrays[f"{prefix}_shape"]),
    )
