"""Derived indexes (rebuilt when missing, stale or of another embedder), embedders, trained adapters,
image search, and SQLite/PostgreSQL agreement."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select

import adapters_db
from adapters_db import Catalog, HashingEmbedder
from adapters_db.embedders import EmbeddingCache, MiniLMEmbedder, tiny_open_clip
from adapters_db.models import Embedding
from tests.adapters_db.conftest import SMALL_CATALOG, civitai_record
from tests.databases import PG_URL, fresh_database

QUERIES = [
    "a dragon in pixel art style, 8bit",
    "watercolor painting of a lake",
    "hatsune miku singing",
    "neon lights and rain at night",
    "a highly detailed photo of a cat",
    "a castle",
]


def _top(cat: Catalog, query: str, k: int = 3, **kw: object) -> list[str]:
    with cat.session() as s:
        return [h.adapter.name for h in adapters_db.search(s, cat, query, k=k, **kw)]


def test_index_is_saved_reloaded_and_rebuilt_when_deleted(filled_catalog: Catalog) -> None:
    cat = filled_catalog
    before = _top(cat, QUERIES[0])
    index = cat._search_index
    assert index is not None and index.last_event == "rebuilt"
    manifest = json.loads((index.directory / "manifest.json").read_text())
    assert manifest["embedder"] == "hashing-64" and manifest["dim"] == 64 and manifest["adapters"] == 6
    assert manifest["vectors"] == {"meta": 6, "prompt": 9} and manifest["kinds"]["prompt"] == "flat"
    assert index.directory.name == "hashing-64-64"
    reopened = adapters_db.open_catalog(cat.url, cat.data_dir, embedder=HashingEmbedder(64))
    assert _top(reopened, QUERIES[0]) == before and reopened._search_index.last_event == "loaded"
    shutil.rmtree(index.directory)
    third = adapters_db.open_catalog(cat.url, cat.data_dir, embedder=HashingEmbedder(64))
    assert _top(third, QUERIES[0]) == before and third._search_index.last_event == "rebuilt"
    assert (index.directory / "prompt.faiss").is_file()
    (index.directory / "lexical.npz").write_bytes(b"corrupt")
    fourth = adapters_db.open_catalog(cat.url, cat.data_dir, embedder=HashingEmbedder(64))
    assert _top(fourth, QUERIES[0]) == before and fourth._search_index.last_event == "rebuilt"
    for c in (reopened, third, fourth):
        c.dispose()


def test_index_follows_catalog_changes(filled_catalog: Catalog) -> None:
    cat = filled_catalog
    assert "Origami Animals" not in _top(cat, "origami crane, folded paper", k=6)
    with cat.session() as s:
        adapters_db.import_civitai_records(
            s,
            cat,
            [
                (
                    "new",
                    civitai_record(
                        50,
                        "Origami Animals",
                        trained=["origami"],
                        prompts=["origami crane, folded paper, studio light"],
                    ),
                )
            ],
        )
    assert _top(cat, "origami crane, folded paper", k=1) == ["Origami Animals"]
    assert cat._search_index.last_event == "rebuilt"
    with cat.session() as s:
        rec = adapters_db.find_by_civitai_id(s, cat, 50)
        adapters_db.delete_adapter(s, cat, rec.id)
    assert "Origami Animals" not in _top(cat, "origami crane, folded paper", k=6)


def test_another_embedder_gets_its_own_vectors_and_index(filled_catalog: Catalog) -> None:
    cat = filled_catalog
    _top(cat, QUERIES[0])
    cat.set_embedder(HashingEmbedder(32))
    _top(cat, QUERIES[0])
    with cat.session() as s:
        names = dict(s.execute(select(Embedding.embedder, func.count()).group_by(Embedding.embedder)).all())
    assert names == {"hashing-64": 15, "hashing-32": 15}
    assert {p.name for p in cat.index_dir.iterdir() if not p.name.startswith(".")} == {
        "hashing-64-64",
        "hashing-32-32",
    }


def test_every_hit_says_why(filled_catalog: Catalog) -> None:
    with filled_catalog.session() as s:
        hits = {q: adapters_db.search(s, filled_catalog, q, k=2) for q in QUERIES}
    assert all(h.why for hs in hits.values() for h in hs)
    assert hits[QUERIES[0]][0].why.startswith("trigger word")
    assert any("tag: watercolor" in h.why or "similar prompt" in h.why for h in hits[QUERIES[1]])
    for hs in hits.values():
        assert set(hs[0].channels) >= {"p_max", "m_name", "t_max", "d_meta", "pop"}


@pytest.mark.skipif(not PG_URL, reason="set STUDIO_TEST_PG_URL to compare SQLite and PostgreSQL rankings")
def test_sqlite_and_postgres_rank_alike(tmp_path: Path) -> None:
    results = []
    for name in ("sqlite", "postgresql"):
        with fresh_database(name, tmp_path, "a") as url:
            cat = adapters_db.open_catalog(url, tmp_path / name, embedder=HashingEmbedder(64))
            with cat.session() as s:
                adapters_db.import_civitai_records(s, cat, ((str(r["id"]), r) for r in SMALL_CATALOG))
            results.append({q: _top(cat, q, k=3) for q in QUERIES})
            cat.dispose()
    sqlite, postgres = results
    for q in QUERIES:
        assert sqlite[q][0] == postgres[q][0], q
        assert len(set(sqlite[q]) & set(postgres[q])) >= 2, q


def test_minilm_embedder_is_real_and_offline(tmp_path: Path) -> None:
    emb = MiniLMEmbedder()
    assert emb.name == "minilm-l6-v2-384" and emb.dim == 384 and not emb.supports_images
    v = emb.embed_texts(["a photo of a cat", "a picture of a kitten", "a red sports car"])
    assert v.shape == (3, 384) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2
    single = emb.embed_texts(["a red sports car"])
    assert np.allclose(single[0], v[2], atol=1e-4)  # batching and padding do not change a vector
    cache = EmbeddingCache(tmp_path / "cache.sqlite")
    first = cache.embed(emb, ["a photo of a cat", "a red sports car"])
    assert np.allclose(first, v[[0, 2]], atol=1e-5)
    emb.embed_texts = None  # type: ignore[assignment,method-assign]  # the cache must not call it again
    assert np.allclose(cache.embed(emb, ["a red sports car"])[0], v[2], atol=1e-5)
    with pytest.raises(NotImplementedError):
        MiniLMEmbedder.embed_images(emb, [])
    cache.close()


def test_open_clip_image_search_and_trained_adapter(
    sqlite_catalog: Catalog, lora_file: Callable[..., Path], tmp_path: Path
) -> None:
    cat = sqlite_catalog
    cat.set_embedder(tiny_open_clip(seed=0))
    red = tmp_path / "red.png"
    Image.new("RGB", (48, 48), (220, 20, 20)).save(red)
    green = tmp_path / "green.png"
    Image.new("RGB", (48, 48), (20, 200, 40)).save(green)
    with cat.session() as s:
        rec = adapters_db.register_trained_adapter(
            s,
            cat,
            lora_file("mine.safetensors", seed=41),
            captions=["a photo of sks dog", "sks dog on grass"],
            sample_images=[red],
            sample_prompts=["sks dog, red background"],
            name="My Dog",
            trigger_words=["sks dog"],
        )
        assert rec.source == "trained" and rec.name == "My Dog" and rec.trigger_words == ("sks dog",)
        kinds = sorted(i.kind for i in rec.images)
        assert kinds == ["caption", "caption", "sample"]
        vectors = dict(
            s.execute(
                select(Embedding.channel, func.count())
                .where(Embedding.adapter_id == rec.id)
                .group_by(Embedding.channel)
            ).all()
        )
        assert vectors == {"meta": 1, "prompt": 3, "image": 1}  # embedded at registration
        other = adapters_db.register_trained_adapter(
            s,
            cat,
            lora_file("other.safetensors", seed=42),
            captions=[],
            sample_images=[green],
            name="Green Thing",
        )
        copy = tmp_path / "copy_of_mine.safetensors"
        copy.write_bytes(adapters_db.local_file_path(rec).read_bytes())
        again = adapters_db.register_trained_adapter(s, cat, copy, captions=[], sample_images=[])
        assert again.id == rec.id
        with pytest.raises(ValueError, match=r"truncated|not a safetensors"):
            broken = tmp_path / "broken.safetensors"
            broken.write_bytes(b"12345678")
            adapters_db.register_trained_adapter(s, cat, broken, captions=[], sample_images=[])
    with cat.session() as s:
        hits = adapters_db.search_by_image(s, cat, Image.new("RGB", (48, 48), (230, 10, 10)), k=2)
        assert hits[0].adapter.id == rec.id and hits[1].adapter.id == other.id
        assert adapters_db.search(s, cat, "sks dog", k=1)[0].adapter.id == rec.id
    cat.set_embedder(HashingEmbedder(16))
    with cat.session() as s, pytest.raises(ValueError, match="cannot embed images"):
        adapters_db.search_by_image(s, cat, red)


def test_big_catalog_switches_to_an_approximate_index(sqlite_catalog: Catalog) -> None:
    from adapters_db.search_index import IndexConfig, SearchIndex
    from adapters_db.vector_index import VectorIndexConfig

    cat = sqlite_catalog
    records = [
        civitai_record(
            1000 + i, f"Adapter {i}", trained=[f"trig{i}"], prompts=[f"prompt {i} about topic {i % 7}"]
        )
        for i in range(60)
    ]
    with cat.session() as s:
        adapters_db.import_civitai_records(s, cat, [(str(i), r) for i, r in enumerate(records)])
        adapters_db.embed_missing(cat, session=s)
        index = SearchIndex(
            tmp := cat.index_dir / "alt",
            cat.embedder,
            IndexConfig(vectors=VectorIndexConfig(exact_threshold=40)),
        )
        index.rebuild(s)
    assert index.dense["meta"].kind == "hnsw" and index.dense["prompt"].kind == "hnsw"
    assert os.path.isdir(tmp)
