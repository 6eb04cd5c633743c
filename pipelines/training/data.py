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
# captions, kohya's other sidecars, and what Windows leaves in picture folders (Thumbs.db, desktop.ini)
SIDECAR_SUFFIXES = {".txt", ".caption", ".json", ".md", ".npz", ".toml", ".db", ".ini"}


@dataclass(frozen=True)
class ImageItem:
    """A training picture and its caption (None: decided by the spec's caption rules)."""

    path: Path
    caption: str | None = None
    repeats: int = 1  # times it is seen per epoch (kohya's ``N_name`` folders)
    dataset: str = "images"  # the folder it came from (kohya's ``ss_dataset_dirs`` key)


Tags = tuple[str, ...]
CaptionParts = tuple[Tags, Tags, Tags]  # (kept head, shuffled body, kept tail)


@dataclass(frozen=True)
class Example:
    """A picture ready to train on: its caption, bucket (h, w), original size and crop corner.

    ``caption`` is the plain caption (a ``keep_tokens_separator`` taken out); ``parts`` its tags split
    for shuffling and tag dropout (empty for class pictures, whose prompts are used as written).
    """

    path: Path
    caption: str
    bucket: tuple[int, int]
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    repeats: int = 1
    dataset: str = "images"
    parts: CaptionParts = ((), (), ())


@dataclass(frozen=True)
class Augment:
    """One picture's random augmentation at one step (sd-scripts' flip_aug, random_crop, color_aug)."""

    flip: bool = False
    # where the crop sits in the spare rows and columns (top, left), 0..1; None: the centre
    crop: tuple[float, float] | None = None
    hue: float = 0.0  # hue shift in OpenCV units (180 a full turn), as AugHelper.color_aug draws it
    gamma: float = 1.0  # pixel ** gamma on 0..255 values, as AugHelper.color_aug applies it


NO_AUGMENT = Augment()
IMAGE_STREAM, CLASS_IMAGE_STREAM, CAPTION_STREAM = 1, 2, 3


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
    """The picture's caption: its ``.txt``, else its ``.caption`` (sd-scripts' default extension); an
    upper-case ``.TXT`` counts too, as in an upload (and on Windows and macOS disks)."""
    for suffix in CAPTION_SUFFIXES:
        for file in (picture.with_suffix(suffix), picture.with_suffix(suffix.upper())):
            if file.is_file():
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
    """The caption to train with: the item's own text (trigger ensured) or the template (a blank caption,
    from an empty caption file, is none)."""
    own = (item.caption or "").lstrip("\ufeff").strip()
    if spec.caption_source == "txt" and not own:
        raise ValueError(f"{item.path.name}: caption_source is 'txt' but there is no caption for it")
    if not own or spec.caption_source == "template":
        return spec.fill(spec.caption_template)
    text = spec.fill(own.replace("[trigger]", "{trigger}"))
    return text if has_trigger(text, spec.trigger) else f"{spec.trigger}, {text}"


def has_trigger(text: str, trigger: str) -> bool:
    """Whether ``text`` holds the trigger as a whole word (punctuation aside)."""
    return re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", text) is not None


def split_caption(caption: str, spec: TrainSpec) -> CaptionParts:
    """(kept head, shuffled body, kept tail) tags of a caption (sd-scripts train_util.py, process_caption).

    With ``keep_tokens_separator`` in the caption the head is what stands before it and the tail what
    follows a second one; otherwise the head is the first ``keep_tokens`` tags. Blank tags are dropped.
    """
    sep, marker = spec.caption_separator, spec.keep_tokens_separator

    def tags(text: str) -> Tags:
        return tuple(t.strip() for t in text.split(sep) if t.strip())

    if marker and marker in caption:
        head, body = caption.split(marker, 1)
        body, tail = body.split(marker, 1) if marker in body else (body, "")
        return tags(head), tags(body), tags(tail)
    every = tags(caption)
    return every[: spec.keep_tokens], every[spec.keep_tokens :], ()


def join_tags(parts: CaptionParts) -> str:
    """The caption of some tags, joined with ", " (sd-scripts train_util.py, process_caption)."""
    return ", ".join((*parts[0], *parts[1], *parts[2]))


