"""Deterministic, resumable training of the pocket model, stage by stage.

Stages (each writes into one run folder and resumes from its last checkpoint):
``classifier`` → ``vae`` → ``latents`` → ``unet`` (UNet and text encoder together) → ``export``.
Every batch is a pure function of (seed, step), so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipelines.pocket import world
from pipelines.pocket.model import (
    PocketConfig,
    build_scheduler,
    build_text_encoder,
    build_unet,
    build_vae,
)


@dataclass(frozen=True)
class VaeTrainConfig:
    """VAE stage: reconstruction (MSE + L1) with a small KL term."""

    steps: int = 1800
    batch_size: int = 32
    lr: float = 1e-3
    kl_weight: float = 1e-6
    seed: int = 7
    checkpoint_every: int = 100


@dataclass(frozen=True)
class UnetTrainConfig:
    """UNet + text-encoder stage: epsilon prediction with min-SNR weighting and EMA."""

    steps: int = 5000  # length of the LR schedule
    stop_at: int = 4000  # the bundled weights: EMA after this many steps of that schedule
    batch_size: int = 64
    lr: float = 6e-4
    text_lr: float = 3e-4
    warmup: int = 200
    min_lr_ratio: float = 0.15
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0
    empty_caption_rate: float = 0.1
    size_word_rate: float = 0.75
    dataset_size: int = 48000
    seed: int = 11
    checkpoint_every: int = 100


@dataclass(frozen=True)
class PocketTrainConfig:
    """All stages of one pocket training run."""

    model: PocketConfig = field(default_factory=PocketConfig)
    vae: VaeTrainConfig = field(default_factory=VaeTrainConfig)
    unet: UnetTrainConfig = field(default_factory=UnetTrainConfig)


def _save_ckpt(path: Path, state: dict) -> None:
    """Write a checkpoint atomically (temp file + rename)."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _load_ckpt(path: Path) -> dict | None:
    """Read a checkpoint written by ``_save_ckpt`` (tensors and plain data only)."""
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def _run_loop(
    total: int,
    start: int,
    step_fn: Callable[[int], float],
    save_fn: Callable[[int], None],
    every: int,
    desc: str,
    log: Path,
) -> None:
    """Run ``step_fn`` from ``start`` to ``total``, saving every ``every`` steps and at the end."""
    bar = tqdm(range(start, total), desc=desc, initial=start, total=total)
    with log.open("a") as fh:
        for step in bar:
            loss = step_fn(step)
            bar.set_postfix(loss=f"{loss:.4f}")
            fh.write(json.dumps({"step": step, "loss": loss}) + "\n")
            if (step + 1) % every == 0 or step + 1 == total:
                fh.flush()
                save_fn(step + 1)


def _vae_batch(seed: int, step: int, n: int) -> torch.Tensor:
    """Pictures of every concept for one VAE step, in [-1, 1]."""
    from pipelines.pocket.classifier import to_tensor

    rng = np.random.default_rng([seed, step])
    images, _ = world.batch(rng, n, objects=world.OBJECTS, styles=world.STYLES, palettes=world.PALETTES)
    return to_tensor(images)


def train_vae(cfg: PocketTrainConfig, run: Path) -> None:
    """Stage ``vae``: train the autoencoder (resumes from ``run/vae.ckpt``)."""
    c = cfg.vae
    torch.manual_seed(c.seed)
    vae = build_vae(cfg.model)
    opt = torch.optim.AdamW(vae.parameters(), lr=c.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=c.lr, total_steps=c.steps, pct_start=0.05)
    ckpt_path = run / "vae.ckpt"
    start = 0
    if (ck := _load_ckpt(ckpt_path)) is not None:
        vae.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        start = int(ck["step"])
    vae.train()

    def step_fn(step: int) -> float:
        x = _vae_batch(c.seed, step, c.batch_size)
        gen = torch.Generator().manual_seed(c.seed * 1_000_003 + step)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + c.kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        return loss.item()

    def save_fn(step: int) -> None:
        _save_ckpt(
            ckpt_path,
            {"model": vae.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step},
        )

    _run_loop(c.steps, start, step_fn, save_fn, c.checkpoint_every, "vae", run / "vae.log")


