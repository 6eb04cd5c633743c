"""Sidecar files that A1111, ComfyUI and their Civitai helpers keep next to a LoRA, read as plain data.

For ``models/Lora/foo.safetensors`` (formats checked against the tools that write them):

- ``foo.civitai.info``: Civitai Helper writes Civitai's model-version JSON (``/model-versions/by-hash``:
  ``id``, ``modelId``, ``name``, ``trainedWords``, ``baseModel``, ``files``, ``images``, ``model``), or
  ``{}`` for a file Civitai does not know. Early Civitai Browser+ wrote the *model* JSON there instead
  (``id`` is then the model id, the versions are in ``modelVersions``).
- ``foo.api_info.json``: Civitai Browser+ (option "save API info"): the model JSON with ``modelVersions``.
- ``foo.metadata.json``: ComfyUI LoRA Manager: ``model_name``, ``tags``, ``modelDescription``, ``notes``,
  ``usage_tips`` (a JSON string with ``strength``), ``base_model`` and a ``civitai`` version block.
- ``foo.json``: A1111's extra-networks user metadata (``description``, ``sd version`` = SD1 / SD2 / SDXL /
  Unknown, ``activation text``, ``preferred weight`` (0: unset), ``negative text``, ``notes``); Civitai
  Browser+ adds ``sha256``, ``modelId`` and writes ``sd version`` "Other".
- ``foo.txt`` / ``foo.description.txt``: a plain description (A1111 reads them in that order).
- previews, looked up as A1111 does (case-insensitively; for each of .png, .jpg, .jpeg, .webp, .gif:
  ``foo.EXT`` before ``foo.preview.EXT``); the first one found is A1111's card picture. Civitai Helper
  and Civitai Browser+ name every preview ``.preview.png`` whatever its format.

A sidecar that cannot be read (not UTF-8, empty, not JSON, not an object, fields of the wrong type) is
left out with a warning: the LoRA is still imported, from its own header.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".gif")  # A1111's preview order
LORA_EXTS = (".safetensors",)
REFUSED_EXTS = (".ckpt", ".pt", ".pth", ".bin")
MAX_SIDECAR_BYTES = 32 * 1024 * 1024


class SidecarError(ValueError):
    """A sidecar file that exists but cannot be read (bad JSON, wrong shape)."""


@dataclass(frozen=True)
class Sidecars:
    """What was found next to one LoRA file.

    ``civitai_info`` is a Civitai model-version or model object as written (resolve it for one file with
    :func:`civitai_version`); ``manager`` holds LoRA Manager's own fields; ``warnings`` names the sidecars
    left out; ``fingerprint`` changes whenever a sidecar or preview does.
    """

    civitai_info: dict[str, Any] | None = None
    user_metadata: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    previews: tuple[Path, ...] = ()
    manager: dict[str, Any] = field(default_factory=dict)
    api_info: dict[str, Any] | None = None
    warnings: tuple[str, ...] = ()
    fingerprint: str = ""


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a sidecar (UTF-8, with or without BOM); :class:`SidecarError` otherwise."""
    try:
        if path.stat().st_size > MAX_SIDECAR_BYTES:
            raise SidecarError(f"{path.name}: larger than {MAX_SIDECAR_BYTES >> 20} MB, left out")
        raw = path.read_bytes()
    except OSError as exc:
        raise SidecarError(f"{path.name}: cannot be read ({exc.strerror or exc})") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SidecarError(f"{path.name}: unreadable JSON sidecar (not UTF-8: {exc.reason})") from exc
    if not text.strip():
        raise SidecarError(f"{path.name}: empty sidecar")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:  # bad JSON, an int of too many digits, nesting too deep
        raise SidecarError(f"{path.name}: unreadable JSON sidecar ({exc})") from exc
    if not isinstance(data, dict):
        raise SidecarError(f"{path.name}: expected a JSON object, got {type(data).__name__}")
    return data


