"""Local LoRA files: one ``.safetensors`` (``import_file``) or an A1111/ComfyUI ``models/Lora`` tree
(``import_folder``) with previews and sidecars.

Header metadata, trigger words and base family come from ``pipelines.lora_formats.inspect`` (the
same reader the engine uses); weights holding NaN or Inf are refused, as ``load`` refuses them. Bytes
go to the content-addressed store (atomic, deduplicated by SHA-256) before the rows are written; a
crash in between leaves an unreferenced blob that the catalog never shows and that a re-import
reuses or garbage collection removes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from adapters_db.dto import ImportResult, ImportSummary, LicenceFlags
from adapters_db.families import family_from_civitai, normalize_family
from adapters_db.importers.civitai import image_spec
from adapters_db.importers.common import (
    DuplicateError,
    ImportErrorBase,
    crash_point,
    inspect_lora,
    progress,
    run_item,
)
from adapters_db.importers.sidecars import (
    IMAGE_EXTS,
    LORA_EXTS,
    REFUSED_EXTS,
    Sidecars,
    find_sidecars,
    image_parameters,
)
from adapters_db.models import AdapterFile, AdapterVersion
from adapters_db.repository import add_version, attach_local_file, write_adapter
from adapters_db.specs import AdapterSpec, FileSpec, ImageSpec, VersionSpec
from adapters_db.store import StoredFile

if TYPE_CHECKING:
    from adapters_db.catalog import Catalog

MAX_HEADER_TRIGGERS = 12
MAX_METADATA_VALUE = 65_536


class UnsupportedFileError(ImportErrorBase):
    """Not a file this importer takes (pickled checkpoint, unknown extension, a folder)."""


def _check_path(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if not path.is_file():
        raise UnsupportedFileError(f"{path}: not a file (import a folder with import_folder)")
    suffix = path.suffix.lower()
    if suffix in REFUSED_EXTS:
        raise UnsupportedFileError(
            f"{path}: pickled checkpoints ({suffix}) are refused unopened; convert it to .safetensors"
        )
    if suffix not in LORA_EXTS:
        raise UnsupportedFileError(f"{path}: unknown file type {suffix or '(none)'!r}; expected .safetensors")


def _header_metadata(metadata: dict[str, str]) -> dict[str, str]:
    return {k: (v if len(v) <= MAX_METADATA_VALUE else v[:MAX_METADATA_VALUE]) for k, v in metadata.items()}


def _file_spec(path: Path, stored: StoredFile, info: Any, file_name: str | None = None) -> FileSpec:
    return FileSpec(
        file_name=file_name or path.name,
        sha256=stored.sha256,
        size_bytes=stored.size_bytes,
        hashes={"SHA256": stored.sha256.upper(), "AutoV2": stored.autov2},
        format=info.format,
        primary=True,
        stored=True,
        header_metadata=_header_metadata(dict(info.metadata)),
        rank=info.rank or None,
        num_modules=info.num_modules,
        components=tuple(sorted(info.components)),
    )


def _preview_specs(catalog: Catalog, previews: Sequence[Path]) -> tuple[ImageSpec, ...]:
    out = []
    for path in previews:
        params = image_parameters(path)
        if not params:
            continue  # not an image PIL can read: skip the preview, keep the LoRA
        stored = catalog.store.put_file(path, kind="images", ext=path.suffix.lower())
        prompt = params.pop("prompt", None) or None
        negative = params.pop("negativePrompt", None) or None
        width, height = params.pop("_width", None), params.pop("_height", None)
        out.append(
            ImageSpec(
                local_sha256=stored.sha256,
                local_ext=path.suffix.lower(),
                width=width,
                height=height,
                prompt=prompt,
                negative_prompt=negative,
                params=params,
            )
        )
    return tuple(out)


def _first(*values: Any) -> Any:
    return next((v for v in values if v), None)


def _split_words(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = value.split(",")
    return tuple(w.strip() for w in value or () if isinstance(w, str) and w.strip())


def local_spec(
    path: Path,
    info: Any,
    file: FileSpec,
    sidecars: Sidecars,
    images: tuple[ImageSpec, ...],
    extra: dict[str, Any],
) -> AdapterSpec:
    """Build the spec of a local file from (in priority order) explicit arguments, a ``.civitai.info``,
    the A1111 user metadata / description sidecars and the safetensors header."""
    meta, civ, user = dict(info.metadata), sidecars.civitai_info or {}, sidecars.user_metadata
    model = civ.get("model") if isinstance(civ.get("model"), dict) else {}
    header_family = info.family if info.family in ("sd1", "sd2", "sdxl", "pocket") else None
    family = _first(
        normalize_family(extra.get("base_family")) if extra.get("base_family") else None,
        header_family,
        family_from_civitai(civ.get("baseModel")),
        _user_family(user.get("sd version")),
    )
    triggers = (
        _first(
            _split_words(extra.get("trigger_words")),
            _split_words(civ.get("trainedWords")),
            _split_words(user.get("activation text")),
            tuple(info.trigger_words[:MAX_HEADER_TRIGGERS]),
        )
        or ()
    )
    description = _first(
        extra.get("description_html"),
        model.get("description"),
        civ.get("description"),
        sidecars.description,
        user.get("description"),
        meta.get("modelspec.description"),
    )
    civ_images = tuple(image_spec(im) for im in civ.get("images") or [] if isinstance(im, dict))
    version = VersionSpec(
        name=str(
            _first(extra.get("version_name"), civ.get("name"), meta.get("ss_training_comment"), "local")
        )[:400],
        civitai_version_id=civ.get("id") if isinstance(civ.get("id"), int) else None,
        base_model=_first(civ.get("baseModel"), meta.get("ss_base_model_version"), header_family),
        base_family=family,
        description_html=str(civ.get("description") or ""),
        download_url=civ.get("downloadUrl"),
        trigger_words=triggers,
        files=(file,),
        images=images + civ_images,
    )
    tags = tuple(extra.get("tags") or ()) or _split_words(meta.get("modelspec.tags")) + _split_words(
        model.get("tags")
    )
    return AdapterSpec(
        name=str(
            _first(
                extra.get("name"),
                model.get("name"),
                meta.get("modelspec.title"),
                meta.get("ss_output_name"),
                Path(file.file_name).stem,
            )
        ),
        source=str(extra.get("source") or ("civitai" if civ else "local")),
        kind=str(extra.get("kind") or "lora"),
        description_html=str(description or ""),
        base_family=family,
        base_model=version.base_model,
        nsfw_level=int(extra.get("nsfw_level", 2 if model.get("nsfw") else 0)),
        creator=_first(extra.get("creator"), meta.get("modelspec.author")),
        civitai_model_id=civ.get("modelId") if isinstance(civ.get("modelId"), int) else None,
        hf_repo=extra.get("hf_repo"),
        source_url=extra.get("source_url"),
        licence=extra.get("licence") or LicenceFlags(license=meta.get("modelspec.license") or None),
        tags=tuple(t.lower() for t in tags),
        versions=(version,),
        extra={"preferred_weight": user.get("preferred weight")} if user.get("preferred weight") else {},
    )


def _user_family(value: Any) -> str | None:
    mapping = {"sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl"}
    return mapping.get(str(value or "").strip().lower())


def _existing_file(session: Session, sha256: str) -> AdapterFile | None:
    return session.execute(
        select(AdapterFile).where(AdapterFile.sha256 == sha256).order_by(AdapterFile.stored.desc()).limit(1)
    ).scalar_one_or_none()


def _import_file(
    session: Session,
    catalog: Catalog,
    path: Path,
    sidecars: Sidecars | None,
    extra: dict[str, Any],
    written: list[StoredFile],
) -> ImportResult:
    _check_path(path)
    info = inspect_lora(path)
    stored = catalog.store.put_file(path)
    written.append(stored)
    crash_point("after_store_write")
    existing = _existing_file(session, stored.sha256)
    if existing is not None and existing.stored:
        adapter_id = existing.version.adapter_id
        raise DuplicateError(
            f"{path}: already in the catalog as adapter {adapter_id} (SHA-256 {stored.sha256[:12]}…)"
        )
    file = _file_spec(path, stored, info, extra.get("file_name"))
    if existing is not None:
        adapter_id = attach_local_file(session, stored.sha256, file)
        return ImportResult(
            str(path),
            "updated",
            adapter_id,
            existing.file_name,
            stored.sha256,
            "linked to its catalogued entry",
        )
    sidecars = sidecars or Sidecars()
    images = _preview_specs(catalog, sidecars.previews)
    spec = local_spec(path, info, file, sidecars, images, extra)
    adapter_id, status = _write_or_merge(session, spec)
    return ImportResult(str(path), status, adapter_id, spec.name, stored.sha256)


def _write_or_merge(session: Session, spec: AdapterSpec) -> tuple[int, str]:
    """New adapter, or a new version of the catalogued Civitai model the sidecar names."""
    version = spec.versions[0]
    if version.civitai_version_id is not None:
        row = session.execute(
            select(AdapterVersion).where(AdapterVersion.civitai_version_id == version.civitai_version_id)
        ).scalar_one_or_none()
        if row is not None:
            return add_version(
                session, row.adapter_id, replace(version, civitai_version_id=None), merge_into=row.id
            ), "updated"
    if spec.civitai_model_id is not None:
        from adapters_db.models import Adapter

        adapter_id = session.execute(
            select(Adapter.id).where(Adapter.civitai_model_id == spec.civitai_model_id)
        ).scalar_one_or_none()
        if adapter_id is not None:
            return add_version(session, adapter_id, version), "updated"
    return write_adapter(session, spec)


def _cleanup(catalog: Catalog, session: Session, written: list[StoredFile]) -> None:
    """Remove blobs this failed item wrote that nothing references."""
    from adapters_db.repository import stored_hashes

    fresh = [w for w in written if not w.existed]
    if not fresh:
        return
    referenced = stored_hashes(session)
    for blob in fresh:
        if blob.sha256 not in referenced:
            blob.path.unlink(missing_ok=True)


def import_file(
    session: Session, catalog: Catalog, path: Path, *, sidecars: Sidecars | None = None, **extra: Any
) -> ImportResult:
    """Import one ``.safetensors`` LoRA (reads its sidecars unless given).

    ``extra`` may set ``name``, ``description_html``, ``tags``, ``trigger_words``, ``base_family``,
    ``nsfw_level``, ``creator``, ``licence``, ``source``, ``hf_repo``, ``source_url``, ``version_name``.
    Never raises for bad input: the result's status is ``failed`` (or ``duplicate``) with a message.
    """
    path = Path(path)
    written: list[StoredFile] = []

    def work() -> ImportResult:
        cars = sidecars if sidecars is not None else (find_sidecars(path) if path.is_file() else None)
        return _import_file(session, catalog, path, cars, extra, written)

    result = run_item(session, str(path), work, on_failure=lambda: _cleanup(catalog, session, written))
    if result.status == "failed" and "DuplicateError" in result.message:
        existing = _existing_file(session, written[0].sha256) if written else None
        return replace(
            result,
            status="duplicate",
            sha256=written[0].sha256 if written else None,
            adapter_id=existing.version.adapter_id if existing is not None else None,
            message=result.message.removeprefix("DuplicateError: "),
        )
    return result


def scan_folder(root: Path) -> tuple[list[Path], list[Path]]:
    """LoRA files under ``root`` (recursively) and other model-like files that will be refused."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    loras, refused = [], []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        suffix = path.suffix.lower()
        if suffix in LORA_EXTS:
            loras.append(path)
        elif suffix in REFUSED_EXTS:
            refused.append(path)
    return loras, refused


