"""Format, base family and trigger words from a LoRA's tensor names, shapes and metadata."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping

from pipelines.lora_formats.architectures import POCKET

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
# Top-level module names of a CLIP text model (transformers 4 and 5 layouts): PEFT files of a text
# encoder carry no component prefix.
TEXT_ROOTS = ("text_model.", "encoder.", "embeddings.", "final_layer_norm", "text_projection")
LEGACY_MARKERS = (
    ".processor.",
    "_lora.down.",
    "_lora.up.",
    ".lora_linear_layer.",
    ".lora.down.",
    ".lora.up.",
)

# Cross-attention key width (attn2.to_k in_features) and text-encoder width per family.
CROSS_ATTENTION_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl", POCKET.text_hidden: "pocket"}
TEXT_WIDTH = {768: "sd1", 1024: "sd2", 1280: "sdxl", POCKET.text_hidden: "pocket"}
_SDXL_KEY = re.compile(
    r"^lora_te2_|(^|\.)text_encoder_2\.|^lora_unet_label_emb_|add_embedding|transformer_blocks[._][1-9]"
    r"|^lora_unet_output_blocks_[012]_1_(?!conv(\.|$))"  # attention in SDXL's first up level
)
# kohya names in SGM/LDM block numbering: SDXL's (kohya-ss trains SDXL on that UNet) or, from some
# tools, SD 1.x/2.x's; these blocks exist only in the four-level SD 1.x/2.x UNet (attention at the
# first level, a fourth level, attention at the last up level, the first up level's upsampler).
_LDM_KEY = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks)_")
_SD12_LDM_KEY = re.compile(
    r"^lora_unet_(input_blocks_[12]_1_|input_blocks_(9|10|11)_|output_blocks_(9|10|11)_|output_blocks_[678]_1_"
    r"|output_blocks_2_1_conv(\.|$))"
)
_DOWN_FACTOR = re.compile(r"(lora[._]down|lora_A(\.[^.]+)?)\.weight$|hada_w[12]_b$")


def detect_format(keys: Iterable[str]) -> str | None:
    """``lycoris_lokr``, ``lycoris_loha``, ``dora``, ``kohya``, ``peft``, ``diffusers_legacy``,
    ``diffusers``, or None when no key follows a known LoRA naming."""
    keys = list(keys)
    parts = [key.rsplit(".", 1)[-1] for key in keys]
    checks = (
        ("lycoris_lokr", any(p.startswith("lokr_") for p in parts)),
        ("lycoris_loha", any(p.startswith("hada_") for p in parts)),
        ("dora", any(p in ("dora_scale", "lora_magnitude_vector") for p in parts)),
        ("kohya", any(k.startswith(KOHYA_PREFIXES) and ".lora_down." in k for k in keys)),
        ("peft", any(k.startswith("base_model.model.") for k in keys)),
        ("diffusers_legacy", any(m in k for k in keys for m in LEGACY_MARKERS)),
        ("diffusers", any(".lora_A." in k or ".lora_B." in k for k in keys)),
    )
    return next((name for name, hit in checks if hit), None)


def family_from_metadata(metadata: Mapping[str, str]) -> str | None:
    """Family from ``modelspec.architecture`` or kohya's ``ss_base_model_version`` / ``ss_v2``."""
    arch = metadata.get("modelspec.architecture", "").split("/")[0].lower()
    base = metadata.get("ss_base_model_version", "").lower()
    for value, rules in ((arch, _ARCH_RULES), (base, _BASE_RULES)):
        for prefix, family in rules:
            if value.startswith(prefix) and "refiner" not in value:
                return family
    return "sd2" if metadata.get("ss_v2", "").lower() == "true" else None


