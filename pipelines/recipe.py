"""A generation as plain data: the mix recipe, its JSON form and A1111's ``parameters`` text."""

from __future__ import annotations

import json
import math
import numbers
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

RECIPE_VERSION = 1
MAX_SEED = 2**63 - 1  # the history stores seeds as signed 64-bit integers (SQL BIGINT)
TAG_UNSAFE = ":<>"  # characters an A1111 <lora:name:w> tag cannot hold in its name
_TAG_UNSAFE = str.maketrans(dict.fromkeys(TAG_UNSAFE, "_"))


def tag_name(name: str) -> str:
    """A name as it can stand in an A1111 ``<lora:name:w>`` tag (``:``, ``<``, ``>`` become ``_``)."""
    return name.translate(_TAG_UNSAFE).strip()


def finite_number(value: Any, what: str) -> float:
    """``value`` as a finite float, or a ValueError that names ``what``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return number


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter of a mix: where it is, what it is called, how strong it is."""

    ref: str  # a file path, or "sha256:<hex>" resolved through the catalog
    name: str = ""
    weight: float = 1.0
    unet: float = 1.0  # multiplier of the weight in the UNet
    te: float = 1.0  # multiplier of the weight in the text encoder(s)
    sha256: str | None = None

    @property
    def label(self) -> str:
        """Display name (the file stem when no name is set)."""
        if self.name:
            return self.name
        stem = self.ref.rsplit("/", 1)[-1]
        return stem.rsplit(".", 1)[0] if "." in stem else stem

    def check(self) -> None:
        """Refuse NaN/Inf strengths (they turn the whole image black)."""
        for what, value in (("weight", self.weight), ("unet", self.unet), ("te", self.te)):
            finite_number(value, f"the {what} of LoRA {self.label!r}")


