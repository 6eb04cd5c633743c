"""Weight-space retrieval: SVD features (deterministic, factorisation-invariant), label propagation, the
learned encoder (InfoNCE falls, retrieval beats chance, save/load), and a LoRA imported without any
text that search finds through the weight-space channels only."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import adapters_db
from adapters_db import Catalog, HashingEmbedder
from adapters_db.models import Embedding
from adapters_db.weightspace import embed_weight_channels, textless_adapter_ids
from pipelines.lora_formats import save_kohya
from pipelines.lora_weights import LoraLayer, LoraWeights
from pipelines.weightspace import (
    EncoderConfig,
    EncoderTrainConfig,
    SvdConfig,
    encode_weights,
    load_encoder,
    propagate_labels,
    save_encoder,
    svd_features,
    train_encoder,
)

BLOCK = "unet.down_blocks.0.attentions.0.transformer_blocks.0"
LAYERS = (f"{BLOCK}.attn1.to_q", f"{BLOCK}.attn1.to_k", f"{BLOCK}.attn1.to_v", f"{BLOCK}.attn1.to_out.0")
WIDTH = 320
COLOURS = ("red", "green", "blue")
OBJECTS = ("star", "heart")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny tensors: one thread is fastest (two threads on a busy 2-core machine stall in OpenMP)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _direction(name: str, layer: str, rank: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    digest = hashlib.sha256(f"{name}/{layer}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:4], "little"))
    return torch.randn(WIDTH, rank, generator=g), torch.randn(rank, WIDTH, generator=g) / WIDTH**0.5


def synthetic_lora(parts: tuple[str, ...], seed: int, noise: float = 0.3, family: str = "sd1") -> LoraWeights:
    """A rank-(2·parts + 2) LoRA: one fixed low-rank direction per part (a colour, an object, a style)
    plus seeded noise components, like LoRAs trained on pictures that share attributes."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for layer in LAYERS:
        ups, downs = [], []
        for part in parts:
            u, d = _direction(part, layer)
            ups.append(u * (1.0 + 0.2 * torch.rand(1, generator=g)))
            downs.append(d)
        ups.append(noise * torch.randn(WIDTH, 2, generator=g))
        downs.append(torch.randn(2, WIDTH, generator=g) / WIDTH**0.5)
        layers[layer] = LoraLayer(down=torch.cat(downs), up=torch.cat(ups, dim=1), alpha=None)
    return LoraWeights(layers=layers, family=family)


def test_svd_features_deterministic_and_invariant_to_the_factorisation() -> None:
    w = synthetic_lora(("red", "star"), seed=1)
    f1 = svd_features(w, LAYERS)
    assert np.array_equal(f1, svd_features(synthetic_lora(("red", "star"), seed=1), LAYERS))
    g = torch.Generator().manual_seed(5)
    refactored = {}
    for name, layer in w.layers.items():
        q, _ = torch.linalg.qr(torch.randn(layer.rank, layer.rank, generator=g))
        r = q @ torch.diag(torch.rand(layer.rank, generator=g) + 0.5)  # invertible, well conditioned
        refactored[name] = LoraLayer(down=torch.linalg.inv(r) @ layer.down, up=layer.up @ r, alpha=None)
    f2 = svd_features(LoraWeights(layers=refactored, family="sd1"), LAYERS)
    assert np.allclose(f1, f2, rtol=1e-3, atol=1e-4 * float(np.abs(f1).max()))
    # kohya alpha is part of ΔW: alpha = rank/2 halves every feature
    halved = {n: LoraLayer(lay.down, lay.up, alpha=lay.rank / 2) for n, lay in w.layers.items()}
    assert np.allclose(svd_features(LoraWeights(halved, "sd1"), LAYERS), f1 / 2, rtol=1e-4, atol=1e-6)
    other = svd_features(synthetic_lora(("blue", "heart"), seed=2), LAYERS)
    assert not np.allclose(f1, other, atol=1e-2)
    # a layer the adapter lacks is a block of zeros, the layer list fixes the layout
    width = SvdConfig().top_k + SvdConfig().sketch ** 2
    padded = svd_features(w, (*LAYERS, "unet.mid_block.attentions.0.proj_in"))
    assert padded.shape == (5 * width,) and not padded[4 * width :].any()
    assert np.array_equal(padded[: 4 * width], f1)


def test_label_propagation_gives_the_text_of_the_same_style() -> None:
    styles = ("pixel", "watercolor", "neon")
    refs = [synthetic_lora((s,), seed=10 + i * 3 + j) for i, s in enumerate(styles) for j in range(3)]
    ref_feats = np.stack([svd_features(w, LAYERS) for w in refs])
    text = np.eye(3, dtype=np.float32)[np.repeat(np.arange(3), 3)]  # one-hot "caption" per style
    queries = [synthetic_lora((s,), seed=100 + i) for i, s in enumerate(styles)]
    pseudo = propagate_labels(np.stack([svd_features(w, LAYERS) for w in queries]), ref_feats, text, k=3)
    assert pseudo.shape == (3, 3) and np.allclose(np.linalg.norm(pseudo, axis=1), 1.0, atol=1e-5)
    assert list(pseudo.argmax(axis=1)) == [0, 1, 2]


def _captioned(n_per: int, seed: int) -> tuple[list[LoraWeights], list[str]]:
    adapters, captions = [], []
    for ci, colour in enumerate(COLOURS):
        for oi, obj in enumerate(OBJECTS):
            for j in range(n_per):
                adapters.append(synthetic_lora((colour, obj), seed=seed + 100 * ci + 10 * oi + j))
                captions.append(f"a {colour} {obj}")
    return adapters, captions