def import_folder(
    session: Session, catalog: Catalog, root: Path, *, show_progress: bool = False, **extra: Any
) -> ImportSummary:
    """Import an A1111/ComfyUI ``models/Lora`` tree: every .safetensors with its previews and sidecars.

    Pickled checkpoints are reported as failed (never opened); previews and sidecars are picked up
    by name; a broken sidecar fails only its own LoRA.
    """
    loras, refused = scan_folder(Path(root))
    results: list[ImportResult] = []
    for path in progress(loras, show_progress, len(loras), "LoRA files"):
        try:
            cars = find_sidecars(path)
        except ValueError as exc:
            results.append(ImportResult(str(path), "failed", message=f"SidecarError: {exc}"))
            continue
        results.append(import_file(session, catalog, path, sidecars=cars, **extra))
    for path in refused:
        results.append(import_file(session, catalog, path))
    return ImportSummary(tuple(results))


def import_paths(
    session: Session,
    catalog: Catalog,
    paths: Iterable[Path],
    *,
    show_progress: bool = False,
    commit_each: bool = False,
    **extra: Any,
) -> ImportSummary:
    """Import files and folders given on a command line (folders are scanned)."""
    results: list[ImportResult] = []
    for path in (Path(p) for p in paths):
        if path.is_dir():
            results.extend(
                import_folder(session, catalog, path, show_progress=show_progress, **extra).results
            )
        else:
            results.append(import_file(session, catalog, path, **extra))
        if commit_each:
            session.commit()
    return ImportSummary(tuple(results))


__all__ = ["IMAGE_EXTS", "import_file", "import_folder", "import_paths", "local_spec", "scan_folder"]
