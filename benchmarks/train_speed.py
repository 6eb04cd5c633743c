"""Training speed and memory: LoRA against full fine-tuning of the same UNet, latent caching on and off.

    python benchmarks/train_speed.py                         # pocket + SD-1.5-shaped UNet, CPU
    python benchmarks/train_speed.py --models pocket --steps 5
    python benchmarks/train_speed.py --device cuda --sd-resolution 512

Every measurement runs in its own subprocess (so peak memory is that run's alone) with the studio's
real trainer (``LoraTrainer``); full fine-tuning is the same trainer with every UNet weight trainable
and AdamW over all of them, at the same batch, resolution, data and loss. Models have random weights
(speed and memory do not depend on them): the pocket architecture and SD-1.5's UNet / VAE / CLIP-L
shapes. Reported: seconds per step (median after a warm-up step; CPU time with one thread on the
CPU, synchronised wall time on CUDA), the extra memory training needs beyond the loaded model
(peak RSS on the CPU, peak allocated on CUDA, over the warm-up step and the timed steps, above
what the loaded model and caches hold: activations, gradients and optimizer states), and the ratios
LoRA/full and cached/encoded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_pipeline(model: str):  # -> StableDiffusionPipeline
    """A random-weight pipeline: the pocket architecture, or SD 1.5's shapes."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipelines.pocket import model as pocket
    from pipelines.tokenizer import clip_tokenizer

    torch.manual_seed(0)
    if model == "pocket":
        cfg = pocket.PocketConfig()
        unet, vae, te = pocket.build_unet(cfg), pocket.build_vae(cfg), pocket.build_text_encoder(cfg)
    else:
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        )
        te = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
                eos_token_id=49407,
                bos_token_id=49406,
                pad_token_id=49407,
                projection_dim=768,
            )
        )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=pocket.build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_pictures(folder: Path, n: int, size: int) -> Path:
    """``n`` pocket-world pictures scaled to ``size`` px, captioned."""
    import numpy as np
    from PIL import Image

    from pipelines.pocket import world

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        scene = world.sample_scene(rng, objects=("star",))
        world.render(scene).resize((size, size), Image.Resampling.BICUBIC).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(scene.caption().replace("star", "zq"))
    return folder


