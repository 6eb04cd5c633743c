"""The prompt ↔ metadata matcher: cold-start scoring of adapters from metadata, persistence, search use."""

from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import adapters_db
from adapters_db import Catalog
from adapters_db.examples import training_examples
from adapters_db.matcher import (
    MatcherConfig,
    PromptMatcher,
    build_matcher,
    load_matcher,
    matcher_path,
    metadata_counts,
    train_matcher,
)
from adapters_db.retrieval import SearchOptions, score_all
from adapters_db.search_index import read_catalog
from adapters_db.text import remove_phrases
from tests.adapters_db.conftest import civitai_record

SMALL = MatcherConfig(dim=32, epochs=30, token_dropout=0.0, batch_size=16, negatives=64)

# (metadata word, prompt words): the words people prompt with never appear in the metadata
TOPICS = [
    ("hanfu", "chinese clothes, long sleeves, silk robe"),
    ("mecha", "giant robot, mechanical armor, cockpit"),
    ("aquarelle", "soft paint, paper texture, pastel wash"),
    ("cyberpunk", "neon lights, rainy street, holographic signs"),
]
FILLERS = ["portrait", "full body", "outdoors", "night", "smile", "standing", "close up", "sky"]


def topic_records(per_topic: int = 6) -> list[dict]:
    """Per topic, ``per_topic`` adapters with prompts, then one adapter with metadata only (model ids
    1000 + topic index): a catalog where the mapping from prompt words to metadata words can only be
    learned from other adapters."""
    records = []
    for t, (meta_word, prompt_words) in enumerate(TOPICS):
        for k in range(per_topic):
            mid = 100 * (t + 1) + k
            prompts = [f"{prompt_words}, {FILLERS[(k + j) % len(FILLERS)]}, 1girl" for j in range(3)]
            records.append(
                civitai_record(
                    mid,
                    f"{meta_word.title()} set {k}",
                    tags=[meta_word],
                    prompts=prompts,
                    description=f"A {meta_word} LoRA, version {k}.",
                )
            )
    for t, (meta_word, _) in enumerate(TOPICS):
        records.append(
            civitai_record(1000 + t, f"New {meta_word}", tags=[meta_word], description=f"Fresh {meta_word}.")
        )
    return records


@pytest.fixture
def topic_catalog(sqlite_catalog: Catalog) -> Catalog:
    with sqlite_catalog.session() as s:
        summary = adapters_db.import_civitai_records(
            s, sqlite_catalog, ((str(r["id"]), r) for r in topic_records())
        )
    assert summary.count("imported") == len(TOPICS) * 7
    return sqlite_catalog


def _rows(cat: Catalog):  # type: ignore[no-untyped-def]
    with cat.session() as s:
        return read_catalog(s)


def test_examples_can_skip_metadata_and_keep_some_adapters(topic_catalog: Catalog) -> None:
    rows = _rows(topic_catalog)
    texts, labels = training_examples(rows, metadata=False)
    assert len(texts) == len(rows.prompts) and "A hanfu LoRA" not in " ".join(texts)
    first_topic = np.array(["Hanfu" in n for n in rows.fields["name"]])
    texts, labels = training_examples(rows, metadata=False, adapters=first_topic)
    assert set(labels) <= set(np.nonzero(first_topic)[0].tolist()) and len(texts) == 6 * 3


def test_scores_adapters_it_never_saw_from_their_metadata(topic_catalog: Catalog) -> None:
    rows = _rows(topic_catalog)
    has_prompts = np.bincount(rows.prompt_owner, minlength=len(rows.adapter_ids)) > 0
    matcher = train_matcher(rows, SMALL)
    with topic_catalog.session() as s:
        index = topic_catalog.search_index(s)
    vectors = matcher.adapter_vectors(index.lexical.meta_counts, index.lexical.vocab.hashes)
    fresh = np.nonzero(~has_prompts)[0]  # the four metadata-only adapters, one per topic
    assert len(fresh) == len(TOPICS)
    for meta_word, prompt_words in TOPICS:
        query = prompt_words.split(", ")[0] + ", 1girl"  # e.g. "chinese clothes, 1girl": no metadata word
        scores = matcher.similarities(query, vectors)
        assert scores is not None
        best_fresh = fresh[int(np.argmax(scores[fresh]))]
        assert meta_word in rows.fields["tags"][best_fresh], (query, rows.fields["name"][best_fresh])
        # and its topic's adapters outrank every other topic's
        mine = np.array([meta_word in tags for tags in rows.fields["tags"]])
        assert scores[mine].min() > scores[~mine].max(), query


