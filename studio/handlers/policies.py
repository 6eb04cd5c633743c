"""Fusion policies as the Create tab offers them: names, default parameters, the parameters JSON, and
the schedule preview."""

from __future__ import annotations

import inspect
import json
import re
from typing import Any

from PIL import Image

from pipelines.fusion import REGISTRY
from pipelines.fusion.schedule import keyframe_value, parse_keyframes
from studio.handlers import plots
from studio.handlers.state import SessionState
from studio.services import Services

MIX_OWNED_PARAMS = ("blocks", "schedule")  # per-adapter settings that live in the mix panel


HIDDEN_PARAMS = ("network", "force")  # constructor arguments for code, not people


def policy_names() -> list[str]:
    """Registered fusion policies (``linear`` first)."""
    return sorted(REGISTRY, key=lambda n: (n != "linear", n))


def comparable_policies() -> list[str]:
    """Policies that run with their default parameters (what the A/B grid offers)."""
    from pipelines.fusion import make_policy

    out = []
    for name in policy_names():
        try:
            make_policy(name, {k: v for k, v in policy_defaults(name).items() if v is not None})
        except ValueError:
            continue
        out.append(name)
    return out


def policy_defaults(name: str) -> dict[str, Any]:
    """The parameters a person may set for a policy, with their defaults (per-adapter ones excluded)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown fusion policy {name!r}; known: {', '.join(policy_names())}")
    out: dict[str, Any] = {}
    for pname, param in inspect.signature(REGISTRY[name].__init__).parameters.items():
        if pname == "self" or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        if pname in MIX_OWNED_PARAMS or pname in HIDDEN_PARAMS:
            continue
        default = None if param.default is inspect.Parameter.empty else param.default
        out[pname] = default
    return out


def parse_params(text: str | dict[str, Any] | None) -> dict[str, Any]:
    """Policy parameters from their JSON text (an object)."""
    if isinstance(text, dict):
        return dict(text)
    if not text or not str(text).strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the policy parameters are not valid JSON: {exc.msg} (line {exc.lineno})") from exc
    if not isinstance(value, dict):
        raise ValueError('the policy parameters must be a JSON object like {"period": 2}')
    return value


def set_param(text: str, key: str, value: Any) -> str:
    """The parameters JSON with one key changed (``None``/empty removes nothing, it sets null)."""
    params = parse_params(text)
    if key == "order" and isinstance(value, str):
        value = [int(v) for v in re.split(r"[,\s]+", value.strip()) if v] or None
    params[key] = value
    return json.dumps(params)


def schedule_preview(state: SessionState, steps: int) -> Image.Image | None:
    """Weight curves of the mix's adapters under the schedule policy."""
    curves = []
    for item in state.mix:
        frames = parse_keyframes(item.schedule)
        curves.append(
            (item.name, [item.weight * keyframe_value(frames, s, steps) for s in range(max(1, steps))])
        )
    return plots.schedule_curves(curves)


def gate_choices(services: Services) -> list[tuple[str, str]]:
    """(label, ``sha256:<hex>``) of the catalog's gate checkpoints that fit the loaded model."""
    from adapters_db.gates import list_gates
    from studio.handlers.create import model_family

    if services.catalog is None:
        return []
    with services.catalog.session() as session:
        gates = list_gates(session, services.catalog, base_family=model_family(services))
    return [(g.label, f"sha256:{g.sha256}") for g in gates if g.path is not None]