def process_tags(parts: CaptionParts, spec: TrainSpec, rng: np.random.Generator) -> str:
    """One step's caption: the body shuffled, then each body tag dropped with ``caption_tag_dropout``.

    sd-scripts train_util.py, process_caption (shuffle, then dropout_tags, then join); a tag holding the
    trigger is never dropped. Draws a fixed number of values from ``rng`` whatever the tags say.
    """
    head, body, tail = parts
    if spec.shuffle_caption:
        body = tuple(body[j] for j in rng.permutation(len(body)))
    if spec.caption_tag_dropout > 0:
        kept = rng.random(len(body)) >= spec.caption_tag_dropout
        body = tuple(t for t, k in zip(body, kept, strict=True) if k or has_trigger(t, spec.trigger))
    return join_tags((head, body, tail))


def process_caption(caption: str, spec: TrainSpec, rng: np.random.Generator) -> str:
    """A caption as one step trains on it (sd-scripts train_util.py, BaseDataset.process_caption)."""
    return process_tags(split_caption(caption, spec), spec, rng)


def step_caption(example: Example, spec: TrainSpec, rng: np.random.Generator) -> str:
    """A caption at one step, tags shuffled and dropped (sd-scripts train_util.py, process_caption)."""
    if not spec.varies_captions:
        return example.caption
    parts = example.parts if any(example.parts) else split_caption(example.caption, spec)
    return process_tags(parts, spec, rng)


def plain_caption(caption: str, spec: TrainSpec) -> str:
    """The caption with its ``keep_tokens_separator`` taken out (unchanged when it has none)."""
    marker = spec.keep_tokens_separator
    return join_tags(split_caption(caption, spec)) if marker and marker in caption else caption


def augment_rng(seed: int, micro: int, stream: int, position: int) -> np.random.Generator:
    """The generator of one picture's draws at one micro-batch: a pure function of its arguments."""
    return np.random.default_rng([seed, micro, stream, position + 1])  # (no trailing zero: see SeedSequence)


def draw_augment(spec: TrainSpec, rng: np.random.Generator) -> Augment:
    """One picture's augmentation (sd-scripts train_util.py: ``__getitem__``'s flip, then
    ``trim_and_resize_if_required``'s random crop, then ``AugHelper.color_aug``)."""
    if not spec.augments_pixels:
        return NO_AUGMENT
    flip = spec.flip_aug and bool(rng.random() < 0.5)
    crop = (float(rng.random()), float(rng.random())) if spec.random_crop else None
    hue, gamma = 0.0, 1.0
    if spec.color_aug and rng.random() <= 0.33:
        if rng.random() > 0.5:
            hue = float(rng.uniform(-8, 8))
        else:
            gamma = float(rng.uniform(0.95, 1.05))
    return Augment(flip, crop, hue, gamma)


def color_augment(arr: np.ndarray, hue: float, gamma: float) -> np.ndarray:
    """An RGB uint8 picture with sd-scripts' colour augmentation (train_util.py, AugHelper.color_aug):
    a hue shift (OpenCV units, done in PIL's HSV where a turn is 256) or ``pixel ** gamma``, clipped."""
    if hue:
        hsv = np.asarray(Image.fromarray(arr).convert("HSV")).copy()
        hsv[..., 0] = ((hsv[..., 0].astype(np.float64) + hue * 256 / 180) % 256).astype(np.uint8)
        shifted = Image.frombytes("HSV", (hsv.shape[1], hsv.shape[0]), hsv.tobytes())
        arr = np.asarray(shifted.convert("RGB"))
    if gamma != 1.0:
        arr = np.clip(arr.astype(np.float64) ** gamma, 0, 255).astype(np.uint8)
    return arr


