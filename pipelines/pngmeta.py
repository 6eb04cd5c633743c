"""PNG text chunks of a generated image: A1111's ``parameters`` and the exact recipe as JSON."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from pipelines.recipe import MixRecipe, a1111_parameters

RECIPE_KEY = "adapter_studio_recipe"


def pinned_recipe(recipe: MixRecipe, hashes: dict[str, str]) -> MixRecipe:
    """The recipe with every adapter's SHA-256 filled in, so a replay can verify and resolve it."""
    adapters = tuple(replace(a, sha256=a.sha256 or hashes.get(a.label)) for a in recipe.adapters)
    return replace(recipe, adapters=adapters)


def png_info(recipe: MixRecipe, parameters: str) -> PngImagePlugin.PngInfo:
    """PNG text chunks: ``parameters`` (A1111, Civitai) and the recipe JSON."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    info.add_text(RECIPE_KEY, recipe.to_json())
    return info


def save_png(
    image: Image.Image,
    path: str | Path,
    recipe: MixRecipe,
    *,
    short_hashes: dict[str, str],
    sampler: str,
    width: int,
    height: int,
) -> Path:
    """Write ``image`` with its recipe embedded (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = a1111_parameters(recipe, short_hashes, sampler, width, height)
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG", pnginfo=png_info(recipe, text))
    tmp.replace(path)
    return path


def read_text_chunks(path: str | Path) -> dict[str, Any]:
    """All text chunks of a PNG (those after its pixels too, but an animation's frames are never decoded
    to reach them); a ValueError naming the file when it cannot be read as a picture."""
    try:
        with Image.open(path) as im:
            if isinstance(im, PngImagePlugin.PngImageFile) and getattr(im, "is_animated", False):
                return {k: v for k, v in im.info.items() if isinstance(v, str)}  # the chunks before IDAT
            return dict(getattr(im, "text", {}) or im.info)
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not a PNG or any other picture format") from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        # truncated or damaged files, text chunks over PIL's limits, pixel counts over its bomb limit
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ValueError(f"{path}: cannot read the picture ({reason})") from None


def read_recipe(path: str | Path) -> MixRecipe:
    """The exact recipe embedded in an image written by the studio; a ValueError naming the file (and
    the field) otherwise."""
    chunks = read_text_chunks(path)
    if RECIPE_KEY not in chunks:
        if "parameters" in chunks:
            raise ValueError(
                f"{path}: no adapter-studio recipe in this PNG, only A1111 `parameters` text, which is not "
                "replayed (it does not name the LoRA files exactly); pass its prompt and settings with "
                "--prompt, --lora, --seed, --steps instead"
            )
        raise ValueError(
            f"{path}: no adapter-studio recipe in this PNG (only {sorted(chunks) or 'no'} text chunks)"
        )
    try:
        return MixRecipe.from_json(chunks[RECIPE_KEY])
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
