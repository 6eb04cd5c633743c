"""Catalog-tab handlers without Gradio: browse, filters, detail, curation, imports (a real HTTP server)."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from pipelines.lora_formats import load, save_kohya
from studio.handlers import catalog as C
from studio.handlers import create
from studio.handlers.state import SessionState


def names(page: C.CatalogPage) -> list[str]:
    return [r.name for r in page.items]


def test_browse_filters_sort_and_nsfw(studio):
    services, _ = studio
    page = C.browse(services, C.CatalogQuery(sort="name"))
    assert names(page) == ["Alpha Stars", "Beta Waves", "Gamma Counter"] and page.total == 3
    assert page.label() == "page 1 of 1 (3 adapters)" and not page.has_next
    assert "Delta Secret" in names(C.browse(services, C.CatalogQuery(include_nsfw=True)))
    assert names(C.browse(services, C.CatalogQuery(tags=C.split_tags(" Waves, texture ")))) == ["Beta Waves"]
    assert names(C.browse(services, C.CatalogQuery(location="remote"))) == []
    assert names(C.browse(services, C.CatalogQuery(licence=("commercial",)))) == []
    paged = C.browse(services, C.CatalogQuery(sort="name", page=2, page_size=2))
    assert names(paged) == ["Gamma Counter"] and paged.label() == "page 2 of 2 (3 adapters)"
    hits = C.browse(services, C.CatalogQuery(text="zq star"))
    assert names(hits)[0] == "Alpha Stars" and "zq star" in hits.why[hits.items[0].id] and hits.total is None
    data = C.page_data(hits)
    assert data[0]["name"] == "Alpha Stars" and data[0]["local"] is True
    for sort in ("relevance", "name"):  # a text search lists what matches, in any order
        assert names(C.browse(services, C.CatalogQuery(text="waves", sort=sort))) == ["Beta Waves"]
        assert names(C.browse(services, C.CatalogQuery(text="xqzzyv", sort=sort))) == []


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(sort="loudest"), "unknown sort"),
        (dict(location="moon"), "location"),
        (dict(licence=("free-beer",)), "licence"),
        (dict(page=0), "pages start at 1"),
        (dict(base_family="sd9"), "unknown base family"),
    ],
)
def test_query_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        C.CatalogQuery(**bad)


def test_detail_and_preview_prompt(studio):
    services, ids = studio
    state, record = C.open_detail(services, SessionState(), ids["Alpha Stars"])
    assert state.detail_id == ids["Alpha Stars"] and record.files and record.files[0].sha256
    preview = next(i for i in record.images if i.prompt)
    prompt, negative, params = C.preview_prompt(record, preview.id)
    assert (prompt, negative, params["Steps"]) == ("a zq star on grass", "blurry", "12")
    with pytest.raises(LookupError, match="no preview image 999"):
        C.preview_prompt(record, 999)
    with pytest.raises(LookupError, match="no adapter with id 9999"):
        C.get_record(services, 9999)
    with pytest.raises(ValueError, match="not an adapter id"):
        C.get_record(services, "seven")


def test_edit_delete_and_imports(fresh_studio, lora_files, tmp_path):
    services, ids = fresh_studio
    edited = C.edit_metadata(
        services,
        ids["Beta Waves"],
        C.MetadataEdit(
            name="Beta Ripples",
            tags=("water",),
            trigger_words=("vx ripple",),
            base_family="sd15",
            nsfw_level=1,
            description_html='<p onclick="x()">calm <script>alert(1)</script>water</p>',
        ),
    )
    assert (edited.name, edited.tags, edited.trigger_words, edited.base_family) == (
        "Beta Ripples",
        ("water",),
        ("vx ripple",),
        "sd1",
    )
    assert "script" not in edited.description_html and "onclick" not in edited.description_html
    assert "Beta Ripples" not in names(C.browse(services, C.CatalogQuery()))  # nsfw 1 is hidden by default
    with pytest.raises(ValueError, match="name cannot be empty"):
        C.edit_metadata(services, ids["Beta Waves"], C.MetadataEdit(name=" "))

    state, _ = create.add_adapter(services, SessionState(), "Alpha Stars")
    state, text = C.delete(services, state, ids["Alpha Stars"])
    assert text == "deleted 'Alpha Stars'" and state.mix == () and state.detail_id is None
    assert "Alpha Stars" not in names(C.browse(services, C.CatalogQuery()))

    summary = C.import_uploads(
        services,
        [
            str(lora_files["Alpha Stars"]),
            str(lora_files["Gamma Counter"]),
            str(tmp_path / "missing.safetensors"),
        ],
    )
    assert [r.status for r in summary.results] == ["imported", "duplicate", "failed"]
    assert "imported 1" in C.summary_text(summary) and "missing.safetensors" in C.summary_text(summary)
    assert "Alpha Stars" in names(C.browse(services, C.CatalogQuery()))
    with pytest.raises(ValueError, match="choose one or more"):
        C.import_uploads(services, [])

    folder = tmp_path / "Lora"
    folder.mkdir()
    (folder / "old.ckpt").write_bytes(b"pickle")
    (folder / "alpha_copy.safetensors").write_bytes(lora_files["Alpha Stars"].read_bytes())
    summary = C.import_folder(services, str(folder))
    assert sorted(r.status for r in summary.results) == ["duplicate", "failed"]
    with pytest.raises(FileNotFoundError):
        C.import_folder(services, str(tmp_path / "nowhere"))


@pytest.fixture()
def file_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on 127.0.0.1 serving a folder."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()


def test_import_from_url(fresh_studio, lora_files, file_server):
    services, _ = fresh_studio
    base, root = file_server
    weights = replace(load(lora_files["Beta Waves"]), metadata={})
    save_kohya(weights, root / "night_sky.safetensors")
    (root / "beta_copy.safetensors").write_bytes(lora_files["Beta Waves"].read_bytes())
    (root / "notes.safetensors").write_text("not a LoRA")
    summary = C.import_url(services, f"{base}/night_sky.safetensors")
    (result,) = summary.results
    assert result.status == "imported" and result.source == f"{base}/night_sky.safetensors"
    record = C.get_record(services, result.adapter_id)
    assert record.name == "night_sky" and record.files[0].file_name == "night_sky.safetensors"
    assert record.source_url == f"{base}/night_sky.safetensors" and record.has_local_file
    assert C.import_url(services, f"{base}/beta_copy.safetensors").results[0].status == "duplicate"
    assert C.import_url(services, f"{base}/notes.safetensors").results[0].status == "failed"
    with pytest.raises(OSError, match="HTTP 404"):
        C.import_url(services, f"{base}/absent.safetensors")
    with pytest.raises(ValueError, match="direct link"):
        C.import_url(services, "ftp://example.com/x.bin")