def _rss_kib(field: str) -> int:
    """VmRSS / VmHWM of this process in KiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``, Linux ≥ 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(job: dict) -> dict:
    """One measurement: build, prepare, warm up, time ``steps`` steps, report time and memory."""
    import torch

    torch.set_num_threads(1)
    from pipelines.training import TrainSpec
    from pipelines.training.data import items_from_folder, prepare_examples
    from pipelines.training.lora_train import Geometry, LoraTrainer

    class FullFineTune(LoraTrainer):
        """The same trainer with the whole UNet trainable (AdamW over every weight)."""

        def inject(self) -> None:
            for name in ("vae", "text_encoder"):
                getattr(self.pipe, name).requires_grad_(False)
            self.pipe.unet.requires_grad_(True).train()
            self.components = {"unet": self.pipe.unet}

        def build_optimizer(self) -> None:
            self.optimizer = torch.optim.AdamW(self.pipe.unet.parameters(), lr=self.spec.learning_rate)
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)

        def resume(self) -> None:
            return None

    device = torch.device(job["device"])
    pipe = build_pipeline(job["model"]).to(device)
    spec = TrainSpec(
        trigger="zq",
        rank=job["rank"],
        steps=job["steps"] + 1,
        batch_size=job["batch"],
        resolution=job["resolution"],
        cache_latents=job["cache"],
        sample_every=0,
        checkpoint_every=10_000,
        targets="attn",
        learning_rate=1e-4,
        train_text_encoder=False,
        prior_preservation=False,
    )  # one setting for every model, not each family's defaults
    geometry = Geometry.of(pipe, spec)
    examples = prepare_examples(items_from_folder(job["images"]), spec, list(geometry.buckets))
    cls = FullFineTune if job["mode"] == "full" else LoraTrainer
    with tempfile.TemporaryDirectory() as work:
        trainer = cls(spec, pipe, examples, Path(work), device, None)
        trainer.prepare()
        if device.type == "cuda":  # baseline: the loaded model (+ caches), before any gradient or state
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base, reset = _rss_kib("VmRSS") * 1024, _reset_peak()
        trainer.train_step()  # warm-up: allocates gradients and optimizer states (counted in the peak)
        trainer.step += 1
        times = []
        for _ in range(job["steps"]):
            t0 = time.perf_counter() if device.type == "cuda" else time.process_time()
            trainer.train_step()
            trainer.step += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            else:
                times.append(time.process_time() - t0)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _rss_kib("VmHWM") * 1024
            if not reset:
                print("warning: peak RSS could not be reset; memory includes set-up", file=sys.stderr)
    trainable = sum(p.numel() for p in trainer.trainable())
    return {
        **job,
        "sec_per_step": statistics.median(times),
        "times": times,
        "peak_bytes": peak,
        "base_bytes": base,
        "train_bytes": peak - base,
        "trainable": trainable,
    }


def run_worker(job: dict) -> dict:
    """Run one measurement in a fresh interpreter; returns its JSON result."""
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(job)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
    if proc.returncode != 0:
        why = "killed by SIGKILL (out of memory?)" if proc.returncode == -9 else f"exit {proc.returncode}"
        print(f"  worker {job['model']}/{job['mode']} failed: {why}\n{proc.stderr[-2000:]}", file=sys.stderr)
        return {**job, "failed": why}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(model: str, rows: dict[tuple[str, bool], dict]) -> None:
    """Print one model's table and its ratios."""
    gib = 2**30
    print(
        f"\n== {model}: batch {rows['lora', True]['batch']}, {rows['lora', True]['resolution']} px, "
        f"LoRA rank {rows['lora', True]['rank']} =="
    )
    print(f"{'mode':<6}{'latents':<10}{'s/step':>10}{'model GiB':>11}{'+train GiB':>12}{'trainable':>14}")
    for (mode, cache), r in rows.items():
        if "failed" in r:
            print(f"{mode:<6}{'cached' if cache else 'encoded':<10}  failed: {r['failed']}")
            continue
        print(
            f"{mode:<6}{'cached' if cache else 'encoded':<10}{r['sec_per_step']:>10.3f}"
            f"{r['base_bytes'] / gib:>11.3f}{r['train_bytes'] / gib:>12.3f}{r['trainable']:>14,}"
        )
    ok = {k: r for k, r in rows.items() if "failed" not in r}
    for cache in (True, False):
        if ("lora", cache) not in ok or ("full", cache) not in ok:
            continue
        lo, fu = rows["lora", cache], rows["full", cache]
        label = "cached" if cache else "encoded"
        print(
            f"LoRA/full ({label} latents): time {lo['sec_per_step'] / fu['sec_per_step']:.2f}×, "
            f"training memory {lo['train_bytes'] / fu['train_bytes']:.2f}×"
        )
    for mode in ("lora", "full"):
        if (mode, True) not in ok or (mode, False) not in ok:
            continue
        on, off = rows[mode, True], rows[mode, False]
        print(
            f"{mode}: cached/encoded latents: time {on['sec_per_step'] / off['sec_per_step']:.2f}×, "
            f"training memory {on['train_bytes'] / off['train_bytes']:.2f}×"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="pocket,sd15")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per measurement (after 1 warm-up)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--pocket-resolution", type=int, default=64)
    ap.add_argument("--sd-resolution", type=int, default=256, help="512 is SD-1.5's native size")
    ap.add_argument("--only", help="run one cell, e.g. full:encoded (for a machine short of memory)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            res = args.pocket_resolution if model == "pocket" else args.sd_resolution
            images = make_pictures(Path(tmp) / model, 4, res)
            rows = {}
            for mode in ("lora", "full"):
                for cache in (True, False):
                    if args.only and args.only != f"{mode}:{'cached' if cache else 'encoded'}":
                        continue
                    job = {
                        "model": model,
                        "mode": mode,
                        "cache": cache,
                        "device": args.device,
                        "steps": args.steps,
                        "batch": args.batch,
                        "rank": args.rank,
                        "resolution": res,
                        "images": str(images),
                    }
                    r = rows[mode, cache] = run_worker(job)
                    if "failed" not in r:
                        label = "cached" if cache else "encoded"
                        print(
                            f"  {model} {mode} {label}: {r['sec_per_step']:.3f} s/step, "
                            f"+{r['train_bytes'] / 2**30:.3f} GiB",
                            flush=True,
                        )
            report(model, rows)


if __name__ == "__main__":
    main()
