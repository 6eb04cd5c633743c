"""Training pictures: folder scan, captions, aspect-ratio buckets, a seeded batch plan, latent cache."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers.training_utils import find_nearest_bucket, generate_aspect_ratio_buckets
from PIL import Image
from safetensors.torch import load_file, save_file

from pipelines.images import ImageLimits, ImageUploadError, open_image
from pipelines.training.config import TrainSpec

SIDECAR_SUFFIXES = {".txt", ".caption", ".json", ".md", ".npz", ".toml"}


@dataclass(frozen=True)
class ImageItem:
    """A training picture and its caption (None: decided by the spec's caption rules)."""

    path: Path
    caption: str | None = None


@dataclass(frozen=True)
class Example:
    """A picture ready to train on: its caption, bucket (h, w), original size and crop corner."""

    path: Path
    caption: str
    bucket: tuple[int, int]
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]


def items_from_folder(folder: str | Path) -> list[ImageItem]:
    """Every picture in ``folder`` (sorted), with the text of a same-stem ``.txt`` as its caption."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"no such image folder: {root}")
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    pictures = [p for p in files if p.suffix.lower() not in SIDECAR_SUFFIXES]
    if not pictures:
        raise ValueError(f"{root} holds no pictures")
    items = []
    for path in pictures:
        txt = path.with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8").strip() if txt.is_file() else None
        items.append(ImageItem(path, caption or None))
    return items


def caption_for(item: ImageItem, spec: TrainSpec) -> str:
    """The caption to train with: the item's own text (trigger ensured) or the template."""
    if spec.caption_source == "txt" and item.caption is None:
        raise ValueError(f"{item.path.name}: caption_source is 'txt' but there is no caption for it")
    if item.caption is None or spec.caption_source == "template":
        return spec.fill(spec.caption_template)
    text = spec.fill(item.caption.replace("[trigger]", "{trigger}"))
    has_trigger = re.search(rf"(?<!\w){re.escape(spec.trigger)}(?!\w)", text) is not None
    return text if has_trigger else f"{spec.trigger}, {text}"


def buckets_for(resolution: int, divisibility: int, bucketing: bool) -> list[tuple[int, int]]:
    """(h, w) buckets near resolution² pixels (diffusers' ladder), or the one square."""
    square = (resolution // divisibility * divisibility,) * 2
    if not bucketing:
        return [square]
    ladder = generate_aspect_ratio_buckets(resolution, divisibility=divisibility)
    return sorted({square, *((h, w) for h, w in ladder if min(h, w) >= divisibility)})


def fit_to_bucket(img: Image.Image, bucket: tuple[int, int]) -> tuple[Image.Image, tuple[int, int]]:
    """Resize to cover the bucket, then centre-crop; returns (picture, crop top-left)."""
    bh, bw = bucket
    scale = max(bh / img.height, bw / img.width)
    size = (max(bw, round(img.width * scale)), max(bh, round(img.height * scale)))
    img = img.resize(size, Image.Resampling.BICUBIC) if size != img.size else img
    top, left = (img.height - bh) // 2, (img.width - bw) // 2
    return img.crop((left, top, left + bw, top + bh)), (top, left)


def prepare_examples(
    items: Sequence[ImageItem],
    spec: TrainSpec,
    buckets: list[tuple[int, int]],
    limits: ImageLimits = ImageLimits(),
) -> list[Example]:
    """Validate every picture, caption it and give it a bucket; one error lists every bad file."""
    examples, errors = [], []
    for item in items:
        try:
            img = open_image(item.path, limits)
        except ImageUploadError as exc:
            errors.append(str(exc))
            continue
        bucket = buckets[find_nearest_bucket(img.height, img.width, buckets)]
        crop = fit_to_bucket(img, bucket)[1]
        examples.append(Example(item.path, caption_for(item, spec), bucket, (img.height, img.width), crop))
    if errors:
        raise ImageUploadError("; ".join(errors))
    return examples


def load_pixels(example: Example, limits: ImageLimits = ImageLimits()) -> torch.Tensor:
    """The example's picture as a float tensor 3×h×w in [-1, 1]."""
    img, _ = fit_to_bucket(open_image(example.path, limits), example.bucket)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def examples_fingerprint(examples: Sequence[Example]) -> str:
    """Hash of the pictures' bytes and buckets (names the latent cache of exactly this data)."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(hashlib.sha256(ex.path.read_bytes()).digest())
        h.update(repr(ex.bucket).encode())
    return h.hexdigest()[:16]


def tag_frequency(captions: Sequence[str]) -> dict[str, int]:
    """How often each comma-separated tag occurs (kohya's ``ss_tag_frequency`` counting)."""
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(tag.strip() for tag in caption.split(",") if tag.strip())
    return dict(counts)


class BatchPlan:
    """Which examples make up micro-batch ``i``: a pure function of (seed, i), one bucket per batch."""

    def __init__(self, buckets: Sequence[tuple[int, int]], batch_size: int, seed: int) -> None:
        self.batch_size, self.seed = batch_size, seed
        groups: dict[tuple[int, int], list[int]] = {}
        for i, b in enumerate(buckets):
            groups.setdefault(b, []).append(i)
        self.groups = [groups[b] for b in sorted(groups)]
        self.per_epoch = sum(-(-len(g) // batch_size) for g in self.groups)
        self._epoch: tuple[int, list[list[int]]] | None = None

    def epoch(self, epoch: int) -> list[list[int]]:
        """All batches of one epoch: each bucket shuffled and chunked, then the batches shuffled."""
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for group in self.groups:
            order = [group[j] for j in rng.permutation(len(group))]
            batches += [order[k : k + self.batch_size] for k in range(0, len(order), self.batch_size)]
        return [batches[j] for j in rng.permutation(len(batches))]

    def batch(self, index: int) -> list[int]:
        """Example indices of micro-batch ``index`` (counting across epochs)."""
        epoch, pos = divmod(index, self.per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, self.epoch(epoch))
        return self._epoch[1][pos]


def encode_pixels(vae: torch.nn.Module, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """VAE latents scaled for the UNet: (sample − shift) · scaling_factor (SD/SDXL convention)."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    z = dist.sample(generator=generator)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z - shift) * vae.config.scaling_factor


class LatentCache:
    """Each example encoded once with its own seeded VAE sample, kept in memory and on disk."""

    def __init__(
        self, vae: torch.nn.Module, examples: Sequence[Example], seed: int, path: Path | None
    ) -> None:
        self.vae, self.examples, self.seed, self.path = vae, examples, seed, path
        self.latents: dict[int, torch.Tensor] = {}
        if path is not None and path.exists():
            stored = load_file(str(path))
            self.latents = {int(k): v for k, v in stored.items() if int(k) < len(examples)}

    @torch.no_grad()
    def fill(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Encode every example not cached yet, then write the cache file."""
        missing = [i for i in range(len(self.examples)) if i not in self.latents]
        for n, i in enumerate(missing):
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
            pixels = load_pixels(self.examples[i])[None]
            self.latents[i] = encode_pixels(self.vae, pixels, gen)[0].float().cpu()
            if progress is not None:
                progress(n + 1, len(missing))
        if missing and self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            save_file({str(k): v.contiguous() for k, v in self.latents.items()}, str(self.path))

    def get(self, indices: Sequence[int]) -> torch.Tensor:
        """Stacked latents of some examples (all from one bucket)."""
        return torch.stack([self.latents[i] for i in indices])
