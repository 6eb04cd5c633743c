"""Gate checkpoints in the catalog: adapters of kind ``gate`` (a learned fusion policy, not a LoRA).

A gate file (``pipelines.gate.network.GateNetwork.save``) is stored content-addressed like any
adapter file; its catalog row records the base families it fits and the LoRAs it routes (names and
SHA-256). Gates are listed and resolved here; the search index leaves them out (they are not
adapters a prompt retrieves), and the mix refuses them as LoRAs.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import safe_open
from sqlalchemy.orm import Session

from adapters_db.dto import AdapterRecord
from adapters_db.families import normalize_family
from adapters_db.repository import find_by_hash, get_adapter, get_adapters, list_adapters, write_adapter
from adapters_db.specs import AdapterSpec, FileSpec, VersionSpec

if TYPE_CHECKING:
    from adapters_db.catalog import Catalog

log = logging.getLogger(__name__)
GATE_KIND = "gate"
GATE_FORMAT = "adapter-studio-gate"
_HASH = re.compile(r"^(sha256:)?([0-9a-fA-F]{10}|[0-9a-fA-F]{64})$")


class GateRegistrationError(ValueError):
    """A file that is not a gate checkpoint, or a registration that contradicts it."""


@dataclass(frozen=True)
class RoutedLora:
    """A LoRA a gate was trained to route: its name and, when known, the SHA-256 of its file."""

    name: str
    sha256: str | None = None


@dataclass(frozen=True)
class GateRecord:
    """A catalogued gate checkpoint (``families`` empty: fits any model whose layers match)."""

    id: int
    name: str
    sha256: str
    autov2: str
    path: Path | None
    families: tuple[str, ...]
    loras: tuple[RoutedLora, ...]
    config: dict[str, Any] = field(default_factory=dict)
    layers: int = 0
    size_bytes: int | None = None

    def fits(self, family: str | None) -> bool:
        """Whether the gate may run on a model of ``family`` (unknown families are left to the engine)."""
        return not self.families or family is None or family in self.families

    @property
    def label(self) -> str:
        """What a dropdown shows: name, AutoV2 hash and families."""
        fams = ", ".join(self.families) or "any family"
        return f"{self.name} [{self.autov2}] ({fams})"


def read_gate_header(path: Path) -> dict[str, str]:
    """The safetensors metadata of a gate checkpoint; refuses other files."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for unreadable headers
        raise GateRegistrationError(f"{path}: not a readable safetensors file ({exc})") from exc
    if meta.get("format") != GATE_FORMAT:
        raise GateRegistrationError(f"{path}: not an adapter-studio gate checkpoint")
    return meta


def check_finite_tensors(path: Path) -> None:
    """Refuse a gate file holding NaN or infinite weights (what a diverged training run leaves)."""
    import torch
    from safetensors.torch import load_file

    for key, tensor in load_file(str(path)).items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise GateRegistrationError(
                f"{path}: tensor {key!r} holds NaN or infinite values (a diverged training run); "
                "not registered"
            )


