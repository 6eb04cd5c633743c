"""Per-step cost of multi-LoRA fusion on an SD-1.5-shaped UNet, as ratios to the bare UNet.

Methods (all measured in the same run, same inputs): ``base`` (no LoRA), ``peft_unfused``
(diffusers/PEFT ``set_adapters``), ``peft_fused`` (diffusers ``fuse_lora``), ``ours_static``
(the engine with a static policy: fused once), ``ours_per_step`` (the engine with gates that
change at every step: a keyframe schedule), ``ours_gate`` (the learned ``gate`` policy: a
randomly initialised GateNetwork with timestep and prompt inputs over the same adapters, on the
unfused path, since its gates depend on the activations), plus ``switch_ms``: detaching a 4-adapter mix and
attaching another (adapters already in the cache). Random weights: speed does not depend on them.

    python benchmarks/fusion_speed.py            # full SD-1.5 shapes, latent 32 (64 on a GPU)
    python benchmarks/fusion_speed.py --quick    # SD-1.5 layout at widths 128/256/512, minutes on a CPU
    python benchmarks/fusion_speed.py --json
    python benchmarks/fusion_speed.py --quick --adapters 2 --ranks 16 --repeats 1 --latent 16   # smoke

``--json`` prints ``{"rows": [{"method", "adapters", "rank", "ms_per_step", "ratio_vs_base"}, …],
"switch_ms", "switch_first_step_extra_ms", "device", "latent", "unet"}`` with methods ``base``,
``ours_static``, ``ours_per_step``, ``ours_gate``, ``peft_unfused``, ``peft_fused``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import UNet2DConditionModel
from peft import LoraConfig

from pipelines.blocks import UnetLayout
from pipelines.engine import attach
from pipelines.fusion import AdapterInfo, make_policy
from pipelines.fusion.gate import Gate
from pipelines.gate.network import GateConfig, GateNetwork
from pipelines.lora_weights import LoraLayer, LoraWeights
from pipelines.path_plan import PathPlanner

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


def sd15_unet(quick: bool) -> UNet2DConditionModel:
    """SD-1.5's UNet layout (random init); ``quick`` narrows the channels."""
    channels = (128, 256, 512, 512) if quick else (320, 640, 1280, 1280)
    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=channels,
        cross_attention_dim=768,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )


class _Pipe:
    """The engine attaches to pipeline-like objects: a UNet alone is enough here."""

    def __init__(self, unet: UNet2DConditionModel) -> None:
        self.unet = unet


def target_modules(unet: UNet2DConditionModel) -> dict[str, torch.nn.Module]:
    """The Linear/Conv modules kohya's SD-1.5 LoRAs train (attention, projections, feed-forward)."""
    return {
        name: mod
        for name, mod in unet.named_modules()
        if isinstance(mod, torch.nn.Linear | torch.nn.Conv2d)
        and any(name == t or name.endswith("." + t) for t in TARGETS)
    }


