"""Training jobs: a persistent queue in the database, one worker thread per device, cancel, recovery.

``JobRunner.submit`` validates and stores the pictures (content-addressed), writes a ``queued`` row
and wakes the device's worker; the worker trains with ``pipelines.training.train_lora``, writes its
progress into the row, and at the end registers the adapter in the catalog. A job never stays
half-done: on a studio restart a ``running`` job is queued again from its last checkpoint, or marked
``failed`` with the reason when it has none; a cancelled or failed job registers nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from pipelines.images import ImageLimits, ImageUploadError, store_uploads
from pipelines.training import ImageItem, TrainingCancelled, TrainProgress, TrainResult, TrainSpec, train_lora
from pipelines.training.checkpoint import list_checkpoints
from pipelines.training.data import (
    CAPTION_SUFFIXES,
    SIDECAR_SUFFIXES,
    kohya_repeats,
    no_pictures_message,
    picture_files,
    read_caption_file,
)
from pipelines.training.lora_train import resolve_device
from pipelines.training.orthogonal import BasisRegistry, BasisSlot
from studio.config import StudioConfig
from studio.jobs_db import ACTIVE, STATUSES, TrainJobRow, make_engine, make_sessionmaker, utcnow

MAX_IMAGES = 200
STALE_AFTER_S = 1800.0  # a job owned by another host that has not written its row for this long is gone
Trainer = Callable[..., TrainResult]
Registrar = Callable[[StudioConfig, TrainResult, "JobStatus"], str]


@dataclass(frozen=True)
class JobStatus:
    """What the UI and the CLI see of one job."""

    id: str
    name: str
    status: str
    device: str
    model: str
    phase: str
    step: int
    total: int
    loss: float | None
    eta_s: float | None
    sample_path: str | None
    reason: str | None
    out_path: str
    work_dir: str
    adapter_id: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    owner: str | None = None  # "host:pid:start-token:runner-token" of the process that runs it
    user: str | None = None  # who started it in a studio with --auth

    @property
    def finished(self) -> bool:
        """True once the job can change no more (done, failed or cancelled)."""
        return self.status not in ACTIVE

    @property
    def fraction(self) -> float:
        """Steps done as a fraction of all steps."""
        return self.step / self.total if self.total else 0.0


def _status(row: TrainJobRow) -> JobStatus:
    """Copy a row into a DTO (ORM objects never leave this module)."""
    return JobStatus(
        row.id,
        row.name,
        row.status,
        row.device,
        row.model,
        row.phase,
        row.step,
        row.total_steps,
        row.loss,
        row.eta_s,
        row.sample_path,
        row.reason,
        row.out_path,
        row.work_dir,
        row.adapter_id,
        row.created_at,
        row.started_at,
        row.finished_at,
        row.owner,
        row.user,
    )


def _process_start(pid: int) -> str:
    """A token that tells a process from a later one with the same pid (its start tick on Linux)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def owner_alive(owner: str | None, now: datetime, updated_at: datetime | None) -> bool:
    """Whether the process named by ``owner`` may still run the job.

    Same host: its pid exists with the same start token. Another host (a shared database): it wrote
    the row within ``STALE_AFTER_S``. No owner (rows of older versions): gone.
    """
    if not owner:
        return False
    host, pid, start, _ = [*owner.split(":"), "", "", "", ""][:4]
    if host != socket.gethostname():
        if updated_at is None:
            return False
        seen = updated_at if updated_at.tzinfo else updated_at.replace(tzinfo=UTC)
        return (now - seen).total_seconds() < STALE_AFTER_S
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, someone else's
        pass
    return not start or _process_start(int(pid)) in ("", start)


def split_uploads(files: Sequence[str | Path]) -> tuple[list[Path], dict[str, str]]:
    """Pictures and captions from one upload: ``x.txt`` (else ``x.caption``) captions the picture ``x``.

    Captions are keyed by stem and by path without suffix (kohya subfolders may repeat stems).
    """
    pictures: list[Path] = []
    found: dict[str, dict[str, str]] = {suffix: {} for suffix in CAPTION_SUFFIXES}
    for f in map(Path, files):
        if f.suffix.lower() in found:
            text = read_caption_file(f)
            found[f.suffix.lower()][f.stem] = found[f.suffix.lower()][str(f.with_suffix(""))] = text
        elif f.suffix.lower() not in SIDECAR_SUFFIXES:
            pictures.append(f)
    captions: dict[str, str] = {}
    for suffix in reversed(CAPTION_SUFFIXES):
        captions |= found[suffix]
    return pictures, captions


