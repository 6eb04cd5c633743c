"""The Create tab: find adapters for a prompt, build a mix, choose a fusion policy, generate, compare."""

from __future__ import annotations

import contextlib
import inspect
import json
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from PIL import Image

import adapters_db
from adapters_db import AdapterRecord, SearchHit
from pipelines.fusion import REGISTRY
from pipelines.fusion.schedule import keyframe_value, parse_keyframes
from pipelines.models import SAMPLERS
from pipelines.pngmeta import pinned_recipe, read_recipe
from pipelines.recipe import MixRecipe, parse_lora_tags
from studio.handlers import html, plots
from studio.handlers.conflicts import conflict_warning, family_warnings, pair_conflict
from studio.handlers.state import MAX_MIX, MixItem, SessionState
from studio.services import Services

DEFAULT_K = 8
BLOCK_PRESETS = ("ALL", "NONE", "INS", "IND", "INALL", "MIDD", "OUTD", "OUTS", "OUTALL", "ALL0.5")
MIX_OWNED_PARAMS = ("blocks", "schedule")  # per-adapter settings that live in the mix panel
HIDDEN_PARAMS = ("network", "force")  # constructor arguments for code, not people
MODEL_SAMPLER = "model default"
StepFn = Callable[[int, int], None]
_HEX = re.compile(r"^[0-9a-fA-F]{10}$|^[0-9a-fA-F]{64}$")


# ------------------------------------------------------------------------------------------ search
def model_family(services: Services) -> str | None:
    """Base family of the loaded model when the catalog knows it (``None``: do not filter)."""
    family = services.model_info().family
    return family if family in adapters_db.FAMILIES else None


def strip_tags(prompt: str) -> str:
    """The prompt without A1111 ``<lora:…>`` tags (malformed tags are dropped too)."""
    try:
        return parse_lora_tags(prompt)[0]
    except ValueError:
        return re.sub(r"<(lora|lyco):[^>]*>", "", prompt, flags=re.IGNORECASE).strip()


def search_adapters(services: Services, prompt: str, k: int = DEFAULT_K) -> list[SearchHit]:
    """The catalog's best adapters for a prompt, for the loaded model's base family."""
    text = strip_tags(prompt)
    if not text.strip():
        return []
    if not 1 <= int(k) <= 100:
        raise ValueError(f"ask for 1 to 100 adapters, not {k}")
    with services.catalog.session() as session:
        return adapters_db.search(session, services.catalog, text, int(k), base_family=model_family(services))


def hit_data(hits: Sequence[SearchHit]) -> list[dict[str, Any]]:
    """Plain data of search hits (the API's view of the cards)."""
    return [
        {
            "id": h.adapter.id,
            "name": h.adapter.name,
            "base_model": h.adapter.base_model or h.adapter.base_family,
            "score": round(h.score, 4),
            "why": h.why,
            "trigger_words": list(h.adapter.trigger_words),
            "local": h.adapter.has_local_file,
        }
        for h in hits
    ]


def remember_hits(state: SessionState, hits: Sequence[SearchHit]) -> SessionState:
    """The state with the ids of the cards now shown."""
    return replace(state, hits=tuple((h.adapter.id, h.why) for h in hits))


def mix_ids(state: SessionState) -> list[int]:
    """Catalog ids of the adapters in the mix."""
    return [i.adapter_id for i in state.mix if i.adapter_id is not None]


def mix_data(state: SessionState) -> list[dict[str, Any]]:
    """Plain data of the mix (the API's view of the mix panel)."""
    return [
        {
            "name": m.name,
            "adapter_id": m.adapter_id,
            "sha256": m.sha256,
            "weight": m.weight,
            "te": m.te,
            "unet": m.unet,
            "blocks": m.blocks,
            "schedule": m.schedule,
            "family": m.family,
        }
        for m in state.mix
    ]


