"""How training reads its pictures and captions: folders, uploads, the caption table, odd files."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from pipelines.images import ImageUploadError, open_image
from pipelines.training import TrainSpec
from pipelines.training.data import (
    ImageItem,
    buckets_for,
    caption_for,
    items_from_folder,
    load_pixels,
    prepare_examples,
)
from studio.handlers import train as T
from studio.jobs import folder_files, split_uploads

SPEC = TrainSpec(trigger="zqx", class_word="star")
TEMPLATE = "a photo of zqx star"


def _pic(path: Path, colour: tuple[int, int, int] = (10, 20, 30)) -> Path:
    Image.new("RGB", (32, 32), colour).save(path, format="PNG")
    return path


def test_windows_thumbs_db_and_desktop_ini_are_not_pictures(tmp_path: Path) -> None:
    """A folder copied from Windows holds Thumbs.db and desktop.ini; kohya ignores them, so do we."""
    _pic(tmp_path / "a.png")
    (tmp_path / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1")
    (tmp_path / "desktop.ini").write_text("[.ShellClassInfo]\r\n")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / "._a.png").write_bytes(b"\x00\x05\x16\x07")  # macOS AppleDouble
    items = items_from_folder(tmp_path)
    assert [i.path.name for i in items] == ["a.png"]
    assert len(prepare_examples(items, SPEC, buckets_for(32, 8, True))) == 1
    pictures, _ = split_uploads(folder_files(tmp_path))  # the CLI's path
    assert [p.name for p in pictures] == ["a.png"]
    assert not T.is_picture("Thumbs.db") and not T.is_picture("desktop.ini")


def test_an_upper_case_caption_file_is_read_in_a_folder_as_in_an_upload(tmp_path: Path) -> None:
    _pic(tmp_path / "A.PNG")
    (tmp_path / "A.TXT").write_text("zqx, upper case")
    assert [i.caption for i in items_from_folder(tmp_path)] == ["zqx, upper case"]
    assert split_uploads(folder_files(tmp_path))[1]["A"] == "zqx, upper case"


def test_an_empty_caption_file_means_the_template_not_a_bare_trigger(tmp_path: Path) -> None:
    """The CLI passes an empty caption file on as "" (a folder read gives None): both get the template."""
    _pic(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text(" \n")
    caption = split_uploads(folder_files(tmp_path))[1]["a"]
    assert caption == ""
    assert caption_for(ImageItem(tmp_path / "a.png", caption), SPEC) == TEMPLATE
    assert caption_for(ImageItem(tmp_path / "a.png", "\ufeff"), SPEC) == TEMPLATE
    with pytest.raises(ValueError, match="no caption for it"):
        caption_for(ImageItem(tmp_path / "a.png", ""), TrainSpec(trigger="zqx", caption_source="txt"))


def test_the_caption_table_reads_captions_as_training_does(tmp_path: Path) -> None:
    """Train tab: a BOM is dropped, ``.caption`` counts, and a non-UTF-8 file is an error naming it (it
    used to fill the table with U+FFFD, and the table's text then won over the file)."""
    files = [_pic(tmp_path / n) for n in ("a.png", "b.png", "c.png")]
    (tmp_path / "a.txt").write_bytes("\ufeffzqx, red".encode())
    (tmp_path / "b.caption").write_text("zqx, blue", encoding="utf-8")
    (tmp_path / "c.caption").write_text("loses to the .txt", encoding="utf-8")
    (tmp_path / "c.TXT").write_text("zqx, green", encoding="utf-8")
    captions = [tmp_path / n for n in ("a.txt", "b.caption", "c.caption", "c.TXT")]
    uploads = [str(p) for p in (*files, *captions)]
    assert T.caption_rows(uploads) == [["a.png", "zqx, red"], ["b.png", "zqx, blue"], ["c.png", "zqx, green"]]
    (tmp_path / "a.txt").write_bytes("zqx, caf\xe9".encode("cp1252"))
    with pytest.raises(ValueError, match=r"a\.txt is not UTF-8"):
        T.caption_rows(uploads)


@pytest.mark.parametrize(("mode", "key"), [("L", 0), ("RGB", (0, 0, 0))])
def test_a_png_colour_key_is_transparent_so_white(mode: str, key: int | tuple[int, ...]) -> None:
    """A grey or RGB PNG with a ``tRNS`` colour key shows transparent in a viewer, not black."""
    buf = io.BytesIO()
    Image.new(mode, (32, 32), 0).save(buf, format="PNG", transparency=key)
    assert open_image(buf.getvalue()).getpixel((5, 5)) == (255, 255, 255)


def test_a_phone_photo_trains_upright_and_a_truncated_jpeg_is_named_first(tmp_path: Path) -> None:
    """(Regression guard, not a fix.) EXIF orientation is applied through to the pixels trained on, and a
    cut-off JPEG among good pictures is one error naming it, from ``prepare_examples``."""
    img = Image.new("RGB", (64, 32), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 32, 32))  # left half white; rotate 90° clockwise to display
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(tmp_path / "phone.JPG", format="JPEG", exif=exif, quality=95)
    (ex,) = prepare_examples(items_from_folder(tmp_path), SPEC, buckets_for(32, 8, False))
    assert ex.original_size == (64, 32)  # (h, w): portrait, as shown
    px = load_pixels(ex)
    assert px[:, 3].mean() > 0.8 and px[:, -4].mean() < -0.8  # white on top, black below
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[:-200])
    with pytest.raises(ImageUploadError, match=r"^cut\.jpg: a damaged JPEG file"):
        prepare_examples(items_from_folder(tmp_path), SPEC, buckets_for(32, 8, False))
