"""Shared importer machinery: the error base class, per-item savepoints, progress bars."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from adapters_db.dto import ImportResult

log = logging.getLogger(__name__)
T = TypeVar("T")

# Test hook: ``ADAPTERS_DB_CRASH_AT=after_store_write`` kills the process right after a file landed
# in the store and before the catalog rows are committed (the crash-safety test uses it).
CRASH_ENV = "ADAPTERS_DB_CRASH_AT"


class ImportErrorBase(ValueError):
    """An item that cannot be imported; the message says what is wrong with it."""


class DuplicateError(ImportErrorBase):
    """The same bytes are already catalogued."""


# What one bad item may raise and ``run_item`` reports as its failure: also RuntimeError (torch or
# safetensors failing on one file) and ArithmeticError (SQLite's bare OverflowError for a huge number).
ITEM_ERRORS = (
    ImportErrorBase,
    ValueError,
    OSError,
    KeyError,
    TypeError,
    RuntimeError,
    ArithmeticError,
    SQLAlchemyError,
)


def crash_point(name: str) -> None:
    """Exit immediately (no cleanup, like a kill) if ``$ADAPTERS_DB_CRASH_AT`` names this point."""
    if os.environ.get(CRASH_ENV) == name:
        os._exit(17)


def inspect_lora(path: Path) -> Any:
    """``pipelines.lora_formats.inspect`` (header only) plus the finiteness check ``load`` makes, one tensor
    at a time: a LoRA holding NaN or Inf is refused before it reaches the store."""
    from safetensors import SafetensorError, safe_open

    from pipelines.lora_formats import NotSafetensorsError, inspect
    from pipelines.lora_formats.errors import LoraFormatError, in_file
    from pipelines.lora_formats.safetensors_io import check_finite

    info = inspect(path)
    try:
        with safe_open(str(info.path), framework="pt", device="cpu") as fh:
            for name in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                check_finite({name: fh.get_tensor(name)})
    except LoraFormatError as exc:
        raise in_file(exc, info.path) from exc
    except SafetensorError as exc:
        raise NotSafetensorsError(f"{info.path}: could not read tensor data: {exc}") from exc
    return info


def progress(items: Iterable[T], show: bool, total: int | None = None, desc: str = "") -> Iterator[T]:
    """Iterate with a tqdm bar on stderr when ``show``."""
    if not show:
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, total=total, desc=desc, unit="item")


def run_item(
    session: Session,
    where: str,
    work: Callable[[], ImportResult],
    on_failure: Callable[[], None] | None = None,
) -> ImportResult:
    """Run one item's import inside a savepoint: on any error roll it back and report it as failed."""
    nested = session.begin_nested()
    try:
        result = work()
        nested.commit()
    except ITEM_ERRORS as exc:
        if nested.is_active:
            nested.rollback()
        if on_failure is not None:
            on_failure()
        log.info("import of %s failed: %s", where, exc)
        return ImportResult(source=where, status="failed", message=f"{type(exc).__name__}: {exc}")
    return ImportResult(
        source=where,
        status=result.status,
        adapter_id=result.adapter_id,
        name=result.name,
        sha256=result.sha256,
        message=result.message,
    )
