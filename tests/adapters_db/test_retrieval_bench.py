"""The miss analysis of benchmarks/retrieval.py (its numbers need ../shared/data and ~25 minutes)."""

from __future__ import annotations

from typing import Any

import numpy as np

from tests.benchmark_modules import load_benchmark


def _bench() -> Any:
    return load_benchmark("retrieval")


def test_miss_reasons_name_what_makes_a_gold_adapter_hard_to_find() -> None:
    rb = _bench()
    creator = np.array([0, 1, 1, 2])
    scores = np.array([0.1, 0.9, 0.2, 0.3])  # row 1 tops; row 2 (gold) shares its creator
    n_prompts = np.log1p(np.array([5.0, 5.0, 1.0, 9.0]))  # the gold one has one other prompt indexed
    feats = {"n_prompts": n_prompts}
    hard = rb.miss_reasons("toaster, kitchen", scores, 2, creator, feats, style=True)
    assert hard == {"short_query": True, "creator_series": True, "few_prompts": True, "style_adapter": True}
    long_prompt = "masterpiece, best quality, 1girl, school uniform, red tie, smile"
    easy = rb.miss_reasons(long_prompt, scores, 3, creator, feats)
    assert easy == {
        "short_query": False,
        "creator_series": False,
        "few_prompts": False,
        "style_adapter": False,
    }
    assert rb.miss_reasons(long_prompt, scores, 1, creator, feats)["creator_series"] is False  # gold tops


def test_summarise_misses_counts_each_reason_and_any() -> None:
    rb = _bench()
    rows = [
        {"short_query": True, "creator_series": True, "few_prompts": False, "style_adapter": False},
        {"short_query": False, "creator_series": False, "few_prompts": True, "style_adapter": True},
        {"short_query": False, "creator_series": False, "few_prompts": False, "style_adapter": False},
    ]
    out = rb.summarise_misses({"without_triggers": rows, "with_triggers": []})
    assert out["without_triggers"] == {
        "misses": 3,
        "short_query": 1,
        "creator_series": 1,
        "few_prompts": 1,
        "style_adapter": 1,
        "any": 2,
    }
    assert out["with_triggers"] == {
        "misses": 0,
        "short_query": 0,
        "creator_series": 0,
        "few_prompts": 0,
        "style_adapter": 0,
        "any": 0,
    }


def test_style_adapter_ids_are_the_adapters_tagged_style(filled_catalog: Any) -> None:
    from sqlalchemy import select

    from adapters_db.models import Adapter

    rb = _bench()
    with filled_catalog.session() as s:
        styles = rb.style_adapter_ids(s)
        names = set(s.scalars(select(Adapter.name).where(Adapter.id.in_(styles))))
    tagged = {r["name"] for r in small_style_records()}
    assert names == tagged and len(names) == 3


def small_style_records() -> list[dict[str, Any]]:
    from tests.adapters_db.conftest import SMALL_CATALOG

    return [r for r in SMALL_CATALOG if "style" in r["tags"]]
