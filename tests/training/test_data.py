"""Training data: folder scan, captions, buckets, the seeded batch plan, latent cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from pipelines.images import ImageUploadError
from pipelines.tiny import build_tiny_pipeline
from pipelines.training import TrainSpec
from pipelines.training.data import (
    BatchPlan,
    ImageItem,
    LatentCache,
    buckets_for,
    caption_for,
    fit_to_bucket,
    items_from_folder,
    prepare_examples,
    tag_frequency,
)


def test_folder_scan_reads_captions(concept_dir: Path) -> None:
    items = items_from_folder(concept_dir)
    assert len(items) == 7
    by_name = {i.path.name: i.caption for i in items}
    assert by_name["wide.png"] is None
    assert "zq" in by_name["img_00.png"]


def test_missing_or_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such image folder"):
        items_from_folder(tmp_path / "nope")
    (tmp_path / "only.txt").write_text("a caption")
    with pytest.raises(ValueError, match="holds no pictures"):
        items_from_folder(tmp_path)


@pytest.mark.parametrize(
    ("caption", "source", "expected"),
    [
        (None, "auto", "a photo of sks dog"),
        ("sks on the beach", "auto", "sks on the beach"),
        ("a dog on the beach", "auto", "sks, a dog on the beach"),  # trigger ensured
        ("a [trigger] on the beach", "auto", "a sks on the beach"),
        ("a {trigger} {class_word}", "auto", "a sks dog"),
        ("ignored", "template", "a photo of sks dog"),
        ("sksy things", "auto", "sks, sksy things"),  # a longer word is not the trigger
    ],
)
def test_caption_rules(caption: str | None, source: str, expected: str) -> None:
    spec = TrainSpec(trigger="sks", class_word="dog", caption_source=source)
    assert caption_for(ImageItem(Path("x.png"), caption), spec) == expected


def test_txt_source_requires_a_caption() -> None:
    with pytest.raises(ValueError, match="no caption for it"):
        caption_for(ImageItem(Path("x.png")), TrainSpec(trigger="sks", caption_source="txt"))


def test_buckets_keep_divisibility_and_aspect() -> None:
    buckets = buckets_for(512, 64, bucketing=True)
    assert (512, 512) in buckets and len(buckets) > 3
    assert all(h % 64 == 0 and w % 64 == 0 for h, w in buckets)
    assert any(w > h for h, w in buckets) and any(h > w for h, w in buckets)
    assert buckets_for(512, 64, bucketing=False) == [(512, 512)]


def test_fit_to_bucket_covers_and_centre_crops() -> None:
    img = Image.new("RGB", (200, 100))
    out, (top, left) = fit_to_bucket(img, (64, 96))
    assert out.size == (96, 64) and top == 0 and left == (128 - 96) // 2


def test_examples_get_buckets_and_bad_pictures_are_listed(concept_dir: Path, tmp_path: Path) -> None:
    spec = TrainSpec(trigger="zq")
    examples = prepare_examples(items_from_folder(concept_dir), spec, buckets_for(32, 4, True))
    wide = next(e for e in examples if e.path.name == "wide.png")
    assert wide.bucket[1] > wide.bucket[0] and wide.original_size == (40, 64)
    assert wide.caption == "a photo of zq"
    assert {e.bucket for e in examples if e.path.name != "wide.png"} == {(32, 32)}
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    with pytest.raises(ImageUploadError, match=r"bad\.png: not a PNG"):
        prepare_examples([ImageItem(bad)], spec, [(32, 32)])


def test_batch_plan_is_seeded_single_bucket_and_covers_each_epoch() -> None:
    buckets = [(32, 32)] * 5 + [(24, 40)] * 3
    plan = BatchPlan(buckets, batch_size=2, seed=7)
    assert plan.per_epoch == 3 + 2
    for epoch in range(3):
        batches = [plan.batch(epoch * plan.per_epoch + i) for i in range(plan.per_epoch)]
        assert sorted(i for b in batches for i in b) == list(range(8))
        assert all(len({buckets[i] for i in b}) == 1 for b in batches)
    again = BatchPlan(buckets, batch_size=2, seed=7)
    assert [again.batch(i) for i in range(12)] == [plan.batch(i) for i in range(12)]
    other = BatchPlan(buckets, batch_size=2, seed=8)
    assert [other.batch(i) for i in range(12)] != [plan.batch(i) for i in range(12)]


def test_tag_frequency_counts_comma_tags() -> None:
    assert tag_frequency(["sks, dog, beach", "sks, dog", "a photo of sks"]) == {
        "sks": 2,
        "dog": 2,
        "beach": 1,
        "a photo of sks": 1,
    }


def test_latent_cache_is_seeded_and_persisted(concept_dir: Path, tmp_path: Path) -> None:
    vae = build_tiny_pipeline().vae
    examples = prepare_examples(items_from_folder(concept_dir)[:3], TrainSpec(trigger="zq"), [(32, 32)])
    first = LatentCache(vae, examples, seed=3, path=tmp_path / "lat.safetensors")
    first.fill()
    assert first.get([0, 1]).shape == (2, 4, 16, 16)
    reread = LatentCache(vae, examples, seed=3, path=tmp_path / "lat.safetensors")
    assert set(reread.latents) == {0, 1, 2}
    assert torch.equal(reread.get([0, 1, 2]), first.get([0, 1, 2]))
    fresh = LatentCache(vae, examples, seed=3, path=None)
    fresh.fill()
    assert torch.equal(fresh.get([2]), first.get([2]))  # same seed → same VAE sample
    other = LatentCache(vae, examples, seed=4, path=None)
    other.fill()
    assert not torch.equal(other.get([2]), first.get([2]))
