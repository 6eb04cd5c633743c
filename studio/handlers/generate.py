"""Generating from the Create tab: the request, the recipe (mix + prompt tags), runs recorded in the
history with their gate heatmap, and the A/B grid."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from PIL import Image

from pipelines.engine import GenerationCancelled
from pipelines.fusion import REGISTRY
from pipelines.fusion.base import is_per_adapter
from pipelines.fusion.schedule import loractl_entry
from pipelines.models import SAMPLERS
from pipelines.pngmeta import pinned_recipe, read_recipe
from pipelines.recipe import MAX_SEED, MixRecipe, check_clip_skip, parse_lora_tags, random_seed
from studio.handlers import html, plots
from studio.handlers.create import check_schedule, find_adapter, mix_item, resolve_adapter, schedule_entry
from studio.handlers.policies import MIX_OWNED_PARAMS, policy_defaults, policy_names
from studio.handlers.state import MAX_MIX, MixItem, SessionState
from studio.services import Services

MODEL_SAMPLER = "model default"


StepFn = Callable[[int, int], None]


@dataclass(frozen=True)
class GenerateRequest:
    """What the Create tab's settings say (the mix comes from the session state)."""

    prompt: str
    negative_prompt: str = ""
    fusion: str = "linear"
    fusion_params: dict[str, Any] = field(default_factory=dict)
    seed: int = -1  # -1: a random seed (recorded in the recipe)
    steps: int = 20
    guidance: float = 7.5
    width: int | None = None
    height: int | None = None
    sampler: str | None = None
    batch_size: int = 1
    batch_count: int = 1
    clip_skip: int | None = None  # A1111's Clip skip (1 = last layer); None: not set

    def __post_init__(self) -> None:
        check_clip_skip(self.clip_skip)
        problems = [
            (1 <= self.steps <= 150, f"steps must be 1 to 150, got {self.steps}"),
            (0 <= self.guidance <= 30, f"guidance must be 0 to 30, got {self.guidance}"),
            (1 <= self.batch_size <= 8, f"batch size must be 1 to 8, got {self.batch_size}"),
            (1 <= self.batch_count <= 16, f"batch count must be 1 to 16, got {self.batch_count}"),
            (
                -1 <= self.seed <= MAX_SEED - self.batch_count + 1,
                f"seed must be -1 (random) or 0 to {MAX_SEED} (2^63 - 1, less the batch count), "
                f"got {self.seed}",
            ),
            (self.sampler in (None, *SAMPLERS), f"unknown sampler {self.sampler!r}"),
        ]
        for size in (self.width, self.height):
            problems.append(
                (
                    size is None or (8 <= size <= 2048 and size % 8 == 0),
                    f"width and height must be multiples of 8 from 8 to 2048, got {size}",
                )
            )
        for ok, msg in problems:
            if not ok:
                raise ValueError(msg)


def tag_items(services: Services, prompt: str) -> tuple[str, list[MixItem], list[str]]:
    """The prompt without its ``<lora:name:w>`` tags, the tags as mix entries resolved in the catalog, and
    notes (which adapter an ambiguous name picked)."""
    clean, tags = parse_lora_tags(prompt)
    items, notes = [], []
    for tag in tags:
        record, note = find_adapter(services, tag.name)
        notes += [note] if note else []
        te, unet = tag.weights()
        if tag.is_scheduled():  # the keyframes are the strengths (loractl), te and unet apart when both given
            entry = loractl_entry(tag.te, tag.unet)
            text = entry if isinstance(entry, str) else json.dumps(entry)
            keyframed = replace(mix_item(record), weight=1.0, te=1.0, unet=1.0, schedule=check_schedule(text))
            items.append(keyframed)
        else:
            items.append(replace(mix_item(record), weight=1.0, te=te, unet=unet))
    return clean, items, notes


def fusion_args(fusion: str, params: dict[str, Any], items: Sequence[MixItem]) -> dict[str, Any]:
    """Policy parameters with the per-adapter ones (block presets, schedules) filled in from the mix."""
    if fusion not in REGISTRY:
        raise ValueError(f"unknown fusion policy {fusion!r}; known: {', '.join(policy_names())}")
    args = dict(params)
    accepted = _policy_params(fusion)
    if "blocks" in accepted and "blocks" not in args and items:
        args["blocks"] = [i.blocks for i in items]
    if "schedule" in accepted and "schedule" not in args and items:
        args["schedule"] = [schedule_entry(i.schedule) for i in items]
    return args