def folder_files(folder: str | Path) -> list[Path]:
    """Every visible file of a picture folder and of its kohya ``N_name`` subfolders (pictures, captions)."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"no such image folder: {root}")
    dirs = [root, *sorted(p for p in root.iterdir() if p.is_dir() and kohya_repeats(p) is not None)]
    files = [p for d in dirs for p in sorted(d.iterdir()) if p.is_file() and not p.name.startswith(".")]
    if not picture_files(files) and (others := [p.name for p in root.iterdir() if p.is_dir()]):
        raise ImageUploadError(no_pictures_message(root, sorted(others)))
    return files


def upload_repeats(picture: Path) -> tuple[int, str]:
    """(repeats, dataset folder) of a picture: kohya's ``N_name`` parent, else (1, "images")."""
    repeats = kohya_repeats(picture.parent)
    return (1, "images") if repeats is None else (repeats, picture.parent.name)


def catalog_registrar(catalog: Any) -> Registrar:
    """A registrar that adds a finished adapter to ``catalog`` (an ``adapters_db.Catalog``): the file,
    its training captions (they feed retrieval) and its sample pictures with their prompts."""

    def register(config: StudioConfig, result: TrainResult, job: JobStatus) -> str:
        import adapters_db

        meta: dict[str, Any] = {"name": job.name, "tags": ["trained"], "source": "trained"}
        if trigger := result.metadata.get("modelspec.trigger_phrase", ""):
            meta["trigger_words"] = [trigger]
        if result.family in adapters_db.FAMILIES:
            meta["base_family"] = result.family
        with catalog.session() as session:
            record = adapters_db.register_trained_adapter(
                session,
                catalog,
                result.kohya_path,
                list(result.captions),
                list(result.sample_images),
                sample_prompts=list(result.sample_prompts),
                **meta,
            )
        return str(record.id)

    return register


def register_in_catalog(config: StudioConfig, result: TrainResult, job: JobStatus) -> str:
    """Register in the catalog at the config's URL and data folder (what the CLI uses)."""
    import adapters_db

    catalog = adapters_db.open_catalog(config.catalog_url, config.data_dir)
    try:
        return catalog_registrar(catalog)(config, result, job)
    finally:
        catalog.dispose()