def _listing(folder: Path) -> dict[str, str]:
    """``{lower-cased name: name}`` of a folder's entries (the first in sorted order wins a case clash)."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return {}
    out: dict[str, str] = {}
    for name in names:
        out.setdefault(name.lower(), name)
    return out


def _find(folder: Path, name: str, listing: Mapping[str, str]) -> Path | None:
    """``folder/name`` if it is a file, matched case-insensitively as A1111 does."""
    if name.lower() not in listing:
        return None
    exact = folder / name
    if exact.is_file():
        return exact
    other = listing.get(name.lower())
    if other is not None and (folder / other).is_file():
        return folder / other
    return None


def preview_candidates(stem: str) -> tuple[str, ...]:
    """Preview file names in A1111's lookup order (``find_preview``)."""
    return tuple(name for ext in IMAGE_EXTS for name in (f"{stem}{ext}", f"{stem}.preview{ext}"))


def find_sidecars(lora: Path, listing: Mapping[str, str] | None = None) -> Sidecars:
    """Collect the sidecars of one LoRA file; missing ones are absent and unreadable ones are warnings.

    ``listing`` (from :func:`_listing` of the LoRA's folder) saves listing a large folder once per file.
    """
    folder, stem = lora.parent, lora.name[: -len(lora.suffix)] if lora.suffix else lora.name
    listing = _listing(folder) if listing is None else listing
    warnings: list[str] = []
    digest = hashlib.sha256()

    def read(name: str) -> dict[str, Any] | None:
        path = _find(folder, name, listing)
        if path is None:
            return None
        try:
            data = _read_json(path)
        except SidecarError as exc:
            warnings.append(str(exc))
            digest.update(f"{name}\0bad\0{exc}".encode())
            return None
        digest.update(name.encode() + b"\0" + json.dumps(data, sort_keys=True, default=str).encode())
        return data

    info = read(f"{stem}.civitai.info")
    api_info = read(f"{stem}.api_info.json")
    manager_raw = read(f"{stem}.metadata.json") or {}
    user = read(f"{stem}.json") or {}
    manager = clean_manager(manager_raw, warnings)
    if not info and isinstance(manager_raw.get("civitai"), dict) and manager_raw["civitai"]:
        info = manager_raw["civitai"]
    description = ""
    for name in (f"{stem}.txt", f"{stem}.description.txt"):  # A1111's find_description order
        path = _find(folder, name, listing)
        if path is None:
            continue
        try:
            description = path.read_bytes().decode("utf-8-sig", errors="replace").strip()
        except OSError as exc:
            warnings.append(f"{path.name}: cannot be read ({exc.strerror or exc})")
            continue
        digest.update(name.encode() + b"\0" + description.encode())
        break
    previews: list[Path] = []
    for name in preview_candidates(stem):
        path = _find(folder, name, listing)
        if path is not None and path not in previews:
            previews.append(path)
            stat = path.stat()
            digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return Sidecars(
        civitai_info=info or None,
        user_metadata=clean_user_metadata(user, warnings),
        description=description,
        previews=tuple(previews),
        manager=manager,
        api_info=api_info or None,
        warnings=tuple(warnings),
        fingerprint=digest.hexdigest(),
    )


# ------------------------------------------------------------------------------- field validation
def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: Any) -> int | None:
    """An integer that fits a 64-bit database column, else ``None``."""
    ok = isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63
    return value if ok else None


def _words(value: Any) -> list[str] | str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return [w for w in value if isinstance(w, str)]
    return None


