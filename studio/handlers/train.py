"""The Train tab: pictures and captions in, a queued training job, live progress, the adapter out."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from PIL import Image

from pipelines.training import PRESETS, TrainSpec, preset
from pipelines.training.config import TUPLE_OPTIONS
from pipelines.training.data import CAPTION_SUFFIXES, SIDECAR_SUFFIXES, read_caption_file
from studio.handlers import html as H
from studio.handlers import plots
from studio.handlers.state import SessionState
from studio.services import Services

MAX_SAMPLES_SHOWN = 12
# the form's prior-preservation choice → TrainSpec.prior_preservation (None: on with a class word, and
# on the pocket model always, with prompts of its own domain)
PRIOR_CHOICES: dict[str, bool | None] = {"the model's default": None, "on": True, "off": False}


@dataclass(frozen=True)
class TrainRequest:
    """What the Train tab's form says (``None``: keep the preset's value)."""

    files: tuple[str, ...]
    trigger: str
    class_word: str = ""
    preset: str = "quick"
    name: str = ""
    captions: dict[str, str] = field(default_factory=dict)  # picture file stem → caption
    steps: int | None = None
    rank: int | None = None
    learning_rate: float | None = None
    resolution: int | None = None
    sample_every: int | None = None
    train_text_encoder: bool | None = None
    prior_preservation: bool | None = None  # None: the model's default (PRIOR_CHOICES)
    options_json: str = ""  # any other TrainSpec option, as JSON


def parse_options(text: str) -> dict[str, Any]:
    """Extra training options from JSON, checked against the TrainSpec's option names."""
    if not (text or "").strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the extra training options are not valid JSON: {exc.msg}") from exc
    if not isinstance(value, dict):
        raise ValueError('the extra training options must be a JSON object like {"rank": 8}')
    known = {f.name for f in fields(TrainSpec)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"unknown training option(s): {', '.join(unknown)}")
    return {k: tuple(v) if k in TUPLE_OPTIONS and isinstance(v, list) else v for k, v in value.items()}


def preset_fields(name: str) -> dict[str, Any]:
    """The form's advanced fields as a preset sets them (resolution 0: the model's own size)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    spec = preset(name, "x")
    return {
        "steps": spec.steps,
        "rank": spec.rank,
        "learning_rate": spec.learning_rate,
        "resolution": spec.resolution or 0,
        "sample_every": spec.sample_every,
        "train_text_encoder": spec.train_text_encoder,
    }


def build_spec(req: TrainRequest) -> TrainSpec:
    """The TrainSpec of a request: the preset, the form's fields, then the extra options."""
    trigger = (req.trigger or "").strip()
    if not trigger:
        raise ValueError("type a trigger word: a rare token that will call up your concept, e.g. 'zq'")
    if req.preset not in PRESETS:
        raise ValueError(f"unknown preset {req.preset!r}; choose one of {', '.join(PRESETS)}")
    overrides: dict[str, Any] = {
        "class_word": (req.class_word or "").strip(),
        "name": (req.name or "").strip(),
    }
    if req.prior_preservation is not None:
        overrides["prior_preservation"] = bool(req.prior_preservation)
    base = preset(req.preset, trigger)
    for key in ("steps", "rank", "learning_rate", "resolution", "sample_every", "train_text_encoder"):
        value = getattr(req, key)
        if key == "train_text_encoder" and value is False and base.train_text_encoder is None:
            continue  # an unticked box on a preset that leaves it to the model: the model's default
        if value is not None:
            overrides[key] = value
    if overrides.get("resolution") == 0:
        overrides["resolution"] = None  # the model's native size
    overrides.update(parse_options(req.options_json))
    if overrides.get("prior_preservation") and not overrides["class_word"]:
        raise ValueError("prior preservation needs a class word (what the concept is: dog, person, style, …)")
    return replace(base, **overrides)


def is_picture(path: str | Path) -> bool:
    """Whether an uploaded file is a picture (not a caption or other sidecar)."""
    return Path(path).suffix.lower() not in SIDECAR_SUFFIXES


def caption_rows(files: Sequence[str]) -> list[list[str]]:
    """One editable row per uploaded picture: [file name, caption] (a same-named ``.txt``, else ``.caption``,
    fills it, read as training reads it: UTF-8, a BOM dropped, another encoding an error naming the file)."""
    texts: dict[str, str] = {}
    for suffix in reversed(CAPTION_SUFFIXES):  # the preferred suffix last, so it wins
        texts |= {Path(f).stem: read_caption_file(Path(f)) for f in files if Path(f).suffix.lower() == suffix}
    return [[Path(f).name, texts.get(Path(f).stem, "")] for f in files if is_picture(f)]


def captions_from_rows(rows: Sequence[Sequence[Any]] | None) -> dict[str, str]:
    """Captions typed in the table → {picture stem: caption} (empty captions are left out)."""
    out = {}
    for row in rows or []:
        if len(row) >= 2 and row[0] and str(row[1] or "").strip():
            out[Path(str(row[0])).stem] = str(row[1]).strip()
    return out


def start_training(
    services: Services, state: SessionState, req: TrainRequest, user: str = ""
) -> tuple[SessionState, str]:
    """Validate the pictures and options, queue the job (``user``: the login, with ``--auth``); returns
    the state (owning the job) and its id."""
    spec = build_spec(req)
    if not req.files:
        raise ValueError("upload the pictures of your concept first (5 to 30 work well)")
    job_id = services.jobs.submit(
        spec, list(req.files), model=services.config.model, captions=req.captions, user=user or None
    )
    return replace(state, jobs=(*state.jobs, job_id)), job_id


