"""A small catalog of LoRAs without preview prompts (local files, no sidecars): the adapter a query
names ranks first, whatever the fitted fusion would say about adapters nothing matched."""

from __future__ import annotations

import numpy as np

import adapters_db
from adapters_db.catalog import Catalog
from adapters_db.retrieval import candidate_rows
from tests.adapters_db.conftest import civitai_record

RECORDS = [
    ("FilmGirl 胶片风", "filmgirl_胶片风.safetensors", "film look portraits", 100),
    ("ShojoVibe少女感", "shojovibe_少女感.safetensors", "soft anime style", 5000),
    ("Plain Watercolor", "plain_watercolor.safetensors", "watercolor painting", 100),
    ("Neon City", "neon_city.safetensors", "cyberpunk streets at night", 90000),
]


def test_the_named_adapter_ranks_first_without_prompts(catalog: Catalog) -> None:
    records = [
        civitai_record(900 + i, name, file_name=file, description=text, downloads=downloads)
        for i, (name, file, text, downloads) in enumerate(RECORDS)
    ]
    with catalog.session() as s:
        adapters_db.import_civitai_records(s, catalog, ((str(r["id"]), r) for r in records))
    with catalog.session() as s:
        for query, name in (
            ("胶片", "FilmGirl 胶片风"),
            ("少女", "ShojoVibe少女感"),
            ("plain", "Plain Watercolor"),
            ("a watercolor painting of a fox", "Plain Watercolor"),
            ("film", "FilmGirl 胶片风"),
            ("neon city", "Neon City"),
        ):
            hits = adapters_db.search(s, catalog, query, k=4)
            assert hits[0].adapter.name == name, (query, [(h.adapter.name, h.score) for h in hits])
            assert all(h.score < hits[0].score for h in hits[1:])
        hits = adapters_db.search(s, catalog, "zzqx unrelated", k=4)  # nothing matches: all, by the priors
        assert len(hits) == 4 and all(h.why == "popular adapter" for h in hits)


def test_candidates_of_a_small_catalog_are_the_adapters_some_channel_scores() -> None:
    feats = {"m_name": np.array([0.0, 0.4, 0.0, 0.1], np.float32), "pop": np.array([9.0, 1.0, 5.0, 2.0])}
    assert candidate_rows(feats, wanted={"m_name"}).tolist() == [1, 3]
    allowed = np.array([True, False, True, True])
    assert candidate_rows(feats, allowed, wanted={"m_name"}).tolist() == [3]
    nothing = {"m_name": np.zeros(4, np.float32), "pop": feats["pop"]}
    assert candidate_rows(nothing, wanted={"m_name"}).tolist() == [0, 1, 2, 3]
    assert candidate_rows({"m_name": np.zeros(0, np.float32)}, wanted={"m_name"}).tolist() == []