def hit_cards_html(services: Services, state: SessionState) -> str:
    """The search cards of the state's last search, re-rendered (so "in the mix" marks are current)."""
    if not state.hits:
        return html.message("Type a prompt: matching adapters appear here.")
    from adapters_db.repository import get_adapters

    ids = [i for i, _ in state.hits]
    with services.catalog.session() as session:
        records = get_adapters(session, services.catalog, ids)
    shown = [records[i] for i in ids if i in records]
    return html.record_cards(shown, mix_ids(state), dict(state.hits), empty="No matching adapters.")


# ---------------------------------------------------------------------------------- resolving refs
def _by_name(session: Any, catalog: Any, name: str) -> AdapterRecord | None:
    """An adapter whose name or file stem is ``name`` (case-insensitive), preferring local ones."""
    want = name.strip().lower()
    page = adapters_db.list_adapters(session, catalog, text=name, include_nsfw=True, limit=50)
    candidates = list(page.items)
    if not candidates:
        return None
    full = [adapters_db.get_adapter(session, catalog, r.id) for r in candidates]
    for record in sorted((r for r in full if r is not None), key=lambda r: not r.has_local_file):
        stems = {f.file_name.rsplit(".", 1)[0].lower() for f in record.files}
        if record.name.lower() == want or want in stems:
            return record
    return None


def resolve_adapter(services: Services, ref: str | int) -> AdapterRecord:
    """A catalog adapter from an id, ``sha256:<hex>``, a SHA-256/AutoV2 hash or a name (file stem)."""
    text = str(ref).strip()
    if not text:
        raise ValueError("name an adapter (its name, id or hash)")
    catalog = services.catalog
    with catalog.session() as session:
        record = None
        if text.isdigit():
            record = adapters_db.get_adapter(session, catalog, int(text))
        elif text.lower().startswith("sha256:") or _HEX.match(text):
            record = adapters_db.find_by_hash(session, catalog, text.split(":", 1)[-1])
        if record is None:
            record = _by_name(session, catalog, text)
    if record is None:
        raise LookupError(f"no adapter {text!r} in the catalog")
    return record


def mix_item(record: AdapterRecord, weight: float = 1.0) -> MixItem:
    """A mix entry for a catalog adapter with a local file."""
    local = [f for f in record.files if f.is_local and f.sha256]
    if not local:
        raise ValueError(
            f"{record.name!r} is only listed in the catalog (no local file): import or download "
            "its file first"
        )
    chosen = next((f for f in local if f.primary), local[0])
    preferred = record.extra.get("preferred_weight")
    with contextlib.suppress(TypeError, ValueError):
        weight = float(preferred) if preferred not in (None, "") and weight == 1.0 else weight
    return MixItem(
        name=record.name,
        sha256=str(chosen.sha256),
        adapter_id=record.id,
        family=record.base_family,
        trigger_words=tuple(record.trigger_words),
        weight=weight,
    )


# --------------------------------------------------------------------------------------- the mix
def add_adapter(
    services: Services, state: SessionState, ref: str | int, weight: float = 1.0
) -> tuple[SessionState, list[str]]:
    """Add a catalog adapter to the mix; returns the new state and warnings about the mix."""
    record = resolve_adapter(services, ref)
    item = mix_item(record, weight)
    if state.index_of(item.sha256) is not None:
        return state, [f"{record.name!r} is already in the mix"]
    if len(state.mix) >= MAX_MIX:
        raise ValueError(f"the mix holds at most {MAX_MIX} adapters; remove one first")
    new = state.with_mix((*state.mix, item))
    return new, mix_warnings(services, new)


def remove_adapter(state: SessionState, index: int) -> SessionState:
    """The mix without entry ``index``."""
    if not 0 <= int(index) < len(state.mix):
        raise IndexError(f"the mix has no entry {index}")
    return state.with_mix(tuple(m for i, m in enumerate(state.mix) if i != int(index)))


def clear_mix(state: SessionState) -> SessionState:
    """An empty mix."""
    return state.with_mix(())


def check_schedule(text: str) -> str:
    """A loractl keyframe string, validated (``1``, ``1@0,0.2@1``)."""
    value = (text or "1").strip()
    parse_keyframes(value)
    return value


