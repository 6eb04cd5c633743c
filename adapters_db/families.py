"""Base-model families: the project's names (``sd1``, ``sd2``, ``sdxl``, ``pocket``) and their aliases."""

from __future__ import annotations

FAMILIES: tuple[str, ...] = ("sd1", "sd2", "sdxl", "pocket")

# Civitai ``baseModel`` strings → family (``None``: unknown / another architecture).
_CIVITAI: dict[str, str | None] = {
    "sd 1.4": "sd1",
    "sd 1.5": "sd1",
    "sd 1.5 lcm": "sd1",
    "sd 2.0": "sd2",
    "sd 2.0 768": "sd2",
    "sd 2.1": "sd2",
    "sd 2.1 768": "sd2",
    "sd 2.1 unclip": "sd2",
    "sdxl 0.9": "sdxl",
    "sdxl 1.0": "sdxl",
    "sdxl 1.0 lcm": "sdxl",
    "sdxl turbo": "sdxl",
    "other": None,
}

# What people type on the command line or in the UI.
_ALIASES: dict[str, str] = {
    "sd1": "sd1",
    "sd15": "sd1",
    "sd1.5": "sd1",
    "sd14": "sd1",
    "sd1.4": "sd1",
    "sd-1.5": "sd1",
    "sd_1.5": "sd1",
    "v1": "sd1",
    "sd 1.5": "sd1",
    "sd 1.4": "sd1",
    "sd2": "sd2",
    "sd20": "sd2",
    "sd21": "sd2",
    "sd2.0": "sd2",
    "sd2.1": "sd2",
    "v2": "sd2",
    "sd 2.0": "sd2",
    "sd 2.1": "sd2",
    "sdxl": "sdxl",
    "xl": "sdxl",
    "sdxl1.0": "sdxl",
    "sdxl10": "sdxl",
    "sd-xl": "sdxl",
    "sdxl 1.0": "sdxl",
    "pocket": "pocket",
}


def family_from_civitai(base_model: str | None) -> str | None:
    """Map a Civitai ``baseModel`` string ("SD 1.5", "SDXL 1.0", "Other", …) to a family or ``None``."""
    if not base_model:
        return None
    key = " ".join(base_model.lower().split())
    if key in _CIVITAI:
        return _CIVITAI[key]
    if key.startswith("sdxl"):
        return "sdxl"
    if key.startswith("sd 1"):
        return "sd1"
    if key.startswith("sd 2"):
        return "sd2"
    return None


def normalize_family(name: str | None) -> str | None:
    """A family name or alias (``sd15``, ``SD 1.5``, ``xl``) → canonical family; ``None`` passes through.

    Raises ``ValueError`` for a name that is no known family or alias.
    """
    if name is None:
        return None
    key = name.strip().lower()
    if key in _ALIASES:
        return _ALIASES[key]
    mapped = family_from_civitai(name)
    if mapped is not None:
        return mapped
    raise ValueError(f"unknown base family {name!r}: use one of {', '.join(FAMILIES)} (or sd15, xl, …)")
