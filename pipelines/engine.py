"""The generation engine: attach a mix of LoRAs to a diffusers pipeline, gate it per layer and step.

``attach`` replaces each targeted Linear/Conv2d by one :class:`~pipelines.multilora.MultiLoraLayer`
holding every adapter of the mix, asks the fusion policy for the gate table of each denoising
step (read from a UNet pre-hook, which sees the real timestep and prompt embedding) and puts the
original modules back afterwards: base weights are never written, so they stay bit-identical.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipelines.blocks import UnetLayout, block_id
from pipelines.fusion.base import AdapterInfo, Factor, FusionContext, FusionPolicy, LayerInfo, make_policy
from pipelines.lora_weights import COMPONENTS, LoraLayer, LoraWeights
from pipelines.multilora import GateTable, MultiLoraLayer, wrap
from pipelines.path_plan import PathPlanner
from pipelines.recipe import AdapterSpec, MixRecipe, batch_seeds


class GenerationCancelled(RuntimeError):
    """The caller cancelled a generation between two steps."""


def dora_delta(w0: torch.Tensor, layer: LoraLayer) -> torch.Tensor:
    """Dense ΔW of a DoRA layer: m ⊙ (W₀+ΔW)/‖W₀+ΔW‖ − W₀ (Liu et al., arXiv 2402.09353, eq. 5).

    A magnitude per output channel (``dora_axis`` 0) normalises rows (PEFT); one per input channel
    (``dora_axis`` 1) normalises columns (LyCORIS ``wd_on_output=False``; A1111 ``apply_weight_decompose``).
    """
    w0 = w0.float()
    w = w0 + layer.delta().float().reshape(w0.shape)
    m = layer.dora_scale.float().flatten()
    flat = w.reshape(w.shape[0], -1)
    if layer.dora_axis == 0 and m.numel() == w.shape[0]:
        norm = flat.norm(dim=1).clamp_min(torch.finfo(w.dtype).eps)
        scaled = flat * (m / norm)[:, None]
    elif layer.dora_axis == 1 and m.numel() == w.shape[1]:
        cols = w.transpose(0, 1).reshape(w.shape[1], -1)
        norm = cols.norm(dim=1).clamp_min(torch.finfo(w.dtype).eps)
        scaled = (
            (cols * (m / norm)[:, None]).reshape(w.transpose(0, 1).shape).transpose(0, 1).reshape(flat.shape)
        )
    else:
        raise ValueError(
            f"DoRA magnitude of {m.numel()} values fits neither side of a {tuple(w.shape)} weight"
        )
    return scaled.reshape(w0.shape) - w0


def _component_root(pipe: Any, path: str) -> tuple[nn.Module, str]:
    """(component module, path inside it) for a module path such as ``unet.mid_block.…``."""
    comp, _, rest = path.partition(".")
    if comp not in COMPONENTS or getattr(pipe, comp, None) is None:
        raise ValueError(f"the model has no {comp!r} for LoRA module {path!r}")
    return getattr(pipe, comp), rest


def model_modules(pipe: Any) -> dict[str, nn.Module]:
    """Every Linear/Conv2d of the pipeline's UNet and text encoders, by module path, in model order."""
    out: dict[str, nn.Module] = {}
    for comp in COMPONENTS:
        root = getattr(pipe, comp, None)
        if root is None:
            continue
        for name, mod in root.named_modules():
            if isinstance(mod, nn.Linear | nn.Conv2d) and not isinstance(mod, MultiLoraLayer):
                out[f"{comp}.{name}"] = mod
    return out


def check_mix(
    adapters: Sequence[tuple[AdapterInfo, LoraWeights]], family: str | None, modules: dict[str, nn.Module]
) -> None:
    """Refuse a mix before touching the model: wrong base family, unknown modules, wrong shapes, NaN/Inf."""
    from pipelines.lora_formats import NonFiniteWeightsError, check_against_model

    shapes = {path: mod.weight.shape for path, mod in modules.items()}
    for info, weights in adapters:
        try:
            check_against_model(weights, family, shapes)
        except ValueError as exc:
            raise type(exc)(f"LoRA {info.name!r}: {exc}") from exc
        if not _finite_once(weights):
            bad = next(p for p, layer in weights.layers.items() if not _finite(layer))
            raise NonFiniteWeightsError(f"LoRA {info.name!r} has NaN/Inf weights at {bad}")


_FINITE: dict[int, weakref.ref] = {}


def _finite(layer: LoraLayer) -> bool:
    """True when a layer's factors hold no NaN/Inf."""
    return all(bool(torch.isfinite(t).all()) for t in (layer.down, layer.up, layer.mid) if t is not None)


