"""Review of catalog maintenance and the derived search index: damaged or contested index files, another
embedder, read-only databases, repair after a crash, and what ``catalog`` prints."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import adapters_db
from adapters_db import Catalog, HashingEmbedder
from adapters_db.store import sha256_file
from studio.cli import main
from tests.adapters_db.conftest import SMALL_CATALOG, civitai_record

QUERY = "pixel art, a castle on a hill"


def _fill(cat: Catalog, records: list[dict[str, Any]] = SMALL_CATALOG) -> None:
    with cat.session() as s:
        adapters_db.import_civitai_records(s, cat, ((str(r["id"]), r) for r in records))


def _top(cat: Catalog, query: str = QUERY) -> list[int]:
    with cat.session() as s:
        return [h.adapter.id for h in adapters_db.search(s, cat, query, k=3)]


def _reopen(cat: Catalog, embedder: Any = None) -> Catalog:
    cat.dispose()
    return adapters_db.open_catalog(cat.url, cat.data_dir, embedder=embedder or HashingEmbedder(64))


def _damage(path: Path, how: str) -> None:
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        os.truncate(path, path.stat().st_size // 2)
    else:
        path.write_bytes(bytes(range(256)) * 2)


@pytest.mark.parametrize(
    ("name", "how"),
    [
        ("meta.faiss", "truncated"),
        ("meta.faiss", "garbage"),
        ("prompt.faiss", "empty"),
        ("lexical.npz", "truncated"),
        ("lexical.npz", "empty"),
        ("meta.ids.npy", "empty"),
        ("prompt.owner.npy", "empty"),
    ],
)
def test_damaged_index_file_is_rebuilt(sqlite_catalog: Catalog, name: str, how: str) -> None:
    _fill(sqlite_catalog)
    before = _top(sqlite_catalog)
    directory = sqlite_catalog._search_index.directory  # type: ignore[union-attr]
    _damage(directory / name, how)
    cat = _reopen(sqlite_catalog)
    assert _top(cat) == before and cat._search_index.last_event == "rebuilt"  # type: ignore[union-attr]
    cat.dispose()


def test_index_files_that_disagree_are_rebuilt(sqlite_catalog: Catalog) -> None:
    _fill(sqlite_catalog)
    before = _top(sqlite_catalog)
    directory = sqlite_catalog._search_index.directory  # type: ignore[union-attr]
    shutil.copy(directory / "prompt.owner.npy", directory / "meta.owner.npy")  # 9 owners for 6 vectors
    cat = _reopen(sqlite_catalog)
    assert _top(cat) == before and cat._search_index.last_event == "rebuilt"  # type: ignore[union-attr]
    cat.dispose()


def test_leftover_of_a_killed_swap_does_not_block_rebuilds(sqlite_catalog: Catalog) -> None:
    _fill(sqlite_catalog)
    _top(sqlite_catalog)
    index = sqlite_catalog._search_index
    assert index is not None
    left = index.root / f".{index.directory.name}.old-{os.getpid()}"  # the old fixed name of the swap
    left.mkdir()
    (left / "manifest.json").write_text("{}")
    with sqlite_catalog.session() as s:
        index.rebuild(s)
    assert json.loads((index.directory / "manifest.json").read_text())["adapters"] == len(SMALL_CATALOG)


def test_index_folder_not_writable_search_still_answers(sqlite_catalog: Catalog) -> None:
    _fill(sqlite_catalog)
    before = _top(sqlite_catalog)
    shutil.rmtree(sqlite_catalog.index_dir)
    sqlite_catalog.index_dir.write_text("not a folder")  # the index cannot be saved
    cat = _reopen(sqlite_catalog)
    assert _top(cat) == before
    cat.dispose()


def test_same_embedder_name_with_another_dimension_embeds_again(sqlite_catalog: Catalog) -> None:
    _fill(sqlite_catalog)
    for dim in (64, 32):
        embedder = HashingEmbedder(dim)
        embedder.name = "custom"
        cat = _reopen(sqlite_catalog, embedder)
        with cat.session() as s:
            assert cat.search_index(s).manifest.vectors["meta"] == len(SMALL_CATALOG)  # type: ignore[union-attr]
        sqlite_catalog = cat
    sqlite_catalog.dispose()


def test_read_only_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    cat = adapters_db.open_catalog(None, data, embedder=HashingEmbedder(64))
    _fill(cat)
    before = _top(cat)
    cat.dispose()
    shutil.rmtree(data / "index")
    url = f"sqlite:///file:{data / 'catalog.sqlite'}?mode=ro&uri=true"
    ro = adapters_db.open_catalog(url, data, embedder=HashingEmbedder(64))
    assert _top(ro) == before  # rebuilt from the stored vectors
    ro.dispose()
    code = main(["catalog", "delete", "--id", "1", "--data-dir", str(data), "--db-url", url])
    err = capsys.readouterr().err
    assert code == 2 and "read-only" in err and "Traceback" not in err


def test_percent_sign_in_the_data_dir(tmp_path: Path) -> None:
    cat = adapters_db.open_catalog(None, tmp_path / "100%" / "data", embedder=HashingEmbedder(64))
    _fill(cat, SMALL_CATALOG[:1])
    assert _top(cat) == [1]
    cat.dispose()


def test_bad_catalog_url_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["catalog", "stats", "--data-dir", str(tmp_path), "--db-url", "sqlite://u:s3cret@/x"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: bad catalog URL") and "s3cret" not in err


def test_stats_masks_the_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import adapters_db.repository
    from studio.commands import catalog as commands

    cat = Catalog("postgresql+psycopg2://studio:s3cret@db.example/catalog", tmp_path)  # never connects
    monkeypatch.setattr(commands, "_catalog", lambda args: cat)
    monkeypatch.setattr(adapters_db.repository, "catalog_counts", lambda s: {"adapters": 0})
    monkeypatch.setattr(Catalog, "revision", lambda self, s: 0)
    assert main(["catalog", "stats", "--data-dir", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["url"] == "postgresql+psycopg2://studio:***@db.example/catalog"


def test_show_does_not_pass_terminal_controls(
    sqlite_catalog: Catalog, capsys: pytest.CaptureFixture[str]
) -> None:
    name = "Evil\x1b]0;pwned\x07\u202eName \x9b2J 日本"
    description = "line1\nline2\x1b[31m\u2028"
    _fill(sqlite_catalog, [civitai_record(1, name, description=description)])
    data = str(sqlite_catalog.data_dir)
    assert main(["catalog", "show", "--id", "1", "--data-dir", data, "--embedder", "hashing-64"]) == 0
    out = capsys.readouterr().out
    assert not any(ch in out for ch in "\x1b\x07\x9b\u202e\u2028") and "日本" in out
    record = json.loads(out)
    assert record["name"] == name  # escaped, not changed


def test_out_of_range_id(sqlite_catalog: Catalog, capsys: pytest.CaptureFixture[str]) -> None:
    data = str(sqlite_catalog.data_dir)
    for action in ("show", "delete"):
        code = main(["catalog", action, "--id", str(2**64), "--data-dir", data, "--embedder", "hashing-64"])
        assert code == 2 and "out of range" in capsys.readouterr().err


def test_repair_reattaches_a_download_killed_before_its_commit(
    sqlite_catalog: Catalog, lora_file: Callable[..., Path]
) -> None:
    cat = sqlite_catalog
    path = lora_file("remote.safetensors", seed=21)
    sha = sha256_file(path)
    _fill(cat, [civitai_record(7, "Remote Style", sha256=sha)])
    stored = cat.store.put_file(path, expected_sha256=sha)  # the download landed; its commit never came
    old = stored.path.stat().st_mtime - 7200
    os.utime(stored.path, (old, old))
    with cat.session() as s:
        report = adapters_db.repair(s, cat)
    assert report.reattached_files == (sha,) and report.removed_orphans == () and stored.path.is_file()
    with cat.session() as s:
        assert adapters_db.get_adapter(s, cat, 1).has_local_file  # type: ignore[union-attr]
        again = adapters_db.repair(s, cat)
    assert again.reattached_files == () and again.removed_orphans == () and stored.path.is_file()


def test_repair_leaves_files_the_store_did_not_write(tmp_path: Path) -> None:
    """Garbage collection removes unreferenced blobs, never a file that is not named as a blob."""
    from adapters_db.store import FileStore

    store = FileStore(tmp_path / "files")
    blob = store.root / "lora" / "ab" / f"ab{'0' * 62}.safetensors"
    foreign = [
        store.root / "lora" / "ab" / "notes.txt",
        store.root / "lora" / "cd" / f"ab{'0' * 62}.safetensors",
    ]
    for path in (blob, *foreign):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    assert store.collect_garbage([], grace_s=-1) == [blob]
    assert all(p.is_file() for p in foreign)