def check_blocks(text: str) -> str:
    """A block preset name or an LBW vector (``1,0,0.5,…``), checked for form (its length is checked
    against the model when the blocks policy runs)."""
    value = (text or "ALL").strip()
    if re.fullmatch(r"[\s\d.,+-]+", value):
        if len([v for v in value.split(",") if v.strip()]) < 2:
            raise ValueError(f"a block-weight vector needs one value per block, got {value!r}")
        return value
    if value.upper() not in BLOCK_PRESETS:
        raise ValueError(f"unknown block preset {value!r}; use one of {', '.join(BLOCK_PRESETS)} or a vector")
    return value.upper()


def update_adapter(
    state: SessionState,
    index: int,
    *,
    weight: float,
    te: float,
    unet: float,
    blocks: str = "ALL",
    schedule: str = "1",
) -> SessionState:
    """Change the strengths and per-adapter policy settings of mix entry ``index``."""
    if not 0 <= int(index) < len(state.mix):
        raise IndexError(f"the mix has no entry {index}")
    item = replace(
        state.mix[int(index)],
        weight=float(weight),
        te=float(te),
        unet=float(unet),
        blocks=check_blocks(blocks),
        schedule=check_schedule(schedule),
    )
    mix = list(state.mix)
    mix[int(index)] = item
    return state.with_mix(tuple(mix))


def _conflicts(services: Services, first: MixItem, second: MixItem) -> str | None:
    """The (memoised) conflict warning of two adapters."""
    key = ("conflict", first.sha256, second.sha256)
    if key not in services.memo:
        resolve = services.engine.adapter_path
        a = services.cache.host(resolve(first.spec()))[1]
        b = services.cache.host(resolve(second.spec()))[1]
        services.memo[key] = conflict_warning(pair_conflict((first.name, a), (second.name, b)))
    return services.memo[key]


def mix_warnings(services: Services, state: SessionState) -> list[str]:
    """Family mismatches and conflicting layers of the current mix."""
    out = family_warnings(services.model_info().family, [(m.name, m.family) for m in state.mix])
    for i, first in enumerate(state.mix):
        for second in state.mix[i + 1 :]:
            try:
                warning = _conflicts(services, first, second)
            except (OSError, ValueError) as exc:
                warning = f"could not compare {first.name!r} and {second.name!r}: {exc}"
            if warning:
                out.append(warning)
    return out


def insert_triggers(prompt: str, state: SessionState) -> str:
    """The prompt with the trigger words of the mix's adapters appended (those not already in it)."""
    words = [w for item in state.mix for w in item.trigger_words[:3]]
    present = prompt.lower()
    missing = [w for w in dict.fromkeys(words) if w.lower() not in present]
    if not missing:
        return prompt
    return ", ".join(p for p in (prompt.strip().rstrip(","), *missing) if p)


def auto_mix(
    services: Services, state: SessionState, prompt: str, max_adapters: int = 3, ratio: float = 0.6
) -> tuple[SessionState, str, list[str]]:
    """Compose a mix from retrieval: the best local hits scoring within ``ratio`` of the best (relative to
    the weakest candidate), weighted by score; returns (state, fusion policy, notes)."""
    hits = [
        h
        for h in search_adapters(services, prompt, max(DEFAULT_K, max_adapters * 3))
        if h.adapter.has_local_file
    ]
    if not hits:
        raise LookupError("no local adapter in the catalog matches this prompt")
    floor = min(h.score for h in hits)
    top = hits[0].score - floor or 1.0
    chosen = [h for h in hits if (h.score - floor) / top >= ratio][:max_adapters] or hits[:1]
    items = []
    for h in chosen:
        rel = (h.score - floor) / top
        items.append(mix_item(resolve_adapter(services, h.adapter.id), weight=round(0.6 + 0.4 * rel, 2)))
    fusion = "linear" if len(items) == 1 else "orthogonal"
    new = remember_hits(state.with_mix(tuple(items[:MAX_MIX])), hits)
    notes = [f"auto mix: {', '.join(f'{i.name} ({i.weight:g})' for i in items)} with the {fusion} policy"]
    return new, fusion, notes + mix_warnings(services, new)


