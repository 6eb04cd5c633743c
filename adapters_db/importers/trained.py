"""Adapters made by the studio's own trainer: the file, its training captions and sample images."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from adapters_db.dto import AdapterRecord
from adapters_db.importers.files import import_file
from adapters_db.importers.sidecars import Sidecars, image_parameters
from adapters_db.repository import add_version, get_adapter
from adapters_db.specs import ImageSpec, VersionSpec
from adapters_db.vectors import embed_missing

if TYPE_CHECKING:
    from adapters_db.catalog import Catalog


class RegistrationError(ValueError):
    """The trainer's output could not be catalogued (the message says why)."""


def _sample_specs(catalog: Catalog, images: Sequence[Path], prompts: Sequence[str]) -> list[ImageSpec]:
    out = []
    for i, path in enumerate(images):
        path = Path(path)
        params = image_parameters(path)
        if not params:
            raise RegistrationError(f"{path}: not a readable image")
        stored = catalog.store.put_file(path, kind="images", ext=path.suffix.lower())
        prompt = prompts[i] if i < len(prompts) else params.get("prompt") or None
        out.append(
            ImageSpec(
                local_sha256=stored.sha256,
                local_ext=path.suffix.lower(),
                width=params["_width"],
                height=params["_height"],
                prompt=prompt,
                kind="sample",
            )
        )
    return out


def register_trained_adapter(
    session: Session,
    catalog: Catalog,
    path: Path,
    captions: list[str],
    sample_images: list[Path],
    *,
    sample_prompts: Sequence[str] = (),
    embed: bool = True,
    **meta: Any,
) -> AdapterRecord:
    """Catalog a LoRA the trainer wrote: store the file, keep its captions (they feed the prompt
    channel of retrieval) and sample images, and embed them in the caller's transaction.

    ``meta`` takes what :func:`import_file` takes (name, trigger_words, base_family, tags, …).
    Raises :class:`RegistrationError` if the file cannot be imported; registering the same bytes
    twice returns the existing adapter.
    """
    result = import_file(
        session, catalog, Path(path), sidecars=Sidecars(), source=meta.pop("source", "trained"), **meta
    )
    if result.status == "duplicate" and result.adapter_id is not None:
        record = get_adapter(session, catalog, result.adapter_id)
        assert record is not None
        return record
    if not result.ok or result.adapter_id is None:
        raise RegistrationError(result.message or f"{path}: could not be registered")
    record = get_adapter(session, catalog, result.adapter_id)
    assert record is not None and record.versions
    images = [ImageSpec(prompt=c.strip(), kind="caption") for c in captions if c and c.strip()]
    images += _sample_specs(catalog, sample_images, sample_prompts)
    if images:
        add_version(session, record.id, VersionSpec(images=tuple(images)), merge_into=record.versions[0].id)
    if embed:
        embed_missing(catalog, session=session, adapter_ids={record.id})
    final = get_adapter(session, catalog, record.id)
    assert final is not None
    return final