@dataclass
class JobView:
    """What the Train tab shows of one job."""

    job_id: str
    status: str
    phase: str
    step: int
    total: int
    loss: float | None
    eta_s: float | None
    reason: str | None
    adapter_id: str | None
    name: str
    progress_html: str
    loss_image: Image.Image | None
    samples: list[tuple[str, str]]

    @property
    def finished(self) -> bool:
        """Whether the job can change no more."""
        return self.status in ("done", "failed", "cancelled")

    def data(self) -> dict[str, Any]:
        """Plain data (the API's view)."""
        return {
            "job_id": self.job_id,
            "name": self.name,
            "status": self.status,
            "phase": self.phase,
            "step": self.step,
            "total": self.total,
            "loss": self.loss,
            "eta_s": self.eta_s,
            "reason": self.reason,
            "adapter_id": self.adapter_id,
            "finished": self.finished,
            "samples": [p for p, _ in self.samples],
        }


def _label(st: Any) -> str:
    parts = [
        f"{st.name}: {st.status}",
        f"{st.phase}" if st.phase and st.phase != st.status else "",
        f"step {st.step}/{st.total}",
        f"loss {st.loss:.4f}" if st.loss is not None else "",
        f"about {st.eta_s:.0f} s left" if st.eta_s and not st.finished else "",
    ]
    return " · ".join(p for p in parts if p)


def sample_pictures(work_dir: str | Path) -> list[tuple[str, str]]:
    """The job's sample pictures so far (newest last) with their step as caption."""
    folder = Path(work_dir) / "samples"
    paths = sorted(folder.glob("step_*.png")) if folder.is_dir() else []
    return [(str(p), f"step {int(p.stem.split('_')[1])}") for p in paths[-MAX_SAMPLES_SHOWN:]]


def job_ref(services: Services, ref: str, user: str = "") -> str:
    """The full id of the job named by ``ref`` (its id or the first characters of it, as tables show);
    with logins (``user`` not empty), only that user's jobs are found."""
    ref = (ref or "").strip()
    if not ref:
        raise ValueError("no training job selected")
    return services.jobs.find(ref, user=user or None)


def job_view(services: Services, job_id: str, user: str = "") -> JobView:
    """The job's progress, loss curve and samples."""
    job_id = job_ref(services, job_id, user)
    st = services.jobs.status(job_id)
    points = services.monitor.losses(job_id)
    loss_img = plots.loss_curve(points, f"{st.name}: loss") if points else None
    curve = Path(st.work_dir) / "loss.png"
    if loss_img is None and st.status == "done" and curve.is_file():
        loss_img = Image.open(curve).convert("RGB")
    text = _label(st)
    if st.reason and st.finished:
        text += f" — {st.reason}"
    fraction = 1.0 if st.status == "done" else st.fraction
    return JobView(
        st.id,
        st.status,
        st.phase,
        st.step,
        st.total,
        st.loss,
        st.eta_s,
        st.reason,
        st.adapter_id,
        st.name,
        H.progress_bar(fraction, text),
        loss_img,
        sample_pictures(st.work_dir),
    )


def cancel_job(services: Services, job_id: str, user: str = "") -> str:
    """Ask a job to stop (a queued one is cancelled at once, one another process runs at its next
    progress report); returns its status."""
    return services.jobs.cancel(job_ref(services, job_id, user)).status


def cancel_notice(services: Services, job_id: str, user: str = "") -> str:
    """Ask a job to stop (:func:`cancel_job`) and say what happened, as the person reads it: a running
    job is still running when this returns (it stops at its next step)."""
    job_id = job_ref(services, job_id, user)
    before = services.jobs.status(job_id)
    if before.finished:
        return f"Job {before.name!r} is {before.status}: nothing to cancel."
    st = services.jobs.cancel(job_id)
    if st.status == "running":
        return f"Stopping job {st.name!r}: it stops at its next step; its checkpoint is kept for Resume."
    if st.status == "cancelled":
        return f"Job {st.name!r} cancelled; Resume queues it again."
    return f"Job {st.name!r} is {st.status}: nothing to cancel."


def resume_job(services: Services, job_id: str, user: str = "") -> str:
    """Queue a cancelled or failed job again from its last checkpoint; returns its status."""
    return services.jobs.resume(job_ref(services, job_id, user)).status


JOB_COLUMNS = ("job", "name", "status", "step", "created", "yours")
# shares of the table's width (the Train tab's column is about 600 px wide): the name wraps, the rest fit
JOB_COLUMN_WIDTHS = ("15%", "24%", "16%", "16%", "19%", "10%")
CREATED_FORMAT = "%m-%d %H:%M"  # month-day hour:minute: the newest jobs, without a year that widens the table


def jobs_table(services: Services, state: SessionState, user: str = "", limit: int = 50) -> list[list[str]]:
    """Rows of :data:`JOB_COLUMNS` for the studio's newest jobs, whoever started them (the CLI too;
    with logins, the user's own): the id's first 8 characters, "yes" for this browser session's."""
    mine = set(state.jobs)
    return [
        [
            st.id[:8],
            st.name,
            st.status,
            f"{st.step}/{st.total}",
            st.created_at.astimezone().strftime(CREATED_FORMAT) if st.created_at else "",
            "yes" if st.id in mine else "",
        ]
        for st in services.jobs.jobs(limit, user=user or None)
    ]


def trained_adapter_ref(services: Services, job_id: str, user: str = "") -> str:
    """The catalog id of a finished job's adapter (an error until the job is done and catalogued)."""
    st = services.jobs.status(job_ref(services, job_id, user))
    if st.status != "done":
        raise ValueError(f"job {st.name!r} is {st.status}; its adapter is in the catalog once it is done")
    if not st.adapter_id:
        raise ValueError(f"job {st.name!r} finished without a catalog entry: {st.reason or 'unknown reason'}")
    return st.adapter_id