def buckets_for(resolution: int, divisibility: int, bucketing: bool) -> list[tuple[int, int]]:
    """(h, w) buckets near resolution² pixels (diffusers' ladder), or the one square."""
    square = (resolution // divisibility * divisibility,) * 2
    if not bucketing:
        return [square]
    ladder = generate_aspect_ratio_buckets(resolution, divisibility=divisibility)
    return sorted({square, *((h, w) for h, w in ladder if min(h, w) >= divisibility)})


def cover_size(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a picture of ``size`` (h, w) resized to just cover the bucket."""
    (h, w), (bh, bw) = size, bucket
    scale = max(bh / h, bw / w)
    return max(bh, round(h * scale)), max(bw, round(w * scale))


def crop_corner(
    size: tuple[int, int], bucket: tuple[int, int], crop: tuple[float, float] | None = None
) -> tuple[int, int]:
    """Top-left of the bucket-sized crop of the covering picture: centred, or placed at ``crop``
    (fractions of the spare rows and columns; sd-scripts' random_crop draws ``randint(0, spare)``)."""
    (ch, cw), (bh, bw) = cover_size(size, bucket), bucket
    if crop is None:
        return (ch - bh) // 2, (cw - bw) // 2
    return min(int(crop[0] * (ch - bh + 1)), ch - bh), min(int(crop[1] * (cw - bw + 1)), cw - bw)


def fit_to_bucket(
    img: Image.Image, bucket: tuple[int, int], crop: tuple[float, float] | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """Resize to cover the bucket, then crop (centred, or at ``crop``); returns (picture, crop top-left)."""
    bh, bw = bucket
    ch, cw = cover_size((img.height, img.width), bucket)
    top, left = crop_corner((img.height, img.width), bucket, crop)
    img = img.resize((cw, ch), Image.Resampling.BICUBIC) if (cw, ch) != img.size else img
    return img.crop((left, top, left + bw, top + bh)), (top, left)


def augmented_corner(example: Example, augment: Augment) -> tuple[int, int]:
    """The crop top-left SDXL is told for an augmented picture: the random crop's, mirrored when flipped."""
    if augment.crop is None and not augment.flip:
        return example.crop_top_left
    top, left = crop_corner(example.original_size, example.bucket, augment.crop)
    if augment.flip:  # the crop's left edge in the mirrored picture
        left = cover_size(example.original_size, example.bucket)[1] - example.bucket[1] - left
    return top, left


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
        parts = split_caption(caption, spec)
        plain = plain_caption(caption, spec)
        examples.append(Example(item.path, plain, bucket, size, crop, item.repeats, item.dataset, parts))
    if errors:
        raise ImageUploadError("; ".join(errors))
    return examples


def load_pixels(
    example: Example, limits: ImageLimits = ImageLimits(), augment: Augment = NO_AUGMENT
) -> torch.Tensor:
    """The example's picture as a float tensor 3×h×w in [-1, 1]: cropped, recoloured, then flipped
    (sd-scripts' order in train_util.py, BaseDataset.__getitem__)."""
    img, _ = fit_to_bucket(open_image(example.path, limits), example.bucket, augment.crop)
    arr = np.asarray(img)
    if augment.hue or augment.gamma != 1.0:
        arr = color_augment(arr, augment.hue, augment.gamma)
    if augment.flip:
        arr = arr[:, ::-1]
    pixels = arr.astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


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
    """Each example encoded once with its own seeded VAE sample, kept in memory and on disk.

    With ``flip`` the mirror image is encoded too (key ``"<i>f"``), as sd-scripts' cache_batch_latents
    does for flip_aug (train_util.py): a flipped step takes the latents of the flipped picture, not
    mirrored latents.
    """

    def __init__(
        self,
        vae: torch.nn.Module,
        examples: Sequence[Example],
        seed: int,
        path: Path | None,
        flip: bool = False,
    ) -> None:
        self.vae, self.examples, self.seed, self.path, self.flip = vae, examples, seed, path, flip
        self.latents: dict[int, torch.Tensor] = {}
        self.flipped: dict[int, torch.Tensor] = {}
        if path is not None and path.exists():
            try:
                for k, v in load_file(str(path)).items():
                    table, i = (self.flipped, int(k[:-1])) if k.endswith("f") else (self.latents, int(k))
                    if i < len(examples):
                        table[i] = v
            except Exception as exc:  # a half-written or damaged file: encode again
                log.warning("latent cache %s does not load (%s); rebuilding it", path, exc)
                self.latents, self.flipped = {}, {}
                path.unlink(missing_ok=True)

    @torch.no_grad()
    def fill(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Encode every example (and mirror image, with ``flip``) not cached yet, then write the file."""
        todo = [(i, False) for i in range(len(self.examples)) if i not in self.latents]
        if self.flip:
            todo += [(i, True) for i in range(len(self.examples)) if i not in self.flipped]
        for n, (i, mirrored) in enumerate(todo):
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
            pixels = load_pixels(self.examples[i], augment=Augment(flip=mirrored))[None]
            table = self.flipped if mirrored else self.latents
            table[i] = encode_pixels(self.vae, pixels, gen)[0].float().cpu()
            if progress is not None:
                progress(n + 1, len(todo))
        if todo and self.path is not None:
            tensors = {str(k): v.contiguous() for k, v in self.latents.items()}
            tensors |= {f"{k}f": v.contiguous() for k, v in self.flipped.items()}
            atomic_save_file(tensors, self.path)

    def get(self, indices: Sequence[int], flips: Sequence[bool] | None = None) -> torch.Tensor:
        """Stacked latents of some examples (all from one bucket), of the mirror image where ``flips``."""
        flips = flips or [False] * len(indices)
        return torch.stack(
            [(self.flipped if f else self.latents)[i] for i, f in zip(indices, flips, strict=True)]
        )
