"""Folder imports of real users' ``models/Lora`` trees: the previews and sidecars A1111, Civitai Helper,
Civitai Browser+ and ComfyUI LoRA Manager write, broken sidecars, links, hidden and non-LoRA files, and
importing the same folder again."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import adapters_db
from adapters_db import Catalog
from adapters_db.dto import AdapterRecord, ImportSummary
from adapters_db.repository import catalog_counts
from adapters_db.store import sha256_file
from tests.adapters_db.conftest import civitai_record

HEADER = {"modelspec.trigger_phrase": "hdrword"}


def _picture(path: Path, size: tuple[int, int], fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, "red").save(path, format=fmt)
    return path


def _import(catalog: Catalog, root: Path) -> ImportSummary:
    with catalog.session() as s:
        return adapters_db.import_folder(s, catalog, root)


def _by_name(summary: ImportSummary) -> dict[str, Any]:
    return {Path(r.source).name: r for r in summary.results}


def _record(catalog: Catalog, adapter_id: int | None) -> AdapterRecord:
    assert adapter_id is not None
    with catalog.session() as s:
        rec = adapters_db.get_adapter(s, catalog, adapter_id)
    assert rec is not None
    return rec


def _counts(catalog: Catalog) -> dict[str, int]:
    with catalog.session() as s:
        return catalog_counts(s)


def _symlink(target: Path, link: Path) -> None:
    try:
        os.symlink(target, link, target_is_directory=target.is_dir())
    except (OSError, NotImplementedError):
        pytest.skip("this system cannot make symbolic links")


def test_previews_are_found_as_a1111_finds_them(
    catalog: Catalog, lora_file: Callable[..., Path], tmp_path: Path
) -> None:
    root = tmp_path / "Lora"
    lora_file("a.safetensors", folder=root)
    _picture(root / "a.preview.png", (20, 10))
    _picture(root / "a.PNG", (30, 10))  # A1111 matches case-insensitively; plain name before .preview
    _picture(root / "a.preview.jpeg", (40, 10), "JPEG")
    (root / "a.gif").write_bytes((root / "a.PNG").read_bytes())  # the same picture twice: one preview
    lora_file("b.safetensors", folder=root / "styles" / "ink")
    _picture(root / "styles" / "ink" / "b.Preview.PNG", (50, 10), "JPEG")  # Civitai Helper: any format
    summary = _import(catalog, root)
    assert summary.count("imported") == 2 and not summary.failed, summary.results
    a, b = (_record(catalog, _by_name(summary)[n].adapter_id) for n in ("a.safetensors", "b.safetensors"))
    assert [i.width for i in a.images] == [30, 20, 40]  # the first is the picture A1111 shows
    assert all(i.local_path is not None and i.local_path.is_file() for i in a.images)
    (pic,) = b.images
    assert pic.width == 50 and pic.local_path is not None and pic.local_path.suffix == ".jpg"
    assert b.extra["folder"] == "styles/ink" and "folder" not in a.extra


def _civitai_info(lora: Path, data: dict[str, Any], name: str = ".civitai.info") -> None:
    """As Civitai Helper writes it: ``json.dumps(info, indent=4)``."""
    Path(f"{lora.with_suffix('')}{name}").write_text(json.dumps(data, indent=4), encoding="utf-8")


def _version(lora: Path, version_id: int, model_id: int, **fields: Any) -> dict[str, Any]:
    """Civitai's model-version JSON for ``lora`` (``/model-versions/by-hash``)."""
    sha = sha256_file(lora)
    return {
        "id": version_id,
        "modelId": model_id,
        "name": "v1.0",
        "baseModel": "SD 1.5",
        "trainedWords": ["civword"],
        "files": [{"name": lora.name, "hashes": {"SHA256": sha.upper(), "AutoV2": sha[:10].upper()}}],
        "images": [{"id": version_id * 10, "url": f"https://image.example/{version_id}.jpeg", "meta": {}}],
        "model": {"name": f"Model {model_id}", "type": "LORA", "nsfw": False, "poi": False},
        **fields,
    }