def gate_notes(
    services: Services, fusion: str, params: dict[str, Any], items: Sequence[MixItem]
) -> list[str]:
    """A note when a catalog gate is used with other LoRAs than those it was trained to route."""
    ref = params.get("checkpoint")
    if fusion != "gate" or services.catalog is None or not isinstance(ref, str) or not ref.strip():
        return []
    from adapters_db.gates import find_gate, routing_mismatch

    with services.catalog.session() as session:
        gate = find_gate(session, services.catalog, ref.strip())
    message = routing_mismatch(gate, [(i.name, i.sha256) for i in items]) if gate is not None else None
    return [message] if message else []


def mix_with_tags(
    services: Services, state: SessionState, req: GenerateRequest
) -> tuple[str, list[MixItem], str, list[str]]:
    """The prompt without its tags, the session's mix with the tagged adapters merged in, the fusion policy
    (keyframed tags turn ``linear`` into ``schedule``) and notes for the person."""
    clean, tagged, notes = tag_items(services, req.prompt)
    items = list(state.mix)
    for item in tagged:
        at = next((i for i, m in enumerate(items) if m.sha256 == item.sha256), None)
        if at is None:
            items.append(item)
        else:
            items[at] = replace(
                items[at], weight=item.weight, te=item.te, unet=item.unet, schedule=item.schedule
            )
        notes.append(f"prompt tag adds {item.name!r}")
    fusion = req.fusion
    keyframed = [i.name for i in tagged if i.schedule not in ("1", "1.0")]
    if fusion == "linear" and keyframed:
        fusion = "schedule"
        notes.append("keyframed prompt tags switch the fusion policy to schedule")
    elif keyframed and fusion in REGISTRY and "schedule" not in _policy_params(fusion):
        names = ", ".join(repr(n) for n in keyframed)
        notes.append(
            f"the {fusion} policy ignores the keyframes of {names} (they run at a constant weight); "
            "choose the schedule policy to follow them"
        )
    return clean, items, fusion, notes


def _policy_params(fusion: str) -> set[str]:
    """Constructor parameters of a registered policy."""
    return set(inspect.signature(REGISTRY[fusion].__init__).parameters)


def _recipe(
    services: Services, state: SessionState, req: GenerateRequest
) -> tuple[MixRecipe, list[MixItem], list[str]]:
    """The recipe, the mix entries it runs (prompt tags merged in) and notes for the person."""
    clean, items, fusion, notes = mix_with_tags(services, state, req)
    notes += gate_notes(services, fusion, req.fusion_params, items)
    seed = req.seed if req.seed >= 0 else random_seed()
    recipe = MixRecipe(
        prompt=clean,
        negative_prompt=req.negative_prompt,
        adapters=tuple(i.spec() for i in items),
        fusion=fusion,
        fusion_args=fusion_args(fusion, req.fusion_params, items),
        model=services.config.model,
        seed=seed,
        steps=req.steps,
        guidance=req.guidance,
        width=req.width,
        height=req.height,
        sampler=req.sampler,
        batch_size=req.batch_size,
        clip_skip=req.clip_skip,
    )
    return recipe, items, notes


def build_recipe(
    services: Services, state: SessionState, req: GenerateRequest
) -> tuple[MixRecipe, list[str]]:
    """The recipe for the session's mix and the request (prompt tags merged in); notes for the person."""
    recipe, _, notes = _recipe(services, state, req)
    return recipe, notes


@dataclass
class GenerateResult:
    """Images with captions, the recipe, the gate heatmap and a short report."""

    images: list[tuple[str, str]]
    recipe_json: str
    heatmap: Image.Image | None
    info: str
    state: SessionState
    entries: list[str]
    notes: list[str] = field(default_factory=list)


def caption(recipe: MixRecipe) -> str:
    """A one-line description of a recipe for gallery captions."""
    return f"seed {recipe.seed} · {recipe.fusion} · {html.mix_text(recipe.adapters)}"


def _progress(on_step: StepFn | None, done: int, total: int) -> StepFn | None:
    if on_step is None:
        return None
    return lambda i, _n: on_step(done + i, total)