# -------------------------------------------------------------------------------- fusion policies
def policy_names() -> list[str]:
    """Registered fusion policies (``linear`` first)."""
    return sorted(REGISTRY, key=lambda n: (n != "linear", n))


def policy_defaults(name: str) -> dict[str, Any]:
    """The parameters a person may set for a policy, with their defaults (per-adapter ones excluded)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown fusion policy {name!r}; known: {', '.join(policy_names())}")
    out: dict[str, Any] = {}
    for pname, param in inspect.signature(REGISTRY[name].__init__).parameters.items():
        if pname == "self" or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        if pname in MIX_OWNED_PARAMS or pname in HIDDEN_PARAMS:
            continue
        default = None if param.default is inspect.Parameter.empty else param.default
        out[pname] = default
    return out


def parse_params(text: str | dict[str, Any] | None) -> dict[str, Any]:
    """Policy parameters from their JSON text (an object)."""
    if isinstance(text, dict):
        return dict(text)
    if not text or not str(text).strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the policy parameters are not valid JSON: {exc.msg} (line {exc.lineno})") from exc
    if not isinstance(value, dict):
        raise ValueError('the policy parameters must be a JSON object like {"period": 2}')
    return value


def set_param(text: str, key: str, value: Any) -> str:
    """The parameters JSON with one key changed (``None``/empty removes nothing, it sets null)."""
    params = parse_params(text)
    if key == "order" and isinstance(value, str):
        value = [int(v) for v in re.split(r"[,\s]+", value.strip()) if v] or None
    params[key] = value
    return json.dumps(params)


def schedule_preview(state: SessionState, steps: int) -> Image.Image | None:
    """Weight curves of the mix's adapters under the schedule policy."""
    curves = []
    for item in state.mix:
        frames = parse_keyframes(item.schedule)
        curves.append(
            (item.name, [item.weight * keyframe_value(frames, s, steps) for s in range(max(1, steps))])
        )
    return plots.schedule_curves(curves)


# ------------------------------------------------------------------------------------- generating
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

    def __post_init__(self) -> None:
        problems = [
            (1 <= self.steps <= 150, f"steps must be 1 to 150, got {self.steps}"),
            (0 <= self.guidance <= 30, f"guidance must be 0 to 30, got {self.guidance}"),
            (1 <= self.batch_size <= 8, f"batch size must be 1 to 8, got {self.batch_size}"),
            (1 <= self.batch_count <= 16, f"batch count must be 1 to 16, got {self.batch_count}"),
            (self.seed >= -1, f"seed must be ≥ 0 (or -1 for random), got {self.seed}"),
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


def tag_items(services: Services, prompt: str) -> tuple[str, list[MixItem]]:
    """The prompt without its ``<lora:name:w>`` tags, and the tags as mix entries resolved in the catalog."""
    clean, tags = parse_lora_tags(prompt)
    items = []
    for tag in tags:
        record = resolve_adapter(services, tag.name)
        te, unet = tag.weights()
        if tag.is_scheduled():
            items.append(replace(mix_item(record), schedule=check_schedule(tag.te)))
        else:
            items.append(replace(mix_item(record), weight=1.0, te=te, unet=unet))
    return clean, items


def fusion_args(fusion: str, params: dict[str, Any], items: Sequence[MixItem]) -> dict[str, Any]:
    """Policy parameters with the per-adapter ones (block presets, schedules) filled in from the mix."""
    if fusion not in REGISTRY:
        raise ValueError(f"unknown fusion policy {fusion!r}; known: {', '.join(policy_names())}")
    args = dict(params)
    accepted = inspect.signature(REGISTRY[fusion].__init__).parameters
    if "blocks" in accepted and "blocks" not in args and items:
        args["blocks"] = [i.blocks for i in items]
    if "schedule" in accepted and "schedule" not in args and items:
        args["schedule"] = [i.schedule for i in items]
    return args


def build_recipe(
    services: Services, state: SessionState, req: GenerateRequest
) -> tuple[MixRecipe, list[str]]:
    """The recipe for the session's mix and the request (prompt tags merged in); notes for the person."""
    clean, tagged = tag_items(services, req.prompt)
    items = list(state.mix)
    notes = []
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
    if fusion == "linear" and any(i.schedule not in ("1", "1.0") for i in tagged):
        fusion = "schedule"
        notes.append("keyframed prompt tags switch the fusion policy to schedule")
    seed = req.seed if req.seed >= 0 else secrets.randbelow(2**32)
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
    )
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
    mix = ", ".join(f"{a.label} {a.weight:g}" for a in recipe.adapters) or "no adapters"
    return f"seed {recipe.seed} · {recipe.fusion} · {mix}"


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
    """Run the request ``batch_count`` times (seed, seed+1, …), record each run, return the images."""
    recipe, notes = build_recipe(services, state, req)
    total = recipe.steps * req.batch_count
    images, entries, gen, heat = [], [], None, None
    for run in range(req.batch_count):
        r = recipe.with_(seed=recipe.seed + run)
        gen, entry, heat = run_recipe(
            services, r, owner=owner, on_step=_progress(on_step, run * r.steps, total), cancel=cancel
        )
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


