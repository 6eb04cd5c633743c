"""Bad input the importers met in review: each fails alone with a one-line reason (or is left out), the
rest of the batch is imported, and neither the catalog nor the store keeps anything of it."""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from sqlalchemy import func, select

import adapters_db
from adapters_db import Catalog
from adapters_db.importers import files
from adapters_db.models import Adapter
from studio.cli import main
from tests.adapters_db.conftest import adapter_count, civitai_record, write_jsonl


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _store_files(data: Path) -> tuple[list[Path], list[Path]]:
    """(blobs of adapter files, leftovers in the store's tmp folder)."""
    root = data / "files"
    tmp = root / "tmp"
    return sorted((root / "lora").glob("*/*")), sorted(tmp.iterdir()) if tmp.is_dir() else []


def _float8(src: Path, dest: Path, nan: bool) -> Path:
    """``src`` with its weights in float8 (E4M3), one of them NaN when ``nan``."""
    tensors = load_file(str(src))
    out = {}
    for name, tensor in tensors.items():
        if name.endswith("lora_down.weight"):
            tensor = tensor.clone()
            if nan:
                tensor[0, 0] = float("nan")
            tensor = tensor.to(torch.float8_e4m3fn)
        out[name] = tensor
    save_file(out, str(dest))
    return dest


