"""DreamBooth-style LoRA training of any Stable-Diffusion-family pipeline (pocket, SD 1.x/2.x, SDXL).

PEFT injects the LoRA layers; diffusers supplies the noise scheduler (``DDPMScheduler`` built from the
model's own scheduler config and prediction type), min-SNR weights (``compute_snr``), LR schedules
(``get_scheduler``) and aspect-ratio buckets; PEFT's LoRA+ optimiser groups set the B/A learning
rates. Every random draw is a pure function of (seed, micro-batch index), and checkpoints hold LoRA
tensors, optimiser, LR schedule, RNG state and step, so a run resumed after a crash or a cancel ends
bit-for-bit where an uninterrupted run would.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DiffusionPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params, compute_snr
from peft import LoraConfig, inject_adapter_in_model
from peft.optimizers import create_loraplus_optimizer
from peft.tuners.tuners_utils import BaseTunerLayer

from pipelines.images import ImageLimits
from pipelines.lora_formats import UNKNOWN_FAMILY, pipeline_family
from pipelines.training.checkpoint import load_latest, rng_state, save_checkpoint, set_rng_state
from pipelines.training.config import TrainSpec, for_family
from pipelines.training.data import (
    CAPTION_STREAM,
    CLASS_IMAGE_STREAM,
    IMAGE_STREAM,
    NO_AUGMENT,
    Augment,
    BatchPlan,
    Example,
    ImageItem,
    LatentCache,
    augment_rng,
    augmented_corner,
    buckets_for,
    draw_augment,
    encode_pixels,
    examples_fingerprint,
    items_from_folder,
    load_pixels,
    prepare_examples,
    step_caption,
)
from pipelines.training.export import peft_to_lora_weights, remove_lora, write_adapter
from pipelines.training.metadata import RunInfo, text_encoder_lr, training_metadata
from pipelines.training.orthogonal import BasisSlot, freeze_down_projections
from pipelines.training.sampling import generate_class_images, render_samples, write_loss_curve

ADAPTER = "studio_train"
POCKET_DIR = Path(__file__).resolve().parents[1] / "pocket" / "weights"


class TrainingCancelled(RuntimeError):
    """Raised when the cancel event is set; the last state is checkpointed, nothing is exported."""

    def __init__(self, step: int) -> None:
        super().__init__(f"training cancelled at step {step}")
        self.step = step


@dataclass(frozen=True)
class TrainProgress:
    """One progress report: phase, steps done of total, last loss, ETA, newest sample picture."""

    phase: str  # "class images", "caching latents", "training", "sampling", "saving", "done"
    step: int
    total: int
    loss: float | None = None
    eta_s: float | None = None
    sample_path: Path | None = None


ProgressFn = Callable[[TrainProgress], None]


@dataclass(frozen=True)
class TrainResult:
    """What a finished run produced."""

    kohya_path: Path
    diffusers_path: Path
    work_dir: Path
    family: str
    steps: int
    losses: tuple[float, ...]
    captions: tuple[str, ...]
    sample_images: tuple[Path, ...]
    sample_prompts: tuple[str, ...]  # the prompt of each sample picture
    loss_curve: Path
    metadata: dict[str, str] = field(repr=False)
    resumed_from: int = 0


def load_base_pipeline(model: str | Path | DiffusionPipeline) -> DiffusionPipeline:
    """The base pipeline to train on: a loaded pipeline, ``"pocket"``, or a diffusers folder."""
    if isinstance(model, DiffusionPipeline):
        return model
    path = POCKET_DIR if str(model) == "pocket" else Path(model)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"not a diffusers pipeline folder (no model_index.json): {path}")
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def detect_family(pipe: DiffusionPipeline) -> str:
    """Base family of a pipeline (sd1, sd2, sdxl, pocket; ``unknown`` for test-size models)."""
    return pipeline_family(pipe) or UNKNOWN_FAMILY


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` → CUDA when present, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_precision(spec: TrainSpec, device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """(dtype of the frozen weights, autocast dtype or None) for the spec's mixed_precision."""
    mode = spec.mixed_precision
    if mode == "auto":
        mode = "no" if device.type != "cuda" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    if mode == "no":
        return torch.float32, None
    if mode == "fp16" and device.type != "cuda":
        raise ValueError("fp16 mixed precision needs a CUDA device; use bf16 or no on the CPU")
    amp = torch.float16 if mode == "fp16" else torch.bfloat16
    return (amp if device.type == "cuda" else torch.float32), amp


