"""Candidate-first search for large catalogs: features and fusion for the few thousand adapters a
query can rank high instead of the whole catalog.

Every lexical channel is scored exactly over the whole catalog first (``FeatureBuilder.lexical_scores``:
a walk over the query terms' posting lists, whose cost is their length, not the catalog's size). The
universe is the union of each channel's best rows — every exact lexical channel, the trigger and
full-text matches, the creators of the best prompt matches, the dense and learned channels' nearest
rows; with a filter, each also among the allowed rows, and the allowed adapters of the best
creator-level evidence — and the features of :data:`adapters_db.retrieval.FEATURES` are then computed
for the universe only (the creator-level maxima over the whole catalog). Since ``lexical_rows`` is
above the rank depth of the fusion, every feature of a universe row, rank features included, is the
exhaustive search's; what can differ is only a row that no channel puts near its top. The agreement
with the exhaustive search is tested on a real catalog slice and measured at 100,000 adapters in
``benchmarks/catalog_scale.py``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

PRUNE_FROM = 30_000  # catalogs from this many adapters search candidate-first


@dataclass(frozen=True)
class PruneConfig:
    """How many rows each channel adds to the universe (``lexical_rows`` must stay above the fusion's
    rank depth for the lexical rank features to equal the exhaustive search's)."""

    lexical_rows: int = 250
    other_rows: int = 200
    trigger_rows: int = 500
    creator_rows: int = 500


def top_rows(values: np.ndarray, n: int) -> np.ndarray:
    """Positions of the ``n`` highest values (all if there are no more than ``n``), ties at the cut taken
    in array order, so that any subset of rows holding them picks the same ones. Where most values
    are the lowest one (a channel's zeros over a whole catalog), only the others are partitioned:
    np.partition slows down a hundredfold on an array that is mostly one value."""
    if len(values) <= n:
        return np.arange(len(values))
    lowest = values.min()
    above_lowest = values > lowest
    n_above = int(np.count_nonzero(above_lowest))
    if n_above <= n:
        return np.concatenate([np.flatnonzero(above_lowest), np.flatnonzero(~above_lowest)[: n - n_above]])
    if 2 * n_above < len(values):
        kept = values[above_lowest]
        cut = np.partition(kept, len(kept) - n)[len(kept) - n]
    else:
        cut = np.partition(values, len(values) - n)[len(values) - n]
    above = np.flatnonzero(values > cut)
    return np.concatenate([above, np.flatnonzero(values == cut)[: n - len(above)]])


def candidates(values: np.ndarray, n: int, mask: np.ndarray | None = None) -> np.ndarray:
    """Positions (in array order) of the positive values (among ``mask`` if given) that hold the ``n``
    highest of them: without a mask, only those at or above the ``n``-th highest of a strided sample,
    a lower bound of the ``n``-th highest of all (a sample's ``n`` best are ``n`` values of the array),
    so later passes touch a few thousand values instead of every positive one."""
    if mask is not None:
        return np.flatnonzero((values > 0) & mask)
    # a stride s samples len/s values, and about n·s values pass the floor: s = √(len/n) balances them
    stride = int(np.sqrt(len(values) / n)) if n > 0 else 0
    if stride > 1:
        sample = values[::stride]
        sample = sample[sample > 0]  # (np.partition slows down a hundredfold on an array of many zeros)
        if len(sample) >= n:  # the floor is positive: the values at or above it are positive ones
            return np.flatnonzero(values >= np.partition(sample, len(sample) - n)[len(sample) - n])
    return np.flatnonzero(values > 0)


def best(values: np.ndarray, n: int, mask: np.ndarray | None = None) -> np.ndarray:
    """Positions of the ``n`` highest positive values (among ``mask`` if given), best first (ties in
    array order)."""
    positions = candidates(values, n, mask)
    top = positions[top_rows(values[positions], n)]
    return top[np.lexsort((top, -values[top]))]


def best_owners(values: np.ndarray, owners: np.ndarray, n: int, mask: np.ndarray | None = None) -> np.ndarray:
    """The ``n`` owners with the highest positive per-item value (an owner's value: the best of its items),
    best first, found from the best items without a reduction over all of them (among items with
    ``mask`` if given; ties in item order)."""
    k = 2 * n  # owners have a few items each: twice as many items usually hold n owners
    while True:
        positions = candidates(values, k, mask)
        top = positions[top_rows(values[positions], k)]
        if len(np.unique(owners[top])) >= n or len(top) < k:  # (fewer than k: every positive item taken)
            break
        k *= 2
    order = top[np.lexsort((top, -values[top]))]
    first = np.sort(np.unique(owners[order], return_index=True)[1])  # each owner at its best item
    return owners[order[first[:n]]]


def slice_positions(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Positions of the slices ``[starts[i], starts[i] + lengths[i])`` of an array, concatenated
    (the CSR-style gather of grouped rows, without a Python loop)."""
    offsets = np.cumsum(lengths) - lengths  # where each slice begins in the result
    return np.arange(int(lengths.sum())) + np.repeat(starts - offsets, lengths)


def group_order(keys: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions sorted by key (array order within a key) and each key's start in them (``n_groups + 1``
    bounds: group ``g`` is ``order[starts[g]:starts[g + 1]]``)."""
    counts = np.bincount(keys, minlength=n_groups)
    return np.argsort(keys, kind="stable"), np.concatenate([[0], np.cumsum(counts)])


def group_max(values: np.ndarray, order: np.ndarray, starts: np.ndarray, empty: float) -> np.ndarray:
    """Per group of :func:`group_order`, the largest of its values (``empty`` for a group without any)."""
    out = np.full(len(starts) - 1, empty, np.float32)
    has = starts[:-1] < starts[1:]
    if has.any():
        out[has] = np.maximum.reduceat(values[order], starts[:-1][has])
    return out


@dataclass(frozen=True)
class RowView:
    """The adapter rows features are computed for — every row (``rows`` None) or a sorted subset — and
    their prompt rows grouped by owner: ``prompt_rows[group_starts[i]:…]`` are the prompts of the
    adapter at view position ``owner_pos[i]``."""

    size: int
    rows: np.ndarray | None
    prompt_rows: np.ndarray
    owner_pos: np.ndarray
    group_starts: np.ndarray

    @property
    def n(self) -> int:
        """Number of adapter rows in the view."""
        return self.size if self.rows is None else len(self.rows)

    def take(self, values: np.ndarray) -> np.ndarray:
        """A per-adapter array cut to the view."""
        return values if self.rows is None else values[self.rows]

    def positions(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Which of the given adapter rows are in the view, and their view positions."""
        rows = np.asarray(rows, np.int64)
        if self.rows is None:
            return np.ones(len(rows), bool), rows
        at = np.minimum(np.searchsorted(self.rows, rows), max(len(self.rows) - 1, 0))
        inside = (self.rows[at] == rows) if len(self.rows) else np.zeros(len(rows), bool)
        return inside, at[inside]

    def expand(self, values: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """A view array as a per-adapter array over the whole catalog (``fill`` outside the view)."""
        if self.rows is None:
            return values
        # calloc'd zeros are mapped lazily: 4x cheaper than np.full when dozens of these arrays live at once
        out = np.zeros(self.size, values.dtype) if fill == 0 else np.full(self.size, fill, values.dtype)
        out[self.rows] = values
        return out


@dataclass(frozen=True)
class SpreadFeatures(Mapping[str, np.ndarray]):
    """A view's per-adapter features as arrays over the whole catalog (0 outside the view), each spread
    on first access: a search reads only its hits' values (:func:`features_at`), and spreading all ~40
    of them wrote 16 MB a query at 100,000 adapters."""

    view: RowView
    features: dict[str, np.ndarray]
    _spread: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._spread:
            self._spread[name] = self.view.expand(self.features[name])
        return self._spread[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.features)

    def __len__(self) -> int:
        return len(self.features)


def features_at(feats: Mapping[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """Every feature's values at some catalog rows (a :class:`SpreadFeatures` is not spread for it:
    0 outside its view)."""
    if not isinstance(feats, SpreadFeatures):
        return {name: values[rows] for name, values in feats.items()}
    inside, positions = feats.view.positions(rows)  # once for all features
    out = {}
    for name, values in feats.features.items():
        out[name] = np.zeros(len(inside), values.dtype)
        out[name][inside] = values[positions]
    return out
