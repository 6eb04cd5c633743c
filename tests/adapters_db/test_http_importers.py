"""Network importers against a real HTTP server on 127.0.0.1: a fake Civitai API and a fake Hugging Face
repo layout; downloads are resumed, verified by SHA-256 and only then registered."""

from __future__ import annotations

import hashlib
import json
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

import adapters_db
from adapters_db import Catalog, HashingEmbedder
from adapters_db.importers.civitai_api import CivitaiClient, identify_file, import_from_api
from adapters_db.importers.download import DownloadError, HttpConfig, download_to_store, partial_path
from adapters_db.importers.huggingface import HuggingFaceClient, import_hf_repo
from adapters_db.models import Adapter
from adapters_db.store import HashMismatchError
from tests.adapters_db.conftest import civitai_record

FAST = HttpConfig(timeout_s=5, retries=1, backoff_s=0.01)


class FakeHub:
    """Routes → bytes or JSON; records requests; can cut one response short to test resuming."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.json: dict[str, Any] = {}
        self.cut_once: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.authorization: dict[str, str | None] = {}  # path → its request's Authorization header
        self.models: list[dict[str, Any]] = []

    def handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                hub.requests.append((self.path, self.headers.get("Range")))
                hub.authorization[self.path] = self.headers.get("Authorization")
                url = urllib.parse.urlsplit(self.path)
                if url.path == "/api/v1/models":
                    return self._json(hub.models_page(urllib.parse.parse_qs(url.query), self.server))
                if url.path in hub.json:
                    return self._json(hub.json[url.path])
                if url.path in hub.files:
                    return self._file(url.path)
                self.send_error(404, "not found")
                return None

            def _json(self, data: Any) -> None:
                body = json.dumps(data).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _file(self, path: str) -> None:
                data = hub.files[path]
                start = 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                cut = hub.cut_once.pop(path, None)
                self.wfile.write(data[start:cut] if cut is not None else data[start:])
                if cut is not None:
                    self.wfile.flush()
                    self.close_connection = True

        return Handler

    def models_page(self, query: dict[str, list[str]], server: Any) -> dict[str, Any]:
        assert query.get("types") == ["LORA"]
        limit = int(query.get("limit", ["100"])[0])
        page = int(query.get("page", ["1"])[0])
        text = query.get("query", [""])[0].lower()
        items = [m for m in self.models if text in m["name"].lower()]
        chunk = items[(page - 1) * limit : page * limit]
        base = f"http://127.0.0.1:{server.server_address[1]}"
        more = page * limit < len(items)
        next_page = (
            f"{base}/api/v1/models?types=LORA&limit={limit}&page={page + 1}&query={text}" if more else None
        )
        return {"items": chunk, "metadata": {"currentPage": page, "nextPage": next_page}}


@pytest.fixture
def hub() -> Iterator[tuple[FakeHub, str]]:
    fake = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), fake.handler())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield fake, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_resumes_and_verifies(sqlite_catalog: Catalog, hub: tuple[FakeHub, str]) -> None:
    fake, base = hub
    data = bytes(range(256)) * 4000
    sha = hashlib.sha256(data).hexdigest()
    fake.files["/big.bin"] = data
    fake.cut_once["/big.bin"] = 300_000
    store = sqlite_catalog.store
    stored = download_to_store(f"{base}/big.bin", store, expected_sha256=sha, config=FAST)
    assert stored.sha256 == sha and stored.path.read_bytes() == data
    ranges = [r for p, r in fake.requests if p == "/big.bin"]
    assert ranges == [None, "bytes=300000-"]  # the second request resumed where the first broke
    assert not partial_path(store, f"{base}/big.bin").exists()
    fake.files["/evil.bin"] = b"not what was promised"
    with pytest.raises(HashMismatchError, match="SHA-256 mismatch"):
        download_to_store(f"{base}/evil.bin", store, expected_sha256=sha[::-1], config=FAST)
    assert not partial_path(store, f"{base}/evil.bin").exists()
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_to_store(f"{base}/missing.bin", store, config=FAST)
    assert [s for s, _ in store.iter_blobs()] == [sha]


def _civitai_setup(fake: FakeHub, lora_file: Callable[..., Path]) -> tuple[Path, Path]:
    good = lora_file("good.safetensors", seed=21)
    other = lora_file("other.safetensors", seed=22)
    fake.models = [
        civitai_record(
            101, "Good Remote", trained=["goodrmt"], sha256=hashlib.sha256(good.read_bytes()).hexdigest()
        ),
        civitai_record(102, "Tampered Remote", trained=["tmprd"], sha256="ab" * 32),
        civitai_record(103, "Good Second", trained=["second"]),
    ]
    fake.models[2]["modelVersions"][0]["files"] = []
    for m in fake.models[:2]:
        vid = m["modelVersions"][0]["id"]
        m["modelVersions"][0]["files"][0]["downloadUrl"] = f"/api/download/models/{vid}"
    fake.files["/api/download/models/1010"] = good.read_bytes()
    fake.files["/api/download/models/1020"] = other.read_bytes()  # bytes that do not match the record's hash
    return good, other


def test_civitai_api_import_with_verified_downloads(
    sqlite_catalog: Catalog, hub: tuple[FakeHub, str], lora_file: Callable[..., Path]
) -> None:
    fake, base = hub
    good, _ = _civitai_setup(fake, lora_file)
    for m in fake.models[:2]:
        f = m["modelVersions"][0]["files"][0]
        f["downloadUrl"] = base + f["downloadUrl"]
    client = CivitaiClient(base_url=base, config=FAST)
    assert [m["id"] for m in client.models(limit=10, page_size=2)] == [101, 102, 103]  # follows nextPage
    cat = sqlite_catalog
    with cat.session() as s:
        summary = import_from_api(s, cat, client, limit=10, download=True)
    statuses = [(r.status, r.message) for r in summary.results]
    assert summary.count("imported") == 3 and summary.count("updated") == 1, statuses
    (failure,) = summary.failed
    assert "SHA-256 mismatch" in failure.message and "/api/download/models/1020" in failure.source
    with cat.session() as s:
        good_rec = adapters_db.find_by_civitai_id(s, cat, 101)
        assert (
            good_rec.has_local_file
            and adapters_db.local_file_path(good_rec).read_bytes() == good.read_bytes()
        )
        tampered = adapters_db.find_by_civitai_id(s, cat, 102)
        assert not tampered.has_local_file and tampered.files[0].remote_url.endswith("/1020")
    assert len(list(cat.store.iter_blobs())) == 1  # the tampered bytes never entered the store


def test_downloaded_lora_with_nan_weights_stays_remote(
    sqlite_catalog: Catalog, hub: tuple[FakeHub, str], lora_file: Callable[..., Path]
) -> None:
    from safetensors.torch import load_file, save_file

    fake, base = hub
    path = lora_file("nan.safetensors", seed=23)
    tensors = load_file(str(path))
    next(t for k, t in sorted(tensors.items()) if k.endswith("lora_down.weight"))[0, 0] = float("nan")
    save_file(tensors, str(path))
    data = path.read_bytes()
    fake.models = [civitai_record(104, "NaN Remote", sha256=hashlib.sha256(data).hexdigest())]
    f = fake.models[0]["modelVersions"][0]["files"][0]
    f["downloadUrl"] = f"{base}/api/download/models/1040"
    fake.files["/api/download/models/1040"] = data
    cat = sqlite_catalog
    with cat.session() as s:
        summary = import_from_api(s, cat, CivitaiClient(base_url=base, config=FAST), limit=5, download=True)
    assert summary.count("imported") == 1 and summary.count("failed") == 1, summary.results
    assert "NonFiniteWeightsError" in summary.failed[0].message and "NaN" in summary.failed[0].message
    with cat.session() as s:
        assert not adapters_db.find_by_civitai_id(s, cat, 104).has_local_file
    assert list(cat.store.iter_blobs()) == []  # the bad bytes were removed from the store


def test_civitai_query_and_lookup_by_hash(
    sqlite_catalog: Catalog, hub: tuple[FakeHub, str], lora_file: Callable[..., Path]
) -> None:
    fake, base = hub
    good, _ = _civitai_setup(fake, lora_file)
    sha = hashlib.sha256(good.read_bytes()).hexdigest()
    fake.json[f"/api/v1/model-versions/by-hash/{sha}"] = fake.models[0]["modelVersions"][0]
    client = CivitaiClient(base_url=base, config=FAST)
    assert identify_file(client, good)["modelId"] == 101
    with pytest.raises(DownloadError, match="HTTP 404"):
        client.version_by_hash("0" * 64)
    with sqlite_catalog.session() as s:
        summary = import_from_api(s, sqlite_catalog, client, query="second", limit=5)
    assert [r.name for r in summary.results] == ["Good Second"]


def test_hugging_face_repo_import(
    catalog: Catalog, hub: tuple[FakeHub, str], lora_file: Callable[..., Path]
) -> None:
    fake, base = hub
    lora = lora_file("pytorch_lora_weights.safetensors", seed=31).read_bytes()
    extra = lora_file("alt.safetensors", seed=32).read_bytes()
    fake.json["/api/models/someone/watercolor-lora"] = {
        "id": "someone/watercolor-lora",
        "author": "someone",
        "tags": ["lora", "text-to-image", "license:mit"],
        "cardData": {
            "license": "mit",
            "base_model": "runwayml/stable-diffusion-v1-5",
            "instance_prompt": "wtrclr painting",
            "tags": ["watercolor", "style"],
        },
        "siblings": [
            {"rfilename": "README.md"},
            {
                "rfilename": "pytorch_lora_weights.safetensors",
                "lfs": {"sha256": hashlib.sha256(lora).hexdigest(), "size": len(lora)},
            },
            {"rfilename": "corrupt.safetensors", "lfs": {"sha256": hashlib.sha256(extra).hexdigest()}},
        ],
    }
    fake.files["/someone/watercolor-lora/resolve/main/pytorch_lora_weights.safetensors"] = lora
    fake.files["/someone/watercolor-lora/resolve/main/corrupt.safetensors"] = extra[:-10] + b"0123456789"
    fake.files["/someone/watercolor-lora/resolve/main/README.md"] = (
        b"---\nlicense: mit\n---\n# Watercolor\nSoft <script>x</script> washes.\n"
    )
    client = HuggingFaceClient(base_url=base, config=FAST)
    with catalog.session() as s:
        summary = import_hf_repo(s, catalog, client, "someone/watercolor-lora")
        assert summary.count("imported") == 1 and summary.count("failed") == 1, summary.results
        assert "SHA-256 mismatch" in summary.failed[0].message
        rec = adapters_db.get_adapter(s, catalog, summary.results[0].adapter_id)
        assert rec.name == "watercolor-lora" and rec.hf_repo == "someone/watercolor-lora"
        assert rec.trigger_words == ("wtrclr painting",) and rec.base_family == "sd1"
        assert rec.licence.license == "mit" and set(rec.tags) == {"watercolor", "style"}
        assert "<script" not in rec.description_html and "Soft" in rec.description_text
        assert rec.files[0].file_name == "pytorch_lora_weights.safetensors"
        assert adapters_db.local_file_path(rec).read_bytes() == lora
    with catalog.session() as s:
        again = import_hf_repo(s, catalog, client, "someone/watercolor-lora")
        assert again.count("duplicate") == 1
        assert import_hf_repo(s, catalog, client, "someone/absent").count("failed") == 1
        assert (
            "not a Hugging Face repo id" in import_hf_repo(s, catalog, client, "../../etc").results[0].message
        )
        assert s.execute(select(func.count(Adapter.id))).scalar() == 1


def test_civitai_urls_are_recognised() -> None:
    from adapters_db.importers.civitai_api import parse_civitai_url

    base = "http://127.0.0.1:8765"
    assert parse_civitai_url("https://civitai.com/models/4384") == (4384, None)
    assert parse_civitai_url("https://civitai.com/models/4384/dreamshaper?modelVersionId=128713") == (
        4384,
        128713,
    )
    assert parse_civitai_url("https://www.civitai.com/api/download/models/128713") == (None, 128713)
    assert parse_civitai_url(f"{base}/models/7/x", base) == (7, None)
    assert parse_civitai_url(f"{base}/models/7/x") is None  # another host is only Civitai when configured
    for other in (
        "https://evil.example/models/4384",
        "ftp://civitai.com/models/1",
        "https://civitai.com/images/5",
    ):
        assert parse_civitai_url(other) is None


def test_the_civitai_key_goes_to_civitai_only() -> None:
    from adapters_db.importers.civitai_api import download_config

    on = download_config("https://civitai.com/api/download/models/1", FAST, "secret")
    assert on.headers["Authorization"] == "Bearer secret"
    for url in ("https://huggingface.co/x/y/resolve/main/a.safetensors", "http://127.0.0.1:9/a"):
        assert "Authorization" not in download_config(url, FAST, "secret").headers
    assert "Authorization" not in download_config("https://civitai.com/a", FAST, None).headers


def test_a_civitai_page_url_imports_the_model_and_downloads_its_version(
    sqlite_catalog: Catalog, hub: tuple[FakeHub, str], lora_file: Callable[..., Path]
) -> None:
    from adapters_db.importers.civitai_api import import_civitai_url

    fake, base = hub
    old, new = lora_file("old.safetensors", seed=41), lora_file("new.safetensors", seed=42)
    record = civitai_record(300, "Two Versions", sha256=hashlib.sha256(new.read_bytes()).hexdigest())
    first = record["modelVersions"][0]
    first["files"][0]["downloadUrl"] = f"{base}/api/download/models/3000"
    second = json.loads(json.dumps(first))  # an older version of the same model, listed after it
    second["id"] = 2999
    second["files"][0] |= {
        "id": 29990,
        "name": "old.safetensors",
        "hashes": {"SHA256": hashlib.sha256(old.read_bytes()).hexdigest().upper()},
        "downloadUrl": f"{base}/api/download/models/2999",
    }
    second["images"] = []
    record["modelVersions"].append(second)
    fake.json["/api/v1/models/300"] = record
    fake.json["/api/v1/model-versions/2999"] = {"id": 2999, "modelId": 300}
    fake.files["/api/download/models/3000"] = new.read_bytes()
    fake.files["/api/download/models/2999"] = old.read_bytes()
    client = CivitaiClient(base_url=base, config=FAST)
    cat = sqlite_catalog
    with cat.session() as s:  # the page names the older version: only its file is downloaded
        summary = import_civitai_url(s, cat, client, f"{base}/models/300/two-versions?modelVersionId=2999")
    assert [r.status for r in summary.results] == ["imported", "updated"], summary.results
    downloaded = [p for p, _ in fake.requests if p.startswith("/api/download")]
    assert downloaded == ["/api/download/models/2999"]
    with cat.session() as s:
        rec = adapters_db.find_by_civitai_id(s, cat, 300)
        stored = {f.file_name for f in rec.files if f.is_local}
    assert stored == {"old.safetensors"} and rec.has_local_file
    with cat.session() as s:  # a download link finds its model through the version endpoint
        again = import_civitai_url(s, cat, client, f"{base}/api/download/models/2999")
    assert [r.status for r in again.results] == ["duplicate"]  # nothing new, nothing downloaded twice
    with cat.session() as s, pytest.raises(ValueError, match="has no version 5"):
        import_civitai_url(s, cat, client, f"{base}/models/300?modelVersionId=5")


def _remote_catalog(
    tmp_path: Path, hub: tuple[FakeHub, str], remote: list[tuple[dict[str, Any], str]], payload: bytes
) -> tuple[list[str], Catalog, dict[int, int]]:
    """Civitai records whose file the hub serves at the given paths, imported with ``studio
    import-civitai``: the CLI's data arguments, the catalog and Civitai id → adapter id."""
    from studio.cli import main

    fake, base = hub
    for rec, path in remote:
        rec["modelVersions"][0]["files"][0]["downloadUrl"] = base + path
        fake.files[path] = payload
    dump = tmp_path / "dump.jsonl"
    dump.write_text("\n".join(json.dumps(rec) for rec, _ in remote) + "\n")
    data = ["--data-dir", str(tmp_path / "data"), "--embedder", "hashing"]
    assert main(["import-civitai", str(dump), "--no-embed", *data]) == 0
    cat = adapters_db.open_catalog(None, tmp_path / "data", embedder=HashingEmbedder(64))
    with cat.session() as s:
        ids = {rec["id"]: adapters_db.find_by_civitai_id(s, cat, rec["id"]).id for rec, _ in remote}
    return data, cat, ids


