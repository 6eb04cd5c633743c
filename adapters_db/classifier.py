"""Prompt → adapter classifier: a bag of n-grams trained on the prompts people used with each adapter.

fastText-style (Joulin et al. 2017, "Bag of Tricks for Efficient Text Classification"): the mean of
learned embeddings of a text's index terms (words and in-segment word bigrams, as every lexical
channel) → a linear layer → softmax over the catalog's adapters. Trained on each adapter's preview
prompts and its metadata text, each also with the adapter's trigger words removed, so it learns what
else in a prompt points to an adapter (the character's hair colour, a creator's prompt template).
It is one more channel of the warm ranking (``k_lp`` and its rank), derived from the catalog like the
search index: ``python -m studio catalog classifier`` trains and saves it beside the index; search
uses it when it is there. Adapters added after training simply get no evidence from it.

Inference is plain NumPy; training needs torch (sparse embedding gradients, minutes on CPU for
the 7,955-adapter Civitai catalog).
"""

from __future__ import annotations

import json
import random
from collections.abc import Collection, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy.orm import Session

from adapters_db.channel_files import load_tagged, save_tagged
from adapters_db.examples import bag_inputs, token_dropout, training_examples
from adapters_db.search_index import CatalogRows, positions_in
from adapters_db.text import terms

if TYPE_CHECKING:
    from adapters_db.catalog import Catalog

FILE_NAME = "classifier.safetensors"
FORMAT = "adapter-studio-prompt-classifier"


@dataclass(frozen=True)
class ClassifierConfig:
    """Size and training schedule (defaults measured on the Civitai dump, see benchmarks/retrieval.py)."""

    dim: int = 256
    epochs: int = 6
    token_dropout: float = 0.3
    lr: float = 0.01
    batch_size: int = 256
    seed: int = 0
    meta_chars: int = 2000


class PromptClassifier:
    """Term embeddings (mean-pooled; stored in float16) → linear layer → log-probabilities over adapter
    ids."""

    def __init__(
        self,
        vocab: dict[str, int],
        embeddings: np.ndarray,
        weight: np.ndarray,
        bias: np.ndarray,
        adapter_ids: np.ndarray,
        config: ClassifierConfig = ClassifierConfig(),
        identity: list[str] | None = None,
    ) -> None:
        if embeddings.shape[0] != len(vocab) or weight.shape != (len(adapter_ids), embeddings.shape[1]):
            raise ValueError("classifier arrays do not fit together")
        self.vocab = vocab
        self.embeddings = embeddings.astype(np.float16, copy=False)  # half the file and memory
        self.weight = weight.astype(np.float32, copy=False)
        self.bias = bias.astype(np.float32, copy=False)
        self.adapter_ids = np.asarray(adapter_ids, np.int64)
        self.config = config
        # each class's adapter as it was in training (see _identities): an id reused by a later
        # import is another adapter
        self.identity = identity
        self.valid = np.ones(len(self.adapter_ids), bool)

    def check_against(self, current: dict[int, str]) -> None:
        """Keep only classes whose adapter still exists with the identity it had in training."""
        if self.identity is None:
            return
        pairs = zip(self.adapter_ids.tolist(), self.identity, strict=True)
        self.valid = np.array([current.get(int(a)) == ident for a, ident in pairs], dtype=bool)

    def term_ids(self, text: str) -> np.ndarray:
        """Vocabulary ids of a text's index terms (unknown terms dropped)."""
        ids = [self.vocab.get(t) for t in terms(text)]
        return np.array([i for i in ids if i is not None], np.int64)

    def log_probs(self, text: str) -> np.ndarray | None:
        """log p(adapter | text) for every adapter of :attr:`adapter_ids` (None: no known term)."""
        ids = self.term_ids(text)
        if len(ids) == 0:
            return None
        logits = self.weight @ self.embeddings[ids].astype(np.float32).mean(axis=0) + self.bias
        logits -= logits.max()
        return logits - np.log(np.exp(logits).sum())

    def scores_for(self, text: str, adapter_ids: np.ndarray) -> np.ndarray | None:
        """log p per given adapter id, ids the classifier does not know (or no longer: see
        :meth:`check_against`) at the lowest value it gives; None when no term of the text is known."""
        lp = self.log_probs(text)
        if lp is None:
            return None
        pos = positions_in(self.adapter_ids, adapter_ids)
        known = pos >= 0
        known[known] = self.valid[pos[known]]
        out = np.full(len(adapter_ids), float(lp.min()), np.float32)
        out[known] = lp[pos[known]]
        return out

    def save(self, path: Path) -> Path:
        """Write as one safetensors file (vocabulary and config in its metadata), atomically."""
        tensors = {
            "embeddings": self.embeddings,
            "weight": self.weight,
            "bias": self.bias,
            "adapter_ids": self.adapter_ids,
        }
        meta = {
            "config": json.dumps(asdict(self.config)),
            "vocab": json.dumps(sorted(self.vocab, key=self.vocab.__getitem__), ensure_ascii=False),
        }
        if self.identity is not None:
            meta["identity"] = json.dumps(self.identity, ensure_ascii=False)
        return save_tagged(path, tensors, FORMAT, meta)

    @classmethod
    def load(cls, path: Path) -> PromptClassifier:
        """Inverse of :meth:`save` (safetensors only; nothing is unpickled)."""
        arrays, meta = load_tagged(path, FORMAT, "prompt classifier")
        terms_ = json.loads(meta["vocab"])
        return cls(
            {t: i for i, t in enumerate(terms_)},
            arrays["embeddings"],
            arrays["weight"],
            arrays["bias"],
            arrays["adapter_ids"],
            ClassifierConfig(**json.loads(meta["config"])),
            json.loads(meta["identity"]) if "identity" in meta else None,
        )


