"""``python -m studio catalog edit``: curating an adapter from the command line (what it changes, what a
re-import keeps, what it refuses) and ``catalog delete --keep-files``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

import adapters_db
from studio.cli import main
from tests.adapters_db.conftest import SMALL_CATALOG, write_jsonl


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    args = ["--data-dir", str(tmp_path / "data"), "--embedder", "hashing-64"]
    dump = write_jsonl(tmp_path / "dump.jsonl", SMALL_CATALOG)
    code, out, _ = run(capsys, "import-civitai", str(dump), "--no-embed", *args)
    assert code == 0 and "imported 6" in out
    return args


def _id_of(data: list[str], civitai_id: int) -> int:
    catalog = adapters_db.open_catalog(None, Path(data[1]), embedder="hashing-64")
    try:
        with catalog.session() as s:
            page = adapters_db.list_adapters(s, catalog, limit=50)
            return next(r.id for r in page.items if r.civitai_model_id == civitai_id)
    finally:
        catalog.dispose()


def test_edit_changes_tags_triggers_and_fields_and_a_reimport_keeps_them(
    data: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pixel = str(_id_of(data, 1))
    code, out, err = run(
        capsys,
        *("catalog", "edit", "--id", pixel, "--name", "Pixel Sprites", "--remove-tag", " STYLE "),
        *("--add-tag", "Retro  Game", "--trigger", "pxl", "--trigger", "8bit sprite", "--nsfw-level", "0"),
        *("--base", "sdxl", "--creator", "me", "--description", "<p>mine<script>alert(1)</script></p>"),
        *data,
    )
    assert code == 0, err
    shown = json.loads(out)
    assert shown["name"] == "Pixel Sprites" and shown["tags"] == ["pixel art", "retro game"]
    assert shown["trigger_words"] == ["pxl", "8bit sprite"] and shown["base_family"] == "sdxl"
    assert shown["nsfw_level"] == 0 and shown["creator"] == "me"
    assert set(shown["curated"]) == {
        "name",
        "tags",
        "trigger_words",
        "base_family",
        "nsfw_level",
        "creator",
        "description_html",
    }
    code, out, _ = run(capsys, "catalog", "show", "--id", pixel, *data)
    record = json.loads(out)
    assert "script" not in record["description_html"] and record["description_text"].strip() == "mine"
    # the same Civitai record imported again refreshes the rest but keeps the curator's edits
    dump = write_jsonl(tmp_path / "again.jsonl", SMALL_CATALOG[:1])
    assert run(capsys, "import-civitai", str(dump), "--no-embed", *data)[0] == 0
    record = json.loads(run(capsys, "catalog", "show", "--id", pixel, *data)[1])
    assert record["name"] == "Pixel Sprites" and record["tags"] == ["pixel art", "retro game"]
    assert record["trigger_words"] == ["pxl", "8bit sprite"]
    # the edit is searchable: the new trigger word finds the adapter first
    hits = json.loads(run(capsys, "search", "pxl knight", "-k", "1", "--json", *data)[1])["hits"]
    assert hits[0]["id"] == int(pixel)
    code, out, _ = run(capsys, "catalog", "edit", "--id", pixel, "--clear-tags", "--clear-triggers", *data)
    shown = json.loads(out)
    assert code == 0 and shown["tags"] == [] and shown["trigger_words"] == []


def test_edit_refuses_bad_input_and_changes_nothing(
    data: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    pixel = str(_id_of(data, 1))
    before = json.loads(run(capsys, "catalog", "show", "--id", pixel, *data)[1])
    code, _, err = run(capsys, "catalog", "edit", "--id", pixel, *data)
    assert code == 2 and "needs a change" in err
    code, _, err = run(capsys, "catalog", "edit", "--id", pixel, "--name", "  ", "--add-tag", "x", *data)
    assert code == 2 and "name cannot be empty" in err
    code, _, err = run(capsys, "catalog", "edit", "--id", pixel, "--base", "sd9", *data)
    assert code == 2 and "unknown base family" in err
    code, _, err = run(capsys, "catalog", "show", "--id", pixel, "--add-tag", "x", *data)
    assert code == 2 and "'catalog show' does not take --add-tag" in err
    code, out, _ = run(capsys, "catalog", "edit", "--id", "999999", "--name", "x", *data)
    assert code == 1 and "no adapter 999999" in out
    with pytest.raises(SystemExit):  # argparse: NSFW levels are 0..3
        main(["catalog", "edit", "--id", pixel, "--nsfw-level", "7", *data])
    capsys.readouterr()
    after = json.loads(run(capsys, "catalog", "show", "--id", pixel, *data)[1])
    assert after == before


def test_trigger_words_need_a_version(tmp_path: Path) -> None:
    from adapters_db.repository import NotFoundError, write_adapter
    from adapters_db.specs import AdapterSpec

    catalog = adapters_db.open_catalog(None, tmp_path / "data", embedder="hashing-64")
    try:
        with catalog.session() as s:
            adapter_id, _ = write_adapter(s, AdapterSpec(name="bare", source="local"))
            with pytest.raises(ValueError, match="no version to hold trigger words"):
                adapters_db.update_metadata(s, catalog, adapter_id, trigger_words=["zqx"], name="renamed")
            assert adapters_db.get_adapter(s, catalog, adapter_id).name == "bare"  # nothing half-applied
            with pytest.raises(NotFoundError):
                adapters_db.update_metadata(s, catalog, adapter_id + 100, name="x")
    finally:
        catalog.dispose()


def test_delete_keep_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], lora_file: Callable[..., Path]
) -> None:
    data = ["--data-dir", str(tmp_path / "data"), "--embedder", "hashing-64"]
    lora = lora_file("mine.safetensors", metadata={"modelspec.title": "Mine"})
    assert run(capsys, "import", str(lora), "--no-embed", *data)[0] == 0
    blobs = [p for p in (tmp_path / "data").rglob("*.safetensors") if "files" in p.parts]
    assert len(blobs) == 1
    catalog = adapters_db.open_catalog(None, tmp_path / "data", embedder="hashing-64")
    with catalog.session() as s:
        adapter_id = adapters_db.list_adapters(s, catalog, limit=5).items[0].id
    catalog.dispose()
    code, _, err = run(capsys, "catalog", "show", "--id", str(adapter_id), "--keep-files", *data)
    assert code == 2 and "--keep-files only applies to 'catalog delete'" in err
    code, out, _ = run(capsys, "catalog", "delete", "--id", str(adapter_id), "--keep-files", *data)
    assert code == 0 and "deleted" in out and blobs[0].is_file()
    stats = json.loads(run(capsys, "catalog", "stats", *data)[1])
    assert stats["adapters"] == 0
