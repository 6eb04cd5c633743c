"""Curation review: edits, tags, re-imports over curated adapters, concurrency and errors, on SQLite and
PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

import adapters_db
from adapters_db import Catalog, LicenceFlags
from adapters_db.bulk import insert_new
from adapters_db.importers.civitai import civitai_spec
from adapters_db.models import SearchDocument, Tag
from adapters_db.repository import NotFoundError, add_version
from adapters_db.specs import VersionSpec
from adapters_db.store import sha256_file
from tests.adapters_db.conftest import civitai_record


def _import(catalog: Catalog, records: list[dict[str, Any]]) -> adapters_db.ImportSummary:
    with catalog.session() as s:
        return adapters_db.import_civitai_records(s, catalog, ((str(r["id"]), r) for r in records))


def _record(catalog: Catalog, civitai_id: int) -> adapters_db.AdapterRecord:
    with catalog.session() as s:
        rec = adapters_db.find_by_civitai_id(s, catalog, civitai_id)
    assert rec is not None
    return rec


def test_tags_differing_in_case_or_whitespace_are_one_tag(filled_catalog: Catalog) -> None:
    cat = filled_catalog
    rec = _record(cat, 4)
    with cat.session() as s:
        edited = adapters_db.update_metadata(
            s, cat, rec.id, tags=["Pixel  Art", " pixel art ", "PIXEL\tART", "Night\u00a0City"]
        )
        assert edited.tags == ("night city", "pixel art")
        insert_new(s, [civitai_spec(civitai_record(70, "Bulk One", tags=["Pixel   Art "]))])
    with cat.session() as s:
        assert s.execute(select(func.count(Tag.id)).where(Tag.name.like("pixel%art"))).scalar() == 1
        found = adapters_db.list_adapters(s, cat, tags=["pixel    ART"])
        assert {a.name for a in found.items} == {"Pixel Art Style", "Cyberpunk City", "Bulk One"}


def test_a_rejected_edit_leaves_nothing_behind(filled_catalog: Catalog) -> None:
    cat = filled_catalog
    rec = _record(cat, 1)
    bad: list[dict[str, Any]] = [
        {"name": "Half Done", "tags": ["half"], "nsfw_level": 9},
        {"name": "Half Done", "trigger_words": ["halfword"], "base_family": "sd9"},
        {"name": "Half Done", "tags": "style"},  # one string, not a list of tags
    ]
    for changes in bad:
        # the caller catches the error and commits the rest of its work
        with cat.session() as s, pytest.raises((ValueError, TypeError)):
            adapters_db.update_metadata(s, cat, rec.id, **changes)
    after = _record(cat, 1)
    assert (after.name, after.tags, after.trigger_words) == (rec.name, rec.tags, rec.trigger_words)
    with cat.session() as s:
        assert s.get(SearchDocument, rec.id).name == "Pixel Art Style"
        assert s.execute(select(func.count(Tag.id)).where(Tag.name == "half")).scalar() == 0


def test_reimport_keeps_what_a_person_curated(filled_catalog: Catalog, small_records: list[dict]) -> None:
    cat = filled_catalog
    rec = _record(cat, 1)
    with cat.session() as s:
        adapters_db.update_metadata(
            s,
            cat,
            rec.id,
            name="Retro Sprites",
            tags=["retro"],
            trigger_words=["rtrsprt"],
            description_html="<p>My own notes</p>",
            nsfw_level=1,
            licence=LicenceFlags(allow_commercial_use="Image"),
        )
    again = _import(cat, small_records)  # the same dump once more
    assert again.count("duplicate") == 6, again.results
    small_records[0]["stats"]["downloadCount"] = 7777  # Civitai's record changed since
    small_records[0]["name"] = "Pixel Art Style (fixed)"
    small_records[0]["modelVersions"][0]["trainedWords"] = ["pixel art", "16bit"]
    third = _import(cat, small_records)
    assert third.count("updated") == 1, third.results
    after = _record(cat, 1)
    assert after.name == "Retro Sprites" and after.tags == ("retro",)
    assert after.trigger_words == ("rtrsprt",) and after.description_text == "My own notes"
    assert after.nsfw_level == 1 and after.licence.allow_commercial_use == "Image"
    assert after.stats.downloads == 7777  # what nobody curated follows the record
    with cat.session() as s:
        ids = adapters_db.list_adapters(s, cat, text="retro sprites", include_nsfw=True).items
        assert [a.id for a in ids] == [rec.id]


def test_long_creator_and_licence_are_stored_on_every_backend(filled_catalog: Catalog) -> None:
    cat = filled_catalog
    rec = _record(cat, 2)
    with cat.session() as s:
        adapters_db.update_metadata(
            s,
            cat,
            rec.id,
            creator="é" * 300,
            licence=LicenceFlags(license="L" * 150, allow_commercial_use="Sell," * 40),
        )
    after = _record(cat, 2)
    assert after.creator == "é" * 200 and after.licence.license == "L" * 100
    assert len(after.licence.allow_commercial_use or "") <= 100


def test_concurrent_edits_that_create_the_same_tag_both_succeed(filled_catalog: Catalog) -> None:
    cat = filled_catalog
    first, second = _record(cat, 1).id, _record(cat, 2).id
    errors: list[BaseException] = []

    def other() -> None:
        try:
            with cat.session() as s:
                adapters_db.update_metadata(s, cat, second, tags=["brand new"])
        except BaseException as exc:
            errors.append(exc)

    with cat.session() as s:
        adapters_db.update_metadata(s, cat, first, tags=["brand new"])  # flushed, not committed
        worker = threading.Thread(target=other)
        worker.start()
        time.sleep(1.0)  # the other edit now waits for this transaction
    worker.join(60)
    assert not errors, errors
    assert _record(cat, 1).tags == ("brand new",) and _record(cat, 2).tags == ("brand new",)


def test_a_downloaded_file_is_local_for_every_adapter_that_lists_it(
    catalog: Catalog, lora_file: Callable[..., Path]
) -> None:
    path = lora_file("shared.safetensors")
    sha = sha256_file(path)
    records = [civitai_record(81, "Original Upload", sha256=sha), civitai_record(82, "Reupload", sha256=sha)]
    assert _import(catalog, records).count("imported") == 2
    with catalog.session() as s:
        result = adapters_db.import_file(s, catalog, path)
    assert result.ok, result
    assert _record(catalog, 81).has_local_file and _record(catalog, 82).has_local_file


def test_merging_into_a_version_of_another_adapter_is_a_clear_error(filled_catalog: Catalog) -> None:
    cat = filled_catalog
    mine, theirs = _record(cat, 1), _record(cat, 2)
    with cat.session() as s, pytest.raises(NotFoundError, match="no version"):
        add_version(s, mine.id, VersionSpec(name="x"), merge_into=theirs.versions[0].id)