def test_round_trip_unknown_text_and_refused_files(topic_catalog: Catalog, tmp_path: Path) -> None:
    rows = _rows(topic_catalog)
    matcher = train_matcher(rows, SMALL)
    back = PromptMatcher.load(matcher.save(tmp_path / "m.safetensors"))
    assert back.config == SMALL
    np.testing.assert_array_equal(back.query_vocab.hashes, matcher.query_vocab.hashes)
    counts = metadata_counts(rows)
    hashes = np.unique(counts.indices).astype(np.int64)
    compact = counts[:, hashes]
    vectors = back.adapter_vectors(compact, hashes)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(
        back.similarities("giant robot", vectors), matcher.similarities("giant robot", vectors), rtol=1e-6
    )
    assert back.query_vector("zzzz qqqq") is None and back.similarities("zzzz", vectors) is None
    # an adapter with no term the matcher knows scores at the floor, not above real cosines
    empty = np.vstack([vectors, np.zeros((1, vectors.shape[1]), np.float32)])
    scores = back.similarities("giant robot", empty)
    assert scores is not None and scores[-1] == pytest.approx(scores[:-1].min())
    other = tmp_path / "not.safetensors"
    save_file({"x": np.zeros(2, np.float32)}, str(other), metadata={"format": "something-else"})
    with pytest.raises(ValueError, match="not a prompt matcher"):
        PromptMatcher.load(other)
    lonely = rows.prompt_owner == rows.prompt_owner[0]
    with pytest.raises(ValueError, match="two adapters"):
        train_matcher(rows, SMALL, exclude_image_ids=rows.prompt_image_ids[~lonely])


def test_training_leaves_out_excluded_images_and_adapters(topic_catalog: Catalog) -> None:
    rows = _rows(topic_catalog)
    mecha = np.array(["mecha" in tags for tags in rows.fields["tags"]])
    without = train_matcher(rows, SMALL, adapters=~mecha)
    assert without.query_vector("cockpit") is None  # only mecha prompts say "cockpit"
    images = rows.prompt_image_ids[mecha[rows.prompt_owner]]
    assert train_matcher(rows, SMALL, exclude_image_ids=images).query_vector("cockpit") is None
    assert train_matcher(rows, SMALL).query_vector("cockpit") is not None


def test_search_uses_the_saved_matcher_warm_and_cold(topic_catalog: Catalog) -> None:
    cat = topic_catalog
    query = "chinese clothes, long sleeves, 1girl"
    with cat.session() as s:
        _, ctx, feats, _ = score_all(s, cat, query)
        assert ctx.match_scores is None and not feats["s_meta"].any()
        assert load_matcher(cat) is None
        build_matcher(s, cat, SMALL)
    assert matcher_path(cat).is_file()
    cold = SearchOptions(channels=("meta", "triggers", "fts", "matcher"))
    with cat.session() as s:
        index, ctx, feats, _ = score_all(s, cat, query, cold)
        new_hanfu = int(index.rows_of(np.array([adapters_db.find_by_civitai_id(s, cat, 1000).id]))[0])
        assert ctx.match_scores is not None
        fresh = [
            int(index.rows_of(np.array([adapters_db.find_by_civitai_id(s, cat, 1000 + t).id]))[0])
            for t in range(len(TOPICS))
        ]
        assert max(fresh, key=lambda r: feats["s_meta"][r]) == new_hanfu
        assert feats["r_s_meta"].max() == 1.0
        warm = score_all(s, cat, query)[2]
        np.testing.assert_allclose(warm["s_meta"], feats["s_meta"])
        off = SearchOptions(channels=("prompts", "meta", "triggers", "fts"))
        assert not score_all(s, cat, query, off)[2]["s_meta"].any()
        image = int(index.prompt_image_ids[0])
        assert score_all(s, cat, query, SearchOptions(exclude_image_ids=(image,)))[1].match_scores is None
        given = load_matcher(cat)
        opts = SearchOptions(exclude_image_ids=(image,), matcher=given)
        assert score_all(s, cat, query, opts)[1].match_scores is not None
        assert score_all(s, cat, "zzzz qqqq")[1].match_scores is None
        # the packaged fusion fitted with the matcher ranks by it when no word of the query is in metadata
        hits = adapters_db.search(s, cat, query, k=3, channels=cold.channels)
        assert all("hanfu" in h.adapter.tags for h in hits), [h.adapter.name for h in hits]
        assert "matcher" in hits[0].why
    # an adapter imported after training is scored from its metadata at once
    with cat.session() as s:
        later = civitai_record(2000, "Later Hanfu", tags=["hanfu"], description="Another hanfu dress.")
        adapters_db.import_civitai_records(s, cat, [("2000", later)])
    with cat.session() as s:
        index, _, feats, _ = score_all(s, cat, query, cold)
        row = int(index.rows_of(np.array([adapters_db.find_by_civitai_id(s, cat, 2000).id]))[0])
        mecha = int(index.rows_of(np.array([adapters_db.find_by_civitai_id(s, cat, 1001).id]))[0])
        assert feats["s_meta"][row] > feats["s_meta"][mecha]


