"""Composition root: builds the long-lived services (models, adapter cache, engine, catalog, training
jobs, history) once; the CLI and the UI both take a :class:`Services`."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.adapter_cache import AdapterCache
from pipelines.engine import Engine, GateResolver
from pipelines.models import POCKET_DIR, ModelStore, resolve_device, resolve_dtype
from studio.config import StudioConfig

# The pocket model's bundled catalog (A1111 ``models/Lora`` layout: LoRAs, previews, sidecars).
POCKET_CATALOGS = (POCKET_DIR / "loras", POCKET_DIR / "catalog")
SEED_MARKER = ".pocket-catalog-seeded"


@dataclass(frozen=True)
class ModelInfo:
    """What the UI needs to know about the loaded base model (``error`` set when it failed to load)."""

    model: str
    family: str | None = None
    width: int = 512
    height: int = 512
    block_ids: tuple[str, ...] = ()
    error: str | None = None


class TrainMonitor:
    """Remembers every progress report of training jobs (losses and sample pictures) for live plots."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._losses: dict[str, dict[int, float]] = {}
        self._samples: dict[str, list[str]] = {}

    def record(self, job_id: str, progress: Any) -> None:
        """A ``JobRunner`` listener: keep the loss of each training step and each new sample picture."""
        with self._lock:
            if progress.phase == "training" and progress.loss is not None:
                self._losses.setdefault(job_id, {})[int(progress.step)] = float(progress.loss)
            sample = getattr(progress, "sample_path", None)
            if sample is not None:
                seen = self._samples.setdefault(job_id, [])
                if str(sample) not in seen:
                    seen.append(str(sample))

    def losses(self, job_id: str) -> list[tuple[int, float]]:
        """(step, loss) pairs seen so far, by step."""
        with self._lock:
            return sorted(self._losses.get(job_id, {}).items())

    def samples(self, job_id: str) -> list[str]:
        """Sample pictures reported so far, oldest first."""
        with self._lock:
            return list(self._samples.get(job_id, []))


class CancelRegistry:
    """One cancel flag per running generation, keyed by the UI session that started it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: dict[str, threading.Event] = {}

    def begin(self, key: str) -> threading.Event:
        """A fresh flag for a generation that starts now."""
        with self._lock:
            self._events[key] = threading.Event()
            return self._events[key]

    def cancel(self, key: str) -> bool:
        """Raise the flag of ``key``'s running generation; ``False`` if none runs."""
        with self._lock:
            event = self._events.get(key)
        if event is None:
            return False
        event.set()
        return True

    def end(self, key: str) -> None:
        """Forget the flag once the generation is over."""
        with self._lock:
            self._events.pop(key, None)


@dataclass
class Services:
    """Everything a command or the UI needs, built at the boundary."""

    config: StudioConfig
    models: ModelStore
    cache: AdapterCache
    engine: Engine
    catalog: Any = None  # adapters_db.Catalog
    jobs: Any = None  # studio.jobs.JobRunner
    history: Any = None  # studio.history.HistoryStore
    monitor: TrainMonitor = field(default_factory=TrainMonitor)
    cancels: CancelRegistry = field(default_factory=CancelRegistry)
    memo: dict[Any, Any] = field(default_factory=dict)  # small derived data (mix conflict reports)
    _model_info: ModelInfo | None = None

    def model_info(self) -> ModelInfo:
        """Family, native size and block ids of the configured model (loads it once)."""
        if self._model_info is None or self._model_info.error:
            self._model_info = load_model_info(self.models, self.config.model)
        return self._model_info

    def close(self) -> None:
        """Stop the training workers and close the databases."""
        if self.jobs is not None:
            self.jobs.stop(timeout=30)
        if self.history is not None:
            self.history.dispose()
        if self.catalog is not None:
            self.catalog.dispose()


def load_model_info(models: ModelStore, model: str) -> ModelInfo:
    """Load ``model`` and describe it; a model that fails to load gives an info with ``error`` set."""
    try:
        loaded = models.get(model)
    except (OSError, ValueError, RuntimeError) as exc:
        return ModelInfo(model, error=f"{type(exc).__name__}: {exc}")
    pipe = loaded.pipe
    scale = getattr(pipe, "vae_scale_factor", 8)
    size = int(pipe.unet.config.sample_size) * int(scale)
    return ModelInfo(model, loaded.family, size, size, loaded.layout.all_ids())


def build_engine_services(config: StudioConfig, resolve: Any = None, resolve_gate: Any = None) -> Services:
    """Models, adapter cache and engine for a configuration (no catalog)."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    models = ModelStore(device, dtype)
    cache = AdapterCache()
    plan = config.cache_dir / "fusion_paths.json"
    engine = Engine(
        models, cache, resolve=resolve, path_mode="cost", plan_cache=plan, resolve_gate=resolve_gate
    )
    return Services(config=config, models=models, cache=cache, engine=engine)


def catalog_resolver(catalog: Any) -> Callable[[str], Path]:
    """``sha256 → local file`` through the catalog's content-addressed store."""

    def resolve(sha256: str) -> Path:
        path = catalog.store.path_for(sha256)
        if not path.is_file():
            raise FileNotFoundError(
                f"adapter sha256:{sha256[:12]}… is not stored locally (import or download its file first)"
            )
        return path

    return resolve