def _batches(
    data: list[tuple[list[int], int]], cfg: ClassifierConfig, rng: random.Random
) -> Iterator[tuple[list[list[int]], list[int]]]:
    """Shuffled batches with token dropout (at least one term of each text kept)."""
    rng.shuffle(data)
    for start in range(0, len(data), cfg.batch_size):
        chunk = data[start : start + cfg.batch_size]
        kept = [token_dropout(x, cfg.token_dropout, rng) for x, _ in chunk]
        yield kept, [y for _, y in chunk]


def train_classifier(
    rows: CatalogRows,
    config: ClassifierConfig = ClassifierConfig(),
    exclude_image_ids: Collection[int] = (),
    show_progress: bool = False,
) -> PromptClassifier:
    """Train on a catalog's rows (``exclude_image_ids``: preview images never to learn from, for
    evaluation); softmax cross-entropy, SparseAdam on the embeddings, Adam on the output layer."""
    import torch
    from tqdm import tqdm

    texts, labels = training_examples(rows, exclude_image_ids, config.meta_chars)
    vocab: dict[str, int] = {}
    data = []
    for text, label in zip(texts, labels, strict=True):
        ids = [vocab.setdefault(t, len(vocab)) for t in terms(text)]
        if ids:
            data.append((ids, label))
    n_classes = len(rows.adapter_ids)
    if not data or n_classes == 0:
        raise ValueError("nothing to train the prompt classifier on: the catalog has no searchable text")
    rng = random.Random(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    emb = torch.nn.EmbeddingBag(len(vocab), config.dim, mode="mean", sparse=True)
    with torch.no_grad():
        emb.weight.normal_(0.0, 0.1, generator=gen)
    out = torch.nn.Linear(config.dim, n_classes)
    with torch.no_grad():
        bound = 1.0 / config.dim**0.5
        out.weight.uniform_(-bound, bound, generator=gen)
        out.bias.zero_()
    opt_emb = torch.optim.SparseAdam(list(emb.parameters()), lr=config.lr)
    opt_out = torch.optim.Adam(out.parameters(), lr=config.lr)
    steps = config.epochs * -(-len(data) // config.batch_size)
    bar = tqdm(total=steps, desc="prompt classifier", unit="batch", disable=not show_progress)
    for _ in range(config.epochs):
        for kept, ys in _batches(data, config, rng):
            loss = torch.nn.functional.cross_entropy(out(emb(*bag_inputs(kept))), torch.tensor(ys))
            opt_emb.zero_grad()
            opt_out.zero_grad()
            loss.backward()
            opt_emb.step()
            opt_out.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    return PromptClassifier(
        vocab,
        emb.weight.detach().numpy().copy(),
        out.weight.detach().numpy().copy(),
        out.bias.detach().numpy().copy(),
        rows.adapter_ids.copy(),
        config,
    )


def classifier_path(catalog: Catalog) -> Path:
    """Where a catalog's classifier lives (beside its search indexes)."""
    return Path(catalog.index_dir) / FILE_NAME


def build_classifier(
    session: Session,
    catalog: Catalog,
    config: ClassifierConfig = ClassifierConfig(),
    show_progress: bool = False,
) -> PromptClassifier:
    """Train on the catalog as it is now and save it beside the search index."""
    from adapters_db.search_index import read_catalog

    classifier = train_classifier(read_catalog(session), config, show_progress=show_progress)
    current = _identities(session)
    classifier.identity = [current[int(a)] for a in classifier.adapter_ids.tolist()]
    path = classifier_path(catalog)
    path.parent.mkdir(parents=True, exist_ok=True)
    classifier.save(path)
    _LOADED.pop(str(path), None)
    return classifier


def _identities(session: Session) -> dict[int, str]:
    """Adapter id → "creation time|Civitai id|name", what a classifier class is checked against."""
    from sqlalchemy import select

    from adapters_db.models import Adapter

    rows = session.execute(select(Adapter.id, Adapter.created_at, Adapter.civitai_model_id, Adapter.name))
    return {int(i): f"{c.isoformat() if c else ''}|{m or ''}|{n}" for i, c, m, n in rows}


_LOADED: dict[str, tuple[tuple[int, int, int, int], PromptClassifier]] = {}


def load_classifier(session: Session, catalog: Catalog, revision: int) -> PromptClassifier | None:
    """The catalog's saved classifier, or None without one. Cached while its file and the catalog
    ``revision`` (the caller's, e.g. its up-to-date search index's) are unchanged; classes of adapters
    deleted since training (or whose id an import reused) are switched off."""
    path = classifier_path(catalog)
    try:
        st = path.stat()
    except OSError:
        return None
    key = (st.st_mtime_ns, st.st_size, st.st_ino, revision)
    cached = _LOADED.get(str(path))
    if cached is None or cached[0] != key:
        same_file = cached is not None and cached[0][:3] == key[:3]
        classifier = cached[1] if cached is not None and same_file else PromptClassifier.load(path)
        classifier.check_against(_identities(session))
        cached = (key, classifier)
        _LOADED[str(path)] = cached
    return cached[1]
