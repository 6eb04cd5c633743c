"""The Create tab: prompt, adapter cards, the mix panel, the fusion policy, generation and A/B."""

from __future__ import annotations

import json
from dataclasses import replace
from functools import partial
from typing import Any

import gradio as gr

from pipelines.engine import GenerationCancelled
from pipelines.models import SAMPLERS
from pipelines.recipe import random_seed
from studio.handlers import create, generate, policies
from studio.handlers import html as H
from studio.handlers.state import MAX_MIX, SessionState
from studio.services import ModelInfo
from studio.ui.assets import CARD_JS
from studio.ui.common import Debouncer, Ui, info, owner, session_key, user_errors, warn

# Helper widgets of the policy parameters: widget name → (parameter key, policies that show it).
PARAM_WIDGETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "period": ("period", ("switch",)),
    "order": ("order", ("switch", "orthogonal")),
    "k": ("k", ("klora",)),
    "alpha": ("alpha", ("klora",)),
    "beta": ("beta", ("klora",)),
    "mode": ("mode", ("orthogonal",)),
    "density": ("density", ("ties", "dare")),
    "dare_seed": ("seed", ("dare",)),
    "dare_ties": ("ties", ("dare",)),
    "checkpoint": ("checkpoint", ("gate",)),
    "gate_catalog": ("checkpoint", ("gate",)),
}
POLICY_HELP = {
    "linear": "Weighted sum of the adapters (A1111's `<lora:name:w>`).",
    "blocks": "Per-block weights: set each adapter's LoRA-Block-Weight preset or vector in the mix panel.",
    "schedule": "Per-step weights: give each adapter keyframes `w@pos, …` (pos 0…1) in the mix panel.",
    "switch": "LoRA Switch: one adapter active in the UNet per step, rotating every *period* steps.",
    "klora": "K-LoRA: per layer and step, keep the adapter with the larger top-k score (1st = content).",
    "orthogonal": "Deltas made mutually orthogonal per layer before summing (less interference).",
    "ties": "TIES merging: trim small deltas, elect signs, average the agreeing ones.",
    "dare": "DARE: drop and rescale delta entries at random (optionally TIES afterwards).",
    "gate": "Learned gate (AutoLoRA-style): pick a catalogued gate checkpoint, or give a file path "
    "(train one with `python -m studio gate train`).",
}


def _sampler(value: str | None) -> str | None:
    return None if not value or value == generate.MODEL_SAMPLER else value


def _request(
    prompt: str,
    negative_prompt: str,
    fusion: str,
    fusion_params: str,
    seed: float,
    steps: float,
    guidance: float,
    width: float,
    height: float,
    sampler: str,
    batch_size: float,
    batch_count: float,
    clip_skip: float | None = 1,
) -> generate.GenerateRequest:
    """The handler's request from the form's values."""
    return generate.GenerateRequest(
        prompt=prompt or "",
        negative_prompt=negative_prompt or "",
        fusion=fusion or "linear",
        fusion_params=policies.parse_params(fusion_params),
        seed=int(seed if seed is not None else -1),
        steps=int(steps),
        guidance=float(guidance),
        width=int(width) if width else None,
        height=int(height) if height else None,
        sampler=_sampler(sampler),
        batch_size=int(batch_size),
        batch_count=int(batch_count),
        clip_skip=int(clip_skip) if clip_skip and int(clip_skip) > 1 else None,
    )


def mix_summary(state: SessionState) -> str:
    """The Markdown line above the mix slots: how many adapters, or how to add some."""
    if state.mix:
        return f"**Mix:** {len(state.mix)} of {MAX_MIX} adapters"
    return "**Mix:** empty. Add adapters from the cards, by name below, or with `<lora:name:w>` tags."


