"""Pure pieces of the UI: HTML escaping, the gate heatmap, plots, conflict maths, the history table."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adapters_db import AdapterRecord, FileRecord, ImageRecord, LicenceFlags, SearchHit, Stats, VersionRecord
from pipelines.lora_weights import LoraLayer, LoraWeights
from pipelines.recipe import AdapterSpec, MixRecipe
from studio.handlers import html as H
from studio.handlers import plots
from studio.handlers.conflicts import delta_cosine, family_warnings, pair_conflict
from studio.history import HistoryStore

EVIL = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def record(**changes) -> AdapterRecord:
    file = FileRecord(
        1,
        f"{EVIL}.safetensors",
        1234,
        "ab" * 32,
        "ABABABABAB",
        "kohya",
        True,
        True,
        None,
        Path("/nonexistent/x.safetensors"),
        4,
        {"ss_tag_frequency": json.dumps({"a": {"blue": 3, EVIL: 1}, "b": {"blue": 2}})},
    )
    image = ImageRecord(
        7,
        1,
        "preview",
        "javascript:alert(1)",
        None,
        64,
        64,
        0,
        f"a {EVIL} prompt",
        None,
        {"Steps": "20", "Sampler": EVIL},
    )
    version = VersionRecord(1, EVIL, "SD 1.5", "sd1", None, None, (EVIL, "zq"), (file,), (image,))
    base = AdapterRecord(
        id=3,
        name=EVIL,
        kind="lora",
        source="local",
        description_html="<p>kept <b>bold</b></p>",
        description_text="kept bold",
        base_family="sd1",
        base_model="SD 1.5",
        tags=(EVIL, "style"),
        trigger_words=(EVIL, "zq"),
        nsfw_level=0,
        creator=EVIL,
        licence=LicenceFlags("cc-by", True, "Sell"),
        stats=Stats(),
        civitai_model_id=None,
        civitai_version_ids=(),
        hf_repo=None,
        source_url="javascript:alert(2)",
        created_at=None,
        updated_at=None,
        versions=(version,),
        has_local_file=True,
        cover_image=image,
    )
    return replace(base, **changes)


def test_cards_and_detail_escape_every_catalog_string():
    rec = record()
    hit = SearchHit(rec, 1.0, f"why {EVIL}", {})
    for out in (H.hit_cards([hit]), H.record_cards([rec], why={3: EVIL}), H.detail_view(rec)):
        assert "<script>" not in out and "<img src=x" not in out and "javascript:" not in out
        assert "&lt;script&gt;" in out
    detail = H.detail_view(rec)
    assert "<p>kept <b>bold</b></p>" in detail  # the catalog's sanitised description is used as stored
    assert 'data-action="add" data-id="3"' in detail
    assert "blue × 5" in detail  # tag frequencies summed over datasets
    assert "Use this prompt" in detail and "cc-by" in detail


def test_image_sources(tmp_path):
    local = tmp_path / "p.png"
    Image.new("RGB", (4, 4)).save(local)
    img = ImageRecord(1, 1, "preview", "https://cdn.example/p.png", local, 4, 4, 0, None, None, {})
    assert H.image_src(img) == "gradio_api/file=" + str(local.resolve())
    assert H.image_src(replace(img, local_path=None)) == "https://cdn.example/p.png"
    assert H.image_src(replace(img, local_path=None, url="data:text/html,x")) is None
    card = H.adapter_card(record(has_local_file=False, cover_image=None, name="Solo Act"))
    assert "remote only" in card and 'data-action="add"' not in card and ">SA<" in card


def test_block_gates_average_the_layers_of_each_block():
    gates = torch.tensor(
        [[[1.0, 0.0], [3.0, 2.0], [5.0, 4.0]], [[2.0, 0.0], [4.0, 2.0], [6.0, 4.0]]]
    )  # steps × layers × columns
    ids, table = plots.block_gates(gates, ["OUT03", "IN01", "IN01"])
    assert ids == ["IN01", "OUT03"]
    assert table.shape == (2, 2, 2)
    assert np.allclose(table[0], [[4.0, 5.0], [1.0, 2.0]]) and np.allclose(table[1], [[3.0, 3.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match="do not match"):
        plots.block_gates(gates, ["IN01"])
    assert sorted(["OUT10", "M00", "IN02", "BASE", "OUT02"], key=plots.block_order) == [
        "BASE",
        "IN02",
        "M00",
        "OUT02",
        "OUT10",
    ]


def test_heatmap_has_a_panel_per_adapter():
    gates = torch.rand(5, 6, 3)
    blocks = ["IN01", "IN01", "M00", "OUT03", "OUT04", "BASE"]
    three = plots.gate_heatmap(gates, blocks, ["a", "b", "c"])
    one = plots.gate_heatmap(gates[:, :, :1], blocks, ["a"])
    assert three is not None and one is not None and three.width > one.width * 1.8
    assert plots.gate_heatmap(torch.zeros(0, 6, 0), blocks, []) is None
    assert plots.loss_curve([]) is None and plots.loss_curve([(1, 0.5), (2, 0.4)]).width > 100
    grid = plots.labelled_grid([Image.new("RGB", (10, 8)), Image.new("RGB", (10, 8))], ["a", "b"], columns=1)
    assert grid.size == (130, 2 * (104 + 18))  # enlarged 13× to reach 128 pixels
    big = plots.labelled_grid([Image.new("RGB", (200, 100))], ["x"])
    assert big.size == (200, 118)


def lora(seed: int, shape=(6, 5), rank=3, conv=False) -> LoraLayer:
    g = torch.Generator().manual_seed(seed)
    out, inp = shape
    if conv:
        return LoraLayer(
            torch.randn(rank, inp, 3, 3, generator=g), torch.randn(out, rank, 1, 1, generator=g), 2.0
        )
    return LoraLayer(torch.randn(rank, inp, generator=g), torch.randn(out, rank, generator=g), 2.0)


@pytest.mark.parametrize("conv", [False, True])
def test_delta_cosine_matches_the_dense_definition(conv):
    for a, b in ((lora(1, conv=conv), lora(2, conv=conv)), (lora(3, conv=conv), lora(3, conv=conv))):
        da, db = a.delta().flatten().double(), b.delta().flatten().double()
        want = float(da @ db / (da.norm() * db.norm()))
        assert delta_cosine(a, b) == pytest.approx(want, abs=1e-5)
    same = lora(4, conv=conv)
    assert delta_cosine(same, LoraLayer(same.down, -same.up, same.alpha)) == pytest.approx(-1.0, abs=1e-6)


def test_pair_conflict_counts_opposing_layers():
    a = LoraWeights({"l1": lora(1), "l2": lora(2), "l3": lora(3)}, "sd1")
    b = LoraWeights(
        {"l1": LoraLayer(a.layers["l1"].down, -a.layers["l1"].up, 2.0), "l2": lora(9), "l4": lora(4)}, "sd1"
    )
    c = pair_conflict(("a", a), ("b", b))
    assert (c.shared, c.opposing) == (2, ("l1",)) and c.share == 0.5


def test_family_warnings():
    assert family_warnings("sdxl", [("x", "sd1"), ("y", "sdxl"), ("z", None)]) == [
        "'x' is made for Stable Diffusion 1.x, but the loaded model is Stable Diffusion XL: it will not load."
    ]
    assert family_warnings(None, [("x", "sd1"), ("y", "sdxl")]) == [
        "the mix combines adapters of different base families (sd1, sdxl)."
    ]
    assert family_warnings("sd1", [("x", "sd1")]) == []


class FakeGeneration:
    """What HistoryStore.record needs of an engine Generation (PNG writing is the real one)."""

    def __init__(self, recipe: MixRecipe) -> None:
        self.recipe, self.seconds = recipe, 0.5
        self.images = [Image.new("RGB", (8, 8), (9, 9, 9)), Image.new("RGB", (8, 8), (1, 2, 3))]
        self.adapter_hashes = {"A": "cd" * 32}
        self.short_hashes = {"A": "cdcdcdcdcd"}

    def save(self, path: Path, index: int = 0) -> Path:
        from pipelines.pngmeta import pinned_recipe, save_png

        return save_png(
            self.images[index],
            path,
            pinned_recipe(self.recipe, self.adapter_hashes),
            short_hashes=self.short_hashes,
            sampler="DDIM",
            width=8,
            height=8,
        )


def test_history_records_searches_and_separates_owners(tmp_path):
    store = HistoryStore(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "history")
    a = MixRecipe(
        prompt="a 100% red circle", adapters=(AdapterSpec("sha256:" + "cd" * 32, name="A"),), seed=1
    )
    e1 = store.record(FakeGeneration(a), owner="ana", heatmap=Image.new("RGB", (4, 4)))
    e2 = store.record(FakeGeneration(a.with_(prompt="blue_square", fusion="ties")), owner="bo")
    assert [p.is_file() for p in e1.images] == [True, True] and e1.heatmap.is_file()
    assert e1.recipe.adapters[0].sha256 == "cd" * 32  # pinned
    assert store.get(e1.id).recipe == e1.recipe and store.get(e1.id, owner="ana").id == e1.id
    with pytest.raises(KeyError):
        store.get(e1.id, owner="bo")
    assert [e.id for e in store.search("ties")[0]] == [e2.id]
    assert [e.id for e in store.search("100%")[0]] == [e1.id]
    assert store.search("1%")[1] == 0  # % is literal, not a wildcard
    assert store.search("_")[0][0].id == e2.id and store.search("_")[1] == 1
    assert store.search("red A", owner="ana")[1] == 1 and store.search("red", owner="bo")[1] == 0
    entries, total = store.search()
    assert total == 2 and entries[0].id == e2.id  # newest first
    assert entries[0].created_at <= datetime.now(UTC)