def catalog_gate_resolver(catalog: Any) -> GateResolver:
    """``gate name / hash / id, model family, the mix's (name, SHA-256) → local gate file`` through the
    catalog; a gate that does not fit the model's family is refused, one trained to route other LoRAs
    than the mix's is used with a logged warning."""
    from adapters_db.gates import find_gate, warn_routing_mismatch
    from pipelines.fusion.gate import GateMismatchError

    def resolve(ref: str, family: str | None, loras: Sequence[tuple[str, str | None]] = ()) -> Path:
        with catalog.session() as session:
            gate = find_gate(session, catalog, ref)
        if gate is None:
            raise FileNotFoundError(
                f"gate checkpoint {ref!r} is neither a file nor a gate in the catalog "
                "(list them with `python -m studio gate list`)"
            )
        if not gate.fits(family):
            raise GateMismatchError(
                f"gate {gate.name!r} fits {', '.join(gate.families)} models; this model is {family!r}"
            )
        warn_routing_mismatch(gate, loras)
        if gate.path is None or not gate.path.is_file():
            raise FileNotFoundError(f"gate {gate.name!r} sha256:{gate.sha256[:12]}… is not stored locally")
        return gate.path

    return resolve


class LazyCatalog:
    """The configuration's catalog, opened on first use only (a command that needs no catalog never
    opens, or creates, one)."""

    def __init__(self, config: StudioConfig) -> None:
        self.config = config
        self._catalog: Any = None

    def __call__(self) -> Any:
        """The catalog (opened now if it was not yet)."""
        if self._catalog is None:
            import adapters_db

            self._catalog = adapters_db.open_catalog(self.config.catalog_url, self.config.data_dir)
        return self._catalog

    def resolve(self, sha256: str) -> Path:
        """:func:`catalog_resolver` over the catalog: ``sha256 → local file``."""
        return catalog_resolver(self())(sha256)

    def resolve_gate(
        self, ref: str, family: str | None, loras: Sequence[tuple[str, str | None]] = ()
    ) -> Path:
        """:func:`catalog_gate_resolver` over the catalog."""
        return catalog_gate_resolver(self())(ref, family, loras)


def lazy_gate_resolver(config: StudioConfig) -> GateResolver:
    """:func:`catalog_gate_resolver` over the configuration's catalog, opened on first use only."""
    return LazyCatalog(config).resolve_gate


def build_services(
    config: StudioConfig, *, embedder: Any = None, start_jobs: bool = True, seed: bool = True
) -> Services:
    """The studio's composition root: catalog, engine resolving adapters through it, training jobs
    registering into it, and the history; the pocket catalog is imported on first launch."""
    import adapters_db
    from studio.history import HistoryStore
    from studio.jobs import JobRunner, catalog_registrar

    config.data_dir.mkdir(parents=True, exist_ok=True)
    catalog = adapters_db.open_catalog(config.catalog_url, config.data_dir, embedder=embedder)
    services = build_engine_services(
        config, resolve=catalog_resolver(catalog), resolve_gate=catalog_gate_resolver(catalog)
    )
    services.catalog = catalog
    services.history = HistoryStore(config.catalog_url, config.history_dir)
    services.jobs = JobRunner(config, registrar=catalog_registrar(catalog))
    services.jobs.add_listener(services.monitor.record)
    if seed:
        seed_catalog(services)
    if start_jobs:
        services.jobs.start()
    return services


def _folder_fingerprint(folder: Path) -> str:
    """Names and sizes of every file under ``folder`` (changes when the bundled catalog changes)."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f"{path.relative_to(folder)}\0{path.stat().st_size}\n".encode())
    return h.hexdigest()


def seed_catalog(services: Services, folder: Path | None = None) -> Any:
    """First-launch hook: import the pocket model's bundled catalog (``pipelines/pocket/weights/loras``,
    or ``…/catalog``: an A1111-style LoRA folder with previews and sidecars) once per version of it.

    Returns the import summary, or ``None`` when there is nothing (new) to import.
    """
    import adapters_db

    folder = folder or next((f for f in POCKET_CATALOGS if f.is_dir()), None)
    if folder is None or not folder.is_dir():
        return None
    marker = services.config.data_dir / SEED_MARKER
    fingerprint = _folder_fingerprint(folder)
    if marker.is_file() and marker.read_text().strip() == fingerprint:
        return None
    with services.catalog.session() as session:
        summary = adapters_db.import_folder(session, services.catalog, folder, base_family="pocket")
    with services.catalog.session() as session:
        adapters_db.embed_missing(services.catalog, session=session)
    if not summary.failed:
        marker.write_text(fingerprint)
    return summary


def data_dir(path: str | Path) -> Path:
    """The data directory, created if missing."""
    p = Path(path).expanduser()
    p.mkdir(parents=True, exist_ok=True)
    return p
