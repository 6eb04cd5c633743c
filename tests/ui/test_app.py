"""The Gradio app: its API surface, launch defaults, errors as messages, and concurrent sessions through
``gradio_client`` (two sessions, two mixes, each gets exactly its own single-session images)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image

from studio.config import StudioConfig
from studio.services import build_engine_services, catalog_resolver, seed_catalog
from studio.ui import DOCUMENTED_API, build_app, launch
from tests.ui.conftest import make_services
from tests.ui.fixtures import pixels

GEN = dict(prompt="a zq star", seed=5, steps=2, width=32, height=32)


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, studio_model: str, lora_files: dict[str, Path]
) -> Iterator[tuple[str, object]]:
    """The app served in this process on a free loopback port."""
    services, _ = make_services(tmp_path_factory.mktemp("served") / "data", studio_model, lora_files)
    demo = build_app(services)
    _, url, share = launch(demo, services, port=None, prevent_thread_lock=True, quiet=True)
    assert share is None
    yield url, demo
    demo.close()
    services.close()


def test_every_event_is_named_and_the_documented_api_exists(served):
    url, demo = served
    names = [fn.api_name for fn in demo.fns.values()]
    assert all(isinstance(n, str) and n for n in names)
    assert len(names) == len(set(names))
    endpoints = Client(url, verbose=False).view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(DOCUMENTED_API) <= set(endpoints)
    generate = [p["parameter_name"] for p in endpoints["/generate"]["parameters"]]
    assert generate == [
        "prompt",
        "negative_prompt",
        "fusion",
        "fusion_params",
        "seed",
        "steps",
        "guidance",
        "width",
        "height",
        "sampler",
        "batch_size",
        "batch_count",
        "clip_skip",
    ]
    assert demo.analytics_enabled is False and url.startswith("http://127.0.0.1:")


def generate(client: Client, adapter: str) -> np.ndarray:
    client.predict(api_name="/clear_mix")
    client.predict(ref=adapter, api_name="/add_adapter")
    gallery, recipe, _heatmap, _report = client.predict(**GEN, api_name="/generate")
    assert adapter in recipe
    return pixels(gallery[0]["image"])


def test_concurrent_sessions_each_get_their_own_mix(served):
    url, _ = served
    single = Client(url, verbose=False)
    reference = {name: generate(single, name) for name in ("Alpha Stars", "Beta Waves")}
    assert not np.array_equal(reference["Alpha Stars"], reference["Beta Waves"])
    clients = {name: Client(url, verbose=False) for name in reference}
    for name, client in clients.items():
        client.predict(ref=name, api_name="/add_adapter")
    start, results, errors = threading.Barrier(2), {}, []

    def run(name: str) -> None:
        try:
            start.wait(timeout=30)
            gallery, _, _, _ = clients[name].predict(**GEN, api_name="/generate")
            results[name] = pixels(gallery[0]["image"])
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for name, image in results.items():
        assert np.array_equal(image, reference[name]), f"{name} got another session's image"


def test_errors_come_back_as_messages_and_the_server_stays_up(served):
    url, _ = served
    client = Client(url, verbose=False)
    with pytest.raises(AppError, match="Add adapter: no adapter 'Nobody' in the catalog"):
        client.predict(ref="Nobody", api_name="/add_adapter")
    with pytest.raises(AppError, match="Value 0 is less than minimum value 1"):
        client.predict(**{**GEN, "steps": 0}, api_name="/generate")
    with pytest.raises(AppError, match="the policy parameters are not valid JSON"):
        client.predict(**GEN, fusion_params="{period: 2", api_name="/generate")
    with pytest.raises(AppError, match="no such training job"):
        client.predict(job_id="0" * 32, api_name="/job_status")
    hits = client.predict(prompt="a zq star", api_name="/search")[1]
    assert hits[0]["name"] == "Alpha Stars"
    cards, label, items, _page = client.predict(query="", page=1, api_name="/catalog")
    assert (
        label == "page 1 of 1 (3 adapters)"
        and {i["name"] for i in items} == {"Alpha Stars", "Beta Waves", "Gamma Counter"}
        and "as-card" in cards
    )


def test_logins_keep_their_own_history(tmp_path, studio_model, lora_files):
    services, _ = make_services(tmp_path / "data", studio_model, lora_files)
    demo = build_app(services)
    _, url, _ = launch(
        demo,
        services,
        port=None,
        auth=[("ana", "a-pass"), ("bo", "b-pass")],
        prevent_thread_lock=True,
        quiet=True,
    )
    try:
        with pytest.raises(ValueError, match="credentials were not provided"):
            Client(url, verbose=False)
        with pytest.raises(ValueError, match="Could not login"):
            Client(url, auth=("ana", "wrong"), verbose=False)
        ana = Client(url, auth=("ana", "a-pass"), verbose=False)
        bo = Client(url, auth=("bo", "b-pass"), verbose=False)
        ana.predict(**GEN, api_name="/generate")
        ana_cards, ana_label, _, ana_entries = ana.predict(query="", api_name="/history_search")
        bo_cards, bo_label, _, bo_entries = bo.predict(query="", api_name="/history_search")
        assert ana_label.endswith("(1 generation)") and ana_cards.count('data-action="open"') == 1
        assert [e["prompt"] for e in ana_entries] == ["a zq star"] and ana_entries[0]["recipe"]["seed"] == 5
        assert (
            bo_label.endswith("(0 generations)") and 'data-action="open"' not in bo_cards and bo_entries == []
        )
    finally:
        demo.close()
        services.close()


def test_app_launcher_defaults():
    import app

    args = app.build_parser().parse_args([])
    assert (args.host, args.port, args.auth, args.model) == ("127.0.0.1", 7860, None, "pocket")
    assert app.build_parser().parse_args(["--auth", "ana:s3cret:x"]).auth == ("ana", "s3cret:x")
    with pytest.raises(SystemExit):
        app.build_parser().parse_args(["--auth", "nopassword"])


def test_seed_catalog_imports_the_bundled_folder_once(fresh_studio, lora_files, tmp_path):
    services, _ = fresh_studio
    folder = tmp_path / "pocket-catalog"
    folder.mkdir()
    lora = lora_files["Beta Waves"]
    (folder / "waves.safetensors").write_bytes(lora.read_bytes()[:-1] + b" ")  # new bytes, same header
    summary = seed_catalog(services, folder)
    assert summary is not None and [r.status for r in summary.results] == ["imported"]
    assert seed_catalog(services, folder) is None  # the marker says this version is in
    assert seed_catalog(services, tmp_path / "absent") is None


def test_missing_model_and_missing_files_say_why(tmp_path):
    services = build_engine_services(
        StudioConfig(data_dir=tmp_path, model=str(tmp_path / "no-model"), device="cpu")
    )
    info = services.model_info()
    assert info.error and "no-model" in info.error
    assert build_app(services) is not None  # the page still opens and says why generating cannot work

    class Store:
        def path_for(self, sha: str) -> Path:
            return tmp_path / sha

    class Catalog:
        store = Store()

    with pytest.raises(FileNotFoundError, match="not stored locally"):
        catalog_resolver(Catalog())("ab" * 32)


def test_the_studio_only_talks_to_loopback(tmp_path, studio_model, lora_files, monkeypatch):
    """Building, launching and using the studio opens no connection beyond 127.0.0.1 (no analytics, no
    version check, no Hub)."""
    import socket

    seen: list[object] = []
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(self, address):  # type: ignore[no-untyped-def]
        seen.append(address)
        return real_connect(self, address)

    def getaddrinfo(host, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append((host,))  # a name lookup counts too: offline, a lookup fails before any connect
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    services, _ = make_services(tmp_path / "data", studio_model, lora_files)
    demo = build_app(services)
    _, url, _ = launch(demo, services, port=None, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(url, verbose=False)
        client.predict(prompt="a zq star", api_name="/search")
        client.predict(**GEN, api_name="/generate")
    finally:
        demo.close()
        services.close()
    hosts = {str(a[0]) for a in seen if isinstance(a, tuple)}
    assert hosts and hosts <= {"127.0.0.1", "::1", "localhost"}, hosts


def test_policy_and_compare_endpoints(served):
    url, _ = served
    client = Client(url, verbose=False)
    params, help_text, *_ = client.predict(policy="switch", api_name="/set_policy")
    assert json.loads(params) == {"period": 5, "order": None} and "LoRA Switch" in help_text
    client.predict(ref="Alpha Stars", api_name="/add_adapter")
    client.predict(ref="Beta Waves", api_name="/add_adapter")
    grid, text = client.predict(**GEN, compare_with=["ties"], leave_one_out=True, api_name="/compare")
    with Image.open(grid) as im:
        assert im.size == (4 * 128, 128 + 18)  # current, ties, without each adapter
    assert "4 variants" in text and "without Beta Waves" in text


def test_clip_skip_from_the_form_reaches_the_recipe_and_comes_back(served):
    url, _ = served
    client = Client(url, verbose=False)
    client.predict(api_name="/clear_mix")
    _gallery, recipe, _heatmap, _report = client.predict(**GEN, clip_skip=2, api_name="/generate")
    assert json.loads(recipe)["clip_skip"] == 2
    _gallery, recipe, _heatmap, _report = client.predict(**GEN, api_name="/generate")  # the default: unset
    assert "clip_skip" not in json.loads(recipe)
