"""Follow-ups of the UI review: a cancelled A/B grid keeps the cells already rendered; the History list
shows a replay at once; a rename in the catalog renames the adapter in the session's mix; the mix summary
shows from the start (and after Send to Create); the Train tab's jobs table fits its column. The event tests
call the app's own event functions, without a browser (as tests/ui/test_ui_review.py does)."""

from __future__ import annotations

import re
import threading
from dataclasses import replace
from typing import Any

import gradio as gr
import pytest
from gradio.utils import deep_hash

from studio.handlers import catalog as C
from studio.handlers import create, generate
from studio.handlers import train as T
from studio.handlers.state import MAX_MIX, SessionState
from studio.ui import build_app
from studio.ui.create_tab import mix_panel
from tests.ui.test_ui_review import call, component, event

SIZE = dict(width=32, height=32, steps=1)


@pytest.fixture()
def app(fresh_studio: Any) -> Any:
    services, ids = fresh_studio
    return build_app(services), services, ids


def labelled(blocks: Any, label: str) -> Any:
    """The component of ``blocks`` (an event's inputs or outputs, or the app's blocks) with this label."""
    return next(b for b in blocks if getattr(b, "label", None) == label)


# ------------------------------------------------------------------------------------ 1. A/B cancel
def test_cancelling_the_ab_grid_keeps_the_cells_already_rendered(studio):
    services, _ = studio
    state, _ = create.add_adapter(services, SessionState(), "Alpha Stars")
    state, _ = create.add_adapter(services, state, "Beta Waves")
    cancel = threading.Event()

    def on_step(done: int, total: int) -> None:
        if done > 2:  # the third cell has begun (each cell is one step)
            cancel.set()

    req = generate.GenerateRequest("a zq star", seed=5, **SIZE)
    # four cells: linear (current), orthogonal, without Alpha Stars, without Beta Waves
    res = generate.ab_compare(services, state, req, ["orthogonal"], True, cancel=cancel, on_step=on_step)
    assert [label for _, label in res.cells] == ["linear (current)", "orthogonal"]
    assert res.grid.width > res.grid.height  # two cells side by side
    assert any("cancelled after 2 of 4 cells" in n for n in res.notes), res.notes
    assert "2 of 4 variants" in res.markdown()
    with pytest.raises(generate.GenerationCancelled):  # nothing rendered yet: nothing to show
        cancel.set()
        generate.ab_compare(services, state, req, ["orthogonal"], True, cancel=cancel)


# ------------------------------------------------------------------------------ 2. replay → listing
def test_replay_lists_the_new_entry_at_the_top(app):
    demo, services, _ = app
    state, _ = create.add_adapter(services, SessionState(), "Alpha Stars")
    old = generate.generate(services, state, generate.GenerateRequest("a zq star", seed=6, **SIZE)).entries[0]
    fn = event(demo, "replay")
    state_block, entries_json = fn.inputs[0], labelled(demo.blocks.values(), "entries")
    _, got = call(demo, "replay", {state_block: SessionState(), fn.inputs[1]: old}, None)
    new = got(state_block).history_id
    assert new and new != old
    listed = got(entries_json)
    assert listed is not None, "the replay does not refresh the History list"
    assert [e["id"] for e in listed] == [new, old]
    cards = got(component(demo, "history-cards"))
    assert cards.index(f'data-entry-id="{new}"') < cards.index(f'data-entry-id="{old}"')


# ------------------------------------------------------------------------------ 3. rename → the mix
def test_saving_a_rename_renames_the_adapter_in_the_mix(app):
    demo, services, ids = app
    state, _ = create.add_adapter(services, SessionState(), "Alpha Stars")
    state, _ = create.add_adapter(services, state, "Beta Waves")
    state = create.update_adapter(state, 0, weight=0.7, te=0.5, unet=0.9, blocks="MIDD", schedule="0@0,1@1")
    before = state.mix[0]
    record = C.get_record(services, ids["Alpha Stars"])
    fn = event(demo, "catalog_save")
    form = {
        fn.inputs[0]: replace(state, detail_id=record.id),
        labelled(fn.inputs, "name"): "Alpha Comets",
        labelled(fn.inputs, "tags (comma-separated)"): ", ".join(record.tags),
        labelled(fn.inputs, "trigger words (comma-separated)"): "zq comet, zq tail",
        labelled(fn.inputs, "base family"): record.base_family or "",
        labelled(fn.inputs, "NSFW level (0 none … 3 explicit)"): record.nsfw_level,
        labelled(fn.inputs, "description (HTML; sanitised when saved)"): record.description_html or "",
    }
    _, got = call(demo, "catalog_save", form)
    new = got(fn.inputs[0])
    assert new is not None, "the save does not update the session's mix"
    assert new.mix[0] == replace(before, name="Alpha Comets", trigger_words=("zq comet", "zq tail"))
    assert new.mix[1] == state.mix[1]
    assert new.detail_id == record.id
    recipe, _ = generate.build_recipe(services, new, generate.GenerateRequest("a zq comet", **SIZE))
    assert [a.name for a in recipe.adapters] == ["Alpha Comets", "Beta Waves"]
    assert recipe.adapters[0].weight == 0.7 and recipe.adapters[0].te == 0.5
    title = mix_panel(type("U", (), {"services": services})(), new)[1]  # type: ignore[arg-type]
    assert "Alpha Comets" in title and "zq comet" in title


