"""The job runner: queue, progress, cancel, bad uploads, recovery after a crash, graceful stop."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

import adapters_db
from pipelines.images import ImageUploadError
from pipelines.training import TrainProgress, TrainResult
from pipelines.training.checkpoint import list_checkpoints
from studio.config import StudioConfig
from studio.jobs import JobRunner, JobStatus, catalog_registrar, folder_files
from studio.jobs_db import TrainJobRow
from tests.training.conftest import fast_spec
from tests.training.test_images import huge_png

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def config(tmp_path: Path, tiny_pipeline_dir: Path) -> StudioConfig:
    return StudioConfig(data_dir=tmp_path / "data", model=str(tiny_pipeline_dir), device="cpu")


@pytest.fixture()
def catalog(config: StudioConfig) -> Iterator[adapters_db.Catalog]:
    """The real catalog on the same database (hashing embedder: no model to load)."""
    cat = adapters_db.open_catalog(config.catalog_url, config.data_dir, embedder="hashing")
    yield cat
    cat.dispose()


def catalogued(catalog: adapters_db.Catalog) -> list[adapters_db.AdapterRecord]:
    with catalog.session() as s:
        return list(adapters_db.list_adapters(s, catalog, include_nsfw=True, limit=100).items)


def test_jobs_run_one_at_a_time_and_record_progress(
    config: StudioConfig, concept_dir: Path, catalog: adapters_db.Catalog
) -> None:
    runner = JobRunner(config, registrar=catalog_registrar(catalog), progress_interval_s=0.0)
    seen: list[tuple[str, str, int]] = []
    runner.add_listener(lambda job_id, p: seen.append((job_id, p.phase, p.step)))
    first = runner.submit(fast_spec(steps=2), folder_files(concept_dir))
    second = runner.submit(fast_spec(steps=2, name="again"), folder_files(concept_dir))
    assert runner.status(first).status == "queued"
    runner.start()
    try:
        a, b = runner.wait(first, timeout=600), runner.wait(second, timeout=600)
    finally:
        runner.stop()
    assert (a.status, b.status) == ("done", "done"), (a.reason, b.reason)
    assert b.started_at >= a.finished_at  # one worker per device: the queue waits
    assert (a.step, a.total) == (2, 2) and a.adapter_id and b.adapter_id and a.adapter_id != b.adapter_id
    assert a.loss is not None and Path(a.sample_path).is_file() and Path(a.out_path).is_file()
    records = {str(r.id): r for r in catalogued(catalog)}
    assert set(records) == {a.adapter_id, b.adapter_id}
    rec = records[a.adapter_id]
    assert rec.name == "zq" and rec.source == "trained" and "zq" in rec.trigger_words and rec.has_local_file
    assert (first, "training", 2) in seen and (first, "done", 2) in seen
    stored = list((config.data_dir / "uploads").rglob("*.png"))
    assert len(stored) == 7  # content-addressed: the second job reused the first job's files


def test_cancel_running_job_registers_nothing_and_can_resume(
    config: StudioConfig, concept_dir: Path, catalog: adapters_db.Catalog
) -> None:
    runner = JobRunner(config, registrar=catalog_registrar(catalog), progress_interval_s=0.0)

    def cancel_at_two(job_id: str, p: TrainProgress) -> None:
        if p.phase == "training" and p.step == 2:
            runner.cancel(job_id)

    runner.add_listener(cancel_at_two)
    job = runner.submit(fast_spec(steps=6, checkpoint_every=2), folder_files(concept_dir))
    status = runner.run_job(job)
    assert status.status == "cancelled" and "cancelled at step 2" in status.reason
    assert not Path(status.out_path).exists() and catalogued(catalog) == []
    assert list_checkpoints(Path(status.work_dir) / "checkpoints")[-1][0] == 2
    runner.remove_listener(cancel_at_two)
    runner.resume(job)
    done = runner.run_job(job)
    assert done.status == "done" and [str(r.id) for r in catalogued(catalog)] == [done.adapter_id]


def test_cancel_queued_job(config: StudioConfig, concept_dir: Path) -> None:
    runner = JobRunner(config, registrar=None)
    job = runner.submit(fast_spec(steps=2), folder_files(concept_dir))
    st = runner.cancel(job)
    assert st.status == "cancelled" and st.reason == "cancelled before it started" and st.finished
    with pytest.raises(ValueError, match="is not queued"):
        runner.run_job(job)


def test_bad_uploads_are_refused_with_reasons_and_store_nothing(
    config: StudioConfig, tmp_path: Path, concept_dir: Path
) -> None:
    runner = JobRunner(config, registrar=None)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "zero.png").write_bytes(b"")
    (bad / "letter.jpg").write_text("Dear studio, this is not a picture.")
    (bad / "bomb.png").write_bytes(huge_png(20000))
    with pytest.raises(ImageUploadError) as err:
        runner.submit(fast_spec(), [*folder_files(concept_dir), *folder_files(bad)])
    message = str(err.value)
    assert "zero.png: the file is empty" in message and "letter.jpg: not a PNG" in message
    assert "bomb.png: refused as a decompression bomb" in message
    assert not (config.data_dir / "uploads").exists()
    assert runner.jobs() == []
    with pytest.raises(ImageUploadError, match="no pictures were uploaded"):
        runner.submit(fast_spec(), [])


def test_unregistered_and_failed_jobs_say_why(config: StudioConfig, concept_dir: Path) -> None:
    def broken(config: StudioConfig, result: TrainResult, job: JobStatus) -> str:
        raise ConnectionError("catalog database is gone")

    runner = JobRunner(config, registrar=broken)
    plain = runner.submit(fast_spec(steps=1), folder_files(concept_dir), register=False)
    st = runner.run_job(plain)
    assert st.status == "done" and st.adapter_id is None and "not registered" in st.reason
    job = runner.submit(fast_spec(steps=1, name="b"), folder_files(concept_dir))
    st = runner.run_job(job)
    assert st.status == "failed" and "catalog registration failed: ConnectionError" in st.reason
    assert Path(st.out_path).is_file() and str(st.out_path) in st.reason  # the trained file is kept
    missing = runner.submit(fast_spec(steps=1, name="c"), folder_files(concept_dir), model="/nowhere/model")
    st = runner.run_job(missing)
    assert st.status == "failed"
    assert st.reason.startswith("FileNotFoundError: not a diffusers pipeline folder")


def test_a_killed_studio_resumes_or_fails_its_jobs_on_restart(
    config: StudioConfig, concept_dir: Path
) -> None:
    runner = JobRunner(config, registrar=None)
    with_ckpt = runner.submit(fast_spec(steps=6, checkpoint_every=2), folder_files(concept_dir))
    script = f"""
