"""The weight-space channels never take search down: a damaged encoder checkpoint or an unreadable stored
LoRA file is skipped with a warning (the index still builds, ``wsvd`` still computed), and ``catalog
reindex`` recomputes the channels, so an encoder added later gets its vectors written."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sqlalchemy import select

import adapters_db
from adapters_db import Catalog
from adapters_db.models import Embedding
from adapters_db.weightspace import ENCODER_DIR, WEIGHT_CHANNELS, stored_lora_files
from pipelines.lora_formats import save_kohya
from pipelines.weightspace import EncoderConfig, WeightEncoder, save_encoder
from studio.cli import main as cli
from tests.adapters_db.test_weightspace import STYLE_TEXT, _import, _rank, synthetic_lora

QUERY = "pixel art sprites"


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """Tiny tensors: one thread is fastest on a busy machine."""
    torch.set_num_threads(1)


def _populate(cat: Catalog, tmp_path: Path) -> dict[str, int]:
    """Two adapters with text per style, and two text-less ones (a pixel-art one, a neon one)."""
    ids: dict[str, int] = {}
    seed = 0
    for style, text in STYLE_TEXT.items():
        for j in range(2):
            seed += 1
            path = tmp_path / f"{style}_{j}.safetensors"
            save_kohya(synthetic_lora((style,), seed=seed), path)
            ids[f"{style}_{j}"] = _import(cat, path, name=f"{style} {j}", description_html=f"<p>{text}</p>")
    for name, style, seed in (("mystery", "pixel", 99), ("enigma", "neon", 98)):
        path = tmp_path / f"lora_{name}.safetensors"
        save_kohya(synthetic_lora((style,), seed=seed), path)
        ids[name] = _import(cat, path)
    return ids


def _encoder(cat: Catalog) -> WeightEncoder:
    """A small (untrained) encoder for the catalog's embedder: its vectors are unit vectors all the same."""
    torch.manual_seed(0)
    lora = synthetic_lora(("pixel",), seed=1)
    config = EncoderConfig.for_adapters([lora], cat.embedder.dim, cat.embedder.name, d_model=16, depth=1)
    return WeightEncoder(config).eval()


def _weight_rows(cat: Catalog) -> dict[str, set[int]]:
    """Adapter ids with a row, per weight-space channel."""
    out: dict[str, set[int]] = {}
    with cat.session() as s:
        rows = s.execute(
            select(Embedding.channel, Embedding.adapter_id).where(Embedding.channel.in_(WEIGHT_CHANNELS))
        )
        for channel, adapter_id in rows:
            out.setdefault(channel, set()).add(adapter_id)
    return out


@pytest.mark.parametrize("damage", ["truncated weights", "no weights file", "config not JSON", "no config"])
def test_a_broken_encoder_is_skipped_with_a_warning(
    sqlite_catalog: Catalog, tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    cat = sqlite_catalog
    ids = _populate(cat, tmp_path)
    folder = save_encoder(_encoder(cat), cat.data_dir / ENCODER_DIR)
    weights, config = folder / "model.safetensors", folder / "config.json"
    if damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:300])
    elif damage == "no weights file":
        weights.unlink()
    elif damage == "config not JSON":
        config.write_text("{not json", encoding="utf-8")
    else:
        config.unlink()
    with caplog.at_level(logging.WARNING, logger="adapters_db.weightspace"):
        rank, channels = _rank(cat, QUERY, ids["mystery"])
    assert rank <= 3 and channels["d_wsvd"] > 0.2, (rank, channels)
    assert channels.get("d_weights", 0.0) == 0.0
    assert str(folder) in caplog.text and "'weights' channel" in caplog.text, caplog.text
    assert _weight_rows(cat) == {"wsvd": {ids["mystery"], ids["enigma"]}}


def _damage(path: Path, how: str) -> None:
    """Make a stored LoRA file unreadable: NaN in a tensor, cut short, or gone."""
    os.chmod(path, os.stat(path).st_mode | stat.S_IWUSR)
    if how == "nan":
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata()
        tensors = load_file(str(path))
        key = next(k for k, v in tensors.items() if v.is_floating_point() and v.ndim == 2)
        tensors[key] = torch.full_like(tensors[key], float("nan"))
        save_file(tensors, str(path), metadata=metadata)
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:500])
    else:
        path.unlink()


@pytest.mark.parametrize("how", ["nan", "truncated", "deleted"])
def test_an_unreadable_lora_file_is_left_out_of_the_weight_channels(
    sqlite_catalog: Catalog, tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    cat = sqlite_catalog
    ids = _populate(cat, tmp_path)
    save_encoder(_encoder(cat), cat.data_dir / ENCODER_DIR)
    with cat.session() as s:
        files = stored_lora_files(s, cat)
    broken = (ids["enigma"], ids["neon_0"])  # a text-less adapter and a reference with text
    for adapter_id in broken:
        _damage(files[adapter_id][1], how)
    with caplog.at_level(logging.WARNING, logger="adapters_db.weightspace"):
        rank, channels = _rank(cat, QUERY, ids["mystery"])
    assert rank <= 3 and channels["d_wsvd"] > 0.2 and channels["d_weights"] != 0.0, (rank, channels)
    assert _weight_rows(cat) == {"wsvd": {ids["mystery"]}, "weights": {ids["mystery"]}}
    if how != "deleted":  # a missing file is not a stored file at all
        for adapter_id in broken:
            assert f"adapter {adapter_id}" in caplog.text and str(files[adapter_id][1]) in caplog.text
    # the text channels of the damaged adapters still work
    assert _rank(cat, "glowing neon signs", ids["neon_0"])[0] <= 3


def test_reindex_recomputes_the_weight_channels(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data"
    cat = adapters_db.open_catalog(None, data, embedder="hashing-64")
    ids = _populate(cat, tmp_path)
    with cat.session() as s:
        cat.search_index(s)  # the index is current: only the training-free channel
    assert _weight_rows(cat) == {"wsvd": {ids["mystery"], ids["enigma"]}}
    save_encoder(_encoder(cat), data / ENCODER_DIR)  # the README: add the encoder, rebuild the index
    assert cli(["catalog", "reindex", "--data-dir", str(data), "--embedder", "hashing-64"]) == 0
    assert "rebuilt the search index of 8 adapters" in capsys.readouterr().out
    textless = {ids["mystery"], ids["enigma"]}
    assert _weight_rows(cat) == {"wsvd": textless, "weights": textless}
    cat.dispose()
    again = adapters_db.open_catalog(None, data, embedder="hashing-64")
    try:
        with again.session() as s:
            index = again.search_index(s)
            assert index.last_event == "loaded" and "weights" in index.dense  # saved by reindex
        _, channels = _rank(again, QUERY, ids["mystery"])
        assert channels["d_weights"] != 0.0 and np.isfinite(channels["d_weights"])
    finally:
        again.dispose()
