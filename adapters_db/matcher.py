"""Prompt ↔ metadata matcher: scores any adapter from its metadata alone, by what people write in
prompts when they use adapters described like it.

A two-tower bag-of-n-grams model (StarSpace, Wu et al. 2017, "StarSpace: Embed All The Things!"): a
prompt is the mean of learned vectors of its terms; an adapter is the log-tf weighted sum of learned
vectors of its metadata terms (name, trigger words, tags, file names, description); their cosine is the
score. It is trained on (preview prompt → adapter) pairs of the catalog, each prompt also with the
adapter's trigger words taken out, with a softmax over the gold adapter and sampled others.

Unlike the prompt classifier (one output per adapter it was trained on) the adapter side is computed
from metadata, so it scores adapters it never saw: a LoRA imported without preview pictures (a new
upload, the cold start) is found through what prompts for similarly described LoRAs say — "chinese
clothes" for a "Hanfu" LoRA, a character's looks for her name. It is one more channel of both the warm
and the metadata-only ranking (``s_meta`` and its rank). Terms are the lexical channels' hashed word
1–2-grams (:func:`adapters_db.lexical.term_ids`), so the adapter side reads the search index's
metadata count matrix. ``python -m studio catalog matcher`` trains it and saves it beside the index.

Inference is plain NumPy; training needs torch (sparse embedding gradients, minutes on CPU for the
7,955-adapter Civitai catalog).
"""

from __future__ import annotations

import json
import random
from collections.abc import Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from adapters_db import lexical
from adapters_db.channel_files import load_tagged, save_tagged
from adapters_db.examples import bag_inputs, token_dropout, training_examples
from adapters_db.lexical import Vocabulary
from adapters_db.search_index import META_FIELDS, CatalogRows, positions_in

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from adapters_db.catalog import Catalog

FILE_NAME = "matcher.safetensors"
FORMAT = "adapter-studio-prompt-matcher"


@dataclass(frozen=True)
class MatcherConfig:
    """Size and training schedule (defaults measured on the Civitai dump, see benchmarks/retrieval.py)."""

    dim: int = 128
    epochs: int = 5
    token_dropout: float = 0.3
    lr: float = 0.01
    batch_size: int = 256
    negatives: int = 1024  # adapters sampled into each batch's softmax besides the batch's own
    min_count: int = 1  # terms in fewer training texts (prompt side) or adapters (metadata side) dropped
    seed: int = 0


def metadata_counts(rows: CatalogRows) -> sp.csr_matrix:
    """Hashed term counts of each adapter's metadata fields, summed (the search index's ``meta_counts``
    before its columns are made compact)."""
    total = sp.csr_matrix((len(rows.adapter_ids), lexical.N_BUCKETS), dtype=np.float32)
    for name in META_FIELDS:
        total = total + lexical.count_matrix(rows.fields[name])
    return total.tocsr()


def log_tf(counts: sp.csr_matrix) -> sp.csr_matrix:
    """Term counts damped to log(1 + tf) (Salton & Buckley 1988's logarithmic term frequency)."""
    out = counts.tocsr(copy=True).astype(np.float32)
    out.data = np.log1p(out.data)
    return out


