"""``python -m studio search`` as a user drives it: batch input edge cases, bad options and the readable
output (review findings)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

import adapters_db
from adapters_db import HashingEmbedder
from studio.cli import main
from tests.adapters_db.conftest import SMALL_CATALOG, civitai_record

EVIL = "Evil \x1b[31mRed\x1b[0m\nName\u202e"


@pytest.fixture(scope="module")
def data_args(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """CLI options of a small catalog: the six hand-made records, a name with escape codes, a CJK one."""
    data = tmp_path_factory.mktemp("search_cli") / "data"
    records = [
        *SMALL_CATALOG,
        civitai_record(7, EVIL, trained=["evilz"], prompts=["evilz, \x1b]0;pwned\x07 a red room"]),
        civitai_record(8, "水彩画 スタイル", trained=["水彩"], tags=["水彩画"], prompts=["水彩, 山の風景"]),
    ]
    catalog = adapters_db.open_catalog(None, data, embedder=HashingEmbedder(64))
    try:
        with catalog.session() as s:
            adapters_db.import_civitai_records(s, catalog, ((str(r["id"]), r) for r in records))
        adapters_db.embed_missing(catalog)
    finally:
        catalog.dispose()
    return ["--data-dir", str(data), "--embedder", "hashing-64"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["search", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_stdin_batch_drops_crlf_and_bom(
    data_args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # POSIX stdin splits at "\n" only (no universal newlines): a Windows-made list keeps its "\r"
    raw = b"\xef\xbb\xbfpixel art\r\n\r\nhatsune miku\r\n"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8", newline="\n"))
    code, out, _ = run(capsys, "--queries", "-", "-k", "3", "--json", *data_args)
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [line["query"] for line in lines] == ["pixel art", "hatsune miku"]
    for line in lines:
        scores = [h["score"] for h in line["hits"]]
        assert scores == sorted(scores, reverse=True)
        for hit in line["hits"]:
            assert set(hit) == {"id", "name", "score", "civitai_model_id", "base_family", "why"}
            assert isinstance(hit["score"], float) and isinstance(hit["why"], str) and hit["why"]
    assert lines[0]["hits"][0]["name"] == "Pixel Art Style" and "trigger word" in lines[0]["hits"][0]["why"]


def test_unreadable_queries_path_is_a_one_line_error(
    data_args: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, err = run(capsys, "--queries", str(tmp_path), "--json", *data_args)  # a directory
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: cannot read --queries")


def test_non_utf8_queries_file_names_the_line_and_runs_nothing(
    data_args: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    queries = tmp_path / "q.txt"
    queries.write_bytes(b"pixel art\n\xff\xfe latin-1?\nhatsune miku\n")
    code, out, err = run(capsys, "--queries", str(queries), "--json", *data_args)
    assert code == 2 and out == ""  # nothing searched: the file is checked before the index loads
    assert err == f"error: {queries}, line 2: not UTF-8 text (invalid start byte)\n"


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["-k", "0"], "-k must be at least 1"),
        (["-k", "-3"], "-k must be at least 1"),
        (["--offset", "-2"], "--offset must be 0 or more"),
        (["--queries", "-"], "not both"),
    ],
)
def test_bad_options_are_one_line_errors(
    data_args: list[str], capsys: pytest.CaptureFixture[str], option: list[str], message: str
) -> None:
    code, out, err = run(capsys, "pixel art", *option, "--json", *data_args)
    assert code == 2 and out == "" and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_search_refuses_a_negative_offset(filled_catalog: adapters_db.Catalog) -> None:
    with filled_catalog.session() as s, pytest.raises(ValueError, match="offset"):
        adapters_db.search(s, filled_catalog, "pixel art", k=3, offset=-1)


def test_readable_output_escapes_controls_and_aligns_cjk(
    data_args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "evilz red room", "-k", "1", *data_args)
    assert code == 0 and "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    lines = out.splitlines()
    assert len(lines) == 3 and "Evil ?[31mRed?[0m Name" in lines[1] and "trigger word" in lines[2]
    code, out, _ = run(capsys, "水彩画 pixel art", "-k", "2", *data_args)
    rows = out.splitlines()[1::2]  # query line, then a hit line and its "why" line per hit
    names = {"水彩画 スタイル", "Pixel Art Style"}
    assert code == 0 and len(rows) == 2 and all(any(n in r for n in names) for r in rows)
    widths = [sum(2 if "\u3000" <= ch <= "\u9fff" else 1 for ch in r[: r.index("[")]) for r in rows]
    assert widths[0] == widths[1]  # the "[family; id …]" column lines up on a terminal


def test_offset_numbers_continue_and_empty_catalog_says_so(
    data_args: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, first, _ = run(capsys, "pixel art", "-k", "2", *data_args)
    code2, second, _ = run(capsys, "pixel art", "-k", "1", "--offset", "1", *data_args)
    assert code == code2 == 0 and second.splitlines()[1] == first.splitlines()[3]  # numbered 2, not 1
    empty = ["--data-dir", str(tmp_path / "none"), "--embedder", "hashing-64"]
    code, out, err = run(capsys, "pixel art", *empty)
    assert code == 0 and "(no matching adapters)" in out and "has no adapters" in err
