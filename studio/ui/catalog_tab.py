"""The Catalog tab: hybrid search with filters, paginated cards, the detail view, curation, imports."""

from __future__ import annotations

from functools import partial
from typing import Any

import gradio as gr

import adapters_db
from adapters_db.repository import LICENCE_FLAGS, SORTS
from studio.handlers import catalog as C
from studio.handlers import create
from studio.handlers import html as H
from studio.handlers.state import SessionState
from studio.ui.assets import CARD_JS
from studio.ui.common import Ui, info, user_errors, warn

ANY = "any"


def _query(
    query: str,
    base_family: str,
    tags: str,
    include_nsfw: bool,
    licence: list[str],
    location: str,
    sort: str,
    kind: str,
    page: float,
) -> C.CatalogQuery:
    return C.CatalogQuery(
        text=query or "",
        base_family=None if base_family in (None, "", ANY) else base_family,
        tags=C.split_tags(tags),
        include_nsfw=bool(include_nsfw),
        licence=tuple(licence or ()),
        location=location or "all",
        sort=sort or "relevance",
        kind=C.KINDS.get(kind or ANY),
        page=max(1, int(page or 1)),
    )


def build(ui: Ui, tab: gr.Tab) -> None:
    """Lay out the Catalog tab and wire its events (``tab``: its gr.Tab, whose selection refreshes it)."""
    services, state = ui.services, ui.state
    with gr.Row():
        query = gr.Textbox(
            "",
            label="Search the catalog",
            placeholder="style, subject, trigger word, prompt…",
            scale=4,
            elem_id="catalog-query",
        )
        search_btn = gr.Button("Search", scale=1, elem_id="catalog-search")
    with gr.Row():
        family = gr.Dropdown(
            [ANY, *adapters_db.FAMILIES], value=ANY, label="base model", elem_id="catalog-family"
        )
        tags = gr.Textbox("", label="tags (comma-separated)", elem_id="catalog-tags")
        location = gr.Radio(list(C.LOCATIONS), value="all", label="files", elem_id="catalog-location")
        sort = gr.Dropdown(list(SORTS), value="relevance", label="sort", elem_id="catalog-sort")
        kind = gr.Dropdown(list(C.KINDS), value=ANY, label="type", elem_id="catalog-kind")
    with gr.Row():
        licence = gr.CheckboxGroup(
            list(LICENCE_FLAGS), value=[], label="licence allows", elem_id="catalog-licence"
        )
        nsfw = gr.Checkbox(False, label="show NSFW", elem_id="catalog-nsfw")
    with gr.Accordion("Search by picture", open=False, elem_id="catalog-picture-search"):
        with gr.Row():
            picture = gr.Image(
                type="filepath",
                sources=["upload", "clipboard"],
                label="a picture (its style or subject)",
                height=180,
                elem_id="catalog-picture",
            )
            picture_btn = gr.Button(
                "Find adapters like it", scale=0, min_width=160, elem_id="catalog-picture-find"
            )
        picture_label = gr.Markdown("", elem_id="catalog-picture-label", label="picture search note")
        picture_cards = gr.HTML(
            "", elem_id="catalog-picture-cards", js_on_load=CARD_JS, label="adapter cards like the picture"
        )
    with gr.Row():
        prev_btn = gr.Button("◀ previous", size="sm", elem_id="catalog-prev")
        page_label = gr.Markdown("page 1", elem_id="catalog-page-label", label="page label")
        page = gr.Number(
            1, precision=0, minimum=1, label="page", elem_id="catalog-page", scale=0, min_width=90
        )
        next_btn = gr.Button("next ▶", size="sm", elem_id="catalog-next")
    cards = gr.HTML(
        H.message("Loading the catalog…"), elem_id="catalog-cards", js_on_load=CARD_JS, label="adapter cards"
    )
    items = gr.JSON(visible=False, label="items")
    gr.Markdown("### Details")
    detail = gr.HTML(
        H.message("Choose an adapter's Details to see everything about it."),
        elem_id="catalog-detail",
        js_on_load=CARD_JS,
        label="details",
    )
    with gr.Accordion("Edit metadata", open=False, elem_id="catalog-edit"):
        edit_name = gr.Textbox(label="name")
        edit_tags = gr.Textbox(label="tags (comma-separated)")
        edit_triggers = gr.Textbox(label="trigger words (comma-separated)")
        edit_family = gr.Dropdown(["", *adapters_db.FAMILIES], value="", label="base family")
        edit_nsfw = gr.Slider(0, 3, 0, step=1, label="NSFW level (0 none … 3 explicit)")
        edit_description = gr.Textbox(label="description (HTML; sanitised when saved)", lines=4)
        with gr.Row():
            save_btn = gr.Button("Save changes", variant="primary", elem_id="catalog-save")
            delete_btn = gr.Button("Delete adapter…", variant="stop", elem_id="catalog-delete")
        with gr.Row(visible=False) as confirm_row:
            confirm_md = gr.Markdown()
            confirm_btn = gr.Button("Yes, delete it", variant="stop", elem_id="catalog-confirm-delete")
            keep_btn = gr.Button("Keep it")
    with gr.Accordion("Import adapters", open=False, elem_id="catalog-import"):
        upload = gr.File(file_count="multiple", file_types=[".safetensors"], label=".safetensors files")
        upload_btn = gr.Button("Import uploaded files", elem_id="import-upload")
        with gr.Row():
            folder = gr.Textbox(
                "", label="folder on the studio's machine (A1111/ComfyUI models/Lora)", scale=3
            )
            folder_btn = gr.Button("Import folder", scale=1)
        with gr.Row():
            url = gr.Textbox(
                "",
                label="Civitai model page, URL of a .safetensors file, or a Hugging Face repo (owner/name)",
                scale=3,
            )
            url_btn = gr.Button("Import from URL", scale=1)
        import_report = gr.Markdown(elem_id="import-report", label="import report")

    filters = [query, family, tags, nsfw, licence, location, sort, kind]
    edit_fields = [edit_name, edit_tags, edit_triggers, edit_family, edit_nsfw, edit_description]
    # opening an adapter hides a pending delete question: it named the adapter open before
    detail_outputs = [detail, *edit_fields, confirm_row, ui.tabs]
    pending_delete = gr.State(None)  # the id the delete question names (what "Yes, delete it" deletes)

    def detail_values(
        state: SessionState, record: adapters_db.AdapterRecord, switch: bool
    ) -> tuple[Any, ...]:
        in_mix = record.id in create.mix_ids(state)
        return (
            H.detail_view(record, in_mix=in_mix),
            record.name,
            ", ".join(record.tags),
            ", ".join(record.trigger_words),
            record.base_family or "",
            record.nsfw_level,
            record.description_html,
            gr.Row(visible=False),
            gr.Tabs(selected="catalog") if switch else gr.skip(),
        )

    def open_detail(state: SessionState, ref: Any) -> tuple[Any, ...]:
        new, record = C.open_detail(services, state, ref)
        return (new, *detail_values(new, record, True))

    def detail_skip() -> tuple[Any, ...]:
        return (gr.skip(),) * len(detail_outputs)

    ui.add(open_detail=open_detail, detail_skip=detail_skip, detail_outputs=detail_outputs)

    # ---- listing
    def show(q: C.CatalogQuery, state: SessionState) -> tuple[Any, ...]:
        result = C.browse(services, q)
        html = H.record_cards(result.items, create.mix_ids(state), result.why)
        return html, result.label(), C.page_data(result), result.page

    def on_catalog(
        state: SessionState,
        query: str,
        base_family: str,
        tags: str,
        include_nsfw: bool,
        licence: list[str],
        location: str,
        sort: str,
        kind: str,
        page: float,
    ) -> tuple[Any, ...]:
        with user_errors("Catalog"):
            q = _query(query, base_family, tags, include_nsfw, licence, location, sort, kind, page)
            return show(q, state)

    list_outputs = [cards, page_label, items, page]
    page.submit(on_catalog, [state, *filters, page], list_outputs, api_name="catalog")

    def on_filter(
        state: SessionState,
        query: str,
        base_family: str,
        tags: str,
        include_nsfw: bool,
        licence: list[str],
        location: str,
        sort: str,
        kind: str,
    ) -> tuple[Any, ...]:
        return on_catalog(state, query, base_family, tags, include_nsfw, licence, location, sort, kind, 1)

    gr.on(
        [
            search_btn.click,
            query.submit,
            family.input,
            tags.submit,
            nsfw.input,
            licence.input,
            location.input,
            sort.input,
            kind.input,
            tab.select,
        ],
        on_filter,
        [state, *filters],
        list_outputs,
        api_name="catalog_filter",
    )

    def on_step_page(
        delta: int,
        state: SessionState,
        query: str,
        base_family: str,
        tags: str,
        include_nsfw: bool,
        licence: list[str],
        location: str,
        sort: str,
        kind: str,
        page: float,
    ) -> tuple[Any, ...]:
        return on_catalog(
            state,
            query,
            base_family,
            tags,
            include_nsfw,
            licence,
            location,
            sort,
            kind,
            max(1, int(page or 1) + delta),
        )

    prev_btn.click(partial(on_step_page, -1), [state, *filters, page], list_outputs, api_name="catalog_prev")
    next_btn.click(partial(on_step_page, 1), [state, *filters, page], list_outputs, api_name="catalog_next")

    # ---- search by picture: its own cards (the filters apply; the text and the sort do not)
    picture_inputs = [picture, family, tags, nsfw, licence, location, kind]

    def picture_listing(
        state: SessionState,
        image: str | None,
        base_family: str,
        tags: str,
        include_nsfw: bool,
        licence: list[str],
        location: str,
        kind: str,
    ) -> tuple[str, str]:
        q = _query("", base_family, tags, include_nsfw, licence, location, "relevance", kind, 1)
        result = C.find_by_picture(services, image, q)
        return H.record_cards(result.items, create.mix_ids(state), result.why), result.label()

    def on_picture(state: SessionState, *values: Any) -> tuple[str, str]:
        with user_errors("Search by picture"):
            return picture_listing(state, *values)

    def on_picture_note() -> str:
        with user_errors("Search by picture"):  # when the tab opens: the embedder loads lazily
            return C.picture_search_note(services)

    tab.select(on_picture_note, None, picture_label, api_name="catalog_picture_note")
    gr.on(
        [picture_btn.click, picture.upload],
        on_picture,
        [state, *picture_inputs],
        [picture_cards, picture_label],
        api_name="catalog_picture",
    )

    def on_picture_card(evt: gr.EventData, state: SessionState, *values: Any) -> tuple[Any, ...]:
        """A card's Add to mix or Details (Gradio passes ``evt`` by its annotation, first)."""
        data = getattr(evt, "_data", None) or {}
        action, ref = data.get("action"), data.get("id")
        with user_errors("Catalog"):
            if action == "add":
                new, notes = create.add_adapter(services, state, ref)
                warn(notes)
                return (new, *detail_skip(), *picture_listing(new, *values))  # its card says "in the mix"
            if action == "detail":
                new, record = C.open_detail(services, state, ref)
                return (new, *detail_values(new, record, False), gr.skip(), gr.skip())
        return (gr.skip(), *detail_skip(), gr.skip(), gr.skip())

    picture_cards.click(
        on_picture_card,
        [state, *picture_inputs],
        [state, *detail_outputs, picture_cards, picture_label],
        api_name="catalog_picture_card",
    )

    # ---- cards and the detail view (adding or downloading an adapter changes its card: the page is
    # listed again, so the card says "in the mix" or "local" at once)
    view = [*filters, page]
    no_listing = (gr.skip(),) * len(list_outputs)

    def on_catalog_card(
        state: SessionState,
        query: str,
        base_family: str,
        tags: str,
        include_nsfw: bool,
        licence: list[str],
        location: str,
        sort: str,
        kind: str,
        page: float,
        evt: gr.EventData,
    ) -> tuple[Any, ...]:
        data = getattr(evt, "_data", None) or {}
        action, ref = data.get("action"), data.get("id")
        q = (query, base_family, tags, include_nsfw, licence, location, sort, kind, page)
        with user_errors("Catalog"):
            if action == "add":
                new, notes = create.add_adapter(services, state, ref)
                warn(notes)
                listing = show(_query(*q), new)
                if new.detail_id is not None and str(new.detail_id) == str(ref):
                    return (new, *detail_values(new, C.get_record(services, ref), False), *listing)
                return (new, *detail_skip(), *listing)
            if action == "detail":
                new, record = C.open_detail(services, state, ref)
                return (new, *detail_values(new, record, False), *no_listing)
        return (gr.skip(), *detail_skip(), *no_listing)

    cards.click(
        on_catalog_card,
        [state, *view],
        [state, *detail_outputs, *list_outputs],
        api_name="catalog_card",
    )

    def on_detail_click(
        state: SessionState,
        query: str,
        base_family: str,
        tags: str,
        include_nsfw: bool,
        licence: list[str],
        location: str,
        sort: str,
        kind: str,
        page: float,
        evt: gr.EventData,
    ) -> tuple[Any, ...]:
        data = getattr(evt, "_data", None) or {}
        q = (query, base_family, tags, include_nsfw, licence, location, sort, kind, page)
        with user_errors("Details"):
            if data.get("action") == "use_prompt" and state.detail_id is not None:
                record = C.get_record(services, state.detail_id)
                prompt, negative, _params = C.preview_prompt(record, data.get("id"))
                return gr.skip(), gr.skip(), prompt, negative, gr.Tabs(selected="create"), *no_listing
            if data.get("action") == "add":
                new, notes = create.add_adapter(services, state, data.get("id"))
                warn(notes)
                record = C.get_record(services, data.get("id"))
                listing = show(_query(*q), new)
                return new, H.detail_view(record, in_mix=True), gr.skip(), gr.skip(), gr.skip(), *listing
            if data.get("action") == "download":
                record, _ = C.download_adapter(services, data.get("id"))
                info([f"{record.name}: downloaded and verified; it can be added to the mix now"])
                in_mix = record.id in create.mix_ids(state)
                listing = show(_query(*q), state)
                detail_html = H.detail_view(record, in_mix=in_mix)
                return gr.skip(), detail_html, gr.skip(), gr.skip(), gr.skip(), *listing
        return (gr.skip(),) * 5 + no_listing

    detail.click(
        on_detail_click,
        [state, *view],
        [state, detail, ui["prompt"], ui["negative"], ui.tabs, *list_outputs],
        api_name="detail_action",
    )

    def on_detail(state: SessionState, adapter_id: float) -> tuple[Any, ...]:
        with user_errors("Details"):
            new, record = C.open_detail(services, state, int(adapter_id))
            return (new, *detail_values(new, record, False)[:-1])

    detail_id = gr.Number(visible=False, precision=0, label="adapter id")
    detail_id.submit(
        on_detail, [state, detail_id], [state, detail, *edit_fields, confirm_row], api_name="catalog_detail"
    )

    # ---- curation
    def on_save(
        state: SessionState,
        name: str,
        tags_text: str,
        triggers: str,
        base_family: str,
        nsfw_level: float,
        description: str,
        *view_values: Any,
    ) -> tuple[Any, ...]:
        with user_errors("Save"):
            if state.detail_id is None:
                raise ValueError("open an adapter's details first")
            edit = C.MetadataEdit(
                name=name,
                tags=C.split_tags(tags_text),
                trigger_words=tuple(w.strip() for w in (triggers or "").split(",") if w.strip()),
                base_family=base_family or None,
                nsfw_level=int(nsfw_level or 0),
                description_html=description,
            )
            record = C.edit_metadata(services, state.detail_id, edit)
            new = C.follow_edit(state, record)  # the mix panel and the next recipe use the new name
            listing = show(_query(*view_values), new)  # the card shows the new name and tags
        gr.Info("Saved.")
        return (new, *detail_values(new, record, False)[:-1], *listing)

    save_btn.click(
        on_save,
        [state, *edit_fields, *view],
        [state, detail, *edit_fields, confirm_row, *list_outputs],
        api_name="catalog_save",
    )

    def on_delete_ask(state: SessionState) -> tuple[Any, ...]:
        with user_errors("Delete"):
            if state.detail_id is None:
                raise ValueError("open an adapter's details first")
            record = C.get_record(services, state.detail_id)
        return gr.Row(visible=True), C.delete_question(record), record.id

    delete_btn.click(
        on_delete_ask, state, [confirm_row, confirm_md, pending_delete], api_name="catalog_delete_ask"
    )
    keep_btn.click(lambda: gr.Row(visible=False), None, confirm_row, api_name="catalog_delete_keep")

    def on_delete(
        state: SessionState,
        adapter_id: int | None,
        query: str,
        base_family: str,
        tags: str,
        include_nsfw: bool,
        licence: list[str],
        location: str,
        sort: str,
        kind: str,
        page: float,
    ) -> tuple[Any, ...]:
        with user_errors("Delete"):
            if adapter_id is None:
                raise ValueError("open an adapter's details and choose Delete adapter… first")
            new, text = C.delete(services, state, int(adapter_id))
            q = _query(query, base_family, tags, include_nsfw, licence, location, sort, kind, page)
            listing = show(q, new)
        info([text])
        cleared = ("", "", "", "", 0, "")  # the edit form no longer shows the deleted adapter
        return (new, gr.Row(visible=False), H.message(text), *listing, *cleared, None)

    confirm_btn.click(
        on_delete,
        [state, pending_delete, *filters, page],
        [state, confirm_row, detail, *list_outputs, *edit_fields, pending_delete],
        api_name="catalog_delete",
    )

    # ---- imports
    def after_import(
        summary: adapters_db.ImportSummary,
        state: SessionState,
        *filters_and_page: Any,
        short_paths: bool = False,
    ) -> tuple[Any, ...]:
        if summary.failed:
            warn([f"{len(summary.failed)} item(s) failed to import"])
        listing = show(_query(*filters_and_page), state)
        return (C.summary_text(summary, short_paths=short_paths), *listing)

    def on_upload(state: SessionState, files: list[str] | None, *rest: Any) -> tuple[Any, ...]:
        with user_errors("Import"):
            summary = C.import_uploads(services, [str(f) for f in files or []])
            return after_import(summary, state, *rest, short_paths=True)

    def on_folder(state: SessionState, folder: str, *rest: Any) -> tuple[Any, ...]:
        with user_errors("Import folder"):
            return after_import(C.import_folder(services, folder), state, *rest)

    def on_url(state: SessionState, url: str, *rest: Any) -> tuple[Any, ...]:
        with user_errors("Import from URL"):
            return after_import(C.import_url(services, url), state, *rest)

    import_outputs = [import_report, *list_outputs]
    upload_btn.click(on_upload, [state, upload, *filters, page], import_outputs, api_name="import_files")
    folder_btn.click(on_folder, [state, folder, *filters, page], import_outputs, api_name="import_folder")
    url_btn.click(on_url, [state, url, *filters, page], import_outputs, api_name="import_url")

    ui.add(
        catalog_filters=filters,
        catalog_page=page,
        catalog_list_outputs=list_outputs,
        catalog_on_filter=on_filter,
        catalog_detail_values=detail_values,
    )