def place_pipeline(pipe: DiffusionPipeline, device: torch.device, dtype: torch.dtype) -> None:
    """Move a pipeline we loaded ourselves; frozen weights in ``dtype`` (SDXL's VAE stays fp32)."""
    pipe.to(device)
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        part = getattr(pipe, name, None)
        if part is not None and not (name == "vae" and getattr(pipe, "text_encoder_2", None) is not None):
            part.to(dtype=dtype)


@dataclass(frozen=True)
class Geometry:
    """Training resolution, the pixel multiple every bucket side keeps, and the buckets."""

    resolution: int
    divisibility: int
    buckets: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, pipe: DiffusionPipeline, spec: TrainSpec) -> Geometry:
        """The geometry the spec asks for on this pipeline (native size when unset)."""
        vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        divisibility = vae_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
        native = int(pipe.unet.config.sample_size) * vae_factor
        resolution = spec.resolution or native
        if resolution < divisibility:
            raise ValueError(f"resolution {resolution} is below this model's minimum of {divisibility} px")
        if resolution % divisibility:
            low = resolution // divisibility * divisibility
            high = low + divisibility
            raise ValueError(
                f"resolution {resolution} is not a multiple of {divisibility} px, which this model's latents "
                f"need; use {low} or {high}"
            )
        return cls(resolution, divisibility, tuple(buckets_for(resolution, divisibility, spec.bucketing)))