@dataclass(frozen=True)
class MixRecipe:
    """Everything that decides an image; defaults are diffusers' own (guidance 7.5, 50 steps)."""

    prompt: str
    negative_prompt: str = ""
    adapters: tuple[AdapterSpec, ...] = ()
    fusion: str = "linear"
    fusion_args: dict[str, Any] = field(default_factory=dict)
    model: str = "pocket"
    seed: int = 0
    steps: int = 50
    guidance: float = 7.5
    width: int | None = None  # None: the model's default size
    height: int | None = None
    sampler: str | None = None  # None: the model's own scheduler
    batch_size: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.fusion_args, dict):
            raise ValueError(
                f'fusion_args must be a JSON object of policy parameters, e.g. {{"checkpoint": "my-gate"}}; '
                f"got {type(self.fusion_args).__name__} {self.fusion_args!r}"
            )
        if (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, numbers.Integral)
            or not 0 <= self.seed <= MAX_SEED
        ):
            raise ValueError(
                f"seed must be a whole number from 0 to {MAX_SEED} (2^63 - 1), got {self.seed!r}"
            )

    def to_json(self) -> str:
        """Stable JSON (sorted keys) with a format version."""
        return json.dumps({"version": RECIPE_VERSION, **asdict(self)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MixRecipe:
        """Inverse of :meth:`to_json`; unknown keys are an error, not silently dropped."""
        data = json.loads(text)
        version = data.pop("version", RECIPE_VERSION)
        if version != RECIPE_VERSION:
            raise ValueError(f"recipe format version {version} is not supported")
        adapters = tuple(AdapterSpec(**a) for a in data.pop("adapters", []))
        try:
            return cls(adapters=adapters, **data)
        except TypeError as exc:
            raise ValueError(f"not a recipe: {exc}") from exc

    def with_(self, **changes: Any) -> MixRecipe:
        """A copy with some fields changed."""
        return replace(self, **changes)


_TAG = re.compile(r"<(lora|lyco):([^:>]+)((?::[^:>]*)*)>", re.IGNORECASE)


@dataclass(frozen=True)
class LoraTag:
    """An A1111 ``<lora:name:w>`` tag (``<lora:name:te:unet>``, ``te=``/``unet=``, loractl keyframes)."""

    name: str
    te: str = "1"
    unet: str | None = None

    def weights(self) -> tuple[float, float]:
        """Numeric (te, unet) strengths; keyframed values count as their first keyframe."""

        def num(v: str) -> float:
            return float(v.split(",")[0].split("@")[0])

        te = num(self.te)
        return te, num(self.unet) if self.unet is not None else te

    def is_scheduled(self) -> bool:
        """True when the tag carries loractl keyframes."""
        return "@" in self.te or (self.unet is not None and "@" in self.unet)


def parse_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """Split A1111 LoRA tags out of a prompt: (prompt without tags, tags in order)."""
    tags = []
    for m in _TAG.finditer(prompt):
        name = m[2].strip()
        args = [a for a in m[3].split(":")[1:]]
        pos = [a for a in args if "=" not in a]
        named = dict(a.split("=", 1) for a in args if "=" in a)
        te = named.get("te", pos[0] if pos else "1")
        unet = named.get("unet", pos[1] if len(pos) > 1 else None)
        for value in (te, unet):
            if value is not None and not re.fullmatch(r"[\d.@,;+\-\s]+", value):
                raise ValueError(f"bad weight {value!r} in LoRA tag {m[0]!r}")
        tags.append(LoraTag(name, te.strip(), unet.strip() if unet else None))
    clean = re.sub(r"\s{2,}", " ", _TAG.sub("", prompt)).strip().strip(",").strip()
    return clean, tags


def _fmt(x: float) -> str:
    return f"{x:g}"


def a1111_parameters(
    recipe: MixRecipe, short_hashes: dict[str, str], sampler_name: str, width: int, height: int
) -> str:
    """The ``parameters`` PNG text A1111 writes (and Civitai reads), LoRA tags and hashes included."""
    tags = []
    for a in recipe.adapters:
        te, unet, name = a.weight * a.te, a.weight * a.unet, tag_name(a.label)
        tags.append(f"<lora:{name}:{_fmt(te)}>" if te == unet else f"<lora:{name}:{_fmt(te)}:{_fmt(unet)}>")
    prompt = " ".join([recipe.prompt, *tags]).strip()
    fields = [
        f"Steps: {recipe.steps}",
        f"Sampler: {sampler_name}",
        f"CFG scale: {_fmt(recipe.guidance)}",
        f"Seed: {recipe.seed}",
        f"Size: {width}x{height}",
        f"Model: {recipe.model}",
    ]
    if short_hashes:
        joined = ", ".join(f"{tag_name(name)}: {h}" for name, h in short_hashes.items())
        fields.append(f'Lora hashes: "{joined}"')
    if recipe.fusion != "linear":
        fields.append(f"Fusion: {recipe.fusion}")
    fields.append("Version: adapter-studio")
    lines = [prompt]
    if recipe.negative_prompt:
        lines.append(f"Negative prompt: {recipe.negative_prompt}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def parse_a1111_parameters(text: str) -> dict[str, Any]:
    """Read A1111 ``parameters`` text: prompt, negative prompt and the key: value fields."""
    lines = text.strip().split("\n")
    last = lines[-1] if lines else ""
    fields: dict[str, Any] = {}
    if re.match(r"^\s*Steps:", last):
        lines = lines[:-1]
        for m in re.finditer(r'\s*([\w ]+):\s*("(?:\\.|[^"])*"|[^,]*)(?:,|$)', last):
            value = m[2].strip()
            fields[m[1].strip()] = value[1:-1] if value.startswith('"') else value
    text_body = "\n".join(lines)
    prompt, _, negative = text_body.partition("\nNegative prompt:")
    if text_body.startswith("Negative prompt:"):
        prompt, negative = "", text_body[len("Negative prompt:") :]
    return {"prompt": prompt.strip(), "negative_prompt": negative.strip(), **fields}