class JobRunner:
    """The studio's training queue: submit, watch, cancel; one worker thread per device."""

    def __init__(
        self,
        config: StudioConfig,
        *,
        trainer: Trainer = train_lora,
        registrar: Registrar | None = register_in_catalog,
        limits: ImageLimits = ImageLimits(),
        progress_interval_s: float = 1.0,
    ) -> None:
        self.config, self.trainer, self.registrar, self.limits = config, trainer, registrar, limits
        self.progress_interval_s = progress_interval_s
        if config.catalog_url.startswith("sqlite:///"):
            Path(config.catalog_url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.engine = make_engine(config.catalog_url)
        self.sessions = make_sessionmaker(self.engine)
        self.basis = BasisRegistry(config.data_dir / "orthogonal_basis.json")
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._workers: dict[str, threading.Thread] = {}
        self._cancel: dict[str, threading.Event] = {}
        self._stopping = threading.Event()
        pid = os.getpid()
        self.owner = f"{socket.gethostname()}:{pid}:{_process_start(pid)}:{uuid.uuid4().hex[:12]}"
        self._listeners: list[Callable[[str, TrainProgress], None]] = []

    # ---- submitting ------------------------------------------------------------------------
    def store_pictures(
        self, files: Sequence[str | Path], captions: Mapping[str, str] | None = None
    ) -> list[dict[str, Any]]:
        """Validate and store the upload (all or nothing); returns the job's picture manifest."""
        pictures, txt = split_uploads(files)
        given = captions or {}  # the caller's captions (by stem) win over caption files
        if not pictures:
            raise ImageUploadError("no pictures were uploaded")
        if len(pictures) > MAX_IMAGES:
            raise ImageUploadError(f"{len(pictures)} pictures is over the limit of {MAX_IMAGES}")
        stored = store_uploads(pictures, self.config.data_dir / "uploads", self.limits)
        manifest, seen = [], set()
        for src, img in zip(pictures, stored, strict=True):
            repeats, dataset = upload_repeats(src)
            # the same picture uploaded twice counts once; in two kohya subsets it counts in each
            # (as in sd-scripts, where every subset folder lists its own files)
            if (img.sha256, dataset) not in seen:
                seen.add((img.sha256, dataset))
                manifest.append(
                    {
                        "path": str(img.path),
                        "caption": given.get(src.stem, txt.get(str(src.with_suffix("")), txt.get(src.stem))),
                        "name": img.name,
                        "sha256": img.sha256,
                        "repeats": repeats,
                        "dataset": dataset,
                    }
                )
        return manifest

    def submit(
        self,
        spec: TrainSpec,
        files: Sequence[str | Path],
        *,
        model: str | None = None,
        captions: Mapping[str, str] | None = None,
        out: str | Path | None = None,
        device: str | None = None,
        register: bool = True,
        user: str | None = None,
    ) -> str:
        """Queue a training job for uploaded files (pictures and ``.txt`` captions); returns its id.
        ``user``: who starts it, in a studio with logins (they see only their own jobs)."""
        manifest = self.store_pictures(files, captions)
        job_id = uuid.uuid4().hex
        work = self.config.jobs_dir / job_id
        out_path = Path(out) if out is not None else work / f"{spec.output_name}.safetensors"
        dev = str(resolve_device(device or self.config.device))
        row = TrainJobRow(
            id=job_id,
            name=spec.output_name,
            status="queued",
            device=dev,
            model=str(model or self.config.model),
            spec_json=spec.to_json(),
            images_json=json.dumps(manifest),
            work_dir=str(work),
            out_path=str(out_path),
            register=int(register),
            user=user or None,
            total_steps=spec.steps or 0,
            phase="queued",
        )
        with self.sessions() as s, s.begin():
            s.add(row)
        with self._wake:
            self._wake.notify_all()
        return job_id

    # ---- reading ---------------------------------------------------------------------------
    def status(self, job_id: str) -> JobStatus:
        """The job's current state."""
        with self.sessions() as s:
            row = s.get(TrainJobRow, job_id)
            if row is None:
                raise KeyError(f"no such training job: {job_id}")
            return _status(row)

    def jobs(self, limit: int = 50, status: str | None = None, user: str | None = None) -> list[JobStatus]:
        """The newest jobs first (only those with the given status, and of the given user, if given)."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"unknown job status {status!r}: use one of {', '.join(STATUSES)}")
        query = select(TrainJobRow).order_by(TrainJobRow.created_at.desc()).limit(limit)
        if status is not None:
            query = query.where(TrainJobRow.status == status)
        if user is not None:
            query = query.where(TrainJobRow.user == user)
        with self.sessions() as s:
            return [_status(r) for r in s.scalars(query)]

    def find(self, ref: str, user: str | None = None) -> str:
        """The id of the job whose id is ``ref`` or starts with it (the UI and the CLI show 8 characters),
        among the given user's jobs if a user is given; ``KeyError`` when none or several match."""
        ref = ref.strip()
        if not ref:
            raise KeyError("no training job given")
        mine = () if user is None else (TrainJobRow.user == user,)
        with self.sessions() as s:
            if s.scalar(select(TrainJobRow.id).where(TrainJobRow.id == ref, *mine)) is not None:
                return ref
            found = list(
                s.scalars(
                    select(TrainJobRow.id)
                    .where(TrainJobRow.id.startswith(ref, autoescape=True), *mine)
                    .limit(3)
                )
            )
        if len(found) == 1:
            return found[0]
        if not found:
            raise KeyError(f"no such training job: {ref}")
        raise KeyError(f"several training jobs start with {ref!r} ({', '.join(found[:2])}, …); give more")

    def wait(self, job_id: str, timeout: float | None = None, poll: float = 0.05) -> JobStatus:
        """Block until the job has finished (or the timeout passed); returns its state."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not (st := self.status(job_id)).finished:
            if deadline is not None and time.monotonic() > deadline:
                return st
            time.sleep(poll)
        return st

    def add_listener(self, fn: Callable[[str, TrainProgress], None]) -> None:
        """Call ``fn(job_id, progress)`` on every progress report (from the worker thread)."""
        self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[str, TrainProgress], None]) -> None:
        """Stop calling ``fn``."""
        self._listeners.remove(fn)

    # ---- changing --------------------------------------------------------------------------
    def _update(self, job_id: str, **values: Any) -> None:
        """Write some columns of one row."""
        with self.sessions() as s, s.begin():
            s.execute(update(TrainJobRow).where(TrainJobRow.id == job_id).values(**values))

    def cancel(self, job_id: str) -> JobStatus:
        """Cancel a queued job at once, or ask a running one to stop at its next step."""
        with self.sessions() as s, s.begin():
            queued = (TrainJobRow.id == job_id, TrainJobRow.status == "queued")
            done = s.execute(
                update(TrainJobRow)
                .where(*queued)
                .values(
                    status="cancelled",
                    phase="cancelled",
                    finished_at=utcnow(),
                    reason="cancelled before it started",
                )
            )
        status = self.status(job_id)
        if done.rowcount == 0 and status.status == "running":
            if job_id in self._cancel or status.owner == self.owner:  # this process runs it
                self._cancel.setdefault(job_id, threading.Event()).set()
            elif self.live_elsewhere(job_id):  # another one does: it reads this with its next progress write
                self._update(job_id, cancel_requested=1)
            else:  # the process that ran it is gone; a restart would otherwise resume it
                self._stop_orphan(job_id)
        return self.status(job_id)

    def _stop_orphan(self, job_id: str) -> None:
        """Mark a ``running`` job whose process is gone cancelled (its checkpoints stay for a resume)."""
        with self.sessions() as s, s.begin():
            s.execute(
                update(TrainJobRow)
                .where(TrainJobRow.id == job_id, TrainJobRow.status == "running")
                .values(
                    status="cancelled",
                    phase="cancelled",
                    finished_at=utcnow(),
                    reason="cancelled after the process that ran it had stopped; its checkpoints are kept",
                )
            )

    def resume(self, job_id: str) -> JobStatus:
        """Queue a cancelled or failed job again; it continues from its newest checkpoint."""
        with self.sessions() as s, s.begin():
            res = s.execute(
                update(TrainJobRow)
                .where(TrainJobRow.id == job_id, TrainJobRow.status.in_(("cancelled", "failed")))
                .values(
                    status="queued",
                    phase="queued",
                    finished_at=None,
                    reason="resumed on request",
                    cancel_requested=0,
                )
            )
        if res.rowcount == 0:
            raise ValueError(f"job {job_id} is not cancelled or failed; nothing to resume")
        with self._wake:
            self._wake.notify_all()
        return self.status(job_id)

    def recover(self) -> list[JobStatus]:
        """After a restart: queue ``running`` jobs again from their checkpoint, or fail them with why.

        Only jobs whose owning process is gone: one still running in another process (another CLI
        run, the web UI) is left alone.
        """
        with self.sessions() as s:
            rows = list(s.scalars(select(TrainJobRow).where(TrainJobRow.status == "running")))
        now = utcnow()
        rows = [r for r in rows if r.owner != self.owner and not self._owned_elsewhere(r, now)]
        for row in rows:
            ck = list_checkpoints(Path(row.work_dir) / "checkpoints")
            if row.cancel_requested:  # asked to stop before its process went away
                self._stop_orphan(row.id)
            elif ck:
                self._update(
                    row.id,
                    status="queued",
                    phase="queued",
                    reason=f"the studio restarted; resuming from the checkpoint at step {ck[-1][0]}",
                )
            else:
                self._update(
                    row.id,
                    status="failed",
                    phase="failed",
                    finished_at=utcnow(),
                    reason="the studio stopped while this job ran, before its first checkpoint",
                )
                self._release_basis(row.id, keep=False)
        return [self.status(r.id) for r in rows]

    def _owned_elsewhere(self, row: TrainJobRow, now: datetime) -> bool:
        """Whether another live process (not another runner of this one) runs the row's job."""
        mine = f"{socket.gethostname()}:{os.getpid()}:"
        if row.owner and row.owner.startswith(mine):
            return False  # an earlier runner of this very process (the studio restarted in-process)
        return owner_alive(row.owner, now, row.updated_at)

    def live_elsewhere(self, job_id: str) -> str | None:
        """The owner of a job that another live process is running now, else None."""
        with self.sessions() as s:
            row = s.get(TrainJobRow, job_id)
            if row is None or row.status != "running" or row.owner == self.owner:
                return None
            return row.owner if self._owned_elsewhere(row, utcnow()) else None

    # ---- workers ---------------------------------------------------------------------------
    def start(self) -> JobRunner:
        """Recover interrupted jobs and start a worker for every device that has queued jobs."""
        self._stopping.clear()
        self.recover()
        with self.sessions() as s:
            devices = set(s.scalars(select(TrainJobRow.device).where(TrainJobRow.status == "queued")))
        for dev in devices | {str(resolve_device(self.config.device))}:
            self._ensure_worker(dev)
        return self

    def _ensure_worker(self, device: str) -> None:
        """One daemon thread per device."""
        with self._lock:
            if device in self._workers and self._workers[device].is_alive():
                return
            t = threading.Thread(target=self._work, args=(device,), name=f"train-{device}", daemon=True)
            self._workers[device] = t
            t.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the workers; a running job checkpoints and goes back to the queue."""
        self._stopping.set()
        for event in list(self._cancel.values()):
            event.set()
        with self._wake:
            self._wake.notify_all()
        for t in list(self._workers.values()):
            t.join(timeout)
        self._workers.clear()

    def _claim(self, device: str | None, job_id: str | None = None) -> str | None:
        """Mark one queued job running (the given one, or this device's oldest); returns its id."""
        with self.sessions() as s, s.begin():
            if job_id is None:
                job_id = s.scalar(
                    select(TrainJobRow.id)
                    .where(TrainJobRow.status == "queued", TrainJobRow.device == device)
                    .order_by(TrainJobRow.created_at)
                    .limit(1)
                )
            if job_id is None:
                return None
            queued = (TrainJobRow.id == job_id, TrainJobRow.status == "queued")
            res = s.execute(
                update(TrainJobRow)
                .where(*queued)
                .values(
                    status="running",
                    phase="starting",
                    started_at=utcnow(),
                    attempts=TrainJobRow.attempts + 1,
                    owner=self.owner,
                    cancel_requested=0,
                )
            )
            return job_id if res.rowcount == 1 else None

    def _work(self, device: str) -> None:
        """Worker loop: claim, run, repeat; sleep on the condition when the queue is empty."""
        while not self._stopping.is_set():
            job_id = self._claim(device)
            if job_id is None:
                with self._wake:
                    self._wake.wait(timeout=1.0)
                continue
            try:
                self.run_job(job_id, claimed=True)
            except Exception as exc:  # the bookkeeping itself failed (e.g. the database): record it if we can
                with contextlib.suppress(Exception):
                    self._update(
                        job_id,
                        status="failed",
                        phase="failed",
                        finished_at=utcnow(),
                        reason=f"internal error: {type(exc).__name__}: {exc}",
                    )

    # ---- running one job -------------------------------------------------------------------
    def run_job(
        self, job_id: str, progress: Callable[[TrainProgress], None] | None = None, claimed: bool = False
    ) -> JobStatus:
        """Train one queued job in this thread (the CLI's way; workers pass ``claimed``); record the end."""
        if not claimed and self._claim(None, job_id) is None:
            raise ValueError(f"job {job_id} is not queued (it is {self.status(job_id).status})")
        job = self.status(job_id)
        event = self._cancel.setdefault(job_id, threading.Event())
        try:
            result = self._train(job, event, progress)
        except TrainingCancelled as exc:
            self._ended_cancelled(job, exc.step)
        except Exception as exc:  # every failure is recorded with its reason
            self._ended_failed(job, f"{type(exc).__name__}: {exc}")
        else:
            self._ended_done(job, result)
        finally:
            self._cancel.pop(job_id, None)
        return self.status(job_id)

    def _train(
        self, job: JobStatus, event: threading.Event, progress: Callable[[TrainProgress], None] | None
    ) -> TrainResult:
        """Call the trainer with the job's spec, pictures, work folder, device and basis."""
        with self.sessions() as s:
            row = s.get(TrainJobRow, job.id)
            spec, manifest = TrainSpec.from_json(row.spec_json), json.loads(row.images_json)
        items = [
            ImageItem(Path(m["path"]), m["caption"], m.get("repeats", 1), m.get("dataset", "images"))
            for m in manifest
        ]
        basis: Callable[[str], BasisSlot] | None = None
        if spec.orthogonal:

            def basis(family: str) -> BasisSlot:
                return self.basis.allocate(family, job.id, spec.rank)

        return self.trainer(
            spec,
            job.model,
            items,
            Path(job.out_path),
            work_dir=Path(job.work_dir),
            device=job.device,
            progress=self._progress_fn(job.id, progress, event),
            cancel=event,
            basis=basis,
            limits=self.limits,
        )

    def _progress_fn(
        self,
        job_id: str,
        extra: Callable[[TrainProgress], None] | None,
        cancel: threading.Event | None = None,
    ) -> Callable[[TrainProgress], None]:
        """A progress callback that writes the row (at most once per interval), sets ``cancel`` when
        another process asked the job to stop, and tells listeners."""
        last = {"t": 0.0, "phase": ""}

        def report(p: TrainProgress) -> None:
            now = time.monotonic()
            if p.phase != last["phase"] or now - last["t"] >= self.progress_interval_s or p.step == p.total:
                last.update(t=now, phase=p.phase)
                if self._write_progress(job_id, p) and cancel is not None:
                    cancel.set()
            for fn in self._listeners:
                fn(job_id, p)
            if extra is not None:
                extra(p)

        return report

    def _write_progress(self, job_id: str, p: TrainProgress) -> bool:
        """Write the job's progress columns; returns whether a stop was requested from elsewhere."""
        with self.sessions() as s, s.begin():
            s.execute(
                update(TrainJobRow)
                .where(TrainJobRow.id == job_id)
                .values(
                    phase=p.phase,
                    step=p.step,
                    total_steps=p.total,
                    loss=p.loss,
                    eta_s=p.eta_s,
                    sample_path=None if p.sample_path is None else str(p.sample_path),
                )
            )
            return bool(s.scalar(select(TrainJobRow.cancel_requested).where(TrainJobRow.id == job_id)))

    def _ended_done(self, job: JobStatus, result: TrainResult) -> None:
        """Register the adapter (when asked) and mark the job done, or failed if registering failed."""
        adapter_id, reason = None, None
        if self.registrar is not None and self._wants_registration(job.id):
            try:
                adapter_id = self.registrar(self.config, result, job)
            except Exception as exc:
                self._update(
                    job.id,
                    status="failed",
                    phase="failed",
                    finished_at=utcnow(),
                    reason=f"trained and saved to {result.kohya_path}, but catalog registration "
                    f"failed: {type(exc).__name__}: {exc}",
                )
                return
        else:
            reason = "not registered in the catalog (registration was not requested)"
        self._update(
            job.id,
            status="done",
            phase="done",
            step=result.steps,
            total_steps=result.steps,
            loss=result.losses[-1] if result.losses else None,
            eta_s=0.0,
            finished_at=utcnow(),
            out_path=str(result.kohya_path),
            adapter_id=adapter_id,
            reason=reason,
            sample_path=str(result.sample_images[-1]) if result.sample_images else None,
        )

    def _wants_registration(self, job_id: str) -> bool:
        """Whether the job was submitted with ``register=True``."""
        with self.sessions() as s:
            return bool(s.get(TrainJobRow, job_id).register)

    def _ended_cancelled(self, job: JobStatus, step: int) -> None:
        """Back to the queue when the studio is stopping, else cancelled (checkpoint kept for resume)."""
        if self._stopping.is_set():
            self._update(
                job.id,
                status="queued",
                phase="queued",
                reason=f"the studio stopped; resumes from step {step}",
            )
            return
        self._update(
            job.id,
            status="cancelled",
            phase="cancelled",
            step=step,  # the last progress write may be up to an interval older
            finished_at=utcnow(),
            reason=f"cancelled at step {step}; its checkpoint is kept, so it can be resumed",
        )
        self._release_basis(job.id, keep=True)

    def _ended_failed(self, job: JobStatus, reason: str) -> None:
        """Record the failure (the trainer writes its outputs only at the very end, atomically)."""
        self._update(job.id, status="failed", phase="failed", finished_at=utcnow(), reason=reason)
        self._release_basis(job.id, keep=bool(list_checkpoints(Path(job.work_dir) / "checkpoints")))

    def _release_basis(self, job_id: str, keep: bool) -> None:
        """Free the job's orthogonal block unless a checkpoint still uses it."""
        if not keep:
            self.basis.release(job_id)
