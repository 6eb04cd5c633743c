"""The Create tab's prompt and mix: find adapters for a prompt, build and check the session's mix."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import adapters_db
from adapters_db import AdapterRecord, SearchHit
from pipelines.fusion.schedule import parse_keyframes
from pipelines.recipe import TAG_UNSAFE, finite_number, parse_lora_tags, tag_name
from studio.handlers import html
from studio.handlers.conflicts import conflict_warning, family_warnings, pair_conflict
from studio.handlers.state import MAX_MIX, MixItem, SessionState
from studio.services import Services

DEFAULT_K = 8


BLOCK_PRESETS = ("ALL", "NONE", "INS", "IND", "INALL", "MIDD", "OUTD", "OUTS", "OUTALL", "ALL0.5")


_HEX = re.compile(r"^[0-9a-fA-F]{10}$|^[0-9a-fA-F]{64}$")


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


def _by_name(session: Any, catalog: Any, name: str) -> tuple[AdapterRecord | None, str | None]:
    """The adapter whose name, file stem or tag form of its name (:func:`tag_name`) is ``name``
    (case-insensitive): local ones first, then the most downloaded; a note names the pick when several
    adapters answer to the name."""
    from adapters_db.repository import adapter_ids_named, get_adapters

    text = name.strip()
    want, key = text.lower(), tag_name(text).lower()
    ids = adapter_ids_named(session, text, tag_unsafe=TAG_UNSAFE)
    if not ids:  # names the database cannot lower-case (SQLite folds ASCII only)
        page = adapters_db.list_adapters(session, catalog, text=text, include_nsfw=True, limit=50)
        ids = [r.id for r in page.items]
    records = get_adapters(session, catalog, ids, full=True).values()

    def matches(record: AdapterRecord) -> bool:
        stems = {f.file_name.rsplit(".", 1)[0].lower() for f in record.files}
        return record.name.lower() == want or tag_name(record.name).lower() == key or want in stems

    found = sorted(
        (r for r in records if matches(r)),
        key=lambda r: (not r.has_local_file, r.kind == "gate", -r.stats.downloads, r.id),
    )
    if not found:
        return None, None
    note = None
    if len(found) > 1:
        chosen = found[0]
        where = "local, " if chosen.has_local_file else ""
        note = (
            f"{len(found)} adapters answer to {text!r}; using {chosen.name!r} (id {chosen.id}, {where}"
            f"{chosen.stats.downloads} downloads): name another by its id or hash"
        )
    return found[0], note


def find_adapter(services: Services, ref: str | int) -> tuple[AdapterRecord, str | None]:
    """A catalog adapter from an id, ``sha256:<hex>``, a SHA-256/AutoV2 hash or a name (file stem), and a
    note when the name was ambiguous (which adapter it picked)."""
    text = str(ref).strip()
    if not text:
        raise ValueError("name an adapter (its name, id or hash)")
    catalog = services.catalog
    note = None
    with catalog.session() as session:
        record = None
        if text.isdigit():
            record = adapters_db.get_adapter(session, catalog, int(text))
        elif text.lower().startswith("sha256:") or _HEX.match(text):
            record = adapters_db.find_by_hash(session, catalog, text.split(":", 1)[-1])
        if record is None:
            record, note = _by_name(session, catalog, text)
    if record is None:
        raise LookupError(f"no adapter {text!r} in the catalog")
    return record, note


def resolve_adapter(services: Services, ref: str | int) -> AdapterRecord:
    """A catalog adapter from an id, ``sha256:<hex>``, a SHA-256/AutoV2 hash or a name (file stem)."""
    return find_adapter(services, ref)[0]


def mix_item(record: AdapterRecord, weight: float = 1.0) -> MixItem:
    """A mix entry for a catalog adapter with a local file."""
    if record.kind == "gate":
        raise ValueError(
            f"{record.name!r} is a gate checkpoint, not a LoRA: choose it under the fusion policy `gate`"
        )
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
        a1111_name=Path(chosen.file_name).stem if chosen.file_name else "",
    )


def add_adapter(
    services: Services, state: SessionState, ref: str | int, weight: float = 1.0
) -> tuple[SessionState, list[str]]:
    """Add a catalog adapter to the mix; returns the new state and warnings about the mix."""
    weight = finite_number(weight, "the weight")
    record, note = find_adapter(services, ref)
    notes = [note] if note else []
    item = mix_item(record, weight)
    if state.index_of(item.sha256) is not None:
        return state, [*notes, f"{record.name!r} is already in the mix"]
    if len(state.mix) >= MAX_MIX:
        raise ValueError(f"the mix holds at most {MAX_MIX} adapters; remove one first")
    new = state.with_mix((*state.mix, item))
    return new, notes + mix_warnings(services, new)


def remove_adapter(state: SessionState, index: int) -> SessionState:
    """The mix without entry ``index``."""
    if not 0 <= int(index) < len(state.mix):
        raise IndexError(f"the mix has no entry {index}")
    return state.with_mix(tuple(m for i, m in enumerate(state.mix) if i != int(index)))


def clear_mix(state: SessionState) -> SessionState:
    """An empty mix."""
    return state.with_mix(())


def check_schedule(text: str) -> str:
    """A loractl keyframe string, validated (``1``, ``1@0,0.2@1``), or keyframes by block as a JSON
    object (``{"BASE": "1", "default": "0@0,1@1"}``: what a tag's separate ``te``/``unet`` weights become)."""
    value = (text or "1").strip()
    for frames in schedule_entry(value).values() if value.startswith("{") else (value,):
        parse_keyframes(frames)
    return value


def schedule_entry(text: str) -> str | dict[str, str]:
    """A mix entry's schedule as the ``schedule`` policy takes it: keyframe text, or a dict by block."""
    text = (text or "1").strip()
    if not text.startswith("{"):
        return text
    try:
        frames = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"schedule {text!r} is neither keyframes nor a JSON object: {exc.msg}") from None
    if not isinstance(frames, dict) or not all(isinstance(v, str | int | float) for v in frames.values()):
        raise ValueError(f'schedule {text!r}: a JSON object of keyframes by block, e.g. {{"BASE": "1"}}')
    return {str(k): str(v) for k, v in frames.items()}


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
        weight=finite_number(weight, "the weight"),
        te=finite_number(te, "the text-encoder strength"),
        unet=finite_number(unet, "the UNet strength"),
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
            if first.family and second.family and first.family != second.family:
                continue  # made for different models: the family warning says it, layers do not compare
            try:
                warning = _conflicts(services, first, second)
            except (OSError, ValueError) as exc:
                warning = f"could not compare {first.name!r} and {second.name!r}: {exc}"
            if warning:
                out.append(warning)
    return out


def slot_title(index: int, item: MixItem) -> str:
    """The Markdown title of mix entry ``index``: number, name, base family and trigger words (catalog
    text, shown as typed)."""
    triggers = ", ".join(html.md_code(w) for w in item.trigger_words[:4]) or "no trigger words"
    return f"**{index + 1}. {html.md(item.name)}** · {html.md(item.family or 'unknown base')} · {triggers}"


def warnings_markdown(warnings: Sequence[str]) -> str:
    """The mix's warnings as Markdown lines (they quote adapter names: shown as typed)."""
    return "\n\n".join(f"⚠️ {html.md(w)}" for w in warnings)


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