def l2_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class PromptMatcher:
    """Term embeddings of the prompt tower and of the metadata tower (float16), by hashed term."""

    def __init__(
        self,
        query_vocab: Vocabulary,
        query_embeddings: np.ndarray,
        meta_vocab: Vocabulary,
        meta_embeddings: np.ndarray,
        config: MatcherConfig = MatcherConfig(),
    ) -> None:
        if query_embeddings.shape != (len(query_vocab), config.dim) or meta_embeddings.shape != (
            len(meta_vocab),
            config.dim,
        ):
            raise ValueError("matcher arrays do not fit together")
        self.query_vocab = query_vocab
        self.query_embeddings = query_embeddings.astype(np.float16, copy=False)
        self.meta_vocab = meta_vocab
        self.meta_embeddings = meta_embeddings.astype(np.float16, copy=False)
        self.config = config

    def query_vector(self, text: str) -> np.ndarray | None:
        """The unit prompt vector of a text (None: no term it knows)."""
        cols = self.query_vocab.columns(lexical.term_ids(text))
        if len(cols) == 0:
            return None
        return l2_rows(self.query_embeddings[cols].astype(np.float32).mean(axis=0, keepdims=True))[0]

    def adapter_vectors(self, meta_counts: sp.csr_matrix, hashes: np.ndarray) -> np.ndarray:
        """Unit adapter vectors of a metadata count matrix whose column ``i`` is term hash ``hashes[i]``
        (a search index's ``meta_counts`` and vocabulary); adapters with no known term get zeros."""
        pos = positions_in(self.meta_vocab.hashes, np.asarray(hashes, np.int64))
        cols = np.nonzero(pos >= 0)[0]
        weights = log_tf(sp.csr_matrix(meta_counts))[:, cols]
        return l2_rows(np.asarray(weights @ self.meta_embeddings[pos[cols]].astype(np.float32)))

    def similarities(self, text: str, adapter_vectors: np.ndarray) -> np.ndarray | None:
        """Cosine of the prompt to each adapter vector, adapters without a vector at the lowest value
        (None when the prompt has no term the matcher knows)."""
        query = self.query_vector(text)
        if query is None:
            return None
        scores = adapter_vectors @ query
        empty = ~adapter_vectors.any(axis=1)
        if empty.any() and not empty.all():
            scores[empty] = scores[~empty].min()
        return scores.astype(np.float32)

    def save(self, path: Path) -> Path:
        """Write as one safetensors file (hashed vocabularies as arrays, config in the metadata),
        atomically."""
        tensors = {
            "query_hashes": self.query_vocab.hashes,
            "query_embeddings": self.query_embeddings,
            "meta_hashes": self.meta_vocab.hashes,
            "meta_embeddings": self.meta_embeddings,
        }
        return save_tagged(path, tensors, FORMAT, {"config": json.dumps(asdict(self.config))})

    @classmethod
    def load(cls, path: Path) -> PromptMatcher:
        """Inverse of :meth:`save` (safetensors only; nothing is unpickled)."""
        arrays, meta = load_tagged(path, FORMAT, "prompt matcher")
        return cls(
            Vocabulary(arrays["query_hashes"]),
            arrays["query_embeddings"],
            Vocabulary(arrays["meta_hashes"]),
            arrays["meta_embeddings"],
            MatcherConfig(**json.loads(meta["config"])),
        )


def _frequent(hashed: list[np.ndarray], min_count: int) -> Vocabulary:
    """Hashes present in at least ``min_count`` of the given term lists."""
    if not hashed:
        return Vocabulary(np.zeros(0, np.int64))
    values, counts = np.unique(np.concatenate([np.unique(h) for h in hashed]), return_counts=True)
    return Vocabulary(values[counts >= min_count])


