"""Ctrl-C during an import: the items done before it stay in the catalog, the command says so and exits
130, and running it again goes on where it stopped."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from adapters_db import Catalog, import_civitai_records
from adapters_db.importers import files
from adapters_db.models import Adapter
from studio.cli import main
from tests.adapters_db.conftest import adapter_count, civitai_record, write_jsonl


def test_ctrl_c_in_a_folder_import_keeps_the_files_done(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    lora_file: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder = tmp_path / "Lora"
    folder.mkdir()
    for name in ("a", "b", "c", "d"):
        lora_file(f"{name}.safetensors", folder=folder)
    data = tmp_path / "data"
    real, calls = files.inspect_lora, []

    def stop_at_third(path: Path):  # the user presses Ctrl-C while the third file is read
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(files, "inspect_lora", stop_at_third)
    assert main(["import", str(folder), "--data-dir", str(data), "--no-embed"]) == 130
    err = capsys.readouterr().err
    assert "interrupted: the items imported before it are kept" in err and "Traceback" not in err
    assert adapter_count(data) == 2
    monkeypatch.setattr(files, "inspect_lora", real)
    assert main(["import", str(folder), "--data-dir", str(data), "--no-embed"]) == 0
    assert "summary: imported 2, updated 0, duplicate 2" in capsys.readouterr().out
    assert adapter_count(data) == 4


def _interrupted_records(n: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """``n`` good records, then Ctrl-C."""
    for i in range(1, n + 1):
        yield f"line {i}", civitai_record(i, f"Model {i}")
    raise KeyboardInterrupt


def _count(catalog: Catalog) -> int:
    with catalog.session() as s:
        return int(s.execute(select(func.count(Adapter.id))).scalar() or 0)


def test_civitai_records_commit_batch_by_batch(catalog: Catalog) -> None:
    """On PostgreSQL the import's transaction would roll back whole without ``commit_each``."""
    with pytest.raises(KeyboardInterrupt), catalog.session() as s:
        import_civitai_records(s, catalog, _interrupted_records(5), batch_size=2, commit_each=True)
    assert _count(catalog) == 4  # two full batches; the fifth record's batch was not flushed


def test_ctrl_c_in_a_civitai_import_says_what_is_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapters_db.importers import civitai

    dump = write_jsonl(tmp_path / "dump.jsonl", [civitai_record(i, f"Model {i}") for i in range(1, 4)])
    monkeypatch.setattr(civitai, "read_records", lambda path: _interrupted_records(2))
    data = tmp_path / "data"
    assert main(["import-civitai", str(dump), "--data-dir", str(data), "--no-embed"]) == 130
    assert "interrupted: the items imported before it are kept" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(["import-civitai", str(dump), "--data-dir", str(data), "--no-embed"]) == 0
    assert adapter_count(data) == 3


def test_an_os_error_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A permission or disk error the command does not handle itself ends in one line, exit 2."""
    from adapters_db.importers import civitai

    def no_permission(path: Path):
        raise PermissionError(13, "Permission denied", str(path))

    dump = write_jsonl(tmp_path / "dump.jsonl", [civitai_record(1, "Model 1")])
    monkeypatch.setattr(civitai, "read_records", no_permission)
    assert main(["import-civitai", str(dump), "--data-dir", str(tmp_path / "d"), "--no-embed"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: [Errno 13] Permission denied") and "Traceback" not in err
