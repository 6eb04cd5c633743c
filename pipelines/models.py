"""Base models: where they come from (pocket, a diffusers folder, a single file, a Hub id), on which
device and in which precision they run, and which samplers they can use."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines.blocks import UnetLayout

POCKET_DIR = Path(__file__).resolve().parent / "pocket" / "weights"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")

# A1111 sampler names → (diffusers scheduler class, extra config)
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "DDIM": ("DDIMScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "PNDM": ("PNDMScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
}
_CLASS_TO_SAMPLER = {cls: name for name, (cls, extra) in SAMPLERS.items() if not extra}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA if present, else Apple MPS, else CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` → fp16 on CUDA/MPS, fp32 on CPU; else ``fp32``/``fp16``/``bf16``."""
    table = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "fp16": torch.float16,
        "float16": torch.float16,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
    }
    if name == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use auto, fp32, fp16 or bf16")
    return table[name]


def sampler_name(scheduler: Any) -> str:
    """A1111 name of a diffusers scheduler instance (its class name when A1111 has none)."""
    cls = type(scheduler).__name__
    if cls == "DPMSolverMultistepScheduler" and scheduler.config.get("use_karras_sigmas"):
        return "DPM++ 2M Karras"
    return _CLASS_TO_SAMPLER.get(cls, cls)


def min_steps(scheduler: Any) -> int:
    """Fewest denoising steps a scheduler runs: PNDM's Runge–Kutta warm-up (PRK) takes 4, others 1."""
    if type(scheduler).__name__ == "PNDMScheduler" and not scheduler.config.get("skip_prk_steps", False):
        return int(getattr(scheduler, "pndm_order", 4))
    return 1


def check_steps(scheduler: Any, steps: int) -> None:
    """Refuse fewer steps than the scheduler needs, before anything runs."""
    need = min_steps(scheduler)
    if steps < need:
        raise ValueError(
            f"the {sampler_name(scheduler)} sampler needs at least {need} steps, got {steps}: "
            "use more steps or another sampler"
        )


def make_scheduler(name: str, base_config: Any) -> Any:
    """A scheduler for an A1111 sampler name, built from the model's scheduler config."""
    import diffusers

    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")
    cls_name, extra = SAMPLERS[name]
    return getattr(diffusers, cls_name).from_config(base_config, **extra)


def model_family(pipe: Any) -> str | None:
    """Base family of a loaded pipeline (``sd1``, ``sd2``, ``sdxl``, ``pocket``) or None."""
    from pipelines.lora_formats import pipeline_family

    return pipeline_family(pipe)


def load_pipeline(model: str, device: torch.device, dtype: torch.dtype) -> Any:
    """Load a pipeline: ``pocket``, a diffusers folder, a ``.safetensors`` checkpoint or a Hub id."""
    from diffusers import DiffusionPipeline

    path = POCKET_DIR if model == "pocket" else Path(model).expanduser()
    if model == "pocket" and not (path / "model_index.json").exists():
        raise FileNotFoundError(
            f"the pocket model is missing from {path}; run `python -m studio pocket train`"
        )
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(
            f"{path.name}: pickled checkpoints are refused (they can run code); use .safetensors"
        )
    if path.is_dir():
        pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype)
    elif path.suffix.lower() == ".safetensors":
        pipe = _from_single_file(path, dtype)
    elif path.exists():
        raise ValueError(f"{path}: not a diffusers folder or a .safetensors checkpoint")
    else:
        try:
            pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype)
        except OSError as exc:
            raise FileNotFoundError(
                f"model {model!r} is not a local folder or file and could not be fetched from the "
                f"Hugging Face Hub (offline?): {exc}"
            ) from exc
    if model == "pocket":
        pipe.studio_family = "pocket"
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _from_single_file(path: Path, dtype: torch.dtype) -> Any:
    """A single-file (original LDM layout) checkpoint; a ``*.config`` folder beside it gives the config."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        is_xl = any(k.startswith("conditioner.embedders.1") for k in f.keys())  # noqa: SIM118 (safe_open has no __contains__ iteration)
    cls = StableDiffusionXLPipeline if is_xl else StableDiffusionPipeline
    config_dir = path.with_suffix(".config")
    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    if config_dir.is_dir():
        kwargs["config"] = str(config_dir)
        kwargs["local_files_only"] = True
    return cls.from_single_file(str(path), **kwargs)


@dataclass
class LoadedModel:
    """A pipeline with what the engine needs to know about it."""

    id: str
    pipe: Any
    family: str | None
    layout: UnetLayout
    lock: threading.Lock


class ModelStore:
    """Loaded pipelines by model id (LRU, ``capacity`` at a time)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, capacity: int = 1) -> None:
        self.device, self.dtype, self.capacity = device, dtype, capacity
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, model: str) -> LoadedModel:
        """The loaded model for ``model`` (loading it, and evicting the oldest, if needed)."""
        with self._lock:
            if model in self._models:
                self._models.move_to_end(model)
                return self._models[model]
            pipe = load_pipeline(model, self.device, self.dtype)
            loaded = LoadedModel(
                model, pipe, model_family(pipe), UnetLayout.from_config(pipe.unet.config), threading.Lock()
            )
            self._models[model] = loaded
            while len(self._models) > self.capacity:
                self._models.popitem(last=False)
            return loaded

    def put(self, model: str, pipe: Any) -> LoadedModel:
        """Register an already built pipeline under an id (tests, benchmarks)."""
        loaded = LoadedModel(
            model, pipe, model_family(pipe), UnetLayout.from_config(pipe.unet.config), threading.Lock()
        )
        with self._lock:
            self._models[model] = loaded
        return loaded