def train_matcher(
    rows: CatalogRows,
    config: MatcherConfig = MatcherConfig(),
    exclude_image_ids: Collection[int] = (),
    adapters: np.ndarray | None = None,
    show_progress: bool = False,
) -> PromptMatcher:
    """Train on a catalog's preview prompts (``exclude_image_ids``: images never to learn from;
    ``adapters``: a boolean mask of the adapters whose prompts to learn from — both for evaluation);
    softmax over each batch's adapters and ``negatives`` sampled ones, SparseAdam on both towers."""
    import torch
    from tqdm import tqdm

    texts, labels = training_examples(rows, exclude_image_ids, metadata=False, adapters=adapters)
    hashed = [lexical.term_ids(t) for t in texts]
    query_vocab = _frequent(hashed, config.min_count)
    examples = [(query_vocab.columns(h), y) for h, y in zip(hashed, labels, strict=True)]
    examples = [(x, y) for x, y in examples if len(x)]
    classes = np.unique([y for _, y in examples]).astype(np.int64)
    if len(examples) == 0 or len(classes) < 2:
        raise ValueError("nothing to train the prompt matcher on: it needs preview prompts of two adapters")
    counts = metadata_counts(rows)[classes]
    meta_vocab = _frequent(np.split(counts.indices.astype(np.int64), counts.indptr[1:-1]), config.min_count)
    keep = np.isin(counts.indices, meta_vocab.hashes)
    counts = sp.csr_matrix((counts.data * keep, counts.indices, counts.indptr), shape=counts.shape)
    counts.eliminate_zeros()
    docs = log_tf(meta_vocab.remap(counts))
    class_of = {int(r): i for i, r in enumerate(classes.tolist())}

    rng = random.Random(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    q_emb = torch.nn.EmbeddingBag(len(query_vocab), config.dim, mode="mean", sparse=True)
    m_emb = torch.nn.EmbeddingBag(len(meta_vocab), config.dim, mode="sum", sparse=True)
    with torch.no_grad():
        q_emb.weight.normal_(0.0, 0.1, generator=gen)
        m_emb.weight.normal_(0.0, 0.1, generator=gen)
    scale = torch.nn.Parameter(torch.tensor(10.0))
    opt_emb = torch.optim.SparseAdam([q_emb.weight, m_emb.weight], lr=config.lr)
    opt_scale = torch.optim.Adam([scale], lr=0.01)
    steps = config.epochs * -(-len(examples) // config.batch_size)
    bar = tqdm(total=steps, desc="prompt matcher", unit="batch", disable=not show_progress)
    for _ in range(config.epochs):
        rng.shuffle(examples)
        for start in range(0, len(examples), config.batch_size):
            chunk = examples[start : start + config.batch_size]
            kept = [token_dropout(x, config.token_dropout, rng) for x, _ in chunk]
            golds = [class_of[y] for _, y in chunk]
            negatives = rng.sample(range(len(classes)), min(config.negatives, len(classes)))
            pool = sorted(set(golds) | set(negatives))
            q = torch.nn.functional.normalize(q_emb(*bag_inputs(kept)), dim=-1)
            d = m_emb(*_weighted_bag(docs[pool]))
            d = torch.nn.functional.normalize(d, dim=-1)
            where = {c: i for i, c in enumerate(pool)}
            target = torch.tensor([where[c] for c in golds])
            loss = torch.nn.functional.cross_entropy(scale * q @ d.T, target)
            opt_emb.zero_grad()
            opt_scale.zero_grad()
            loss.backward()
            opt_emb.step()
            opt_scale.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    return PromptMatcher(
        query_vocab,
        q_emb.weight.detach().numpy().copy(),
        meta_vocab,
        m_emb.weight.detach().numpy().copy(),
        config,
    )


def _weighted_bag(rows: sp.csr_matrix):  # type: ignore[no-untyped-def]
    """EmbeddingBag inputs (ids, offsets, per-sample weights) of the rows of a weighted term matrix."""
    import torch

    return (
        torch.from_numpy(rows.indices.astype(np.int64)),
        torch.from_numpy(rows.indptr[:-1].astype(np.int64)),
        torch.from_numpy(rows.data.astype(np.float32)),
    )


def matcher_path(catalog: Catalog) -> Path:
    """Where a catalog's matcher lives (beside its search indexes)."""
    return Path(catalog.index_dir) / FILE_NAME


def build_matcher(
    session: Session, catalog: Catalog, config: MatcherConfig = MatcherConfig(), show_progress: bool = False
) -> PromptMatcher:
    """Train on the catalog as it is now and save it beside the search index."""
    from adapters_db.search_index import read_catalog

    matcher = train_matcher(read_catalog(session), config, show_progress=show_progress)
    path = matcher_path(catalog)
    path.parent.mkdir(parents=True, exist_ok=True)
    matcher.save(path)
    _LOADED.pop(str(path), None)
    return matcher


_LOADED: dict[str, tuple[tuple[int, int, int], PromptMatcher]] = {}


def load_matcher(catalog: Catalog) -> PromptMatcher | None:
    """The catalog's saved matcher, or None without one (cached while its file is unchanged). It needs
    no check against the catalog: it scores adapters from their metadata, whatever was added since."""
    path = matcher_path(catalog)
    try:
        st = path.stat()
    except OSError:
        return None
    key = (st.st_mtime_ns, st.st_size, st.st_ino)
    cached = _LOADED.get(str(path))
    if cached is None or cached[0] != key:
        cached = (key, PromptMatcher.load(path))
        _LOADED[str(path)] = cached
    return cached[1]
