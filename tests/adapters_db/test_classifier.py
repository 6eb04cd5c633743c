"""The prompt → adapter classifier channel: training data, learning, persistence, and its use in search."""

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
from adapters_db.classifier import (
    ClassifierConfig,
    PromptClassifier,
    build_classifier,
    classifier_path,
    load_classifier,
    train_classifier,
    training_examples,
)
from adapters_db.retrieval import SearchOptions, score_all
from adapters_db.search_index import read_catalog
from tests.adapters_db.conftest import civitai_record

SMALL = ClassifierConfig(dim=32, epochs=40, token_dropout=0.0, batch_size=8)


def _rows(cat: Catalog):  # type: ignore[no-untyped-def]
    with cat.session() as s:
        return read_catalog(s)


def test_examples_add_trigger_free_copies_and_leave_excluded_images_out(filled_catalog: Catalog) -> None:
    rows = _rows(filled_catalog)
    texts, labels = training_examples(rows)
    pixel = int(np.nonzero([n == "Pixel Art Style" for n in rows.fields["name"]])[0][0])
    mine = [t for t, y in zip(texts, labels, strict=True) if y == pixel]
    # metadata + 2 prompts, each also without "pixel art" / "8bit"
    assert len(mine) == 6
    assert "a castle on a hill, , retro game" in [t.strip(", ") for t in mine]
    assert not any("8bit" in t.lower() for t in mine[1::2])
    first_image = int(rows.prompt_image_ids[np.nonzero(rows.prompt_owner == pixel)[0][0]])
    texts2, labels2 = training_examples(rows, exclude_image_ids=[first_image])
    assert len(texts2) == len(texts) - 2
    assert not any("castle" in t for t, y in zip(texts2, labels2, strict=True) if y == pixel)


def test_learns_prompts_and_round_trips(filled_catalog: Catalog, tmp_path: Path) -> None:
    rows = _rows(filled_catalog)
    clf = train_classifier(rows, SMALL)
    ids = rows.adapter_ids
    for prompt, owner in zip(rows.prompts, rows.prompt_owner.tolist(), strict=True):
        lp = clf.log_probs(prompt)
        assert lp is not None and int(np.argmax(lp)) == owner, prompt
    assert np.exp(clf.log_probs("wtrclr lake")).sum() == pytest.approx(1.0, abs=1e-5)  # type: ignore[arg-type]
    assert clf.log_probs("zzzz qqqq") is None
    saved = clf.save(tmp_path / "c.safetensors")
    back = PromptClassifier.load(saved)
    assert back.vocab == clf.vocab and back.config == SMALL
    np.testing.assert_allclose(back.log_probs("neon rain"), clf.log_probs("neon rain"), rtol=1e-6)
    # adapters it never saw (added after training) get its lowest score; unknown text gets nothing
    scores = back.scores_for("neon rain", np.array([ids[3], 10_000]))
    lp = back.log_probs("neon rain")
    assert scores[0] == pytest.approx(lp[3]) and scores[1] == pytest.approx(lp.min())  # type: ignore[index]
    assert back.scores_for("zzzz", ids) is None
    other = tmp_path / "not.safetensors"
    save_file({"x": np.zeros(2, np.float32)}, str(other), metadata={"format": "something-else"})
    with pytest.raises(ValueError, match="not a prompt classifier"):
        PromptClassifier.load(other)


