"""A generation as plain data: the mix recipe, its JSON form and A1111's ``parameters`` text."""

from __future__ import annotations

import functools
import json
import math
import numbers
import re
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

RECIPE_VERSION = 1
MAX_SEED = 2**63 - 1  # the history stores seeds as signed 64-bit integers (SQL BIGINT)
RANDOM_SEEDS = 2**32  # a random seed (A1111's -1) is drawn from [0, 2^32), the range A1111 draws from
# Characters an A1111 <lora:name:w> tag cannot hold in its name: ":", "<", ">" end the tag or its name;
# A1111 drops ":" and "," from the names it writes in ``Lora hashes`` and maps a pasted tag back to its
# file only when the tag's name is exactly such a key, so "," is out too.
TAG_UNSAFE = ":<>,"
_TAG_UNSAFE = str.maketrans(dict.fromkeys(TAG_UNSAFE, "_"))


def tag_name(name: str) -> str:
    """A name as it can stand in an A1111 ``<lora:name:w>`` tag and be a ``Lora hashes`` key
    (``:``, ``<``, ``>``, ``,`` become ``_``)."""
    return name.translate(_TAG_UNSAFE).strip()


def random_seed() -> int:
    """A random seed for A1111's ``-1``: uniform in [0, 2^32)."""
    return secrets.randbelow(RANDOM_SEEDS)


def batch_seeds(seed: int, count: int) -> list[int]:
    """The seeds of a batch's images as A1111 gives them: seed, seed + 1, … (wrapping past MAX_SEED),
    so image ``i`` of a batch is the single image of seed + i."""
    return [(seed + i) % (MAX_SEED + 1) for i in range(count)]


def _shown(value: Any) -> str:
    """A value for an error message, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def finite_number(value: Any, what: str) -> float:
    """``value`` as a finite float, or a ValueError that names ``what``."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int beyond any float
        raise ValueError(f"{what} must be a number, got {_shown(value)}") from None
    if not math.isfinite(number):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return number


MAX_CLIP_SKIP = 12  # A1111's "Clip skip" slider goes from 1 to 12