def _png_bomb(path: Path) -> Path:
    """A PNG header announcing 40000×40000 pixels: PIL refuses to open it (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 40_000, 40_000, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )
    return path


def test_float8_loras_are_checked_for_nan_not_crashing_the_batch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], lora_file: Callable[..., Path]
) -> None:
    folder = tmp_path / "Lora"
    folder.mkdir()
    _float8(lora_file("a.safetensors"), folder / "f8_nan.safetensors", nan=True)
    _float8(lora_file("b.safetensors"), folder / "f8_ok.safetensors", nan=False)
    lora_file("good.safetensors", folder=folder)
    data = tmp_path / "data"
    code, out, err = _run(capsys, "import", str(folder), "--data-dir", str(data), "--no-embed")
    assert code == 0 and "summary: imported 2, updated 0, duplicate 0, skipped 0, failed 1" in out
    failed = [line for line in err.splitlines() if line.startswith("failed")]
    assert len(failed) == 1 and "f8_nan.safetensors" in failed[0] and "1 NaN value" in failed[0]
    assert "Traceback" not in err and adapter_count(data) == 2
    blobs, leftovers = _store_files(data)
    assert len(blobs) == 2 and leftovers == []


def test_unreadable_preview_and_oversized_sidecar_numbers_leave_the_lora_imported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], lora_file: Callable[..., Path]
) -> None:
    folder = tmp_path / "Lora"
    folder.mkdir()
    lora_file("bomb.safetensors", folder=folder)
    _png_bomb(folder / "bomb.preview.png")
    lora_file("digits.safetensors", folder=folder)
    (folder / "digits.civitai.info").write_text('{"id": ' + "1" * 5000 + "}")  # past Python's int limit
    lora_file("bigid.safetensors", folder=folder)
    (folder / "bigid.civitai.info").write_text(json.dumps({"id": 10**30, "modelId": 7, "name": "v2"}))
    lora_file("good.safetensors", folder=folder)
    data = tmp_path / "data"
    code, out, err = _run(capsys, "import", str(folder), "--data-dir", str(data), "--no-embed", "-v")
    assert code == 0 and "summary: imported 4, updated 0, duplicate 0, skipped 0, failed 0" in out
    assert "digits.civitai.info: unreadable JSON sidecar" in err and "Traceback" not in err
    blobs, leftovers = _store_files(data)
    assert len(blobs) == 4 and leftovers == [] and not (data / "files" / "images").exists()


def test_civitai_records_of_the_wrong_shape_fail_one_by_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(model_id: int, **change: Any) -> dict[str, Any]:
        record = civitai_record(model_id, f"Broken {model_id}")
        version = record["modelVersions"][0]
        for key, value in change.items():
            where, _, field = key.partition("__")
            target = {"record": record, "version": version, "file": version["files"][0]}[where]
            target[field] = value
        return record

    dump = write_jsonl(
        tmp_path / "dump.jsonl",
        [
            civitai_record(1, "Good One"),
            broken(2, file__hashes="ABCDEF"),  # AttributeError in the converter
            broken(3, version__stats="many"),
            broken(4, file__sizeKB=1e308),  # ×1024 overflows to infinity
            broken(5, record__id=10**30),  # too large for a 64-bit column
            "[" * 100_000 + "]" * 100_000,  # nested deeper than the JSON decoder recurses
            '{"id": ' + "9" * 5000 + "}",  # an int past Python's digit limit
            civitai_record(8, "Good Two"),
        ],
    )
    page = tmp_path / "page.json"
    page.write_text(json.dumps({"items": None}))
    data = tmp_path / "data"
    code, out, err = _run(
        capsys, "import-civitai", str(dump), str(page), "--data-dir", str(data), "--no-embed"
    )
    assert code == 0 and "summary: imported 2, updated 0, duplicate 0, skipped 0, failed 7" in out
    failed = [line for line in err.splitlines() if line.startswith("failed")]
    assert [line.split()[1] for line in failed] == [f"dump.jsonl:{n}" for n in range(2, 8)] + ["page.json"]
    assert "Traceback" not in err and "page.json: expected a list of records" in failed[-1]
    assert adapter_count(data) == 2


def test_a_file_that_grows_while_it_is_imported_is_refused(
    sqlite_catalog: Catalog, lora_file: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = lora_file("downloading.safetensors")
    inspect = files.inspect_lora

    def inspect_then_grow(p: Path) -> Any:
        info = inspect(p)
        with open(p, "ab") as fh:  # the download goes on after the header was checked
            fh.write(b"\0" * 100)
        return info

    monkeypatch.setattr(files, "inspect_lora", inspect_then_grow)
    with sqlite_catalog.session() as s:
        result = adapters_db.import_file(s, sqlite_catalog, path)
    assert result.status == "failed" and "downloading.safetensors: the file changed" in result.message
    with sqlite_catalog.session() as s:
        assert s.execute(select(func.count(Adapter.id))).scalar() == 0
    assert list(sqlite_catalog.store.iter_blobs()) == []
    assert list(sqlite_catalog.store.tmp_dir.iterdir()) == []


@pytest.mark.skipif(os.name == "nt", reason="symbolic links")
def test_a_symbolic_link_loop_is_called_a_loop(
    sqlite_catalog: Catalog, lora_file: Callable[..., Path], tmp_path: Path
) -> None:
    folder = tmp_path / "Lora"
    folder.mkdir()
    (folder / "a.safetensors").symlink_to("b.safetensors")
    (folder / "b.safetensors").symlink_to("a.safetensors")
    lora_file("good.safetensors", folder=folder)
    with sqlite_catalog.session() as s:
        summary = adapters_db.import_folder(s, sqlite_catalog, folder)
    assert [r.status for r in summary.results] == ["failed", "failed", "imported"]
    assert all("symbolic link loop" in r.message for r in summary.results[:2])


def test_a_library_error_on_one_file_fails_that_file_only(
    sqlite_catalog: Catalog, lora_file: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = lora_file("good.safetensors").parent
    lora_file("odd.safetensors", folder=folder)
    inspect = files.inspect_lora

    def inspect_or_fail(p: Path) -> Any:
        if p.name == "odd.safetensors":  # as torch or safetensors might on a file they cannot handle
            raise RuntimeError("not implemented for this tensor")
        return inspect(p)

    monkeypatch.setattr(files, "inspect_lora", inspect_or_fail)
    with sqlite_catalog.session() as s:
        summary = adapters_db.import_folder(s, sqlite_catalog, folder)
    assert [(Path(r.source).name, r.status) for r in summary.results] == [
        ("good.safetensors", "imported"),
        ("odd.safetensors", "failed"),
    ]
    assert summary.results[1].message == "RuntimeError: not implemented for this tensor"
    assert len(list(sqlite_catalog.store.iter_blobs())) == 1


def test_a_string_where_civitai_has_a_list_is_not_split_into_letters(sqlite_catalog: Catalog) -> None:
    record = civitai_record(1, "Ink Style")
    record["tags"] = "ink, style"
    record["modelVersions"][0]["trainedWords"] = "inkstyle, sketch"
    with sqlite_catalog.session() as s:
        summary = adapters_db.import_civitai_records(s, sqlite_catalog, [("dump.jsonl:1", record)])
        adapter_id = summary.results[0].adapter_id
        assert summary.results[0].status == "imported" and adapter_id is not None
        found = adapters_db.get_adapter(s, sqlite_catalog, adapter_id)
    assert found is not None and set(found.tags) == {"ink", "style"}
    assert found.versions[0].trigger_words == ("inkstyle", "sketch")
