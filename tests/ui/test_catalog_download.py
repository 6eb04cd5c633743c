"""The Catalog tab fetches what the catalog only lists: a remote adapter's file (Download in its detail
view) and a Civitai model page pasted into the import box, against a fake Civitai on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import adapters_db
from studio.handlers import catalog as C
from studio.handlers import create
from studio.handlers import html as H
from studio.handlers.state import SessionState
from tests.adapters_db.conftest import civitai_record
from tests.adapters_db.test_http_importers import FakeHub
from tests.adapters_db.test_http_importers import hub as hub  # the fixture


@pytest.fixture()
def civitai(hub: tuple[FakeHub, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeHub, str]]:
    """The fake hub as the studio's Civitai, with an API key that must never reach it (not Civitai's host)."""
    fake, base = hub
    monkeypatch.setenv("STUDIO_CIVITAI_URL", base)
    monkeypatch.setenv("CIVITAI_API_KEY", "secret-key")
    yield fake, base


def fresh_bytes(path: Path, note: str) -> bytes:
    """The LoRA at ``path`` with other metadata: the same weights, a file the catalog does not hold."""
    from safetensors.torch import load_file, save

    return save(load_file(str(path)), {"ss_output_name": note})


def _remote(services: Any, record: dict[str, Any]) -> int:
    with services.catalog.session() as s:
        adapters_db.import_civitai_records(s, services.catalog, [(str(record["id"]), record)])
        return adapters_db.find_by_civitai_id(s, services.catalog, record["id"]).id


def test_download_a_remote_adapter_then_mix_it(fresh_studio, civitai, lora_files) -> None:
    services, _ = fresh_studio
    fake, base = civitai
    data = fresh_bytes(lora_files["Alpha Stars"], "remote_stars")
    record = civitai_record(501, "Remote Stars", trained=["rmtstar"], sha256=hashlib.sha256(data).hexdigest())
    record["modelVersions"][0]["files"][0]["downloadUrl"] = f"{base}/dl/5010"
    fake.files["/dl/5010"] = data
    adapter_id = _remote(services, record)
    before = C.get_record(services, adapter_id)
    assert before.downloadable and 'data-action="download"' in H.detail_view(before)
    with pytest.raises(ValueError, match="import or download its file first"):
        create.add_adapter(services, SessionState(), adapter_id)
    after, summary = C.download_adapter(services, adapter_id)
    assert after.has_local_file and not after.downloadable and summary.results[0].status == "updated"
    assert 'data-action="add"' in H.detail_view(after)
    state, _ = create.add_adapter(services, SessionState(), adapter_id)
    assert [m.name for m in state.mix] == ["Remote Stars"]
    assert fake.authorization == {"/dl/5010": None}  # the key is for Civitai's hosts only
    with pytest.raises(ValueError, match="its file is already stored"):
        C.download_adapter(services, adapter_id)


def test_a_failed_download_leaves_the_adapter_remote_and_says_why(fresh_studio, civitai, lora_files) -> None:
    services, _ = fresh_studio
    fake, base = civitai
    record = civitai_record(502, "Tampered Stars", sha256="ef" * 32)
    record["modelVersions"][0]["files"][0]["downloadUrl"] = f"{base}/dl/5020"
    fake.files["/dl/5020"] = lora_files["Alpha Stars"].read_bytes()
    adapter_id = _remote(services, record)
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        C.download_adapter(services, adapter_id)
    assert C.get_record(services, adapter_id).downloadable


def test_a_civitai_page_pasted_into_import_from_url(fresh_studio, civitai, lora_files) -> None:
    services, _ = fresh_studio
    fake, base = civitai
    data = fresh_bytes(lora_files["Beta Waves"], "page_waves")
    record = civitai_record(503, "Page Waves", trained=["pgwave"], sha256=hashlib.sha256(data).hexdigest())
    record["modelVersions"][0]["files"][0]["downloadUrl"] = f"{base}/api/download/models/5030"
    fake.json["/api/v1/models/503"] = json.loads(json.dumps(record))
    fake.files["/api/download/models/5030"] = data
    summary = C.import_url(services, f"{base}/models/503/page-waves")
    assert [r.status for r in summary.results] == ["imported", "updated"], summary.results
    assert fake.authorization == {  # the API is given the key; the file host (not Civitai's) is not
        "/api/v1/models/503": "Bearer secret-key",
        "/api/download/models/5030": None,
    }
    with services.catalog.session() as s:
        assert adapters_db.find_by_civitai_id(s, services.catalog, 503).has_local_file
    with pytest.raises(ValueError, match="Civitai model page"):
        C.import_url(services, "not a url")