def test_studio_catalog_download_fetches_a_remote_adapter(
    tmp_path: Path,
    hub: tuple[FakeHub, str],
    lora_file: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    from studio.cli import main

    good = lora_file("good.safetensors", seed=51)
    ok = civitai_record(401, "Fetch Me", sha256=hashlib.sha256(good.read_bytes()).hexdigest())
    bad = civitai_record(402, "Tampered", sha256="cd" * 32)
    data, cat, ids = _remote_catalog(tmp_path, hub, [(ok, "/dl/4010"), (bad, "/dl/4020")], good.read_bytes())
    capsys.readouterr()
    assert main(["catalog", "download", "--id", str(ids[401]), "--id", str(ids[402]), *data]) == 1
    out = capsys.readouterr()
    assert "SHA-256 mismatch" in out.err and "downloaded and verified" in out.err
    with cat.session() as s:
        assert adapters_db.get_adapter(s, cat, ids[401]).has_local_file
        assert not adapters_db.get_adapter(s, cat, ids[402]).has_local_file
    assert main(["catalog", "download", "--id", str(ids[401]), *data]) == 1  # already stored: nothing to do
    assert "nothing to download" in capsys.readouterr().out
    cat.dispose()


def test_download_of_a_file_listed_by_two_adapters_fetches_once_and_reports_each(
    tmp_path: Path,
    hub: tuple[FakeHub, str],
    lora_file: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    from studio.cli import main

    fake, _ = hub
    shared = lora_file("shared.safetensors", seed=61)
    sha = hashlib.sha256(shared.read_bytes()).hexdigest()
    first, second = civitai_record(501, "Original", sha256=sha), civitai_record(502, "Reupload", sha256=sha)
    remote = [(first, "/dl/5010"), (second, "/dl/5020")]
    data, cat, ids = _remote_catalog(tmp_path, hub, remote, shared.read_bytes())
    capsys.readouterr()
    # the second adapter alone: reported under its own id (it was the first one's id, so the command
    # said "nothing to download" for the adapter it had just downloaded)
    assert main(["catalog", "download", "--id", str(ids[502]), *data]) == 0
    out = capsys.readouterr()
    assert "nothing to download" not in out.out and "downloaded and verified" in out.err + out.out
    with cat.session() as s:
        assert adapters_db.get_adapter(s, cat, ids[501]).has_local_file  # one file, stored for both
        assert adapters_db.get_adapter(s, cat, ids[502]).has_local_file
    cat.dispose()
    downloads = [p for p, _ in fake.requests if p.startswith("/dl/50")]
    assert downloads == ["/dl/5020"]


def test_one_file_asked_for_twice_is_fetched_once(
    sqlite_catalog: Catalog, hub: tuple[FakeHub, str], lora_file: Callable[..., Path]
) -> None:
    from adapters_db.importers.civitai_api import download_files

    fake, base = hub
    shared = lora_file("twice.safetensors", seed=62)
    sha = hashlib.sha256(shared.read_bytes()).hexdigest()
    records = [civitai_record(601, "One", sha256=sha), civitai_record(602, "Two", sha256=sha)]
    for rec, path in zip(records, ("/dl/6010", "/dl/6020"), strict=True):
        rec["modelVersions"][0]["files"][0]["downloadUrl"] = base + path
        fake.files[path] = shared.read_bytes()
    with sqlite_catalog.session() as s:
        adapters_db.import_civitai_records(s, sqlite_catalog, ((f"r{r['id']}", r) for r in records))
        ids = [adapters_db.find_by_civitai_id(s, sqlite_catalog, n).id for n in (601, 602)]
        results = download_files(s, sqlite_catalog, ids, FAST)
    assert [r.adapter_id for r in results] == ids and all(r.ok for r in results)
    assert "same file" in results[1].message
    assert [p for p, _ in fake.requests if p.startswith("/dl/60")] == ["/dl/6010"]
