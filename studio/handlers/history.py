"""The History tab: every generation with its recipe, searchable; replay; send back to Create."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image

from studio.handlers import generate
from studio.handlers.state import SessionState
from studio.history import HistoryEntry
from studio.services import Services

PAGE_SIZE = 24


def history_page(
    services: Services, owner: str, text: str = "", page: int = 1
) -> tuple[list[HistoryEntry], int]:
    """One page of the owner's generations (newest first) matching ``text``; (entries, total)."""
    if page < 1:
        raise ValueError("pages start at 1")
    return services.history.search(text or "", owner=owner, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)


def entry_data(entries: list[HistoryEntry]) -> list[dict[str, Any]]:
    """Plain data of history entries (the API's view of the cards)."""
    return [
        {
            "id": e.id,
            "created_at": e.created_at.isoformat(),
            "kind": e.kind,
            "prompt": e.prompt,
            "adapters": list(e.adapter_names),
            "fusion": e.recipe.fusion,
            "seed": e.recipe.seed,
            "images": [str(p) for p in e.images],
            "recipe": json.loads(e.recipe.to_json()),
        }
        for e in entries
    ]


@dataclass
class EntryView:
    """One generation opened in the History tab."""

    entry: HistoryEntry
    recipe_json: str
    files: list[str]
    info: str


def open_entry(services: Services, owner: str, entry_id: str) -> EntryView:
    """An entry's recipe, downloadable files (PNG with parameters embedded) and a summary."""
    entry = services.history.get(entry_id, owner=owner)
    files = [str(p) for p in entry.images if p.is_file()]
    missing = len(entry.images) - len(files)
    info = (
        f"**{entry.created_at:%Y-%m-%d %H:%M:%S}** · {entry.kind} · {entry.seconds:.2f} s · "
        f"model `{entry.recipe.model}` · id `{entry.id}`"
    )
    if missing:
        info += f"\n\n{missing} image file(s) of this entry are missing from the history folder."
    recipe_json = json.dumps(json.loads(entry.recipe.to_json()), indent=1)
    return EntryView(entry, recipe_json, files, info)


def same_pixels(a: str, b: str) -> bool:
    """Whether two image files hold exactly the same pixels."""
    with Image.open(a) as x, Image.open(b) as y:
        return x.size == y.size and np.array_equal(np.asarray(x.convert("RGB")), np.asarray(y.convert("RGB")))


def replay(
    services: Services,
    state: SessionState,
    owner: str,
    entry_id: str,
    *,
    on_step: Any = None,
    cancel: Any = None,
) -> tuple[generate.GenerateResult, bool | None]:
    """Run an entry's recipe again; returns the result and whether its first image is bit-identical
    (``None`` when the original is gone or the model differs)."""
    entry = services.history.get(entry_id, owner=owner)
    recipe = entry.recipe
    notes = []
    if recipe.model != services.config.model:
        notes.append(
            f"recorded with model {recipe.model!r}; replayed with the loaded {services.config.model!r}"
        )
        recipe = recipe.with_(model=services.config.model)
    gen, new, heat = generate.run_recipe(services, recipe, owner=owner, on_step=on_step, cancel=cancel)
    same = None
    if not notes and entry.images and entry.images[0].is_file():
        same = same_pixels(str(entry.images[0]), str(new.images[0]))
        notes.append(
            "the replay is bit-identical to the original"
            if same
            else "the replay differs from the original (another device, precision or library version?)"
        )
    images = [(str(p), generate.caption(new.recipe)) for p in new.images]
    recipe_json = json.dumps(json.loads(new.recipe.to_json()), indent=1)
    state = replace(state, images=tuple(p for p, _ in images), history_id=new.id)
    result = generate.GenerateResult(
        images, recipe_json, heat, generate.report_text(gen, [new]), state, [new.id], notes
    )
    return result, same


def send_to_create(
    services: Services, state: SessionState, owner: str, entry_id: str
) -> tuple[SessionState, generate.GenerateRequest, list[str]]:
    """The Create settings and mix of an entry (adapters found in the catalog by hash)."""
    entry = services.history.get(entry_id, owner=owner)
    items, notes = generate.mix_from_recipe(services, entry.recipe)
    return state.with_mix(items), generate.request_from_recipe(entry.recipe), notes
