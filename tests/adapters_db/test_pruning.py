"""Candidate-first search (adapters_db.pruning): top-row selection is stable under subsets, features
computed for the universe's rows equal the exhaustive ones, and on real Civitai LoRAs the
candidate-first ranking is the exhaustive one."""

from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

import adapters_db
from adapters_db.pruning import (
    PruneConfig,
    RowView,
    SpreadFeatures,
    best,
    best_owners,
    candidates,
    features_at,
    top_rows,
)
from adapters_db.retrieval import CHANNELS, SearchOptions, feature_builder, prepare, score_all
from tests.adapters_db.conftest import write_jsonl


def test_best_and_top_rows_take_ties_in_array_order() -> None:
    values = np.array([0.2, 0.0, 0.9, 0.5, 0.5, 0.5, -1.0])
    assert sorted(top_rows(values, 3).tolist()) == [2, 3, 4]  # of the tied 0.5s, the first ones
    assert sorted(top_rows(values, 10).tolist()) == list(range(7))
    assert best(values, 2).tolist() == [2, 3]  # best first
    assert best(values, 10).tolist() == [2, 3, 4, 5, 0]  # zero and negative are no evidence
    mask = np.array([True, True, False, False, True, True, True])
    assert best(values, 2, mask).tolist() == [4, 5]
    assert best(np.zeros(5), 3).tolist() == []
    # a subset holding the top rows picks the same ones
    rng = np.random.default_rng(0)
    many = rng.integers(0, 5, 1000).astype(np.float32)
    top = top_rows(many, 50)
    subset = np.union1d(top, rng.choice(1000, 300, replace=False))
    assert set(subset[top_rows(many[subset], 50)].tolist()) == set(top.tolist())


def test_best_owners_finds_owners_by_their_best_item() -> None:
    rng = np.random.default_rng(1)
    owners = rng.integers(0, 60, 2000)  # a few owners with many items each: the best items crowd
    values = np.where(rng.random(2000) < 0.7, rng.random(2000), 0.0)
    per_owner = np.zeros(60)
    np.maximum.at(per_owner, owners, values)
    ranked = np.flatnonzero(per_owner > 0)[np.argsort(-per_owner[per_owner > 0], kind="stable")]
    for n in (1, 5, 30, 100):
        assert best_owners(values, owners, n).tolist() == ranked[:n].tolist()  # best first
    mask = owners % 2 == 0
    got = best_owners(values, owners, 10, mask)
    assert (got % 2 == 0).all() and len(got) == 10