def test_civitai_sidecars_of_every_shape(
    catalog: Catalog, lora_file: Callable[..., Path], tmp_path: Path
) -> None:
    # An adapter whose version id equals the model id an old Civitai Browser+ .civitai.info holds.
    other = civitai_record(50, "Someone Else")
    other["modelVersions"][0]["id"] = 111
    with catalog.session() as s:
        adapters_db.import_civitai_records(s, catalog, [("r", other)])
    root = tmp_path / "Lora"
    helper = lora_file("helper.safetensors", folder=root, metadata=HEADER)
    _civitai_info(helper, _version(helper, 901, 90))
    unknown = lora_file("unknown.safetensors", folder=root, metadata=HEADER)
    _civitai_info(unknown, {})  # Civitai Helper: "Civitai does not have this model"
    stale = lora_file("stale.safetensors", folder=root, metadata=HEADER)
    _civitai_info(stale, _version(helper, 902, 91))  # the info of another file left behind
    model_shaped = lora_file("browser.safetensors", folder=root, metadata=HEADER)
    first, second = _version(helper, 221, 111), _version(model_shaped, 222, 111, trainedWords=["brword"])
    model = {
        "id": 111,
        "name": "Browser Model",
        "description": "<p>from the model</p>",
        "type": "LORA",
        "nsfw": False,
        "tags": ["character", "anime"],
        "creator": {"username": "maker"},
        "modelVersions": [first, second],
    }
    _civitai_info(model_shaped, model)
    api_only = lora_file("api.safetensors", folder=root, metadata=HEADER)
    api_model = {**model, "id": 112, "modelVersions": [_version(api_only, 223, 112)]}
    _civitai_info(api_only, api_model, ".api_info.json")  # Civitai Browser+ "save API info"
    summary = _by_name(_import(catalog, root))
    assert all(r.status == "imported" for r in summary.values()), summary
    rec = _record(catalog, summary["helper.safetensors"].adapter_id)
    assert (rec.name, rec.source, rec.civitai_model_id, rec.civitai_version_ids) == (
        "Model 90",
        "civitai",
        90,
        (901,),
    )
    assert rec.trigger_words == ("civword",) and rec.base_family == "sd1" and rec.files[0].rank == 4
    assert rec.files[0].header_metadata["modelspec.trigger_phrase"] == "hdrword"  # header kept beside
    assert [i.url for i in rec.images] == ["https://image.example/901.jpeg"]
    for name in ("unknown.safetensors", "stale.safetensors"):
        rec = _record(catalog, summary[name].adapter_id)
        assert rec.source == "local" and rec.civitai_model_id is None and rec.trigger_words == ("hdrword",)
    assert summary["unknown.safetensors"].message == ""
    assert "describes another file" in summary["stale.safetensors"].message
    rec = _record(catalog, summary["browser.safetensors"].adapter_id)
    assert (rec.name, rec.civitai_model_id, rec.civitai_version_ids) == ("Browser Model", 111, (222,))
    assert rec.trigger_words == ("brword",) and rec.tags == ("anime", "character") and rec.creator == "maker"
    assert rec.description_text == "from the model"
    rec = _record(catalog, summary["api.safetensors"].adapter_id)
    assert (rec.civitai_model_id, rec.civitai_version_ids, rec.source) == (112, (223,), "civitai")
    with catalog.session() as s:
        untouched = adapters_db.find_by_civitai_id(s, catalog, 50)
    assert untouched is not None and untouched.civitai_version_ids == (111,) and not untouched.has_local_file


def test_a1111_and_lora_manager_metadata(
    catalog: Catalog, lora_file: Callable[..., Path], tmp_path: Path
) -> None:
    root = tmp_path / "loras"
    a = lora_file("a.safetensors", folder=root)
    Path(f"{a.with_suffix('')}.json").write_text(
        json.dumps(
            {
                "description": "",
                "sd version": "Unknown",
                "activation text": "aword, second word",
                "preferred weight": "0.6",
                "negative text": "blurry",
                "notes": "use with care",
            },
            indent=4,
            ensure_ascii=False,
        ),
        encoding="utf8",
    )
    b = lora_file("b.safetensors", folder=root)
    Path(f"{b.with_suffix('')}.json").write_text(
        json.dumps({"activation text": "bword", "preferred weight": 0})
    )
    c = lora_file("c.safetensors", folder=root)
    manager = {
        "file_name": "c",
        "model_name": "Manager Name",
        "base_model": "SD 1.5",
        "tags": ["Style", "watercolor"],
        "modelDescription": "<p>Soft <b>washes</b></p>",
        "notes": "my note",
        "usage_tips": json.dumps({"strength": 0.65}),
        "civitai": {"id": 801, "modelId": 80, "trainedWords": ["wash"], "model": {"name": "Civitai Name"}},
    }
    Path(f"{c.with_suffix('')}.metadata.json").write_text(json.dumps(manager))
    summary = _by_name(_import(catalog, root))
    assert all(r.status == "imported" and not r.message for r in summary.values()), summary
    rec = _record(catalog, summary["a.safetensors"].adapter_id)
    assert rec.trigger_words == ("aword", "second word") and rec.base_family == "sd1"
    assert rec.extra["preferred_weight"] == 0.6
    assert rec.extra["negative_text"] == "blurry" and rec.extra["notes"] == "use with care"
    rec = _record(catalog, summary["b.safetensors"].adapter_id)
    assert rec.trigger_words == ("bword",) and "preferred_weight" not in rec.extra  # 0 means "not set"
    rec = _record(catalog, summary["c.safetensors"].adapter_id)
    assert (rec.name, rec.civitai_model_id, rec.trigger_words) == ("Manager Name", 80, ("wash",))
    assert rec.tags == ("style", "watercolor") and rec.description_text == "Soft washes"
    assert rec.extra["preferred_weight"] == 0.65 and rec.extra["notes"] == "my note"