def load_trained_vae(cfg: PocketTrainConfig, run: Path):  # -> AutoencoderKL
    """The VAE of a finished ``vae`` stage, in eval mode."""
    ck = _load_ckpt(run / "vae.ckpt")
    if ck is None or int(ck["step"]) < cfg.vae.steps:
        raise RuntimeError("the vae stage has not finished")
    vae = build_vae(cfg.model)
    vae.load_state_dict(ck["model"])
    return vae.eval()


@torch.no_grad()
def center_latents(vae, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Fold the per-channel latent mean into quant_conv/post_quant_conv; return (mean, std).

    The VAE's decoded pictures are unchanged (z' = z − μ, post_quant_conv bias += W·μ); the
    centred latents then have std s and SD's ``scaling_factor`` is 1/s.
    """
    mean = vae.encode(x).latent_dist.mean
    mu = mean.mean(dim=(0, 2, 3))
    c = mu.numel()
    vae.quant_conv.bias[:c] -= mu
    w = vae.post_quant_conv.weight[:, :, 0, 0]
    vae.post_quant_conv.bias += w @ mu
    std = float((mean - mu[None, :, None, None]).std())
    return mu, std


def encode_dataset(cfg: PocketTrainConfig, run: Path) -> None:
    """Stage ``latents``: render the base-concept data set, encode it once, cache captions."""
    out = run / "latents.pt"
    if out.exists():
        return
    vae = load_trained_vae(cfg, run)
    from pipelines.pocket.classifier import to_tensor

    c = cfg.unet
    rng = np.random.default_rng(c.seed)
    probe, _ = world.batch(
        np.random.default_rng(c.seed + 1),
        512,
        objects=world.OBJECTS,
        styles=world.STYLES,
        palettes=world.PALETTES,
    )
    _, std = center_latents(vae, to_tensor(probe))
    latents, scenes = [], []
    for _ in tqdm(range(c.dataset_size // 256), desc="encode"):
        images, sc = world.batch(rng, 256)
        with torch.no_grad():
            latents.append(vae.encode(to_tensor(images)).latent_dist.mean.half())
        scenes += [asdict(s) for s in sc]
    torch.save(
        {"latents": torch.cat(latents), "scaling_factor": 1.0 / std, "vae": vae.state_dict()},
        out.with_suffix(".tmp"),
    )
    (run / "scenes.json").write_text(json.dumps(scenes))
    out.with_suffix(".tmp").replace(out)


def _lr_lambda(c: UnetTrainConfig) -> Callable[[int], float]:
    """Linear warm-up then cosine decay to ``min_lr_ratio``."""

    def f(step: int) -> float:
        if step < c.warmup:
            return (step + 1) / c.warmup
        p = (step - c.warmup) / max(1, c.steps - c.warmup)
        return c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))

    return f


def _captions(scenes: list[dict], rng: np.random.Generator, c: UnetTrainConfig) -> list[str]:
    """Captions for a batch, with the size word sometimes and the whole caption sometimes left out."""
    out = []
    for s in scenes:
        if rng.random() < c.empty_caption_rate:
            out.append("")
        else:
            out.append(
                world.Scene(**{**s, "jitter": tuple(s["jitter"])}).caption(rng.random() < c.size_word_rate)
            )
    return out


def train_unet(cfg: PocketTrainConfig, run: Path) -> None:
    """Stage ``unet``: train UNet and text encoder jointly on cached latents (resumable)."""
    from pipelines.tokenizer import clip_tokenizer

    c = cfg.unet
    data = torch.load(run / "latents.pt", map_location="cpu", weights_only=True)
    latents, scale = data["latents"], float(data["scaling_factor"])
    scenes = json.loads((run / "scenes.json").read_text())
    tok = clip_tokenizer()
    torch.manual_seed(c.seed)
    unet, te = build_unet(cfg.model), build_text_encoder(cfg.model)
    sched = build_scheduler()
    alphas = sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    params = [
        {"params": unet.parameters(), "lr": c.lr, "weight_decay": 0.01},
        {"params": te.parameters(), "lr": c.text_lr, "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(params)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(c))
    ema = {f"unet.{k}": v.detach().clone() for k, v in unet.state_dict().items()}
    ema |= {f"te.{k}": v.detach().clone() for k, v in te.state_dict().items()}
    ckpt_path = run / "unet.ckpt"
    start = 0
    if (ck := _load_ckpt(ckpt_path)) is not None:
        unet.load_state_dict(ck["unet"])
        te.load_state_dict(ck["te"])
        opt.load_state_dict(ck["opt"])
        lr_sched.load_state_dict(ck["sched"])
        ema = ck["ema"]
        start = int(ck["step"])
    unet.train()
    te.train()
    live = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    live |= {f"te.{k}": v for k, v in te.state_dict().items()}

    def step_fn(step: int) -> float:
        rng = np.random.default_rng([c.seed, step])
        gen = torch.Generator().manual_seed(c.seed * 1_000_003 + step)
        idx = rng.integers(0, len(latents), c.batch_size)
        x0 = latents[torch.from_numpy(idx)].float() * scale
        caps = _captions([scenes[i] for i in idx], rng, c)
        ids = tok(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        t = torch.randint(0, 1000, (c.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        xt = sched.add_noise(x0, noise, t)
        pred = unet(xt, t, te(ids)[0]).sample
        w = torch.clamp(snr[t], max=c.min_snr_gamma) / snr[t]
        loss = (w * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(te.parameters()), 1.0)
        opt.step()
        lr_sched.step()
        d = min(c.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in live.items():
                if v.dtype.is_floating_point:
                    ema[k].lerp_(v, 1 - d)
                else:
                    ema[k].copy_(v)
        return loss.item()

    def save_fn(step: int) -> None:
        _save_ckpt(
            ckpt_path,
            {
                "unet": unet.state_dict(),
                "te": te.state_dict(),
                "opt": opt.state_dict(),
                "sched": lr_sched.state_dict(),
                "ema": ema,
                "step": step,
            },
        )

    _run_loop(min(c.steps, c.stop_at), start, step_fn, save_fn, c.checkpoint_every, "unet", run / "unet.log")


def assemble_pipeline(cfg: PocketTrainConfig, run: Path, use_ema: bool = True):  # -> StableDiffusionPipeline
    """A StableDiffusionPipeline from the latest checkpoints of a run."""
    from pipelines.sd_parts import sd_pipeline
    from pipelines.tokenizer import clip_tokenizer

    data = torch.load(run / "latents.pt", map_location="cpu", weights_only=True)
    ck = _load_ckpt(run / "unet.ckpt")
    if ck is None:
        raise RuntimeError("the unet stage has not started")
    vae = build_vae(cfg.model)
    vae.load_state_dict(data["vae"])
    vae.register_to_config(scaling_factor=float(data["scaling_factor"]))
    unet, te = build_unet(cfg.model), build_text_encoder(cfg.model)
    if use_ema:
        unet.load_state_dict({k[5:]: v for k, v in ck["ema"].items() if k.startswith("unet.")})
        te.load_state_dict({k[3:]: v for k, v in ck["ema"].items() if k.startswith("te.")})
    else:
        unet.load_state_dict(ck["unet"])
        te.load_state_dict(ck["te"])
    return sd_pipeline(vae.eval(), te.eval(), unet.eval(), clip_tokenizer())


def export(cfg: PocketTrainConfig, run: Path, out: Path, classifier_src: Path, classifier_dst: Path) -> None:
    """Write the pipeline (EMA weights) as a diffusers folder of safetensors, plus the judge."""
    import shutil

    pipe = assemble_pipeline(cfg, run)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    shutil.copyfile(classifier_src, tmp / classifier_dst.name)
    if out.exists():
        for keep in ("loras", "previews", "catalog"):  # concept LoRAs and catalog live beside the model
            if (out / keep).exists():
                shutil.move(str(out / keep), str(tmp / keep))
        shutil.rmtree(out)
    tmp.replace(out)
