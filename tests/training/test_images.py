"""Upload validation: type by content, size limits, decompression bombs, EXIF, content-addressed store."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from pipelines.images import (
    ImageLimits,
    ImageUploadError,
    open_image,
    sniff_format,
    store_upload,
    store_uploads,
)


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png(side: int) -> bytes:
    """A valid 1-bit grayscale PNG of side×side pixels that is only a few kB on disk."""
    row = b"\x00" + bytes((side + 7) // 8)
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


@pytest.fixture()
def red_png() -> bytes:
    return _png_bytes(Image.new("RGB", (40, 30), (200, 10, 10)))


def test_not_an_image_is_refused_by_content(tmp_path: Path) -> None:
    fake = tmp_path / "holiday.png"
    fake.write_text("this is a text file, whatever its name says")
    with pytest.raises(ImageUploadError, match=r"holiday\.png: not a PNG, JPEG, WebP or BMP picture"):
        open_image(fake)


def test_zero_byte_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageUploadError, match=r"empty\.jpg: the file is empty \(0 bytes\)"):
        open_image(empty)


def test_20000_square_png_is_refused_before_decoding(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(huge_png(20000))
    assert bomb.stat().st_size < 200_000  # tiny on disk, 400 megapixels decoded
    with pytest.raises(ImageUploadError, match=r"bomb\.png: refused as a decompression bomb"):
        open_image(bomb)


def test_over_the_pixel_limit_says_size_and_limit(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    big.write_bytes(huge_png(8000))  # 64 MP: under PIL's own bomb threshold, over the studio's limit
    with pytest.raises(ImageUploadError, match=r"big\.png: 8000×8000 is 64\.0 megapixels, over the 40 MP"):
        open_image(big)


def test_truncated_png_is_called_damaged(tmp_path: Path, red_png: bytes) -> None:
    cut = tmp_path / "cut.png"
    cut.write_bytes(red_png[: len(red_png) // 2])
    with pytest.raises(ImageUploadError, match=r"cut\.png: a damaged PNG file"):
        open_image(cut)


def test_byte_and_side_limits(tmp_path: Path, red_png: bytes) -> None:
    with pytest.raises(ImageUploadError, match=r"MiB is over the 0 MiB limit"):
        open_image(red_png, ImageLimits(max_bytes=100))
    tiny = _png_bytes(Image.new("RGB", (8, 8)))
    with pytest.raises(ImageUploadError, match=r"8×8 is smaller than 16 px"):
        open_image(tiny)


def test_type_comes_from_content_not_name(tmp_path: Path, red_png: bytes) -> None:
    misnamed = tmp_path / "really_a_png.jpg"
    misnamed.write_bytes(red_png)
    assert sniff_format(red_png[:16]) == "PNG"
    stored = store_upload(misnamed, tmp_path / "store")
    assert stored.format == "PNG" and stored.path.suffix == ".png"
    assert open_image(misnamed).size == (40, 30)


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=95)
    upright = open_image(buf.getvalue())
    assert upright.size == (20, 40)
    assert upright.getpixel((10, 5))[0] > 200  # the white half is now on top
    assert upright.getpixel((10, 35))[0] < 60


def test_transparency_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    out = open_image(_png_bytes(rgba))
    assert out.mode == "RGB" and out.getpixel((5, 5)) == (255, 255, 255)


def test_store_is_content_addressed(tmp_path: Path, red_png: bytes) -> None:
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(red_png)
    b.write_bytes(red_png)
    sa, sb = store_upload(a, tmp_path / "store"), store_upload(b, tmp_path / "store")
    digest = hashlib.sha256(red_png).hexdigest()
    assert sa.sha256 == sb.sha256 == digest and sa.path == sb.path
    assert sa.path == tmp_path / "store" / digest[:2] / f"{digest}.png"
    assert sa.path.read_bytes() == red_png
    assert (sa.width, sa.height, sa.name, sb.name) == (40, 30, "a.png", "b.png")


def test_store_uploads_is_all_or_nothing(tmp_path: Path, red_png: bytes) -> None:
    good, empty, text = tmp_path / "good.png", tmp_path / "zero.png", tmp_path / "notes.webp"
    good.write_bytes(red_png)
    empty.write_bytes(b"")
    text.write_text("hello")
    store = tmp_path / "store"
    with pytest.raises(ImageUploadError) as err:
        store_uploads([good, empty, text], store)
    assert "zero.png: the file is empty" in str(err.value) and "notes.webp: not a PNG" in str(err.value)
    assert not store.exists() or not any(store.rglob("*.png"))
    assert [s.name for s in store_uploads([good], store)] == ["good.png"]
