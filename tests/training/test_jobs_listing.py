"""Jobs across processes: ``studio jobs`` lists, shows and cancels them; a cancel reaches a job another
process trains; ids by prefix; logins see their own jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select, update

from pipelines.training.checkpoint import list_checkpoints
from studio.cli import main
from studio.config import StudioConfig
from studio.handlers import train as T
from studio.handlers.state import SessionState
from studio.jobs import JobRunner, folder_files
from studio.jobs_db import TrainJobRow
from tests.training.conftest import fast_spec

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def config(tmp_path: Path, tiny_pipeline_dir: Path) -> StudioConfig:
    return StudioConfig(data_dir=tmp_path / "data", model=str(tiny_pipeline_dir), device="cpu")


def test_a_cancel_from_another_process_stops_the_running_job(
    config: StudioConfig, concept_dir: Path, tmp_path: Path
) -> None:
    runner = JobRunner(config, registrar=None)
    job = runner.submit(fast_spec(steps=8, checkpoint_every=2), folder_files(concept_dir))
    at_two, go = tmp_path / "at_two", tmp_path / "go"
    script = f"""
import time
from pathlib import Path
from studio.config import StudioConfig
from studio.jobs import JobRunner
cfg = StudioConfig(data_dir=Path({str(config.data_dir)!r}), model={config.model!r}, device="cpu")
runner = JobRunner(cfg, registrar=None, progress_interval_s=0.0)
def hold(p):
    if p.phase == "training" and p.step == 2 and not Path({str(go)!r}).exists():
        Path({str(at_two)!r}).touch()
        while not Path({str(go)!r}).exists():
            time.sleep(0.05)
print(runner.run_job({job!r}, progress=hold).status)
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 300
        while not at_two.exists():
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        st = runner.cancel(job)  # another runner, in this process: the other one trains it
        assert st.status == "running"
        go.touch()
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert out.strip() == "cancelled"
    st = runner.status(job)
    assert st.status == "cancelled" and 2 < st.step < 8, (st.step, st.reason)
    assert st.reason.startswith(f"cancelled at step {st.step};")  # the row's step is where it stopped
    assert list_checkpoints(Path(st.work_dir) / "checkpoints")  # resumable
    runner.resume(job)
    with runner.sessions() as s:  # the request does not outlive the cancel it caused
        assert not s.scalar(select(TrainJobRow.cancel_requested).where(TrainJobRow.id == job))


def test_cancelling_a_job_whose_process_is_gone(config: StudioConfig, concept_dir: Path) -> None:
    first = JobRunner(config, registrar=None)
    job = first.submit(fast_spec(), folder_files(concept_dir))
    assert first._claim("cpu") == job  # claimed, then its runner is gone without running it
    st = JobRunner(config, registrar=None).cancel(job)
    assert st.status == "cancelled" and "process that ran it had stopped" in st.reason
    # a request made while the owner lived, which then died before reading it: a restart obeys it
    other = first.submit(fast_spec(name="two"), folder_files(concept_dir))
    assert first._claim("cpu") == other
    with first.sessions() as s, s.begin():
        s.execute(update(TrainJobRow).where(TrainJobRow.id == other).values(cancel_requested=1))
    recovered = {r.id: r for r in JobRunner(config, registrar=None).recover()}
    assert recovered[other].status == "cancelled"


def test_jobs_by_prefix_and_by_user(config: StudioConfig, concept_dir: Path) -> None:
    runner = JobRunner(config, registrar=None)
    alice = runner.submit(fast_spec(name="alice-cat"), folder_files(concept_dir), user="alice")
    bob = runner.submit(fast_spec(name="bob-dog"), folder_files(concept_dir), user="bob")
    cli = runner.submit(fast_spec(name="cli-job"), folder_files(concept_dir))
    assert runner.find(alice[:8]) == alice and runner.find(f"  {bob}  ") == bob
    with pytest.raises(KeyError, match="no such training job"):
        runner.find("zz")
    with pytest.raises(KeyError, match="no such training job"):
        runner.find("%")  # LIKE wildcards are literal
    with pytest.raises(KeyError, match="no such training job"):
        runner.find(alice[:8], user="bob")
    assert [j.name for j in runner.jobs(user="alice")] == ["alice-cat"]
    assert {j.name for j in runner.jobs()} == {"alice-cat", "bob-dog", "cli-job"}
    runner.cancel(cli)
    assert [j.id for j in runner.jobs(status="cancelled")] == [cli]
    with pytest.raises(ValueError, match="unknown job status"):
        runner.jobs(status="finished")
    # the Train tab: without logins every job (the CLI's too), this session's marked; with, one's own
    services = type("S", (), {"jobs": runner})()
    state = SessionState(jobs=(bob,))
    rows = T.jobs_table(services, state)  # type: ignore[arg-type]
    assert [(r[0], r[1], r[5]) for r in rows] == [
        (cli[:8], "cli-job", ""),
        (bob[:8], "bob-dog", "yes"),
        (alice[:8], "alice-cat", ""),
    ]
    assert [r[1] for r in T.jobs_table(services, state, user="alice")] == ["alice-cat"]  # type: ignore[arg-type]
    with pytest.raises(KeyError):
        T.job_view(services, bob[:8], user="alice")  # type: ignore[arg-type]
    with pytest.raises(KeyError):
        T.cancel_job(services, bob, user="alice")  # type: ignore[arg-type]
    assert runner.status(bob).status == "queued"


def test_studio_jobs_command(
    config: StudioConfig, concept_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runner = JobRunner(config, registrar=None)
    done = runner.submit(fast_spec(steps=2, name="finished"), folder_files(concept_dir))
    assert runner.run_job(done).status == "done"
    queued = runner.submit(fast_spec(name="waiting"), folder_files(concept_dir))
    data = ["--data-dir", str(config.data_dir)]
    assert main(["jobs", *data]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["job", "name", "status", "step", "loss", "created", "result"]
    assert lines[1].split()[:4] == [queued[:8], "waiting", "queued", "0/4"]
    assert lines[2].split()[:4] == [done[:8], "finished", "done", "2/2"]
    assert lines[2].endswith(runner.status(done).out_path)
    assert main(["jobs", "list", "--status", "done", "--json", *data]) == 0
    (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert record["id"] == done and record["step"] == 2 and record["loss"] is not None
    assert main(["jobs", *data, "cancel", queued[:6]]) == 0  # --data-dir before the action counts
    assert "cancelled" in capsys.readouterr().out
    assert runner.status(queued).status == "cancelled"
    assert main(["jobs", "show", queued[:8], *data]) == 0
    shown = capsys.readouterr().out
    assert f"id: {queued}" in shown and "resume with: python -m studio train --resume " + queued in shown
    assert main(["jobs", "cancel", queued, *data]) == 2
    assert "already cancelled" in capsys.readouterr().err
    assert main(["jobs", "show", "nothing", *data]) == 2
    assert "no such training job: nothing" in capsys.readouterr().err
    assert main(["jobs", "--limit", "0", *data]) == 2
