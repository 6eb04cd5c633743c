"""Builders of realistic LoRA files for the lora_formats tests, each with its reference ΔW.

References are computed independently of the code under test: PEFT's own ``get_delta_weight`` for
adapters injected with ``peft.LoraConfig``, and the dense LyCORIS / ComfyUI formulas for LoHa,
LoKr and LoCon-Tucker, written out here by hand.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer as PeftLoraLayer
from safetensors.torch import save_file
from torch import nn

from pipelines.lora_weights import LoraLayer, LoraWeights
from pipelines.tiny import build_tiny_pipeline

UNET_TARGETS = ["to_q", "to_k", "to_out.0", "proj_in", "conv1", "conv_shortcut", "ff.net.2", "time_emb_proj"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]  # all of them, as kohya trains
TOLERANCE = 1e-5


def randomise_adapters(module: nn.Module, generator: torch.Generator, std: float = 0.1) -> None:
    """Give every PEFT LoRA factor (and DoRA magnitude) random values."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, PeftLoraLayer):
                for table in (sub.lora_A, sub.lora_B):
                    weight = table["default"].weight
                    weight.copy_(torch.randn(weight.shape, generator=generator) * std)
                if "default" in sub.lora_magnitude_vector:
                    magnitude = sub.lora_magnitude_vector["default"].weight
                    magnitude.copy_(magnitude * (1 + 0.1 * torch.randn(magnitude.shape, generator=generator)))


def peft_deltas(module: nn.Module, component: str) -> dict[str, torch.Tensor]:
    """PEFT's own ΔW (``get_delta_weight``, scaling included) of every adapted layer, by module path."""
    return {
        f"{component}.{name}": sub.get_delta_weight("default").detach().clone()
        for name, sub in module.named_modules()
        if isinstance(sub, PeftLoraLayer)
    }


def adapted_pipeline(
    seed: int = 0,
    unet: LoraConfig | None = None,
    text: LoraConfig | None = None,
) -> tuple[StableDiffusionPipeline, dict[str, torch.Tensor]]:
    """The tiny pipeline with PEFT LoRAs injected and randomised; returns it and the reference ΔW."""
    pipe = build_tiny_pipeline(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    deltas = {}
    for component, config in (("unet", unet), ("text_encoder", text)):
        if config is not None:
            module = getattr(pipe, component)
            module.add_adapter(config)
            randomise_adapters(module, generator)
            deltas.update(peft_deltas(module, component))
    return pipe, deltas


def lora_config(r: int = 4, alpha: float = 8, targets: list[str] = UNET_TARGETS, **kw: object) -> LoraConfig:
    """A LoraConfig with random (non-zero) initial factors."""
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **kw)


def save_diffusers_reference(pipe: StableDiffusionPipeline, folder: Path, metadata: bool = True) -> Path:
    """Save the injected adapters with diffusers' own ``save_lora_weights``."""
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict() if metadata else None,
        text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["default"].to_dict()
        if metadata
        else None,
    )
    return folder / "pytorch_lora_weights.safetensors"


def module_weights(pipe: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
    """Copies of every Linear/Conv2d weight in unet and text_encoder, PEFT wrappers seen through."""
    weights = {}
    for component in ("unet", "text_encoder"):
        for name, sub in getattr(pipe, component).named_modules():
            if isinstance(sub, nn.Linear | nn.Conv2d) and ".lora_" not in f".{name}":
                weights[f"{component}.{name.removesuffix('.base_layer')}"] = sub.weight.detach().clone()
    return weights


@cache
def tiny_shapes() -> dict[str, torch.Size]:
    """Module shapes of the tiny pipeline (built once per test process)."""
    from pipelines.lora_formats import module_shapes

    return module_shapes(build_tiny_pipeline(0))


def max_diff(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Largest absolute difference over two ΔW tables with the same keys (asserts the keys match)."""
    assert sorted(a) == sorted(b), f"modules differ: {sorted(set(a) ^ set(b))[:5]}"
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def deltas_of(weights: object) -> dict[str, torch.Tensor]:
    """ΔW of every layer of a LoraWeights."""
    return {path: layer.delta() for path, layer in weights.layers.items()}  # type: ignore[attr-defined]


def write(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    """Save a hand-made state dict as safetensors."""
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(path),
        metadata=dict(metadata) if metadata else None,
    )
    return path


def random_kohya(names_to_paths: dict[str, str], shapes: dict, rank: int = 2, seed: int = 0):
    """Random kohya LoRA for real-architecture modules; returns (state dict, reference ΔW)."""
    g = torch.Generator().manual_seed(seed)
    sd, ref = {}, {}
    for name, path in names_to_paths.items():
        shape = tuple(shapes[path])
        down = torch.randn(rank, *shape[1:], generator=g) * 0.05
        up = torch.randn(shape[0], rank, *[1] * (len(shape) - 2), generator=g) * 0.05
        sd |= {
            f"{name}.lora_down.weight": down,
            f"{name}.lora_up.weight": up,
            f"{name}.alpha": torch.tensor(1.0),
        }
        ref[path] = (up.reshape(shape[0], rank) @ down.reshape(rank, -1)).reshape(shape) / rank
    return sd, ref


# ---- LyCORIS by hand (key naming of LyCORIS modules/{locon,loha,lokr}.py) ---------------------------


def loha_dense(w1a, w1b, w2a, w2b, scale, shape, t1=None, t2=None) -> torch.Tensor:
    """LoHa ΔW as LyCORIS/ComfyUI compute it: (w1a@w1b) ∘ (w2a@w2b) · scale, or the Tucker rebuild."""
    if t1 is not None:
        rebuild = lambda t, wd, wu: torch.einsum("i j ..., j r, i p -> p r ...", t, wd, wu)  # noqa: E731
        return rebuild(t1, w1b, w1a) * rebuild(t2, w2b, w2a) * scale
    m1 = w1a.reshape(w1a.shape[0], -1) @ w1b.reshape(w1b.shape[0], -1)
    m2 = w2a.reshape(w2a.shape[0], -1) @ w2b.reshape(w2b.shape[0], -1)
    return (m1 * m2 * scale).reshape(shape)


def lokr_dense(w1, w2, scale, shape) -> torch.Tensor:
    """LoKr ΔW as ComfyUI computes it: kron(w1, w2) · scale (w1 unsqueezed for convs)."""
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return (torch.kron(w1.contiguous(), w2.contiguous()) * scale).reshape(shape)


ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def random_lora(pipe, seed: int, rank: int = 4) -> LoraWeights:
    """A LoRA of random factors on every UNet attention projection (family left undecided)."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, mod in pipe.unet.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.endswith(ATTENTION):
            layers[f"unet.{name}"] = LoraLayer(
                torch.randn(rank, mod.in_features, generator=g) * 0.3,
                torch.randn(mod.out_features, rank, generator=g) * 0.3,
                alpha=rank,
            )
    return LoraWeights(layers, "unknown")
