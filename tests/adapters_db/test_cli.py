"""``python -m studio import / import-civitai / search / catalog`` end to end, and the Alembic migrations."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, inspect

from adapters_db.catalog import MIGRATIONS
from studio.cli import main
from tests.adapters_db.conftest import SMALL_CATALOG, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_import_search_and_batch_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], lora_file: Callable[..., Path]
) -> None:
    data = ["--data-dir", str(tmp_path / "data"), "--embedder", "hashing-64"]
    dump = write_jsonl(tmp_path / "dump.jsonl.gz", [*SMALL_CATALOG, "{oops"], gz=True)
    code, out, err = run(capsys, "import-civitai", str(dump), *data)
    assert code == 0 and "summary: imported 6, updated 0, duplicate 0, skipped 0, failed 1" in out
    assert "invalid JSON" in err
    lora = lora_file("mine.safetensors", metadata={"modelspec.title": "My Ink Style"})
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 40)
    code, out, err = run(capsys, "import", str(lora), str(broken), "--trigger", "inkstyle", *data)
    assert code == 0 and "imported 1" in out and "failed 1" in out and "broken.safetensors" in err
    code, out, _ = run(capsys, "search", "a castle in pixel art, 8bit", "-k", "2", "--base", "sd15", *data)
    assert code == 0 and "Pixel Art Style" in out.splitlines()[1] and "trigger word" in out
    queries = tmp_path / "queries.txt"
    queries.write_text("\ufeffinkstyle portrait\nhatsune miku\n\nneon city at night\n")  # Notepad's BOM
    code, out, _ = run(capsys, "search", "--queries", str(queries), "-k", "3", "--json", *data)
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [line["query"] for line in lines] == [
        "inkstyle portrait",
        "hatsune miku",
        "neon city at night",
    ]
    first = lines[0]["hits"][0]
    assert set(first) == {"id", "name", "score", "civitai_model_id", "base_family", "why"}
    assert first["name"] == "My Ink Style" and first["civitai_model_id"] is None
    assert lines[1]["hits"][0]["civitai_model_id"] == 3
    code, out, _ = run(capsys, "catalog", "stats", *data)
    assert code == 0 and json.loads(out)["adapters"] == 7
    code, out, _ = run(capsys, "catalog", "classifier", *data)
    assert code == 0 and "trained the prompt classifier on 7 adapters" in out
    code, out, _ = run(capsys, "search", "aqua hair, singing on stage", "-k", "1", "--json", *data)
    assert code == 0 and json.loads(out)["hits"][0]["civitai_model_id"] == 3
    code, out, _ = run(capsys, "catalog", "matcher", *data)
    assert code == 0 and "trained the prompt matcher" in out
    assert (tmp_path / "data" / "index" / "matcher.safetensors").is_file()
    code, out, _ = run(capsys, "catalog", "show", "--id", str(first["id"]), *data)
    assert json.loads(out)["name"] == "My Ink Style"
    code, out, _ = run(capsys, "catalog", "delete", "--id", str(first["id"]), *data)
    assert code == 0 and "deleted" in out
    code, _, err = run(capsys, "search", "--base", "sd9", "x", *data)
    assert code == 2 and "unknown base family" in err


def test_module_entry_point(tmp_path: Path) -> None:
    dump = write_jsonl(tmp_path / "dump.jsonl", SMALL_CATALOG[:2])
    base = [sys.executable, "-m", "studio"]
    opts = ["--data-dir", str(tmp_path / "d"), "--embedder", "hashing-32"]
    done = subprocess.run(
        [*base, "import-civitai", str(dump), *opts], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert done.returncode == 0, done.stderr
    found = subprocess.run(
        [*base, "search", "watercolor lake", "--json", "-k", "1", *opts],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout)["hits"][0]["name"] == "Watercolor Landscapes"


def test_migrations_upgrade_and_downgrade(db_url: str) -> None:
    engine = create_engine(db_url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", db_url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    tables = set(inspect(engine).get_table_names())
    assert {
        "adapters",
        "adapter_versions",
        "adapter_files",
        "tags",
        "trigger_words",
        "preview_images",
        "embeddings",
        "search_documents",
        "catalog_state",
        "alembic_version",
    } <= tables
    if engine.dialect.name == "sqlite":
        assert "adapter_fts" in tables
    else:
        assert "tsv" in {c["name"] for c in inspect(engine).get_columns("search_documents")}
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    engine.dispose()