BROKEN: dict[str, bytes] = {
    "invalid.civitai.info": b'{"id": 5, "modelId": ',
    "empty.civitai.info": b"",
    "latin1.json": '{"activation text": "caf\u00e9"}'.encode("latin-1"),
    "array.civitai.info": b"[1, 2]",
    "types.civitai.info": json.dumps(
        {
            "id": "x",
            "modelId": [1],
            "baseModel": 15,
            "trainedWords": 7,
            "images": {"a": 1},
            "model": "not an object",
            "downloadUrl": {"x": 1},
            "description": ["no"],
        }
    ).encode(),
    "types.json": json.dumps(
        {"activation text": 5, "preferred weight": "heavy", "sd version": None}
    ).encode(),
    "types.metadata.json": json.dumps({"usage_tips": "{not json", "tags": "x", "civitai": "no"}).encode(),
    "images.civitai.info": json.dumps(
        {"id": 7, "modelId": 8, "images": [{"url": 5, "meta": "x", "width": "big"}, 3, None]}
    ).encode(),
}


def test_broken_sidecars_leave_the_file_imported_from_its_header(
    catalog: Catalog, lora_file: Callable[..., Path], tmp_path: Path
) -> None:
    root = tmp_path / "Lora"
    for name, data in BROKEN.items():
        stem = name.split(".", 1)[0]
        lora_file(f"{stem}.safetensors", folder=root, metadata=HEADER)
        (root / name).write_bytes(data)
    lora_file("bom.safetensors", folder=root, metadata=HEADER)
    (root / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps({"activation text": "bomword"}).encode())
    summary = _import(catalog, root)
    stems = {name.split(".", 1)[0] for name in BROKEN}
    assert summary.count("imported") == len(stems) + 1 and not summary.failed, summary.results
    results = _by_name(summary)
    for name in ("invalid.civitai.info", "empty.civitai.info", "latin1.json", "array.civitai.info"):
        result = results[f"{name.split('.', 1)[0]}.safetensors"]
        assert name in result.message, result
        assert _record(catalog, result.adapter_id).trigger_words == ("hdrword",)
    assert "not UTF-8" in results["latin1.safetensors"].message
    assert "empty" in results["empty.safetensors"].message
    rec = _record(catalog, results["types.safetensors"].adapter_id)
    assert rec.trigger_words == ("hdrword",) and rec.civitai_model_id is None and rec.base_family == "sd1"
    assert rec.source == "local" and rec.civitai_version_ids == ()
    assert "preferred weight" in results["types.safetensors"].message
    assert "usage_tips" in results["types.safetensors"].message
    rec = _record(catalog, results["images.safetensors"].adapter_id)
    assert rec.civitai_model_id == 8 and rec.source == "civitai" and rec.images == ()  # no URL: no picture
    rec = _record(catalog, results["bom.safetensors"].adapter_id)
    assert rec.trigger_words == ("bomword",) and results["bom.safetensors"].message == ""


