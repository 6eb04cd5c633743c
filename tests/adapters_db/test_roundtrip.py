"""Import → browse → search → curate → delete round trips, on SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import func, select

import adapters_db
from adapters_db import Catalog, LicenceFlags
from adapters_db.models import Adapter, Embedding, PreviewImage, TriggerWord
from adapters_db.repository import get_adapters
from tests.adapters_db.conftest import civitai_record


def test_civitai_records_become_full_records(filled_catalog: Catalog) -> None:
    cat = filled_catalog
    with cat.session() as s:
        rec = adapters_db.find_by_civitai_id(s, cat, 1)
        assert rec is not None
        assert rec.name == "Pixel Art Style"
        assert rec.base_family == "sd1" and rec.base_model == "SD 1.5"
        assert rec.trigger_words == ("pixel art", "8bit")
        assert rec.tags == ("pixel art", "style")
        assert rec.stats.downloads == 5000 and rec.stats.rating == pytest.approx(4.5)
        assert rec.licence.allow_commercial_use == "None" and not rec.licence.commercial_ok
        assert rec.civitai_version_ids == (10,)
        assert rec.description_html == "<p>Makes <b>pixel art</b> sprites.</p>"
        assert rec.description_text == "Makes pixel art sprites."
        (version,) = rec.versions
        (file,) = version.files
        assert file.sha256 == f"{1:064x}" and file.autov2 == f"{1:064x}"[:10].upper()
        assert not file.is_local and file.remote_url.endswith("/models/10")
        assert adapters_db.local_file_path(rec) is None
        assert [i.prompt for i in version.images] == [
            "pixel art, a castle on a hill, 8bit, retro game",
            "pixel art, a knight, 8bit",
        ]
        assert version.images[0].params == {"sampler": "Euler a", "steps": 20, "cfgScale": 7, "seed": 42}
        assert version.images[0].negative_prompt == "lowres"
        assert adapters_db.find_by_hash(s, cat, file.autov2).id == rec.id
        assert adapters_db.find_by_hash(s, cat, file.sha256).id == rec.id
        xl = adapters_db.find_by_civitai_id(s, cat, 3)
        assert xl.base_family == "sdxl"
        assert adapters_db.find_by_civitai_id(s, cat, 5).nsfw_level == 2


def test_browse_filters_sort_and_pages(filled_catalog: Catalog) -> None:
    cat = filled_catalog
    with cat.session() as s:
        page = adapters_db.list_adapters(s, cat, sort="downloads", limit=3)
        assert page.total == 5  # the NSFW one is hidden by default
        assert [a.name for a in page.items] == ["Detail Tweaker", "Hatsune Miku", "Pixel Art Style"]
        page2 = adapters_db.list_adapters(s, cat, sort="downloads", limit=3, offset=3)
        assert [a.name for a in page2.items] == ["Watercolor Landscapes", "Cyberpunk City"]
        assert adapters_db.list_adapters(s, cat, include_nsfw=True).total == 6
        assert [a.name for a in adapters_db.list_adapters(s, cat, base_family="sdxl").items] == [
            "Hatsune Miku"
        ]
        assert adapters_db.list_adapters(s, cat, base_family="sd15").total == 4
        assert {a.name for a in adapters_db.list_adapters(s, cat, tags=["style"]).items} == {
            "Pixel Art Style",
            "Watercolor Landscapes",
        }
        assert [a.name for a in adapters_db.list_adapters(s, cat, licence="commercial").items] == [
            "Watercolor Landscapes"
        ]
        assert [a.name for a in adapters_db.list_adapters(s, cat, text="watercolor paintings").items] == [
            "Watercolor Landscapes"
        ]
        assert adapters_db.list_adapters(s, cat, local_only=True).total == 0
        assert [a.name for a in adapters_db.list_adapters(s, cat, sort="name", limit=2).items] == [
            "Cyberpunk City",
            "Detail Tweaker",
        ]
        with pytest.raises(ValueError, match="unknown sort"):
            adapters_db.list_adapters(s, cat, sort="loudest")
        with pytest.raises(ValueError, match="unknown base family"):
            adapters_db.list_adapters(s, cat, base_family="sd9")


def test_search_finds_by_trigger_tag_and_prompt(filled_catalog: Catalog) -> None:
    cat = filled_catalog
    with cat.session() as s:
        hits = adapters_db.search(s, cat, "a dragon in pixel art style, 8bit", k=3)
        assert hits[0].adapter.name == "Pixel Art Style"
        assert "trigger word" in hits[0].why and '"pixel art"' in hits[0].why
        assert [h.rank for h in hits] == [1, 2, 3]
        assert hits[0].score > hits[1].score
        hits = adapters_db.search(s, cat, "neon lights and rain at night, flying cars", k=2)
        assert hits[0].adapter.name == "Cyberpunk City"
        assert "similar prompt" in hits[0].why
        hits = adapters_db.search(s, cat, "hatsune miku on stage", k=5, base_family="sd15")
        assert "Hatsune Miku" not in [h.adapter.name for h in hits]
        hits = adapters_db.search(s, cat, "hatsune miku on stage", k=1, base_family="xl")
        assert hits[0].adapter.name == "Hatsune Miku"
        assert all(
            h.adapter.name != "Secret Style" for h in adapters_db.search(s, cat, "scrtstyl portrait", k=6)
        )
        nsfw = adapters_db.search(s, cat, "scrtstyl portrait", k=1, include_nsfw=True)
        assert nsfw[0].adapter.name == "Secret Style"
        hits = adapters_db.search(s, cat, "a painting", k=5, licence="commercial")
        assert [h.adapter.name for h in hits] == ["Watercolor Landscapes"]
        hits = adapters_db.search(s, cat, "a painting", k=5, tags=["style"])
        assert {h.adapter.name for h in hits} == {"Pixel Art Style", "Watercolor Landscapes"}
        by_downloads = adapters_db.search(s, cat, "a style", k=3, sort="downloads")
        downloads = [h.adapter.stats.downloads for h in by_downloads]
        assert downloads == sorted(downloads, reverse=True)
        for sort in ("name", "newest", "downloads"):  # another order, still only what matches
            named = adapters_db.search(s, cat, "scrtstyl", k=6, sort=sort, include_nsfw=True)
            assert [h.adapter.name for h in named] == ["Secret Style"], sort
            assert adapters_db.search(s, cat, "xqzzyv", k=6, sort=sort) == []
        assert (
            len(adapters_db.search(s, cat, "scrtstyl", k=6, include_nsfw=True)) == 6
        )  # a prompt: all ranked
        only = adapters_db.search(s, cat, "scrtstyl", k=6, include_nsfw=True, matching_only=True)
        assert [h.adapter.name for h in only] == ["Secret Style"]
        first, second = (adapters_db.search(s, cat, "pixel art", k=1, offset=o)[0] for o in (0, 1))
        assert first.adapter.id != second.adapter.id
        with pytest.raises(ValueError, match="empty query"):
            adapters_db.search(s, cat, "   ")


def test_search_leaves_out_excluded_images(filled_catalog: Catalog) -> None:
    cat = filled_catalog
    query = "cyberpunk city at night, neon lights, rain, flying cars"
    with cat.session() as s:
        image_id = s.execute(select(PreviewImage.id).where(PreviewImage.civitai_image_id == 400)).scalar_one()
        with_image = adapters_db.search(s, cat, query, k=1)[0]
        without = adapters_db.search(s, cat, query, k=6, exclude_image_ids=[image_id])
        target = next(h for h in without if h.adapter.name == "Cyberpunk City")
        assert with_image.adapter.name == "Cyberpunk City" and with_image.channels["p_max"] > 0.3
        assert target.channels["p_max"] == 0.0 and target.channels["p_doc"] == 0.0
        cold = adapters_db.search(
            s, cat, "pixel art castle", k=1, channels=["meta", "triggers", "fts", "dense"]
        )
        assert cold[0].adapter.name == "Pixel Art Style" and cold[0].channels["p_max"] == 0.0


def test_curate_then_delete(filled_catalog: Catalog) -> None:
    cat = filled_catalog
    with cat.session() as s:
        rec = adapters_db.find_by_civitai_id(s, cat, 4)
        updated = adapters_db.update_metadata(
            s,
            cat,
            rec.id,
            name="Neon Metropolis",
            tags=["city", "night"],
            trigger_words=["neonmtr"],
            description_html='<p onclick="x()">Rainy <script>alert(1)</script>streets</p>',
            base_family="sd15",
            licence=LicenceFlags(allow_commercial_use="Image"),
        )
        assert updated.name == "Neon Metropolis" and updated.trigger_words == ("neonmtr",)
        assert updated.description_html == "<p>Rainy streets</p>" and updated.licence.commercial_ok
        with pytest.raises(TypeError, match="unknown field"):
            adapters_db.update_metadata(s, cat, rec.id, colour="red")
    with cat.session() as s:
        assert adapters_db.search(s, cat, "neonmtr", k=1)[0].adapter.id == rec.id
        assert adapters_db.delete_adapter(s, cat, rec.id)
        assert not adapters_db.delete_adapter(s, cat, rec.id)
    with cat.session() as s:
        assert adapters_db.get_adapter(s, cat, rec.id) is None
        assert all(h.adapter.id != rec.id for h in adapters_db.search(s, cat, "neonmtr neon city", k=6))
        for model in (TriggerWord, PreviewImage, Embedding):
            assert (
                s.execute(select(func.count()).select_from(model).where(model.adapter_id == rec.id)).scalar()
                == 0
            )
        assert s.execute(select(func.count(Adapter.id))).scalar() == 5


def test_reimport_is_idempotent_and_updates(
    catalog: Catalog, small_records: list[dict], tmp_path: Path
) -> None:
    from tests.adapters_db.conftest import write_jsonl

    path = write_jsonl(tmp_path / "dump.jsonl.gz", small_records, gz=True)
    with catalog.session() as s:
        assert adapters_db.import_civitai_jsonl(s, catalog, path).count("imported") == 6
    with catalog.session() as s:
        again = adapters_db.import_civitai_jsonl(s, catalog, path)
        assert again.count("duplicate") == 6 and again.count("imported") == 0
    small_records[0]["name"] = "Pixel Art Style v2"
    small_records[0]["modelVersions"][0]["trainedWords"] = ["pxl"]
    write_jsonl(path, small_records, gz=True)
    with catalog.session() as s:
        third = adapters_db.import_civitai_jsonl(s, catalog, path)
        assert third.count("updated") == 1 and third.count("duplicate") == 5
        rec = adapters_db.find_by_civitai_id(s, catalog, 1)
        assert rec.name == "Pixel Art Style v2" and rec.trigger_words == ("pxl",)
        assert s.execute(select(func.count(Adapter.id))).scalar() == 6
        assert adapters_db.search(s, catalog, "pxl sprite", k=1)[0].adapter.id == rec.id


def test_summaries_are_full_records_without_versions(
    catalog: Catalog, lora_file: Callable[..., Path]
) -> None:
    """Search hits and listings read summaries with Core queries: the same record as the full one (its
    versions left out), the cover picked within the NSFW limit across versions, triggers merged."""
    two = civitai_record(7, "Two Versions", trained=["tvstyle", "shared"], tags=["style", "b", "a"])
    older = civitai_record(8, "older", trained=["shared", "oldword"], prompts=["tvstyle, a fox"])
    older["modelVersions"][0]["id"] = 71
    two["modelVersions"][0]["images"] = [
        {"id": 700, "url": "https://image.example/7/x.jpeg", "nsfw": "X", "meta": {"prompt": "tvstyle"}},
        {"id": 701, "url": "https://image.example/7/y.jpeg", "nsfw": "Mature", "meta": {"prompt": "tvstyle"}},
    ]
    two["modelVersions"].append(older["modelVersions"][0])
    plain = civitai_record(9, "No Pictures", trained=["nopics"])
    with catalog.session() as s:
        summary = adapters_db.import_civitai_records(s, catalog, [("7", two), ("9", plain)])
        assert summary.count("imported") == 2, summary.results
        local = adapters_db.import_file(s, catalog, lora_file("mine.safetensors"), tags=["mine"])
        assert local.status == "imported", local.message
    with catalog.session() as s:
        ids = list(s.scalars(select(Adapter.id).order_by(Adapter.id)))
        assert len(ids) == 3
        for max_nsfw in (0, 2, 3):
            full = get_adapters(s, catalog, ids, full=True, max_nsfw=max_nsfw)
            summaries = get_adapters(s, catalog, ids, max_nsfw=max_nsfw)
            assert summaries == {i: dataclasses.replace(r, versions=()) for i, r in full.items()}
        by_name = {r.name: r for r in summaries.values()}
    assert by_name["Two Versions"].trigger_words == ("tvstyle", "shared", "oldword")
    assert by_name["Two Versions"].tags == ("a", "b", "style")
    assert by_name["Two Versions"].civitai_version_ids == (70, 71)
    assert by_name["No Pictures"].cover_image is None and not by_name["No Pictures"].has_local_file
    assert summaries[local.adapter_id].has_local_file and summaries[local.adapter_id].tags == ("mine",)
    with catalog.session() as s:
        covers = {m: get_adapters(s, catalog, ids, max_nsfw=m) for m in (0, 2, 3)}
    seven = next(i for i, r in summaries.items() if r.name == "Two Versions")
    urls = {m: covers[m][seven].cover_image.url for m in covers}  # type: ignore[union-attr]
    assert urls == {
        0: "https://image.example/8/0.jpeg",  # both of the newer version's pictures are over the limit
        2: "https://image.example/7/y.jpeg",
        3: "https://image.example/7/x.jpeg",
    }