def test_a_rename_leaves_a_mix_without_that_adapter_alone(fresh_studio):
    services, ids = fresh_studio
    state, _ = create.add_adapter(services, SessionState(), "Beta Waves")
    record = C.get_record(services, ids["Alpha Stars"])
    assert C.follow_edit(state, replace(record, name="Alpha Comets")) is state


# ------------------------------------------------------------------------------ 4. the mix summary
def summary_after(demo: gr.Blocks, before: SessionState, after: SessionState) -> str:
    """What the mix summary shows after an event turned state ``before`` into ``after``: Gradio runs the
    state's change events only when its value changed; else the summary keeps what it showed."""
    summary = component(demo, "mix-summary")
    state_block = event(demo, "mix_panel").inputs[0]
    if deep_hash(before) == deep_hash(after):
        return str(summary.value or "")
    fn = next(
        f
        for f in demo.fns.values()
        if (state_block._id, "change") in f.targets and summary in f.outputs  # type: ignore[operator]
    )
    _, got = call(demo, fn.api_name, {state_block: after})
    return str(got(summary))


def test_the_mix_summary_shows_from_the_start_and_after_send_to_create(app):
    demo, services, _ = app
    assert "empty" in summary_after(demo, SessionState(), SessionState())  # on load
    plain = generate.generate(services, SessionState(), generate.GenerateRequest("a square", seed=7, **SIZE))
    state, _ = create.add_adapter(services, SessionState(), "Alpha Stars")
    mixed = generate.generate(services, state, generate.GenerateRequest("a zq star", seed=8, **SIZE))
    fn = event(demo, "history_send")
    for entry, shown in ((plain.entries[0], "empty"), (mixed.entries[0], f"1 of {MAX_MIX} adapters")):
        _, got = call(demo, "history_send", {fn.inputs[0]: SessionState(), fn.inputs[1]: entry}, None)
        assert shown in summary_after(demo, SessionState(), got(fn.inputs[0])), entry


# ----------------------------------------------------------------------------- 5. the jobs table
# Measured in Chromium (Gradio 6 Dataframe, monospace cells): about 8.4 px a character plus 16 px of
# padding; the Train tab's column is 600 px wide in a 1280 or 1360 px wide window.
CHAR_PX, PAD_PX, TABLE_PX = 8.4, 16, 600
LONGEST = {"job": "0123abcd", "status": "cancelled", "step": "1500/1500", "created": "12-31 23:59"}


def test_the_jobs_table_fits_the_train_column(fresh_studio, tmp_path):
    from tests.ui.fixtures import training_pictures

    services, _ = fresh_studio
    pictures = tuple(str(p) for p in training_pictures(tmp_path / "pics", n=2))
    state, _ = T.start_training(services, SessionState(), T.TrainRequest(files=pictures, trigger="qx"))
    (row,) = T.jobs_table(services, state)
    assert len(row) == len(T.JOB_COLUMNS) and row[5] == "yes"
    assert re.fullmatch(r"\d\d-\d\d \d\d:\d\d", row[4]), row[4]  # no year: the table needs the room
    widths = [float(w.rstrip("%")) for w in T.JOB_COLUMN_WIDTHS]
    assert len(widths) == len(T.JOB_COLUMNS) and sum(widths) == 100
    for column, share in zip(T.JOB_COLUMNS, widths, strict=True):
        text = max(LONGEST.get(column, ""), column, key=len)  # the name wraps; the others must not
        if column != "name":
            assert len(text) * CHAR_PX + PAD_PX <= share / 100 * TABLE_PX, column
    table = component(build_app(services), "train-jobs")
    assert table.column_widths == list(T.JOB_COLUMN_WIDTHS) and table.wrap is True
