"""The Train tab: upload pictures, caption them, pick a preset, watch the job, use the adapter."""

from __future__ import annotations

from typing import Any

import gradio as gr
from PIL import Image

from pipelines.training import PRESETS
from pipelines.training.config import FAMILY_DEFAULTS, GENERIC_DEFAULTS
from studio.handlers import create
from studio.handlers import html as H
from studio.handlers import train as T
from studio.handlers.state import SessionState
from studio.ui.common import Ui, info, owner, user_errors, warn

PRESET_HELP = {
    "quick": "quick: rank 8, 300 steps — a first look in minutes",
    "balanced": f"balanced: rank 16, the model's steps (SD {GENERIC_DEFAULTS['steps']}, "
    f"pocket {FAMILY_DEFAULTS['pocket']['steps']}) — the default",
    "quality": "quality: rank 32, 1500 steps, text encoder too — slow",
}


def _opt_int(value: Any) -> int | None:
    return None if value in (None, "") else int(value)


def _opt_float(value: Any) -> float | None:
    return None if value in (None, "") else float(value)


def _rows(captions: Any) -> list[list[Any]]:
    """Rows of the captions table, whatever form Gradio hands it over in."""
    if captions is None:
        return []
    if hasattr(captions, "values") and hasattr(captions, "columns"):  # a pandas DataFrame
        return captions.values.tolist()
    if isinstance(captions, dict):
        return list(captions.get("data") or [])
    return list(captions)


