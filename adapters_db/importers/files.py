"""Local LoRA files: one ``.safetensors`` (``import_file``) or an A1111/ComfyUI ``models/Lora`` tree
(``import_folder``) with previews and sidecars.

Header metadata, trigger words and base family come from ``pipelines.lora_formats.inspect`` (the
same reader the engine uses); weights holding NaN or Inf are refused, as ``load`` refuses them. Bytes
go to the content-addressed store (atomic, deduplicated by SHA-256) before the rows are written; a
crash in between leaves an unreferenced blob that the catalog never shows and that a re-import
reuses or garbage collection removes.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from adapters_db.dto import ImportResult, ImportSummary, LicenceFlags, Stats
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
    _listing,
    civitai_version,
    find_sidecars,
    image_parameters,
)
from adapters_db.models import Adapter, AdapterFile, AdapterVersion
from adapters_db.repository import add_version, attach_local_file, write_adapter
from adapters_db.specs import AdapterSpec, FileSpec, ImageSpec, VersionSpec
from adapters_db.store import StoredFile

if TYPE_CHECKING:
    from adapters_db.catalog import Catalog

MAX_HEADER_TRIGGERS = 12
MAX_METADATA_VALUE = 65_536
# ``Adapter.extra[SIDECARS_KEY]``: ``{sha256: [path, fingerprint]}``: where a local import found the file
# and a fingerprint of the sidecars it read there, so that importing the folder again refreshes an adapter
# whose sidecars changed, and reports the rest (and a copy of the file elsewhere) as duplicates.
SIDECARS_KEY = "local_sidecars"
log = logging.getLogger(__name__)


class UnsupportedFileError(ImportErrorBase):
    """Not a file this importer takes (pickled checkpoint, unknown extension, a folder)."""


class FileChangedError(ImportErrorBase):
    """The file changed between reading it and copying it (a download still in progress)."""


def _check_path(path: Path) -> None:
    if path.is_symlink() and not path.exists():
        try:
            os.stat(path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsupportedFileError(f"{path}: symbolic link loop (it never leads to a file)") from None
        raise FileNotFoundError(f"{path}: broken symbolic link (its target {os.readlink(path)!r} is missing)")
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


def _preview_specs(
    catalog: Catalog, previews: Sequence[Path], written: list[StoredFile] | None = None
) -> tuple[ImageSpec, ...]:
    """Stored copies of the readable preview pictures, in lookup order, each picture once (the same bytes
    under two names are one picture); stored under the extension of their real format."""
    out: list[ImageSpec] = []
    seen: set[str] = set()
    for path in previews:
        params = image_parameters(path)
        if not params:
            continue  # not an image PIL can read (a video saved as .preview.png): skip it, keep the LoRA
        ext = params.pop("_ext", None) or path.suffix.lower()
        stored = catalog.store.put_file(path, kind="images", ext=ext)
        if written is not None:
            written.append(stored)
        if stored.sha256 in seen:
            continue
        seen.add(stored.sha256)
        prompt = params.pop("prompt", None) or None
        negative = params.pop("negativePrompt", None) or None
        width, height = params.pop("_width", None), params.pop("_height", None)
        out.append(
            ImageSpec(
                local_sha256=stored.sha256,
                local_ext=ext,
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
    if not isinstance(value, (list, tuple)):
        return ()
    return tuple(dict.fromkeys(w.strip() for w in value if isinstance(w, str) and w.strip()))


def _civitai(sidecars: Sidecars, file: FileSpec) -> tuple[dict[str, Any] | None, list[str]]:
    """The Civitai version that describes this file: from ``.civitai.info`` (or LoRA Manager's block),
    else ``.api_info.json``; a sidecar that describes another file is left out with a warning."""
    warnings: list[str] = []
    for label, data in ((".civitai.info", sidecars.civitai_info), (".api_info.json", sidecars.api_info)):
        if not data:
            continue
        version, why = civitai_version(data, file.sha256 or "", file.file_name)
        if version is not None:
            return version, warnings
        warnings.append(f"{label}: left out, {why}")
    return None, warnings


def local_spec(
    path: Path,
    info: Any,
    file: FileSpec,
    sidecars: Sidecars,
    images: tuple[ImageSpec, ...],
    extra: dict[str, Any],
    civitai: dict[str, Any] | None = None,
) -> AdapterSpec:
    """Build the spec of a local file from (in priority order) explicit arguments, the Civitai version
    (``civitai``; else resolved from the sidecars), LoRA Manager's metadata, the A1111 user metadata /
    description sidecars and the safetensors header."""
    if civitai is None:
        civitai = _civitai(sidecars, file)[0]
    meta, civ, user, manager = dict(info.metadata), civitai or {}, sidecars.user_metadata, sidecars.manager
    model = civ.get("model") if isinstance(civ.get("model"), dict) else {}
    header_family = info.family if info.family in ("sd1", "sd2", "sdxl", "pocket") else None
    family = _first(
        normalize_family(extra.get("base_family")) if extra.get("base_family") else None,
        header_family,
        family_from_civitai(civ.get("baseModel")),
        _user_family(user.get("sd version")),
        family_from_civitai(manager.get("base_model")),
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
        manager.get("modelDescription"),
        civ.get("description"),
        user.get("description"),  # A1111's user metadata overrides the .txt description (read_user_metadata)
        sidecars.description,
        meta.get("modelspec.description"),
    )
    civ_images = tuple(image_spec(im) for im in civ.get("images") or [] if isinstance(im, dict))
    version = VersionSpec(
        name=str(
            _first(extra.get("version_name"), civ.get("name"), meta.get("ss_training_comment"), "local")
        )[:400],
        civitai_version_id=civ.get("id") if isinstance(civ.get("id"), int) else None,
        base_model=_first(
            civ.get("baseModel"), meta.get("ss_base_model_version"), manager.get("base_model"), header_family
        ),
        base_family=family,
        description_html=str(civ.get("description") or ""),
        download_url=civ.get("downloadUrl"),
        trigger_words=triggers,
        files=(file,),
        images=images + civ_images,
    )
    header_tags = _split_words(meta.get("modelspec.tags"))
    tags = tuple(extra.get("tags") or ()) or _split_words(
        [*header_tags, *_split_words(model.get("tags")), *manager.get("tags", ())]
    )
    notes = "\n\n".join(n.strip() for n in (user.get("notes"), manager.get("notes")) if n and n.strip())
    local_extra = {
        "preferred_weight": _first(user.get("preferred weight"), manager.get("strength")),
        "negative_text": (user.get("negative text") or "").strip() or None,
        "notes": notes or None,
        "folder": extra.get("folder") or None,
    }
    return AdapterSpec(
        name=str(
            _first(
                extra.get("name"),
                manager.get("model_name"),
                model.get("name"),
                meta.get("modelspec.title"),
                meta.get("ss_output_name"),
                Path(file.file_name).stem,
            )
        ),
        source=str(extra.get("source") or ("civitai" if civ.get("id") or civ.get("modelId") else "local")),
        kind=str(extra.get("kind") or "lora"),
        description_html=str(description or ""),
        base_family=family,
        base_model=version.base_model,
        nsfw_level=int(extra.get("nsfw_level", 2 if model.get("nsfw") else 0)),
        creator=_first(extra.get("creator"), model.get("creator"), meta.get("modelspec.author")),
        civitai_model_id=civ.get("modelId") if isinstance(civ.get("modelId"), int) else None,
        hf_repo=extra.get("hf_repo"),
        source_url=extra.get("source_url"),
        licence=extra.get("licence") or LicenceFlags(license=meta.get("modelspec.license") or None),
        tags=tuple(t.lower() for t in tags),
        versions=(version,),
        extra={k: v for k, v in local_extra.items() if v is not None},
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
    if stored.size_bytes != info.size_bytes:  # still being written (a download in progress) or replaced
        raise FileChangedError(
            f"{path}: the file changed while it was imported ({info.size_bytes} bytes when read, "
            f"{stored.size_bytes} when copied); import it again once it is complete"
        )
    crash_point("after_store_write")
    sidecars = sidecars or Sidecars()
    existing = _existing_file(session, stored.sha256)
    file = _file_spec(path, stored, info, extra.get("file_name"))
    if existing is not None and existing.stored:
        return _refresh(session, catalog, path, existing, info, file, sidecars, extra, written)
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
    civitai, warnings = _civitai(sidecars, file)
    images = _preview_specs(catalog, sidecars.previews, written)
    spec = local_spec(path, info, file, sidecars, images, extra, civitai)
    adapter_id, status = _write_or_merge(session, spec)
    if status == "imported" and sidecars.fingerprint:
        _remember_sidecars(session, adapter_id, stored.sha256, path, sidecars.fingerprint)
    return ImportResult(
        str(path), status, adapter_id, spec.name, stored.sha256, _warn(path, [*sidecars.warnings, *warnings])
    )


def _warn(path: Path, warnings: Sequence[str]) -> str:
    """The result message for sidecars left out (also logged as a warning)."""
    if not warnings:
        return ""
    message = "imported without " + "; ".join(warnings)
    log.warning("%s: %s", path, message)
    return message


def _remember_sidecars(session: Session, adapter_id: int, sha256: str, path: Path, fingerprint: str) -> None:
    row = session.get(Adapter, adapter_id)
    if row is None:
        return
    extra = dict(row.extra or {})
    extra[SIDECARS_KEY] = {
        **dict(extra.get(SIDECARS_KEY) or {}),
        sha256: [os.path.abspath(path), fingerprint],
    }
    row.extra = extra
    session.flush()


def _refresh(
    session: Session,
    catalog: Catalog,
    path: Path,
    existing: AdapterFile,
    info: Any,
    file: FileSpec,
    sidecars: Sidecars,
    extra: dict[str, Any],
    written: list[StoredFile],
) -> ImportResult:
    """A file already stored: a duplicate, unless a local import made its adapter from this very path and
    the sidecars there have changed since; then the adapter is refreshed from them (as a Civitai record
    refresh is: versions, files and pictures merged, what the sidecars cannot say kept)."""
    row = session.get(Adapter, existing.version.adapter_id)
    assert row is not None
    seen = dict((row.extra or {}).get(SIDECARS_KEY) or {}).get(file.sha256 or "")
    here = [os.path.abspath(path), sidecars.fingerprint]
    if not isinstance(seen, list) or seen[:1] != here[:1] or seen == here or not sidecars.fingerprint:
        raise DuplicateError(
            f"{path}: already in the catalog as adapter {row.id} (SHA-256 {(file.sha256 or '')[:12]}…)"
        )
    civitai, warnings = _civitai(sidecars, file)
    images = _preview_specs(catalog, sidecars.previews, written)
    spec = _keep_catalogued(local_spec(path, info, file, sidecars, images, extra, civitai), row)
    adapter_id, status = write_adapter(session, spec, adapter_id=row.id)
    _remember_sidecars(session, adapter_id, file.sha256 or "", path, sidecars.fingerprint)
    if status == "duplicate":  # the sidecars changed, what they say did not
        message = f"already in the catalog as adapter {adapter_id}; its sidecars say nothing new"
    else:
        message = "metadata refreshed from its changed sidecars"
    message = _warn(path, [*sidecars.warnings, *warnings]) or message
    return ImportResult(str(path), status, adapter_id, spec.name, file.sha256, message)


def _keep_catalogued(spec: AdapterSpec, row: Adapter) -> AdapterSpec:
    """A refresh from sidecars changes what they say and keeps what they cannot say (community counters,
    licence flags, links) or no longer say (a description, tags, a Civitai id)."""
    return replace(
        spec,
        source=row.source if spec.source == "local" else spec.source,
        description_html=spec.description_html or row.description_html or "",
        base_family=spec.base_family or row.base_family,
        base_model=spec.base_model or row.base_model,
        creator=spec.creator or row.creator,
        civitai_model_id=spec.civitai_model_id or row.civitai_model_id,
        source_url=spec.source_url or row.source_url,
        nsfw_level=max(spec.nsfw_level, row.nsfw_level or 0),
        poi=spec.poi or bool(row.poi),
        tags=tuple(dict.fromkeys([*(t.name for t in row.tags), *spec.tags])),
        licence=LicenceFlags(
            license=spec.licence.license or row.license,
            allow_no_credit=row.allow_no_credit,
            allow_commercial_use=row.allow_commercial_use,
            allow_derivatives=row.allow_derivatives,
            allow_different_license=row.allow_different_license,
        ),
        stats=Stats(
            downloads=row.download_count or 0,
            favorites=row.favorite_count or 0,
            comments=row.comment_count or 0,
            ratings=row.rating_count or 0,
            rating=row.rating or 0.0,
        ),
    )


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


def _walk(root: Path) -> Iterator[tuple[Path, list[str]]]:
    """``(folder, file names)`` under ``root`` as A1111 lists a LoRA tree: symbolic links to folders are
    followed (each real folder once, so a link loop ends), hidden folders and files (``.git``,
    ``.ipynb_checkpoints``, macOS ``._name`` files) are left out."""
    seen: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        yield Path(folder), sorted(f for f in files if not f.startswith("."))


def scan_folder(root: Path) -> tuple[list[Path], list[Path]]:
    """LoRA files under ``root`` (recursively, see :func:`_walk`) and other model-like files that will be
    refused."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    loras, refused = [], []
    for folder, names in _walk(root):
        for name in names:
            path = folder / name
            suffix = path.suffix.lower()
            if suffix in LORA_EXTS and (path.is_file() or path.is_symlink()):
                loras.append(path)
            elif suffix in REFUSED_EXTS and (path.is_file() or path.is_symlink()):
                refused.append(path)
    return sorted(loras), sorted(refused)


def import_folder(
    session: Session,
    catalog: Catalog,
    root: Path,
    *,
    show_progress: bool = False,
    commit_each: bool = False,
    **extra: Any,
) -> ImportSummary:
    """Import an A1111/ComfyUI ``models/Lora`` tree: every .safetensors with its previews and sidecars.

    Pickled checkpoints are reported as failed (never opened); previews and sidecars are picked up
    by name (case-insensitively, as A1111 does); a sidecar that cannot be read is left out with a warning
    in the file's result, and the file is imported from its header. A file's subfolder (A1111 shows it as
    a category) is kept as ``extra["folder"]``. With ``commit_each`` the session commits after every
    file, so an interrupted import keeps the files done before (a re-run reports them as duplicates).
    """
    root = Path(root)
    loras, refused = scan_folder(root)
    results: list[ImportResult] = []
    listings: dict[Path, dict[str, str]] = {}
    for path in progress(loras, show_progress, len(loras), "LoRA files"):
        if path.parent not in listings:
            listings[path.parent] = _listing(path.parent)
        cars = find_sidecars(path, listings[path.parent])
        folder = path.parent.relative_to(root).as_posix()
        item_extra = {**extra, "folder": folder} if folder not in ("", ".") else extra
        results.append(import_file(session, catalog, path, sidecars=cars, **item_extra))
        if commit_each:
            session.commit()
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
    """Import files and folders given on a command line (folders are scanned); with ``commit_each``
    the session commits after every file (an interrupted import keeps what was done)."""
    results: list[ImportResult] = []
    for path in (Path(p) for p in paths):
        if path.is_dir():
            summary = import_folder(
                session, catalog, path, show_progress=show_progress, commit_each=commit_each, **extra
            )
            results.extend(summary.results)
        else:
            results.append(import_file(session, catalog, path, **extra))
        if commit_each:
            session.commit()
    return ImportSummary(tuple(results))


__all__ = ["IMAGE_EXTS", "import_file", "import_folder", "import_paths", "local_spec", "scan_folder"]
