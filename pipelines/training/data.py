"""Training pictures: folder scan, captions, aspect-ratio buckets, a seeded batch plan, latent cache."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers.training_utils import find_nearest_bucket, generate_aspect_ratio_buckets
from PIL import Image
from safetensors.torch import load_file, save_file

from pipelines.images import ImageLimits, ImageUploadError, open_image
from pipelines.training.config import TrainSpec

log = logging.getLogger(__name__)

KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")
CAPTION_SUFFIXES = (".txt", ".caption")  # in order of preference
SIDECAR_SUFFIXES = {".txt", ".caption", ".json", ".md", ".npz", ".toml"}


@dataclass(frozen=True)
class ImageItem:
    """A training picture and its caption (None: decided by the spec's caption rules)."""

    path: Path
    caption: str | None = None
    repeats: int = 1  # times it is seen per epoch (kohya's ``N_name`` folders)
    dataset: str = "images"  # the folder it came from (kohya's ``ss_dataset_dirs`` key)


@dataclass(frozen=True)
class Example:
    """A picture ready to train on: its caption, bucket (h, w), original size and crop corner."""

    path: Path
    caption: str
    bucket: tuple[int, int]
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    repeats: int = 1
    dataset: str = "images"


def items_from_folder(folder: str | Path) -> list[ImageItem]:
    """Every picture in ``folder`` (sorted) with its caption, and those of kohya ``N_name`` subfolders.

    A picture in ``10_zqx star/`` is seen 10 times per epoch (kohya_ss's repeats).
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"no such image folder: {root}")
    items = [ImageItem(p, read_caption(p)) for p in _pictures_in(root)]
    others = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (repeats := kohya_repeats(sub)) is None:
            others.append(sub.name)
            continue
        items += [ImageItem(p, read_caption(p), repeats, sub.name) for p in _pictures_in(sub)]
    if not items:
        raise ValueError(no_pictures_message(root, others))
    return items


def no_pictures_message(root: Path, subfolders: list[str]) -> str:
    """Why a folder gave no pictures, naming the subfolders that were not read (not kohya ``N_name``)."""
    hint = f" (subfolders are read only when named like kohya's '10_name': {', '.join(subfolders)})"
    return f"{root} holds no pictures" + (hint if subfolders else "")


def picture_files(files: Iterable[Path]) -> list[Path]:
    """The picture files among some files (captions and other sidecars left out)."""
    return [p for p in files if p.suffix.lower() not in SIDECAR_SUFFIXES]


def _pictures_in(folder: Path) -> list[Path]:
    """The visible picture files directly in a folder, sorted."""
    return picture_files(sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")))


def kohya_repeats(folder: Path) -> int | None:
    """N for a kohya_ss dataset folder named ``N_concept`` (N ≥ 1), else None."""
    m = KOHYA_FOLDER.match(folder.name)
    return int(m.group(1)) if m and int(m.group(1)) >= 1 else None


def read_caption(picture: Path) -> str | None:
    """The picture's caption: its ``.txt``, else its ``.caption`` (sd-scripts' default extension)."""
    for suffix in CAPTION_SUFFIXES:
        if (file := picture.with_suffix(suffix)).is_file():
            return read_caption_file(file) or None
    return None


def read_caption_file(file: Path) -> str:
    """A caption file's text, stripped, a UTF-8 BOM dropped; a file that is not UTF-8 is an error naming it.

    sd-scripts reads captions as UTF-8 too, so kohya_ss users' files already are; guessing a code page
    (cp1252, latin-1) would silently train on mojibake tags instead of telling them which file to fix.
    """
    try:
        return file.read_bytes().decode("utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        raise ValueError(f"caption file {file} is not UTF-8 (byte {exc.start}); save it as UTF-8") from exc


def caption_for(item: ImageItem, spec: TrainSpec) -> str:
    """The caption to train with: the item's own text (trigger ensured) or the template."""
    if spec.caption_source == "txt" and item.caption is None:
        raise ValueError(f"{item.path.name}: caption_source is 'txt' but there is no caption for it")
    if item.caption is None or spec.caption_source == "template":
        return spec.fill(spec.caption_template)
    text = spec.fill(item.caption.lstrip("\ufeff").replace("[trigger]", "{trigger}"))
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
        size = (img.height, img.width)
        caption = caption_for(item, spec)
        examples.append(Example(item.path, caption, bucket, size, crop, item.repeats, item.dataset))
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
        if ex.repeats != 1:  # (folders without repeats keep the names they had)
            h.update(f"x{ex.repeats}".encode())
    return h.hexdigest()[:16]


def tag_frequency(captions: Sequence[str]) -> dict[str, int]:
    """How often each comma-separated tag occurs (kohya's ``ss_tag_frequency`` counting)."""
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(tag.strip() for tag in caption.split(",") if tag.strip())
    return dict(counts)


class BatchPlan:
    """Which examples make up micro-batch ``i``: a pure function of (seed, i), one bucket per batch."""

    def __init__(
        self,
        buckets: Sequence[tuple[int, int]],
        batch_size: int,
        seed: int,
        repeats: Sequence[int] | None = None,
    ) -> None:
        self.batch_size, self.seed = batch_size, seed
        groups: dict[tuple[int, int], list[int]] = {}
        for i, b in enumerate(buckets):  # example i appears repeats[i] times per epoch
            groups.setdefault(b, []).extend([i] * (1 if repeats is None else repeats[i]))
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


def atomic_save_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file through a temporary file and a rename (never a half file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LatentCache:
    """Each example encoded once with its own seeded VAE sample, kept in memory and on disk."""

    def __init__(
        self, vae: torch.nn.Module, examples: Sequence[Example], seed: int, path: Path | None
    ) -> None:
        self.vae, self.examples, self.seed, self.path = vae, examples, seed, path
        self.latents: dict[int, torch.Tensor] = {}
        if path is not None and path.exists():
            try:
                stored = load_file(str(path))
                self.latents = {int(k): v for k, v in stored.items() if int(k) < len(examples)}
            except Exception as exc:  # a half-written or damaged file: encode again
                log.warning("latent cache %s does not load (%s); rebuilding it", path, exc)
                self.latents = {}
                path.unlink(missing_ok=True)

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
            tensors = {str(k): v.contiguous() for k, v in self.latents.items()}
            atomic_save_file(tensors, self.path)

    def get(self, indices: Sequence[int]) -> torch.Tensor:
        """Stacked latents of some examples (all from one bucket)."""
        return torch.stack([self.latents[i] for i in indices])