def build(ui: Ui, tab: gr.Tab) -> None:
    """Lay out the Train tab and wire its events."""
    services, state = ui.services, ui.state
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=360):
            files = gr.File(
                file_count="multiple",
                file_types=["image", ".txt"],
                elem_id="train-files",
                label="Pictures of your concept (drag and drop; .txt files with the same name caption them)",
            )
            captions = gr.Dataframe(
                headers=["picture", "caption"],
                datatype=["str", "str"],
                column_count=2,
                interactive=True,
                label="captions (optional; empty: the template)",
                elem_id="train-captions",
            )
        with gr.Column(scale=1, min_width=360):
            with gr.Row():
                trigger = gr.Textbox("", label="trigger word", placeholder="zq", elem_id="train-trigger")
                class_word = gr.Textbox(
                    "", label="class word", placeholder="dog, person, style…", elem_id="train-class"
                )
                name = gr.Textbox("", label="adapter name (default: the trigger)", elem_id="train-name")
            preset = gr.Radio(
                list(PRESETS),
                value="quick",
                label="preset",
                elem_id="train-preset",
                info=" · ".join(PRESET_HELP.get(p, p) for p in PRESETS),
            )
            with gr.Accordion("Advanced", open=False, elem_id="train-advanced"):
                first = T.preset_fields("quick")
                with gr.Row():
                    steps = gr.Number(
                        first["steps"], precision=0, label="steps (empty: the model's)", elem_id="train-steps"
                    )
                    rank = gr.Number(first["rank"], precision=0, label="rank", elem_id="train-rank")
                    lr = gr.Number(
                        first["learning_rate"], label="learning rate (empty: the model's)", elem_id="train-lr"
                    )
                with gr.Row():
                    resolution = gr.Number(
                        first["resolution"],
                        precision=0,
                        label="resolution (0: the model's)",
                        elem_id="train-resolution",
                    )
                    sample_every = gr.Number(
                        first["sample_every"], precision=0, label="sample every (steps; 0: at the end)"
                    )
                    text_encoder = gr.Checkbox(
                        bool(first["train_text_encoder"]),
                        label="train the text encoder too (unticked: the model's default)",
                    )
                prior = gr.Radio(
                    list(T.PRIOR_CHOICES),
                    value=next(iter(T.PRIOR_CHOICES)),
                    label="prior preservation (renders class images first; slower)",
                    info="the model's default: on with a class word; the pocket model always keeps its own",
                    elem_id="train-prior",
                )
                options = gr.Textbox(
                    "",
                    label="more options (JSON, any TrainSpec field)",
                    lines=2,
                    placeholder='{"use_dora": true, "sample_steps": 10}',
                    elem_id="train-options",
                )
            with gr.Row():
                start_btn = gr.Button("Start training", variant="primary", elem_id="train-start")
                cancel_btn = gr.Button("Cancel", variant="stop", elem_id="train-cancel")
                resume_btn = gr.Button("Resume", elem_id="train-resume")
            job_id = gr.Textbox("", label="job", elem_id="train-job", interactive=True)
            progress = gr.HTML(H.message("No job yet."), elem_id="train-progress", label="progress")
            status = gr.JSON(visible=False, label="status")
            loss = gr.Image(label="loss", interactive=False, format="png", elem_id="train-loss", height=220)
            samples = gr.Gallery(label="samples as they come", columns=4, height=200, elem_id="train-samples")
            with gr.Row(visible=False) as done_row:
                open_btn = gr.Button("Open in the catalog", elem_id="train-open")
                send_btn = gr.Button("Send to Create", variant="primary", elem_id="train-send")
            jobs = gr.Dataframe(
                headers=list(T.JOB_COLUMNS),
                column_widths=list(T.JOB_COLUMN_WIDTHS),
                wrap=True,
                interactive=False,
                label="training jobs, newest first (click one to watch it)",
                elem_id="train-jobs",
            )
    timer = gr.Timer(1.0, active=False)

    def on_preset(name: str) -> tuple[Any, ...]:
        with user_errors("Preset"):
            f = T.preset_fields(name)
        return (
            f["steps"],
            f["rank"],
            f["learning_rate"],
            f["resolution"],
            f["sample_every"],
            bool(f["train_text_encoder"]),
        )

    preset.input(
        on_preset, preset, [steps, rank, lr, resolution, sample_every, text_encoder], api_name="train_preset"
    )

    def on_files(files: list[str] | None) -> list[list[str]]:
        with user_errors("Pictures"):
            return T.caption_rows([str(f) for f in files or []])

    files.change(on_files, files, captions, api_name="caption_table")

    def on_train(
        state: SessionState,
        files: list[str] | None,
        captions: Any = None,
        trigger: str = "",
        class_word: str = "",
        name: str = "",
        preset: str = "quick",
        steps: float | None = None,
        rank: float | None = None,
        learning_rate: float | None = None,
        resolution: float | None = None,
        sample_every: float | None = None,
        text_encoder: bool = False,
        prior_preservation: str = "",
        options_json: str = "",
        request: gr.Request | None = None,
    ) -> tuple[Any, ...]:
        with user_errors("Train"):
            req = T.TrainRequest(
                files=tuple(str(f) for f in files or [] if T.is_picture(f) or str(f).endswith(".txt")),
                trigger=trigger or "",
                class_word=class_word or "",
                preset=preset or "quick",
                name=name or "",
                captions=T.captions_from_rows(_rows(captions)),
                steps=_opt_int(steps),
                rank=_opt_int(rank),
                learning_rate=_opt_float(learning_rate),
                resolution=_opt_int(resolution),
                sample_every=_opt_int(sample_every),
                train_text_encoder=None if text_encoder is None else bool(text_encoder),
                prior_preservation=T.PRIOR_CHOICES.get(prior_preservation or ""),
                options_json=options_json or "",
            )
            new, job = T.start_training(services, state, req, owner(request))
        gr.Info(f"Training job {job[:8]} queued.")
        table = T.jobs_table(services, new, owner(request))
        return new, job, H.progress_bar(0.0, "queued"), gr.Timer(active=True), table

    start_btn.click(
        on_train,
        [
            state,
            files,
            captions,
            trigger,
            class_word,
            name,
            preset,
            steps,
            rank,
            lr,
            resolution,
            sample_every,
            text_encoder,
            prior,
            options,
        ],
        [state, job_id, progress, timer, jobs],
        api_name="train",
    )

    def on_status(state: SessionState, job_id: str, request: gr.Request | None = None) -> tuple[Any, ...]:
        with user_errors("Job status"):
            user = owner(request)
            mine = T.jobs_table(services, state, user)
            if not (job_id or "").strip():
                return (gr.skip(),) * 5 + (gr.Timer(active=False), mine)
            view = T.job_view(services, job_id, user)
        done = view.status == "done" and bool(view.adapter_id)
        pictures = [(Image.open(p).convert("RGB"), c) for p, c in view.samples]
        return (
            view.progress_html,
            view.data(),
            view.loss_image,
            pictures or None,
            gr.Row(visible=done),
            gr.Timer(active=not view.finished),
            mine,
        )

    status_outputs = [progress, status, loss, samples, done_row, timer, jobs]
    gr.on(
        [timer.tick, job_id.submit],
        on_status,
        [state, job_id],
        status_outputs,
        api_name="job_status",
        show_progress="hidden",
    )

    def on_pick(evt: gr.SelectData, request: gr.Request | None = None) -> tuple[Any, ...]:
        with user_errors("Training jobs"):
            row = evt.row_value or []
            job = T.job_ref(services, str(row[0]), owner(request)) if row else ""
        return job, gr.Timer(active=bool(job))

    jobs.select(on_pick, None, [job_id, timer], api_name="train_pick_job")

    def on_tab(state: SessionState, request: gr.Request | None = None) -> list[list[str]]:
        with user_errors("Training jobs"):
            return T.jobs_table(services, state, owner(request))

    tab.select(on_tab, state, jobs, api_name="train_jobs", show_progress="hidden")

    def on_cancel(job_id: str, request: gr.Request | None = None) -> tuple[Any, ...]:
        with user_errors("Cancel"):
            notice = T.cancel_notice(services, job_id, owner(request))
        info([notice])
        return gr.Timer(active=True), gr.skip()

    cancel_btn.click(on_cancel, job_id, [timer, progress], api_name="train_cancel")

    def on_resume(job_id: str, request: gr.Request | None = None) -> tuple[Any, ...]:
        with user_errors("Resume"):
            st = T.resume_job(services, job_id, owner(request))
        gr.Info(f"Job {st}.")
        return gr.Timer(active=True), gr.skip()

    resume_btn.click(on_resume, job_id, [timer, progress], api_name="train_resume")

    def on_send(state: SessionState, job_id: str, request: gr.Request | None = None) -> tuple[Any, ...]:
        with user_errors("Send to Create"):
            ref = T.trained_adapter_ref(services, job_id, owner(request))
            new, notes = create.add_adapter(services, state, ref)
        warn(notes)
        return new, gr.Tabs(selected="create")

    send_btn.click(on_send, [state, job_id], [state, ui.tabs], api_name="train_send")

    def on_open(state: SessionState, job_id: str, request: gr.Request | None = None) -> tuple[Any, ...]:
        with user_errors("Open in the catalog"):
            ref = T.trained_adapter_ref(services, job_id, owner(request))
            return ui["open_detail"](state, ref)

    open_btn.click(on_open, [state, job_id], [state, *ui["detail_outputs"]], api_name="train_open")
