"""Weight-space channels: vectors in the text embedder's space for adapters whose text is missing.

An adapter is *textless* when it has no description and no prompts (a bare ``.safetensors`` import).
For every textless adapter with a stored LoRA file, two channels are written as ``Embedding`` rows
of the catalog's embedder (derived data, recomputed with each index rebuild):

- ``wsvd`` (training-free): a pseudo text vector, the similarity-weighted mean of the ``meta``
  vectors of its nearest neighbours in SVD-feature space among adapters of the same family that
  do have text (label propagation; deltas cluster by style, arXiv 2412.05148);
- ``weights`` (learned): the :class:`~pipelines.weightspace.WeightEncoder` output, when an encoder
  checkpoint fitted for this embedder is configured (``catalog.weight_encoder``, else
  ``<data_dir>/weight_encoder/`` when present).

Search reads them as ``d_weights`` / ``d_wsvd`` (see ``adapters_db.retrieval``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from adapters_db.models import (
    UNSEARCHABLE_KINDS,
    Adapter,
    AdapterFile,
    AdapterVersion,
    Embedding,
    PreviewImage,
)
from adapters_db.vectors import load_vectors

if TYPE_CHECKING:
    from adapters_db.catalog import Catalog
    from adapters_db.embedders import Embedder

log = logging.getLogger(__name__)
WEIGHT_CHANNELS = ("weights", "wsvd")
ENCODER_DIR = "weight_encoder"
FEATURE_CACHE = "weightspace"


@dataclass(frozen=True)
class PropagationConfig:
    """Label propagation of the ``wsvd`` channel."""

    k: int = 5
    temperature: float = 0.05
    top_k: int = 4
    sketch: int = 6


def textless_adapter_ids(session: Session) -> set[int]:
    """Adapters with an empty description and no prompt on any preview image or caption."""
    has_prompt = PreviewImage.prompt.is_not(None), PreviewImage.prompt != ""
    prompted = select(PreviewImage.adapter_id).where(*has_prompt)
    rows = session.execute(select(Adapter.id, Adapter.description_text).where(Adapter.id.not_in(prompted)))
    return {aid for aid, text in rows if not (text or "").strip()}


def stored_lora_files(session: Session, catalog: Catalog) -> dict[int, tuple[str, Path]]:
    """Adapter id → (SHA-256, path) of its first stored LoRA file (primary first)."""
    rows = session.execute(
        select(AdapterVersion.adapter_id, AdapterFile.sha256)
        .join(AdapterFile, AdapterFile.version_id == AdapterVersion.id)
        .join(Adapter, Adapter.id == AdapterVersion.adapter_id)
        .where(
            AdapterFile.stored.is_(True),
            AdapterFile.sha256.is_not(None),
            Adapter.kind.not_in(UNSEARCHABLE_KINDS),  # gate checkpoints are not LoRAs
        )
        .order_by(
            AdapterVersion.adapter_id, AdapterFile.primary.desc(), AdapterVersion.position, AdapterFile.id
        )
    )
    out: dict[int, tuple[str, Path]] = {}
    for aid, sha in rows:
        path = catalog.store.path_for(sha, "lora")
        if aid not in out and path.is_file():
            out[aid] = (sha, path)
    return out


def _load(path: Path) -> Any:
    from pipelines.lora_formats import load

    return load(path)


def _skipped(adapter_id: int, channel: str, exc: Exception) -> None:
    """Log an adapter left out of a weight-space channel (its file unreadable: NaN, truncated, gone)."""
    log.warning("adapter %d left out of the %r channel: %s", adapter_id, channel, exc)


def layer_features_cached(
    catalog: Catalog, sha: str, path: Path, config: PropagationConfig
) -> dict[str, Any]:
    """Family and per-layer SVD features of one stored file, cached as ``.npz`` by content hash."""
    from pipelines.weightspace.svd import SvdConfig, svd_features

    svd = SvdConfig(config.top_k, config.sketch)
    cache = catalog.data_dir / FEATURE_CACHE / f"svd-k{svd.top_k}-s{svd.sketch}" / f"{sha}.npz"
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as data:
            return {"family": str(data["family"]), "names": list(data["names"]), "feats": data["feats"]}
    weights = _load(path)
    names = sorted(weights.layers)
    feats = svd_features(weights, names, svd).reshape(len(names), -1)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, family=np.array(weights.family), names=np.array(names, dtype=str), feats=feats)
    tmp.replace(cache)
    return {"family": weights.family, "names": names, "feats": feats}


def _stack(entries: list[dict[str, Any]]) -> np.ndarray:
    """Per-adapter features over the union of their layers (zeros where a layer is missing)."""
    names = sorted({n for e in entries for n in e["names"]})
    col = {n: i for i, n in enumerate(names)}
    width = entries[0]["feats"].shape[1] if entries else 0
    out = np.zeros((len(entries), len(names), width), np.float32)
    for i, e in enumerate(entries):
        for j, n in enumerate(e["names"]):
            out[i, col[n]] = e["feats"][j]
    return out.reshape(len(entries), -1)


def wsvd_vectors(
    session: Session,
    catalog: Catalog,
    embedder: Embedder,
    targets: Iterable[int],
    files: dict[int, tuple[str, Path]],
    config: PropagationConfig = PropagationConfig(),
) -> dict[int, np.ndarray]:
    """Pseudo text vectors of ``targets`` by label propagation from same-family adapters with text."""
    from pipelines.weightspace.svd import propagate_labels

    targets = [t for t in targets if t in files]
    if not targets:
        return {}
    meta = load_vectors(session, embedder.name, embedder.dim, "meta")
    meta_of = {int(a): v for a, v in zip(meta.adapter_ids, meta.vectors, strict=True)}
    refs = [a for a in files if a not in set(targets) and a in meta_of]
    entries: dict[int, dict[str, Any]] = {}
    for a in [*targets, *refs]:
        try:
            entries[a] = layer_features_cached(catalog, *files[a], config)
        except (OSError, ValueError) as exc:  # lora_formats' errors are ValueErrors
            _skipped(a, "wsvd", exc)
    targets, refs = [t for t in targets if t in entries], [r for r in refs if r in entries]
    out: dict[int, np.ndarray] = {}
    for family in {entries[t]["family"] for t in targets}:
        fam_t = [t for t in targets if entries[t]["family"] == family]
        fam_r = [r for r in refs if entries[r]["family"] == family]
        if not fam_r:
            continue
        stacked = _stack([entries[a] for a in [*fam_t, *fam_r]])
        pseudo = propagate_labels(
            stacked[: len(fam_t)],
            stacked[len(fam_t) :],
            np.stack([meta_of[r] for r in fam_r]),
            config.k,
            config.temperature,
        )
        out.update(zip(fam_t, pseudo, strict=True))
    return out


def encoder_path(catalog: Catalog) -> Path | None:
    """The configured encoder checkpoint folder, or ``<data_dir>/weight_encoder`` if it exists."""
    configured = getattr(catalog, "weight_encoder", None)
    if configured:
        return Path(configured)
    folder = catalog.data_dir / ENCODER_DIR
    return folder if folder.is_dir() else None


def encoder_vectors(
    catalog: Catalog, embedder: Embedder, targets: Iterable[int], files: dict[int, tuple[str, Path]]
) -> dict[int, np.ndarray]:
    """``WeightEncoder`` vectors of ``targets`` (none without an encoder fitted for this embedder)."""
    folder = encoder_path(catalog)
    targets = [t for t in targets if t in files]
    if folder is None or not targets:
        return {}
    from pipelines.weightspace.encoder import covered, encode_weights, load_encoder

    try:
        model = load_encoder(folder)
    except (OSError, ValueError) as exc:
        log.warning(
            "weight encoder in %s unusable (%s); the learned 'weights' channel is skipped", folder, exc
        )
        return {}
    if model.config.embed_dim != embedder.dim or model.config.embedder not in ("", embedder.name):
        log.warning(
            "weight encoder in %s was fitted for embedder %r (%d-d), the catalog's is %r (%d-d); the learned "
            "'weights' channel is skipped (refit it for this embedder)",
            folder,
            model.config.embedder or "?",
            model.config.embed_dim,
            embedder.name,
            embedder.dim,
        )
        return {}
    adapters = {}
    for t in targets:
        try:
            adapters[t] = _load(files[t][1])
        except (OSError, ValueError) as exc:  # lora_formats' errors are ValueErrors
            _skipped(t, "weights", exc)
    ok = dict(zip(adapters, covered(model.config, list(adapters.values())), strict=True))
    foreign = [t for t, has in ok.items() if not has]
    if foreign:  # their vector would be one constant shared by all of them
        log.warning(
            "%d adapter(s) (ids %s) share no layer with the weight encoder in %s (another family?); "
            "left out of the 'weights' channel",
            len(foreign),
            ", ".join(map(str, foreign[:10])),
            folder,
        )
    kept = {t: w for t, w in adapters.items() if ok[t]}
    vectors = encode_weights(model, list(kept.values()))
    return dict(zip(kept, vectors, strict=True))


def _row(adapter_id: int, channel: str, sha: str, embedder: Embedder, vector: np.ndarray) -> Embedding:
    digest = hashlib.sha256(f"{embedder.name}\0{channel}\0file:{sha}".encode()).hexdigest()
    return Embedding(
        adapter_id=adapter_id,
        image_id=None,
        channel=channel,
        embedder=embedder.name,
        dim=embedder.dim,
        content_hash=digest,
        vector=np.asarray(vector, np.float32).tobytes(),
    )


def embed_weight_channels(
    catalog: Catalog,
    session: Session,
    embedder: Embedder | None = None,
    config: PropagationConfig = PropagationConfig(),
) -> dict[str, int]:
    """Rewrite the ``weights`` and ``wsvd`` rows of ``embedder`` for every textless adapter with a
    stored file (inside the caller's transaction); returns how many rows each channel got.

    Needs the ``meta`` vectors to be stored already (``embed_missing`` first)."""
    embedder = embedder or catalog.embedder
    session.execute(
        delete(Embedding).where(Embedding.embedder == embedder.name, Embedding.channel.in_(WEIGHT_CHANNELS))
    )
    files = stored_lora_files(session, catalog)
    targets = sorted(textless_adapter_ids(session) & set(files))
    made = {"wsvd": wsvd_vectors(session, catalog, embedder, targets, files, config)}
    made["weights"] = encoder_vectors(catalog, embedder, targets, files)
    for channel, vectors in made.items():
        session.add_all(_row(a, channel, files[a][0], embedder, v) for a, v in vectors.items())
    session.flush()
    return {channel: len(vectors) for channel, vectors in made.items()}
