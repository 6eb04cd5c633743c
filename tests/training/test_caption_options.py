"""kohya-style caption and picture options: tag shuffling, keep_tokens, tag dropout, flip / colour / crop."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import threading
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.tiny import build_tiny_pipeline
from pipelines.training import TrainingCancelled, TrainProgress, TrainSpec, train_lora
from pipelines.training.checkpoint import load_latest
from pipelines.training.config import LATER_OPTIONS
from pipelines.training.data import (
    CAPTION_STREAM,
    IMAGE_STREAM,
    Augment,
    augment_rng,
    augmented_corner,
    draw_augment,
    encode_pixels,
    fit_to_bucket,
    items_from_folder,
    load_pixels,
    plain_caption,
    prepare_examples,
    process_caption,
    split_caption,
)
from pipelines.training.lora_train import Geometry, LoraTrainer
from pipelines.training.metadata import RunInfo, kohya_metadata
from studio.cli import common_parent, main
from studio.commands import train as train_cmd
from tests.training.conftest import TRIGGER, fast_spec

BODY = ("1girl", "smile", "outdoors", "sky", "tree", "red hair")


def _rng(i: int) -> np.random.Generator:
    return augment_rng(0, i, CAPTION_STREAM, 0)


# ---- captions ------------------------------------------------------------------------------------


def test_shuffle_keeps_the_first_keep_tokens_and_permutes_the_rest() -> None:
    spec = TrainSpec(trigger="zq", shuffle_caption=True, keep_tokens=2)
    caption = "zq, solo, " + ", ".join(BODY)
    firsts: Counter[str] = Counter()
    orders = set()
    for i in range(600):
        tags = process_caption(caption, spec, _rng(i)).split(", ")
        assert tags[:2] == ["zq", "solo"]
        assert sorted(tags[2:]) == sorted(BODY)  # the same multiset of tags
        firsts[tags[2]] += 1
        orders.add(tuple(tags[2:]))
    assert len(orders) > 300  # 720 orders exist; 600 draws see most of them
    assert all(abs(firsts[t] / 600 - 1 / 6) < 0.06 for t in BODY), firsts  # uniform over positions


def test_without_keep_tokens_every_tag_moves_and_without_shuffle_the_order_stays() -> None:
    caption = "zq, " + ", ".join(BODY)
    moved = {
        process_caption(caption, TrainSpec(trigger="zq", shuffle_caption=True), _rng(i)).split(", ")[0]
        for i in range(200)
    }
    assert moved == {"zq", *BODY}  # sd-scripts' keep_tokens=0: the trigger is shuffled too
    dropout_only = TrainSpec(trigger="zq", caption_tag_dropout=0.5, keep_tokens=1)
    for i in range(50):
        tags = process_caption(caption, dropout_only, _rng(i)).split(", ")
        assert tags[0] == "zq" and tags[1:] == [t for t in BODY if t in tags[1:]]  # order kept


def test_keep_tokens_separator_form() -> None:
    spec = TrainSpec(trigger="zq", shuffle_caption=True, keep_tokens=5, keep_tokens_separator="|||")
    caption = "zq, 1boy ||| smile, outdoors, sky, tree ||| best quality, masterpiece"
    assert split_caption(caption, spec) == (
        ("zq", "1boy"),
        ("smile", "outdoors", "sky", "tree"),
        ("best quality", "masterpiece"),
    )
    orders = set()
    for i in range(100):
        tags = process_caption(caption, spec, _rng(i)).split(", ")
        assert tags[:2] == ["zq", "1boy"] and tags[-2:] == ["best quality", "masterpiece"]
        assert sorted(tags[2:-2]) == ["outdoors", "sky", "smile", "tree"]
        orders.add(tuple(tags[2:-2]))
    assert len(orders) > 12
    # one marker: no fixed tail; no marker in the caption: keep_tokens applies (as in sd-scripts)
    assert split_caption("zq ||| a, b", spec) == (("zq",), ("a", "b"), ())
    assert split_caption("zq, a, b, c, d, e, f", spec)[0] == ("zq", "a", "b", "c", "d")
    # the marker never reaches the text encoder, the prior or the tag counts
    assert plain_caption(caption, spec) == "zq, 1boy, smile, outdoors, sky, tree, best quality, masterpiece"
    assert plain_caption("zq, a", spec) == "zq, a"


def test_tag_dropout_rate_matches_p_and_never_drops_the_trigger() -> None:
    p, n = 0.3, 4000
    spec = TrainSpec(trigger="zq", caption_tag_dropout=p)  # keep_tokens 0: the trigger is not kept
    caption = "zq star, " + ", ".join(BODY)  # the trigger inside a longer tag counts too
    dropped = 0
    for i in range(n):
        tags = process_caption(caption, spec, _rng(i)).split(", ")
        assert tags[0] == "zq star"  # never dropped (and, without shuffling, still first)
        dropped += len(BODY) - (len(tags) - 1)
    rate = dropped / (n * len(BODY))
    assert abs(rate - p) < 0.015, rate  # binomial σ ≈ 0.003
    high = TrainSpec(trigger="zq", caption_tag_dropout=0.95, shuffle_caption=True)
    assert all("zq star" in process_caption(caption, high, _rng(i)).split(", ") for i in range(200))


def test_trigger_added_by_the_caption_rules_stays_first_with_keep_tokens_1(tmp_path: Path) -> None:
    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("red hair, smile, sky, tree")  # no trigger: "zq, " is put in front
    spec = fast_spec(shuffle_caption=True, keep_tokens=1, caption_tag_dropout=0.5)
    [example] = prepare_examples(items_from_folder(tmp_path), spec, [(32, 32)])
    assert example.caption == "zq, red hair, smile, sky, tree"
    assert example.parts == (("zq",), ("red hair", "smile", "sky", "tree"), ())
    assert all(process_caption(example.caption, spec, _rng(i)).startswith("zq") for i in range(200))


def test_draws_are_a_pure_function_of_seed_and_step() -> None:
    spec = TrainSpec(trigger="zq", shuffle_caption=True, caption_tag_dropout=0.2, flip_aug=True)
    caption = "zq, " + ", ".join(BODY)
    again = [process_caption(caption, spec, augment_rng(5, m, CAPTION_STREAM, 1)) for m in range(20)]
    assert again == [process_caption(caption, spec, augment_rng(5, m, CAPTION_STREAM, 1)) for m in range(20)]
    assert len(set(again)) > 10  # each micro-batch its own draw
    flips = [draw_augment(spec, augment_rng(5, m, IMAGE_STREAM, 0)).flip for m in range(400)]
    assert flips == [draw_augment(spec, augment_rng(5, m, IMAGE_STREAM, 0)).flip for m in range(400)]
    assert 160 < sum(flips) < 240  # p = 0.5
    assert draw_augment(TrainSpec(trigger="zq"), augment_rng(5, 0, IMAGE_STREAM, 0)) == Augment()


# ---- the trainer: order of operations, class and sample prompts, flips -----------------------------


@pytest.fixture(scope="module")
def tag_dir(tmp_path_factory: pytest.TempPathFactory, concept_dir: Path) -> Path:
    """The concept pictures with booru-style tag captions (the trigger first)."""
    folder = tmp_path_factory.mktemp("tags") / "zq star"
    folder.mkdir()
    for i, picture in enumerate(sorted(concept_dir.glob("img_*.png"))):
        shutil.copy(picture, folder / picture.name)
        tags = [BODY[(i + k) % len(BODY)] for k in range(4)]
        (folder / picture.with_suffix(".txt").name).write_text(f"{TRIGGER}, star, " + ", ".join(tags))
    shutil.copy(concept_dir / "wide.png", folder / "wide.png")  # no caption: the template
    return folder


def _trainer(spec: TrainSpec, folder: Path, work: Path) -> LoraTrainer:
    pipe = build_tiny_pipeline()
    geometry = Geometry.of(pipe, spec)
    examples = prepare_examples(items_from_folder(folder), spec, list(geometry.buckets))
    trainer = LoraTrainer(spec, pipe, examples, work, torch.device("cpu"), None)
    trainer.prepare()
    return trainer


def _spy_captions(trainer: LoraTrainer) -> list[tuple[list[str], list[str]]]:
    """Record (captions, batch captions) of every loss the trainer computes."""
    seen: list[tuple[list[str], list[str]]] = []
    original = trainer.denoise_loss

    def spy(x0, noise, t, captions, batch, distil=False):  # type: ignore[no-untyped-def]
        seen.append((list(captions), [e.caption for e in batch]))
        return original(x0, noise, t, captions, batch, distil)

    trainer.denoise_loss = spy  # type: ignore[method-assign]
    return seen


def test_caption_dropout_first_then_tags_and_class_and_sample_prompts_untouched(
    tag_dir: Path, tmp_path: Path
) -> None:
    spec = fast_spec(
        shuffle_caption=True,
        keep_tokens=1,
        caption_tag_dropout=0.3,
        caption_dropout=0.3,
        class_word="shape",
        num_class_images=2,
        class_steps=2,
        prior_caption_dropout=0.0,
    )
    trainer = _trainer(spec, tag_dir, tmp_path)
    seen = _spy_captions(trainer)
    with torch.no_grad():
        for micro in range(24):
            trainer.micro_loss(micro)
    instance, prior = seen[0::2], seen[1::2]
    used = [(c, full) for caps, fulls in instance for c, full in zip(caps, fulls, strict=True)]
    empty = sum(c == "" for c, _ in used)
    assert 2 <= empty <= 16  # whole-caption dropout at 0.3 over 24 pictures
    changed = 0
    for c, full in used:
        if c:  # not dropped: tag-processed, trigger first, tags from the picture's own caption
            assert TRIGGER in c.split(", ")[0] and set(c.split(", ")) <= set(full.split(", "))
            changed += c != full
    assert changed > 5
    # class pictures keep the prompts they were made from; samples use the plain first caption
    for caps, fulls in prior:
        assert caps == fulls
    assert trainer.sample_prompts()[0] == trainer.examples[0].caption
    assert "|||" not in trainer.examples[0].caption


def test_flip_aug_trains_on_the_encoded_mirror_image(tag_dir: Path, tmp_path: Path) -> None:
    spec = fast_spec(flip_aug=True)
    trainer = _trainer(spec, tag_dir, tmp_path)
    cache = trainer.cache
    assert cache is not None and set(cache.flipped) == set(cache.latents)
    vae = trainer.pipe.vae
    for i, ex in enumerate(trainer.examples):
        pixels = load_pixels(ex)
        mirrored = load_pixels(ex, augment=Augment(flip=True))
        assert torch.equal(mirrored, torch.flip(pixels, dims=[-1]))  # a pixel mirror image
        gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + i)
        with torch.no_grad():
            expected = encode_pixels(vae, mirrored[None], gen)[0].float()
        assert torch.equal(cache.flipped[i], expected)  # the mirror encoded, not the latents mirrored
        assert not torch.equal(cache.flipped[i], cache.latents[i])
    # the latents each micro-batch gets: flipped for some steps, plain for others, as drawn
    flips = []
    for micro in range(30):
        idx = trainer.plan.batch(micro)
        augments = [
            draw_augment(spec, augment_rng(spec.seed, micro, IMAGE_STREAM, k)) for k in range(len(idx))
        ]
        got = trainer.latents(trainer.examples, idx, cache, torch.Generator(), augments)
        for row, i, a in zip(got, idx, augments, strict=True):
            assert torch.equal(row, (cache.flipped if a.flip else cache.latents)[i])
            flips.append(a.flip)
    assert 0 < sum(flips) < len(flips)
    # without a cache the mirror image is encoded with the step's own generator
    ex = trainer.examples[0]
    direct = trainer.latents(
        trainer.examples, [0], None, torch.Generator().manual_seed(1), [Augment(flip=True)]
    )
    with torch.no_grad():
        expected = encode_pixels(
            vae, load_pixels(ex, augment=Augment(flip=True))[None], torch.Generator().manual_seed(1)
        )
    assert torch.equal(direct, expected.float())


def test_random_crop_colour_and_the_sdxl_crop_corner(concept_dir: Path) -> None:
    img = Image.open(concept_dir / "wide.png").convert("RGB")  # 64×40
    bucket = (40, 24)  # (h, w): the picture covers it unscaled, 40 columns to spare
    _, (top, left) = fit_to_bucket(img, bucket)
    assert (top, left) == (0, 20)  # centred
    assert fit_to_bucket(img, bucket, (0.0, 0.0))[1] == (0, 0)
    assert fit_to_bucket(img, bucket, (0.999, 0.999))[1] == (0, 40)
    spec = fast_spec(random_crop=True, color_aug=True, cache_latents=False)
    [ex] = prepare_examples(items_from_folder(concept_dir)[-1:], spec, [bucket])
    corners = {
        augmented_corner(ex, draw_augment(spec, augment_rng(0, m, IMAGE_STREAM, 0)))[1] for m in range(200)
    }
    assert len(corners) > 15 and min(corners) >= 0 and max(corners) <= 40
    assert augmented_corner(ex, Augment()) == ex.crop_top_left == (0, 20)
    assert augmented_corner(ex, Augment(flip=True, crop=(0.0, 0.1))) == (0, 64 - 24 - 4)  # mirrored left
    plain = load_pixels(ex)
    darker = load_pixels(ex, augment=Augment(gamma=0.95))
    hue = load_pixels(ex, augment=Augment(hue=8.0))
    assert (darker <= plain + 1e-6).all() and (darker < plain).any()  # v**0.95 ≤ v on 0..255
    assert not torch.equal(hue, plain) and hue.abs().max() <= 1.0
    colours = [draw_augment(spec, augment_rng(0, m, IMAGE_STREAM, 0)) for m in range(3000)]
    share = sum(a.hue != 0 or a.gamma != 1 for a in colours) / len(colours)
    assert abs(share - 0.33) < 0.04  # AugHelper.color_aug: p = 0.33, then hue or gamma half and half


# ---- metadata, CLI, validation -------------------------------------------------------------------


def _info() -> RunInfo:
    return RunInfo("sd1", "m", (512, 512), "epsilon", 10, 0, 10, 100, 0.0, 1.0, 0.1, ("zq, a",))


def test_kohya_metadata_keys_and_formats() -> None:
    spec = TrainSpec(
        trigger="zq",
        shuffle_caption=True,
        keep_tokens=2,
        caption_tag_dropout=0.25,
        flip_aug=True,
        color_aug=True,
        random_crop=True,
        cache_latents=False,
    )
    meta = kohya_metadata(spec, _info())
    assert {k: meta[k] for k in meta if k in EXPECTED_ON} == EXPECTED_ON
    off = kohya_metadata(TrainSpec(trigger="zq"), _info())
    assert {k: off[k] for k in EXPECTED_OFF} == EXPECTED_OFF


EXPECTED_ON = {
    "ss_shuffle_caption": "True",
    "ss_keep_tokens": "2",
    "ss_caption_tag_dropout_rate": "0.25",
    "ss_flip_aug": "True",
    "ss_color_aug": "True",
    "ss_random_crop": "True",
}
EXPECTED_OFF = {
    "ss_shuffle_caption": "False",
    "ss_keep_tokens": "0",
    "ss_caption_tag_dropout_rate": "0.0",
    "ss_flip_aug": "False",
    "ss_color_aug": "False",
    "ss_random_crop": "False",
}


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    train_cmd.register(parser.add_subparsers(dest="command"), common_parent())
    return parser.parse_args(["train", *argv])


def test_cli_flags_map_onto_the_spec() -> None:
    spec = train_cmd.spec_from_args(
        _parse(
            "--trigger",
            "zq",
            "--shuffle-caption",
            "--keep-tokens",
            "1",
            "--keep-tokens-separator",
            "|||",
            "--caption-separator",
            ";",
            "--caption-tag-dropout",
            "0.1",
            "--flip-aug",
            "--color-aug",
            "--random-crop",
            "--no-cache-latents",
        )
    )
    assert (spec.shuffle_caption, spec.keep_tokens, spec.keep_tokens_separator) == (True, 1, "|||")
    assert (spec.caption_separator, spec.caption_tag_dropout) == (";", 0.1)
    assert (spec.flip_aug, spec.color_aug, spec.random_crop, spec.cache_latents) == (True, True, True, False)
    alias = train_cmd.spec_from_args(_parse("--trigger", "zq", "--caption-tag-dropout-rate", "0.2"))
    assert alias.caption_tag_dropout == 0.2  # sd-scripts' spelling
    plain = train_cmd.spec_from_args(_parse("--trigger", "zq"))
    assert not (plain.shuffle_caption or plain.flip_aug or plain.color_aug or plain.random_crop)
    assert (plain.keep_tokens, plain.caption_tag_dropout, plain.keep_tokens_separator) == (0, 0.0, "")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"keep_tokens": -1}, "keep_tokens must be ≥ 0"),
        ({"caption_tag_dropout": 1.0}, "caption_tag_dropout must be in"),
        ({"caption_tag_dropout": -0.1}, "caption_tag_dropout must be in"),
        ({"caption_separator": " "}, "caption_separator"),
        ({"keep_tokens_separator": ","}, "keep_tokens_separator"),
        ({"color_aug": True}, "cannot use cached latents"),
        ({"random_crop": True}, "cannot use cached latents"),
    ],
)
def test_invalid_values_are_refused(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainSpec(trigger="zq", **options)  # type: ignore[arg-type]


def test_the_cli_refuses_bad_values_in_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    base = ["train", "--trigger", "zq", "--images", str(tmp_path), "--data-dir", str(tmp_path / "d")]
    assert main([*base, "--keep-tokens", "-1"]) == 2
    assert "keep_tokens must be ≥ 0" in capsys.readouterr().err
    assert main([*base, "--color-aug"]) == 2
    assert "--no-cache-latents" in capsys.readouterr().err


def test_fingerprint_of_a_spec_without_the_new_options_is_unchanged() -> None:
    spec = fast_spec()
    skip = {"sample_every", "sample_prompts", "sample_seeds", "sample_steps", "sample_guidance"}
    skip |= {"checkpoint_every", "keep_checkpoints", "name"}
    older = {k: v for k, v in asdict(spec).items() if k not in skip | LATER_OPTIONS}
    assert spec.fingerprint() == hashlib.sha256(json.dumps(older, sort_keys=True).encode()).hexdigest()[:16]
    assert replace(spec, shuffle_caption=True).fingerprint() != spec.fingerprint()
    assert replace(spec, flip_aug=True).fingerprint() != spec.fingerprint()


# ---- resume stays bit-for-bit with the options on ------------------------------------------------

WITH_CACHE = fast_spec(
    steps=6,
    checkpoint_every=2,
    shuffle_caption=True,
    keep_tokens=1,
    caption_tag_dropout=0.3,
    caption_dropout=0.2,
    flip_aug=True,
)
WITHOUT_CACHE = replace(WITH_CACHE, cache_latents=False, color_aug=True, random_crop=True)


@pytest.mark.parametrize("spec", [WITH_CACHE, WITHOUT_CACHE], ids=["cached-flip", "uncached-colour-crop"])
def test_resume_is_bit_identical_with_the_options_on(
    spec: TrainSpec, tiny_pipeline_dir: Path, tag_dir: Path, tmp_path: Path
) -> None:
    straight = train_lora(
        spec, tiny_pipeline_dir, tag_dir, tmp_path / "a.safetensors", work_dir=tmp_path / "a", device="cpu"
    )
    whole = load_latest(tmp_path / "a" / "checkpoints")["lora"]
    for key in ("ss_shuffle_caption", "ss_flip_aug", "ss_color_aug", "ss_random_crop"):
        assert straight.metadata[key] == ("True" if getattr(spec, key[3:]) else "False")
    assert (
        straight.metadata["ss_keep_tokens"] == "1"
        and straight.metadata["ss_caption_tag_dropout_rate"] == "0.3"
    )

    cancel = threading.Event()

    def at_three(p: TrainProgress) -> None:
        if p.phase == "training" and p.step == 3:
            cancel.set()

    out, work = tmp_path / "b.safetensors", tmp_path / "b"
    with pytest.raises(TrainingCancelled):
        train_lora(
            spec,
            tiny_pipeline_dir,
            tag_dir,
            out,
            work_dir=work,
            device="cpu",
            progress=at_three,
            cancel=cancel,
        )
    resumed = train_lora(spec, tiny_pipeline_dir, tag_dir, out, work_dir=work, device="cpu")
    assert resumed.resumed_from == 3
    halves = load_latest(work / "checkpoints")["lora"]
    assert halves.keys() == whole.keys()
    assert all(torch.equal(halves[k], whole[k]) for k in whole)  # bit for bit
    assert resumed.losses == straight.losses

    # and the options did change the training
    off = replace(
        spec, **{k: getattr(TrainSpec(trigger=TRIGGER), k) for k in LATER_OPTIONS}, cache_latents=True
    )
    baseline = train_lora(
        off, tiny_pipeline_dir, tag_dir, tmp_path / "c.safetensors", work_dir=tmp_path / "c", device="cpu"
    )
    assert baseline.losses != straight.losses


def test_sdxl_is_told_the_mirrored_crop_corner(concept_dir: Path, tmp_path: Path) -> None:
    from tests.training.conftest import build_tiny_sdxl_pipeline

    folder = tmp_path / "wide"
    folder.mkdir()
    for i in range(3):  # 64×40 pictures in the one 32×32 bucket: covered at 51×32, 19 columns to spare
        shutil.copy(concept_dir / "wide.png", folder / f"w{i}.png")
        (folder / f"w{i}.txt").write_text(f"{TRIGGER}, star, " + ", ".join(BODY[i:]))
    spec = fast_spec(
        steps=6, bucketing=False, flip_aug=True, random_crop=True, cache_latents=False, shuffle_caption=True
    )
    pipe = build_tiny_sdxl_pipeline()
    examples = prepare_examples(items_from_folder(folder), spec, list(Geometry.of(pipe, spec).buckets))
    (work := tmp_path / "work").mkdir()
    trainer = LoraTrainer(spec, pipe, examples, work, torch.device("cpu"), None)
    trainer.prepare()
    corners: list[tuple[int, int]] = []
    original = trainer.time_ids

    def spy(batch, dtype):  # type: ignore[no-untyped-def]
        corners.extend(e.crop_top_left for e in batch)
        return original(batch, dtype)

    trainer.time_ids = spy  # type: ignore[method-assign]
    trainer.run()
    trainer.detach()
    assert all(torch.isfinite(torch.tensor(trainer.losses)))
    expected = [
        augmented_corner(trainer.examples[i], draw_augment(spec, augment_rng(spec.seed, m, IMAGE_STREAM, k)))
        for m in range(6)
        for k, i in enumerate(trainer.plan.batch(m))
    ]
    assert corners == expected and len(set(corners)) > 2
    assert all(top == 0 and 0 <= left <= 19 for top, left in corners)
