"""Pure pieces: the file store, HTML sanitising, family names, text normalisation, BM25 and FAISS."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pytest

from adapters_db import lexical
from adapters_db.families import family_from_civitai, normalize_family
from adapters_db.sanitize import html_to_text, sanitize_html
from adapters_db.store import FileStore, HashMismatchError, autov2
from adapters_db.text import clean_prompt, remove_phrases, trigger_phrases, words
from adapters_db.vector_index import VectorIndex, VectorIndexConfig, recall_at_k

# ------------------------------------------------------------------------------------------ store


def test_store_is_content_addressed_atomic_and_deduplicated(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "files")
    data = b"some lora bytes" * 1000
    sha = hashlib.sha256(data).hexdigest()
    first = store.put_bytes(data)
    assert first.sha256 == sha and not first.existed and first.size_bytes == len(data)
    assert first.path == tmp_path / "files" / "lora" / sha[:2] / f"{sha}.safetensors"
    assert first.path.read_bytes() == data and first.autov2 == sha[:10].upper() == autov2(sha)
    second = store.put_bytes(data)
    assert second.existed and second.path == first.path
    assert list(store.tmp_dir.iterdir()) == []  # no temp file left behind
    with pytest.raises(HashMismatchError, match="SHA-256 mismatch"):
        store.put_bytes(b"other bytes", expected_sha256=sha)
    assert list(store.tmp_dir.iterdir()) == [] and store.has(sha)
    assert [s for s, _ in store.iter_blobs()] == [sha]


def test_garbage_collection_respects_references_and_grace(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "files")
    keep = store.put_bytes(b"keep")
    orphan = store.put_bytes(b"orphan")
    (store.tmp_dir / "put-crashed.part").write_bytes(b"half")
    assert store.collect_garbage({keep.sha256}, grace_s=3600) == []  # too young: maybe an import in flight
    old = time.time() - 7200
    for path in (orphan.path, keep.path, store.tmp_dir / "put-crashed.part"):
        os.utime(path, (old, old))
    removed = store.collect_garbage({keep.sha256}, grace_s=3600)
    assert set(removed) == {orphan.path, store.tmp_dir / "put-crashed.part"}
    assert keep.path.is_file() and not orphan.path.exists()
    with pytest.raises(ValueError, match="not a SHA-256"):
        store.path_for("abc")


# ------------------------------------------------------------------------------------------ html

XSS = [
    '<script>alert("x")</script><p>ok</p>',
    '<img src=x onerror="alert(1)">',
    '<a href="javascript:alert(1)">click</a>',
    '<p onclick="steal()" style="background:url(javascript:alert(1))">hi</p>',
    '<iframe src="https://evil.example"></iframe><svg onload=alert(1)>',
    "<scr<script>ipt>alert(1)</script>",
    '<a href="https://civitai.com" onmouseover="x()">link</a>',
]


@pytest.mark.parametrize("payload", XSS)
def test_sanitiser_removes_scripts_and_handlers(payload: str) -> None:
    clean = sanitize_html(payload).lower()
    for bad in (
        "<script",
        "onerror",
        "onclick",
        "onload",
        "onmouseover",
        "javascript:",
        "<iframe",
        "<svg",
        "style=",
    ):
        assert bad not in clean
    assert "alert(1)" not in html_to_text(payload) or "<" not in html_to_text(payload)


def test_sanitiser_keeps_formatting_and_links() -> None:
    raw = '<h2>Usage</h2><p>Use <b>pixel art</b> at <i>0.8</i>.<br>See <a href="https://civitai.com/x">here</a></p>'
    clean = sanitize_html(raw)
    assert "<h2>Usage</h2>" in clean and "<b>pixel art</b>" in clean and "<br>" in clean
    assert 'href="https://civitai.com/x"' in clean and 'rel="noopener noreferrer nofollow"' in clean
    assert html_to_text(raw) == "Usage\nUse pixel art at 0.8.\nSee here"
    assert html_to_text("<p>a &amp; b</p><script>evil()</script>") == "a & b"
    assert sanitize_html(None) == "" and html_to_text("") == ""


# ------------------------------------------------------------------------------------------ names


@pytest.mark.parametrize(
    ("civitai", "family"),
    [
        ("SD 1.5", "sd1"),
        ("SD 1.4", "sd1"),
        ("SD 2.0", "sd2"),
        ("SD 2.0 768", "sd2"),
        ("SD 2.1", "sd2"),
        ("SD 2.1 768", "sd2"),
        ("SD 2.1 Unclip", "sd2"),
        ("SDXL 0.9", "sdxl"),
        ("SDXL 1.0", "sdxl"),
        ("Other", None),
        (None, None),
        ("", None),
    ],
)
def test_civitai_base_models_map_to_families(civitai: str | None, family: str | None) -> None:
    assert family_from_civitai(civitai) == family


@pytest.mark.parametrize(
    ("alias", "family"),
    [
        ("sd15", "sd1"),
        ("SD1.5", "sd1"),
        ("sd1", "sd1"),
        ("xl", "sdxl"),
        ("SDXL", "sdxl"),
        ("sd21", "sd2"),
        ("pocket", "pocket"),
        ("SD 1.5", "sd1"),
        (None, None),
    ],
)
def test_family_aliases(alias: str | None, family: str | None) -> None:
    assert normalize_family(alias) == family


def test_unknown_family_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown base family 'flux'"):
        normalize_family("flux")


# ------------------------------------------------------------------------------------------ text


def test_text_normalisation() -> None:
    assert (
        " ".join(clean_prompt("a cat <lora:cat_v2:0.8>, <lyco:x:1> \\(smile\\)").split()) == "a cat , (smile)"
    )
    assert words("Riyo_(lyomsnpmp), 1girl (masterpiece:1.2) 白发少女") == [
        "riyo",
        "lyomsnpmp",
        "1girl",
        "masterpiece",
        "白发",
        "发少",
        "少女",
    ]
    assert trigger_phrases(["pixel art, 8bit", "<lora:x:1>", "a b c d e f g"]) == {
        ("pixel", "art"),
        ("8bit",),
    }
    assert (
        remove_phrases("Pixel Art, a pixel-art castle, 8bit", ["pixel art", "8bit"])
        == ", a pixel-art castle, "
    )
    assert lexical.tokens("Looking_At_Viewer, <lora:x:1> (1girl:1.2)") == [
        "looking_at_viewer",
        "1girl",
        "1",
        "2",
    ]


def test_bm25_prefers_rare_terms_and_is_normalised() -> None:
    docs = ["a red car on a road", "a red apple", "a blue car", "zyxw sprite art"]
    counts = lexical.count_matrix(docs)
    vocab = lexical.Vocabulary.of(counts)
    compact = vocab.remap(counts)
    idf = lexical.idf_from_counts(compact)
    params = lexical.BM25Params()
    matrix = lexical.saturate(compact, params)
    scores = lexical.score(matrix, lexical.make_query("red car", vocab, idf), params)
    assert int(np.argmax(scores)) == 0 and scores[3] == 0.0
    rare = lexical.score(matrix, lexical.make_query("zyxw", vocab, idf), params)
    assert int(np.argmax(rare)) == 3 and 0.5 < rare[3] < 1.5
    assert lexical.make_query("unseen words only", vocab, idf).terms.size == 0


def test_cjk_runs_are_indexed_as_bigrams() -> None:
    """Names written without spaces are found by a part of them, as on Civitai ("胶片" → "胶片风")."""
    assert lexical.tokens("FilmGirl 胶片风, ShojoVibe少女感") == [
        "filmgirl",
        "胶片",
        "片风",
        "shojovibe",
        "少女",
        "女感",
    ]
    assert lexical.tokens("猫") == ["猫"]
    docs = ["FilmGirl 胶片风 LoRA", "ShojoVibe少女感", "plain english name"]
    counts = lexical.count_matrix(docs)
    vocab = lexical.Vocabulary.of(counts)
    compact = vocab.remap(counts)
    params = lexical.BM25Params()
    matrix = lexical.saturate(compact, params)
    idf = lexical.idf_from_counts(compact)
    for query, row in (("胶片", 0), ("少女", 1), ("shojovibe", 1)):
        scores = lexical.score(matrix, lexical.make_query(query, vocab, idf), params)
        assert int(np.argmax(scores)) == row and scores[row] > 0 and (np.delete(scores, row) == 0).all()


# ------------------------------------------------------------------------------------------ faiss


def clustered(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """Unit vectors around random centres (realistic for text embeddings, unlike uniform noise)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + 0.35 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_hnsw_recall_against_exact_and_persistence(tmp_path: Path) -> None:
    x = clustered(6000, 32, 60, seed=0)
    queries = clustered(200, 32, 60, seed=1)
    ids = np.arange(6000, dtype=np.int64) * 7 + 3
    config = VectorIndexConfig(exact_threshold=1000)
    approx = VectorIndex.build(x, ids, config)
    exact = VectorIndex.build(x, ids, config, kind="flat")
    assert approx.kind == "hnsw" and exact.kind == "flat"
    assert VectorIndex.build(x[:500], ids[:500], config).kind == "flat"
    assert recall_at_k(approx, exact, queries, 10) >= 0.95
    _, found = exact.search(queries[:1], 5)
    assert found[0][0] == ids[int(np.argmax(x @ queries[0]))]
    approx.save(tmp_path, "prompt")
    again = VectorIndex.load(tmp_path, "prompt")
    assert again.kind == "hnsw" and again.size == 6000
    assert np.array_equal(again.search(queries, 10)[1], approx.search(queries, 10)[1])
    with pytest.raises(FileNotFoundError):
        VectorIndex.load(tmp_path, "meta")
