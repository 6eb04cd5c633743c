"""``build_app(services) -> gr.Blocks`` and ``launch``: the studio in the browser.

Four tabs (Create, Catalog, Train, History) over one per-session :class:`SessionState`. Every event
has an ``api_name``; the documented ones for ``gradio_client`` are ``/search``, ``/add_adapter``,
``/generate``, ``/train``, ``/job_status`` and ``/catalog``. Generation events share one queue slot
(``concurrency_id="pipeline"``), so sessions wait their turn instead of racing on the pipeline.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gradio as gr

from studio.config import StudioConfig
from studio.handlers import html as H
from studio.services import ModelInfo, Services
from studio.ui import catalog_tab, create_tab, history_tab, train_tab
from studio.ui.assets import CSS
from studio.ui.common import Ui, initial_state

DOCUMENTED_API = ("/search", "/add_adapter", "/generate", "/train", "/job_status", "/catalog")


def header(model: ModelInfo) -> str:
    """The line above the tabs: which model runs, or why none does."""
    if model.error:
        return H.message(
            f"The base model {model.model!r} could not be loaded: {model.error}. Browse and curate the "
            "catalog meanwhile; restart with --model to choose another one.",
            "error",
        )
    family = model.family or "unknown family"
    return (
        f'<div class="as-header"><b>Adapter Studio</b> · model <code>{H.esc(model.model)}</code> · '
        f"{H.esc(family)} · native size {model.width}×{model.height}</div>"
    )


def build_app(services: Services) -> gr.Blocks:
    """The studio's Gradio app over built services (launch it with :func:`launch`)."""
    model = services.model_info()
    with gr.Blocks(title="Adapter Studio", analytics_enabled=False) as demo:
        state = gr.State(initial_state())
        gr.HTML(header(model), elem_id="studio-header")
        with gr.Tabs(elem_id="tabs") as tabs:
            ui = Ui(services, state, tabs)
            with gr.Tab("Create", id="create", elem_id="tab-create"):
                create_tab.build(ui, model)
            with gr.Tab("Catalog", id="catalog", elem_id="tab-catalog") as catalog:
                catalog_tab.build(ui, catalog)
            with gr.Tab("Train", id="train", elem_id="tab-train") as train:
                train_tab.build(ui, train)
            with gr.Tab("History", id="history", elem_id="tab-history") as history:
                history_tab.build(ui, history)
        ui["cards"].click(ui["on_card"], state, [state, *ui["detail_outputs"]], api_name="card_action")
        demo.load(
            ui["catalog_on_filter"],
            [state, *ui["catalog_filters"]],
            ui["catalog_list_outputs"],
            api_name="catalog_initial",
        )
    return demo


def allowed_paths(config: StudioConfig) -> list[str]:
    """Folders whose files the browser may load: generated images and catalog preview images (never "/")."""
    folders = [config.history_dir, config.files_dir / "images"]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    return [str(f.resolve()) for f in folders]


def blocked_paths(config: StudioConfig) -> list[str]:
    """Folders that must never be served even if another rule would allow them."""
    return [
        str((config.files_dir / "lora").resolve()),
        str((config.data_dir / "uploads").resolve()),
        str(config.jobs_dir.resolve()),
    ]


def gradio_temp_dir(config: StudioConfig) -> Path:
    """Where Gradio keeps uploads and cached outputs (inside the data folder)."""
    return config.data_dir / "tmp" / "gradio"


def launch(
    demo: gr.Blocks,
    services: Services,
    *,
    host: str = "127.0.0.1",
    port: int | None = 7860,
    auth: tuple[str, str] | list[tuple[str, str]] | None = None,
    prevent_thread_lock: bool = False,
    quiet: bool = False,
) -> Any:
    """Queue and serve the app: loopback by default, no share link, no analytics, no MCP or SSR."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("GRADIO_TEMP_DIR", str(gradio_temp_dir(services.config)))
    demo.queue(default_concurrency_limit=2, max_size=64)
    return demo.launch(
        server_name=host,
        server_port=port,
        auth=auth,
        share=False,
        inbrowser=False,
        css=CSS,
        allowed_paths=allowed_paths(services.config),
        blocked_paths=blocked_paths(services.config),
        ssr_mode=False,
        mcp_server=False,
        enable_monitoring=False,
        run_history=False,
        show_error=True,
        footer_links=["api", "settings"],
        prevent_thread_lock=prevent_thread_lock,
        quiet=quiet,
        max_file_size="4gb",
    )