def run_recipe(
    services: Services,
    recipe: MixRecipe,
    *,
    owner: str = "",
    kind: str = "generate",
    on_step: StepFn | None = None,
    cancel: Any = None,
) -> tuple[Any, Any, Image.Image | None]:
    """Generate one recipe, draw its gate heatmap, record it in the history: (generation, entry, heatmap)."""
    gen = services.engine.generate(recipe, on_step=on_step, cancel=cancel)
    heat = plots.gate_heatmap(gen.gates, gen.blocks, gen.columns)
    entry = services.history.record(gen, owner=owner, heatmap=heat, kind=kind)
    return gen, entry, heat


def report_text(gen: Any, entries: Sequence[Any]) -> str:
    """Markdown summary of a generation: timing, gates and the policy's diagnostics."""
    gates = gen.gates
    lines = [
        f"**{len(entries)} run(s)**, last took {gen.seconds:.2f} s · sampler {gen.sampler} · "
        f"{gen.width}×{gen.height} · {len(gen.layers)} adapted layers · gates {tuple(gates.shape)}"
    ]
    if gen.report:
        text = json.dumps(gen.report, default=str)
        lines.append(f"policy report: `{text[:600]}{'…' if len(text) > 600 else ''}`")
    return "\n\n".join(lines)


def generate(
    services: Services,
    state: SessionState,
    req: GenerateRequest,
    *,
    owner: str = "",
    on_step: StepFn | None = None,
    cancel: Any = None,
) -> GenerateResult:
    """Run the request ``batch_count`` times (seed, seed+1, …), record each run, return the images.

    Cancelled after some runs, it returns those (as A1111's Interrupt keeps the images made so far), with
    a note; cancelled during the first run, it raises :class:`GenerationCancelled`."""
    recipe, notes = build_recipe(services, state, req)
    total = recipe.steps * req.batch_count
    images, entries, gen, heat = [], [], None, None
    for run in range(req.batch_count):
        r = recipe.with_(seed=recipe.seed + run)
        try:
            gen, entry, heat = run_recipe(
                services, r, owner=owner, on_step=_progress(on_step, run * r.steps, total), cancel=cancel
            )
        except GenerationCancelled:
            if not entries:
                raise
            notes.append(f"cancelled after {run} of {req.batch_count} runs: showing the images made so far")
            break
        entries.append(entry)
        images += [(str(p), caption(entry.recipe)) for p in entry.images]
    assert gen is not None
    last = entries[-1]
    new = replace(state, images=tuple(p for p, _ in images), history_id=last.id)
    recipe_json = json.dumps(json.loads(pinned_recipe(last.recipe, gen.adapter_hashes).to_json()), indent=1)
    return GenerateResult(
        images, recipe_json, heat, report_text(gen, entries), new, [e.id for e in entries], notes
    )


def image_recipe(path: str) -> str:
    """The recipe embedded in a studio image, pretty-printed."""
    return json.dumps(json.loads(read_recipe(path).to_json()), indent=1)


@dataclass(frozen=True)
class Variant:
    """One cell of an A/B grid."""

    label: str
    fusion: str
    params: dict[str, Any]
    items: tuple[MixItem, ...]


def without_adapter(params: dict[str, Any], index: int, count: int) -> dict[str, Any]:
    """Policy parameters for the mix without adapter ``index`` of ``count``: its entry leaves the
    per-adapter lists, and adapter orders are renumbered."""
    out = dict(params)
    for key in MIX_OWNED_PARAMS:
        value = out.get(key)
        if is_per_adapter(value) and len(value) == count:
            out[key] = [v for i, v in enumerate(value) if i != index]
    order = out.get("order")
    if isinstance(order, list) and all(isinstance(j, int) for j in order):
        out["order"] = [j - (j > index) for j in order if j != index] or None
    return out


def ab_variants(
    items: Sequence[MixItem],
    fusion: str,
    params: dict[str, Any],
    policies: Sequence[str],
    leave_one_out: bool,
) -> list[Variant]:
    """The cells: the mix under each chosen policy, and the mix without each adapter in turn."""
    items = tuple(items)
    if not items:
        raise ValueError("add adapters to the mix (or <lora:…> tags to the prompt) before comparing")
    cells = [Variant(f"{fusion} (current)", fusion, dict(params), items)]
    for name in dict.fromkeys(policies):
        if name == fusion:
            continue
        defaults = {k: v for k, v in policy_defaults(name).items() if v is not None}
        cells.append(Variant(name, name, defaults, items))
    if leave_one_out and len(items) > 1:
        for i, item in enumerate(items):
            rest = items[:i] + items[i + 1 :]
            cells.append(
                Variant(f"without {item.name}", fusion, without_adapter(params, i, len(items)), rest)
            )
    if len(cells) < 2:
        raise ValueError("choose at least one other policy, or leave-one-out with two or more adapters")
    return cells