def minimum_snr_weights(scheduler: DDPMScheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weights min(SNR, γ)/SNR, or /(SNR+1) for v-prediction (Hang et al. 2023)."""
    snr = compute_snr(scheduler, t)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    if scheduler.config.prediction_type == "sample":
        return clipped
    return clipped / snr


@contextmanager
def adapters_disabled(models: Iterable[torch.nn.Module]) -> Iterator[None]:
    """The untouched base model for a moment: PEFT's adapter layers bypassed, trainable flags kept."""
    models = list(models)
    layers = [m for model in models for m in model.modules() if isinstance(m, BaseTunerLayer)]
    flags = [(p, p.requires_grad) for model in models for p in model.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, trains in flags:
            p.requires_grad_(trains)


class TextConditioner:
    """Caption → UNet conditioning through the pipeline's own ``encode_prompt``; cached when frozen
    (unless ``cache`` is off: with shuffled or dropped tags nearly every caption is new, as sd-scripts'
    is_text_encoder_output_cacheable says)."""

    def __init__(
        self,
        pipe: DiffusionPipeline,
        device: torch.device,
        clip_skip: int | None,
        trains: bool,
        cache: bool = True,
    ):
        self.pipe, self.device, self.clip_skip, self.trains = pipe, device, clip_skip, trains
        self.caching = cache
        self.sdxl = getattr(pipe, "text_encoder_2", None) is not None
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states, pooled embedding or None) for a list of captions."""
        if self.sdxl:
            emb, _, pooled, _ = self.pipe.encode_prompt(
                prompt=captions,
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
                clip_skip=self.clip_skip,
            )
            return emb, pooled
        emb, _ = self.pipe.encode_prompt(captions, self.device, 1, False, clip_skip=self.clip_skip)
        return emb, None

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Conditioning for a batch; frozen encoders answer from (and fill) the cache."""
        if self.trains:
            return self._encode(captions)
        if not self.caching:
            with torch.no_grad():
                return self._encode(captions)
        missing = sorted(set(captions) - set(self.cache))
        if missing:
            with torch.no_grad():
                emb, pooled = self._encode(missing)
            for i, c in enumerate(missing):
                self.cache[c] = (emb[i : i + 1], None if pooled is None else pooled[i : i + 1])
        embs = torch.cat([self.cache[c][0] for c in captions])
        pooled = None if not self.sdxl else torch.cat([self.cache[c][1] for c in captions])  # type: ignore[misc]
        return embs, pooled


class LoraTrainer:
    """One training run on one pipeline: set up, step, checkpoint, sample, export."""

    PREPARING = ("class images", "caching latents")  # phases a cancel interrupts at once

    def __init__(
        self,
        spec: TrainSpec,
        pipe: DiffusionPipeline,
        examples: list[Example],
        work: Path,
        device: torch.device,
        amp: torch.dtype | None,
        basis: BasisSlot | None = None,
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        self.family = detect_family(pipe)
        spec = for_family(spec, self.family)
        self.spec, self.pipe, self.examples, self.work = spec, pipe, examples, work
        self.device, self.amp, self.basis = device, amp, basis
        self.progress, self.cancel = progress, cancel
        self.geometry = Geometry.of(pipe, spec)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        repeats = [e.repeats for e in examples]
        self.plan = BatchPlan([e.bucket for e in examples], spec.batch_size, spec.seed, repeats)
        self.total = (
            spec.steps
            if spec.epochs is None
            else math.ceil(spec.epochs * self.plan.per_epoch / spec.grad_accum)
        )
        self.step, self.resumed_from = 0, 0
        self.losses: list[float] = []
        self.samples: list[Path] = []
        self.sample_texts: list[str] = []
        self.class_examples: list[Example] = []
        self.components: dict[str, torch.nn.Module] = {}
        self.cache: LatentCache | None = None
        self.class_cache: LatentCache | None = None
        self.text: TextConditioner | None = None
        self.scaler: torch.amp.GradScaler | None = None

    # ---- reporting -------------------------------------------------------------------------
    def report(self, phase: str, loss: float | None = None, eta: float | None = None) -> None:
        """Tell the caller where we are; a set cancel event stops any phase here."""
        if self.cancel is not None and self.cancel.is_set() and phase in self.PREPARING:
            raise TrainingCancelled(self.step)
        if self.progress is not None:
            latest = self.samples[-1] if self.samples else None
            self.progress(TrainProgress(phase, self.step, self.total, loss, eta, latest))

    # ---- set-up ----------------------------------------------------------------------------
    def prepare(self) -> None:
        """Class images, latent caches, text cache, LoRA injection, optimiser, then resume."""
        if self.spec.uses_prior:
            self.make_class_examples()
        if self.spec.cache_latents:
            self.cache = self.fill_cache(self.examples, "latents")
            if self.class_examples:
                self.class_cache = self.fill_cache(self.class_examples, "class-latents")
        s = self.spec
        self.text = TextConditioner(
            self.pipe, self.device, s.clip_skip, s.train_text_encoder, not s.varies_captions
        )
        self.inject()
        self.build_optimizer()
        self.resume()

    def make_class_examples(self) -> None:
        """Generate (or reuse) the prior-preservation pictures with the untouched base model."""
        s, res = self.spec, self.geometry.resolution
        captions = [e.caption for e in self.examples]
        prompts = [s.prior_prompt(captions[i % len(captions)], i) for i in range(s.num_class_images)]
        folder = self.work / "class_images"
        paths = generate_class_images(
            self.pipe,
            prompts,
            (res, res),
            folder,
            s.seed,
            steps=s.class_steps,
            guidance=s.sample_guidance,
            progress=lambda done, total: self.report("class images"),
        )
        square = (res // self.geometry.divisibility * self.geometry.divisibility,) * 2
        self.class_examples = [
            Example(p, q, square, (res, res), (0, 0)) for p, q in zip(paths, prompts, strict=True)
        ]
        self.class_plan = BatchPlan([e.bucket for e in self.class_examples], s.batch_size, s.seed + 1)

    def fill_cache(self, examples: list[Example], name: str) -> LatentCache:
        """Encode every picture once (kept on disk under a name that hashes the data and model)."""
        key = f"{examples_fingerprint(examples)}-{self.spec.seed}-{self.family}"
        path = self.work / f"{name}-{key}.safetensors"
        cache = LatentCache(self.pipe.vae, examples, self.spec.seed, path, flip=self.spec.flip_aug)
        cache.fill(lambda done, total: self.report("caching latents"))
        return cache

    def lora_config(self, targets: Sequence[str]) -> LoraConfig:
        """The PEFT config of every adapted component."""
        s = self.spec
        return LoraConfig(
            r=s.rank,
            lora_alpha=s.peft_alpha,
            target_modules=list(targets),
            lora_dropout=s.lora_dropout,
            use_rslora=s.use_rslora,
            use_dora=s.use_dora,
            init_lora_weights=True,
        )

    def inject(self) -> None:
        """Freeze the base model, add LoRA layers (seeded), freeze orthogonal A's, fp32 trainables."""
        torch.manual_seed(self.spec.seed)
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            if (part := getattr(self.pipe, name, None)) is not None:
                part.requires_grad_(False)
        self.components = {"unet": self.pipe.unet}
        if self.spec.train_text_encoder:
            for name in ("text_encoder", "text_encoder_2"):
                if (part := getattr(self.pipe, name, None)) is not None:
                    self.components[name] = part
        for name, model in self.components.items():
            targets = self.spec.unet_targets if name == "unet" else self.spec.text_targets
            inject_adapter_in_model(self.lora_config(targets), model, ADAPTER)
            if self.spec.orthogonal:
                if self.basis is None:
                    raise ValueError("orthogonal training needs a basis slot (see orthogonal.BasisRegistry)")
                freeze_down_projections(model, name, self.basis, ADAPTER)
            cast_training_params(model, torch.float32)
            model.train()
        if self.spec.gradient_checkpointing:
            self.enable_gradient_checkpointing()

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in the backward pass (diffusers' and transformers' switches)."""
        self.pipe.unet.enable_gradient_checkpointing()
        for name, model in self.components.items():
            if name != "unet":
                model.gradient_checkpointing_enable()

    def trainable(self) -> list[torch.nn.Parameter]:
        """Every parameter the optimiser updates."""
        return [p for m in self.components.values() for p in m.parameters() if p.requires_grad]

    def build_optimizer(self) -> None:
        """AdamW over PEFT's LoRA+ groups (B at ratio × lr), the diffusers LR schedule, a GradScaler."""
        s, groups = self.spec, []
        for name, model in self.components.items():
            lr = s.learning_rate if name == "unet" else text_encoder_lr(s)
            opt = create_loraplus_optimizer(
                model,
                torch.optim.AdamW,
                lr=lr,
                loraplus_lr_ratio=s.lora_plus_ratio,
                loraplus_weight_decay=s.weight_decay,
            )
            groups += [g for g in opt.param_groups if g["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=s.learning_rate)
        self.lr_scheduler = get_scheduler(
            s.lr_scheduler, self.optimizer, num_warmup_steps=s.lr_warmup_steps, num_training_steps=self.total
        )
        if self.amp == torch.float16:
            self.scaler = torch.amp.GradScaler("cuda")

    # ---- checkpoints -----------------------------------------------------------------------
    def lora_tensors(self) -> dict[str, torch.nn.Parameter]:
        """Every LoRA parameter (trained or frozen) by component-qualified name."""
        return {
            f"{c}.{n}": p for c, m in self.components.items() for n, p in m.named_parameters() if "lora_" in n
        }

    def checkpoint(self) -> None:
        """Save everything a bit-exact resume needs."""
        state: dict[str, Any] = {
            "lora": {k: p.detach().cpu().clone() for k, p in self.lora_tensors().items()},
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "rng": rng_state(),
            "losses": torch.tensor(self.losses, dtype=torch.float64),
            "fingerprint": self.spec.fingerprint(),
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        save_checkpoint(self.work / "checkpoints", self.step, state, self.spec.keep_checkpoints)

    @torch.no_grad()
    def resume(self) -> None:
        """Continue from the newest checkpoint in the work folder, if there is one."""
        ck = load_latest(self.work / "checkpoints")
        if ck is None:
            return
        if ck["fingerprint"] != self.spec.fingerprint():
            raise ValueError(f"{self.work} holds a checkpoint of other options; use a fresh work folder")
        params = self.lora_tensors()
        if set(params) != set(ck["lora"]):
            raise ValueError(f"checkpoint in {self.work} does not match this model's LoRA layers")
        for k, p in params.items():
            p.copy_(ck["lora"][k])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.lr_scheduler.load_state_dict(ck["lr_scheduler"])
        if self.scaler is not None and "scaler" in ck:
            self.scaler.load_state_dict(ck["scaler"])
        set_rng_state(ck["rng"])
        self.losses = [float(v) for v in ck["losses"].tolist()]
        self.step = self.resumed_from = int(ck["step"])

    # ---- the loss --------------------------------------------------------------------------
    def latents(
        self,
        examples: list[Example],
        idx: list[int],
        cache: LatentCache | None,
        gen: torch.Generator,
        augments: Sequence[Augment] | None = None,
    ) -> torch.Tensor:
        """Scaled latents of a batch (augmented): from the cache, or encoded now with the step's generator."""
        augments = augments or [NO_AUGMENT] * len(idx)
        if cache is not None:  # (only flips: the spec refuses colour and crop augmentation with a cache)
            return cache.get(idx, [a.flip for a in augments]).to(self.device)
        pixels = torch.stack(
            [load_pixels(examples[i], augment=a) for i, a in zip(idx, augments, strict=True)]
        )
        with torch.no_grad():
            return encode_pixels(self.pipe.vae, pixels, gen).float()

    def time_ids(self, batch: list[Example], dtype: torch.dtype) -> torch.Tensor:
        """SDXL's micro-conditioning (original size, crop corner, target size) per picture."""
        proj = self.pipe.text_encoder_2.config.projection_dim
        rows = [
            self.pipe._get_add_time_ids(e.original_size, e.crop_top_left, e.bucket, dtype, proj)
            for e in batch
        ]
        return torch.cat(rows).to(self.device)

    def diffusion_loss(
        self,
        examples: list[Example],
        idx: list[int],
        cache: LatentCache | None,
        rng: np.random.Generator,
        gen: torch.Generator,
        dropout: float,
        distil: bool = False,
        micro: int = 0,
        prior: bool = False,
    ) -> torch.Tensor:
        """The training loss of one batch of one bucket: random noise, timesteps, augmentation, caption
        dropout, then (instance pictures only) tag shuffling and dropout, in sd-scripts' order."""
        s = self.spec
        stream = CLASS_IMAGE_STREAM if prior else IMAGE_STREAM
        augments = [draw_augment(s, augment_rng(s.seed, micro, stream, k)) for k in range(len(idx))]
        batch = [
            replace(e, crop_top_left=augmented_corner(e, a))
            for e, a in zip([examples[i] for i in idx], augments, strict=True)
        ]
        x0 = self.latents(examples, idx, cache, gen, augments)
        noise = torch.randn(x0.shape, generator=gen)
        if self.spec.noise_offset:  # Guttenberg 2023, "Diffusion with offset noise"
            noise += self.spec.noise_offset * torch.randn((*x0.shape[:2], 1, 1), generator=gen)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        captions = ["" if rng.random() < dropout else e.caption for e in batch]
        if s.varies_captions and not prior:  # class prompts are used as written
            rngs = [augment_rng(s.seed, micro, CAPTION_STREAM, k) for k in range(len(batch))]
            captions = [c and step_caption(e, s, r) for c, e, r in zip(captions, batch, rngs, strict=True)]
        return self.denoise_loss(x0, noise.to(self.device), t.to(self.device), captions, batch, distil)

    def denoise_loss(
        self,
        x0: torch.Tensor,
        noise: torch.Tensor,
        t: torch.Tensor,
        captions: list[str],
        batch: list[Example],
        distil: bool = False,
    ) -> torch.Tensor:
        """Mean (min-SNR weighted) MSE between the UNet's prediction and its target (``distil``: the
        untouched model's prediction instead of the scheduler's target)."""
        noisy = self.noise_scheduler.add_noise(x0, noise, t).to(self.pipe.unet.dtype)
        pred = self.predict(noisy, t, captions, batch)
        if distil:
            with torch.no_grad(), adapters_disabled(self.components.values()):
                target = self.predict(noisy, t, captions, batch)
        else:
            target = self.target(x0, noise, t)
        per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=tuple(range(1, pred.dim())))
        if self.spec.min_snr_gamma is not None:
            per_sample = per_sample * minimum_snr_weights(self.noise_scheduler, t, self.spec.min_snr_gamma)
        return per_sample.mean()

    def predict(
        self, noisy: torch.Tensor, t: torch.Tensor, captions: list[str], batch: list[Example]
    ) -> torch.Tensor:
        """The UNet's prediction (float32) for noisy latents under these captions."""
        emb, pooled = self.text(captions)  # type: ignore[misc]
        unet = self.pipe.unet
        extra = {}
        if pooled is not None:
            extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": self.time_ids(batch, emb.dtype)}
        return unet(noisy, t, emb.to(unet.dtype), **extra).sample.float()

    @torch.no_grad()
    def probe_loss(self, timesteps: Sequence[int] = (100, 300, 500, 700, 900), seed: int = 12345) -> float:
        """Mean loss over every picture at fixed timesteps and fixed noise: a deterministic progress probe."""
        gen = torch.Generator().manual_seed(seed)
        total = 0.0
        t, n = torch.tensor(list(timesteps), device=self.device), len(timesteps)
        for i, ex in enumerate(self.examples):
            x0 = self.latents(self.examples, [i], self.cache, gen).repeat(n, 1, 1, 1)
            noise = torch.randn(x0.shape, generator=gen).to(self.device)
            total += float(self.denoise_loss(x0, noise, t, [ex.caption] * n, [ex] * n))
        return total / len(self.examples)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet should predict under the model's own prediction type."""
        kind = self.noise_scheduler.config.prediction_type
        if kind == "epsilon":
            return noise.float()
        if kind == "v_prediction":
            return self.noise_scheduler.get_velocity(x0, noise, t).float()
        if kind == "sample":
            return x0.float()
        raise ValueError(f"unsupported prediction_type {kind!r}")

    def micro_loss(self, micro: int) -> torch.Tensor:
        """Loss of micro-batch ``micro``: instance pictures, plus the prior term when enabled."""
        s = self.spec
        rng = np.random.default_rng([s.seed, micro])
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        idx = self.plan.batch(micro)
        loss = self.diffusion_loss(self.examples, idx, self.cache, rng, gen, s.caption_dropout, micro=micro)
        if self.class_examples:
            idx = self.class_plan.batch(micro)
            drop = s.prior_caption_dropout
            distil = s.prior_target == "base"
            prior = self.diffusion_loss(
                self.class_examples, idx, self.class_cache, rng, gen, drop, distil, micro, prior=True
            )
            loss = loss + s.prior_loss_weight * prior
        return loss

    # ---- the loop --------------------------------------------------------------------------
    def train_step(self) -> float:
        """One optimiser step over ``grad_accum`` micro-batches; returns the mean loss."""
        s, total = self.spec, 0.0
        autocast = torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None else nullcontext()
        for k in range(s.grad_accum):
            with autocast:
                loss = self.micro_loss(self.step * s.grad_accum + k) / s.grad_accum
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            total += float(loss.detach())
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.trainable(), s.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def run(self) -> None:
        """Train from the current step to the total; checkpoints, samples and progress on the way."""
        s, t0, first = self.spec, time.monotonic(), self.step
        log = self.work / "loss.jsonl"
        log.write_text(
            "".join(json.dumps({"step": i + 1, "loss": v}) + "\n" for i, v in enumerate(self.losses))
        )
        with log.open("a") as fh:
            while self.step < self.total:
                if self.cancel is not None and self.cancel.is_set():
                    self.checkpoint()
                    raise TrainingCancelled(self.step)
                loss = self.train_step()
                self.losses.append(loss)
                self.step += 1
                fh.write(json.dumps({"step": self.step, "loss": loss}) + "\n")
                fh.flush()
                eta = (time.monotonic() - t0) / (self.step - first) * (self.total - self.step)
                self.report("training", loss, eta)
                if self.step % s.checkpoint_every == 0 or self.step == self.total:
                    self.checkpoint()
                if s.sample_every and self.step % s.sample_every == 0 and self.step < self.total:
                    self.sample()

    def sample_prompts(self) -> list[str]:
        """The spec's sample prompts, else the first caption and the caption template."""
        if self.spec.sample_prompts:
            return [self.spec.fill(p) for p in self.spec.sample_prompts]
        return list(dict.fromkeys([self.examples[0].caption, self.spec.fill(self.spec.caption_template)]))

    def sample(self) -> list[Path]:
        """Fixed-prompt, fixed-seed pictures at the current step."""
        self.report("sampling")
        res = self.geometry.resolution // self.geometry.divisibility * self.geometry.divisibility
        s = self.spec
        paths = render_samples(
            self.pipe,
            self.sample_prompts(),
            s.sample_seeds,
            (res, res),
            self.work / "samples",
            self.step,
            s.sample_steps,
            s.sample_guidance,
        )
        self.samples += paths
        self.sample_texts += [p for p in self.sample_prompts() for _ in s.sample_seeds]  # render order
        self.report("sampling")
        return paths

    # ---- the result ------------------------------------------------------------------------
    def run_info(self, model_name: str, started: float) -> RunInfo:
        """The facts of this run that go into the file's metadata."""
        return RunInfo(
            family=self.family,
            model_name=model_name,
            resolution=(self.geometry.resolution,) * 2,
            prediction_type=self.noise_scheduler.config.prediction_type,
            num_images=sum(e.repeats for e in self.examples),
            dataset_dirs=dataset_dirs(self.examples),
            caption_dirs=tuple(e.dataset for e in self.examples),
            num_class_images=len(self.class_examples),
            batches_per_epoch=self.plan.per_epoch,
            steps=self.total,
            started_at=started,
            finished_at=time.time(),
            final_loss=self.losses[-1] if self.losses else float("nan"),
            captions=tuple(e.caption for e in self.examples),
            basis=self.basis if self.spec.orthogonal else None,
            mixed_precision={None: "no", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.amp],
        )

    def finish(self, out: Path, model_name: str, started: float) -> TrainResult:
        """Final samples, metadata, the kohya + diffusers files, the loss curve, ``result.json``."""
        final = self.sample()
        self.report("saving")
        info = self.run_info(model_name, started)
        meta = training_metadata(self.spec, info, final[0] if final else None)
        weights = replace(peft_to_lora_weights(self.components, self.family, meta, ADAPTER), metadata=meta)
        kohya, diffusers_dir = write_adapter(weights, out)
        curve = write_loss_curve(self.losses, self.work / "loss.png", f"{self.spec.output_name}: loss")
        result = TrainResult(
            kohya,
            diffusers_dir,
            self.work,
            self.family,
            self.total,
            tuple(self.losses),
            info.captions,
            tuple(self.samples),
            tuple(self.sample_texts),
            curve,
            meta,
            self.resumed_from,
        )
        (self.work / "result.json").write_text(
            json.dumps(
                {
                    "kohya_path": str(kohya),
                    "diffusers_path": str(diffusers_dir),
                    "steps": self.total,
                    "final_loss": info.final_loss,
                    "samples": [str(p) for p in self.samples],
                },
                indent=1,
            )
        )
        self.report("done")
        return result

    def detach(self) -> None:
        """Take the LoRA layers out of the pipeline again (the caller's pipeline is left as it was)."""
        for name in ("unet", "text_encoder", "text_encoder_2"):
            if (part := getattr(self.pipe, name, None)) is not None:
                remove_lora(part, ADAPTER)
                part.eval()


def dataset_dirs(examples: Sequence[Example]) -> tuple[tuple[str, int, int], ...]:
    """(folder, repeats, picture count) per dataset folder, kohya's ``ss_dataset_dirs``."""
    counts: dict[tuple[str, int], int] = {}
    for e in examples:
        counts[(e.dataset, e.repeats)] = counts.get((e.dataset, e.repeats), 0) + 1
    return tuple((name, repeats, n) for (name, repeats), n in counts.items())


def claim_work_dir(work: Path, spec: TrainSpec, examples: list[Example]) -> None:
    """Create the work folder, or check it belongs to this very run (same options, same pictures)."""
    stamp = {"spec": spec.fingerprint(), "data": examples_fingerprint(examples)}
    marker = work / "run.json"
    if marker.exists():
        held = json.loads(marker.read_text())
        if {k: held.get(k) for k in stamp} != stamp:
            raise ValueError(f"{work} belongs to another training run (other options or pictures)")
        return
    work.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({**stamp, "spec_json": json.loads(spec.to_json())}, indent=1))


def default_work_dir(out: Path) -> Path:
    """Where a run keeps checkpoints and samples when the caller names no folder."""
    return out.with_name(f".{out.stem}.train")


def train_lora(
    spec: TrainSpec,
    model: str | Path | DiffusionPipeline,
    images: str | Path | Sequence[ImageItem],
    out: str | Path,
    *,
    work_dir: str | Path | None = None,
    device: str | torch.device = "auto",
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    basis: BasisSlot | Callable[[str], BasisSlot] | None = None,
    limits: ImageLimits = ImageLimits(),
    model_name: str | None = None,
) -> TrainResult:
    """Train a LoRA on pictures (a folder or items) and write ``out`` (kohya) + ``out_diffusers/``.

    Resumes from the newest checkpoint in ``work_dir``; raises ``TrainingCancelled`` (after a
    checkpoint) when ``cancel`` is set. A pipeline object is trained in place and restored after.
    ``basis`` (orthogonal training): a slot, or a function of the detected base family giving one.
    """
    started, out = time.time(), Path(out)
    owned = not isinstance(model, DiffusionPipeline)
    pipe = load_base_pipeline(model)
    spec = for_family(spec, detect_family(pipe))
    dev = resolve_device(device)
    weight_dtype, amp = resolve_precision(spec, dev)
    if owned:
        place_pipeline(pipe, dev, weight_dtype)
    geometry = Geometry.of(pipe, spec)
    items = items_from_folder(images) if isinstance(images, (str, Path)) else list(images)
    examples = prepare_examples(items, spec, list(geometry.buckets), limits)
    work = Path(work_dir) if work_dir is not None else default_work_dir(out)
    claim_work_dir(work, spec, examples)
    slot = basis(detect_family(pipe)) if callable(basis) and spec.orthogonal else basis
    trainer = LoraTrainer(spec, pipe, examples, work, dev, amp, slot, progress, cancel)  # type: ignore[arg-type]
    name = model_name or (str(model) if owned else type(pipe).__name__)
    try:
        trainer.prepare()
        trainer.run()
        return trainer.finish(out, name, started)
    finally:
        trainer.detach()