def test_links_hidden_files_and_files_that_are_not_loras(
    catalog: Catalog, lora_file: Callable[..., Path], tmp_path: Path
) -> None:
    root, shared = tmp_path / "models" / "Lora", tmp_path / "shared_drive"
    lora_file("a.safetensors", folder=root)
    lora_file("c.safetensors", folder=shared)
    _picture(shared / "c.preview.png", (12, 12))
    _symlink(shared, root / "linked")
    _symlink(shared, shared / "loop")  # a link back up: must not recurse forever
    _symlink(root / "a.safetensors", root / "alias.safetensors")
    _symlink(tmp_path / "gone.safetensors", root / "gone.safetensors")
    lora_file("x.safetensors", folder=root / ".ipynb_checkpoints")
    (root / "._a.safetensors").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    save_file(
        {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)}, str(root / "ckpt.safetensors")
    )
    save_file({"emb_params": torch.zeros(2, 768)}, str(root / "emb.safetensors"))
    (root / "legacy.ckpt").write_bytes(b"\x80\x02}q\x00.")
    (root / "old.pt").write_bytes(b"PK\x03\x04")
    summary = _by_name(_import(catalog, root))
    assert sorted(summary) == [
        "a.safetensors",
        "alias.safetensors",
        "c.safetensors",
        "ckpt.safetensors",
        "emb.safetensors",
        "gone.safetensors",
        "legacy.ckpt",
        "old.pt",
    ]
    assert (
        summary["a.safetensors"].status == "imported" and summary["alias.safetensors"].status == "duplicate"
    )
    c = summary["c.safetensors"]
    assert c.status == "imported" and Path(c.source).parent.name == "linked"
    rec = _record(catalog, c.adapter_id)
    assert rec.extra["folder"] == "linked" and len(rec.images) == 1
    assert "broken symbolic link" in summary["gone.safetensors"].message
    assert "full model checkpoint" in summary["ckpt.safetensors"].message
    assert "embedding" in summary["emb.safetensors"].message
    assert all("refused unopened" in summary[n].message for n in ("legacy.ckpt", "old.pt"))
    assert {n for n, r in summary.items() if r.status == "failed"} == {
        "gone.safetensors",
        "ckpt.safetensors",
        "emb.safetensors",
        "legacy.ckpt",
        "old.pt",
    }
    assert _counts(catalog)["adapters"] == 2


def test_importing_again_is_idempotent_and_picks_up_changed_sidecars(
    catalog: Catalog, lora_file: Callable[..., Path], tmp_path: Path
) -> None:
    root = tmp_path / "Lora"
    a = lora_file("a.safetensors", folder=root, metadata=HEADER)
    _picture(root / "a.preview.png", (16, 16))
    user = root / "a.json"
    user.write_text(json.dumps({"activation text": "first"}))
    lora_file("b.safetensors", folder=root)
    _picture(root / "b.png", (16, 8))
    first = _import(catalog, root)
    assert first.count("imported") == 2, first.results
    adapter_id = _by_name(first)["a.safetensors"].adapter_id
    with catalog.session() as s:
        adapters_db.update_metadata(s, catalog, adapter_id, tags=["curated"])
    counts = _counts(catalog)
    assert counts["adapters"] == 2 and counts["images"] == 2 and counts["local_files"] == 2
    again = _import(catalog, root)
    assert again.count("duplicate") == 2 and again.describe().startswith("imported 0, updated 0"), (
        again.results
    )
    assert _counts(catalog) == counts
    user.write_text(json.dumps({"activation text": "second, third", "notes": "edited in A1111"}))
    _picture(root / "a.jpg", (16, 24), "JPEG")
    third = _by_name(_import(catalog, root))
    assert third["a.safetensors"].status == "updated" and third["b.safetensors"].status == "duplicate"
    rec = _record(catalog, adapter_id)
    assert rec.trigger_words == ("second", "third") and rec.extra["notes"] == "edited in A1111"
    assert sorted(i.height for i in rec.images) == [16, 24]  # the new picture added, the old one not doubled
    assert "curated" in rec.tags and len(rec.files) == 1 and rec.files[0].sha256 == sha256_file(a)
    assert _counts(catalog) == {**counts, "images": 3}
    fourth = _import(catalog, root)
    assert fourth.count("duplicate") == 2 and _counts(catalog) == {**counts, "images": 3}
    copy = tmp_path / "elsewhere" / "a_copy.safetensors"  # the same file elsewhere, other sidecars
    copy.parent.mkdir()
    copy.write_bytes(a.read_bytes())
    (copy.parent / "a_copy.json").write_text(json.dumps({"activation text": "copyword"}))
    (elsewhere,) = _import(catalog, copy.parent).results
    assert elsewhere.status == "duplicate" and elsewhere.adapter_id == adapter_id
    assert _record(catalog, adapter_id).trigger_words == ("second", "third")


def test_descriptions_are_read_in_a1111s_order(
    sqlite_catalog: Catalog, lora_file: Callable[..., Path], tmp_path: Path
) -> None:
    root = tmp_path / "loras"
    both = lora_file("both.safetensors", folder=root)
    (root / "both.txt").write_text("from the txt")
    (root / "both.description.txt").write_text("from the description.txt")
    over = lora_file("over.safetensors", folder=root)
    (root / "over.txt").write_text("from the txt")
    (root / "over.json").write_text(json.dumps({"description": "from the user metadata"}))
    results = _by_name(_import(sqlite_catalog, root))
    assert _record(sqlite_catalog, results[both.name].adapter_id).description_text == "from the txt"
    assert _record(sqlite_catalog, results[over.name].adapter_id).description_text == "from the user metadata"