_ARCH_RULES = (
    ("stable-diffusion-xl", "sdxl"),
    ("stable-diffusion-v2", "sd2"),
    ("stable-diffusion-v1", "sd1"),
    ("adapter-studio-pocket", "pocket"),
)
_BASE_RULES = (("sdxl", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd1"), ("pocket", "pocket"))


def family_from_names(keys: Iterable[str]) -> str | None:
    """``sdxl`` when a name exists only in SDXL LoRAs (second text encoder, ``label_emb`` /
    ``add_embedding``, a transformer block index above 0, attention in the first up level); else None."""
    return "sdxl" if any(_SDXL_KEY.search(key) for key in keys) else None


def family_from_layout(keys: Iterable[str]) -> str | None:
    """``sdxl`` for kohya SGM/LDM block names that fit SDXL's three-level UNet; None when there are
    none or some exist only in SD 1.x/2.x's four-level UNet (``input_blocks_1_1_…``, ``…_11_…``)."""
    ldm = [key for key in keys if _LDM_KEY.match(key)]
    return "sdxl" if ldm and not any(_SD12_LDM_KEY.match(key) for key in ldm) else None


_CROSS_MARKERS = ("attn2.to.k", "attn2.processor.to.k")
_TEXT_MARKERS = ("self.attn.q.proj", "self.attn.to.q")


def cross_attention_family(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """Family from the cross-attention key width (``attn2.to_k`` input)."""
    width = _input_width(shapes, _CROSS_MARKERS)
    return None if width is None else CROSS_ATTENTION_WIDTH.get(width)


def text_encoder_family(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """Family from the (first) text encoder's width (``q_proj`` input)."""
    width = _input_width(shapes, _TEXT_MARKERS)
    return None if width is None else TEXT_WIDTH.get(width)


def family_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """Family from the cross-attention key width (``attn2.to_k`` input), else the text-encoder width."""
    if _input_width(shapes, _CROSS_MARKERS) is not None:
        return cross_attention_family(shapes)
    return text_encoder_family(shapes)


def _input_width(shapes: Mapping[str, tuple[int, ...]], markers: tuple[str, ...]) -> int | None:
    """in_features of the first module whose dotted name holds a marker, from any factor layout."""
    lokr: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        dotted = key.replace("_", ".")
        if not any(m in dotted for m in markers) or "te2" in key or "text_encoder_2" in key:
            continue
        part = key.rsplit(".", 1)[-1]
        if part.startswith("lokr_"):
            lokr.setdefault(key.rsplit(".", 1)[0], {})[part] = shape
        elif (_DOWN_FACTOR.search(key) or dotted.endswith(markers)) and len(shape) >= 2:
            return int(shape[1])
    for parts in lokr.values():
        w1 = parts.get("lokr_w1") or parts.get("lokr_w1_b")
        w2 = parts.get("lokr_w2") or parts.get("lokr_w2_b")
        if w1 and w2:
            return int(w1[1] * w2[1])
    return None


def detect_family(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str]) -> str | None:
    """Base family: metadata first, then SDXL-only names, the cross-attention width, the UNet layout
    of SGM block names, the text-encoder width; None if undecidable."""
    if (family := family_from_metadata(metadata) or family_from_names(shapes)) is not None:
        return family
    if _input_width(shapes, _CROSS_MARKERS) is not None:
        return cross_attention_family(shapes)
    return family_from_layout(shapes) or text_encoder_family(shapes)


# a caption tag counts as a trained word when at least this share of its dataset's pictures carry it
# (kohya puts the activation tag in every caption) and it is short (whole-sentence captions are not)
TRIGGER_SHARE = 0.5
TRIGGER_MAX_WORDS = 4
TRIGGER_MAX_TAGS = 8


def trigger_words(metadata: Mapping[str, str]) -> list[str]:
    """``modelspec.trigger_phrase`` (comma-separated), then the ``ss_tag_frequency`` tags that at least
    half of a dataset's pictures carry (short ones, most frequent first, at most eight)."""
    words = [w.strip() for w in metadata.get("modelspec.trigger_phrase", "").split(",")]
    counts = _frequent_tags(metadata.get("ss_tag_frequency", ""), _image_counts(metadata))
    words += sorted(counts, key=lambda tag: (-counts[tag], tag))[:TRIGGER_MAX_TAGS]
    seen: set[str] = set()
    unique = []
    for word in words:
        if word and word.lower() not in seen:
            seen.add(word.lower())
            unique.append(word)
    return unique


def metadata_json(raw: str) -> object:
    """A metadata value parsed as JSON, or None when it is not JSON (including JSON that Python
    refuses: nesting past the recursion limit, integers of more than 4300 digits)."""
    try:
        return json.loads(raw) if raw else None
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        return None


def _image_counts(metadata: Mapping[str, str]) -> dict[str, int]:
    """Pictures per dataset folder from kohya's ``ss_dataset_dirs`` (``{dir: {"img_count": n}}``)."""
    dirs = metadata_json(metadata.get("ss_dataset_dirs", ""))
    out = {}
    for name, info in dirs.items() if isinstance(dirs, dict) else ():
        n = info.get("img_count") if isinstance(info, dict) else None
        if isinstance(n, int) and n > 0:
            out[name] = n
    return out


def dataset_tag_counts(raw: str) -> dict[str, dict[str, float]]:
    """Kohya's ``ss_tag_frequency`` JSON (``{dataset: {tag: count}}``) with tags stripped; empty tags,
    non-numeric counts and malformed JSON are skipped."""
    datasets = metadata_json(raw)
    out: dict[str, dict[str, float]] = {}
    for name, tags in datasets.items() if isinstance(datasets, dict) else ():
        clean: dict[str, float] = {}
        for tag, count in tags.items() if isinstance(tags, dict) else ():
            key = tag.strip() if isinstance(tag, str) else ""
            if key and isinstance(count, int | float):
                clean[key] = clean.get(key, 0) + count
        if clean:
            out[name] = clean
    return out


def _frequent_tags(raw: str, images: Mapping[str, int]) -> Counter[str]:
    """Kohya's tag counts reduced to likely trained words: per dataset, the tags of at most
    :data:`TRIGGER_MAX_WORDS` words carried by ≥ :data:`TRIGGER_SHARE` of its pictures (the picture
    count from ``images``, else the dataset's most frequent tag) and by at least two of them; counts
    summed over datasets."""
    counts: Counter[str] = Counter()
    for name, tags in dataset_tag_counts(raw).items():
        n = images.get(name) or max(tags.values())
        for tag, count in tags.items():
            if count >= max(2.0, TRIGGER_SHARE * n) and len(tag.split()) <= TRIGGER_MAX_WORDS:
                counts[tag] += count
    return counts


def components_of(keys: Iterable[str]) -> set[str]:
    """Pipeline components a set of LoRA tensor names adapts."""
    found = set()
    for key in keys:
        bare = key.removeprefix("base_model.model.")
        if key.startswith("lora_te2_") or bare.startswith("text_encoder_2."):
            found.add("text_encoder_2")
        elif key.startswith(("lora_te_", "lora_te1_")) or bare.startswith(("text_encoder.", *TEXT_ROOTS)):
            found.add("text_encoder")
        else:
            found.add("unet")
    return found
