"""End to end in a real browser: ``python app.py`` on the pocket model (the tiny test pipeline until the
pocket weights exist), driven through Debian's Chromium with Playwright (never a downloaded browser).

Journeys: search → add two adapters → generate → image and heatmap; catalog filter → detail; upload
five pictures → train a few steps → the new adapter in the catalog; the history. A screenshot of each
tab goes to the test's output folder, and to docs/screenshots/ with STUDIO_UPDATE_SCREENSHOTS=1.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import Page

from tests.ui.conftest import make_services
from tests.ui.fixtures import training_pictures

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("STUDIO_CHROMIUM", "/usr/bin/chromium")
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
TIMEOUT_MS = 60_000


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    """Wait until the studio answers (or fail with its log if it died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"app.py exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the studio did not answer within {timeout:.0f} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def studio_url(
    tmp_path_factory: pytest.TempPathFactory, studio_model: str, lora_files: dict[str, Path]
) -> Iterator[str]:
    """``app.py`` serving a data folder with the fixture catalog, on a free loopback port."""
    data = tmp_path_factory.mktemp("browser-data") / "data"
    services, _ = make_services(data, studio_model, lora_files)
    services.close()
    port = free_port()
    log = data.parent / "app.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env.pop("GRADIO_TEMP_DIR", None)
    cmd = [
        sys.executable,
        str(ROOT / "app.py"),
        "--model",
        studio_model,
        "--data-dir",
        str(data),
        "--port",
        str(port),
        "--embedder",
        "hashing-128",
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        "--threads",
        "1",
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_http(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def page(studio_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Page]:
    """A Chromium page on the studio."""
    if not Path(CHROMIUM).is_file():
        if os.environ.get("STUDIO_CHROMIUM"):  # CI names the browser: its absence is a failure there
            pytest.fail(f"STUDIO_CHROMIUM={CHROMIUM} does not exist")
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        profile = tmp_path_factory.mktemp("chromium-profile")
        context = pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            args=FLAGS,
            headless=True,
            viewport={"width": 1360, "height": 1000},
            device_scale_factor=1,
        )
        pg = context.new_page()
        pg.set_default_timeout(TIMEOUT_MS)
        pg.goto(studio_url)
        pg.wait_for_selector("#prompt textarea")
        yield pg
        context.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the screenshots go."""
    return tmp_path_factory.mktemp("screenshots")


def screenshot(page: Page, shots: Path, name: str) -> Path:
    """Save a full-page screenshot (palette PNG, small) and, on request, copy it to docs/screenshots/."""
    path = shots / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
        small.save(path, optimize=True)
    if os.environ.get("STUDIO_UPDATE_SCREENSHOTS") == "1":
        target = ROOT / "docs" / "screenshots"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / path.name)
    return path


def open_tab(page: Page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def set_number(page: Page, elem_id: str, value: float) -> None:
    """Type a value into a Gradio slider's or number's input box."""
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Enter")


def test_create_search_mix_generate(page: Page, shots: Path) -> None:
    page.locator("#prompt textarea").fill("a zq star on grass")
    cards = page.locator("#hit-cards")
    cards.get_by_text("Alpha Stars").wait_for()
    assert "Delta Secret" not in cards.inner_text()  # NSFW is not offered
    cards.locator(".as-card", has_text="Alpha Stars").get_by_role("button", name="+ Add to mix").click()
    page.locator("#mix-slot-0").get_by_text("Alpha Stars").wait_for()
    cards.locator(".as-card", has_text="Beta Waves").get_by_role("button", name="+ Add to mix").click()
    page.locator("#mix-slot-1").get_by_text("Beta Waves").wait_for()
    cards.locator(".as-card", has_text="Alpha Stars").get_by_text("in the mix").wait_for()
    for elem_id, value in (("steps", 3), ("width", 32), ("height", 32), ("seed", 7)):
        set_number(page, elem_id, value)
    page.locator("#generate").click()
    page.locator("#gallery img").first.wait_for()
    page.locator("#heatmap img").first.wait_for()
    report = page.locator("#report").inner_text()
    assert "gates (3," in report and ", 2)" in report  # 3 steps × layers × 2 adapters
    screenshot(page, shots, "create")


def test_cancel_says_when_nothing_runs(page: Page) -> None:
    page.locator("#cancel").click()  # a toast only reaches the page from a queued event
    page.locator(".toast-body", has_text="Nothing is running in this session.").wait_for(timeout=15_000)


def test_catalog_filter_and_detail(page: Page, shots: Path) -> None:
    open_tab(page, "Catalog")
    cards = page.locator("#catalog-cards")
    cards.get_by_text("Gamma Counter").wait_for()
    assert "Delta Secret" not in cards.inner_text()
    tags = page.locator("#catalog-tags textarea, #catalog-tags input").first
    tags.fill("waves")
    tags.press("Enter")
    page.wait_for_function(
        "() => !document.querySelector('#catalog-cards').innerText.includes('Gamma Counter')"
    )
    assert "Beta Waves" in cards.inner_text() and "Alpha Stars" not in cards.inner_text()
    cards.locator(".as-card", has_text="Beta Waves").get_by_role("button", name="Details").click()
    detail = page.locator("#catalog-detail")
    detail.get_by_text("Files and hashes").wait_for()
    assert "vx wave" in detail.inner_text() and "beta_waves.safetensors" in detail.inner_text()
    screenshot(page, shots, "catalog")
    tags.fill("")
    tags.press("Enter")
    cards.get_by_text("Gamma Counter").wait_for()
    kind = page.locator("#catalog-kind input").first
    kind.click()
    page.get_by_role("option", name="LoCon", exact=True).click()  # the type filter: no LoCon here
    page.wait_for_function(
        "() => !document.querySelector('#catalog-cards').innerText.includes('Gamma Counter')"
    )
    kind.click()
    page.get_by_role("option", name="any", exact=True).click()
    cards.get_by_text("Gamma Counter").wait_for()


def test_train_five_pictures_into_the_catalog(page: Page, shots: Path, tmp_path: Path) -> None:
    open_tab(page, "Train")
    pictures = training_pictures(tmp_path / "pics", n=5)
    page.locator("#train-files input[type=file]").set_input_files([str(p) for p in pictures])
    page.locator("#train-captions").get_by_text("pic_4.png").wait_for()
    page.locator("#train-trigger textarea, #train-trigger input").first.fill("qx")
    page.locator("#train-name textarea, #train-name input").first.fill("my circle")
    page.locator("#train-advanced").get_by_text("Advanced").click()
    set_number(page, "train-steps", 4)
    set_number(page, "train-rank", 4)
    set_number(page, "train-resolution", 32)
    page.locator("#train-prior").get_by_text("off", exact=True).click()  # no class images: a fast test
    options = page.locator("#train-options textarea").first
    options.fill('{"sample_steps": 2, "sample_seeds": [1], "sample_every": 2}')
    page.locator("#train-start").click()
    page.locator("#train-send").wait_for(timeout=240_000)  # shown once the job is done and catalogued
    assert "done" in page.locator("#train-progress").inner_text()
    page.locator("#train-samples img").first.wait_for()
    page.locator("#train-loss img").first.wait_for()
    screenshot(page, shots, "train")
    open_tab(page, "Catalog")
    query = page.locator("#catalog-query textarea, #catalog-query input").first
    query.fill("my circle")
    query.press("Enter")
    page.locator("#catalog-cards").get_by_text("my circle").wait_for()


def test_train_jobs_are_listed_after_a_reload(page: Page) -> None:
    page.reload()  # a new browser session: the job is still listed, and can be opened from the table
    page.wait_for_selector("#prompt textarea")
    open_tab(page, "Train")
    cell = page.locator("#train-jobs").get_by_text("my circle").filter(visible=True).first
    cell.wait_for()
    cell.click()
    page.locator("#train-progress").get_by_text("my circle: done").wait_for()
    job = page.locator("#train-job textarea, #train-job input").first.input_value()
    assert len(job) == 32  # the full id, from the 8 characters the table shows
    page.locator("#train-send").wait_for()


def test_history_lists_the_generation(page: Page, shots: Path) -> None:
    open_tab(page, "History")
    cards = page.locator("#history-cards")
    cards.locator(".as-card img").first.wait_for()
    cards.locator(".as-card", has_text="a zq star on grass").first.get_by_role("button", name="Open").click()
    page.locator("#history-entry").get_by_text("generate").wait_for()
    assert "Alpha Stars" in page.locator("#history-recipe").inner_text()
    screenshot(page, shots, "history")