def _finite_once(weights: LoraWeights) -> bool:
    """Finiteness of an adapter's factors, checked once per in-memory adapter (a mix switch stays cheap)."""
    ref = _FINITE.get(id(weights))
    if ref is not None and ref() is weights:
        return True
    if not all(_finite(layer) for layer in weights.layers.values()):
        return False
    _FINITE[id(weights)] = weakref.ref(weights)
    return True


@dataclass
class Mix:
    """An attached mix: wrapped layers, their gate table and the gates applied so far."""

    layers: tuple[LayerInfo, ...]
    columns: list[str]
    table: GateTable
    policy: FusionPolicy
    num_steps: int
    restore: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)
    wrappers: list[MultiLoraLayer] = field(default_factory=list)
    gate_log: list[torch.Tensor] = field(default_factory=list)
    step: int = 0
    _gates_step: int = -1
    _last_t: float | None = None

    def observe(self, timestep: Any, prompt_embeds: torch.Tensor | None = None) -> None:
        """UNet pre-hook: count steps by distinct consecutive timesteps, then gate this step.

        Denoising timesteps only decrease within a run, so a larger one starts a new run. A
        step's several UNet calls (unbatched guidance, Heun's corrector) share its gates.
        """
        t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        if self._last_t is None or t > self._last_t:
            self.step, self._gates_step = 0, -1
            self.gate_log.clear()
        elif t < self._last_t:
            self.step += 1
        self._last_t = t
        self.update(t, prompt_embeds)

    def update(
        self, timestep: Any = None, prompt_embeds: torch.Tensor | None = None, record: bool = True
    ) -> None:
        """Ask the policy for this step's gates (once per step when recording) and record them."""
        if record and self._gates_step == self.step:
            return
        t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else timestep
        table = self.policy.gates(self.step, self.num_steps, timestep=t, prompt_embeds=prompt_embeds)
        self.table.set(table)
        if record:
            self.gate_log.append(table.detach().float().cpu())
            self._gates_step = self.step

    def gates(self) -> torch.Tensor:
        """Gates actually applied: (steps × layers × columns)."""
        if not self.gate_log:
            return torch.zeros(0, len(self.layers), len(self.columns))
        return self.policy.applied(torch.stack(self.gate_log))


@contextmanager
def attach(
    pipe: Any,
    adapters: Sequence[tuple[AdapterInfo, LoraWeights]],
    policy: FusionPolicy,
    *,
    layout: UnetLayout | None = None,
    family: str | None = None,
    num_steps: int = 1,
    dtype: torch.dtype | None = None,
    planner: PathPlanner | None = None,
    track_steps: bool = True,
) -> Iterator[Mix]:
    """Attach a mix for the duration of a ``with`` block; the original modules come back after.

    With ``track_steps`` a UNet pre-hook counts denoising steps and sets each step's gates;
    without it the caller drives ``mix.table`` itself (training).
    """
    modules = model_modules(pipe)
    check_mix(adapters, family, modules)
    policy.check_model(family, {path: mod.weight.shape for path, mod in modules.items()})
    layout = layout or UnetLayout.from_config(pipe.unet.config)
    paths = [p for p in modules if any(p in w.layers for _, w in adapters)]
    layers = tuple(LayerInfo(p, block_id(p, layout)) for p in paths)
    factors: dict[tuple[int, int], Factor] = {}
    for li, path in enumerate(paths):
        for ai, (_, weights) in enumerate(adapters):
            layer = weights.layers.get(path)
            if layer is not None:
                factors[(li, ai)] = (
                    dora_delta(modules[path].weight, layer) if layer.dora_scale is not None else layer
                )
    ctx = FusionContext(
        layers,
        tuple(info for info, _ in adapters),
        factors,
        layout,
        base_weight=lambda li: modules[paths[li]].weight,
    )
    prepared = policy.prepare(ctx)
    columns = policy.columns()
    device = next(pipe.unet.parameters()).device
    table = GateTable(len(layers), len(columns), device=device)
    mix = Mix(layers, columns, table, policy, num_steps)
    planner = planner or PathPlanner(static=policy.static)
    hooks: list[Any] = []
    per_layer: dict[int, list[tuple[int, Factor]]] = {}
    for (li, ai), f in prepared.items():
        per_layer.setdefault(li, []).append((ai, f))
    try:
        for li, path in enumerate(paths):
            if li not in per_layer:
                continue
            base = modules[path]
            wdtype = dtype or base.weight.dtype
            wrapper = wrap(base, per_layer[li], table, li, wdtype)
            wrapper.planner = planner
            root, rest = _component_root(pipe, path)
            parent_name, _, attr = rest.rpartition(".")
            parent = root.get_submodule(parent_name) if parent_name else root
            setattr(parent, attr, wrapper)
            mix.restore.append((parent, attr, base))
            mix.wrappers.append(wrapper)
        policy.install(mix.wrappers)
        mix.update(record=False)  # step-0 gates for the text encoders, which run before the UNet

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            t = args[1] if len(args) > 1 else kwargs.get("timestep")
            emb = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
            mix.observe(t, emb)

        if track_steps:
            hooks.append(pipe.unet.register_forward_pre_hook(pre_hook, with_kwargs=True))
        yield mix
    finally:
        for h in hooks:
            h.remove()
        for parent, attr, base in reversed(mix.restore):
            setattr(parent, attr, base)


