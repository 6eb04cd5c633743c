"""What a LoRA training run does: one frozen ``TrainSpec`` with every option, and three presets.

Option names follow kohya_ss / diffusers' DreamBooth-LoRA script where one exists; defaults are the
"balanced" preset, meant for a person who sets nothing. A few options (``None``) are left to the base
family, filled in by ``for_family`` once the model is loaded: kohya's choices for real SD models, and
for the pocket model what ``benchmarks/train_quality.py`` measured best.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

# Module-name suffixes PEFT targets, per preset (diffusers' UNet / transformers' CLIP names).
UNET_TARGETS: dict[str, tuple[str, ...]] = {
    "attn": ("to_q", "to_k", "to_v", "to_out.0"),
    "attn-mlp": ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"),
    "all": (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "proj_in",
        "proj_out",
        "ff.net.0.proj",
        "ff.net.2",
        "conv1",
        "conv2",
        "conv_shortcut",
        "time_emb_proj",
    ),
}
TEXT_TARGETS: dict[str, tuple[str, ...]] = {
    "attn": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "attn-mlp": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "all": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
}
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
PRIOR_TARGETS = ("noise", "base")
CAPTION_SOURCES = ("auto", "txt", "template")


# options held as tuples (JSON and the web form give lists)
TUPLE_OPTIONS = frozenset({"target_modules", "sample_prompts", "sample_seeds", "prior_prompts"})


@dataclass(frozen=True)
class TrainSpec:
    """Every option of a DreamBooth-style LoRA run; validated on construction."""

    trigger: str
    class_word: str = ""
    # captions
    caption_source: str = "auto"  # auto: a .txt beside the picture if there is one, else the template
    caption_template: str = "a photo of {trigger} {class_word}"
    caption_dropout: float = 0.0
    # tag-style (booru) captions, as kohya-ss/sd-scripts treats them (library/train_util.py,
    # BaseDataset.process_caption): after whole-caption dropout, the caption is split at
    # caption_separator; the first keep_tokens tags (or those before keep_tokens_separator, and those
    # after a second one) stay in place, the others are shuffled and each dropped with probability
    # caption_tag_dropout. A tag holding the trigger is never dropped. Class and sample prompts are
    # used as written.
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""  # e.g. "|||": "zq, 1girl ||| smile, outdoors ||| best quality"
    caption_separator: str = ","
    caption_tag_dropout: float = 0.0  # sd-scripts' caption_tag_dropout_rate
    # picture augmentation (sd-scripts' flip_aug, color_aug, random_crop). flip_aug works with cached
    # latents (both the picture and its mirror image are encoded once); color_aug and random_crop change
    # the pixels every step, so, as in sd-scripts, they need cache_latents=False.
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False
    # the adapter
    rank: int = 16
    alpha: float | None = None  # None: alpha = rank (scale 1)
    use_rslora: bool = False  # scale alpha/sqrt(r) (Kalajdzievski 2023, arXiv 2312.03732)
    use_dora: bool = False  # weight-decomposed LoRA (Liu et al. 2024, arXiv 2402.09353)
    lora_dropout: float = 0.0
    targets: str | None = None  # a key of UNET_TARGETS; None: the base family's (FAMILY_DEFAULTS)
    target_modules: tuple[str, ...] = ()  # explicit UNet module names; overrides ``targets``
    train_text_encoder: bool | None = None  # None: the base family's
    text_encoder_lr: float | None = None  # None: same as learning_rate
    orthogonal: bool = False  # Orthogonal Adaptation (Po et al. 2023, arXiv 2312.02432)
    # optimisation
    steps: int | None = None  # None: the base family's
    epochs: int | None = None  # when set, steps = epochs × batches per epoch
    learning_rate: float | None = None  # None: the base family's
    lora_plus_ratio: float = 1.0  # LoRA+: lr(B) / lr(A) (Hayou et al. 2024, arXiv 2402.12354)
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    batch_size: int = 1
    grad_accum: int = 1
    # data
    resolution: int | None = None  # None: the model's native size
    bucketing: bool = True
    cache_latents: bool = True
    # prior preservation (DreamBooth, Ruiz et al. 2023)
    prior_preservation: bool | None = None  # None: on with a class word, or with the family's domain prompts
    # {caption}: each picture's caption with the trigger replaced by the class word (dropped when there is
    # none), so the prior covers the same sizes, colours and settings the pictures show; with template
    # captions it is DreamBooth's "a photo of {class_word}".
    class_prompt: str = "{caption}"
    prior_prompts: tuple[str, ...] = ()  # explicit class-image prompts (cycled); override class_prompt
    num_class_images: int | None = None  # None: the base family's
    class_steps: int = 25  # denoising steps per class image
    prior_loss_weight: float | None = None  # None: the base family's
    # share of class pictures trained with the empty prompt: holds the unconditional prediction, which
    # classifier-free guidance subtracts, where the base model has it
    prior_caption_dropout: float | None = None  # None: the base family's
    # what the class pictures are trained towards: "noise" (DreamBooth's target, the noise that was
    # added) or "base" (the untouched model's own prediction for the same noisy latent, prompt and
    # step: distillation, as in Learning without Forgetting, Li & Hoiem 2016). "base" pulls every
    # step towards the old behaviour instead of towards a noisy sample of it; it costs one more
    # forward pass of the text encoder and UNet per class picture. None: the base family's.
    prior_target: str | None = None
    # loss
    min_snr_gamma: float | None = 5.0  # Hang et al. 2023, arXiv 2303.09556
    noise_offset: float = 0.0
    # machinery
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"  # auto: bf16 (or fp16) on CUDA, full precision on CPU
    clip_skip: int | None = None
    seed: int = 0
    # monitoring
    sample_every: int = 200  # 0: samples only at the end
    sample_prompts: tuple[str, ...] = ()  # empty: the caption template
    sample_seeds: tuple[int, ...] = (1, 2)
    sample_steps: int = 20
    sample_guidance: float = 7.5
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    name: str = ""  # output name; empty: the trigger

    def __post_init__(self) -> None:
        for problem in _problems(self):
            raise ValueError(f"invalid training option: {problem}")

    @property
    def kohya_alpha(self) -> float:
        """The alpha that makes kohya's alpha/rank equal PEFT's scale (alpha/rank or alpha/√rank)."""
        alpha = float(self.rank if self.alpha is None else self.alpha)
        return alpha * self.rank**0.5 if self.use_rslora else alpha

    @property
    def peft_alpha(self) -> float:
        """The ``lora_alpha`` handed to PEFT."""
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def varies_captions(self) -> bool:
        """Whether a picture's caption changes from step to step (tags shuffled or dropped)."""
        return self.shuffle_caption or self.caption_tag_dropout > 0

    @property
    def augments_pixels(self) -> bool:
        """Whether pictures are flipped, recoloured or cropped at random."""
        return self.flip_aug or self.color_aug or self.random_crop

    @property
    def uses_prior(self) -> bool:
        """Whether prior preservation runs."""
        on = bool(self.class_word) if self.prior_preservation is None else self.prior_preservation
        count = self.num_class_images
        count = GENERIC_DEFAULTS["num_class_images"] if count is None else count
        weight = self.prior_loss_weight
        weight = GENERIC_DEFAULTS["prior_loss_weight"] if weight is None else weight
        return on and weight > 0 and count > 0

    @property
    def unet_targets(self) -> tuple[str, ...]:
        """UNet module names the adapter wraps."""
        return self.target_modules or UNET_TARGETS[self.targets or GENERIC_DEFAULTS["targets"]]

    @property
    def text_targets(self) -> tuple[str, ...]:
        """Text-encoder module names the adapter wraps (when it trains the text encoder)."""
        return TEXT_TARGETS["attn" if self.target_modules else self.targets or GENERIC_DEFAULTS["targets"]]

    @property
    def output_name(self) -> str:
        """The adapter's name."""
        return self.name or self.trigger

    def prior_prompt(self, caption: str, k: int = 0) -> str:
        """The prior-preservation prompt of class image ``k``, made for a picture with this caption."""
        if self.prior_prompts:
            return self.fill(self.prior_prompts[k % len(self.prior_prompts)])
        if "{caption}" not in self.class_prompt:
            return self.fill(self.class_prompt)
        plain = self.without_trigger(caption)
        return self.fill(self.class_prompt.replace("{caption}", plain))

    def without_trigger(self, caption: str) -> str:
        """The caption with the trigger (a whole word, punctuation aside) → the class word, never doubled."""
        word = self.class_word

        def swap(m: re.Match[str]) -> str:
            before, after = caption[: m.start()], caption[m.end() :]
            beside = word and (
                re.search(rf"(?<!\w){re.escape(word)}\W*$", before)
                or re.match(rf"\W*{re.escape(word)}(?!\w)", after)
            )
            return "" if beside else word  # "zq dog" → "dog", "a zq" → "a dog"

        swapped = re.sub(rf"(?<!\w){re.escape(self.trigger)}(?!\w)", swap, caption)
        tags = (" ".join(t.split()) for t in swapped.split(","))
        return ", ".join(t for t in tags if t)

    def fill(self, text: str) -> str:
        """Put trigger and class word into a template and tidy the spaces."""
        filled = text.replace("{trigger}", self.trigger).replace("{class_word}", self.class_word)
        return " ".join(filled.split())

    def to_json(self) -> str:
        """The spec as JSON (stable key order)."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainSpec:
        """Rebuild a spec from ``asdict``/JSON data; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        if extra := sorted(set(data) - known):
            raise ValueError(f"unknown training options: {', '.join(extra)}")
        return cls(**{k: tuple(v) if k in TUPLE_OPTIONS and v is not None else v for k, v in data.items()})

    @classmethod
    def from_json(cls, text: str) -> TrainSpec:
        """Inverse of ``to_json``."""
        return cls.from_dict(json.loads(text))

    def fingerprint(self) -> str:
        """Hash of every option that changes the trained weights (monitoring options excluded)."""
        skip = {
            "sample_every",
            "sample_prompts",
            "sample_seeds",
            "sample_steps",
            "sample_guidance",
            "checkpoint_every",
            "keep_checkpoints",
            "name",
        }
        defaults = {f.name: f.default for f in fields(self)}
        data = {
            k: v
            for k, v in asdict(self).items()
            if k not in skip and not (k in LATER_OPTIONS and v == defaults[k])
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# Options added after runs were already stored: hashed only when set, so a work folder (and its
# checkpoints) of an older run still belongs to the same spec.
LATER_OPTIONS = frozenset(
    {
        "shuffle_caption",
        "keep_tokens",
        "keep_tokens_separator",
        "caption_separator",
        "caption_tag_dropout",
        "flip_aug",
        "color_aug",
        "random_crop",
    }
)


def _problems(s: TrainSpec) -> list[str]:
    """Human-readable reasons a spec is invalid (empty when it is fine)."""
    checks = [
        (bool(s.trigger.strip()) and s.trigger == s.trigger.strip(), "trigger must be a non-empty word"),
        (s.rank >= 1, f"rank must be ≥ 1, got {s.rank}"),
        (s.alpha is None or s.alpha > 0, f"alpha must be > 0, got {s.alpha}"),
        (0 <= s.caption_dropout < 1, f"caption_dropout must be in [0, 1), got {s.caption_dropout}"),
        (
            s.prior_caption_dropout is None or 0 <= s.prior_caption_dropout < 1,
            f"prior_caption_dropout must be in [0, 1), got {s.prior_caption_dropout}",
        ),
        (s.keep_tokens >= 0, f"keep_tokens must be ≥ 0, got {s.keep_tokens}"),
        (
            0 <= s.caption_tag_dropout < 1,
            f"caption_tag_dropout must be in [0, 1), got {s.caption_tag_dropout}",
        ),
        (bool(s.caption_separator.strip()), "caption_separator must be a non-blank string such as ','"),
        (
            not s.keep_tokens_separator
            or (bool(s.keep_tokens_separator.strip()) and s.keep_tokens_separator != s.caption_separator),
            f"keep_tokens_separator must be blank (off) or a marker other than the caption separator, "
            f"got {s.keep_tokens_separator!r}",
        ),
        (
            not (s.cache_latents and (s.color_aug or s.random_crop)),
            "color_aug and random_crop change the pixels every step, so they cannot use cached latents "
            "(as in sd-scripts); turn cache_latents off (--no-cache-latents) or leave them off",
        ),
        (0 <= s.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {s.lora_dropout}"),
        (
            s.targets is None or s.targets in UNET_TARGETS,
            f"targets must be one of {sorted(UNET_TARGETS)}, got {s.targets!r}",
        ),
        (s.steps is None or s.steps >= 1, f"steps must be ≥ 1, got {s.steps}"),
        (s.epochs is None or s.epochs >= 1, f"epochs must be ≥ 1, got {s.epochs}"),
        (s.learning_rate is None or s.learning_rate > 0, f"learning_rate must be > 0, got {s.learning_rate}"),
        (s.text_encoder_lr is None or s.text_encoder_lr >= 0, "text_encoder_lr must be ≥ 0"),
        (s.lora_plus_ratio >= 1, f"lora_plus_ratio must be ≥ 1, got {s.lora_plus_ratio}"),
        (s.lr_scheduler in LR_SCHEDULERS, f"lr_scheduler must be one of {LR_SCHEDULERS}"),
        (s.lr_warmup_steps >= 0, "lr_warmup_steps must be ≥ 0"),
        (s.batch_size >= 1 and s.grad_accum >= 1, "batch_size and grad_accum must be ≥ 1"),
        (s.resolution is None or s.resolution >= 8, f"resolution must be ≥ 8, got {s.resolution}"),
        (s.caption_source in CAPTION_SOURCES, f"caption_source must be one of {CAPTION_SOURCES}"),
        ("{trigger}" in s.caption_template, "caption_template must contain {trigger}"),
        (
            (s.num_class_images or 0) >= 0 and (s.prior_loss_weight or 0) >= 0,
            "class images and prior weight must be ≥ 0",
        ),
        (
            s.prior_target is None or s.prior_target in PRIOR_TARGETS,
            f"prior_target must be one of {PRIOR_TARGETS}, got {s.prior_target!r}",
        ),
        (s.class_steps >= 1, f"class_steps must be ≥ 1, got {s.class_steps}"),
        (
            not (
                s.prior_preservation
                and not s.class_word
                and "{caption}" not in s.class_prompt
                and not s.prior_prompts
            ),
            "prior preservation needs a class word, prior prompts or {caption}",
        ),
        (s.min_snr_gamma is None or s.min_snr_gamma > 0, "min_snr_gamma must be > 0 or None"),
        (s.noise_offset >= 0, "noise_offset must be ≥ 0"),
        (s.mixed_precision in MIXED_PRECISION, f"mixed_precision must be one of {MIXED_PRECISION}"),
        (s.clip_skip is None or s.clip_skip >= 0, "clip_skip must be ≥ 0"),
        (s.sample_every >= 0 and s.sample_steps >= 1, "sample_every must be ≥ 0 and sample_steps ≥ 1"),
        (s.checkpoint_every >= 1 and s.keep_checkpoints >= 1, "checkpoint_every and keep_checkpoints ≥ 1"),
    ]
    return [msg for ok, msg in checks if not ok]


# Options a spec may leave to the base family (None). Real SD models get kohya's usual choices. The
# pocket model (small, trained from scratch, never shown the LoRA-only concepts) learns a new object
# only with every layer kind adapted and the text encoder trained at a higher rate, and keeps its
# base prompts only with a prior drawn from its own domain: captions of base scenes, a fifth of them
# trained with the empty prompt, trained towards the untouched model's own predictions at three times
# the weight of the pictures, over 4000 steps (benchmarks/train_quality.py, README "Training a
# personal LoRA": concept 87 %, base attributes within 3 points).
GENERIC_DEFAULTS: dict[str, Any] = {
    "targets": "attn",
    "learning_rate": 1e-4,
    "train_text_encoder": False,
    "steps": 800,
    "num_class_images": 50,
    "prior_caption_dropout": 0.0,
    "prior_target": "noise",
    "prior_loss_weight": 1.0,
}
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "pocket": {
        "targets": "all",
        "learning_rate": 1e-3,
        "train_text_encoder": True,
        "steps": 4000,
        "num_class_images": 100,
        "prior_caption_dropout": 0.2,
        "prior_target": "base",
        "prior_loss_weight": 3.0,
    },
}


def domain_prompts(family: str, n: int) -> tuple[str, ...]:
    """Prompts of what a base family draws by itself, for a prior without a class word (pocket only)."""
    if family != "pocket":
        return ()
    from pipelines.pocket import world

    return world.base_captions(n, seed=99)


def for_family(spec: TrainSpec, family: str) -> TrainSpec:
    """The spec with the options it left to the base family (``None``) filled in."""
    defaults = {**GENERIC_DEFAULTS, **FAMILY_DEFAULTS.get(family, {})}
    spec = replace(spec, **{k: v for k, v in defaults.items() if getattr(spec, k) is None})
    open_prior = spec.prior_preservation is None and not spec.class_word and not spec.prior_prompts
    if open_prior and (prompts := domain_prompts(family, spec.num_class_images)):
        spec = replace(spec, prior_preservation=True, prior_prompts=prompts)
    return spec


# Presets: "balanced" is the dataclass default; the others override a few options.
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"rank": 8, "steps": 300, "learning_rate": 2e-4, "sample_every": 100},
    "balanced": {},
    "quality": {
        "rank": 32,
        "steps": 1500,
        "learning_rate": 1e-4,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 50,
        "targets": "attn-mlp",
        "train_text_encoder": True,
        "text_encoder_lr": 5e-5,
        "caption_dropout": 0.05,
        "num_class_images": 100,
        "noise_offset": 0.05,
    },
}


def preset(name: str, trigger: str, **overrides: Any) -> TrainSpec:
    """A spec from a preset (quick, balanced, quality) with some options changed."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(TrainSpec(trigger=trigger), **{**PRESETS[name], **overrides})
