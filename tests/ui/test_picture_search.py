"""Search by picture (the issue: "preview images and uploaded pictures are searchable"): the Catalog tab's
panel and ``studio search --image`` list the adapters whose previews look most like an uploaded picture,
with the catalog's filters, and say clearly when the catalog's embedder reads text only."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

import adapters_db
from adapters_db.embedders import tiny_open_clip
from studio.cli import main
from studio.config import StudioConfig
from studio.handlers import catalog as C
from studio.services import build_services
from tests.ui.conftest import make_services

RED, GREEN = (220, 20, 20), (20, 200, 40)
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def picture(path: Path, colour: tuple[int, int, int]) -> Path:
    Image.new("RGB", (48, 48), colour).save(path)
    return path


def test_the_catalog_finds_adapters_like_a_picture(tmp_path: Path, lora_files: dict[str, Path]) -> None:
    os.environ.setdefault("GRADIO_TEMP_DIR", str(tmp_path / "gradio-tmp"))
    config = StudioConfig(data_dir=tmp_path / "data", model="pocket", device="cpu", dtype="fp32")
    services = build_services(config, embedder=tiny_open_clip(0), start_jobs=False, seed=False)
    try:
        with services.catalog.session() as s:
            red = adapters_db.register_trained_adapter(
                s,
                services.catalog,
                lora_files["Alpha Stars"],
                captions=[],
                sample_images=[picture(tmp_path / "r.png", RED)],
                name="Red Things",
            )
            green = adapters_db.register_trained_adapter(
                s,
                services.catalog,
                lora_files["Beta Waves"],
                captions=[],
                sample_images=[picture(tmp_path / "g.png", GREEN)],
                name="Green Things",
            )
        assert "Upload or paste a picture" in C.picture_search_note(services)
        query = picture(tmp_path / "query.png", (230, 10, 10))
        page = C.find_by_picture(services, str(query), C.CatalogQuery())
        assert [r.id for r in page.items] == [red.id, green.id]
        assert page.label() == "the 2 adapters closest to the picture"
        assert page.why[red.id].startswith("a preview picture like yours (similarity ")
        only_green = C.find_by_picture(services, str(picture(tmp_path / "q2.png", GREEN)), C.CatalogQuery())
        assert only_green.items[0].id == green.id
        assert C.find_by_picture(services, str(query), C.CatalogQuery(base_family="sdxl")).items == []
        with pytest.raises(ValueError, match="listed by name, never searched"):
            C.find_by_picture(services, str(query), C.CatalogQuery(kind="gate"))
        with pytest.raises(ValueError, match="choose a picture"):
            C.find_by_picture(services, None, C.CatalogQuery())
        broken = tmp_path / "broken.png"
        broken.write_bytes(query.read_bytes()[:40])
        with pytest.raises(ValueError, match=str(broken)):
            C.find_by_picture(services, str(broken), C.CatalogQuery())
    finally:
        services.close()


def test_a_text_only_catalog_says_how_to_search_by_picture(
    tmp_path: Path, studio_model: str, lora_files: dict[str, Path]
) -> None:
    services, _ = make_services(tmp_path / "data", studio_model, lora_files)  # the hashing embedder
    try:
        assert "reads text only" in C.picture_search_note(services)
        with pytest.raises(ValueError, match=r"reads text only: start the studio with --embedder open_clip"):
            C.find_by_picture(services, str(picture(tmp_path / "q.png", RED)), C.CatalogQuery())
    finally:
        services.close()


def clip_catalog(root: Path, lora_files: dict[str, Path]) -> list[str]:
    """A tiny open_clip model saved as a local folder and a catalog of a red and a green adapter (their
    preview pictures) made with it; returns the command-line options naming both."""
    from safetensors.torch import save_file

    clip = root / "clip"
    clip.mkdir()
    (clip / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG}))
    weights = tiny_open_clip(0).model.state_dict()
    save_file({k: v.contiguous() for k, v in weights.items()}, str(clip / "open_clip_model.safetensors"))
    loras = root / "Lora"
    loras.mkdir()
    for name, colour in (("Alpha Stars", RED), ("Beta Waves", GREEN)):
        shutil.copy(lora_files[name], loras / f"{name}.safetensors")
        picture(loras / f"{name}.preview.png", colour)
    opts = ["--data-dir", str(root / "data"), "--embedder", f"open_clip:local-dir:{clip}"]
    assert main(["import", str(loras), *opts]) == 0
    return opts


def test_search_image_on_the_command_line(
    tmp_path: Path, lora_files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    opts = clip_catalog(tmp_path, lora_files)
    query = picture(tmp_path / "query.png", (230, 10, 10))
    capsys.readouterr()
    assert main(["search", "--image", str(query), "-k", "2", "--json", *opts]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["query"] == str(query) and [h["name"] for h in out["hits"]] == ["Alpha Stars", "Beta Waves"]
    assert main(["search", "--image", str(query), "-k", "1", *opts]) == 0
    assert "(picture)" in capsys.readouterr().out
    assert main(["search", "a star", "--image", str(query), *opts]) == 2
    assert "one of them" in capsys.readouterr().err
    assert main(["search", "--image", str(tmp_path / "none.png"), *opts]) == 2
    assert "no such file" in capsys.readouterr().err
    hashing = ["--data-dir", str(tmp_path / "text"), "--embedder", "hashing"]
    assert main(["search", "--image", str(query), *hashing]) == 2
    assert "reads text only" in capsys.readouterr().err


@pytest.mark.browser
@pytest.mark.slow
def test_search_by_picture_in_the_browser(
    tmp_path: Path, studio_model: str, lora_files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Upload a picture in the Catalog tab: cards of the adapters like it, closest first, each saying why;
    Add to mix from such a card puts the adapter in the mix and the card says so."""
    import subprocess
    import sys

    from tests.ui.test_browser import CHROMIUM, FLAGS, ROOT, TIMEOUT_MS, free_port, wait_http

    if not Path(CHROMIUM).is_file():
        if os.environ.get("STUDIO_CHROMIUM"):
            pytest.fail(f"STUDIO_CHROMIUM={CHROMIUM} does not exist")
        pytest.skip(f"no Chromium at {CHROMIUM}")
    opts = clip_catalog(tmp_path, lora_files)
    query = picture(tmp_path / "query.png", (230, 10, 10))
    port, log = free_port(), tmp_path / "app.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("GRADIO_TEMP_DIR", None)
    cmd = [sys.executable, str(ROOT / "app.py"), "--model", studio_model, *opts, "--port", str(port)]
    with open(log, "w") as out:
        proc = subprocess.Popen([*cmd, "--device", "cpu", "--threads", "1"], cwd=ROOT, env=env, stdout=out)
    try:
        wait_http(f"http://127.0.0.1:{port}/", proc, log)
        from playwright.sync_api import sync_playwright

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
            page = browser.new_page(viewport={"width": 1360, "height": 1400})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(f"http://127.0.0.1:{port}/")
            page.get_by_role("tab", name="Catalog").click()
            page.locator("#catalog-picture-search").get_by_text("Search by picture").click()
            page.locator("#catalog-picture-label").get_by_text("Upload or paste a picture").wait_for()
            page.locator("#catalog-picture input[type=file]").set_input_files(str(query))
            # the studio also seeds its bundled catalog on first launch: those adapters are listed too
            page.locator("#catalog-picture-label").get_by_text("adapters closest to the picture").wait_for()
            cards = page.locator("#catalog-picture-cards")
            text = cards.inner_text()
            assert text.index("Alpha Stars") < text.index("Beta Waves")
            alpha = cards.locator(".as-card", has_text="Alpha Stars")
            assert "a preview picture like yours (similarity" in alpha.inner_text()
            alpha.get_by_role("button", name="+ Add to mix").click()
            alpha.get_by_text("in the mix").wait_for()
            page.get_by_role("tab", name="Create").click()
            page.locator("#mix-slot-0").get_by_text("Alpha Stars").wait_for()
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