def random_lora(modules: dict[str, torch.nn.Module], rank: int, seed: int, dtype: torch.dtype) -> LoraWeights:
    """A random LoRA over ``modules`` (std chosen so that ΔW is small next to W)."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, mod in modules.items():
        w = mod.weight
        fan_in = w[0].numel()
        down = torch.randn(rank, fan_in, generator=g) / fan_in**0.5
        up = torch.randn(w.shape[0], rank, generator=g) * 0.01
        if w.dim() == 4:
            down, up = down.view(rank, *w.shape[1:]), up[:, :, None, None]
        layers[f"unet.{name}"] = LoraLayer(down.to(dtype), up.to(dtype), alpha=float(rank))
    return LoraWeights(layers, family=None)


def random_gate(modules: dict[str, torch.nn.Module], device: torch.device, seed: int) -> GateNetwork:
    """A GateNetwork over ``modules`` (timestep + prompt inputs) with random parameters, float32 as the
    engine runs a loaded checkpoint: speed does not depend on the values."""
    torch.manual_seed(seed)
    net = GateNetwork(
        {f"unet.{n}": int(m.weight.shape[0]) for n, m in modules.items()}, GateConfig(prompt_dim=768)
    )
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return net.to(device)


def timer(device: torch.device) -> Callable[[Callable[[], None]], float]:
    """Seconds of one call: CPU process time (1 thread), or CUDA events on a GPU."""

    def run(fn: Callable[[], None]) -> float:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000.0
        t0 = time.process_time()
        fn()
        return time.process_time() - t0

    return run


def median_step(fn: Callable[[int], None], steps: int, repeats: int, clock: Callable) -> float:
    """Median seconds per step over ``repeats`` runs of ``steps`` steps (one warm-up run first)."""
    for i in range(steps):
        fn(i)
    times = []
    for _ in range(repeats):
        times.append(clock(lambda: [fn(i) for i in range(steps)]) / steps)
    return statistics.median(times)


def peft_setup(unet: UNet2DConditionModel, loras: list[LoraWeights], rank: int) -> list[str]:
    """The same adapters loaded through diffusers/PEFT (``add_adapter`` + copied factors)."""
    names = []
    for i, lora in enumerate(loras):
        name = f"a{i}"
        cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights=False)
        unet.add_adapter(cfg, adapter_name=name)
        for mod_name, mod in unet.named_modules():
            if hasattr(mod, "lora_A") and name in mod.lora_A and f"unet.{mod_name}" in lora.layers:
                layer = lora.layers[f"unet.{mod_name}"]
                with torch.no_grad():
                    mod.lora_A[name].weight.copy_(layer.down.view_as(mod.lora_A[name].weight))
                    mod.lora_B[name].weight.copy_(layer.up.view_as(mod.lora_B[name].weight))
        names.append(name)
    return names


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="SD-1.5 layout at reduced widths")
    ap.add_argument("--latent", type=int, default=None, help="latent side (default 32 on CPU, 64 on GPU)")
    ap.add_argument("--adapters", default="1,2,4,8")
    ap.add_argument("--ranks", default="16,64")
    ap.add_argument("--steps", type=int, default=3, help="steps per timed run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(1)
    latent = args.latent or (64 if device.type == "cuda" else 32)
    torch.manual_seed(0)
    clock = timer(device)
    unet = sd15_unet(args.quick).to(device, dtype).eval()
    layout = UnetLayout.from_config(unet.config)
    x = torch.randn(2, 4, latent, latent, device=device, dtype=dtype)
    ehs = torch.randn(2, 77, 768, device=device, dtype=dtype)
    timesteps = torch.linspace(999, 1, 50).long().tolist()
    modules = target_modules(unet)
    rows: list[dict] = []

    def step(i: int) -> None:
        with torch.no_grad():
            unet(x, timesteps[i % 50], ehs)

    base_ms = median_step(step, args.steps, args.repeats, clock) * 1000
    rows.append({"method": "base", "adapters": 0, "rank": 0, "ms_per_step": base_ms, "ratio_vs_base": 1.0})
    pipe = _Pipe(unet)
    for rank in [int(r) for r in args.ranks.split(",")]:
        for n in [int(a) for a in args.adapters.split(",")]:
            loras = [random_lora(modules, rank, 100 * rank + i, dtype) for i in range(n)]
            infos = [AdapterInfo(f"a{i}", 1.0 / n) for i in range(n)]
            move = [
                LoraWeights(
                    {k: LoraLayer(v.down.to(device), v.up.to(device), v.alpha) for k, v in lo.layers.items()},
                    None,
                )
                for lo in loras
            ]
            mix = list(zip(infos, move, strict=True))
            results = {}
            with attach(
                pipe, mix, make_policy("linear"), layout=layout, dtype=dtype, planner=PathPlanner(static=True)
            ):
                results["ours_static"] = median_step(step, args.steps, args.repeats, clock)
            schedule = {"schedule": ["1@0,0.2@1"] * n}
            with attach(
                pipe,
                mix,
                make_policy("schedule", schedule),
                layout=layout,
                dtype=dtype,
                num_steps=args.steps,
                planner=PathPlanner(static=False, mode="measure"),
            ) as m:

                def dyn_step(i: int, m=m) -> None:
                    m.step = i % args.steps
                    m.update(timesteps[i % 50], ehs)
                    step(i)

                results["ours_per_step"] = median_step(dyn_step, args.steps, args.repeats, clock)
            with attach(
                pipe,
                mix,
                Gate(network=random_gate(modules, device, rank + n)),
                layout=layout,
                dtype=dtype,
                num_steps=args.steps,
                planner=PathPlanner(static=False, mode="unfused"),
            ) as m:

                def gate_step(i: int, m=m) -> None:
                    m.step = i % args.steps
                    m.update(timesteps[i % 50], ehs)
                    step(i)

                results["ours_gate"] = median_step(gate_step, args.steps, args.repeats, clock)
            names = peft_setup(unet, loras, rank)
            unet.set_adapters(names, [1.0 / n] * n)
            results["peft_unfused"] = median_step(step, args.steps, args.repeats, clock)
            unet.fuse_lora(adapter_names=names)
            results["peft_fused"] = median_step(step, args.steps, args.repeats, clock)
            unet.unfuse_lora()
            unet.unload_lora()  # back to plain modules for the next configuration
            for method, sec in results.items():
                rows.append(
                    {
                        "method": method,
                        "adapters": n,
                        "rank": rank,
                        "ms_per_step": sec * 1000,
                        "ratio_vs_base": sec * 1000 / base_ms,
                    }
                )
            if not args.json:
                print(
                    f"rank {rank:3d} × {n} adapters: "
                    + ", ".join(f"{k} {v * 1000 / base_ms:.3f}×" for k, v in results.items()),
                    file=sys.stderr,
                )

    switch_ms, first_extra_ms = measure_switch(pipe, modules, layout, dtype, device, step)
    out = {
        "rows": rows,
        "switch_ms": switch_ms,
        "switch_first_step_extra_ms": first_extra_ms,
        "gate_ratios": gate_ratios(rows),
        "device": str(device),
        "latent": latent,
        "unet": "sd15-quick" if args.quick else "sd15",
    }
    if args.json:
        print(json.dumps(out))
    else:
        print_table(out)
    return 0


def measure_switch(
    pipe: _Pipe,
    modules: dict,
    layout: UnetLayout,
    dtype: torch.dtype,
    device: torch.device,
    step: Callable[[int], None],
    repeats: int = 5,
) -> tuple[float, float]:
    """Median wall ms to detach one 4-adapter rank-64 mix and attach another (factors already on the
    device), and the extra ms of the first step after a switch (when the static mix is fused)."""
    mixes = []
    for k in range(2):
        loras = [random_lora(modules, 64, 1000 * k + i, dtype) for i in range(4)]
        loras = [
            LoraWeights(
                {p: LoraLayer(v.down.to(device), v.up.to(device), v.alpha) for p, v in lo.layers.items()},
                None,
            )
            for lo in loras
        ]
        mixes.append([(AdapterInfo(f"m{k}a{i}"), lo) for i, lo in enumerate(loras)])
    switch, first = [], []
    ctx = attach(pipe, mixes[0], make_policy("linear"), layout=layout, dtype=dtype)
    ctx.__enter__()
    step(0)
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        ctx.__exit__(None, None, None)
        ctx = attach(pipe, mixes[(r + 1) % 2], make_policy("linear"), layout=layout, dtype=dtype)
        ctx.__enter__()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        step(0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        step(0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t3 = time.perf_counter()
        if r:
            switch.append((t1 - t0) * 1000)
            first.append(((t2 - t1) - (t3 - t2)) * 1000)
    ctx.__exit__(None, None, None)
    return statistics.median(switch), statistics.median(first)


def gate_ratios(rows: list[dict]) -> list[dict]:
    """Per (rank, adapters): ``ours_gate`` ms/step divided by each reference method's ms/step."""
    ms = {(r["method"], r["rank"], r["adapters"]): r["ms_per_step"] for r in rows}
    out = []
    for (method, rank, n), gate_ms in ms.items():
        if method != "ours_gate":
            continue
        refs = ("peft_unfused", "peft_fused", "ours_static", "ours_per_step")
        out.append(
            {"rank": rank, "adapters": n}
            | {f"vs_{ref}": gate_ms / ms[(ref, rank, n)] for ref in refs if (ref, rank, n) in ms}
        )
    return out


