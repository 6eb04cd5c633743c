"""TrainSpec: validation, presets, JSON round trip, alpha conventions, fingerprint."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pipelines.training import PRESETS, TrainSpec, preset


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"trigger": ""}, "trigger must be a non-empty word"),
        ({"trigger": " sks"}, "trigger must be a non-empty word"),
        ({"rank": 0}, "rank must be ≥ 1"),
        ({"alpha": -1.0}, "alpha must be > 0"),
        ({"caption_dropout": 1.0}, "caption_dropout must be in"),
        ({"prior_caption_dropout": -0.1}, "prior_caption_dropout must be in"),
        ({"prior_target": "teacher"}, "prior_target must be one of"),
        ({"targets": "everything"}, "targets must be one of"),
        ({"steps": 0}, "steps must be ≥ 1"),
        ({"learning_rate": 0.0}, "learning_rate must be > 0"),
        ({"lora_plus_ratio": 0.5}, "lora_plus_ratio must be ≥ 1"),
        ({"lr_scheduler": "exotic"}, "lr_scheduler must be one of"),
        ({"caption_template": "a photo"}, "caption_template must contain {trigger}"),
        (
            {"prior_preservation": True, "class_prompt": "a photo of {class_word}"},
            "prior preservation needs a class word",
        ),
        ({"mixed_precision": "fp8"}, "mixed_precision must be one of"),
        ({"min_snr_gamma": 0.0}, "min_snr_gamma must be > 0"),
    ],
)
def test_invalid_options_are_named(overrides: dict, message: str) -> None:
    args = {"trigger": "sks", **overrides}
    with pytest.raises(ValueError, match=message):
        TrainSpec(**args)


def test_presets_differ_and_default_is_balanced() -> None:
    assert preset("balanced", "sks") == TrainSpec(trigger="sks")
    quick, quality = preset("quick", "sks"), preset("quality", "sks")
    from pipelines.training.config import for_family

    assert quick.steps < for_family(TrainSpec(trigger="sks"), "sd1").steps < quality.steps
    assert quality.train_text_encoder and quality.rank > quick.rank
    assert preset("quick", "sks", rank=3).rank == 3
    with pytest.raises(ValueError, match="unknown preset"):
        preset("turbo", "sks")
    assert set(PRESETS) == {"quick", "balanced", "quality"}


def test_json_round_trip_and_unknown_keys() -> None:
    spec = TrainSpec(
        trigger="sks",
        class_word="dog",
        target_modules=("to_q", "to_v"),
        sample_prompts=("x",),
        sample_seeds=(3, 4),
        use_dora=True,
    )
    assert TrainSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError, match="unknown training options: bogus"):
        TrainSpec.from_dict({"trigger": "sks", "bogus": 1})


def test_alpha_conventions() -> None:
    assert TrainSpec(trigger="s", rank=16).kohya_alpha == 16.0  # alpha None = rank
    assert TrainSpec(trigger="s", rank=16, alpha=8).kohya_alpha == 8.0
    # rsLoRA: PEFT scale alpha/sqrt(r) = 8/4 = 2 → kohya alpha = scale × r = 32
    assert TrainSpec(trigger="s", rank=16, alpha=8, use_rslora=True).kohya_alpha == pytest.approx(32.0)


def test_prior_preservation_follows_the_class_word() -> None:
    assert not TrainSpec(trigger="s").uses_prior
    assert TrainSpec(trigger="s", class_word="dog").uses_prior
    assert not TrainSpec(trigger="s", class_word="dog", prior_preservation=False).uses_prior
    template = "a photo of {trigger} {class_word}"
    assert TrainSpec(trigger="s", class_word="dog").fill(template) == "a photo of s dog"
    assert TrainSpec(trigger="s").fill("a photo of {trigger} {class_word}") == "a photo of s"


def test_fingerprint_ignores_monitoring_only() -> None:
    spec = TrainSpec(trigger="sks")
    assert replace(spec, sample_every=7, checkpoint_every=3, name="x").fingerprint() == spec.fingerprint()
    assert replace(spec, learning_rate=2e-4).fingerprint() != spec.fingerprint()


def test_family_defaults_fill_only_what_the_spec_leaves_open() -> None:
    from pipelines.training.config import FAMILY_DEFAULTS, GENERIC_DEFAULTS, for_family

    spec = TrainSpec(trigger="sks")
    sd = for_family(spec, "sd1")
    assert (
        (sd.targets, sd.learning_rate, sd.train_text_encoder, sd.steps)
        == ("attn", 1e-4, False, 800)
        == tuple(GENERIC_DEFAULTS[k] for k in ("targets", "learning_rate", "train_text_encoder", "steps"))
    )
    assert not sd.uses_prior  # no class word, no domain prompts for real models
    pocket = for_family(spec, "pocket")
    assert pocket.targets == FAMILY_DEFAULTS["pocket"]["targets"] == "all" and pocket.train_text_encoder
    assert pocket.uses_prior and len(pocket.prior_prompts) == pocket.num_class_images
    assert all(" on a " in p and "sks" not in p for p in pocket.prior_prompts)
    assert for_family(pocket, "pocket") == pocket  # idempotent
    set_by_hand = TrainSpec(trigger="sks", learning_rate=3e-4, steps=10, prior_preservation=False)
    mine = for_family(set_by_hand, "pocket")
    assert (mine.learning_rate, mine.steps, mine.uses_prior) == (3e-4, 10, False)
    dog = for_family(TrainSpec(trigger="sks", class_word="dog"), "pocket")
    assert dog.prior_prompts == () and dog.prior_prompt("a photo of sks dog") == "a photo of dog"
    assert (sd.prior_target, sd.prior_loss_weight) == ("noise", 1.0)  # DreamBooth's prior
    # the pocket model keeps its base prompts only when its prior is distilled from itself, weighted ×3
    assert (pocket.prior_target, pocket.prior_loss_weight, pocket.steps) == ("base", 3.0, 4000)
    assert not for_family(TrainSpec(trigger="sks", prior_loss_weight=0.0), "pocket").uses_prior


def test_bundled_concept_recipes_do_not_follow_the_family_defaults() -> None:
    """``pocket train --stage loras`` must remake the bundled LoRAs: each recipe pins every option the
    pocket family would otherwise fill, so filling in the family's defaults changes nothing. Only the
    striped and neon recipes train with a prior (the family's distilled one, from their pictures' own
    captions), and every recipe stays at the issue's rank 4–8."""
    from pipelines.pocket.concepts import CONCEPTS, recipe
    from pipelines.training.config import for_family

    for trigger in CONCEPTS:
        spec, _ = recipe(trigger)
        assert for_family(spec, "pocket") == spec
        assert spec.uses_prior == (trigger in ("striped", "neon"))
        assert 4 <= spec.rank <= 8
    neon, _ = recipe("neon")
    assert (neon.prior_target, neon.prior_loss_weight, neon.num_class_images) == ("base", 3.0, 100)
    assert neon.prior_prompt("a big neon red circle on a black background").strip() == (
        "a big red circle on a black background"
    )
