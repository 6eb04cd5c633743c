"""Local files: .safetensors import, A1111/ComfyUI folders with sidecars, every kind of bad input, and
crash safety between the file write and the commit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin
from sqlalchemy import func, select

import adapters_db
from adapters_db import Catalog
from adapters_db.models import Adapter, AdapterFile
from adapters_db.store import sha256_file
from tests.adapters_db.conftest import civitai_record

ROOT = Path(__file__).resolve().parents[2]


def test_import_file_reads_header_hashes_and_stores(catalog: Catalog, lora_file: Callable[..., Path]) -> None:
    path = lora_file(
        "pixel_v1.safetensors",
        metadata={
            "modelspec.title": "Pixel Sprites",
            "modelspec.trigger_phrase": "pxsprite, 16bit",
            "modelspec.description": "<b>Tiny</b> sprites",
        },
    )
    sha = sha256_file(path)
    with catalog.session() as s:
        result = adapters_db.import_file(s, catalog, path, tags=["Style"])
    assert result.status == "imported" and result.sha256 == sha and result.name == "Pixel Sprites"
    with catalog.session() as s:
        rec = adapters_db.get_adapter(s, catalog, result.adapter_id)
        assert rec.base_family == "sd1" and rec.source == "local" and rec.tags == ("style",)
        assert rec.trigger_words == ("pxsprite", "16bit") and rec.description_text == "Tiny sprites"
        (file,) = rec.files
        assert file.sha256 == sha and file.autov2 == sha[:10].upper() and file.rank == 4
        assert (
            file.format == "kohya" and file.header_metadata["modelspec.trigger_phrase"] == "pxsprite, 16bit"
        )
        local = adapters_db.local_file_path(rec)
        assert local == catalog.store.path_for(sha) and local.read_bytes() == path.read_bytes()
        assert rec.has_local_file
        assert adapters_db.search(s, catalog, "pxsprite castle", k=1)[0].adapter.id == rec.id


def test_duplicate_is_reported_not_doubled(
    catalog: Catalog, lora_file: Callable[..., Path], tmp_path: Path
) -> None:
    path = lora_file("a.safetensors", seed=7)
    copy = tmp_path / "elsewhere" / "renamed.safetensors"
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    with catalog.session() as s:
        first = adapters_db.import_file(s, catalog, path)
    with catalog.session() as s:
        second = adapters_db.import_file(s, catalog, copy)
    assert first.status == "imported"
    assert second.status == "duplicate" and second.adapter_id == first.adapter_id
    assert "already in the catalog" in second.message
    with catalog.session() as s:
        assert s.execute(select(func.count(AdapterFile.id))).scalar() == 1
    assert len(list(catalog.store.iter_blobs())) == 1


def test_local_file_links_to_its_catalogued_civitai_entry(
    catalog: Catalog, lora_file: Callable[..., Path]
) -> None:
    path = lora_file("detail.safetensors", seed=3)
    record = civitai_record(58390, "Detail Tweaker", trained=["add_detail"], sha256=sha256_file(path))
    with catalog.session() as s:
        adapters_db.import_civitai_records(s, catalog, [("r", record)])
    with catalog.session() as s:
        result = adapters_db.import_file(s, catalog, path)
        assert result.status == "updated" and "linked" in result.message
        rec = adapters_db.get_adapter(s, catalog, result.adapter_id)
        assert rec.civitai_model_id == 58390 and rec.has_local_file and rec.files[0].rank == 4
        assert s.execute(select(func.count(Adapter.id))).scalar() == 1
        assert adapters_db.list_adapters(s, catalog, local_only=True).total == 1


def _bad_inputs(folder: Path, good: Path) -> dict[str, tuple[Path, str]]:
    data = good.read_bytes()
    cases = {
        "garbage": (folder / "garbage.safetensors", "NotSafetensorsError"),
        "truncated": (folder / "half_downloaded.safetensors", "truncated"),
        "pickle": (folder / "old.ckpt", "pickled"),
        "unknown": (folder / "notes.lora", "unknown file type"),
        "not_a_lora": (folder / "checkpoint.safetensors", "UnknownFormatError"),
        "missing": (folder / "nope.safetensors", "no such file"),
    }
    cases["garbage"][0].write_bytes(b"\x00garbage" * 50)
    cases["truncated"][0].write_bytes(data[: len(data) - 300])
    cases["pickle"][0].write_bytes(b"PK\x03\x04" + b"\x00" * 200)
    cases["unknown"][0].write_text("hello")
    import torch
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.input_blocks.0.weight": torch.zeros(4, 4)}, str(cases["not_a_lora"][0]))
    return cases


@pytest.mark.parametrize("case", ["garbage", "truncated", "pickle", "unknown", "not_a_lora", "missing"])
def test_bad_file_fails_cleanly(
    catalog: Catalog, lora_file: Callable[..., Path], tmp_path: Path, case: str
) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    path, message = _bad_inputs(folder, lora_file("good.safetensors"))[case]
    with catalog.session() as s:
        result = adapters_db.import_file(s, catalog, path)
    assert result.status == "failed" and message in result.message and str(path.name) in result.message
    with catalog.session() as s:
        assert s.execute(select(func.count(Adapter.id))).scalar() == 0
    assert list(catalog.store.iter_blobs()) == []  # nothing partial in the store either
    assert not catalog.store.tmp_dir.exists() or list(catalog.store.tmp_dir.iterdir()) == []


def _png_with_parameters(path: Path, text: str, colour: str = "red") -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (24, 16), colour).save(path, pnginfo=info)
    return path


def test_folder_with_sidecars_and_a_bad_batch(
    catalog: Catalog, lora_file: Callable[..., Path], tmp_path: Path
) -> None:
    root = tmp_path / "models" / "Lora"
    sub = root / "styles"
    sub.mkdir(parents=True)
    civ = lora_file("ghibli.safetensors", folder=sub)
    (sub / "ghibli.civitai.info").write_text(
        json.dumps(
            {
                "id": 777,
                "modelId": 77,
                "name": "v2",
                "trainedWords": ["ghibli style"],
                "baseModel": "SD 1.5",
                "description": "<p>version notes</p>",
                "model": {
                    "name": "Ghibli Backgrounds",
                    "type": "LORA",
                    "nsfw": False,
                    "description": "<p>Painted <script>x()</script>skies</p>",
                },
                "images": [
                    {
                        "id": 9001,
                        "url": "https://image.example/1.jpeg",
                        "nsfw": "None",
                        "width": 512,
                        "height": 512,
                        "meta": {"prompt": "ghibli style, a hill town", "steps": 25},
                    }
                ],
            }
        )
    )
    _png_with_parameters(
        Path(f"{civ.with_suffix('')}.preview.png"),
        "ghibli style, a windmill\nNegative prompt: lowres\nSteps: 20, Sampler: Euler a, "
        "CFG scale: 7, Seed: 1234, Size: 512x512",
    )
    lora_file("inkpen.safetensors", folder=root)
    (root / "inkpen.json").write_text(
        json.dumps(
            {
                "description": "Ink pen drawings",
                "sd version": "SD1",
                "activation text": "inkpen, lineart",
                "preferred weight": 0.7,
            }
        )
    )
    (root / "inkpen.txt").write_text("Black ink line art.")
    lora_file("plain.safetensors", folder=root)
    broken = lora_file("broken.safetensors", folder=root)
    broken.write_bytes(broken.read_bytes()[:200])
    bad_sidecar = lora_file("badcar.safetensors", folder=root)
    Path(f"{bad_sidecar.with_suffix('')}.civitai.info").write_text("{not json")
    (root / "legacy.pt").write_bytes(b"\x80\x02}q\x00.")
    with catalog.session() as s:
        summary = adapters_db.import_folder(s, catalog, tmp_path / "models")
    assert summary.count("imported") == 4 and summary.count("failed") == 2, summary.results
    failed = {Path(r.source).name: r.message for r in summary.failed}
    assert "truncated" in failed["broken.safetensors"] and "pickled" in failed["legacy.pt"]
    badcar = next(r for r in summary.results if Path(r.source).name == "badcar.safetensors")
    assert badcar.status == "imported" and "unreadable JSON sidecar" in badcar.message
    assert summary.describe() == "imported 4, updated 0, duplicate 0, skipped 0, failed 2"
    with catalog.session() as s:
        ghibli = adapters_db.find_by_civitai_id(s, catalog, 77)
        assert ghibli.name == "Ghibli Backgrounds" and ghibli.trigger_words == ("ghibli style",)
        assert ghibli.description_html == "<p>Painted skies</p>" and ghibli.source == "civitai"
        assert ghibli.civitai_version_ids == (777,)
        previews = ghibli.images
        local = next(i for i in previews if i.local_path is not None)
        assert local.prompt == "ghibli style, a windmill" and local.negative_prompt == "lowres"
        assert local.params["Sampler"] == "Euler a" and local.params["Seed"] == "1234"
        assert local.width == 24 and local.local_path.is_file()
        assert any(i.prompt == "ghibli style, a hill town" and i.url for i in previews)
        ink = adapters_db.list_adapters(s, catalog, text="inkpen").items[0]
        assert ink.trigger_words == ("inkpen", "lineart")
        assert ink.description_text == "Ink pen drawings"  # A1111: the .json description wins over the .txt
        assert ink.extra["preferred_weight"] == 0.7
        assert s.execute(select(func.count(Adapter.id))).scalar() == 4
        hit = adapters_db.search(s, catalog, "a windmill on a hill", k=1)[0]
        assert hit.adapter.name == "Ghibli Backgrounds" and "similar prompt" in hit.why


def test_civitai_dump_bad_records_do_not_stop_the_batch(catalog: Catalog, tmp_path: Path) -> None:
    from tests.adapters_db.conftest import write_jsonl

    checkpoint = civitai_record(11, "A Checkpoint")
    checkpoint["type"] = "Checkpoint"
    no_versions = civitai_record(12, "Empty")
    no_versions["modelVersions"] = []
    no_name = civitai_record(13, "x")
    del no_name["name"]
    path = write_jsonl(
        tmp_path / "dump.jsonl",
        [
            civitai_record(10, "Good One", trained=["good"]),
            "{broken json",
            checkpoint,
            no_versions,
            no_name,
            '"a string"',
            civitai_record(14, "Good Two"),
        ],
    )
    with catalog.session() as s:
        summary = adapters_db.import_civitai_jsonl(s, catalog, path)
    assert summary.count("imported") == 2 and summary.count("failed") == 5
    messages = " | ".join(r.message for r in summary.failed)
    for needle in (
        "line 2: invalid JSON",
        "is a Checkpoint, not a LoRA",
        "has no modelVersions",
        "missing field 'name'",
        "expected a JSON object",
    ):
        assert needle in messages
    with catalog.session() as s:
        assert sorted(a.name for a in adapters_db.list_adapters(s, catalog).items) == ["Good One", "Good Two"]
    with pytest.raises(FileNotFoundError), catalog.session() as s:
        adapters_db.import_civitai_jsonl(s, catalog, tmp_path / "absent.jsonl")


def test_broken_dumps_keep_what_they_can_and_the_batch_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A truncated .gz, a plain file named .gz, a line of invalid UTF-8 and a missing file each fail alone."""
    from studio.cli import main
    from tests.adapters_db.conftest import write_jsonl

    records = [civitai_record(100 + i, f"Style {i}", trained=[f"style{i}"]) for i in range(60)]
    full = write_jsonl(tmp_path / "full.jsonl.gz", records, gz=True).read_bytes()
    truncated = tmp_path / "c_trunc.jsonl.gz"
    truncated.write_bytes(full[: len(full) // 2])
    fake = write_jsonl(tmp_path / "notgz.jsonl.gz", [civitai_record(200, "Plain Text")])
    bad_utf8 = tmp_path / "c_bad.jsonl"
    bad_utf8.write_bytes(
        json.dumps(civitai_record(300, "Before")).encode()
        + b"\n\xff\xfe{}\n"
        + json.dumps(civitai_record(301, "After")).encode()
        + b"\n"
    )
    last = write_jsonl(tmp_path / "last.jsonl", [civitai_record(400, "Last One")])
    data = ["--data-dir", str(tmp_path / "data"), "--embedder", "hashing-64", "--no-embed"]
    missing = tmp_path / "not_there.jsonl"
    code = main(["import-civitai", str(truncated), str(fake), str(bad_utf8), str(missing), str(last), *data])
    out, err = capsys.readouterr()
    failed = [line for line in err.splitlines() if line.startswith("failed")]
    assert code == 0 and len(failed) == 4, err
    assert "c_trunc.jsonl.gz" in failed[0] and "truncated or corrupt" in failed[0]
    assert "notgz.jsonl.gz" in failed[1] and "Not a gzipped file" in failed[1]
    assert "c_bad.jsonl:2" in failed[2] and "invalid JSON" in failed[2] and "UTF-8" in failed[2]
    assert "not_there.jsonl" in failed[3] and "no such file" in failed[3]
    catalog = adapters_db.open_catalog(None, tmp_path / "data", embedder="hashing-64")
    with catalog.session() as s:
        names = {a.name for a in adapters_db.list_adapters(s, catalog, limit=100).items}
    catalog.dispose()
    styles = {n for n in names if n.startswith("Style ")}
    assert names - styles == {"Before", "After", "Last One"}
    assert styles == {f"Style {i}" for i in range(len(styles))} and 0 < len(styles) < 60
    assert f"summary: imported {len(names)}, updated 0, duplicate 0, skipped 0, failed 4" in out


def test_lora_with_non_finite_weights_is_refused(
    catalog: Catalog, lora_file: Callable[..., Path], tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "batch"
    good = lora_file("good.safetensors", folder=folder)
    for name, bad in (("nan.safetensors", float("nan")), ("inf.safetensors", float("-inf"))):
        tensors = load_file(str(lora_file(name, folder=folder)))
        key = next(k for k in sorted(tensors) if k.endswith("lora_up.weight"))
        tensors[key][3, 1] = bad
        save_file(tensors, str(folder / name))
    with catalog.session() as s:
        summary = adapters_db.import_paths(s, catalog, [folder])
    assert summary.count("imported") == 1 and summary.count("failed") == 2, summary.results
    for result in summary.failed:
        assert "NonFiniteWeightsError" in result.message and "lora_up.weight" in result.message
        assert Path(result.source).name in result.message
    assert {"NaN", "infinite"} <= {w for r in summary.failed for w in r.message.split()}
    with catalog.session() as s:
        assert s.execute(select(func.count(Adapter.id))).scalar() == 1
    assert [sha for sha, _ in catalog.store.iter_blobs()] == [sha256_file(good)]


def test_real_civitai_slice(catalog: Catalog, shared_data: Path, tmp_path: Path) -> None:
    import gzip
    import itertools

    from tests.adapters_db.conftest import write_jsonl

    with gzip.open(shared_data / "civitai_lora_sfw_2023-07.jsonl.gz", "rt", encoding="utf-8") as fh:
        lines = list(itertools.islice(fh, 40))
    path = write_jsonl(tmp_path / "slice.jsonl", [json.loads(line) for line in lines])
    with catalog.session() as s:
        summary = adapters_db.import_civitai_jsonl(s, catalog, path)
    assert summary.count("imported") == 40
    with catalog.session() as s:
        rec = adapters_db.find_by_civitai_id(s, catalog, 58390)
        assert rec.name.startswith("Detail Tweaker") and rec.base_family == "sd1"
        assert rec.files[0].autov2 == "47AAAF0D29" and "<script" not in rec.description_html
        assert len(rec.images) >= 5 and rec.images[0].params.get("sampler")
        hit = adapters_db.search(s, catalog, "add_detail, masterpiece, 1girl", k=3)
        assert rec.id in [h.adapter.id for h in hit]


CRASH_SCRIPT = """
import sys
from pathlib import Path
import adapters_db
cat = adapters_db.open_catalog(sys.argv[1], Path(sys.argv[2]), embedder="hashing-32")
with cat.session() as s:
    r = adapters_db.import_file(s, cat, Path(sys.argv[3]))
print(r.status)
"""


def test_kill_between_file_write_and_commit(tmp_path: Path, lora_file: Callable[..., Path]) -> None:
    data_dir = tmp_path / "data"
    url = f"sqlite:///{data_dir / 'catalog.sqlite'}"
    path = lora_file("crashy.safetensors")
    env = {**os.environ, "ADAPTERS_DB_CRASH_AT": "after_store_write", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, url, str(data_dir), str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 17, run.stderr  # killed by the hook, no cleanup ran
    catalog = adapters_db.open_catalog(url, data_dir, embedder="hashing-32")
    sha = sha256_file(path)
    assert catalog.store.has(sha)  # the file landed…
    with catalog.session() as s:  # …but the catalog shows nothing
        assert adapters_db.find_by_hash(s, catalog, sha) is None
        assert adapters_db.list_adapters(s, catalog, include_nsfw=True).total == 0
        assert adapters_db.search(s, catalog, "crashy", k=5) == []
        report = adapters_db.repair(s, catalog)  # young orphan: kept (an import may be in flight)
        assert report.removed_orphans == ()
    env.pop("ADAPTERS_DB_CRASH_AT")
    rerun = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, url, str(data_dir), str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert rerun.returncode == 0 and rerun.stdout.strip() == "imported", rerun.stderr
    with catalog.session() as s:
        rec = adapters_db.find_by_hash(s, catalog, sha)
        assert rec is not None and adapters_db.local_file_path(rec).read_bytes() == path.read_bytes()
    catalog.dispose()


def test_repair_collects_orphans_and_notices_lost_files(
    sqlite_catalog: Catalog, lora_file: Callable[..., Path]
) -> None:
    cat = sqlite_catalog
    orphan = cat.store.put_file(lora_file("orphan.safetensors", seed=11))
    old = time.time() - 7200
    os.utime(orphan.path, (old, old))
    with cat.session() as s:
        kept = adapters_db.import_file(s, cat, lora_file("kept.safetensors", seed=12))
        lost = adapters_db.import_file(s, cat, lora_file("lost.safetensors", seed=13))
    cat.store.path_for(lost.sha256).unlink()
    with cat.session() as s:
        report = adapters_db.repair(s, cat)
    assert orphan.path in report.removed_orphans and not orphan.path.exists()
    assert report.missing_files == (lost.sha256,)
    with cat.session() as s:
        assert not adapters_db.get_adapter(s, cat, lost.adapter_id).has_local_file
        assert adapters_db.get_adapter(s, cat, kept.adapter_id).has_local_file
    cat.store.path_for(kept.sha256).write_bytes(b"bit rot")
    with cat.session() as s:
        report = adapters_db.repair(s, cat, verify=True)
    assert report.corrupted_files == (kept.sha256,)