@dataclass
class CompareResult:
    """The A/B grid as one picture and as captioned cells."""

    grid: Image.Image
    cells: list[tuple[str, str]]
    info: str
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        """The grid's report for a Markdown component: the run, then the cells in order (their labels
        name adapters: shown as typed)."""
        return self.info + "\n\n" + " · ".join(html.md(label) for _, label in self.cells)


def ab_compare(
    services: Services,
    state: SessionState,
    req: GenerateRequest,
    policies: Sequence[str],
    leave_one_out: bool,
    *,
    owner: str = "",
    on_step: StepFn | None = None,
    cancel: Any = None,
) -> CompareResult:
    """Render the same seed with several policies or leave-one-out mixes, side by side (prompt tags
    included, as Generate runs them).

    Cancelled after some cells, it returns the grid of those, with a note (as :func:`generate` keeps the
    runs of a batch count); cancelled during the first cell, it raises :class:`GenerationCancelled`."""
    single = replace(req, batch_size=1, batch_count=1)
    base, items, notes = _recipe(services, state, single)
    cells = ab_variants(items, base.fusion, dict(req.fusion_params), policies, leave_one_out)
    total = base.steps * len(cells)
    pictures, out = [], []
    for i, cell in enumerate(cells):
        recipe = base.with_(
            fusion=cell.fusion,
            adapters=tuple(m.spec() for m in cell.items),
            fusion_args=fusion_args(cell.fusion, cell.params, cell.items),
        )
        try:
            _, entry, _ = run_recipe(
                services,
                recipe,
                owner=owner,
                kind="ab",
                on_step=_progress(on_step, i * base.steps, total),
                cancel=cancel,
            )
        except GenerationCancelled:
            if not out:
                raise
            notes.append(f"cancelled after {i} of {len(cells)} cells: showing the cells rendered so far")
            break
        pictures.append(Image.open(entry.images[0]).convert("RGB"))
        out.append((str(entry.images[0]), cell.label))
    grid = plots.labelled_grid(pictures, [label for _, label in out])
    shown = (
        f"{len(cells)} variants"
        if len(out) == len(cells)
        else f"{len(out)} of {len(cells)} variants (cancelled)"
    )
    info = f"seed {base.seed}, {shown}, {base.steps} steps each"
    return CompareResult(grid, out, info, notes)


def request_from_recipe(recipe: MixRecipe) -> GenerateRequest:
    """The Create settings that reproduce a recipe (its adapters go to the mix separately)."""
    params = {k: v for k, v in recipe.fusion_args.items() if k not in MIX_OWNED_PARAMS}
    return GenerateRequest(
        prompt=recipe.prompt,
        negative_prompt=recipe.negative_prompt,
        fusion=recipe.fusion,
        fusion_params=params,
        seed=recipe.seed,
        steps=recipe.steps,
        guidance=recipe.guidance,
        width=recipe.width,
        height=recipe.height,
        sampler=recipe.sampler,
        batch_size=recipe.batch_size,
        clip_skip=recipe.clip_skip,
    )


def mix_from_recipe(services: Services, recipe: MixRecipe) -> tuple[tuple[MixItem, ...], list[str]]:
    """Mix entries for a recipe's adapters (found in the catalog by hash), with its per-adapter settings."""
    per = {k: recipe.fusion_args.get(k) for k in MIX_OWNED_PARAMS}
    items, notes = [], []
    for i, spec in enumerate(recipe.adapters):
        try:
            record = resolve_adapter(services, f"sha256:{spec.sha256}" if spec.sha256 else spec.label)
            item = mix_item(record)
        except (LookupError, ValueError) as exc:
            notes.append(f"{spec.label!r} left out: {exc}")
            continue
        extra: dict[str, str] = {}
        for key in MIX_OWNED_PARAMS:
            value = per[key]
            picked = value[i] if isinstance(value, list) and i < len(value) else value
            if isinstance(picked, str | int | float):
                extra[key] = str(picked)
            elif isinstance(picked, dict):  # keyframes by block: the mix panel's JSON form
                extra[key] = json.dumps(picked)
        items.append(replace(item, weight=spec.weight, te=spec.te, unet=spec.unet, **extra))
    return tuple(items[:MAX_MIX]), notes