# ------------------------------------------------------------------------------------------- A/B
@dataclass(frozen=True)
class Variant:
    """One cell of an A/B grid."""

    label: str
    fusion: str
    params: dict[str, Any]
    items: tuple[MixItem, ...]


def ab_variants(
    state: SessionState, req: GenerateRequest, policies: Sequence[str], leave_one_out: bool
) -> list[Variant]:
    """The cells: the current mix under each chosen policy, and the mix without each adapter in turn."""
    items = tuple(state.mix)
    if not items:
        raise ValueError("add adapters to the mix before comparing")
    cells = [Variant(f"{req.fusion} (current)", req.fusion, dict(req.fusion_params), items)]
    for name in dict.fromkeys(policies):
        if name == req.fusion:
            continue
        params = {k: v for k, v in policy_defaults(name).items() if v is not None}
        cells.append(Variant(name, name, params, items))
    if leave_one_out and len(items) > 1:
        for i, item in enumerate(items):
            rest = items[:i] + items[i + 1 :]
            cells.append(Variant(f"without {item.name}", req.fusion, dict(req.fusion_params), rest))
    if len(cells) < 2:
        raise ValueError("choose at least one other policy, or leave-one-out with two or more adapters")
    return cells


@dataclass
class CompareResult:
    """The A/B grid as one picture and as captioned cells."""

    grid: Image.Image
    cells: list[tuple[str, str]]
    info: str


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
    """Render the same seed with several policies or leave-one-out mixes, side by side."""
    cells = ab_variants(state, req, policies, leave_one_out)
    single = replace(req, batch_size=1, batch_count=1)
    base, _ = build_recipe(services, state, single)
    total = base.steps * len(cells)
    pictures, out = [], []
    for i, cell in enumerate(cells):
        recipe = base.with_(
            fusion=cell.fusion,
            adapters=tuple(m.spec() for m in cell.items),
            fusion_args=fusion_args(cell.fusion, cell.params, cell.items),
        )
        _, entry, _ = run_recipe(
            services,
            recipe,
            owner=owner,
            kind="ab",
            on_step=_progress(on_step, i * base.steps, total),
            cancel=cancel,
        )
        pictures.append(Image.open(entry.images[0]).convert("RGB"))
        out.append((str(entry.images[0]), cell.label))
    grid = plots.labelled_grid(pictures, [label for _, label in out])
    return CompareResult(grid, out, f"seed {base.seed}, {len(cells)} variants, {base.steps} steps each")


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
        items.append(replace(item, weight=spec.weight, te=spec.te, unet=spec.unet, **extra))
    return tuple(items[:MAX_MIX]), notes
