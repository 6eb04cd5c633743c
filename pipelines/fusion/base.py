"""What every fusion policy sees and returns: layers, adapters, factors → a gate table per step."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from pipelines.blocks import UnetLayout
from pipelines.lora_weights import LoraLayer

Factor = LoraLayer | torch.Tensor  # low-rank factors, or a dense (already scaled) ΔW


@dataclass(frozen=True)
class AdapterInfo:
    """One adapter of a mix: its name and A1111-style strengths (weight × unet / te multiplier)."""

    name: str
    weight: float = 1.0
    unet: float = 1.0
    te: float = 1.0


@dataclass(frozen=True)
class LayerInfo:
    """One adapted module: its path and LoRA-Block-Weight block id."""

    path: str
    block: str

    @property
    def is_unet(self) -> bool:
        """True for UNet layers (False for text encoders)."""
        return self.path.startswith("unet.")


@dataclass
class FusionContext:
    """Everything a policy may look at when it prepares a mix."""

    layers: tuple[LayerInfo, ...]
    adapters: tuple[AdapterInfo, ...]
    factors: dict[tuple[int, int], Factor]
    layout: UnetLayout | None = None
    base_weight: Callable[[int], torch.Tensor] | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def base_table(self) -> torch.Tensor:
        """A1111 `<lora:name:w>` gates: weight × UNet or text-encoder strength per adapter and layer."""
        table = torch.zeros(len(self.layers), len(self.adapters))
        for (li, ai), _ in self.factors.items():
            a = self.adapters[ai]
            table[li, ai] = a.weight * (a.unet if self.layers[li].is_unet else a.te)
        return table

    def unet_rows(self) -> torch.Tensor:
        """Boolean mask of UNet layers."""
        return torch.tensor([layer.is_unet for layer in self.layers], dtype=torch.bool)


class FusionPolicy:
    """A fusion policy: ``prepare`` once per mix, then ``gates`` per denoising step."""

    name: ClassVar[str] = ""
    static: ClassVar[bool] = True  # gates do not change across steps
    uses_prompt: ClassVar[bool] = False

    def __init__(self, **params: Any) -> None:
        self.params = params
        self.ctx: FusionContext | None = None

    def prepare(self, ctx: FusionContext) -> dict[tuple[int, int], Factor]:
        """Look at (and possibly transform) the factors; returns the factors to attach."""
        self.ctx = ctx
        return ctx.factors

    def columns(self) -> list[str]:
        """Names of the gate table's columns (the adapters, unless the policy merged them)."""
        assert self.ctx is not None
        return [a.name for a in self.ctx.adapters]

    def gates(
        self,
        step: int,
        num_steps: int,
        timestep: float | None = None,
        prompt_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The (layers × columns) gate table for one step."""
        raise NotImplementedError

    def check_model(self, family: str | None, shapes: Mapping[str, torch.Size]) -> None:
        """Refuse a model the policy cannot run on, before anything is attached (no check by default).

        ``family`` is the model's base family (``None``: unknown); ``shapes`` its module weight shapes.
        """

    def install(self, wrappers: list[Any]) -> None:
        """Called once the layers are wrapped; activation-dependent policies hook in here."""

    def applied(self, logged: torch.Tensor) -> torch.Tensor:
        """Gates actually applied (steps × layers × columns); the logged tables unless overridden."""
        return logged

    def report(self) -> dict[str, Any]:
        """Diagnostics worth showing (e.g. retained energy); empty by default."""
        return {}


REGISTRY: dict[str, type[FusionPolicy]] = {}


def register(cls: type[FusionPolicy]) -> type[FusionPolicy]:
    """Class decorator: make a policy selectable by its ``name``."""
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"bad or duplicate policy name {cls.name!r}")
    REGISTRY[cls.name] = cls
    return cls


def make_policy(name: str, params: Mapping[str, Any] | None = None) -> FusionPolicy:
    """Instantiate a registered policy; unknown names and parameters give a clear error."""
    import pipelines.fusion  # noqa: F401  (registers the built-in policies)

    if name not in REGISTRY:
        raise ValueError(f"unknown fusion policy {name!r}; known: {', '.join(sorted(REGISTRY))}")
    try:
        return REGISTRY[name](**dict(params or {}))
    except TypeError as exc:
        raise ValueError(f"bad parameters for fusion policy {name!r}: {exc}") from exc


def whole_number(value: Any, what: str, minimum: int) -> int:
    """A policy parameter as an int ≥ ``minimum`` (``"5"`` and ``5.0`` accepted), else a clear ValueError."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number != int(number) or number < minimum:
        raise ValueError(f"{what} must be a whole number ≥ {minimum}, got {value!r}")
    return int(number)


def plain_number(x: float) -> str:
    """Shortest decimal that reads back as exactly ``x`` (``repr`` precision), never in exponent form, so it
    fits A1111 ``<lora:…>`` tag weights as the studio's tag parser and sd-webui-loractl read them."""
    text = np.format_float_positional(float(x), trim="-")
    return "0" if text == "-0" else text


def is_number_list(value: Any) -> bool:
    """True for a list or tuple of plain numbers."""
    return isinstance(value, list | tuple) and all(isinstance(v, int | float) for v in value)


def is_per_adapter(value: Any) -> bool:
    """True for a list meant as one entry per adapter (not a vector of numbers, not keyframe pairs)."""
    if not isinstance(value, list | tuple) or not value or is_number_list(value):
        return False
    return not all(is_number_list(v) and len(v) == 2 for v in value)  # [[w, pos], …] is one keyframe list


def per_adapter(value: Any, n: int, name: str = "the parameter") -> list[Any]:
    """A parameter given once for all adapters, or as a list with one entry per adapter."""
    if not is_per_adapter(value):
        return [value] * n
    if len(value) != n:
        raise ValueError(
            f"{name} has {len(value)} entr{'y' if len(value) == 1 else 'ies'} for {n} adapters: give one per "
            "adapter of the mix, "
            "in mix order, or a single value for all"
        )
    return list(value)
