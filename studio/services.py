"""Composition root: builds the long-lived services (models, adapter cache, engine, catalog) once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.adapter_cache import AdapterCache
from pipelines.engine import Engine
from pipelines.models import ModelStore, resolve_device, resolve_dtype
from studio.config import StudioConfig


@dataclass
class Services:
    """Everything a command or the UI needs, built at the boundary."""

    config: StudioConfig
    models: ModelStore
    cache: AdapterCache
    engine: Engine
    catalog: Any = None


def build_engine_services(config: StudioConfig, resolve: Any = None) -> Services:
    """Models, adapter cache and engine for a configuration (no catalog)."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    models = ModelStore(device, dtype)
    cache = AdapterCache()
    plan = config.cache_dir / "fusion_paths.json"
    engine = Engine(models, cache, resolve=resolve, path_mode="cost", plan_cache=plan)
    return Services(config=config, models=models, cache=cache, engine=engine)


def data_dir(path: str | Path) -> Path:
    """The data directory, created if missing."""
    p = Path(path).expanduser()
    p.mkdir(parents=True, exist_ok=True)
    return p