def test_alternating_matchers_each_keep_their_vectors(
    topic_catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An evaluation alternates two matchers (warm and cold track): each one's adapter vectors are
    computed once per index build and never served to the other."""
    rows = _rows(topic_catalog)
    mecha = np.array(["mecha" in tags for tags in rows.fields["tags"]])
    matchers = [train_matcher(rows, SMALL), train_matcher(rows, SMALL, adapters=~mecha)]
    calls: list[int] = []
    real = PromptMatcher.adapter_vectors

    def counted(self: PromptMatcher, *args: object) -> np.ndarray:
        calls.append(id(self))
        return real(self, *args)

    monkeypatch.setattr(PromptMatcher, "adapter_vectors", counted)
    query = "giant robot, cockpit, chinese clothes"
    with topic_catalog.session() as s:
        first = [score_all(s, topic_catalog, query, SearchOptions(matcher=m))[2]["s_meta"] for m in matchers]
        assert not np.allclose(first[0], first[1])
        for _ in range(3):
            for m, expected in zip(matchers, first, strict=True):
                got = score_all(s, topic_catalog, query, SearchOptions(matcher=m))[2]["s_meta"]
                np.testing.assert_array_equal(got, expected)
    assert sorted(calls) == sorted(id(m) for m in matchers)


def test_finds_real_loras_whose_prompts_it_never_saw(shared_data: Path, tmp_path: Path) -> None:
    """On 1,000 real Civitai LoRAs: trained on the prompts of half of them, the trigger-free prompts of
    the other half find their LoRA from its metadata alone far above chance."""
    from tests.adapters_db.conftest import write_jsonl

    with gzip.open(shared_data / "civitai_lora_sfw_2023-07.jsonl.gz", "rt", encoding="utf-8") as fh:
        records = [json.loads(line) for line in itertools.islice(fh, 1000)]
    cat = adapters_db.open_catalog(None, tmp_path / "data", embedder="hashing-32")
    with cat.session() as s:
        adapters_db.import_civitai_jsonl(s, cat, write_jsonl(tmp_path / "slice.jsonl", records))
        index = cat.search_index(s)
    rows = _rows(cat)
    n = len(rows.adapter_ids)
    train = np.random.default_rng(0).random(n) < 0.5
    matcher = train_matcher(rows, MatcherConfig(epochs=5), adapters=train)
    vectors = matcher.adapter_vectors(index.lexical.meta_counts, index.lexical.vocab.hashes)
    owners = rows.prompt_owner.tolist()
    held = [(remove_phrases(p, rows.triggers[o]), o) for p, o in zip(rows.prompts, owners, strict=True)]
    held = [(text, o) for text, o in held if not train[o] and text.strip()]
    ranks = []
    for text, gold in held[:400]:
        scores = matcher.similarities(text, vectors)
        ranks.append(n if scores is None else int((scores > scores[gold]).sum()) + 1)
    top10 = float(np.mean(np.array(ranks) <= 10))
    assert top10 >= 0.15, top10  # chance: 10 / 1000
    cat.dispose()
