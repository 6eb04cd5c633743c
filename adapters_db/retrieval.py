"""Hybrid retrieval: prompt → adapters. Lexical, trigger-word, full-text and dense channels, fused by a
learned scorer, filtered, explained.

Channels (each a per-adapter feature, see :data:`FEATURES`):

- prompts people used with each adapter (preview images, training captions): BM25 per prompt,
  aggregated per adapter as max (``p_max``) and soft count (``p_kde``), and BM25 over the adapter's
  prompts as one document (``p_doc``); the query's own image can be left out (evaluation);
- metadata fields, BM25 each: name, trigger words, tags, file names, description (``m_*``);
- trigger phrases found verbatim in the prompt, weighted by rarity (``t_max``, ``t_frac``);
- the database's full-text index (SQLite FTS5 / PostgreSQL tsvector) on the query's rarest words:
  match feature ``fts`` (the match set only, so both backends rank alike);
- dense cosine similarity of the embedder's query vector to metadata, prompt and image vectors
  (``d_meta``, ``d_prompt``, ``d_image``);
- priors: log downloads (``pop``), log prompt count (``n_prompts``), has prompts (``has_prompts``).

- TF-IDF cosine (sublinear tf, smooth idf, L2-normalised rows, as scikit-learn's ``TfidfVectorizer``)
  over the word 1–2-grams of each adapter's metadata plus its prompts as one document (``tf_doc``,
  warm; the query's own image taken out), over metadata alone (``tf_meta``) and, max per adapter,
  over single prompts (``tf_pmax``, warm).

- the prompt classifier (``k_lp``, warm only, when the catalog has one: ``adapters_db.classifier``):
  log p(adapter | prompt) of a bag-of-n-grams softmax trained on every adapter's prompts and metadata.

- the prompt ↔ metadata matcher (``s_meta``, warm and cold, when the catalog has one:
  ``adapters_db.matcher``): cosine of the prompt to each adapter's metadata in a two-tower space learned
  from the catalog's prompts, so adapters without prompts of their own are scored too.

Reciprocal-rank versions of the main channels (``r_*``) and creator-level prompt evidence
(``c_max``, ``c_doc``: creators reuse their prompt templates) complete the feature set. A learned
:class:`~adapters_db.fusion.Fusion` turns features into one score (see ``adapters_db.fusion``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp
from sqlalchemy import select
from sqlalchemy.orm import Session

from adapters_db import fulltext, lexical
from adapters_db.classifier import PromptClassifier, load_classifier
from adapters_db.dto import AdapterRecord, SearchHit
from adapters_db.families import normalize_family
from adapters_db.fusion import Fusion, FusionRegistry, LinearScorer, Scorer
from adapters_db.lexical import Query
from adapters_db.matcher import PromptMatcher, load_matcher
from adapters_db.models import Adapter, PreviewImage
from adapters_db.pruning import (
    PRUNE_FROM,
    PruneConfig,
    RowView,
    SpreadFeatures,
    best,
    best_owners,
    features_at,
    group_max,
    group_order,
    slice_positions,
    top_rows,
)
from adapters_db.repository import SORTS, adapter_ids_matching, filter_conditions, get_adapters
from adapters_db.search_index import FAMILY_CODES, META_FIELDS, SearchIndex
from adapters_db.text import clean_prompt, has_cjk, words

if TYPE_CHECKING:
    from adapters_db.catalog import Catalog

CHANNELS = ("prompts", "meta", "triggers", "fts", "dense", "weightspace", "classifier", "matcher")
BASE_FEATURES = (
    "p_max",
    "p_kde",
    "p_doc",
    "c_max",
    "c_doc",
    "m_all",
    "m_name",
    "m_triggers",
    "m_tags",
    "m_files",
    "m_description",
    "t_max",
    "t_frac",
    "fts",
    "d_meta",
    "d_prompt",
    "d_image",
    "pop",
    "n_prompts",
    "has_prompts",
    "tf_doc",
    "tf_meta",
    "tf_pmax",
    "k_lp",
    "s_meta",
)
RANKED = (
    "p_max",
    "p_doc",
    "m_all",
    "m_name",
    "m_files",
    "t_max",
    "d_meta",
    "d_prompt",
    "tf_doc",
    "tf_meta",
    "tf_pmax",
    "k_lp",
    "s_meta",
)
RANK_DEPTH = 200
CANDIDATE_DEPTH = 50  # candidates per feature for the fusion (fitting used the top 40 of each)
FEATURES = BASE_FEATURES + tuple(f"r_{name}" for name in RANKED)
KDE_TAU = 0.1
DENSE_K = 256
FTS_LIMIT = 1000
FTS_WORDS = 8
DENSE_FEATURES = {"d_meta", "d_prompt", "d_image", "r_d_meta", "r_d_prompt"}
# weight-space channels (adapters_db.weightspace): feature → stored channel; only textless adapters have them
WEIGHT_FEATURES = {"d_weights": "weights", "d_wsvd": "wsvd"}
TEXTLESS_WEIGHT = 4.0


@dataclass
class QueryContext:
    """Everything computed once per query."""

    text: str
    columns: np.ndarray
    use_prompts: bool
    exclude_rows: np.ndarray
    vector: np.ndarray | None = None
    fts_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    trigger_hits: dict[str, np.ndarray] = field(default_factory=dict)  # phrase in the query → its rows
    prompt_scores: np.ndarray | None = None
    best_dense_prompt: dict[int, tuple[float, int]] = field(default_factory=dict)
    weight_channels: bool = False
    class_scores: np.ndarray | None = None
    match_scores: np.ndarray | None = None
    lexical: dict[str, np.ndarray] | None = None  # FeatureBuilder.lexical_scores, computed once
    creator: dict[str, np.ndarray] | None = None  # FeatureBuilder.creator_scores, computed once
    own_left_out: dict[str, np.ndarray] = field(default_factory=dict)  # FeatureBuilder._own_left_out


def _query(columns: np.ndarray, idf: np.ndarray) -> Query:
    weights = idf[columns] if len(columns) else np.zeros(0, np.float32)
    keep = weights > 0
    return Query(columns[keep], weights[keep].astype(np.float32))


class TfidfChannel:
    """TF-IDF cosine over one count matrix (one document per adapter): sublinear tf 1 + ln tf, smooth
    idf ln((1 + n) / (1 + df)) + 1 (0 for terms no document has), L2-normalised rows."""

    def __init__(self, counts: sp.csr_matrix) -> None:
        counts = sp.csr_matrix(counts, dtype=np.float32)
        counts.eliminate_zeros()
        n = counts.shape[0]
        df = np.bincount(counts.indices, minlength=counts.shape[1]).astype(np.float32)
        self.idf = np.where(df > 0, np.log((1.0 + n) / (1.0 + df)) + 1.0, 0.0).astype(np.float32)
        self.counts = counts
        self.matrix = self._normalised(counts).tocsc()

    def _normalised(self, counts: sp.csr_matrix) -> sp.csr_matrix:
        out = counts.copy()
        out.data = (1.0 + np.log(np.maximum(out.data, 1.0))) * self.idf[out.indices]
        norms = np.sqrt(np.asarray(out.multiply(out).sum(axis=1)).ravel())
        rows = np.repeat(np.arange(out.shape[0]), np.diff(out.indptr))
        out.data = (out.data / np.maximum(norms[rows], 1e-12)).astype(np.float32)
        return out

    def query(self, columns: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Columns and normalised weights of a query (terms no document has are dropped)."""
        w = (1.0 + np.log(np.maximum(counts, 1.0))) * self.idf[columns]
        keep = w > 0
        columns, w = columns[keep], w[keep]
        norm = float(np.sqrt((w * w).sum()))
        return columns, (w / norm if norm > 0 else w).astype(np.float32)

    def score(self, columns: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Cosine of every document with the query."""
        if len(columns) == 0:
            return np.zeros(self.matrix.shape[0], np.float32)
        return lexical.column_dot(self.matrix, columns, weights).astype(np.float32)

    def rescore(self, row: int, minus: sp.csr_matrix, columns: np.ndarray, weights: np.ndarray) -> float:
        """Cosine of document ``row`` with some counts taken out of it (leaving an image out)."""
        counts = self.counts[row] - minus
        counts.data = np.maximum(counts.data, 0.0)
        counts.eliminate_zeros()
        if counts.nnz == 0 or len(columns) == 0:
            return 0.0
        vec = self._normalised(sp.csr_matrix(counts))
        return float((vec[:, columns] @ weights)[0])


class FeatureBuilder:
    """Per-adapter feature arrays of one query over a :class:`SearchIndex`: over every adapter, or
    over a :class:`~adapters_db.pruning.RowView` of the few a large catalog's query can rank high."""

    def __init__(self, index: SearchIndex) -> None:
        self.index = index
        lex = index.lexical
        assert lex is not None, "search index not built"
        self.lex = lex
        owner = index.prompt_owner
        self.perm = np.argsort(owner, kind="stable")
        counts = np.bincount(owner, minlength=index.size)
        self.owners_with = np.nonzero(counts)[0]
        self.starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[self.owners_with]
        self.full = RowView(index.size, None, self.perm, self.owners_with, self.starts)
        self._dense_sorted: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.doc_lengths = np.asarray(lex.doc_counts.sum(axis=1)).ravel()
        self.n_creators = int(index.creator.max()) + 1 if len(index.creator) else 0
        self.prompt_lengths = np.asarray(lex.prompt_counts.sum(axis=1)).ravel()
        self._tfidf: dict[str, TfidfChannel] = {}
        self._by_creator: tuple[np.ndarray, np.ndarray] | None = None
        self._prompts_by_creator: tuple[np.ndarray, np.ndarray] | None = None

    def tfidf(self, name: str) -> TfidfChannel:
        """The TF-IDF channel ``doc`` (metadata + prompts), ``meta`` or ``prompt`` (one document per
        prompt), built on first use."""
        if name not in self._tfidf:
            lex = self.lex
            counts = {"doc": lex.meta_counts + lex.doc_counts, "meta": lex.meta_counts}.get(name)
            counts = lex.prompt_counts if counts is None else counts
            self._tfidf[name] = TfidfChannel(counts)
        return self._tfidf[name]

    def view(self, rows: np.ndarray) -> RowView:
        """The view of some adapter rows, with their prompts grouped by owner."""
        rows = np.unique(np.asarray(rows, np.int64))
        at = np.minimum(np.searchsorted(self.owners_with, rows), max(len(self.owners_with) - 1, 0))
        has = self.owners_with[at] == rows if len(self.owners_with) else np.zeros(len(rows), bool)
        at = at[has]
        lengths = self.index.n_prompts[self.owners_with[at]].astype(np.int64)
        picks = slice_positions(self.starts[at], lengths)
        group_starts = np.cumsum(lengths) - lengths
        return RowView(self.index.size, rows, self.perm[picks], np.nonzero(has)[0], group_starts)

    def lexical_scores(self, ctx: QueryContext) -> dict[str, np.ndarray]:
        """Exact scores of every lexical channel over the whole catalog, computed once per query by
        walking the query terms' posting lists (cost: their lengths, not the catalog's size):
        ``field_*``, ``meta_all``, ``docs`` (normalised BM25) and ``meta_tfidf``, ``doc_tfidf``
        (cosine) per adapter; ``prompts`` (BM25) and ``prompt_tfidf`` per prompt row. The query's own
        pictures (``ctx.exclude_rows``) are not taken out here."""
        if ctx.lexical is not None:
            return ctx.lexical
        lex, config = self.lex, self.index.config
        out: dict[str, np.ndarray] = {}
        for name in META_FIELDS:
            out[f"field_{name}"] = lexical.score(
                lex.fields[name], _query(ctx.columns, lex.field_idf[name]), config.meta_bm25
            )
        out["meta_all"] = lexical.score(lex.meta_all, _query(ctx.columns, lex.meta_idf), config.meta_bm25)
        cols, counts = np.unique(lex.vocab.columns(lexical.term_ids(ctx.text)), return_counts=True)
        channels = ("meta", "doc", "prompt") if ctx.use_prompts else ("meta",)
        for name in channels:
            tfidf = self.tfidf(name)
            out[f"{name}_tfidf"] = tfidf.score(*tfidf.query(cols, counts.astype(np.float32)))
        if ctx.use_prompts:
            params = config.prompt_bm25
            out["docs"] = lexical.score(lex.docs, _query(ctx.columns, lex.doc_idf), params)
            out["prompts"] = lexical.score(lex.prompts, _query(ctx.columns, lex.prompt_idf), params)
        ctx.lexical = out
        return out

    def features(self, ctx: QueryContext, view: RowView | None = None) -> dict[str, np.ndarray]:
        """Every feature of :data:`FEATURES` as an array over the view's adapter rows (default: all)."""
        view = view or self.full
        n = view.n
        out = {name: np.zeros(n, np.float32) for name in FEATURES}
        self._meta(ctx, out, view)
        self._triggers(ctx, out, view)
        self._fts(ctx, out, view)
        out["pop"] = view.take(self.index.log_downloads).astype(np.float32)
        self._tfidf_features(ctx, out, view)
        if ctx.use_prompts:
            self._prompts(ctx, out, view)
        if ctx.vector is not None:
            self.dense_features(ctx, out, view)
        if ctx.vector is not None and ctx.weight_channels:
            self.weight_features(ctx, out, view)
        if ctx.class_scores is not None:
            out["k_lp"] = view.take(ctx.class_scores)
        if ctx.match_scores is not None:
            out["s_meta"] = view.take(ctx.match_scores)
        return out

    @staticmethod
    def add_ranks(out: dict[str, np.ndarray]) -> None:
        """Reciprocal-rank features 1 / (1 + rank / 10) of the top ``RANK_DEPTH`` of some channels
        (scale-free evidence, as in reciprocal rank fusion); 0 below that depth or without a score."""
        for name in RANKED:
            values = out[name]
            target = out[f"r_{name}"]
            depth = min(RANK_DEPTH, len(values) - 1)
            if depth <= 0:
                continue
            top = top_rows(values, depth)
            top = top[np.lexsort((top, -values[top]))]  # ties in catalog order
            top = top[values[top] > values.min()]
            target[top] = 1.0 / (1.0 + np.arange(len(top)) / 10.0)

    def _meta(self, ctx: QueryContext, out: dict[str, np.ndarray], view: RowView) -> None:
        scores = self.lexical_scores(ctx)
        for name in META_FIELDS:
            out[f"m_{name}"] = view.take(scores[f"field_{name}"])
        out["m_all"] = view.take(scores["meta_all"])

    def _tfidf_features(self, ctx: QueryContext, out: dict[str, np.ndarray], view: RowView) -> None:
        """``tf_meta`` and (warm) ``tf_doc``, the query's own image's counts taken out of its owner."""
        exact = self.lexical_scores(ctx)
        out["tf_meta"] = view.take(exact["meta_tfidf"])
        if not ctx.use_prompts:
            return
        scores = view.take(exact["doc_tfidf"]).copy()
        excluded = ctx.exclude_rows[ctx.exclude_rows >= 0]
        owners = self.index.prompt_owner[excluded]
        inside, at = view.positions(np.unique(owners))
        if inside.any():  # owners of the query's own pictures in the view: re-scored without them
            doc = self.tfidf("doc")
            cols, counts = np.unique(self.lex.vocab.columns(lexical.term_ids(ctx.text)), return_counts=True)
            q_cols, q_w = doc.query(cols, counts.astype(np.float32))
            for row, pos in zip(np.unique(owners)[inside].tolist(), at.tolist(), strict=True):
                minus = sp.csr_matrix(self.lex.prompt_counts[excluded[owners == row]].sum(axis=0))
                scores[pos] = doc.rescore(row, minus, q_cols, q_w)
        out["tf_doc"] = scores
        if len(view.owner_pos):
            per_prompt = self._own_left_out(ctx, "prompt_tfidf")
            best_prompt = np.maximum.reduceat(per_prompt[view.prompt_rows], view.group_starts)
            out["tf_pmax"][view.owner_pos] = best_prompt

    def _triggers(self, ctx: QueryContext, out: dict[str, np.ndarray], view: RowView) -> None:
        table = self.index.triggers
        if table is None:
            return
        ctx.trigger_hits = table.match(ctx.text)
        if not ctx.trigger_hits:
            return
        rows = np.concatenate(list(ctx.trigger_hits.values()))
        weights = np.repeat(
            np.array([table.weight.get(p, 0.0) for p in ctx.trigger_hits], np.float32),
            [len(r) for r in ctx.trigger_hits.values()],
        )
        inside, at = view.positions(rows)
        np.maximum.at(out["t_max"], at, weights[inside])
        found = np.bincount(at, minlength=len(out["t_frac"]))
        hit = np.nonzero(found)[0]
        out["t_frac"][hit] = found[hit] / np.maximum(1, view.take(table.phrase_count)[hit])

    def _fts(self, ctx: QueryContext, out: dict[str, np.ndarray], view: RowView) -> None:
        if len(ctx.fts_rows):
            _, at = view.positions(ctx.fts_rows[ctx.fts_rows >= 0])
            out["fts"][at] = 1.0

    def _prompts(self, ctx: QueryContext, out: dict[str, np.ndarray], view: RowView) -> None:
        index = self.index
        if len(index.prompt_owner) == 0:
            out["p_kde"][:] = -1.0 / KDE_TAU
            return
        counts = view.take(index.n_prompts).astype(np.float32)
        scores = self._own_left_out(ctx, "prompts")
        ordered = scores[view.prompt_rows]
        kde_terms = np.exp((ordered - 1.0) / KDE_TAU)
        excluded = ctx.exclude_rows[ctx.exclude_rows >= 0]
        if len(excluded):
            kde_terms[np.isin(view.prompt_rows, excluded)] = 0.0  # (their scores are 0 already)
            _, at = view.positions(index.prompt_owner[excluded])
            np.subtract.at(counts, at, 1.0)
        ctx.prompt_scores = scores
        out["p_kde"][:] = -1.0 / KDE_TAU
        if len(view.owner_pos):
            out["p_max"][view.owner_pos] = np.maximum.reduceat(ordered, view.group_starts)
            kde = np.add.reduceat(kde_terms, view.group_starts)
            out["p_kde"][view.owner_pos] = np.log(np.maximum(kde, math.exp(-1.0 / KDE_TAU)))
        out["p_doc"] = self._doc_scores(ctx, excluded, view)
        if view.rows is None:
            out["c_max"] = self._creator_max(out["p_max"])
            out["c_doc"] = self._creator_max(out["p_doc"])
        else:  # a creator's best adapter may lie outside the view: the maxima over the whole catalog
            creator = self.creator_scores(ctx)  # (a creator's adapters can be most of a synthetic catalog)
            out["c_max"], out["c_doc"] = view.take(creator["c_max"]), view.take(creator["c_doc"])
        out["n_prompts"] = np.log1p(np.maximum(counts, 0.0))
        out["has_prompts"] = (counts > 0).astype(np.float32)

    def _creator_order(self) -> tuple[np.ndarray, np.ndarray]:
        """Adapter rows grouped by creator (:func:`~adapters_db.pruning.group_order`), built on first use."""
        if self._by_creator is None:
            self._by_creator = group_order(self.index.creator, self.n_creators)
        return self._by_creator

    def _creator_max(self, values: np.ndarray) -> np.ndarray:
        """Per adapter, the best value among all adapters of its creator (creators reuse prompt styles)."""
        return group_max(values, *self._creator_order(), -np.inf)[self.index.creator]

    def _own_left_out(self, ctx: QueryContext, key: str) -> np.ndarray:
        """A per-prompt exact lexical score (``prompts``, ``prompt_tfidf``) with the query's own pictures
        at 0: a copy made once per query and shared by the universe, the features and the creator
        maxima (none of which writes to it)."""
        if key not in ctx.own_left_out:
            values = self.lexical_scores(ctx)[key].copy()
            values[ctx.exclude_rows[ctx.exclude_rows >= 0]] = 0.0
            ctx.own_left_out[key] = values
        return ctx.own_left_out[key]

    def creator_scores(self, ctx: QueryContext) -> dict[str, np.ndarray]:
        """``c_max`` and ``c_doc`` over the whole catalog, from the exact prompt and prompt-document
        scores with the query's own pictures left out (computed once per query; for candidate-first
        search, whose views hold only some of a creator's adapters)."""
        if ctx.creator is not None:
            return ctx.creator
        # a creator's best p_max is its best prompt (scores are ≥ 0, and 0 without prompts): one
        # reduction over the prompts grouped by creator, not a per-adapter one first
        if self._prompts_by_creator is None:
            owner_creator = self.index.creator[self.index.prompt_owner]
            self._prompts_by_creator = group_order(owner_creator, self.n_creators)
        c_max = group_max(self._own_left_out(ctx, "prompts"), *self._prompts_by_creator, 0.0)
        p_doc = self._doc_scores(ctx, ctx.exclude_rows[ctx.exclude_rows >= 0], self.full)
        ctx.creator = {"c_max": c_max[self.index.creator], "c_doc": self._creator_max(p_doc)}
        return ctx.creator

    def best_prompt_row(self, ctx: QueryContext, row: int) -> int:
        """The prompt row of adapter ``row`` with the best lexical score for the query (−1: none)."""
        if ctx.prompt_scores is None:
            return -1
        at = int(np.searchsorted(self.owners_with, row))
        if at >= len(self.owners_with) or self.owners_with[at] != row:
            return -1
        start = int(self.starts[at])
        end = int(self.starts[at + 1]) if at + 1 < len(self.starts) else len(self.perm)
        mine = self.perm[start:end]
        best = int(mine[np.argmax(ctx.prompt_scores[mine])])
        return best if ctx.prompt_scores[best] > 0 else -1

    def _doc_scores(self, ctx: QueryContext, excluded: np.ndarray, view: RowView) -> np.ndarray:
        """BM25 of each adapter's prompts as one document; adapters owning excluded prompts are
        re-scored with those prompts' term counts and lengths taken out."""
        lex, params = self.lex, self.index.config.prompt_bm25
        query = _query(ctx.columns, lex.doc_idf)
        scores = view.take(self.lexical_scores(ctx)["docs"]).copy()
        if len(excluded) == 0 or len(query.terms) == 0:
            return scores
        owners = self.index.prompt_owner[excluded]
        for row in np.unique(owners):
            inside, at = view.positions(np.array([row]))
            if not inside[0]:
                continue
            mine = excluded[owners == row]
            tf = lex.doc_counts[row, query.terms].toarray().ravel()
            tf = np.maximum(tf - np.asarray(lex.prompt_counts[mine][:, query.terms].sum(axis=0)).ravel(), 0.0)
            length = float(self.doc_lengths[row] - self.prompt_lengths[mine].sum())
            if length <= 0:
                scores[at[0]] = 0.0
                continue
            sat = lexical.saturated_tf(tf, length, lex.doc_avg_len, params)
            scores[at[0]] = float((sat * query.weights).sum() / ((params.k1 + 1.0) * query.ideal))
        return scores

    def dense_features(
        self, ctx: QueryContext, out: dict[str, np.ndarray], view: RowView | None = None
    ) -> None:
        """``d_meta``, ``d_prompt`` (warm only) and ``d_image`` from the query vector."""
        view = view or self.full
        vec = ctx.vector
        assert vec is not None
        meta = self.index.dense.get("meta")
        if meta is not None and meta.size:
            sims, ids = meta.search(vec, min(meta.size, max(DENSE_K, 1024)))
            rows = self.index.rows_of(ids[0][ids[0] >= 0])
            vals = sims[0][ids[0] >= 0]
            out["d_meta"][:] = float(vals.min()) if len(vals) else 0.0
            inside, at = view.positions(rows[rows >= 0])
            out["d_meta"][at] = vals[rows >= 0][inside]
        for channel, feature in (("prompt", "d_prompt"), ("image", "d_image")):
            if channel == "prompt" and not ctx.use_prompts:
                continue
            self._dense_owned(ctx, channel, out[feature], view)

    def weight_features(
        self, ctx: QueryContext, out: dict[str, np.ndarray], view: RowView | None = None
    ) -> None:
        """``d_weights``, ``d_wsvd``: cosine of the query vector to the weight-space vectors of textless
        adapters (0 for every other adapter; see ``adapters_db.weightspace``)."""
        view = view or self.full
        for feature, channel in WEIGHT_FEATURES.items():
            target = out.setdefault(feature, np.zeros(view.n, np.float32))
            index = self.index.dense.get(channel)
            if index is None or index.size == 0 or ctx.vector is None:
                continue
            sims, ids = index.search(ctx.vector, index.size)
            rows = self.index.rows_of(ids[0][ids[0] >= 0])
            vals = sims[0][ids[0] >= 0]
            inside, at = view.positions(rows[rows >= 0])
            target[at] = vals[rows >= 0][inside]

    def _owner_rows(self, channel: str, ids: np.ndarray) -> np.ndarray:
        """Adapter rows owning the given dense-index ids (image ids of the prompt/image channels)."""
        if channel not in self._dense_sorted:
            index = self.index.dense[channel]
            order = np.argsort(index.ids, kind="stable")
            self._dense_sorted[channel] = (index.ids[order], self.index.dense_owner[channel][order])
        sorted_ids, owners = self._dense_sorted[channel]
        return owners[np.searchsorted(sorted_ids, ids)]

    def _dense_owned(self, ctx: QueryContext, channel: str, target: np.ndarray, view: RowView) -> None:
        index = self.index.dense.get(channel)
        if index is None or index.size == 0 or ctx.vector is None:
            return
        sims, ids = index.search(ctx.vector, min(index.size, DENSE_K))
        sims, ids = sims[0], ids[0]
        keep = ids >= 0
        excluded = self.index.prompt_image_ids[ctx.exclude_rows[ctx.exclude_rows >= 0]]
        if len(excluded):
            keep &= ~np.isin(ids, excluded)
        sims, ids = sims[keep], ids[keep]
        if len(sims) == 0:
            return
        rows = self._owner_rows(channel, ids)
        target[:] = float(sims.min())
        inside, at = view.positions(rows)
        np.maximum.at(target, at, sims[inside].astype(np.float32))
        if channel == "prompt":
            for sim, image_id, row in zip(sims.tolist(), ids.tolist(), rows.tolist(), strict=True):
                if row not in ctx.best_dense_prompt or sim > ctx.best_dense_prompt[row][0]:
                    ctx.best_dense_prompt[row] = (sim, image_id)

    def _creator_rows(self, rows: np.ndarray, limit: int) -> np.ndarray:
        """The first ``CANDIDATE_DEPTH`` adapters (in row order, as ties are taken) of each creator of
        ``rows``, at most ``limit`` rows in all."""
        order, starts = self._creator_order()
        creators = self.index.creator[rows]
        creators = creators[np.sort(np.unique(creators, return_index=True)[1])]
        lengths = np.minimum(starts[creators + 1] - starts[creators], CANDIDATE_DEPTH)
        keep = np.cumsum(lengths) <= limit
        return order[slice_positions(starts[creators[keep]], lengths[keep])]

    def _dense_universe(self, ctx: QueryContext, allowed: np.ndarray | None, n: int) -> list[np.ndarray]:
        """The ``n`` nearest rows of each dense and weight-space channel and, with a filter, the ``n``
        nearest allowed ones among as many neighbours as the channel's features read."""
        parts = []
        for channel in ("meta", "prompt", "image", *WEIGHT_FEATURES.values()):
            dense = self.index.dense.get(channel)
            if dense is None or dense.size == 0:
                continue
            depth = {"meta": max(DENSE_K, 1024), "prompt": DENSE_K, "image": DENSE_K}.get(channel, dense.size)
            _, ids = dense.search(ctx.vector, min(dense.size, n if allowed is None else depth))
            ids = ids[0][ids[0] >= 0]
            owned = channel in ("prompt", "image")
            rows = self._owner_rows(channel, ids) if owned else self.index.rows_of(ids)
            parts.extend(_first(rows[rows >= 0], allowed, n))
        return parts

    def universe(self, ctx: QueryContext, allowed: np.ndarray | None, config: PruneConfig) -> np.ndarray:
        """The adapter rows a query can rank high (:mod:`adapters_db.pruning`): the best of every exact
        lexical channel, the adapters of the creators of the best prompt matches, the trigger and
        full-text matches and the best of the dense and learned channels — with a filter, each also
        among the ``allowed`` rows, with the allowed adapters of the best creator-level evidence."""
        if allowed is not None and allowed.all():
            allowed = None  # (the default filter, no NSFW, often keeps every adapter)
        fts = ctx.fts_rows[ctx.fts_rows >= 0]  # a match set: its first rows (ties in row order)
        parts = _first(fts, allowed, CANDIDATE_DEPTH)
        lexical_best = self._lexical_universe(ctx, allowed, config.lexical_rows)
        parts.extend(rows for found in lexical_best.values() for rows in found)
        if ctx.use_prompts:
            parts.extend(self._creator_universe(ctx, allowed, lexical_best, config.creator_rows))
        table = self.index.triggers
        if table is not None:
            hits = table.match(ctx.text)
            ordered = sorted(hits, key=lambda phrase: -table.weight.get(phrase, 0.0))
            rows = np.concatenate([hits[p] for p in ordered]) if ordered else np.zeros(0, np.int64)
            parts.extend(_first(rows, allowed, config.trigger_rows))
        if ctx.vector is not None:
            parts.extend(self._dense_universe(ctx, allowed, config.other_rows))
        for scores in (ctx.class_scores, ctx.match_scores):
            if scores is not None:
                parts.append(top_rows(scores, config.other_rows))
                if allowed is not None:
                    positions = np.flatnonzero(allowed)
                    parts.append(positions[top_rows(scores[positions], config.other_rows)])
        return np.unique(np.concatenate(parts).astype(np.int64))

    def _lexical_universe(
        self, ctx: QueryContext, allowed: np.ndarray | None, n: int
    ) -> dict[str, list[np.ndarray]]:
        """Per exact lexical channel, its ``n`` best adapters (per-prompt channels: by their best prompt
        that is not the query's own), best first, and the ``n`` best allowed ones where a filter
        removes one of those."""
        out: dict[str, list[np.ndarray]] = {}
        for key, values in self.lexical_scores(ctx).items():
            owners = self.index.prompt_owner if key.startswith("prompt") else None
            if owners is not None:
                values = self._own_left_out(ctx, key)
            found = [best(values, n) if owners is None else best_owners(values, owners, n)]
            if allowed is not None and not allowed[found[0]].all():  # else the allowed rows' best are these
                mask = allowed if owners is None else allowed[owners]
                found.append(
                    best(values, n, mask) if owners is None else best_owners(values, owners, n, mask)
                )
            out[key] = found
        return out

    def _creator_universe(
        self,
        ctx: QueryContext,
        allowed: np.ndarray | None,
        lexical_best: dict[str, list[np.ndarray]],
        limit: int,
    ) -> list[np.ndarray]:
        """Rows with creator-level evidence (``c_max``, ``c_doc``): adapters of the creators of the best
        prompt and document matches and, with a filter, the allowed adapters whose creators score best."""
        found = (*lexical_best["prompts"], *lexical_best["docs"])
        parts = [self._creator_rows(np.concatenate([r[:CANDIDATE_DEPTH] for r in found]), limit)]
        if allowed is not None:
            parts.extend(
                best(values, CANDIDATE_DEPTH, allowed) for values in self.creator_scores(ctx).values()
            )
        return parts


def _first(rows: np.ndarray, allowed: np.ndarray | None, n: int) -> list[np.ndarray]:
    """The first ``n`` of some ordered rows, and the first ``n`` allowed ones if a filter is given."""
    return [rows[:n]] if allowed is None else [rows[:n], rows[allowed[rows]][:n]]


def feature_builder(index: SearchIndex) -> FeatureBuilder:
    """The (cached) feature builder of an index, rebuilt when the index was rebuilt or reloaded."""
    key = id(index.manifest)
    cached = getattr(index, "_feature_builder", None)
    if cached is None or cached[0] != key:
        cached = (key, FeatureBuilder(index))
        index._feature_builder = cached  # type: ignore[attr-defined]
    return cached[1]


# ------------------------------------------------------------------------------------------ search


def _allowed_mask(
    session: Session,
    index: SearchIndex,
    *,
    base_family: str | None,
    include_nsfw: bool,
    tags: Iterable[str] | None,
    licence: str | Iterable[str] | None,
    local_only: bool | None,
    kind: str | None = None,
) -> np.ndarray:
    mask = np.ones(index.size, bool)
    family = normalize_family(base_family)
    if family is not None:
        mask &= index.family == FAMILY_CODES[family]
    if not include_nsfw:
        mask &= index.nsfw == 0
    if local_only is not None:
        mask &= index.has_local if local_only else ~index.has_local
    tag_list = [t for t in (tags or ()) if t and t.strip()]
    if tag_list or licence or kind:
        conds = filter_conditions(tags=tag_list, licence=licence, kind=kind, include_nsfw=True)
        allowed = np.array(sorted(adapter_ids_matching(session, conds)), np.int64)
        rows = index.rows_of(allowed)
        keep = np.zeros(index.size, bool)
        keep[rows[rows >= 0]] = True
        mask &= keep
    return mask


def informative_words(index: SearchIndex, query: str, n: int = FTS_WORDS) -> list[str]:
    """The query's ``n`` rarest words in the catalog's metadata (words no adapter has are dropped)."""
    assert index.lexical is not None
    scored = []
    for word in fulltext.query_words(query, max_terms=10_000):
        cols = index.lexical.vocab.columns(lexical.term_ids(word)[:1])
        if len(cols):
            scored.append((float(index.lexical.meta_idf[cols[0]]), word))
    keep = {w for _, w in sorted(scored, reverse=True)[:n]}
    return [w for _, w in scored if w in keep]


def _fts_rows(session: Session, index: SearchIndex, query: str) -> np.ndarray:
    """Rows the database's full-text index matches on the query's rarest words, and for CJK words (one
    token per run in the database) the rows whose metadata has them as character bigrams. Only the
    match set is used (not the backend's own rank function), so SQLite and PostgreSQL rank alike."""
    terms = informative_words(index, query)
    ids = fulltext.matching_ids(session, terms, FTS_LIMIT) if terms else []
    rows = index.rows_of(np.array(ids, np.int64)) if ids else np.zeros(0, np.int64)
    cjk = [t for t in terms if has_cjk(t)]
    if cjk and index.lexical is not None:  # the database tokenises a CJK run as one word: match its bigrams
        lex = index.lexical
        cols = lex.vocab.columns(np.array([lexical.term_ids(t)[0] for t in cjk], np.int64))
        found = lexical.column_dot(lex.meta_all, cols, np.ones(len(cols), np.float32))
        rows = np.union1d(rows, np.nonzero(found)[0][:FTS_LIMIT])
    return rows


@dataclass(frozen=True)
class SearchOptions:
    """How a search runs: channels, the fusion (default: the packaged one for the catalog's embedder),
    preview images to leave out (a ``classifier`` or ``matcher`` given here must not have learned from
    them either), and ``all_features`` (compute every channel even if the scorer does not read it: for
    fitting)."""

    channels: tuple[str, ...] = CHANNELS
    fusion: Fusion | None = None
    exclude_image_ids: tuple[int, ...] = ()
    all_features: bool = False
    classifier: PromptClassifier | None = None  # default: the catalog's saved one, if any
    matcher: PromptMatcher | None = None  # default: the catalog's saved one, if any
    prune: bool | None = None  # candidate-first (adapters_db.pruning); None: from PRUNE_FROM adapters on
    prune_config: PruneConfig = field(default_factory=PruneConfig)


_REGISTRY: FusionRegistry | None = None


def packaged_fusion(
    embedder_name: str, dense: bool, classifier: bool = False, matcher: bool = False
) -> Fusion:
    """The packaged fusion model for an embedder (the lexical one when ``dense`` is off or none fits;
    with ``classifier`` / ``matcher``, the one fitted with those channels' features if there is one)."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = FusionRegistry.load()
    return _REGISTRY.pick(embedder_name, dense, classifier, matcher)


def active_classifier(
    session: Session, catalog: Catalog, index: SearchIndex, options: SearchOptions
) -> PromptClassifier | None:
    """The prompt classifier a search uses: the given one, else the catalog's saved one (checked
    against the catalog at the up-to-date ``index``'s revision). None when
    the channel or the prompts channel is off (it learned from prompts), and when preview images are
    left out but no classifier is given (the saved one learned from them)."""
    if "classifier" not in options.channels or "prompts" not in options.channels:
        return None
    if options.classifier is not None:
        return options.classifier
    if options.exclude_image_ids or index.manifest is None:
        return None
    return load_classifier(session, catalog, index.manifest.revision)


def active_matcher(catalog: Catalog, options: SearchOptions) -> PromptMatcher | None:
    """The prompt ↔ metadata matcher a search uses: the given one, else the catalog's saved one. None
    when the channel is off, and when preview images are left out but no matcher is given (the saved
    one learned from them). Metadata-only searches use it too: it scores adapters from metadata."""
    if "matcher" not in options.channels:
        return None
    if options.matcher is not None:
        return options.matcher
    if options.exclude_image_ids:
        return None
    return load_matcher(catalog)


def _build_cache(index: SearchIndex, name: str) -> OrderedDict[Any, Any]:
    """A dict kept on the index for one build (a catalog change makes a new build, so nothing stale is
    served), in recency order for :func:`_trim`."""
    manifest = index.manifest
    key = (manifest.revision, manifest.built_at) if manifest is not None else None
    cached = getattr(index, name, None)
    if cached is None or cached[0] != key:
        cached = (key, OrderedDict())
        setattr(index, name, cached)
    return cached[1]


def _trim(cache: OrderedDict[Any, Any], size: int) -> None:
    """Drop the least recently used entries beyond ``size``."""
    while len(cache) > size:
        cache.popitem(last=False)


MATCHER_CACHE_SIZE = 4


def matcher_vectors(index: SearchIndex, matcher: PromptMatcher) -> np.ndarray:
    """The matcher's vectors of the index's adapters (cached per index build, for the last few matchers:
    an evaluation alternates between two)."""
    entries: OrderedDict[int, tuple[PromptMatcher, np.ndarray]] = _build_cache(index, "_matcher_vectors")
    entry = entries.get(id(matcher))
    if entry is None or entry[0] is not matcher:  # the entry holds its matcher, so ids are not reused
        lex = index.lexical
        assert lex is not None, "search index not built"
        entry = (matcher, matcher.adapter_vectors(lex.meta_counts, lex.vocab.hashes))
        entries[id(matcher)] = entry
        _trim(entries, MATCHER_CACHE_SIZE)
    entries.move_to_end(id(matcher))
    return entry[1]


def resolve_fusion(
    catalog: Catalog, options: SearchOptions, classifier: bool = False, matcher: bool = False
) -> Fusion:
    """The fusion a search uses."""
    if options.fusion is not None:
        return options.fusion
    return packaged_fusion(catalog.embedder.name, "dense" in options.channels, classifier, matcher)


def prepare(
    session: Session, catalog: Catalog, query: str, options: SearchOptions
) -> tuple[SearchIndex, QueryContext]:
    """Bring the index up to date and compute the per-query context (terms, vector, FTS ranks)."""
    unknown = set(options.channels) - set(CHANNELS)
    if unknown:
        raise ValueError(f"unknown channel(s) {sorted(unknown)}: use {', '.join(CHANNELS)}")
    index = catalog.search_index(session)
    assert index.lexical is not None
    # a catalog with no preview prompts at all (local files without sidecars) is the metadata-only case the
    # cold fusion was fitted on; the warm one would read prompt features it never saw constant
    use_prompts = "prompts" in options.channels and len(index.prompt_owner) > 0
    columns = index.lexical.vocab.columns(np.unique(lexical.term_ids(query)))
    ctx = QueryContext(
        text=query,
        columns=np.unique(columns),
        use_prompts=use_prompts,
        exclude_rows=index.prompt_rows_of(np.array(options.exclude_image_ids, np.int64)),
    )
    classifier = active_classifier(session, catalog, index, options)
    if classifier is not None:  # None for a query with no term it knows: then ranked as without it
        ctx.class_scores = classifier.scores_for(query, index.adapter_ids)
    matcher = active_matcher(catalog, options)
    if matcher is not None and index.size:  # likewise None for a query with no term it knows
        ctx.match_scores = matcher.similarities(query, matcher_vectors(index, matcher))
    scorer = _scorer(catalog, options, ctx)
    wants = set(scorer.features)
    if "dense" in options.channels and (options.all_features or wants & DENSE_FEATURES):
        ctx.vector = catalog.embedder.embed_texts([query])
    if "weightspace" in options.channels and any(
        channel in index.dense and index.dense[channel].size for channel in WEIGHT_FEATURES.values()
    ):
        ctx.weight_channels = True
        if ctx.vector is None:
            ctx.vector = catalog.embedder.embed_texts([query])
    if "fts" in options.channels and (options.all_features or "fts" in wants):
        ctx.fts_rows = _fts_rows(session, index, query)
    return index, ctx


def _scorer(catalog: Catalog, options: SearchOptions, ctx: QueryContext) -> Scorer:
    """The fusion's scorer for this query's mode and the learned channels it has evidence from."""
    fusion = resolve_fusion(catalog, options, ctx.class_scores is not None, ctx.match_scores is not None)
    return fusion.for_mode(ctx.use_prompts)


def score_all(
    session: Session,
    catalog: Catalog,
    query: str,
    options: SearchOptions = SearchOptions(),
    allowed: np.ndarray | None = None,
) -> tuple[SearchIndex, QueryContext, Mapping[str, np.ndarray], np.ndarray]:
    """Features of every adapter for one query and fused scores (for search and for tuning).

    The fusion scores only candidates (:func:`candidate_rows`, among the ``allowed`` rows if given);
    the others score below every candidate, all alike. A large catalog (``options.prune``) computes
    features only for the rows of :meth:`FeatureBuilder.universe`; the returned arrays still cover the
    whole catalog (0 outside those rows), each spread over it when first read (:class:`SpreadFeatures`)."""
    index, ctx = prepare(session, catalog, query, options)
    builder = feature_builder(index)
    prune = options.prune if options.prune is not None else index.size >= PRUNE_FROM
    view = builder.view(builder.universe(ctx, allowed, options.prune_config)) if prune else builder.full
    feats = builder.features(ctx, view)
    if "meta" not in options.channels:
        for name in (*META_FIELDS, "all"):
            feats[f"m_{name}"][:] = 0.0
    if "triggers" not in options.channels:
        feats["t_max"][:] = 0.0
        feats["t_frac"][:] = 0.0
    if "dense" not in options.channels:
        for name in ("d_meta", "d_prompt", "d_image"):
            feats[name][:] = 0.0
    FeatureBuilder.add_ranks(feats)
    scorer = _scorer(catalog, options, ctx)
    wanted = set(scorer.features) - {"pop", "n_prompts", "has_prompts"}
    in_view = view.take(allowed) if allowed is not None else None
    scores = fused_scores(scorer, feats, candidate_rows(feats, in_view, wanted=wanted))
    if ctx.weight_channels:
        scores = scores + textless_evidence(feats)
    if view.rows is None:
        return index, ctx, feats, scores
    below = float(scores.min()) if len(scores) else 0.0  # the rest of the catalog: below every candidate
    return index, ctx, SpreadFeatures(view, feats), view.expand(scores, below)


def candidate_rows(
    feats: dict[str, np.ndarray],
    allowed: np.ndarray | None = None,
    depth: int = CANDIDATE_DEPTH,
    wanted: Collection[str] | None = None,
) -> np.ndarray:
    """Rows worth fusing: the top ``depth`` of every base feature (of those in ``wanted`` if given;
    features outside :data:`FEATURES` always count), with a value above the feature's minimum, among
    ``allowed`` rows if given: a few hundred of the catalog, as in fitting. In a small catalog an
    adapter no channel scores above its minimum is no candidate either (the fitted fusion is not
    monotone far from its training data, and could rank it above the adapters that match)."""
    n = len(next(iter(feats.values())))
    chosen = np.zeros(n, bool)
    for name, values in feats.items():
        if n == 0:
            break
        if name.startswith("r_") or (wanted is not None and name in FEATURES and name not in wanted):
            continue
        if allowed is not None:
            values = np.where(allowed, values, -np.inf)
        # a catalog of at most ``depth`` adapters: all of them, but still only above the minimum
        top = top_rows(values, depth)
        floor = values[allowed].min() if allowed is not None and allowed.any() else values.min()
        chosen[top[values[top] > floor]] = True
    if n <= depth and not chosen.any():  # nothing matches at all: every adapter, ranked by the priors
        chosen[:] = True
    if allowed is not None:
        chosen &= allowed
    return np.nonzero(chosen)[0]


def fused_scores(scorer: Scorer, feats: dict[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
    """The scorer's scores of ``rows``; every other row gets one score below all of them."""
    n = len(next(iter(feats.values())))
    out = np.full(n, -1e9, np.float64)
    if len(rows) == 0:
        return out
    n_feats = {name: feats[name][rows] for name in scorer.features if name in feats}
    if not n_feats:
        n_feats = {"_": np.zeros(len(rows), np.float32)}
    fused = scorer.score(n_feats)
    out[:] = float(fused.min()) - 1.0
    out[rows] = fused
    return out


# features that are nonzero only where the query's own words (or a text-less adapter's weights) match
DIRECT_EVIDENCE = (
    "p_max",
    "p_doc",
    "m_all",
    "t_max",
    "fts",
    "tf_doc",
    "tf_meta",
    "tf_pmax",
    *WEIGHT_FEATURES,
)


def matches(feats: Mapping[str, np.ndarray]) -> np.ndarray:
    """Rows the query matches directly: its words in the adapter's metadata or prompts, its trigger
    phrases, or (text-less adapters) its weight-space channels; creator-level, prior and learned
    channels alone do not count. What a sorted (not by relevance) result lists."""
    n = len(next(iter(feats.values())))
    out = np.zeros(n, bool)
    for name in DIRECT_EVIDENCE:
        if name in feats:
            out |= feats[name] > 0
    return out


def matching(index: SearchIndex, ctx: QueryContext, feats: Mapping[str, np.ndarray]) -> np.ndarray:
    """:func:`matches`, exact over the whole catalog also when only a universe was featurised
    (candidate-first): rows outside it match by the exact lexical scores (a query word in the metadata,
    trigger words included, or in a prompt other than the query's own) and the full-text search, so
    that a listing of matches pages through all of them."""
    out = matches(feats)
    scores = ctx.lexical
    if scores is None:
        return out
    out |= scores["meta_tfidf"] > 0
    if ctx.use_prompts and len(index.prompt_owner):
        prompts = scores["prompts"] > 0
        prompts[ctx.exclude_rows[ctx.exclude_rows >= 0]] = False
        out[index.prompt_owner[prompts]] = True
    out[ctx.fts_rows[ctx.fts_rows >= 0]] = True  # (trigger phrases are metadata words: counted above)
    return out


def textless_evidence(feats: dict[str, np.ndarray]) -> np.ndarray:
    """``TEXTLESS_WEIGHT · max(0, d_weights, d_wsvd)``: the weight-space channels' score, added to the
    fused one (the fitted fusion never saw these features; they are nonzero only for textless adapters)."""
    n = len(next(iter(feats.values())))
    best = np.zeros(n, np.float64)
    for name in WEIGHT_FEATURES:
        if name in feats:
            best = np.maximum(best, feats[name])
    return TEXTLESS_WEIGHT * best


def search(
    session: Session,
    catalog: Catalog,
    query: str,
    k: int = 10,
    *,
    base_family: str | None = None,
    include_nsfw: bool = False,
    tags: Iterable[str] | None = None,
    licence: str | Iterable[str] | None = None,
    local_only: bool | None = None,
    kind: str | None = None,
    sort: str = "relevance",
    offset: int = 0,
    exclude_image_ids: Collection[int] = (),
    channels: Sequence[str] | None = None,
    fusion: Fusion | None = None,
    matching_only: bool = False,
) -> list[SearchHit]:
    """The ``k`` best adapters for a prompt (after ``offset``), filtered, each with why it matched;
    with ``matching_only``, only adapters the query matches (:func:`matches`: a catalog text search).

    ``sort`` other than ``relevance`` re-orders the 200 most relevant hits that match the query
    (:func:`matches`) by downloads, rating, date or name.
    ``exclude_image_ids`` leaves those preview images out of every channel (evaluation); ``channels``
    limits the channels (without ``prompts``: the metadata-only "cold" mode). ``kind`` keeps one
    adapter type (``lora``, ``locon``, …); gate checkpoints are never searched.
    """
    if sort not in SORTS:
        raise ValueError(f"unknown sort {sort!r}: use one of {', '.join(SORTS)}")
    if offset < 0:
        raise ValueError(f"offset must be 0 or more (got {offset})")
    if k <= 0:
        return []
    options = SearchOptions(
        tuple(channels) if channels is not None else CHANNELS,
        fusion,
        tuple(int(i) for i in exclude_image_ids),
    )
    if not query.strip():
        raise ValueError("empty query: type a prompt")
    index = catalog.search_index(session)
    if index.size == 0:
        return []
    mask = _allowed_mask(
        session,
        index,
        base_family=base_family,
        include_nsfw=include_nsfw,
        tags=tags,
        licence=licence,
        local_only=local_only,
        kind=kind,
    )
    index, ctx, feats, scores = score_all(session, catalog, query, options, allowed=mask)
    scores = np.where(mask, scores, -np.inf)
    if matching_only or sort != "relevance":
        scores = np.where(matching(index, ctx, feats), scores, -np.inf)
    if sort == "relevance":
        rows = _ranked_rows(scores, offset + k)
    else:  # the adapters the query matches, re-ordered
        rows = _resort(session, index, _ranked_rows(scores, max(200, offset + k)), sort)
    rows = rows[offset : offset + k]
    return _hits(session, catalog, index, ctx, feats, scores, rows, include_nsfw)


def _ranked_rows(scores: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` best rows of finite score, best first, ties in row order."""
    n = min(n, int(np.isfinite(scores).sum()))
    if n <= 0:
        return np.zeros(0, np.int64)
    top = top_rows(scores, n)
    return top[np.lexsort((top, -scores[top]))]


def _resort(session: Session, index: SearchIndex, rows: np.ndarray, sort: str) -> np.ndarray:
    ids = index.adapter_ids[rows].tolist()
    column = {
        "downloads": Adapter.download_count,
        "rating": Adapter.rating,
        "newest": Adapter.created_at,
        "name": Adapter.name,
    }[sort]
    order = column.asc() if sort == "name" else column.desc()
    ordered = session.execute(
        select(Adapter.id).where(Adapter.id.in_(ids)).order_by(order, Adapter.id)
    ).scalars()
    return index.rows_of(np.array(list(ordered), np.int64))


# ------------------------------------------------------------------------------------------ why


def _prompt_texts(session: Session, image_ids: list[int]) -> dict[int, str]:
    if not image_ids:
        return {}
    rows = session.execute(select(PreviewImage.id, PreviewImage.prompt).where(PreviewImage.id.in_(image_ids)))
    return {i: clean_prompt(p or "") for i, p in rows}


def _quote(text: str, limit: int = 80) -> str:
    flat = " ".join(text.split())
    return f'"{flat[:limit]}…"' if len(flat) > limit else f'"{flat}"'


@lru_cache(maxsize=8192)
def _words_of(text: str) -> tuple[str, ...]:
    """:func:`~adapters_db.text.words` of a name, tag or query, cached (explanations reread them)."""
    return tuple(words(text))


def _matching(values: Iterable[str], query_words: set[str]) -> list[str]:
    out = []
    for value in values:
        toks = _words_of(value)
        if toks and all(t in query_words for t in toks):
            out.append(value)
    return out


@dataclass(frozen=True)
class Evidence:
    """What one hit matched on (feature values and the matched strings), for :func:`explain`."""

    trigger_phrases: tuple[tuple[str, float], ...]
    prompt: str | None
    prompt_similarity: float
    name: str
    tags: tuple[str, ...]
    description_match: float
    dense_meta: float
    classifier_prob: float = 0.0
    matcher_rank: float = 0.0  # r_s_meta: 1 / (1 + rank / 10) in the matcher's ranking, 0 below its depth
    weight_match: float = 0.0  # max(d_weights, d_wsvd): a textless adapter found by its weights
    by_picture: bool = False  # the query is a picture (:func:`search_by_image`), not text
    picture_similarity: float = 0.0  # d_image: its closest preview picture to the query


def explain(evidence: Evidence, query: str) -> str:
    """A short reason, strongest first: trigger words, a similar prompt, name words, tags, description,
    the prompt classifier's confidence, the prompt matcher's ranking (its top three), a textless
    adapter's weight-space match.

    Trigger phrases count when specific: rarity at least 40% of the rarest possible ("pixel art" yes,
    "1girl" no, in the real catalog).
    """
    query_words = set(_words_of(query))
    reasons: list[tuple[float, str]] = []
    specific = [p for p, w in evidence.trigger_phrases if w >= 0.4]
    if specific:
        shown = ", ".join(f'"{p}"' for p in specific[:3])
        reasons.append((3.0, f"trigger word {shown}" if len(specific) == 1 else f"trigger words {shown}"))
    if evidence.prompt and evidence.prompt_similarity > 0.05:
        reasons.append((1.0 + evidence.prompt_similarity, f"similar prompt: {_quote(evidence.prompt)}"))
    name_hits = [
        w for w in dict.fromkeys(_words_of(evidence.name)) if w in query_words and (len(w) > 2 or has_cjk(w))
    ]
    if name_hits:
        reasons.append((1.2, "name: " + ", ".join(name_hits[:4])))
    tag_hits = _matching(evidence.tags, query_words)
    if tag_hits:
        reasons.append((1.1, "tag: " + ", ".join(tag_hits[:3])))
    if evidence.description_match > 0.05:
        reasons.append((0.5 + evidence.description_match, "description matches"))
    if evidence.dense_meta > 0.3:
        reasons.append((evidence.dense_meta, "similar description (embedding)"))
    if evidence.classifier_prob >= 0.2:
        prob = evidence.classifier_prob
        reasons.append((0.9 + prob, f"prompts like its own (classifier {prob:.0%})"))
    if evidence.matcher_rank >= 0.8:
        reasons.append((0.8, "described like adapters people use with such prompts (matcher)"))
    if evidence.weight_match > 0.2:
        reasons.append(
            (0.7 + evidence.weight_match, "no text of its own; its weights match the prompt (weight space)")
        )
    if evidence.by_picture and evidence.picture_similarity > 0:
        sim = evidence.picture_similarity
        reasons.append((2.0 + sim, f"a preview picture like yours (similarity {sim:.2f})"))
    elif evidence.by_picture and evidence.prompt:
        reasons.append((0.6, f"a prompt that reads like the picture: {_quote(evidence.prompt)}"))
    if not reasons and evidence.trigger_phrases:
        reasons.append((0.1, f'trigger word "{evidence.trigger_phrases[0][0]}"'))
    reasons.sort(key=lambda r: -r[0])
    fallback = "close to the picture (embedding)" if evidence.by_picture else "popular adapter"
    return "; ".join(text for _, text in reasons[:2]) or fallback


def _best_prompts(
    session: Session, index: SearchIndex, ctx: QueryContext, rows: np.ndarray
) -> dict[int, str]:
    builder = feature_builder(index)
    chosen: dict[int, int] = {}
    for row in rows.tolist():
        best = builder.best_prompt_row(ctx, row)
        if best >= 0:
            chosen[row] = int(index.prompt_image_ids[best])
        elif row in ctx.best_dense_prompt:
            chosen[row] = ctx.best_dense_prompt[row][1]
    texts = _prompt_texts(session, list(chosen.values()))
    return {row: texts[i] for row, i in chosen.items() if i in texts}


RECORD_CACHE_SIZE = 4096


def _summaries(
    session: Session, catalog: Catalog, index: SearchIndex, ids: list[int], max_nsfw: int
) -> dict[int, AdapterRecord]:
    """Summary records of hits, cached per index build (:func:`_build_cache`); the cache keeps the
    ``RECORD_CACHE_SIZE`` most recently used."""
    cache: OrderedDict[tuple[int, int], AdapterRecord] = _build_cache(index, "_record_cache")
    missing = [i for i in ids if (i, max_nsfw) not in cache]
    if missing:
        for adapter_id, record in get_adapters(session, catalog, missing, max_nsfw=max_nsfw).items():
            cache[(adapter_id, max_nsfw)] = record
    out = {}
    for i in ids:
        record = cache.get((i, max_nsfw))
        if record is not None:
            cache.move_to_end((i, max_nsfw))
            out[i] = record
    _trim(cache, RECORD_CACHE_SIZE)
    return out


def _hits(
    session: Session,
    catalog: Catalog,
    index: SearchIndex,
    ctx: QueryContext,
    feats: Mapping[str, np.ndarray],
    scores: np.ndarray,
    rows: np.ndarray,
    include_nsfw: bool,
) -> list[SearchHit]:
    ids = index.adapter_ids[rows].tolist()
    records = _summaries(session, catalog, index, ids, max_nsfw=3 if include_nsfw else 0)
    prompts = _best_prompts(session, index, ctx, rows)
    weight = index.triggers.weight if index.triggers is not None else {}
    rarest = math.log1p((index.size - 0.5) / 1.5) or 1.0
    found: dict[int, list[str]] = {}  # hit row → the query's trigger phrases it has, in query order
    for phrase, phrase_rows in ctx.trigger_hits.items():
        for row in rows[np.isin(rows, phrase_rows)].tolist():
            found.setdefault(row, []).append(phrase)
    hits, values = [], features_at(feats, rows)
    for rank, (row, adapter_id) in enumerate(zip(rows.tolist(), ids, strict=True)):
        at = {name: v[rank] for name, v in values.items()}
        record = records.get(adapter_id)
        if record is None:
            continue
        phrases = sorted(((p, weight.get(p, 0.0) / rarest) for p in found.get(row, [])), key=lambda x: -x[1])
        evidence = Evidence(
            trigger_phrases=tuple(phrases),
            prompt=prompts.get(row),
            prompt_similarity=float(max(at["p_max"], at["d_prompt"] - 0.5)),
            name=record.name,
            tags=record.tags,
            description_match=float(at["m_description"]),
            dense_meta=float(at["d_meta"]),
            classifier_prob=float(np.exp(at["k_lp"])) if ctx.class_scores is not None else 0.0,
            matcher_rank=float(at["r_s_meta"]) if ctx.match_scores is not None else 0.0,
            weight_match=max((float(at[f]) for f in WEIGHT_FEATURES if f in at), default=0.0),
            by_picture=not ctx.text,
            picture_similarity=float(at["d_image"]) if not ctx.text else 0.0,
        )
        shown = (*FEATURES, *(f for f in WEIGHT_FEATURES if f in at))
        channels = {name: round(float(at[name]), 4) for name in shown}
        hits.append(
            SearchHit(
                adapter=record,
                score=float(scores[row]),
                why=explain(evidence, ctx.text),
                channels=channels,
                rank=rank + 1,
            )
        )
    return hits


IMAGE_SCORER = LinearScorer({"d_image": 2.0, "d_prompt": 1.0, "d_meta": 1.0, "pop": 0.02})


def search_by_image(
    session: Session,
    catalog: Catalog,
    image: object,
    k: int = 10,
    *,
    base_family: str | None = None,
    include_nsfw: bool = False,
    tags: Iterable[str] | None = None,
    licence: str | Iterable[str] | None = None,
    local_only: bool | None = None,
    kind: str | None = None,
    scorer: Scorer = IMAGE_SCORER,
) -> list[SearchHit]:
    """Adapters whose preview images, prompts or descriptions are closest to a picture (open_clip's
    image tower, in the same space as its text tower; raises ``ValueError`` with a text-only embedder)."""
    embedder = catalog.embedder
    if not embedder.supports_images:
        raise ValueError(
            f"the catalog's embedder {embedder.name} cannot embed images; use an open_clip embedder"
        )
    index = catalog.search_index(session)
    ctx = QueryContext(
        text="",
        columns=np.zeros(0, np.int64),
        use_prompts=True,
        exclude_rows=np.zeros(0, np.int64),
        vector=embedder.embed_images([image]),
    )
    feats = {name: np.zeros(index.size, np.float32) for name in FEATURES}
    feats["pop"] = index.log_downloads.astype(np.float32)
    feature_builder(index).dense_features(ctx, feats)
    scores = scorer.score(feats)
    mask = _allowed_mask(
        session,
        index,
        base_family=base_family,
        include_nsfw=include_nsfw,
        tags=tags,
        licence=licence,
        local_only=local_only,
        kind=kind,
    )
    rows = _ranked_rows(np.where(mask, scores, -np.inf), k)
    return _hits(session, catalog, index, ctx, feats, scores, rows, include_nsfw)
