"""(text, adapter) training examples of the learned retrieval channels, read from a catalog's rows.

Each adapter's metadata text and each preview prompt people used with it, plus a copy of each with the
adapter's trigger words taken out (where that changes it), so a model learns what else in a prompt
points to an adapter. Shared by the prompt classifier (``adapters_db.classifier``) and the prompt ↔
metadata matcher (``adapters_db.matcher``), with the batching helpers both train with.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence

import numpy as np

from adapters_db.search_index import META_FIELDS, CatalogRows
from adapters_db.text import remove_phrases


def training_examples(
    rows: CatalogRows,
    exclude_image_ids: Collection[int] = (),
    meta_chars: int = 2000,
    *,
    metadata: bool = True,
    adapters: np.ndarray | None = None,
) -> tuple[list[str], list[int]]:
    """(text, adapter row) pairs: each adapter's metadata (with ``metadata``) and each preview prompt
    (minus excluded images), plus a copy of each with the adapter's trigger words taken out where that
    changes it; ``adapters`` (a boolean mask over rows) keeps only those adapters' examples."""
    excluded = np.isin(rows.prompt_image_ids, np.fromiter(exclude_image_ids, np.int64))
    keep = np.ones(len(rows.adapter_ids), bool) if adapters is None else np.asarray(adapters, bool)
    texts: list[str] = []
    labels: list[int] = []

    def add(text: str, row: int) -> None:
        if not text.strip():
            return
        texts.append(text)
        labels.append(row)
        triggers = rows.triggers[row]
        if triggers:
            stripped = remove_phrases(text, triggers)
            if stripped != text and stripped.strip():
                texts.append(stripped)
                labels.append(row)

    if metadata:
        for row in np.nonzero(keep)[0].tolist():
            add("\n".join(rows.fields[f][row] for f in META_FIELDS)[:meta_chars], row)
    for prompt, owner, skip in zip(rows.prompts, rows.prompt_owner.tolist(), excluded.tolist(), strict=True):
        if not skip and keep[owner]:
            add(prompt, owner)
    return texts, labels


def token_dropout(ids: Sequence[int], rate: float, rng: random.Random) -> list[int]:
    """Each id dropped with probability ``rate``, at least one kept (fastText-style word dropout)."""
    kept = [i for i in ids if rng.random() >= rate]
    return kept or [ids[rng.randrange(len(ids))]]


def bag_inputs(ids: Sequence[Sequence[int]]):  # type: ignore[no-untyped-def]
    """``torch.nn.EmbeddingBag`` inputs (flat ids, offsets) of a batch of id lists."""
    import torch

    offsets = np.concatenate([[0], np.cumsum([len(x) for x in ids[:-1]])]).astype(np.int64)
    return torch.from_numpy(np.concatenate(ids).astype(np.int64)), torch.from_numpy(offsets)