def test_a_sampled_floor_keeps_the_exhaustive_best() -> None:
    """On arrays long enough for the strided sample, ``best`` and ``best_owners`` are exactly the brute
    force over every positive value: ties at the cut (scores quantised to a few levels) included."""
    rng = np.random.default_rng(3)
    for density, levels in ((0.02, 0), (0.3, 0), (0.9, 0), (0.5, 6), (0.95, 3)):
        raw = rng.random(60_000).astype(np.float32)
        values = np.where(rng.random(60_000) < density, np.ceil(raw * levels) / levels if levels else raw, 0)
        values = values.astype(np.float32)
        positive = np.flatnonzero(values > 0)
        for n in (10, 250, 2_000):
            kept = candidates(values, n)
            assert len(kept) <= len(positive) and set(kept.tolist()) <= set(positive.tolist())
            brute = positive[np.lexsort((positive, -values[positive]))][:n]
            assert best(values, n).tolist() == brute.tolist()
        owners = rng.integers(0, 20_000, 60_000)
        per_owner = np.zeros(20_000)
        np.maximum.at(per_owner, owners, values)
        first_item = np.full(20_000, 60_000)
        order = np.lexsort((np.arange(60_000), -values))  # items best first, ties in item order
        np.minimum.at(first_item, owners[order], np.arange(60_000))
        has = np.flatnonzero(per_owner > 0)
        ranked = has[np.argsort(first_item[has], kind="stable")]
        for n in (10, 250):
            assert best_owners(values, owners, n).tolist() == ranked[:n].tolist()
    sparse = np.zeros(50_000, np.float32)
    sparse[[7, 70, 700]] = [0.5, 0.9, 0.5]  # fewer positive values than asked for: all of them
    assert best(sparse, 250).tolist() == [70, 7, 700]
    assert best_owners(sparse, np.arange(50_000) // 2, 250).tolist() == [35, 3, 350]


def test_top_rows_of_arrays_that_are_mostly_one_value() -> None:
    """A channel over a whole catalog is mostly zeros, fused scores mostly the one score of the rows left
    out: ``top_rows`` and the search's final ranking are the brute-force ones there too (ties in array
    order), and never return a row of score -inf."""
    from adapters_db.retrieval import _ranked_rows

    rng = np.random.default_rng(4)
    sparse = np.where(rng.random(8_000) < 0.05, rng.random(8_000), 0.0).astype(np.float32)
    left_out = np.full(50_000, -np.inf)
    left_out[rng.choice(50_000, 900, replace=False)] = np.round(rng.random(900), 2)  # ties among them
    filled = np.where(np.isfinite(left_out), left_out, -7.0)
    dense = rng.random(20_000)
    few = np.array([2.0, -np.inf, 2.0, 1.0, -np.inf])
    for values in (sparse, left_out, filled, dense, few, np.round(dense * 3)):
        order = np.lexsort((np.arange(len(values)), -values))  # the brute force: best first, ties by position
        finite = order[np.isfinite(values[order])]
        for n in (1, 10, 200, 1_000, 30_000):
            if n < len(values):
                assert sorted(top_rows(values, n).tolist()) == sorted(order[:n].tolist())
            assert _ranked_rows(values, n).tolist() == finite[:n].tolist()


def test_row_view() -> None:
    view = RowView(
        10, np.array([2, 5, 7]), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    )
    inside, at = view.positions(np.array([7, 3, 2, 9]))
    assert inside.tolist() == [True, False, True, False] and at.tolist() == [2, 0]
    np.testing.assert_array_equal(
        view.expand(np.array([1.0, 2.0, 3.0]), -1.0), [-1, -1, 1, -1, -1, 2, -1, 3, -1, -1]
    )
    assert view.take(np.arange(10) * 10).tolist() == [20, 50, 70]
    np.testing.assert_array_equal(view.expand(np.array([1.0, 2.0, 3.0])), [0, 0, 1, 0, 0, 2, 0, 3, 0, 0])


def test_spread_features_are_spread_only_when_read() -> None:
    view = RowView(
        10, np.array([2, 5, 7]), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    )
    spread = SpreadFeatures(view, {"a": np.array([1.0, 2.0, 3.0], np.float32), "b": np.array([4, 5, 6])})
    rows = np.array([7, 3, 2])
    assert features_at(spread, rows)["a"].tolist() == [3.0, 0.0, 1.0] and not spread._spread
    assert spread["b"].tolist() == [0, 0, 4, 0, 0, 5, 0, 6, 0, 0] and list(spread._spread) == ["b"]
    assert list(spread) == ["a", "b"] and len(spread) == 2 and spread["a"].dtype == np.float32
    plain = {name: spread[name] for name in spread}  # the exhaustive search's arrays: the same values
    for name, values in features_at(plain, rows).items():
        assert values.tolist() == features_at(spread, rows)[name].tolist()


@pytest.fixture(scope="module")
def real_catalog(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> adapters_db.Catalog:
    """1,500 real Civitai LoRAs with their preview prompts (hashing embedder)."""
    tmp = tmp_path_factory.mktemp("pruning")
    with gzip.open(shared_data / "civitai_lora_sfw_2023-07.jsonl.gz", "rt", encoding="utf-8") as fh:
        records = [json.loads(line) for line in itertools.islice(fh, 1500)]
    cat = adapters_db.open_catalog(None, tmp / "data", embedder="hashing-32")
    with cat.session() as s:
        adapters_db.import_civitai_jsonl(s, cat, write_jsonl(tmp / "slice.jsonl", records))
    yield cat
    cat.dispose()


def _queries(shared_data: Path, catalog: adapters_db.Catalog, n: int) -> list[tuple[str, tuple[int, ...]]]:
    """Real (prompt → LoRA) pairs of the catalog's LoRAs, each with its own picture to leave out."""
    from sqlalchemy import select

    from adapters_db.models import PreviewImage

    with catalog.session() as s:
        images = dict(s.execute(select(PreviewImage.civitai_image_id, PreviewImage.id)).all())
    out = []
    with gzip.open(shared_data / "bench_prompt_to_lora_dev.jsonl.gz", "rt", encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            if rec["image_id"] in images:
                out.append((rec["prompt_clean"], (int(images[rec["image_id"]]),)))
            if len(out) == n:
                break
    return out


def test_candidate_first_ranks_real_loras_as_the_exhaustive_search(
    real_catalog: adapters_db.Catalog, shared_data: Path
) -> None:
    queries = _queries(shared_data, real_catalog, 40)
    assert len(queries) == 40
    cold = tuple(c for c in CHANNELS if c != "prompts")
    agree, sizes = [], []
    with real_catalog.session() as s:
        for text, exclude in queries:
            for channels in (CHANNELS, cold):
                exact = score_all(s, real_catalog, text, SearchOptions(channels, exclude_image_ids=exclude))
                options = SearchOptions(channels, exclude_image_ids=exclude, prune=True)
                pruned = score_all(s, real_catalog, text, options)
                top = [set(np.argsort(-r[3], kind="stable")[:10].tolist()) for r in (exact, pruned)]
                agree.append(len(top[0] & top[1]) / 10)
                index, ctx = prepare(s, real_catalog, text, options)
                universe = feature_builder(index).universe(ctx, None, options.prune_config)
                sizes.append(len(universe))
                # every feature of the universe's rows, rank and creator-level ones included, is the
                # exhaustive value
                for name, values in exact[2].items():
                    np.testing.assert_allclose(pruned[2][name][universe], values[universe], atol=1e-5)
    assert np.mean(agree) >= 0.98, agree
    assert max(sizes) < index.size  # it is a subset, not the catalog


def test_shallow_cuts_shrink_the_universe(real_catalog: adapters_db.Catalog, shared_data: Path) -> None:
    text, exclude = _queries(shared_data, real_catalog, 1)[0]
    shallow = PruneConfig(lexical_rows=20, other_rows=20, trigger_rows=20)
    with real_catalog.session() as s:
        index, ctx = prepare(s, real_catalog, text, SearchOptions(exclude_image_ids=exclude))
        builder = feature_builder(index)
        deep, narrow = builder.universe(ctx, None, PruneConfig()), builder.universe(ctx, None, shallow)
        assert 0 < len(narrow) < len(deep)
        allowed = np.zeros(index.size, bool)
        allowed[::7] = True
        # a filter adds the filtered-in rows' own best, which the overall best may not contain
        filtered = builder.universe(ctx, allowed, shallow)
        own_best = best(builder.lexical_scores(ctx)["meta_all"], 20, allowed)
        assert set(narrow) <= set(filtered) and set(own_best) <= set(filtered)
        assert not set(own_best) <= set(narrow)  # which the overall best did not hold
        _, _, feats, scores = score_all(
            s, real_catalog, text, SearchOptions(prune=True, prune_config=shallow)
        )
        assert np.isfinite(scores).all() and all(len(v) == index.size for v in feats.values())


def test_column_dot_walks_postings_exactly() -> None:
    import scipy.sparse as sp

    from adapters_db.lexical import column_dot

    rng = np.random.default_rng(2)
    dense = rng.random((300, 40)) * (rng.random((300, 40)) < np.linspace(0.01, 0.9, 40))
    for dtype in (np.float32, np.float64):
        m = sp.csc_matrix(dense.astype(dtype))
        cols, w = np.array([39, 0, 7, 7, 22]), np.array([0.5, 2.0, 1.0, 0.25, 3.0])  # unsorted, repeated
        got = column_dot(m, cols, w)
        assert got.dtype == dtype
        np.testing.assert_allclose(got, dense[:, cols] @ w, rtol=1e-5 if dtype == np.float32 else 1e-12)
        assert not column_dot(m, np.zeros(0, np.int64), np.zeros(0)).any()
        empty = np.flatnonzero(np.diff(m.indptr) == 0)[:1]
        assert column_dot(m, empty, np.ones(len(empty))).shape == (300,)
        # 64-bit index arrays, as a catalog past 2^31 postings has
        m.indices, m.indptr = m.indices.astype(np.int64), m.indptr.astype(np.int64)
        np.testing.assert_allclose(column_dot(m, cols, w), dense[:, cols] @ w, rtol=1e-5)


def test_a_listing_of_matches_is_the_same_candidate_first(
    real_catalog: adapters_db.Catalog, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Paging through every match (the Catalog tab's text search) finds the same adapters when only a
    universe is featurised: rows outside it match by the exact lexical scores."""
    import adapters_db.retrieval as retrieval

    texts = [text for text, _ in _queries(shared_data, real_catalog, 5)] + ["anime girl, blue hair"]
    with real_catalog.session() as s:
        for text in texts:
            listed = {}
            for prune_from in (10**9, 1):
                monkeypatch.setattr(retrieval, "PRUNE_FROM", prune_from)
                hits = adapters_db.search(s, real_catalog, text, k=2000, matching_only=True)
                listed[prune_from] = [h.adapter.id for h in hits]
            exhaustive, pruned = listed[10**9], listed[1]
            assert set(pruned) == set(exhaustive), text
            assert len(exhaustive) > 300  # more than a universe's lexical share: the tail is listed too
            assert pruned[:10] == exhaustive[:10]


def test_a_filtered_search_ranks_the_allowed_adapters_as_the_exhaustive_search(
    real_catalog: adapters_db.Catalog, shared_data: Path
) -> None:
    """With a narrow filter, the allowed rows' own best (lexical, dense, creator-level) join the universe:
    the top 10 among the allowed adapters is the exhaustive one."""
    queries = _queries(shared_data, real_catalog, 30)
    with real_catalog.session() as s:
        size = real_catalog.search_index(s).size
        for every in (3, 25):
            allowed = np.arange(size) % every == 0
            agree = []
            for text, exclude in queries:
                tops = []
                for prune in (False, True):
                    options = SearchOptions(exclude_image_ids=exclude, prune=prune)
                    scores = np.where(
                        allowed, score_all(s, real_catalog, text, options, allowed=allowed)[3], -np.inf
                    )
                    tops.append(set(np.argsort(-scores, kind="stable")[:10].tolist()))
                agree.append(len(tops[0] & tops[1]) / 10)
            assert np.mean(agree) >= 0.99, (every, agree)


def test_grouping_helpers() -> None:
    from adapters_db.pruning import group_max, group_order, slice_positions

    assert slice_positions(np.array([5, 0, 9]), np.array([2, 0, 3])).tolist() == [5, 6, 9, 10, 11]
    assert slice_positions(np.zeros(0, np.int64), np.zeros(0, np.int64)).tolist() == []
    keys = np.array([2, 0, 2, 3, 0])
    order, starts = group_order(keys, 5)
    assert order.tolist() == [1, 4, 0, 2, 3] and starts.tolist() == [0, 2, 2, 4, 5, 5]
    values = np.array([0.5, 0.1, 0.9, 0.3, 0.2], np.float32)
    np.testing.assert_allclose(group_max(values, order, starts, -1.0), [0.2, -1.0, 0.9, 0.3, -1.0])
