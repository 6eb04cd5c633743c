"""benchmarks/small_catalog.py on a 20-LoRA sample of the real dump (skipped without ../shared/data)."""

from __future__ import annotations

import numpy as np

from tests.benchmark_modules import load_benchmark


def test_ties_count_against_the_gold() -> None:
    bench = load_benchmark("small_catalog")
    assert bench.ranks_of(np.array([0.0, 0.0, 0.0]), 1) == 3  # a channel scoring nothing ranks it last
    assert bench.ranks_of(np.array([0.2, 0.9, 0.1]), 1) == 1


def test_small_sample_without_pictures(shared_data) -> None:
    bench = load_benchmark("small_catalog")
    result = bench.run(size=20, seed=0, pictures=False, n_queries=15)
    assert set(result) == {"fusion", "tf_meta"}
    for by in result.values():
        assert set(by) == {"with_triggers", "without_triggers"}
        assert all(0.0 <= by[v][m] <= 1.0 for v in by for m in ("R@1", "R@5", "R@10", "MRR"))
    fusion, ref = result["fusion"]["with_triggers"], result["tf_meta"]["with_triggers"]
    assert fusion["R@10"] >= 0.6 and fusion["MRR"] >= ref["MRR"] - 0.05