def test_search_uses_the_saved_classifier(filled_catalog: Catalog) -> None:
    cat = filled_catalog
    query = "aqua hair, singing on stage"  # Miku's prompt without its trigger words
    with cat.session() as s:
        _, ctx, feats, _ = score_all(s, cat, query)
        assert ctx.class_scores is None and not feats["k_lp"].any()
        assert load_classifier(s, cat, cat.revision(s)) is None
        build_classifier(s, cat, SMALL)
    assert classifier_path(cat).is_file()
    with cat.session() as s:
        index, ctx, feats, _ = score_all(s, cat, query)
        miku = int(index.rows_of(np.array([adapters_db.find_by_civitai_id(s, cat, 3).id]))[0])
        assert ctx.class_scores is not None and int(np.argmax(feats["k_lp"])) == miku
        assert feats["r_k_lp"][miku] == 1.0
        hits = adapters_db.search(s, cat, query, k=3, base_family=None)
        assert hits[0].adapter.civitai_model_id == 3 and hits[0].channels["k_lp"] > np.log(0.5)
        # the channel can be switched off, and metadata-only (cold) searches never use it
        off = SearchOptions(channels=("prompts", "meta", "triggers", "fts"))
        assert not score_all(s, cat, query, off)[2]["k_lp"].any()
        cold = SearchOptions(channels=("meta", "triggers", "fts", "classifier"))
        assert score_all(s, cat, query, cold)[1].class_scores is None
        # leaving pictures out (evaluation) never uses the saved classifier: it learned from them
        image = int(index.prompt_image_ids[0])
        assert score_all(s, cat, query, SearchOptions(exclude_image_ids=(image,)))[1].class_scores is None
        # a query with no word it knows: no classifier evidence, no "classifier" reason
        _, ctx, _, _ = score_all(s, cat, "zzzz qqqq")
        assert ctx.class_scores is None
        assert all("classifier" not in h.why for h in adapters_db.search(s, cat, "zzzz qqqq", k=3))


def test_deleted_adapters_lose_their_class_even_when_the_id_is_reused(
    sqlite_catalog: Catalog, small_records: list[dict]
) -> None:
    cat = sqlite_catalog
    with cat.session() as s:
        adapters_db.import_civitai_records(s, cat, ((str(r["id"]), r) for r in small_records))
    with cat.session() as s:
        build_classifier(s, cat, SMALL)
        miku = adapters_db.find_by_civitai_id(s, cat, 3).id
        clf = load_classifier(s, cat, cat.revision(s))
        assert clf is not None and clf.valid.all()
        last = max(int(i) for i in clf.adapter_ids)
        assert adapters_db.delete_adapter(s, cat, last)
    with cat.session() as s:  # SQLite hands the freed id to the next import: a different adapter
        new = civitai_record(7, "New One", trained=["newone"], tags=["style"], prompts=["newone, a cat"])
        adapters_db.import_civitai_records(s, cat, [("7", new)])
        assert adapters_db.find_by_civitai_id(s, cat, 7).id == last
    with cat.session() as s:
        clf = load_classifier(s, cat, cat.revision(s))
        assert clf is not None and not clf.valid[clf.adapter_ids == last].any() and clf.valid.sum() == 5
        floor = clf.log_probs("newone cat").min()  # type: ignore[union-attr]
        assert clf.scores_for("newone cat", np.array([last]))[0] == pytest.approx(floor)  # type: ignore[index]
        assert clf.scores_for("aqua hair", np.array([miku]))[0] == pytest.approx(
            clf.log_probs("aqua hair")[list(clf.adapter_ids).index(miku)]  # type: ignore[index]
        )


def test_generalises_to_held_out_prompts_of_real_loras(shared_data: Path, tmp_path: Path) -> None:
    """On 300 real Civitai LoRAs, prompts of preview images it never saw find their LoRA."""
    from tests.adapters_db.conftest import write_jsonl

    with gzip.open(shared_data / "civitai_lora_sfw_2023-07.jsonl.gz", "rt", encoding="utf-8") as fh:
        records = [json.loads(line) for line in itertools.islice(fh, 300)]
    cat = adapters_db.open_catalog(None, tmp_path / "data", embedder="hashing-32")
    with cat.session() as s:
        adapters_db.import_civitai_jsonl(s, cat, write_jsonl(tmp_path / "slice.jsonl", records))
    rows = _rows(cat)
    counts = np.bincount(rows.prompt_owner, minlength=len(rows.adapter_ids))
    rng = np.random.default_rng(0)
    # one held-out prompt from each of 60 LoRAs that keep at least two others
    owners = rng.choice(np.nonzero(counts >= 3)[0], 60, replace=False)
    held = [int(rng.choice(np.nonzero(rows.prompt_owner == o)[0])) for o in owners]
    clf = train_classifier(rows, ClassifierConfig(epochs=8), exclude_image_ids=rows.prompt_image_ids[held])
    ranks = []
    for i in held:
        lp = clf.log_probs(rows.prompts[i])
        gold = int(rows.prompt_owner[i])
        ranks.append(len(lp) if lp is None else int((lp > lp[gold]).sum()) + 1)
    top10 = float(np.mean(np.array(ranks) <= 10))
    assert top10 >= 0.6, ranks  # chance: 10 / 300
    cat.dispose()