def _recall_at_1(vectors: np.ndarray, captions: list[str], embedder: HashingEmbedder) -> float:
    distinct = sorted(set(captions))
    text = embedder.embed_texts(distinct)
    best = (vectors @ text.T).argmax(axis=1)
    return float(np.mean([distinct[b] == c for b, c in zip(best, captions, strict=True)]))


@pytest.fixture(scope="module")
def trained() -> tuple[object, list[float], list[LoraWeights], list[str]]:
    torch.manual_seed(0)
    embedder = HashingEmbedder(64)
    adapters, captions = _captioned(3, seed=0)
    config = EncoderConfig.for_adapters(adapters, embedder.dim, embedder.name, d_model=32, depth=1)
    model, losses = train_encoder(
        adapters, [embedder.embed_texts([c]) for c in captions], config, EncoderTrainConfig(steps=150)
    )
    return model, losses, adapters, captions


def test_encoder_learns_and_round_trips(trained: tuple, tmp_path: Path) -> None:
    model, losses, adapters, captions = trained
    embedder = HashingEmbedder(64)
    assert np.mean(losses[-15:]) < 0.6 * np.mean(losses[:15])
    vectors = encode_weights(model, adapters)
    assert vectors.shape == (len(adapters), 64)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert _recall_at_1(vectors, captions, embedder) >= 0.8  # chance: 1/6
    held_out, held_captions = _captioned(1, seed=7)
    assert _recall_at_1(encode_weights(model, held_out), held_captions, embedder) >= 0.5
    folder = save_encoder(model, tmp_path / "enc")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    again = load_encoder(folder)
    assert again.config == model.config
    assert np.allclose(encode_weights(again, adapters), vectors, atol=1e-6)
    # an adapter lacking layers is masked, not an error; one with none of them still gives a unit vector
    partial = LoraWeights({LAYERS[0]: adapters[0].layers[LAYERS[0]]}, "sd1")
    alien = LoraWeights({"unet.mid_block.attentions.0.proj_in": adapters[0].layers[LAYERS[0]]}, "sd1")
    out = encode_weights(again, [partial, alien])
    assert np.isfinite(out).all() and np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


STYLE_TEXT = {
    "pixel": "pixel art sprites for retro games, 8bit",
    "watercolor": "soft watercolor painting, paper texture",
    "neon": "glowing neon signs in the night",
}


def _import(catalog: Catalog, path: Path, **extra: object) -> int:
    with catalog.session() as s:
        result = adapters_db.import_file(s, catalog, path, **extra)
    assert result.status == "imported", result.message
    assert result.adapter_id is not None
    return result.adapter_id


def _rank(catalog: Catalog, query: str, adapter_id: int, **kw: object) -> tuple[int, dict[str, float]]:
    with catalog.session() as s:
        hits = adapters_db.search(s, catalog, query, k=50, **kw)
    for hit in hits:
        if hit.adapter.id == adapter_id:
            return hit.rank, hit.channels
    return 10**6, {}


def test_lora_without_text_is_found_through_the_weight_channels(
    sqlite_catalog: Catalog, trained: tuple, tmp_path: Path
) -> None:
    cat = sqlite_catalog
    seed = 0
    for style, text in STYLE_TEXT.items():
        for j in range(3):
            seed += 1
            path = tmp_path / f"{style}_{j}.safetensors"
            save_kohya(synthetic_lora((style,), seed=seed), path)
            _import(cat, path, name=f"{style.title()} Style {j}", description_html=f"<p>{text}</p>")
    for j in range(6):  # more adapters with text, unrelated to the query
        path = tmp_path / f"other_{j}.safetensors"
        save_kohya(synthetic_lora((f"other{j}",), seed=50 + j), path)
        _import(cat, path, name=f"Helper {j}", description_html="<p>a photo of a cat on a sofa</p>")
    mystery = tmp_path / "lora_0007.safetensors"
    save_kohya(synthetic_lora(("pixel",), seed=99), mystery)
    textless = _import(cat, mystery)
    with cat.session() as s:
        assert textless_adapter_ids(s) == {textless}
    query = "pixel art sprites"
    rank, channels = _rank(cat, query, textless)
    rank_without, _ = _rank(cat, query, textless, channels=("prompts", "meta", "triggers", "fts", "dense"))
    assert rank <= 4, (rank, channels)  # the three pixel-art adapters with text, then this one
    assert rank_without > 4 and rank < rank_without
    assert channels["d_wsvd"] > 0.2 and channels.get("d_weights", 0.0) == 0.0  # no encoder configured
    with cat.session() as s:
        hit = next(h for h in adapters_db.search(s, cat, query, k=10) if h.adapter.id == textless)
    assert "weight space" in hit.why  # said, not "popular adapter"
    assert _rank(cat, "soft watercolor painting", textless)[1]["d_wsvd"] < channels["d_wsvd"]

    # the learned channel: an encoder checkpoint for this embedder, written at the next rebuild
    model = trained[0]
    cat.weight_encoder = save_encoder(model, tmp_path / "encoder")
    with cat.session() as s:
        made = embed_weight_channels(cat, s)
        assert made == {"wsvd": 1, "weights": 1}
        assert s.query(Embedding).filter(Embedding.channel == "weights").count() == 1
    cat._search_index = None
    (cat.index_dir).exists() and __import__("shutil").rmtree(cat.index_dir)
    _, channels = _rank(cat, query, textless)
    assert "d_weights" in channels and channels["d_weights"] != 0.0