@dataclass
class Generation:
    """What a generation returns: images, the recipe, the gates applied and timings."""

    images: list[Any]
    recipe: MixRecipe
    gates: torch.Tensor  # steps × layers × columns
    layers: list[str]
    blocks: list[str]
    columns: list[str]
    report: dict[str, Any]
    seconds: float
    sampler: str
    width: int
    height: int
    adapter_hashes: dict[str, str]
    short_hashes: dict[str, str]

    def image_recipe(self, index: int) -> MixRecipe:
        """The recipe of image ``index`` alone: its own seed (seed + index) and a batch of one, so that
        replaying it, here or in A1111, gives that image."""
        if self.recipe.batch_size == 1:
            return self.recipe
        seed = batch_seeds(self.recipe.seed, self.recipe.batch_size)[index]
        return replace(self.recipe, seed=seed, batch_size=1)

    def save(self, path: str | Path, index: int = 0) -> Path:
        """Write image ``index`` as PNG with A1111 parameters and its own pinned recipe embedded."""
        from pipelines.pngmeta import pinned_recipe, save_png

        recipe = pinned_recipe(self.image_recipe(index), self.adapter_hashes)
        return save_png(
            self.images[index],
            path,
            recipe,
            short_hashes=self.short_hashes,
            sampler=self.sampler,
            width=self.width,
            height=self.height,
        )


# gate name / hash, model family, the mix's (name, SHA-256) → local gate file
GateResolver = Callable[[str, str | None, Sequence[tuple[str, str | None]]], Path]


