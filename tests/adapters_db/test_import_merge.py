"""Civitai records and local files of the same LoRA meet in one adapter, whatever the import order; a
metadata refresh never drops what a local import added, and an unchanged record changes nothing."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image
from sqlalchemy import func, select

import adapters_db
from adapters_db import Catalog
from adapters_db.models import Adapter, AdapterFile, PreviewImage
from adapters_db.repository import catalog_counts
from adapters_db.store import sha256_file
from tests.adapters_db.conftest import civitai_record, write_jsonl


def _civitai_info(lora: Path, model_id: int, version_id: int, **fields: Any) -> Path:
    """Write the ``.civitai.info`` sidecar Civitai Helper keeps next to ``lora``."""
    info = {"modelId": model_id, "id": version_id, "baseModel": "SD 1.5", **fields}
    path = Path(f"{lora.with_suffix('')}.civitai.info")
    path.write_text(json.dumps(info), encoding="utf-8")
    return path


def _counts(catalog: Catalog) -> dict[str, int]:
    with catalog.session() as s:
        return catalog_counts(s)


def test_refresh_keeps_local_versions_files_and_previews(
    catalog: Catalog, lora_file: Callable[..., Path], tmp_path: Path
) -> None:
    record = civitai_record(777, "Watercolor Fox", trained=["wcfox"], prompts=["wcfox, a fox in the snow"])
    dump = write_jsonl(tmp_path / "rec.jsonl", [record])
    with catalog.session() as s:
        assert adapters_db.import_civitai_jsonl(s, catalog, dump).count("imported") == 1
    newer = lora_file("new_version.safetensors", seed=41)
    _civitai_info(newer, 777, 7771, name="v2.0", trainedWords=["wcfox2"], model={"name": "Watercolor Fox"})
    same = lora_file("same_version.safetensors", seed=42)
    _civitai_info(same, 777, 7770, name="v1.0", trainedWords=["wcfox"])
    Image.new("RGB", (16, 16), "blue").save(Path(f"{same.with_suffix('')}.preview.png"))
    with catalog.session() as s:
        assert adapters_db.import_file(s, catalog, newer).status == "updated"
        assert adapters_db.import_file(s, catalog, same).status == "updated"
    before = _counts(catalog)
    assert before["adapters"] == 1 and before["versions"] == 2 and before["local_files"] == 2
    with catalog.session() as s:
        again = adapters_db.import_civitai_jsonl(s, catalog, dump)
    assert again.count("duplicate") == 1, again.results  # an unchanged record changes nothing
    assert _counts(catalog) == before
    record["name"] = "Watercolor Fox II"
    record["modelVersions"][0]["trainedWords"] = ["wcfox", "snowfox"]
    write_jsonl(dump, [record])
    with catalog.session() as s:
        third = adapters_db.import_civitai_jsonl(s, catalog, dump)
    assert third.count("updated") == 1, third.results
    assert _counts(catalog) == before  # versions, local files, pictures and prompts all kept
    with catalog.session() as s:
        rec = adapters_db.find_by_civitai_id(s, catalog, 777)
        assert rec.name == "Watercolor Fox II" and rec.civitai_version_ids == (7771, 7770)
        new_v, old_v = rec.versions
        assert new_v.trigger_words == ("wcfox2",) and old_v.trigger_words == ("wcfox", "snowfox")
        assert [f.is_local for f in new_v.files] == [True]
        assert sorted(f.is_local for f in old_v.files) == [False, True]
        assert {f.sha256 for f in rec.files if f.is_local} == {sha256_file(newer), sha256_file(same)}
        assert [i.prompt for i in old_v.images if i.url] == ["wcfox, a fox in the snow"]
        assert any(i.local_path is not None for i in old_v.images)
        assert adapters_db.search(s, catalog, "snowfox", k=1)[0].adapter.id == rec.id


def test_merging_a_civitai_info_does_not_duplicate_its_pictures(
    catalog: Catalog, lora_file: Callable[..., Path], tmp_path: Path
) -> None:
    record = civitai_record(555, "Ink Pen", trained=["inkpen"], prompts=["inkpen, a cat", "inkpen, a dog"])
    with catalog.session() as s:
        adapters_db.import_civitai_records(s, catalog, [("r", record)])
    lora = lora_file("inkpen.safetensors", seed=43)
    version = record["modelVersions"][0]
    _civitai_info(lora, 555, version["id"], name="v1.0", images=version["images"])
    with catalog.session() as s:
        result = adapters_db.import_file(s, catalog, lora)
    assert result.status == "updated", result.message
    with catalog.session() as s:
        rec = adapters_db.find_by_civitai_id(s, catalog, 555)
        assert [i.civitai_image_id for i in rec.images] == [55500, 55501]
        assert [i.prompt for i in rec.images] == ["inkpen, a cat", "inkpen, a dog"]
        assert s.execute(select(func.count(PreviewImage.id))).scalar() == 2


def test_record_after_local_file_links_to_it(
    catalog: Catalog, lora_file: Callable[..., Path], tmp_path: Path
) -> None:
    path = lora_file("detail.safetensors", seed=44)
    with catalog.session() as s:
        local = adapters_db.import_file(s, catalog, path, tags=["mine"])
    record = civitai_record(
        58390, "Detail Tweaker", trained=["add_detail"], prompts=["add_detail, a cat"], sha256=local.sha256
    )
    dump = write_jsonl(tmp_path / "dump.jsonl", [record, civitai_record(9, "Someone Else")])
    with catalog.session() as s:
        summary = adapters_db.import_civitai_jsonl(s, catalog, dump)
    linked, other = summary.results
    assert linked.status == "updated" and linked.adapter_id == local.adapter_id, linked
    assert f"local adapter {local.adapter_id}" in linked.message and other.status == "imported"
    with catalog.session() as s:
        rec = adapters_db.get_adapter(s, catalog, local.adapter_id)
        assert rec.civitai_model_id == 58390 and rec.name == "Detail Tweaker"
        assert rec.trigger_words == ("add_detail",) and rec.civitai_version_ids == (583900,)
        (file,) = rec.files
        assert file.is_local and file.sha256 == local.sha256 and file.rank == 4
        assert s.execute(select(func.count(Adapter.id))).scalar() == 2
        assert s.execute(select(func.count(AdapterFile.id))).scalar() == 2
        hits = adapters_db.search(s, catalog, "add_detail, a cat", k=5)
        assert [h.adapter.id for h in hits].count(rec.id) == 1
    with catalog.session() as s:
        assert adapters_db.import_civitai_jsonl(s, catalog, dump).count("duplicate") == 2


def test_local_file_after_record_then_the_same_record(
    catalog: Catalog, lora_file: Callable[..., Path], tmp_path: Path
) -> None:
    path = lora_file("detail.safetensors", seed=45)
    record = civitai_record(58391, "Detail Tweaker", trained=["add_detail"], sha256=sha256_file(path))
    dump = write_jsonl(tmp_path / "dump.jsonl", [record])
    with catalog.session() as s:
        assert adapters_db.import_civitai_jsonl(s, catalog, dump).count("imported") == 1
        assert adapters_db.import_file(s, catalog, path).status == "updated"
    with catalog.session() as s:
        again = adapters_db.import_civitai_jsonl(s, catalog, dump)
    assert again.count("duplicate") == 1, again.results  # the file being local now is no change
    counts = _counts(catalog)
    assert counts["adapters"] == 1 and counts["files"] == 1 and counts["local_files"] == 1