def _weight(value: Any) -> float | None:
    """A1111's ``preferred weight`` (0 means "not set"), as a number."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        weight = float(value)
    except (TypeError, ValueError):
        return None
    return weight if weight == weight and 0 < abs(weight) <= 100 else None


def clean_user_metadata(raw: dict[str, Any], warnings: list[str]) -> dict[str, Any]:
    """A1111 user metadata with the fields this importer reads checked for type."""
    out: dict[str, Any] = {}
    for key in ("description", "sd version", "activation text", "negative text", "notes"):
        if key in raw and raw[key] is not None:
            if isinstance(raw[key], str):
                out[key] = raw[key]
            else:
                warnings.append(f"user metadata: {key!r} is {type(raw[key]).__name__}, not text; left out")
    if raw.get("preferred weight") not in (None, 0, 0.0, ""):
        weight = _weight(raw["preferred weight"])
        if weight is None:
            warnings.append(f"user metadata: 'preferred weight' {raw['preferred weight']!r} is not a number")
        else:
            out["preferred weight"] = weight
    return out


def clean_manager(raw: dict[str, Any], warnings: list[str]) -> dict[str, Any]:
    """LoRA Manager's own fields (``model_name``, ``tags``, ``modelDescription``, ``notes``,
    ``base_model``, the ``strength`` of ``usage_tips``), checked for type."""
    out: dict[str, Any] = {}
    for key in ("model_name", "modelDescription", "notes", "base_model"):
        if isinstance(raw.get(key), str) and raw[key].strip():
            out[key] = raw[key]
    tags = raw.get("tags")
    if isinstance(tags, list):
        out["tags"] = [t for t in tags if isinstance(t, str) and t.strip()]
    tips = raw.get("usage_tips")
    if isinstance(tips, str) and tips.strip():
        try:
            tips = json.loads(tips)
        except json.JSONDecodeError:
            warnings.append("metadata.json: 'usage_tips' is not JSON; left out")
            tips = None
    if isinstance(tips, dict) and (weight := _weight(tips.get("strength"))) is not None:
        out["strength"] = weight
    return out


def _clean_image(raw: dict[str, Any]) -> dict[str, Any]:
    image: dict[str, Any] = {"meta": raw["meta"] if isinstance(raw.get("meta"), dict) else {}}
    for key in ("url", "hash", "type"):
        if _str(raw.get(key)) is not None:
            image[key] = raw[key]
    for key in ("id", "width", "height"):
        if _int(raw.get(key)) is not None:
            image[key] = raw[key]
    for key in ("nsfw", "nsfwLevel"):
        if isinstance(raw.get(key), (bool, int, str)):
            image[key] = raw[key]
    return image


def _clean_model(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        return {}
    model: dict[str, Any] = {k: raw[k] for k in ("name", "type", "description") if _str(raw.get(k))}
    if isinstance(raw.get("nsfw"), bool):
        model["nsfw"] = raw["nsfw"]
    tags = raw.get("tags")
    if isinstance(tags, list):  # names, or {"name": …} objects in older API answers
        names = [t if isinstance(t, str) else t.get("name") if isinstance(t, dict) else None for t in tags]
        model["tags"] = [t for t in names if isinstance(t, str) and t.strip()]
    creator = raw.get("creator")
    if isinstance(creator, dict) and _str(creator.get("username")):
        model["creator"] = creator["username"]
    return model


def clean_version(raw: dict[str, Any]) -> dict[str, Any]:
    """A Civitai model-version object reduced to the fields the importer reads, each of the right type
    (a field of another type is dropped, never passed on)."""
    out: dict[str, Any] = {}
    for key in ("id", "modelId"):
        if _int(raw.get(key)) is not None:
            out[key] = raw[key]
    for key in ("name", "description", "baseModel", "downloadUrl"):
        if _str(raw.get(key)) is not None:
            out[key] = raw[key]
    if (words := _words(raw.get("trainedWords"))) is not None:
        out["trainedWords"] = words
    out["model"] = _clean_model(raw.get("model"))
    images = raw.get("images")
    images = images if isinstance(images, list) else []
    out["images"] = [_clean_image(im) for im in images if isinstance(im, dict) and _str(im.get("url"))]
    files = raw.get("files")
    out["files"] = [f for f in files if isinstance(f, dict)] if isinstance(files, list) else []
    return out


def _file_hashes(version: dict[str, Any]) -> set[str]:
    hashes = (f.get("hashes") for f in version.get("files") or [])
    return {h["SHA256"].lower() for h in hashes if isinstance(h, dict) and isinstance(h.get("SHA256"), str)}


def _names(version: dict[str, Any]) -> set[str]:
    return {f["name"].lower() for f in version.get("files") or [] if isinstance(f.get("name"), str)}


def civitai_version(data: dict[str, Any], sha256: str, file_name: str) -> tuple[dict[str, Any] | None, str]:
    """The model-version object that describes this file, from a ``.civitai.info`` / ``.api_info.json``
    (a version object, or a model object with ``modelVersions``), cleaned; or ``(None, why)``.

    A version whose files list SHA-256 hashes of which none is this file's describes another file (a
    LoRA replaced under the same name) and is not used.
    """
    sha, name = sha256.lower(), file_name.lower()
    if isinstance(data.get("modelVersions"), list):
        versions = [v for v in data["modelVersions"] if isinstance(v, dict)]
        chosen = next((v for v in versions if sha in _file_hashes(v)), None)
        chosen = chosen or next((v for v in versions if not _file_hashes(v) and name in _names(v)), None)
        if chosen is None:
            return None, "none of its model versions lists this file"
        version = clean_version(chosen)
        version["model"] = _clean_model(data)
        if _int(data.get("id")) is not None:
            version["modelId"] = data["id"]
        return version, ""
    version = clean_version(data)
    hashes = _file_hashes(version)
    if hashes and sha not in hashes:
        return None, f"it describes another file (SHA-256 {', '.join(sorted(h[:10] for h in hashes))}…)"
    return version, ""


# ------------------------------------------------------------------------------- preview pictures
_FORMAT_EXT = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "GIF": ".gif"}
# A1111 writes a few kB; PIL reads an uncompressed text chunk of any size (64 MB of text in all)
MAX_INFOTEXT_CHARS = 1 << 20


def parse_infotext(text: str) -> dict[str, Any]:
    """A1111 ``parameters`` text → ``{"prompt", "negativePrompt", "Steps", "Sampler", …}``; ``{}`` for a
    text over :data:`MAX_INFOTEXT_CHARS` (a preview from the web is not worth seconds per picture)."""
    from pipelines.recipe import search_field  # linear time, where a field regex backtracks for minutes

    lines = text.strip().splitlines() if len(text) <= MAX_INFOTEXT_CHARS else []
    if not lines:
        return {}
    params_line = lines[-1] if re.search(r"\bSteps:\s*\d", lines[-1]) else ""
    body = lines[:-1] if params_line else lines
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    target = prompt_lines
    for line in body:
        if line.startswith("Negative prompt:"):
            target = negative_lines
            line = line.removeprefix("Negative prompt:").strip()
        target.append(line)
    out: dict[str, Any] = {"prompt": "\n".join(prompt_lines).strip()}
    if negative_lines:
        out["negativePrompt"] = "\n".join(negative_lines).strip()
    pos = 0
    while found := search_field(params_line, pos, key_chars=r"\w \-/+", min_key=1, empty_quotes=True):
        key, value, _, pos = found
        out[key.strip()] = value.strip().strip('"')
    return out


def image_parameters(path: Path) -> dict[str, Any]:
    """Generation parameters embedded in a preview image (PNG ``parameters`` chunk), else ``{}``.

    Also ``_width``, ``_height`` and ``_ext``: the extension of the picture's real format (a Civitai
    Helper ``.preview.png`` is often a JPEG or WebP).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            raw = img.info.get("parameters")
            size = img.size
            fmt = img.format or ""
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return {}  # not a picture, or one too large to open safely (PIL's decompression-bomb limit)
    params = parse_infotext(raw) if isinstance(raw, str) else {}
    ext = _FORMAT_EXT.get(fmt.upper(), path.suffix.lower())
    return {**params, "_width": size[0], "_height": size[1], "_ext": ext}