class Engine:
    """Runs recipes: loads models and adapters (cached), attaches the mix, runs diffusers."""

    def __init__(
        self,
        models: Any,
        cache: Any,
        *,
        resolve: Callable[[str], Path] | None = None,
        path_mode: str = "cost",
        plan_cache: Path | None = None,
        resolve_gate: GateResolver | None = None,
    ) -> None:
        self.models = models
        self.cache = cache
        self.resolve = resolve
        self.resolve_gate = resolve_gate
        self.path_mode = path_mode
        self.plan_cache = plan_cache

    def adapter_path(self, spec: AdapterSpec) -> Path:
        """Local file of an adapter reference (a path, or ``sha256:…`` through the resolver)."""
        if spec.ref.startswith("sha256:"):
            if self.resolve is None:
                raise FileNotFoundError(f"no catalog to resolve {spec.ref}")
            return self.resolve(spec.ref[len("sha256:") :])
        path = Path(spec.ref).expanduser()
        if not path.exists():
            if spec.sha256 and self.resolve is not None:
                return self.resolve(spec.sha256)
            raise FileNotFoundError(f"adapter file not found: {path}")
        return path

    def gate_path(self, ref: str, family: str | None, loras: Sequence[tuple[str, str | None]] = ()) -> Path:
        """Local file of a gate checkpoint: a path, else a catalog name / hash through ``resolve_gate``
        (which refuses a gate that does not fit ``family`` and warns when the mix's ``loras``, as
        (name, SHA-256), are not those the gate was trained to route)."""
        path = Path(ref).expanduser()
        if path.is_file():
            return path
        if self.resolve_gate is None:
            raise FileNotFoundError(
                f"gate checkpoint {ref!r} is not a file, and there is no catalog to look it up in"
            )
        return self.resolve_gate(ref, family, loras)

    def policy_args(
        self, recipe: MixRecipe, family: str | None, loras: Sequence[tuple[str, str | None]] = ()
    ) -> dict[str, Any]:
        """The recipe's policy parameters with a ``gate`` checkpoint reference resolved to a file."""
        args = dict(recipe.fusion_args)
        ref = args.get("checkpoint")
        if recipe.fusion == "gate" and isinstance(ref, str) and ref.strip():
            args["checkpoint"] = str(self.gate_path(ref.strip(), family, loras))
        return args

    def load_adapters(
        self, recipe: MixRecipe, device: torch.device, dtype: torch.dtype
    ) -> list[tuple[AdapterInfo, LoraWeights, str, Path]]:
        """(info, weights on device, sha256, path) for every adapter of a recipe, hashes verified."""
        out = []
        for spec in recipe.adapters:
            path = self.adapter_path(spec)
            sha, weights = self.cache.device(path, device, dtype)
            if spec.sha256 and spec.sha256 != sha:
                raise ValueError(
                    f"adapter {spec.label!r} changed on disk: expected sha256 {spec.sha256[:12]}…, "
                    f"found {sha[:12]}…"
                )
            out.append((AdapterInfo(spec.label, spec.weight, spec.unet, spec.te), weights, sha, path))
        return out

    def generate(
        self,
        recipe: MixRecipe,
        *,
        on_step: Callable[[int, int], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> Generation:
        """Run one recipe to images; the model's lock serialises generations on one pipeline."""
        from pipelines.models import check_steps, make_scheduler, sampler_name

        for spec in recipe.adapters:
            spec.check()
        model = self.models.get(recipe.model)
        pipe = model.pipe
        with model.lock:
            device, dtype = pipe.unet.device, pipe.unet.dtype
            loaded = self.load_adapters(recipe, device, dtype)
            mix = [(info.name, sha) for info, _, sha, _ in loaded]
            policy = make_policy(recipe.fusion, self.policy_args(recipe, model.family, mix))
            original_scheduler = pipe.scheduler
            if recipe.sampler:
                pipe.scheduler = make_scheduler(recipe.sampler, original_scheduler.config)
            planner = PathPlanner(static=policy.static, mode=self.path_mode, cache_file=self.plan_cache)
            t0 = time.perf_counter()
            try:
                check_steps(pipe.scheduler, recipe.steps)
                with attach(
                    pipe,
                    [(i, w) for i, w, _, _ in loaded],
                    policy,
                    layout=model.layout,
                    family=model.family,
                    num_steps=recipe.steps,
                    dtype=dtype,
                    planner=planner,
                ) as mix:
                    images, width, height = self._run(pipe, recipe, on_step, cancel, family=model.family)
                sampler = sampler_name(pipe.scheduler)
            finally:
                pipe.scheduler = original_scheduler
        return Generation(
            images=images,
            recipe=recipe,
            gates=mix.gates(),
            layers=[li.path for li in mix.layers],
            blocks=[li.block for li in mix.layers],
            columns=mix.columns,
            report=policy.report(),
            seconds=time.perf_counter() - t0,
            sampler=sampler,
            width=width,
            height=height,
            adapter_hashes={info.name: sha for info, _, sha, _ in loaded},
            short_hashes={info.name: self.cache.short_hash(p) for info, _, _, p in loaded},
        )

    def _run(
        self,
        pipe: Any,
        recipe: MixRecipe,
        on_step: Callable[[int, int], None] | None,
        cancel: threading.Event | None,
        *,
        family: str | None = None,
    ) -> tuple[list[Any], int, int]:
        """Call the diffusers pipeline with a step callback (progress, cancel); attach gates the steps.

        Prompts with A1111 emphasis, ``BREAK``, more than one chunk of tokens or a clip skip are encoded
        here (:mod:`pipelines.prompt_weighting`, text-encoder LoRAs attached); plain prompts go to the
        pipeline as strings, as they always did."""
        from pipelines.prompt_weighting import prompt_embeddings

        scale = getattr(pipe, "vae_scale_factor", 8)
        size = pipe.unet.config.sample_size * scale
        width, height = recipe.width or size, recipe.height or size

        def on_step_end(p: Any, i: int, t: Any, tensors: dict) -> dict:
            if on_step is not None:
                on_step(i + 1, recipe.steps)
            if cancel is not None and cancel.is_set():
                p._interrupt = True
            return tensors

        text: dict[str, Any] | None = prompt_embeddings(
            pipe, recipe.prompt, recipe.negative_prompt, clip_skip=recipe.clip_skip, family=family
        )
        if text is None:
            text = {"prompt": recipe.prompt, "negative_prompt": recipe.negative_prompt or None}
        seeds = batch_seeds(recipe.seed, recipe.batch_size)
        out = pipe(
            **text,
            num_inference_steps=recipe.steps,
            guidance_scale=recipe.guidance,
            width=width,
            height=height,
            num_images_per_prompt=recipe.batch_size,
            # one generator per image (A1111's seed + i): image i of a batch is the single image of seed + i
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            callback_on_step_end=on_step_end,
        )
        if cancel is not None and cancel.is_set():
            raise GenerationCancelled("generation cancelled")
        return list(out.images), width, height
