"""Found by using the studio in a browser as an A1111/Civitai user would: catalog text shown as typed in
Markdown (never as HTML or Markdown), strengths as the prompt tag gave them, cancel toasts that say what
happened, and events that refresh what they change (catalog cards, the policy widgets of a recipe sent
from the History tab). The event tests call the app's own event functions, without a browser."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr
import pytest

from adapters_db import ImportResult, ImportSummary
from studio.handlers import catalog as C
from studio.handlers import create, generate
from studio.handlers import html as H
from studio.handlers import train as T
from studio.handlers.state import MixItem, SessionState
from studio.ui import build_app
from studio.ui.create_tab import mix_panel

HOSTILE = "**Bold** <img src=https://tracker.example/x.png> _it_"
SIZE = dict(width=32, height=32, steps=1)


def test_import_report_shows_file_names_and_messages_as_text():
    upload = "/srv/data/tmp/gradio/0123abcd/evil.safetensors"
    summary = ImportSummary(
        (
            ImportResult(source="a.safetensors", status="imported", adapter_id=1, name=HOSTILE),
            ImportResult(source=upload, status="failed", message=f"{upload}: not a <b>safetensors</b> file"),
        )
    )
    text = C.summary_text(summary, short_paths=True)
    assert "<img" not in text and "<b>" not in text and "**Bold**" not in text and " _it_" not in text
    assert "&lt;img src=https://tracker.example/x.png&gt;" in text and "\\*\\*Bold\\*\\*" in text
    assert "/srv/data/tmp/gradio" not in text and "evil.safetensors: not a" in text
    assert "/srv/data/tmp/gradio" in C.summary_text(summary)  # a folder import keeps the paths


def test_mix_panel_titles_and_warnings_show_catalog_text_as_typed(studio):
    services, _ = studio
    item = MixItem(name=HOSTILE, sha256="0" * 64, family="pocket", trigger_words=("`x` <b>y</b>",))
    out = mix_panel(SimpleNamespace(services=services), SessionState(mix=(item,)))  # type: ignore[arg-type]
    title = out[1]
    assert title.startswith("**1. ") and "<img" not in title and "<b>y</b>" not in title
    assert "&lt;img" in title and "<code>`x` &lt;b&gt;y&lt;/b&gt;</code>" in title
    assert "<img" not in create.warnings_markdown([f"{HOSTILE!r} is made for SDXL"])


def test_delete_question_and_ab_report_show_names_as_text(studio):
    services, ids = studio
    record = C.get_record(services, ids["Alpha Stars"])
    question = C.delete_question(replace(record, name=HOSTILE))
    assert "<img" not in question and question.startswith("Delete **\\*\\*Bold")
    res = generate.CompareResult(grid=None, cells=[("x.png", f"without {HOSTILE}")], info="seed 1")  # type: ignore[arg-type]
    assert "<img" not in res.markdown() and "without \\*\\*Bold" in res.markdown()


def test_captions_and_history_cards_show_the_strength_a_prompt_tag_gave(studio):
    services, _ = studio
    state, _ = create.add_adapter(services, SessionState(), "Beta Waves")
    state = create.update_adapter(state, 0, weight=1.0, te=0.5, unet=0.8)
    req = generate.GenerateRequest("a zq star <lora:Alpha Stars:0.8>", seed=2, **SIZE)
    res = generate.generate(services, state, req)
    caption = res.images[0][1]
    assert "Alpha Stars 0.8" in caption and "Beta Waves te 0.5/unet 0.8" in caption, caption
    entry = services.history.get(res.entries[0])
    assert "Alpha Stars 0.8" in H.history_cards([entry])


def test_cancelling_a_job_says_what_happens(fresh_studio, tmp_path):
    from tests.ui.fixtures import training_pictures

    services, _ = fresh_studio
    pictures = [str(p) for p in training_pictures(tmp_path / "pics", n=2)]
    request = T.TrainRequest(files=tuple(pictures), trigger="qx")
    _, job = T.start_training(services, SessionState(), request)
    assert services.jobs.status(job).status == "queued"  # no job runner in this fixture
    assert T.cancel_notice(services, job) == "Job 'qx' cancelled; Resume queues it again."
    assert T.cancel_notice(services, job[:8]) == "Job 'qx' is cancelled: nothing to cancel."
    services.jobs._update(job, status="running")  # as if a worker had started it
    services.jobs._cancel[job] = threading.Event()
    assert T.cancel_notice(services, job).startswith("Stopping job 'qx': it stops at its next step")


# ----------------------------------------------------------------------------------- app events
def event(demo: gr.Blocks, api_name: str) -> Any:
    return next(f for f in demo.fns.values() if f.api_name == api_name)


def call(
    demo: gr.Blocks, api_name: str, values: dict[Any, Any], *extra: Any
) -> tuple[dict[int, Any], Callable[[Any], Any]]:
    """Run an event's function with the components' initial values (``values`` overrides some, by
    component); returns its outputs by component id and a getter."""
    fn = event(demo, api_name)
    args = [values[b] if b in values else getattr(b, "value", None) for b in fn.inputs]
    result = fn.fn(*args, *extra)
    result = result if isinstance(result, tuple | list) else (result,)
    out = {b._id: v for b, v in zip(fn.outputs, result, strict=True)}
    return out, lambda component: out.get(component._id)


def component(demo: gr.Blocks, elem_id: str) -> Any:
    return next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id)


@pytest.fixture()
def app(fresh_studio: Any) -> Any:
    services, ids = fresh_studio
    return build_app(services), services, ids


def test_catalog_cards_follow_an_add_and_a_save(app):
    demo, _, ids = app
    cards = component(demo, "catalog-cards")
    state_block = event(demo, "catalog_card").inputs[0]
    evt = gr.EventData(None, {"action": "add", "id": str(ids["Gamma Counter"])})
    _, got = call(demo, "catalog_card", {state_block: SessionState()}, evt)
    card = got(cards).split(f'data-adapter-id="{ids["Gamma Counter"]}"')[1].split("as-card")[0]
    assert "in the mix" in card  # the card says so at once, as on the Create tab
    state = got(state_block)

    evt = gr.EventData(None, {"action": "detail", "id": str(ids["Beta Waves"])})
    _, got = call(demo, "catalog_card", {state_block: state}, evt)
    state = got(state_block)
    name = next(b for b in event(demo, "catalog_save").inputs if getattr(b, "label", "") == "name")
    _, got = call(demo, "catalog_save", {event(demo, "catalog_save").inputs[0]: state, name: "Beta Ripples"})
    assert "Beta Ripples" in got(cards) and "Beta Waves" not in got(cards)


def test_sending_a_recipe_to_create_shows_its_policy_widgets(app):
    demo, services, _ = app
    state, _ = create.add_adapter(services, SessionState(), "Alpha Stars")
    req = generate.GenerateRequest("a zq star", fusion="klora", fusion_params={"k": 16}, seed=3, **SIZE)
    entry = generate.generate(services, state, req).entries[0]
    fn = event(demo, "history_send")
    out, _ = call(demo, "history_send", {fn.inputs[0]: SessionState(), fn.inputs[1]: entry}, None)
    by_label = {getattr(b, "label", None): out[b._id] for b in fn.outputs}
    assert any(str(v).startswith("K-LoRA") for v in out.values())  # the help of the policy sent
    assert by_label["k (top-k entries)"]["visible"] is True and by_label["k (top-k entries)"]["value"] == 16
    assert by_label["orthogonal mode"]["visible"] is False


def test_upload_report_names_uploads_by_file_name(fresh_studio, tmp_path: Path):
    services, _ = fresh_studio
    bad = tmp_path / "upload-dir" / "broken.safetensors"
    bad.parent.mkdir()
    bad.write_bytes(b"\x00" * 64)
    text = C.summary_text(C.import_uploads(services, [str(bad)]), short_paths=True)
    assert "failed: broken.safetensors" in text and str(bad.parent) not in text


def test_cancelling_a_batch_count_keeps_the_runs_already_done(studio):
    services, _ = studio
    state, _ = create.add_adapter(services, SessionState(), "Alpha Stars")
    cancel = threading.Event()

    def on_step(done: int, total: int) -> None:
        if done > 1:  # the second run has begun (each run is one step)
            cancel.set()

    req = generate.GenerateRequest("a zq star", seed=4, batch_count=3, **SIZE)
    res = generate.generate(services, state, req, cancel=cancel, on_step=on_step)
    assert len(res.images) == 1 and len(res.entries) == 1 and res.state.images == (res.images[0][0],)
    assert "seed 4 " in res.images[0][1] and '"seed": 4' in res.recipe_json
    assert any("cancelled after 1 of 3 runs" in n for n in res.notes)
    with pytest.raises(generate.GenerationCancelled):  # nothing done yet: nothing to show
        cancel.set()
        generate.generate(services, state, req, cancel=cancel)


def test_delete_confirmation_deletes_the_adapter_it_names(app):
    demo, services, ids = app
    state_block = event(demo, "catalog_card").inputs[0]
    confirm = component(demo, "catalog-confirm-delete")
    state = SessionState(detail_id=ids["Alpha Stars"])
    asked, _ = call(demo, "catalog_delete_ask", {state_block: state})
    assert "Alpha Stars" in " ".join(str(v) for v in asked.values())
    # the person opens another adapter's details before answering: the question goes away…
    evt = gr.EventData(None, {"action": "detail", "id": str(ids["Beta Waves"])})
    _, got = call(demo, "catalog_card", {state_block: state}, evt)
    row = got(confirm.parent)
    assert row is not None and row.visible is False
    # …and a stale "Yes, delete it" still deletes only the adapter the question named
    fn = event(demo, "catalog_delete")
    answers = {b: v for b in fn.inputs for k, v in asked.items() if b._id == k}
    call(demo, "catalog_delete", {**answers, fn.inputs[0]: got(state_block)})
    left = [r.name for r in C.browse(services, C.CatalogQuery()).items]
    assert "Beta Waves" in left and "Alpha Stars" not in left