def print_table(out: dict) -> None:
    """The rows as a table of ms/step and ratios to the bare UNet."""
    print(f"UNet {out['unet']} on {out['device']}, latent {out['latent']}, batch 2 (CFG), 1 thread on CPU")
    print(f"{'method':<15}{'adapters':>9}{'rank':>6}{'ms/step':>11}{'× base':>9}")
    for r in out["rows"]:
        print(
            f"{r['method']:<15}{r['adapters']:>9}{r['rank']:>6}{r['ms_per_step']:>11.1f}{r['ratio_vs_base']:>9.3f}"
        )
    if out.get("gate_ratios"):
        print("learned gate (ours_gate) per-step time ÷ each method's")
        print(
            f"{'rank':>6}{'adapters':>9}{'÷peft_unf':>11}{'÷peft_fused':>13}{'÷ours_static':>14}{'÷ours_step':>12}"
        )
        for r in out["gate_ratios"]:
            print(
                f"{r['rank']:>6}{r['adapters']:>9}{r.get('vs_peft_unfused', float('nan')):>11.3f}"
                f"{r.get('vs_peft_fused', float('nan')):>13.3f}{r.get('vs_ours_static', float('nan')):>14.3f}"
                f"{r.get('vs_ours_per_step', float('nan')):>12.3f}"
            )
    print(
        f"switch 4-adapter mix → another (warm cache): {out['switch_ms']:.1f} ms "
        f"(+{out['switch_first_step_extra_ms']:.0f} ms in the next step, which fuses the new mix)"
    )


if __name__ == "__main__":
    raise SystemExit(main())
