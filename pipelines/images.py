"""Uploaded pictures: validated by content, guarded against decompression bombs, stored by hash.

A picture is accepted when its first bytes say PNG, JPEG, WebP or BMP (the file name does not
count), its byte size and pixel count are inside the limits (checked from the header, before a
single pixel is decoded), and it decodes completely. EXIF orientation is applied on opening.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Magic numbers of the accepted formats (PNG spec §5.2, JFIF SOI marker, RIFF/WEBP, BMP header).
_MAGIC: tuple[tuple[str, bytes, int], ...] = (
    ("PNG", b"\x89PNG\r\n\x1a\n", 0),
    ("JPEG", b"\xff\xd8\xff", 0),
    ("WEBP", b"WEBP", 8),
    ("BMP", b"BM", 0),
)
SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp"}


class ImageUploadError(ValueError):
    """An upload that is not an acceptable picture; the message says why, naming the file."""


@dataclass(frozen=True)
class ImageLimits:
    """What an upload may be: bytes on disk, decoded pixels, and the shortest side."""

    max_bytes: int = 30 * 1024 * 1024
    max_pixels: int = 40_000_000
    min_side: int = 16


@dataclass(frozen=True)
class StoredImage:
    """One stored upload: content hash, where it lies, and what it is."""

    sha256: str
    path: Path
    format: str
    width: int
    height: int
    name: str


def sniff_format(head: bytes) -> str | None:
    """The picture format the leading bytes announce, or None."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    for fmt, magic, offset in _MAGIC:
        if fmt != "WEBP" and head[offset : offset + len(magic)] == magic:
            return fmt
    return None


def _check_bytes(size: int, label: str, limits: ImageLimits) -> None:
    """Refuse files over the byte limit."""
    if size > limits.max_bytes:
        mib, cap = size / 2**20, limits.max_bytes / 2**20
        raise ImageUploadError(f"{label}: {mib:.1f} MiB is over the {cap:.0f} MiB limit")


def read_upload(source: bytes | str | Path, limits: ImageLimits = ImageLimits(), name: str = "") -> bytes:
    """The upload's bytes, after the empty-file and byte-size checks."""
    label = _label(source, name)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ImageUploadError(f"{label}: no such file")
        _check_bytes(path.stat().st_size, label, limits)
        data = path.read_bytes()
    else:
        data = bytes(source)
    if not data:
        raise ImageUploadError(f"{label}: the file is empty (0 bytes)")
    _check_bytes(len(data), label, limits)
    return data


def _check_header(img: Image.Image, label: str, limits: ImageLimits) -> None:
    """Refuse pictures whose header announces too many pixels or a side that is too short."""
    w, h = img.size
    if w * h > limits.max_pixels:
        mp, cap = w * h / 1e6, limits.max_pixels / 1e6
        raise ImageUploadError(f"{label}: {w}×{h} is {mp:.1f} megapixels, over the {cap:.0f} MP limit")
    if min(w, h) < limits.min_side:
        raise ImageUploadError(f"{label}: {w}×{h} is smaller than {limits.min_side} px on a side")


def decode_image(
    data: bytes, limits: ImageLimits = ImageLimits(), name: str = "upload"
) -> tuple[Image.Image, str]:
    """Decode validated bytes into an upright RGB picture; returns (image, format)."""
    fmt = sniff_format(data[:16])
    if fmt is None:
        raise ImageUploadError(f"{name}: not a PNG, JPEG, WebP or BMP picture (by its content)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[fmt])
            _check_header(img, name, limits)
            img.load()
    except ImageUploadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageUploadError(f"{name}: refused as a decompression bomb ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageUploadError(f"{name}: a damaged {fmt} file ({exc})") from exc
    return to_rgb(ImageOps.exif_transpose(img)), fmt


WIDE_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})  # 16/32-bit grayscale


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (an alpha channel, or a PNG ``tRNS`` colour key on
    a grey, RGB or palette picture); 16-bit grayscale scaled to 8 bits (Pillow's own conversion clips it,
    so a 16-bit PNG would turn almost white)."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in WIDE_MODES:
        arr = np.asarray(img, dtype=np.float64)
        if img.mode != "I" or arr.max() > 255:  # "I" also holds 8-bit values that were widened
            arr = arr / 257.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")


def open_image(
    source: bytes | str | Path, limits: ImageLimits = ImageLimits(), name: str = ""
) -> Image.Image:
    """Read, validate and decode one picture (upright RGB); raises ImageUploadError."""
    label = _label(source, name)
    return decode_image(read_upload(source, limits, label), limits, label)[0]


def _atomic_write(path: Path, data: bytes) -> None:
    """Write bytes to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _label(source: bytes | str | Path, name: str) -> str:
    """The name used in error messages."""
    return name or (Path(source).name if isinstance(source, (str, Path)) else "upload")


def _keep(data: bytes, img: Image.Image, fmt: str, store_dir: Path, label: str) -> StoredImage:
    """Write validated bytes under their SHA-256 (once; identical uploads share one file)."""
    digest = hashlib.sha256(data).hexdigest()
    path = Path(store_dir) / digest[:2] / f"{digest}{SUFFIX[fmt]}"
    if not path.exists():
        _atomic_write(path, data)
    return StoredImage(digest, path, fmt, img.width, img.height, label)


def store_upload(
    source: bytes | str | Path, store_dir: Path, limits: ImageLimits = ImageLimits(), name: str = ""
) -> StoredImage:
    """Validate one upload and keep its original bytes at ``store_dir/ab/<sha256>.<ext>``."""
    label = _label(source, name)
    data = read_upload(source, limits, label)
    img, fmt = decode_image(data, limits, label)
    return _keep(data, img, fmt, store_dir, label)


def store_uploads(
    sources: list[str | Path], store_dir: Path, limits: ImageLimits = ImageLimits()
) -> list[StoredImage]:
    """Validate every upload first and store them only if all pass (one error lists every bad file)."""
    errors: list[str] = []
    checked = []
    for src in sources:
        label = _label(src, "")
        try:
            data = read_upload(src, limits, label)
            checked.append((data, *decode_image(data, limits, label), label))
        except ImageUploadError as exc:
            errors.append(str(exc))
    if errors:
        raise ImageUploadError("; ".join(errors))
    return [_keep(data, img, fmt, store_dir, label) for data, img, fmt, label in checked]
