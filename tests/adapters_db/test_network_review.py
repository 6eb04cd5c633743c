"""Hostile and flaky servers on 127.0.0.1 against the network importers: redirects that would carry a
credential off-site, rate limits, cut and misplaced bodies, lying sizes, encoded bodies, looping
pagination, junk listings, pickles, slow responses; a failure is one line and leaves nothing behind."""

from __future__ import annotations

import gzip
import hashlib
import json
import threading
import time
import urllib.parse
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

import adapters_db
from adapters_db import Catalog
from adapters_db.importers import civitai_api
from adapters_db.importers.civitai_api import CivitaiClient, download_files, import_from_api
from adapters_db.importers.download import DownloadError, HttpConfig, download_to_store, get_json
from adapters_db.importers.huggingface import HuggingFaceClient, import_hf_repo
from adapters_db.models import Adapter
from tests.adapters_db.conftest import civitai_record

FAST = HttpConfig(timeout_s=5, retries=1, backoff_s=0.01)
SECRET = {"Authorization": "Bearer s3cret"}
Route = Callable[[BaseHTTPRequestHandler], None]


class Server:
    """A loopback HTTP/1.1 server: path → route; records each request's path and headers."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.seen: list[tuple[str, dict[str, str]]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server.seen.append((self.path, dict(self.headers.items())))
                self.close_connection = True
                route = server.routes.get(self.path) or server.routes.get(
                    urllib.parse.urlsplit(self.path).path
                )
                if route is None:
                    send(self, 404, b"not found")
                else:
                    route(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def hits(self, path: str) -> list[dict[str, str]]:
        """The headers of each request for ``path`` (query included or not)."""
        return [h for p, h in self.seen if p == path or urllib.parse.urlsplit(p).path == path]

    def close(self) -> None:
        """Stop serving."""
        self.httpd.shutdown()
        self.httpd.server_close()


def send(h: BaseHTTPRequestHandler, status: int, body: bytes = b"", **headers: str) -> None:
    """One complete response."""
    h.send_response(status)
    for name, value in {"Content-Length": str(len(body)), "Connection": "close", **headers}.items():
        h.send_header(name.replace("_", "-"), value)
    h.end_headers()
    h.wfile.write(body)


def redirect(location: str) -> Route:
    """A 302 to ``location``."""
    return lambda h: send(h, 302, Location=location)


def ok_json(data: Any) -> Route:
    """200 with a JSON body."""
    return lambda h: send(h, 200, json.dumps(data).encode(), Content_Type="application/json")


def ranged(data: bytes) -> Route:
    """A file server that honours ``Range``."""

    def route(h: BaseHTTPRequestHandler) -> None:
        rng = h.headers.get("Range")
        if not rng:
            return send(h, 200, data)
        start = int(rng.removeprefix("bytes=").split("-")[0])
        return send(h, 206, data[start:], Content_Range=f"bytes {start}-{len(data) - 1}/{len(data)}")

    return route


def sequence(*routes: Route) -> Route:
    """Each request takes the next route; the last one repeats."""
    left = list(routes)
    return lambda h: (left.pop(0) if len(left) > 1 else left[0])(h)


@pytest.fixture
def servers() -> Iterator[tuple[Server, Server]]:
    """Two servers: two origins on the loopback."""
    a, b = Server(), Server()
    yield a, b
    a.close()
    b.close()


def _no_leftovers(cat: Catalog) -> None:
    assert list(cat.store.iter_blobs()) == []
    assert not cat.store.tmp_dir.exists() or list(cat.store.tmp_dir.iterdir()) == []


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text, text
    return text


# --------------------------------------------------------------------------------- redirects
def test_a_redirect_to_another_origin_drops_the_credentials(
    sqlite_catalog: Catalog, servers: tuple[Server, Server], lora_file: Callable[..., Path]
) -> None:
    a, b = servers
    data = lora_file("x.safetensors", seed=1).read_bytes()
    b.routes["/cdn/file"] = ranged(data)
    b.routes["/page"] = ok_json({"items": []})
    a.routes["/dl"] = redirect(f"{b.url}/cdn/file")
    a.routes["/api"] = redirect(f"{b.url}/page")
    a.routes["/same"] = redirect("/api-here")
    a.routes["/api-here"] = ok_json({"ok": True})
    config = HttpConfig(timeout_s=5, retries=0, headers=SECRET)
    stored = download_to_store(f"{a.url}/dl", sqlite_catalog.store, config=config)
    assert stored.path.read_bytes() == data
    assert get_json(f"{a.url}/api", config) == {"items": []}
    assert [h.get("Authorization") for h in a.hits("/dl") + a.hits("/api")] == ["Bearer s3cret"] * 2
    assert [h.get("Authorization") for h in b.hits("/cdn/file") + b.hits("/page")] == [None, None]
    assert get_json(f"{a.url}/same", config) == {"ok": True}  # a redirect on the same origin keeps it
    assert a.hits("/api-here")[0].get("Authorization") == "Bearer s3cret"


def test_a_hugging_face_token_does_not_follow_a_redirect_to_the_cdn(
    catalog: Catalog, servers: tuple[Server, Server], lora_file: Callable[..., Path]
) -> None:
    hub, cdn = servers
    data = lora_file("pytorch_lora_weights.safetensors", seed=2).read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    hub.routes["/api/models/me/lora"] = ok_json(
        {"siblings": [{"rfilename": "pytorch_lora_weights.safetensors", "lfs": {"sha256": sha}}]}
    )
    hub.routes["/me/lora/resolve/main/pytorch_lora_weights.safetensors"] = redirect(f"{cdn.url}/blob/{sha}")
    cdn.routes[f"/blob/{sha}"] = ranged(data)
    client = HuggingFaceClient(base_url=hub.url, token="hf_secret", config=FAST)
    with catalog.session() as s:
        summary = import_hf_repo(s, catalog, client, "me/lora")
    assert summary.count("imported") == 1, summary.results
    assert hub.hits("/api/models/me/lora")[0]["Authorization"] == "Bearer hf_secret"
    assert "Authorization" not in cdn.hits(f"/blob/{sha}")[0]


def test_redirect_loops_other_schemes_and_local_urls_fail_in_one_line(
    sqlite_catalog: Catalog, servers: tuple[Server, Server], tmp_path: Path
) -> None:
    a, _ = servers
    store = sqlite_catalog.store
    secret_file = tmp_path / "local.safetensors"
    secret_file.write_bytes(b"local bytes")
    a.routes["/loop1"] = redirect("/loop2")
    a.routes["/loop2"] = redirect("/loop1")
    a.routes["/to-file"] = redirect(secret_file.as_uri())
    a.routes["/to-ftp"] = redirect("ftp://127.0.0.1:9/x.safetensors")
    with pytest.raises(DownloadError) as loop:
        download_to_store(f"{a.url}/loop1", store, config=FAST)
    assert "redirect" in _one_line(loop.value)
    for path in ("/to-file", "/to-ftp"):
        with pytest.raises(DownloadError) as refused:
            download_to_store(f"{a.url}{path}", store, config=FAST)
        assert "refused a redirect to a non-http(s) URL" in _one_line(refused.value)
        assert len(a.hits(path)) == 1  # not retried
    for url in (secret_file.as_uri(), "ftp://127.0.0.1:9/x.safetensors"):  # a record's downloadUrl
        with pytest.raises(DownloadError, match="not an http"):
            download_to_store(url, store, config=FAST)
    _no_leftovers(sqlite_catalog)


# ------------------------------------------------------------------------- rate limits, 5xx
def test_429_and_503_are_retried_after_retry_after(
    sqlite_catalog: Catalog, servers: tuple[Server, Server]
) -> None:
    a, _ = servers
    a.routes["/api"] = sequence(lambda h: send(h, 429, b"slow down", Retry_After="1"), ok_json({"ok": 1}))
    a.routes["/file"] = sequence(lambda h: send(h, 503, b"busy", Retry_After="1"), ranged(b"payload"))
    a.routes["/never"] = lambda h: send(h, 429, b"tomorrow", Retry_After="86400")
    started = time.monotonic()
    assert get_json(f"{a.url}/api", FAST) == {"ok": 1}
    assert download_to_store(f"{a.url}/file", sqlite_catalog.store, config=FAST).size_bytes == 7
    assert time.monotonic() - started >= 1.8  # waited as told, twice
    with pytest.raises(DownloadError, match=r"HTTP 429.*Retry-After 86400") as exc:
        get_json(f"{a.url}/never", FAST)
    _one_line(exc.value)
    assert len(a.hits("/never")) == 1  # a wait beyond max_retry_after_s gives up at once


# ----------------------------------------------------------------------- broken bodies
def _chunked_then_drop(data: bytes) -> Route:
    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        half = data[: len(data) // 2]
        h.wfile.write(f"{len(data):x}\r\n".encode() + half)  # promises the whole chunk, sends half
        h.wfile.flush()

    return route


def _garbage(h: BaseHTTPRequestHandler) -> None:
    h.wfile.write(b"NOT-HTTP garbage\r\n\r\n")


def _remote(cat: Catalog, model_id: int, data: bytes, url: str, **file: Any) -> int:
    record = civitai_record(model_id, f"Remote {model_id}", sha256=hashlib.sha256(data).hexdigest())
    record["modelVersions"][0]["files"][0] |= {"downloadUrl": url, **file}
    with cat.session() as s:
        adapters_db.import_civitai_records(s, cat, [(f"rec {model_id}", record)])
        return adapters_db.find_by_civitai_id(s, cat, model_id).id


@pytest.mark.parametrize(
    "broken", [_chunked_then_drop, lambda data: _garbage], ids=["cut-chunk", "bad-status"]
)
def test_a_broken_response_is_one_failed_item_and_the_batch_goes_on(
    sqlite_catalog: Catalog,
    servers: tuple[Server, Server],
    lora_file: Callable[..., Path],
    broken: Callable[[bytes], Route],
) -> None:
    a, _ = servers
    cat = sqlite_catalog
    bad, good = (lora_file(f"{n}.safetensors", seed=i).read_bytes() for i, n in enumerate(("bad", "good")))
    a.routes["/bad"] = broken(bad)
    a.routes["/good"] = ranged(good)
    ids = [_remote(cat, 501, bad, f"{a.url}/bad"), _remote(cat, 502, good, f"{a.url}/good")]
    with cat.session() as s:
        results = download_files(s, cat, ids, FAST)
    assert [r.status for r in results] == ["failed", "updated"], results
    assert "DownloadError" in results[0].message and "/bad" in _one_line(Exception(results[0].message))
    with cat.session() as s:
        assert not adapters_db.get_adapter(s, cat, ids[0]).has_local_file
    assert [sha for sha, _ in cat.store.iter_blobs()] == [hashlib.sha256(good).hexdigest()]
    a.routes["/bad"] = ranged(bad)  # the server recovers: a re-run (resuming any kept part) succeeds
    with cat.session() as s:
        assert [r.status for r in download_files(s, cat, ids[:1], FAST)] == ["updated"]
    assert list(cat.store.tmp_dir.iterdir()) == []


def test_a_resume_at_the_wrong_offset_starts_over(
    sqlite_catalog: Catalog, servers: tuple[Server, Server]
) -> None:
    a, _ = servers
    data = bytes(range(256)) * 2000

    def cut(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data[:100_000])

    def wrong_offset(h: BaseHTTPRequestHandler) -> None:  # 206, but from byte 0 whatever was asked
        send(h, 206, data, Content_Range=f"bytes 0-{len(data) - 1}/{len(data)}")

    a.routes["/f"] = sequence(cut, wrong_offset, ranged(data))
    config = HttpConfig(timeout_s=5, retries=2, backoff_s=0.01)
    sha = hashlib.sha256(data).hexdigest()
    stored = download_to_store(f"{a.url}/f", sqlite_catalog.store, expected_sha256=sha, config=config)
    assert stored.path.read_bytes() == data
    assert [h.get("Range") for h in a.hits("/f")] == [None, "bytes=100000-", None]


def test_a_body_bigger_than_the_record_or_encoded_is_refused_early(
    sqlite_catalog: Catalog, servers: tuple[Server, Server], lora_file: Callable[..., Path]
) -> None:
    a, _ = servers
    cat = sqlite_catalog
    data = lora_file("x.safetensors", seed=3).read_bytes()
    a.routes["/huge"] = lambda h: send(h, 200, b"\0" * (8 << 20))
    a.routes["/gz"] = lambda h: send(h, 200, gzip.compress(data), Content_Encoding="gzip")
    ids = [
        _remote(cat, 601, data, f"{a.url}/huge", sizeKB=len(data) / 1024),
        _remote(cat, 602, data, f"{a.url}/gz", sizeKB=len(data) / 1024),
    ]
    with cat.session() as s:
        results = download_files(s, cat, ids, FAST)
    assert [r.status for r in results] == ["failed", "failed"]
    assert "8388608 bytes is more than the" in results[0].message, results[0].message
    assert "gzip-encoded body" in results[1].message
    assert len(a.hits("/huge")) == 1  # not retried
    _no_leftovers(cat)


# --------------------------------------------------------------------------- JSON and pages
def test_gzip_and_deflate_json_is_decoded(servers: tuple[Server, Server]) -> None:
    a, _ = servers
    body = json.dumps({"items": [{"id": 1}], "metadata": {}}).encode()
    a.routes["/gz"] = lambda h: send(h, 200, gzip.compress(body), Content_Encoding="gzip")
    a.routes["/zl"] = lambda h: send(h, 200, zlib.compress(body), Content_Encoding="deflate")
    a.routes["/br"] = lambda h: send(h, 200, b"\x00\x01", Content_Encoding="br")
    assert get_json(f"{a.url}/gz", FAST) == get_json(f"{a.url}/zl", FAST) == json.loads(body)
    with pytest.raises(DownloadError, match="unsupported Content-Encoding 'br'"):
        get_json(f"{a.url}/br", FAST)


def test_a_trickling_or_huge_json_response_is_cut_off(servers: tuple[Server, Server]) -> None:
    a, _ = servers

    def trickle(h: BaseHTTPRequestHandler) -> None:
        body = json.dumps({"items": []}).encode() + b" " * 40
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        for byte in body:
            h.wfile.write(bytes([byte]))
            h.wfile.flush()
            time.sleep(0.1)

    a.routes["/slow"] = trickle
    a.routes["/big"] = ok_json({"items": ["x" * 5000]})
    config = HttpConfig(timeout_s=2, retries=0, json_deadline_s=0.5, max_json_bytes=1000)
    started = time.monotonic()
    with pytest.raises(DownloadError, match=r"no complete response within 0\.5 s"):
        get_json(f"{a.url}/slow", config)
    assert time.monotonic() - started < 3
    with pytest.raises(DownloadError, match="larger than 1000 bytes"):
        get_json(f"{a.url}/big", config)


def _page(items: list[Any], next_page: Any = None, metadata: Any = ...) -> dict[str, Any]:
    return {"items": items, "metadata": {"nextPage": next_page} if metadata is ... else metadata}


def test_pagination_that_loops_or_leaves_the_api_is_not_followed(
    sqlite_catalog: Catalog, servers: tuple[Server, Server]
) -> None:
    a, b = servers
    models = "/api/v1/models"
    client = CivitaiClient(base_url=a.url, api_key="civ_secret", config=FAST)
    calls = iter(range(1000))

    def empty_self(h: BaseHTTPRequestHandler) -> None:  # an empty page naming itself (bounded for the test)
        send(h, 404) if next(calls) > 20 else ok_json(_page([], f"{a.url}{h.path}"))(h)

    a.routes[models] = empty_self
    with pytest.raises(ValueError, match="pagination loop"):
        list(client.models(limit=10))
    assert len(a.hits(models)) == 1
    a.seen.clear()
    a.routes[models] = lambda h: ok_json(_page([], f"{models}?page={next(calls)}"))(h)  # relative, endless
    with pytest.raises(ValueError, match="5 empty pages in a row"):
        list(client.models(limit=10))
    assert len(a.hits(models)) == 5
    a.seen.clear()
    recs = [civitai_record(700 + i, f"Page model {i}") for i in range(3)]
    a.routes[models] = lambda h: ok_json(_page(recs[:2], f"{a.url}{h.path}"))(h)  # a full page naming itself
    cat = sqlite_catalog
    with cat.session() as s:
        summary = import_from_api(s, cat, client, limit=50)
    assert summary.count("imported") == 2 and summary.count("failed") == 1, summary.results
    assert "pagination loop" in summary.failed[0].message
    a.routes[models] = ok_json(_page(recs[2:], f"{b.url}{models}?page=2"))  # off to another host
    b.routes[models] = ok_json(_page([]))
    with cat.session() as s:
        summary = import_from_api(s, cat, client, limit=50)
    assert summary.count("imported") == 1 and "not followed" in summary.failed[0].message
    assert b.seen == []  # the API key never went there
    a.routes[models] = ok_json(_page([], metadata=["not", "an", "object"]))
    assert list(client.models(limit=5)) == []


def test_a_failing_page_or_junk_item_keeps_the_rest_of_the_import(
    tmp_path: Path, servers: tuple[Server, Server], capsys: pytest.CaptureFixture[str]
) -> None:
    from studio.cli import main

    a, _ = servers
    models = "/api/v1/models"
    recs = [civitai_record(800 + i, f"Kept model {i}") for i in range(2)]
    first = _page(["junk", recs[0], 42, recs[1]], f"{a.url}{models}?page=2")
    a.routes[models] = lambda h: send(h, 404, b"gone") if "page=2" in h.path else ok_json(first)(h)
    data = ["--data-dir", str(tmp_path / "data"), "--embedder", "hashing", "--no-embed"]
    assert main(["import-civitai", "--api", "--base-url", a.url, *data]) == 0
    out = capsys.readouterr()
    assert "summary: imported 2, updated 0, duplicate 0, skipped 0, failed 3" in out.out
    assert "not a JSON object: 'junk'" in out.err and "HTTP 404" in out.err
    cat = adapters_db.open_catalog(None, tmp_path / "data", embedder=adapters_db.HashingEmbedder(64))
    with cat.session() as s:
        assert s.execute(select(func.count(Adapter.id))).scalar() == 2
    cat.dispose()


def test_non_object_api_answers_are_value_errors(servers: tuple[Server, Server]) -> None:
    a, _ = servers
    a.routes["/api/v1/models/5"] = ok_json([1, 2])
    with pytest.raises(ValueError, match="expected a JSON object, got list"):
        CivitaiClient(base_url=a.url, config=FAST).model(5)


# ------------------------------------------------------------------ pickles and bad files
def test_a_pickle_is_never_downloaded_and_a_disguised_one_never_stored(
    sqlite_catalog: Catalog, servers: tuple[Server, Server]
) -> None:
    import pickle

    a, _ = servers
    cat = sqlite_catalog
    payload = pickle.dumps({"state_dict": {"w": [1.0]}})
    a.routes["/ckpt"] = ranged(payload)
    a.routes["/disguised"] = ranged(payload)  # a pickle named .safetensors, with the record's hash
    ids = [
        _remote(cat, 901, payload, f"{a.url}/ckpt", name="x.ckpt", metadata={"format": "PickleTensor"}),
        _remote(cat, 902, payload, f"{a.url}/disguised"),
    ]
    with cat.session() as s:
        results = download_files(s, cat, ids, FAST)
    assert [r.status for r in results] == ["failed", "failed"]
    assert "pickled checkpoints are refused" in results[0].message and a.hits("/ckpt") == []
    assert "safetensors" in results[1].message.lower()
    _no_leftovers(cat)


def test_a_blob_whose_catalog_update_fails_is_removed(
    sqlite_catalog: Catalog,
    servers: tuple[Server, Server],
    lora_file: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, _ = servers
    cat = sqlite_catalog
    data = lora_file("x.safetensors", seed=4).read_bytes()
    a.routes["/f"] = ranged(data)
    ids = [_remote(cat, 950, data, f"{a.url}/f")]

    def boom(*args: Any) -> None:
        raise RuntimeError("database is locked")

    monkeypatch.setattr(civitai_api, "attach_local_file", boom)
    with cat.session() as s:
        (result,) = download_files(s, cat, ids, FAST)
    assert result.status == "failed" and "database is locked" in result.message
    _no_leftovers(cat)


# --------------------------------------------------------------------------- Hugging Face
def test_a_hugging_face_listing_with_folders_and_junk(
    catalog: Catalog, servers: tuple[Server, Server], lora_file: Callable[..., Path]
) -> None:
    hub, _ = servers
    lora = lora_file("style.safetensors", seed=5).read_bytes()
    sha = hashlib.sha256(lora).hexdigest()
    hub.routes["/api/models/me/mixed"] = ok_json(
        {
            "cardData": ["not", "a", "mapping"],
            "tags": "lora",
            "siblings": [
                "junk",
                None,
                {"rfilename": "README.md"},
                {"rfilename": "unet/diffusion_pytorch_model.safetensors", "lfs": {"sha256": "ab" * 32}},
                {"rfilename": "text_encoder/model.safetensors", "lfs": {"sha256": "cd" * 32}},
                {"rfilename": "no-lfs.safetensors"},
                {"rfilename": "loras/v2/style.safetensors", "lfs": {"sha256": sha}},
            ],
        }
    )
    hub.routes["/me/mixed/resolve/main/loras/v2/style.safetensors"] = ranged(lora)
    hub.routes["/api/models/me/list"] = ok_json([1, 2, 3])
    client = HuggingFaceClient(base_url=hub.url, config=FAST)
    with catalog.session() as s:
        summary = import_hf_repo(s, catalog, client, "me/mixed")
        assert [r.status for r in summary.results] == ["skipped", "skipped", "failed", "imported"]
        assert "no LFS SHA-256" in summary.results[2].message
        rec = adapters_db.get_adapter(s, catalog, summary.results[3].adapter_id)
        assert rec.files[0].file_name == "loras/v2/style.safetensors"
        (bad,) = import_hf_repo(s, catalog, client, "me/list").results
        assert bad.status == "failed" and "not a Hub model listing" in bad.message
    requested = [p for p, _ in hub.seen if "/resolve/" in p and not p.endswith("README.md")]
    assert requested == ["/me/mixed/resolve/main/loras/v2/style.safetensors"]  # no gigabyte UNet fetched