import os, signal, torch
from pathlib import Path
from studio.config import StudioConfig
from studio.jobs import JobRunner
cfg = StudioConfig(data_dir=Path({str(config.data_dir)!r}), model={config.model!r}, device="cpu")
runner = JobRunner(cfg, registrar=None)
def die(p):
    if p.phase == "training" and p.step == 3:
        os.kill(os.getpid(), signal.SIGKILL)
runner.run_job({with_ckpt!r}, progress=die)
"""
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert runner.status(with_ckpt).status == "running"  # what a crash leaves behind
    no_ckpt = runner.submit(fast_spec(steps=6, name="early"), folder_files(concept_dir))
    assert runner._claim("cpu") == no_ckpt  # claimed, then the studio "dies" before any checkpoint

    restarted = JobRunner(config, registrar=None)
    recovered = {s.id: s for s in restarted.recover()}
    assert recovered[with_ckpt].status == "queued"
    assert "resuming from the checkpoint at step 2" in recovered[with_ckpt].reason
    assert recovered[no_ckpt].status == "failed"
    assert "before its first checkpoint" in recovered[no_ckpt].reason
    done = restarted.run_job(with_ckpt)
    assert done.status == "done" and Path(done.out_path).is_file()
    with restarted.sessions() as s:
        assert s.scalar(select(TrainJobRow.attempts).where(TrainJobRow.id == with_ckpt)) == 2


def test_stopping_the_studio_requeues_the_running_job(config: StudioConfig, concept_dir: Path) -> None:
    runner = JobRunner(config, registrar=None, progress_interval_s=0.0)
    reached = threading.Event()
    runner.add_listener(lambda job_id, p: reached.set() if p.phase == "training" and p.step >= 2 else None)
    job = runner.submit(fast_spec(steps=6, checkpoint_every=2), folder_files(concept_dir))
    runner.start()
    assert reached.wait(600)
    runner.stop()
    st = runner.status(job)
    assert st.status == "queued" and "the studio stopped; resumes from step" in st.reason
    again = JobRunner(config, registrar=None).start()
    try:
        assert again.wait(job, timeout=600).status == "done"
    finally:
        again.stop()
