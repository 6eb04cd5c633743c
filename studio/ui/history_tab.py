"""The History tab: every generation with its recipe, searchable; replay; send to Create; download."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import gradio as gr

from pipelines.engine import GenerationCancelled
from studio.handlers import history as Hh
from studio.handlers import html as H
from studio.handlers.state import SessionState
from studio.ui.assets import CARD_JS
from studio.ui.common import Ui, info, owner, session_key, user_errors, warn


def build(ui: Ui, tab: gr.Tab) -> None:
    """Lay out the History tab and wire its events."""
    services, state = ui.services, ui.state
    with gr.Row():
        query = gr.Textbox("", label="Search prompts, adapters, policies", scale=4, elem_id="history-query")
        search_btn = gr.Button("Search", scale=1, elem_id="history-search")
    with gr.Row():
        prev_btn = gr.Button("◀ newer", size="sm")
        page_label = gr.Markdown("page 1", elem_id="history-page-label", label="page label")
        page = gr.Number(1, precision=0, minimum=1, label="page", scale=0, min_width=90)
        next_btn = gr.Button("older ▶", size="sm")
    cards = gr.HTML(
        H.message("No generations yet."), elem_id="history-cards", js_on_load=CARD_JS, label="generations"
    )
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            entry_md = gr.Markdown("Open a generation.", elem_id="history-entry", label="entry")
            with gr.Row():
                replay_btn = gr.Button("Replay", elem_id="history-replay")
                send_btn = gr.Button("Send to Create", variant="primary", elem_id="history-send")
            files = gr.File(
                label="Images with their parameters embedded (download)",
                interactive=False,
                file_count="multiple",
                elem_id="history-files",
            )
            heatmap = gr.Image(label="gates applied", show_label=False, interactive=False, format="png")
        with gr.Column(scale=1):
            recipe = gr.Code(language="json", label="recipe", elem_id="history-recipe")
            replayed = gr.Gallery(label="replay", columns=2, height=220)
            replay_info = gr.Markdown(label="replay report")
    entry_id = gr.Textbox("", visible=False, label="entry id")
    entries_json = gr.JSON(visible=False, label="entries")

    def listing(request: gr.Request, text: str, page: int) -> tuple[Any, ...]:
        entries, total = Hh.history_page(services, owner(request), text, page)
        pages = max(1, -(-total // Hh.PAGE_SIZE))
        label = f"page {page} of {pages} ({total} generation{'s' if total != 1 else ''})"
        empty = "No generations match." if text else "No generations yet: make some on the Create tab."
        return H.history_cards(entries, empty), label, page, Hh.entry_data(entries)

    list_outputs = [cards, page_label, page, entries_json]

    def on_history(query: str, page: float, request: gr.Request) -> tuple[Any, ...]:
        with user_errors("History"):
            return listing(request, query or "", max(1, int(page or 1)))

    page.submit(on_history, [query, page], list_outputs, api_name="history")

    def on_search(query: str, request: gr.Request) -> tuple[Any, ...]:
        return on_history(query, 1, request)

    gr.on(
        [search_btn.click, query.submit, tab.select],
        on_search,
        query,
        list_outputs,
        api_name="history_search",
    )

    def on_newer(query: str, page: float, request: gr.Request) -> tuple[Any, ...]:
        return on_history(query, max(1, int(page or 1) - 1), request)

    def on_older(query: str, page: float, request: gr.Request) -> tuple[Any, ...]:
        return on_history(query, int(page or 1) + 1, request)

    prev_btn.click(on_newer, [query, page], list_outputs, api_name="history_newer")
    next_btn.click(on_older, [query, page], list_outputs, api_name="history_older")

    # ---- one entry
    def show_entry(state: SessionState, request: gr.Request, ref: str) -> tuple[Any, ...]:
        view = Hh.open_entry(services, owner(request), ref)
        heat = str(view.entry.heatmap) if view.entry.heatmap and view.entry.heatmap.is_file() else None
        new = replace(state, history_selected=view.entry.id)
        return new, view.info, view.recipe_json, view.files, heat, view.entry.id

    entry_outputs = [state, entry_md, recipe, files, heatmap, entry_id]

    def on_entry(state: SessionState, entry: str, request: gr.Request) -> tuple[Any, ...]:
        with user_errors("History"):
            return show_entry(state, request, entry)

    entry_id.submit(on_entry, [state, entry_id], entry_outputs, api_name="history_entry")

    def send(state: SessionState, request: gr.Request, entry: str) -> tuple[Any, ...]:
        new, req, notes = Hh.send_to_create(services, state, owner(request), entry)
        warn(notes)
        values = [
            req.prompt,
            req.negative_prompt,
            req.fusion,
            json.dumps(req.fusion_params),
            req.seed,
            req.steps,
            req.guidance,
            req.width or gr.skip(),
            req.height or gr.skip(),
            req.sampler or "model default",
            req.batch_size,
            1,
            req.clip_skip or 1,
        ]
        policy = ui["policy_view"](req.fusion, req.fusion_params)  # its help and parameter widgets
        return (new, *values, gr.Tabs(selected="create"), *policy)

    send_outputs = [state, *ui["form"], ui.tabs, *ui["policy_view_outputs"]]

    def on_send(state: SessionState, entry: str, request: gr.Request) -> tuple[Any, ...]:
        with user_errors("Send to Create"):
            if not entry:
                raise ValueError("open a generation first")
            return send(state, request, entry)

    send_btn.click(on_send, [state, entry_id], send_outputs, api_name="history_send")

    def on_card(state: SessionState, evt: gr.EventData, request: gr.Request) -> tuple[Any, ...]:
        data = getattr(evt, "_data", None) or {}
        action, ref = data.get("action"), str(data.get("id") or "")
        n_entry, n_send = len(entry_outputs), len(send_outputs)
        with user_errors("History"):
            if action == "open":
                return (*show_entry(state, request, ref), *(gr.skip(),) * (n_send - 1))
            if action == "send":
                sent = send(state, request, ref)
                return (sent[0], *(gr.skip(),) * (n_entry - 1), *sent[1:])
        return (gr.skip(),) * (n_entry + n_send - 1)

    cards.click(on_card, state, [*entry_outputs, *send_outputs[1:]], api_name="history_card")

    def on_replay(
        state: SessionState, entry: str, query: str, request: gr.Request, progress=gr.Progress()
    ) -> tuple[Any, ...]:
        key = session_key(request)
        with user_errors("Replay"):
            if not entry:
                raise ValueError("open a generation first")
            cancel = services.cancels.begin(key)
            try:
                result, _same = Hh.replay(
                    services,
                    state,
                    owner(request),
                    entry,
                    cancel=cancel,
                    on_step=lambda i, n: progress((i, n), desc="replay", unit="steps"),
                )
            except GenerationCancelled:
                gr.Warning("Replay cancelled.")
                return (gr.skip(),) * (3 + len(list_outputs))
            finally:
                services.cancels.end(key)
            # the replay is a new entry: list the first page again (newest first), so it shows at the top
            listed = listing(request, query or "", 1)
        info(result.notes)
        return (result.state, result.images, "\n\n".join([result.info, *result.notes]), *listed)

    # the query is the last input, so API callers that pass only the entry keep working
    replay_btn.click(
        on_replay,
        [state, entry_id, query],
        [state, replayed, replay_info, *list_outputs],
        api_name="replay",
        concurrency_id="pipeline",
        concurrency_limit=1,
    )