def mix_panel(ui: Ui, state: SessionState) -> list[Any]:
    """Updates for the mix panel: each slot, the summary, the warnings and the search cards."""
    out: list[Any] = []
    for i in range(MAX_MIX):
        if i < len(state.mix):
            m = state.mix[i]
            title = create.slot_title(i, m)
            out += [gr.update(visible=True), title, m.weight, m.te, m.unet, m.blocks, m.schedule]
        else:
            out += [gr.update(visible=False), "", 1.0, 1.0, 1.0, "ALL", "1"]
    summary = mix_summary(state)
    try:
        warnings = create.mix_warnings(ui.services, state)
    except Exception as exc:  # a broken file must not break the panel
        warnings = [f"could not check the mix: {exc}"]
    warn_md = create.warnings_markdown(warnings)
    out += [
        summary,
        gr.update(value=warn_md, visible=bool(warnings)),
        create.hit_cards_html(ui.services, state),
    ]
    return out


def build(ui: Ui, model: ModelInfo) -> None:
    """Lay out the Create tab and wire its events; registers shared components on ``ui``."""
    services, state = ui.services, ui.state
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=420):
            prompt = gr.Textbox(
                "",
                label="Prompt",
                lines=3,
                elem_id="prompt",
                placeholder="a red star on grass, <lora:name:0.8> tags work too",
            )
            negative = gr.Textbox("", label="Negative prompt", lines=1, elem_id="negative")
            with gr.Row():
                find = gr.Button("Find adapters", elem_id="find-adapters", size="sm")
                triggers_btn = gr.Button("Insert trigger words", elem_id="insert-triggers", size="sm")
                auto_btn = gr.Button("Auto mix", elem_id="auto-mix", size="sm")
            cards = gr.HTML(
                H.message("Type a prompt: matching adapters appear here."),
                elem_id="hit-cards",
                js_on_load=CARD_JS,
                label="adapter cards",
            )
            hits_json = gr.JSON(visible=False, label="hits")
            mix_json = gr.JSON(visible=False, label="mix")
            gr.Markdown("### Mix")
            # shown from the start: the panel's event runs only when the session's state changes (an
            # entry sent from the History tab without adapters leaves an empty mix as it was)
            summary = gr.Markdown(mix_summary(state.value), elem_id="mix-summary")
            warnings = gr.Markdown(visible=False, elem_id="mix-warnings", elem_classes=["as-warnings"])
            slots: list[list[Any]] = []
            for i in range(MAX_MIX):
                with gr.Group(visible=False, elem_id=f"mix-slot-{i}") as group:
                    with gr.Row(equal_height=True):
                        title = gr.Markdown(elem_classes=["as-slot-title"])
                        remove = gr.Button(
                            "✕ Remove", size="sm", scale=0, min_width=90, elem_id=f"mix-remove-{i}"
                        )
                    with gr.Row():
                        weight = gr.Slider(-2, 2, 1, step=0.05, label="weight", elem_id=f"mix-weight-{i}")
                        te = gr.Slider(0, 2, 1, step=0.05, label="text-encoder ×")
                        unet = gr.Slider(0, 2, 1, step=0.05, label="UNet ×")
                    with gr.Row():
                        blocks = gr.Dropdown(
                            list(create.BLOCK_PRESETS),
                            value="ALL",
                            allow_custom_value=True,
                            label="blocks (preset or LBW vector)",
                        )
                        schedule = gr.Textbox("1", label="schedule keyframes (w@pos, …)")
                slots.append([group, title, weight, te, unet, blocks, schedule, remove])
            with gr.Row():
                add_ref = gr.Textbox("", label="Add by name, id or hash", scale=3, elem_id="add-ref")
                add_weight = gr.Number(1.0, label="weight", scale=1, minimum=-2, maximum=2)
                add_btn = gr.Button("Add", scale=1, size="sm", elem_id="add-by-ref")
                clear_btn = gr.Button("Clear mix", scale=1, size="sm")
            gr.Markdown("### Fusion policy")
            fusion = gr.Dropdown(
                policies.policy_names(), value="linear", label="Fusion policy", elem_id="fusion"
            )
            policy_help = gr.Markdown(POLICY_HELP["linear"])
            widgets = {
                "period": gr.Number(5, precision=0, minimum=1, label="switch period (steps)", visible=False),
                "order": gr.Textbox("", label="order (adapter positions from 0, e.g. 1,0)", visible=False),
                "k": gr.Number(64, precision=0, minimum=1, label="k (top-k entries)", visible=False),
                "alpha": gr.Number(1.5, label="alpha", visible=False),
                "beta": gr.Number(0.5, label="beta", visible=False),
                "mode": gr.Radio(
                    ["gram_schmidt", "symmetric"],
                    value="gram_schmidt",
                    label="orthogonal mode",
                    visible=False,
                ),
                "density": gr.Slider(
                    0.05, 1.0, 0.2, step=0.05, label="density (share of entries kept)", visible=False
                ),
                "dare_seed": gr.Number(0, precision=0, label="DARE seed", visible=False),
                "dare_ties": gr.Checkbox(False, label="TIES after DARE", visible=False),
                "checkpoint": gr.Textbox("", label="gate checkpoint file", visible=False),
                "gate_catalog": gr.Dropdown(
                    [], value=None, label="gate checkpoint (catalog)", visible=False, elem_id="gate-catalog"
                ),
            }
            with gr.Accordion("Policy parameters (JSON)", open=False):
                params = gr.Code("{}", language="json", label="parameters", elem_id="fusion-params")
            schedule_img = gr.Image(
                label="schedule", visible=False, interactive=False, format="png", height=200
            )
        with gr.Column(scale=2, min_width=360):
            with gr.Row():
                seed = gr.Number(-1, precision=0, label="seed (-1: random)", elem_id="seed")
                sampler = gr.Dropdown(
                    [generate.MODEL_SAMPLER, *SAMPLERS], value=generate.MODEL_SAMPLER, label="sampler"
                )
                clip_skip = gr.Slider(
                    1, 12, 1, step=1, label="clip skip (2: many anime models)", elem_id="clip-skip"
                )
            with gr.Row():
                steps = gr.Slider(1, 100, 20, step=1, label="steps", elem_id="steps")
                guidance = gr.Slider(0, 20, 7.5, step=0.5, label="guidance")
            with gr.Row():
                width = gr.Slider(32, 1536, model.width, step=8, label="width", elem_id="width")
                height = gr.Slider(32, 1536, model.height, step=8, label="height", elem_id="height")
            with gr.Row():
                batch_size = gr.Slider(1, 4, 1, step=1, label="batch size")
                batch_count = gr.Slider(1, 8, 1, step=1, label="batch count")
            with gr.Row():
                generate_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel")
            gallery = gr.Gallery(
                label="Images", columns=2, height=320, elem_id="gallery", object_fit="contain"
            )
            heatmap = gr.Image(
                show_label=False,
                label="Gates applied (adapters × blocks × steps)",
                interactive=False,
                format="png",
                elem_id="heatmap",
            )
            report = gr.Markdown(elem_id="report", label="report")
            with gr.Accordion("Recipe", open=False):
                recipe = gr.Code(
                    language="json",
                    label="recipe of the last run (click an image for its own)",
                    elem_id="recipe",
                )
            with gr.Accordion("A/B compare", open=False):
                ab_policies = gr.CheckboxGroup(
                    policies.comparable_policies(), value=["orthogonal"], label="also render with"
                )
                ab_loo = gr.Checkbox(True, label="leave one adapter out (each in turn)")
                ab_btn = gr.Button("Render A/B grid", elem_id="ab-grid")
                ab_grid = gr.Image(
                    label="same seed, side by side", interactive=False, format="png", elem_id="ab-image"
                )
                ab_info = gr.Markdown(label="A/B report")

    slot_outputs = [c for s in slots for c in s[:7]]
    panel_outputs = [*slot_outputs, summary, warnings, cards]
    form = [
        prompt,
        negative,
        fusion,
        params,
        seed,
        steps,
        guidance,
        width,
        height,
        sampler,
        batch_size,
        batch_count,
        clip_skip,
    ]
    ui.add(
        prompt=prompt,
        negative=negative,
        fusion=fusion,
        params=params,
        seed=seed,
        steps=steps,
        guidance=guidance,
        width=width,
        height=height,
        sampler=sampler,
        batch_size=batch_size,
        batch_count=batch_count,
        clip_skip=clip_skip,
        gallery=gallery,
        heatmap=heatmap,
        report=report,
        recipe=recipe,
        form=form,
        policy_widgets=widgets,
        policy_help=policy_help,
    )

    # ---- search and cards
    def on_search(
        state: SessionState, prompt: str, k: float = create.DEFAULT_K
    ) -> tuple[SessionState, str, list[dict[str, Any]]]:
        with user_errors("Search"):
            hits = create.search_adapters(services, prompt or "", int(k))
            new = create.remember_hits(state, hits)
            if not hits:
                empty = (
                    "Type a prompt: matching adapters appear here."
                    if not (prompt or "").strip()
                    else "No adapter in the catalog matches this prompt."
                )
                return new, H.message(empty), []
            return new, create.hit_cards_html(services, new), create.hit_data(hits)

    find.click(on_search, [state, prompt], [state, cards, hits_json], api_name="search")
    typing = Debouncer()

    def on_typing(state: SessionState, prompt: str, request: gr.Request) -> tuple[Any, ...]:
        if not typing.settle(session_key(request)):
            return gr.skip(), gr.skip(), gr.skip()
        return on_search(state, prompt)

    prompt.change(
        on_typing,
        [state, prompt],
        [state, cards, hits_json],
        api_name="search_as_you_type",
        show_progress="hidden",
        concurrency_limit=None,
    )

    def on_card(state: SessionState, evt: gr.EventData) -> tuple[Any, ...]:
        data = getattr(evt, "_data", None) or {}
        action, ref = data.get("action"), data.get("id")
        with user_errors("Adapter card"):
            if action == "add":
                new, notes = create.add_adapter(services, state, ref)
                warn(notes)
                return (new, *ui["detail_skip"]())
            if action == "detail":
                return ui["open_detail"](state, ref)
        return (gr.skip(), *ui["detail_skip"]())

    ui.add(on_card=on_card, cards=cards)

    def on_add(state: SessionState, ref: str, weight: float = 1.0) -> tuple[Any, ...]:
        with user_errors("Add adapter"):
            new, notes = create.add_adapter(
                services, state, ref, float(weight if weight is not None else 1.0)
            )
        warn(notes)
        return new, "", create.mix_data(new)

    gr.on(
        [add_btn.click, add_ref.submit],
        on_add,
        [state, add_ref, add_weight],
        [state, add_ref, mix_json],
        api_name="add_adapter",
    )

    def on_clear(state: SessionState) -> tuple[SessionState, list[dict[str, Any]]]:
        new = create.clear_mix(state)
        return new, create.mix_data(new)

    clear_btn.click(on_clear, state, [state, mix_json], api_name="clear_mix")

    def on_panel(state: SessionState) -> list[Any]:
        return mix_panel(ui, state)

    state.change(on_panel, state, panel_outputs, api_name="mix_panel", show_progress="hidden")

    def on_slot(
        index: int, state: SessionState, weight: float, te: float, unet: float, blocks: str, schedule: str
    ) -> SessionState:
        with user_errors(f"Mix entry {index + 1}"):
            if index >= len(state.mix):
                return state
            return create.update_adapter(
                state, index, weight=weight, te=te, unet=unet, blocks=blocks, schedule=schedule
            )

    def on_remove(index: int, state: SessionState) -> SessionState:
        with user_errors("Remove"):
            return create.remove_adapter(state, index)

    for i, (_g, _t, weight, te, unet, blocks, schedule, remove) in enumerate(slots):
        gr.on(
            [weight.release, te.release, unet.release, blocks.input, schedule.submit, schedule.blur],
            partial(on_slot, i),
            [state, weight, te, unet, blocks, schedule],
            state,
            api_name=f"mix_slot_{i}",
            show_progress="hidden",
        )
        remove.click(partial(on_remove, i), state, state, api_name=f"mix_remove_{i}")

    def on_triggers(state: SessionState, prompt: str) -> str:
        return create.insert_triggers(prompt or "", state)

    triggers_btn.click(on_triggers, [state, prompt], prompt, api_name="insert_triggers")

    def on_auto(state: SessionState, prompt: str) -> tuple[Any, ...]:
        with user_errors("Auto mix"):
            new, policy, notes = create.auto_mix(services, state, prompt or "")
        info(notes[:1])
        warn(notes[1:])
        return (new, policy, *policy_updates(policy))

    # ---- policy parameters
    names = list(widgets)

    def policy_view(policy: str, params: dict[str, Any] | None = None) -> list[Any]:
        """Updates for the policy's help and parameter widgets, showing ``params`` (else the defaults)."""
        defaults = policies.policy_defaults(policy)
        values = {**defaults, **(params or {})}
        shown = {n for n, (key, owners) in PARAM_WIDGETS.items() if policy in owners and key in defaults}
        ups: list[Any] = [POLICY_HELP.get(policy, f"Fusion policy {policy}.")]
        for n in names:
            key = PARAM_WIDGETS[n][0]
            value = values.get(key)
            if n == "order":
                value = ",".join(str(v) for v in value) if isinstance(value, list) else ""
            if n == "gate_catalog":
                choices = policies.gate_choices(services) if n in shown else []
                picked = value if value in {v for _, v in choices} else None
                ups.append(gr.update(visible=n in shown, choices=choices, value=picked))
                continue
            ups.append(
                gr.update(visible=n in shown, value=value)
                if n in shown and value is not None
                else gr.update(visible=n in shown)
            )
        ups.append(gr.update(visible=policy == "schedule"))
        return ups

    def policy_updates(policy: str) -> list[Any]:
        defaults = policies.policy_defaults(policy)
        return [json.dumps(dict(defaults)), *policy_view(policy, defaults)]

    policy_outputs = [params, policy_help, *widgets.values(), schedule_img]
    ui.add(policy_view=policy_view, policy_view_outputs=policy_outputs[1:])

    def on_policy(policy: str) -> list[Any]:
        with user_errors("Fusion policy"):
            return policy_updates(policy)

    fusion.input(on_policy, fusion, policy_outputs, api_name="set_policy")
    auto_btn.click(on_auto, [state, prompt], [state, fusion, *policy_outputs], api_name="auto_mix")

    def on_param(key: str, params_json: str, value: Any) -> str:
        with user_errors(f"Parameter {key}"):
            return policies.set_param(params_json, key, value)

    for n, widget in widgets.items():
        key = PARAM_WIDGETS[n][0]
        trigger = (
            widget.release
            if isinstance(widget, gr.Slider)
            else (widget.blur if isinstance(widget, gr.Textbox | gr.Number) else widget.input)
        )
        trigger(
            partial(on_param, key), [params, widget], params, api_name=f"param_{n}", show_progress="hidden"
        )

    def on_schedule_preview(state: SessionState, policy: str, steps: float) -> Any:
        if policy != "schedule":
            return gr.skip()
        with user_errors("Schedule"):
            return policies.schedule_preview(state, int(steps))

    gr.on(
        [state.change, fusion.change, steps.release],
        on_schedule_preview,
        [state, fusion, steps],
        schedule_img,
        api_name="schedule_preview",
        show_progress="hidden",
    )

    # ---- generation
    def on_generate(
        state: SessionState,
        prompt: str,
        negative_prompt: str,
        fusion: str,
        fusion_params: str,
        seed: float,
        steps: float,
        guidance: float,
        width: float,
        height: float,
        sampler: str,
        batch_size: float,
        batch_count: float,
        clip_skip: float,
        request: gr.Request,
        progress=gr.Progress(),
    ) -> tuple[Any, ...]:
        key = session_key(request)
        with user_errors("Generate"):
            req = _request(
                prompt,
                negative_prompt,
                fusion,
                fusion_params,
                seed,
                steps,
                guidance,
                width,
                height,
                sampler,
                batch_size,
                batch_count,
                clip_skip,
            )
            cancel = services.cancels.begin(key)
            try:
                res = generate.generate(
                    services,
                    state,
                    req,
                    owner=owner(request),
                    cancel=cancel,
                    on_step=lambda i, n: progress((i, n), desc="denoising", unit="steps"),
                )
            except GenerationCancelled:
                gr.Warning("Generation cancelled.")
                return (gr.skip(),) * 5
            finally:
                services.cancels.end(key)
        info(res.notes)
        return res.state, res.images, res.recipe_json, res.heatmap, res.info

    generate_btn.click(
        on_generate,
        [state, *form],
        [state, gallery, recipe, heatmap, report],
        api_name="generate",
        concurrency_id="pipeline",
        concurrency_limit=1,
    )

    def on_cancel(request: gr.Request) -> None:
        if not services.cancels.cancel(session_key(request)):
            gr.Info("Nothing is running in this session.")

    # queued (toasts only reach the page from queued events), in a group of its own without a limit, so it
    # never waits behind the generation it cancels
    cancel_btn.click(
        on_cancel,
        None,
        None,
        api_name="cancel",
        concurrency_id="cancel",
        concurrency_limit=None,
        show_progress="hidden",
    )

    def on_select_image(state: SessionState, evt: gr.SelectData) -> str:
        with user_errors("Recipe"):
            if evt.index is None or not 0 <= int(evt.index) < len(state.images):
                return gr.skip()
            return generate.image_recipe(state.images[int(evt.index)])

    gallery.select(on_select_image, state, recipe, api_name="image_recipe")

    def on_compare(
        state: SessionState,
        prompt: str,
        negative_prompt: str,
        fusion: str,
        fusion_params: str,
        seed: float,
        steps: float,
        guidance: float,
        width: float,
        height: float,
        sampler: str,
        batch_size: float,
        batch_count: float,
        clip_skip: float,
        compare_with: list[str],
        leave_one_out: bool,
        request: gr.Request,
        progress=gr.Progress(),
    ) -> tuple[Any, ...]:
        key = session_key(request)
        with user_errors("A/B grid"):
            req = _request(
                prompt,
                negative_prompt,
                fusion,
                fusion_params,
                seed,
                steps,
                guidance,
                width,
                height,
                sampler,
                1,
                1,
                clip_skip,
            )
            if req.seed < 0:
                req = replace(req, seed=random_seed())
            cancel = services.cancels.begin(key)
            try:
                res = generate.ab_compare(
                    services,
                    state,
                    req,
                    compare_with or [],
                    bool(leave_one_out),
                    owner=owner(request),
                    cancel=cancel,
                    on_step=lambda i, n: progress((i, n), desc="A/B grid", unit="steps"),
                )
            except GenerationCancelled:
                gr.Warning("A/B grid cancelled.")
                return gr.skip(), gr.skip()
            finally:
                services.cancels.end(key)
        info(res.notes)
        return res.grid, res.markdown()

    ab_btn.click(
        on_compare,
        [state, *form, ab_policies, ab_loo],
        [ab_grid, ab_info],
        api_name="compare",
        concurrency_id="pipeline",
        concurrency_limit=1,
    )