def _sha256(path: Path) -> str:
    """SHA-256 of a file, read in chunks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gate_named(session: Session, catalog: Catalog, name: str) -> GateRecord | None:
    """The catalogued gate called ``name`` (case-insensitive, as :func:`find_gate` matches names)."""
    want = name.strip().lower()
    return next((g for g in list_gates(session, catalog) if g.name.lower() == want), None)


def name_taken_message(gate: GateRecord) -> str:
    """Why a name cannot be given to another gate."""
    return (
        f"a gate named {gate.name!r} is already in the catalog (id {gate.id}, AutoV2 {gate.autov2}); "
        f"choose another --name, or delete it first with `python -m studio catalog delete --id {gate.id}`"
    )


def _families(header_family: str | None, families: Iterable[str]) -> tuple[str, ...]:
    """The gate's own family, or the families named for a file that records none (canonical names, no
    duplicates); naming another family than the file's own is refused (the engine checks the file's)."""
    named = tuple(dict.fromkeys(str(normalize_family(f)) for f in families if f and f.strip()))
    own = normalize_family(header_family) if header_family else None
    if own is None:
        return named
    other = [f for f in named if f != own]
    if other:
        raise GateRegistrationError(
            f"this gate was trained for {own!r} models and only runs on them; it cannot be registered for "
            f"{', '.join(other)} (train a gate on such a model with `python -m studio gate train`)"
        )
    return (own,)


def register_gate(
    session: Session,
    catalog: Catalog,
    path: Path,
    *,
    name: str | None = None,
    families: Sequence[str] = (),
    loras: Sequence[RoutedLora] = (),
    description: str = "",
    tags: Sequence[str] = (),
    extra: dict[str, Any] | None = None,
) -> GateRecord:
    """Store a gate file and catalog it (kind ``gate``) with the families it fits and the LoRAs it
    routes; registering the same bytes again returns the existing record."""
    path = Path(path)
    header = read_gate_header(path)
    fits = _families(header.get("family") or None, families)
    title = (path.stem if name is None else name).strip()
    if not title:
        raise GateRegistrationError(f"{path}: a gate needs a non-empty name")
    check_finite_tensors(path)
    taken = gate_named(session, catalog, title)
    if taken is not None and taken.sha256 != _sha256(path):  # checked before the file is stored
        raise GateRegistrationError(name_taken_message(taken))
    stored = catalog.store.put_file(path)
    existing = find_by_hash(session, catalog, stored.sha256)
    if existing is not None:
        if existing.kind != GATE_KIND:
            raise GateRegistrationError(f"{path}: these bytes are catalogued as a {existing.kind}")
        return gate_record(existing)
    channels = json.loads(header.get("channels") or "{}")
    routes = [{"name": lo.name, "sha256": lo.sha256} for lo in loras]
    file = FileSpec(
        file_name=path.name,
        sha256=stored.sha256,
        size_bytes=stored.size_bytes,
        format=GATE_FORMAT,
        stored=True,
        header_metadata={k: v for k, v in header.items() if k != "channels"},
        num_modules=len(channels),
        components=("unet",),
    )
    routed = ", ".join(lo.name for lo in loras) or "the LoRAs it was trained with"
    auto = (
        f"<p>A learned gate (AutoLoRA-style fusion policy) routing {routed}; fits "
        f"{', '.join(fits) or 'any model with the same layers'}.</p>"
    )
    spec = AdapterSpec(
        name=title,
        source="trained",
        kind=GATE_KIND,
        description_html=description or auto,
        base_family=fits[0] if fits else None,
        tags=tuple(dict.fromkeys(("gate", *tags))),
        versions=(VersionSpec(base_family=fits[0] if fits else None, files=(file,)),),
        extra={
            **(extra or {}),
            "fits": list(fits),
            "routes": routes,
            "gate_config": json.loads(header.get("config") or "{}"),
            "layers": len(channels),
        },
    )
    adapter_id, _ = write_adapter(session, spec)
    record = get_adapter(session, catalog, adapter_id)
    assert record is not None
    return gate_record(record)


def gate_record(record: AdapterRecord) -> GateRecord:
    """The gate view of a catalog record of kind ``gate``."""
    if record.kind != GATE_KIND:
        raise ValueError(f"{record.name!r} is a {record.kind}, not a gate checkpoint")
    files = [f for f in record.files if f.sha256]
    if not files:
        raise ValueError(f"gate {record.name!r} has no file")
    file = next((f for f in files if f.is_local), files[0])
    fits = record.extra.get("fits")
    families = tuple(fits) if fits is not None else ((record.base_family,) if record.base_family else ())
    return GateRecord(
        id=record.id,
        name=record.name,
        sha256=str(file.sha256),
        autov2=str(file.autov2 or str(file.sha256)[:10].upper()),
        path=file.local_path if file.is_local else None,
        families=families,
        loras=tuple(RoutedLora(r["name"], r.get("sha256")) for r in record.extra.get("routes") or ()),
        config=dict(record.extra.get("gate_config") or {}),
        layers=int(record.extra.get("layers") or 0),
        size_bytes=file.size_bytes,
    )


def _same_lora(routed: RoutedLora, name: str, sha256: str | None) -> bool:
    """By hash when both are known (an AutoV2 matches its SHA-256), else by name (case-insensitive)."""
    if routed.sha256 and sha256:
        a, b = routed.sha256.lower().removeprefix("sha256:"), sha256.lower().removeprefix("sha256:")
        return a == b or (min(len(a), len(b)) >= 10 and (a.startswith(b) or b.startswith(a)))
    return routed.name.strip().lower() == name.strip().lower()


def routing_mismatch(gate: GateRecord, loras: Sequence[tuple[str, str | None]]) -> str | None:
    """Why a generation's LoRAs ``(name, SHA-256 or None)`` differ from those the gate was trained to
    route, or ``None`` when they match (in any order) or the gate records none."""
    if not gate.loras:
        return None
    unused = list(loras)
    missing = []
    for routed in gate.loras:
        match = next((lo for lo in unused if _same_lora(routed, *lo)), None)
        if match is None:
            missing.append(routed.name)
        else:
            unused.remove(match)
    if not missing and not unused:
        return None
    problems = [f"{', '.join(n for n, _ in unused)} not among them"] if unused else []
    problems += [f"{', '.join(missing)} missing"] if missing else []
    return (
        f"gate {gate.name!r} was trained to route {', '.join(lo.name for lo in gate.loras)}; this mix has "
        f"{', '.join(n for n, _ in loras) or 'no LoRA'} ({'; '.join(problems)}): its gates were not learned "
        "for these LoRAs"
    )


def warn_routing_mismatch(gate: GateRecord, loras: Sequence[tuple[str, str | None]]) -> str | None:
    """:func:`routing_mismatch`, logged as a warning; returns the message (``None``: they match)."""
    message = routing_mismatch(gate, loras)
    if message is not None:
        log.warning("%s", message)
    return message


def list_gates(
    session: Session, catalog: Catalog, *, base_family: str | None = None, limit: int = 500
) -> list[GateRecord]:
    """Catalogued gate checkpoints by name; with ``base_family``, only those that fit it."""
    family = normalize_family(base_family)
    page = list_adapters(session, catalog, kind=GATE_KIND, include_nsfw=True, sort="name", limit=limit)
    full = get_adapters(session, catalog, [r.id for r in page.items], full=True)
    gates = [gate_record(full[r.id]) for r in page.items if r.id in full]
    return [g for g in gates if family is None or g.fits(family)]


def find_gate(session: Session, catalog: Catalog, ref: str) -> GateRecord | None:
    """A gate by catalog id, SHA-256 / AutoV2 hash (``sha256:`` prefix allowed) or name (case-insensitive)."""
    text = ref.strip()
    record: AdapterRecord | None = None
    if text.isdigit():
        record = get_adapter(session, catalog, int(text))
    if (record is None or record.kind != GATE_KIND) and _HASH.match(text):  # an AutoV2 may be all digits
        record = find_by_hash(session, catalog, _HASH.match(text)[2])  # type: ignore[index]
    if record is not None and record.kind == GATE_KIND:
        return gate_record(record)
    want = text.lower()
    for gate in list_gates(session, catalog):
        if gate.name.lower() == want:
            return gate
    return None
