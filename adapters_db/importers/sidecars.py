"""Sidecar files that A1111, ComfyUI and their Civitai helpers keep next to a LoRA, read as plain data.

For ``models/Lora/foo.safetensors``: ``foo.civitai.info`` (Civitai model-version JSON, written by
Civitai Helper), ``foo.metadata.json`` (ComfyUI LoRA Manager, with a ``civitai`` block),
``foo.json`` (A1111 user metadata: description, activation text, sd version, preferred weight),
``foo.txt`` / ``foo.description.txt`` (A1111 description) and preview images ``foo.png``,
``foo.preview.png`` (also .jpg/.jpeg/.webp/.gif). PNG previews often carry A1111 ``parameters``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".gif")
LORA_EXTS = (".safetensors",)
REFUSED_EXTS = (".ckpt", ".pt", ".pth", ".bin")


class SidecarError(ValueError):
    """A sidecar file that exists but cannot be read (bad JSON, wrong shape)."""


@dataclass(frozen=True)
class Sidecars:
    """What was found next to one LoRA file."""

    civitai_info: dict[str, Any] | None = None
    user_metadata: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    previews: tuple[Path, ...] = ()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SidecarError(f"{path}: unreadable JSON sidecar ({exc})") from exc
    if not isinstance(data, dict):
        raise SidecarError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def find_sidecars(lora: Path) -> Sidecars:
    """Collect the sidecars of one LoRA file (missing ones are simply absent)."""
    stem = lora.with_suffix("")
    info = None
    civitai_path = Path(f"{stem}.civitai.info")
    if civitai_path.is_file():
        info = _read_json(civitai_path)
    manager = Path(f"{stem}.metadata.json")
    if info is None and manager.is_file():
        block = _read_json(manager).get("civitai")
        info = block if isinstance(block, dict) and block else None
    user: dict[str, Any] = {}
    if Path(f"{stem}.json").is_file():
        user = _read_json(Path(f"{stem}.json"))
    description = ""
    for candidate in (Path(f"{stem}.description.txt"), Path(f"{stem}.txt")):
        if candidate.is_file():
            description = candidate.read_text(encoding="utf-8", errors="replace").strip()
            break
    previews = tuple(
        p
        for base in (f"{stem}.preview", str(stem))
        for ext in IMAGE_EXTS
        if (p := Path(base + ext)).is_file()
    )
    return Sidecars(info, user, description, previews)


_PARAM = re.compile(r'\s*([\w][\w \-/+]*?):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> dict[str, Any]:
    """A1111 ``parameters`` text → ``{"prompt", "negativePrompt", "Steps", "Sampler", …}``."""
    lines = text.strip().splitlines()
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
    for key, value in _PARAM.findall(params_line):
        out[key.strip()] = value.strip().strip('"')
    return out


def image_parameters(path: Path) -> dict[str, Any]:
    """Generation parameters embedded in a preview image (PNG ``parameters`` chunk), else ``{}``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            raw = img.info.get("parameters")
            size = img.size
    except (UnidentifiedImageError, OSError):
        return {}
    params = parse_infotext(raw) if isinstance(raw, str) else {}
    return {**params, "_width": size[0], "_height": size[1]}