def check_clip_skip(value: Any) -> None:
    """Refuse a clip skip that is not None or a whole number from 1 to 12 (A1111's range)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= MAX_CLIP_SKIP:
        raise ValueError(
            f"clip skip must be a whole number from 1 (the last layer) to {MAX_CLIP_SKIP}, got {value!r}"
        )


def infotext_clip_skip(params: dict[str, Any]) -> int | None:
    """The clip skip of parsed A1111 ``parameters`` (:func:`parse_a1111_parameters`): its ``Clip skip``
    field, None when absent (A1111 writes it only above 1)."""
    value = params.get("Clip skip")
    if value is None or not str(value).strip():
        return None
    try:
        skip = int(str(value).strip())
    except ValueError:
        raise ValueError(f"Clip skip must be a whole number, got {value!r}") from None
    check_clip_skip(skip)
    return skip


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter of a mix: where it is, what it is called, how strong it is."""

    ref: str  # a file path, or "sha256:<hex>" resolved through the catalog
    name: str = ""
    weight: float = 1.0
    unet: float = 1.0  # multiplier of the weight in the UNet
    te: float = 1.0  # multiplier of the weight in the text encoder(s)
    sha256: str | None = None
    # The name A1111 finds the file by (its file stem, or its ss_output_name alias); "" = the label.
    a1111_name: str = ""

    @property
    def label(self) -> str:
        """Display name (the file stem when no name is set)."""
        if self.name:
            return self.name
        stem = self.ref.replace("\\", "/").rsplit("/", 1)[-1]
        return stem.rsplit(".", 1)[0] if "." in stem else stem

    @property
    def tag(self) -> str:
        """The name of this adapter in an A1111 ``<lora:name:w>`` tag and in ``Lora hashes``."""
        return tag_name(self.a1111_name or self.label) or tag_name(self.label)

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
    # A1111's "Clip skip": 1 = the text encoder's last layer, 2 = the penultimate one; None = not set (1)
    clip_skip: int | None = None

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
        check_clip_skip(self.clip_skip)

    def to_json(self) -> str:
        """Stable JSON (sorted keys) with a format version; optional fields left at their default
        (``a1111_name``, ``clip_skip``) are not written, so the JSON stays what older versions read."""
        data = asdict(self)
        if data.get("clip_skip") is None:
            data.pop("clip_skip", None)
        for adapter in data["adapters"]:
            if not adapter.get("a1111_name"):
                adapter.pop("a1111_name", None)
        return json.dumps({"version": RECIPE_VERSION, **data}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MixRecipe:
        """Inverse of :meth:`to_json`, every field checked (a recipe may come from anyone's PNG); a
        ValueError names the field. Unknown keys are an error, not silently dropped: a newer studio
        writes a new field only when it changes the image, so replaying without it would not be exact."""
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:  # bad JSON, an int of too many digits, nesting too deep
            raise ValueError(f"the recipe is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(f"the recipe is not a JSON object, got {_shown(data)}")
        version = data.pop("version", RECIPE_VERSION)
        if version != RECIPE_VERSION or isinstance(version, bool) or not isinstance(version, int):
            newer = " (written by a newer Adapter Studio: upgrade to replay it)" if _newer(version) else ""
            raise ValueError(
                f"recipe format version {_shown(version)} is not supported; this studio reads version "
                f"{RECIPE_VERSION}{newer}"
            )
        _check_fields(data, _RECIPE_CHECKS, "recipe")
        adapters = data.pop("adapters", [])
        if not isinstance(adapters, list):
            raise ValueError(f"recipe field 'adapters' must be a list of adapters, got {_shown(adapters)}")
        specs = []
        for i, adapter in enumerate(adapters, 1):
            if not isinstance(adapter, dict):
                raise ValueError(f"recipe adapter {i} must be a JSON object, got {_shown(adapter)}")
            _check_fields(adapter, _ADAPTER_CHECKS, f"recipe adapter {i}")
            specs.append(AdapterSpec(**adapter))
        return cls(adapters=tuple(specs), **data)

    def with_(self, **changes: Any) -> MixRecipe:
        """A copy with some fields changed."""
        return replace(self, **changes)


def _newer(version: Any) -> bool:
    """Whether a recipe's ``version`` is a format version after this studio's."""
    return isinstance(version, int) and not isinstance(version, bool) and version > RECIPE_VERSION


def _text(value: Any) -> str | None:
    """None for text, else what was expected (so for every check below)."""
    return None if isinstance(value, str) else "text"


def _name(value: Any) -> str | None:
    """Non-empty text."""
    return None if isinstance(value, str) and value.strip() else "non-empty text"


def _count(value: Any) -> str | None:
    """A whole number of 1 or more (not a bool, not 2.0)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    return None if ok else "a whole number of 1 or more"


def _size(value: Any) -> str | None:
    """None (the model's size) or a whole number of 1 or more."""
    return None if value is None or _count(value) is None else "null or a whole number of 1 or more"


def _finite(value: Any) -> str | None:
    """A finite number (JSON as Python reads it allows NaN, Infinity and 1e400)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    try:
        return None if ok and math.isfinite(value) else "a finite number"
    except OverflowError:  # an int beyond any float
        return "a finite number"


def _optional_text(value: Any) -> str | None:
    """None or text."""
    return None if value is None or isinstance(value, str) else "null or text"


def _sha256(value: Any) -> str | None:
    """None or 64 hex digits."""
    ok = value is None or (isinstance(value, str) and _SHA256.fullmatch(value) is not None)
    return None if ok else "null or a SHA-256 (64 hex digits)"


def _any(value: Any) -> str | None:
    """Anything: checked elsewhere (``adapters`` below; seed, fusion_args, clip_skip by MixRecipe)."""
    return None


_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
# field → check (the expected kind of value when it does not fit); fields without a default are required
_RECIPE_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "prompt": _text,
    "negative_prompt": _text,
    "adapters": _any,
    "fusion": _name,
    "fusion_args": _any,
    "model": _name,
    "seed": _any,
    "steps": _count,
    "guidance": _finite,
    "width": _size,
    "height": _size,
    "sampler": _optional_text,
    "batch_size": _count,
    "clip_skip": _any,
}
_ADAPTER_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "ref": _name,
    "name": _text,
    "weight": _finite,
    "unet": _finite,
    "te": _finite,
    "sha256": _sha256,
    "a1111_name": _text,
}
_REQUIRED = {"prompt", "ref"}


def _check_fields(data: dict[str, Any], checks: dict[str, Callable[[Any], str | None]], where: str) -> None:
    """Refuse unknown, missing or mistyped fields of a recipe (or one of its adapters), naming the field."""
    for key in data:
        if key not in checks:
            raise ValueError(
                f"{where} field {_shown(key)} is unknown to this version of Adapter Studio (a recipe from "
                "a newer one?); it is refused rather than replayed without that field"
            )
    for key in _REQUIRED & checks.keys():
        if key not in data:
            raise ValueError(f"{where} field {key!r} is missing")
    for key, value in data.items():
        if (expected := checks[key](value)) is not None:
            raise ValueError(f"{where} field {key!r} must be {expected}, got {_shown(value)}")


_TAG = re.compile(r"<(lora|lyco):([^:>]+)((?::[^:>]*)*)>", re.IGNORECASE)
_NUMBER = re.compile(r"\s*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\s*")
# loractl's hires-pass weights: the studio has no hires pass, so they change nothing here
_HIRES_ARGS = frozenset({"hr", "hrte", "hrunet"})


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


def _check_weight(value: str, tag: str) -> str:
    """A tag's weight: a finite number (``0.8``, ``1e-3``) or loractl keyframes (``0@0,1@0.5``)."""
    value = value.strip()
    if "@" in value:
        parts = [p for p in re.split(r"[,;]", value) if p.strip()]
        numbers_ = [x for p in parts for x in p.split("@")]
        ok = bool(parts) and all(len(p.split("@")) <= 2 for p in parts)
        if ok and all(_NUMBER.fullmatch(x) and math.isfinite(float(x)) for x in numbers_):
            return value
        raise ValueError(f"bad weight {value!r} in LoRA tag {tag!r}: loractl keyframes are weight@position,…")
    if _NUMBER.fullmatch(value) and math.isfinite(float(value)):
        return value
    hint = ""
    if re.fullmatch(r"[\d.,\s+-]+", value):
        hint = (
            ": numbers without @positions are not loractl keyframes; block weights "
            "(sd-webui-lora-block-weight) belong to the blocks fusion policy"
        )
    raise ValueError(f"bad weight {value!r} in LoRA tag {tag!r}{hint}")


def _unsupported(key: str, value: str, tag: str) -> ValueError:
    """The error for a tag argument the studio cannot follow (rather than an image that silently differs)."""
    if key == "lbw" or key in ("start", "stop", "step"):
        return ValueError(
            f"LoRA tag {tag!r}: {key}={value} is sd-webui-lora-block-weight syntax, which prompt tags here "
            "do not carry; add the LoRA to the mix and use the blocks fusion policy (per-adapter block "
            f'presets or vectors, e.g. {{"blocks": "{value if key == "lbw" else "OUTD"}"}})'
        )
    if key == "dyn":
        return ValueError(f"LoRA tag {tag!r}: dyn={value} (a DyLoRA rank cut) is not supported")
    return ValueError(f"LoRA tag {tag!r}: unknown argument {key}={value} (known: te=, unet= and keyframes)")


def parse_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """Split A1111 LoRA tags out of a prompt: (prompt without tags, tags in order).

    As A1111: ``<lora:name>`` is weight 1, ``<lora:name:te>``, ``<lora:name:te:unet>``, named ``te=`` /
    ``unet=``; ``<lyco:…>`` is the same. Arguments the studio cannot honour (``lbw=``, ``dyn=`` or a
    fourth positional value, block-weight vectors) are a ValueError, not silently dropped."""
    # A tag ends at the first ">" after it: searching the text past the last ">" would only backtrack,
    # over and over (minutes for 100 kB of "<lora:a" with no ">")
    end = prompt.rfind(">") + 1
    tags = []
    for m in _TAG.finditer(prompt, 0, end):
        name, tag = m[2].strip(), m[0]
        args = m[3].split(":")[1:]
        pos = [a for a in args if "=" not in a]
        named: dict[str, str] = {}
        for a in args:
            if "=" in a:
                key, value = a.split("=", 1)
                named[key.strip().lower()] = value.strip()
        if len(pos) > 2:  # A1111: the DyLoRA rank; some forks: a block-weight vector
            raise _unsupported("lbw" if "," in pos[2] else "dyn", pos[2].strip(), tag)
        for key, value in named.items():
            if key not in ("te", "unet") and key not in _HIRES_ARGS:
                raise _unsupported(key, value, tag)
        te = _check_weight(named.get("te", pos[0] if pos else "1"), tag)
        unet = named.get("unet", pos[1] if len(pos) > 1 else None)
        tags.append(LoraTag(name, te, None if unet is None else _check_weight(unet, tag)))
    clean = re.sub(r"\s{2,}", " ", _TAG.sub("", prompt[:end]) + prompt[end:]).strip().strip(",").strip()
    return clean, tags


def _fmt(x: float) -> str:
    """A number as A1111 infotext shows it (``7``, ``0.8``; 10 significant digits)."""
    return f"{x:.10g}"


def quote(value: Any) -> str:
    """An infotext value as A1111's ``quote`` writes it: JSON-quoted when it holds ``,``, ``:`` or a
    line break (which would end or split the ``Key: value`` field), else as is."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(value: str) -> str:
    """Inverse of :func:`quote` (A1111's ``unquote``): a JSON string is decoded, anything else kept."""
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return value
    try:
        decoded = json.loads(value)
    except ValueError:
        return value
    return decoded if isinstance(decoded, str) else value


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def model_title(model: str) -> str:
    """The model as A1111 names it in infotext: a checkpoint's file stem or a folder's name, never the
    local path around it (which would leak the user's folders); a Hub id or ``pocket`` as it is."""
    text = model.strip()
    checkpoint = text.lower().endswith((".safetensors", ".ckpt"))
    if _HUB_ID.match(text) and not checkpoint:
        return text
    name = re.split(r"[/\\]", text.rstrip("/\\"))[-1]
    return name.rsplit(".", 1)[0] if checkpoint else name


def a1111_parameters(
    recipe: MixRecipe, short_hashes: dict[str, str], sampler_name: str, width: int, height: int
) -> str:
    """The ``parameters`` PNG text A1111 writes (and Civitai reads), LoRA tags and hashes included.

    Tags name each adapter by :attr:`AdapterSpec.tag` (its A1111 file name when known), and
    ``Lora hashes`` (``short_hashes``: label → A1111's 12-hex hash) uses exactly those names, so A1111's
    paste maps a tag to the local file with that hash even where the names differ."""
    tags, hashes = [], {}
    for a in recipe.adapters:
        te, unet, name = a.weight * a.te, a.weight * a.unet, a.tag
        tags.append(f"<lora:{name}:{_fmt(te)}>" if te == unet else f"<lora:{name}:{_fmt(te)}:{_fmt(unet)}>")
        if short_hashes.get(a.label):
            hashes.setdefault(name, short_hashes[a.label])
    prompt = " ".join([recipe.prompt, *tags]).strip()
    fields: dict[str, Any] = {
        "Steps": recipe.steps,
        "Sampler": sampler_name,
        "CFG scale": _fmt(recipe.guidance),
        "Seed": recipe.seed,
        "Size": f"{width}x{height}",
        "Model": model_title(recipe.model),
        "Clip skip": recipe.clip_skip if (recipe.clip_skip or 1) > 1 else None,  # A1111 omits 1
        "Lora hashes": ", ".join(f"{k}: {h}" for k, h in hashes.items()) or None,
        "Fusion": None if recipe.fusion == "linear" else recipe.fusion,
        "Version": "adapter-studio",
    }
    lines = [prompt]
    if recipe.negative_prompt:
        lines.append(f"Negative prompt: {recipe.negative_prompt}")
    lines.append(", ".join(f"{k}: {quote(v)}" for k, v in fields.items() if v is not None))
    return "\n".join(lines).strip()


_FIELD_END = re.compile(r"\s*(?:,|$)")
_JSON = json.JSONDecoder()
# Values that look like JSON but are not tried before the rest are read as plain text (Civitai writes
# two JSON fields; thousands of failing ones would take the decoder quadratic time)
_JSON_TRIES = 16
_SPACES = re.compile(r"\s*")
_WORD = re.compile(r"\w")


@functools.lru_cache(maxsize=8)
def _field_patterns(key_chars: str, empty_quotes: bool) -> tuple[re.Pattern[str], re.Pattern[str]]:
    """The key-character run and the quoted value of :func:`search_field`."""
    quoted = r'"(?:\\.|[^\\"])*+"' if empty_quotes else r'"(?:\\.|[^\\"])++"'
    return re.compile(f"[{key_chars}]*"), re.compile(quoted)


def search_field(
    line: str, pos: int = 0, *, key_chars: str = r"\w \-/", min_key: int = 2, empty_quotes: bool = False
) -> tuple[str, str, int, int] | None:
    """A1111's infotext field regex ``re_param`` searched from ``pos``, in linear time: (key, value,
    value start, end) of the first ``\\s*(KEY):\\s*("json string"|[^,]*)(?:,|$)``, KEY a word character
    then ``key_chars``, ``min_key`` long or more (A1111: ``\\w[\\w \\-/]+``). The regex itself
    backtracks quadratically over a long run of key characters without a colon (minutes for 100 kB)."""
    key_tail, quoted = _field_patterns(key_chars, empty_quotes)
    lo = pos
    while (colon := line.find(":", lo)) >= 0:
        run = key_tail.match(line[lo:colon][::-1])  # the key characters before the colon, read backwards
        word = _WORD.search(line, colon - (run.end() if run else 0), colon)
        if word is not None and colon - word.start() >= min_key:
            spaces = _SPACES.match(line, colon + 1)
            start = spaces.end() if spaces else colon + 1
            value = quoted.match(line, start)
            if value is not None and (value.end() == len(line) or line[value.end()] == ","):
                stop = value.end()
            else:
                comma = line.find(",", start)
                stop = len(line) if comma < 0 else comma
            return line[word.start() : colon], line[start:stop], start, min(stop + 1, len(line))
        lo = colon + 1
    return None


def _fields(line: str) -> list[tuple[str, str]]:
    """The ``Key: value`` fields of an infotext line, as A1111's ``re_param.findall`` finds them; a value
    that is a whole JSON array or object (Civitai's ``Civitai resources: [...]``) is kept whole."""
    found = []
    pos = 0
    json_tries = _JSON_TRIES
    while (m := search_field(line, pos)) is not None:
        key, value, start, pos = m
        if json_tries > 0 and line.startswith(("[", "{"), start):
            try:
                stop = _JSON.raw_decode(line, start)[1]
            except (ValueError, RecursionError):  # not JSON, or nested too deep for the decoder
                stop = -1
            end = _FIELD_END.match(line, stop) if stop > 0 else None
            if end is not None:
                value, pos = line[start:stop], end.end()
            else:  # each failure costs the decoder time in proportion to ``start`` (its error position)
                json_tries -= 1
        found.append((key.strip(), value))
        if pos >= len(line):
            break
    return found


def parse_a1111_parameters(text: str) -> dict[str, Any]:
    """Read A1111 ``parameters`` text (A1111, Forge, Civitai) by A1111's rules
    (``infotext_utils.parse_generation_parameters``): the last line holds the fields only if it has at
    least three ``Key: value`` pairs; the lines before are the prompt until one starts with
    ``Negative prompt:``; quoted values are JSON strings. Returns ``prompt``, ``negative_prompt`` and
    every field by its A1111 name (values as text, ``Size`` as ``WxH``)."""
    *lines, last = text.strip().replace("\r\n", "\n").replace("\r", "\n").split("\n")
    fields = _fields(last)
    if len(fields) < 3:
        lines.append(last)
        fields = []
    prompt: list[str] = []
    negative: list[str] = []
    for raw in lines:
        line = raw.strip()
        if line.startswith("Negative prompt:"):
            negative.append(line[len("Negative prompt:") :].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    out: dict[str, Any] = {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative)}
    for key, value in fields:
        out[key] = unquote(value.strip())
    return out
