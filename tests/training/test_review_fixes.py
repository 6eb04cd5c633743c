"""Regression tests for the trainer bugs found in review (cache, prior prompts, pictures, captions, CLI)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pipelines.training import TrainSpec
from pipelines.training.data import (
    Example,
    ImageItem,
    LatentCache,
    caption_for,
    items_from_folder,
    load_pixels,
    prepare_examples,
)


class _FakeVae(torch.nn.Module):
    """Stands in for a VAE: the latent is the picture's mean per channel, no randomness."""

    class _Dist:
        def __init__(self, x: torch.Tensor) -> None:
            self.x = x

        def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
            return self.x

    class _Out:
        def __init__(self, x: torch.Tensor) -> None:
            self.latent_dist = _FakeVae._Dist(x)

    def __init__(self) -> None:
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))
        self.config = type("C", (), {"scaling_factor": 1.0, "shift_factor": None})()
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def encode(self, pixels: torch.Tensor) -> _FakeVae._Out:
        return self._Out(pixels.mean(dim=(2, 3), keepdim=True))


def _pictures(folder: Path, n: int = 2) -> list[Example]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        path = folder / f"p{i}.png"
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
        out.append(Example(path, "zq", (16, 16), (16, 16), (0, 0)))
    return out


# 1 -------------------------------------------------------------------------------------------------
def test_latent_cache_is_written_atomically_and_a_broken_one_is_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    examples = _pictures(tmp_path / "pics")
    path = tmp_path / "work" / "latents.safetensors"
    written: list[str] = []
    import pipelines.training.data as data

    real = data.save_file
    monkeypatch.setattr(data, "save_file", lambda t, f: (written.append(str(f)), real(t, f))[1])
    LatentCache(_FakeVae(), examples, 0, path).fill()
    assert written and all(Path(f) != path for f in written)  # a temporary file, then a rename
    assert set(load_file(str(path))) == {"0", "1"}
    assert not [p for p in path.parent.iterdir() if p != path]  # no temporary left behind
    path.write_bytes(path.read_bytes()[:20])  # a crash mid-write of an old build
    with caplog.at_level("WARNING"):
        cache = LatentCache(_FakeVae(), examples, 0, path)
    assert "rebuilding" in caplog.text and cache.latents == {}
    cache.fill()
    assert set(load_file(str(path))) == {"0", "1"}


# 2 -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("caption", "class_word", "expected"),
    [
        ("zqx, red star, black background", "star", "star, red star, black background"),
        ("zqx, red star, black background", "", "red star, black background"),
        ("a zqx dog, sitting", "dog", "a dog, sitting"),
        ("a dog zqx, sitting", "dog", "a dog, sitting"),
        ("a photo of zqx", "dog", "a photo of dog"),
        ("a photo of zqx.", "dog", "a photo of dog."),
        ("zqxy on zqx", "dog", "zqxy on dog"),
        ("a red zqx on a white background", "", "a red on a white background"),
    ],
)
def test_prior_prompts_drop_the_trigger_in_comma_tags(caption: str, class_word: str, expected: str) -> None:
    spec = TrainSpec(trigger="zqx", class_word=class_word)
    prompt = spec.prior_prompt(caption)
    assert prompt == expected
    assert "zqx," not in prompt and " zqx" not in f" {prompt}".replace("zqxy", "")


# 3 -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path: Path, mode: str) -> None:
    value = 32768  # mid grey in 16 bits
    arr = np.full((16, 16), value, dtype=np.uint16)
    img = Image.fromarray(arr) if mode == "I;16" else Image.fromarray(arr.astype(np.int32), mode="I")
    path = tmp_path / "g16.png"
    img.save(path)
    spec = TrainSpec(trigger="zq")
    (ex,) = prepare_examples([ImageItem(path, None)], spec, [(16, 16)])
    pixels = load_pixels(ex)
    assert pixels.shape == (3, 16, 16)
    assert abs(float(pixels.mean())) < 0.05  # mid grey → about 0 in [-1, 1], not white (1.0)


# 6 -------------------------------------------------------------------------------------------------
def _pic(path: Path) -> None:
    Image.new("RGB", (16, 16), (10, 20, 30)).save(path)


def test_kohya_caption_quirks(tmp_path: Path) -> None:
    _pic(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("\ufeffzqx, red star".encode())
    _pic(tmp_path / "b.png")
    (tmp_path / "b.caption").write_text("zqx, blue ring", encoding="utf-8")
    items = {i.path.name: i.caption for i in items_from_folder(tmp_path)}
    assert items == {"a.png": "zqx, red star", "b.png": "zqx, blue ring"}
    spec = TrainSpec(trigger="zqx")
    assert caption_for(ImageItem(tmp_path / "a.png", "\ufeffzqx, star"), spec) == "zqx, star"
    (tmp_path / "b.txt").write_bytes("zqx, caf\xe9".encode("cp1252"))
    with pytest.raises(ValueError, match=r"b\.txt.*not UTF-8"):
        items_from_folder(tmp_path)


# 8 -------------------------------------------------------------------------------------------------
def test_a_resolution_off_the_models_grid_is_refused() -> None:
    from pipelines.tiny import build_tiny_pipeline
    from pipelines.training.lora_train import Geometry

    pipe = build_tiny_pipeline()
    assert Geometry.of(pipe, TrainSpec(trigger="zq", resolution=32)).resolution == 32
    with pytest.raises(ValueError, match=r"resolution 30 is not a multiple of 4 px.*use 28 or 32"):
        Geometry.of(pipe, TrainSpec(trigger="zq", resolution=30))


# 9 -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("images", "batches_per_epoch", "batch", "accum", "steps", "epochs"),
    [
        (6, 1, 8, 1, 2, 2),  # the batch holds every picture: one step is one epoch
        (6, 6, 1, 1, 2, 1),  # a third of an epoch
        (6, 3, 2, 2, 3, 2),  # 6 micro-batches over 3 per epoch
        (7, 2, 4, 1, 5, 3),
    ],
)
def test_epochs_count_micro_batches_run(
    images: int, batches_per_epoch: int, batch: int, accum: int, steps: int, epochs: int
) -> None:
    from pipelines.training.metadata import RunInfo, kohya_metadata

    spec = TrainSpec(trigger="zq", batch_size=batch, grad_accum=accum, steps=steps, learning_rate=1e-4)
    info = RunInfo("pocket", "m", (32, 32), "epsilon", images, 0, batches_per_epoch, steps, 0.0, 1.0, 0.1, ())
    meta = kohya_metadata(spec, info)
    assert (meta["ss_epoch"], meta["ss_num_epochs"]) == (str(epochs), str(epochs))


def test_uploads_take_kohya_captions_too(tmp_path: Path) -> None:
    from studio.jobs import folder_files, split_uploads

    _pic(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("\ufeffzqx, red star".encode())
    (tmp_path / "a.caption").write_text("ignored: the .txt wins", encoding="utf-8")
    _pic(tmp_path / "b.png")
    (tmp_path / "b.caption").write_text("zqx, blue ring", encoding="utf-8")
    pictures, captions = split_uploads(folder_files(tmp_path))
    assert [p.name for p in pictures] == ["a.png", "b.png"]
    assert (captions["a"], captions["b"]) == ("zqx, red star", "zqx, blue ring")
    assert captions[str(tmp_path / "b")] == "zqx, blue ring"
    (tmp_path / "b.caption").write_bytes("zqx, caf\xe9".encode("cp1252"))
    with pytest.raises(ValueError, match=r"b\.caption.*not UTF-8"):
        split_uploads(folder_files(tmp_path))


# 4, 5, 10: the CLI and the job rows ----------------------------------------------------------------
def _cancel_instead_of_training(monkeypatch: pytest.MonkeyPatch) -> None:
    from studio.jobs import JobRunner

    monkeypatch.setattr(
        JobRunner, "run_job", lambda self, job_id, progress=None, claimed=False: self.cancel(job_id)
    )


def test_a_relative_data_dir_is_stored_absolute_and_the_hint_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from studio.cli import main
    from studio.config import StudioConfig
    from studio.jobs import JobRunner

    pics = tmp_path / "pics"
    pics.mkdir()
    _pic(pics / "a.png")
    monkeypatch.chdir(tmp_path)
    _cancel_instead_of_training(monkeypatch)
    argv = ["train", "--images", "pics", "--trigger", "zq", "--data-dir", "rel", "--out", "o.safetensors"]
    assert main([*argv, "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    data = (tmp_path / "rel").resolve()
    assert f"--data-dir {data}" in err and "resume with: python -m studio train --resume " in err
    (job,) = JobRunner(StudioConfig(data_dir=data), registrar=None).jobs()
    assert Path(job.work_dir).is_absolute() and Path(job.out_path) == tmp_path.resolve() / "o.safetensors"
    runner = JobRunner(StudioConfig(data_dir=data), registrar=None)
    from studio.jobs_db import TrainJobRow

    with runner.sessions() as s:
        manifest = json.loads(s.get(TrainJobRow, job.id).images_json)
    assert all(Path(m["path"]).is_absolute() for m in manifest)


def test_the_resume_hint_omits_the_default_data_dir() -> None:
    from studio.commands.train import resume_command
    from studio.config import default_data_dir

    assert resume_command("abc", default_data_dir()) == "python -m studio train --resume abc"
    assert resume_command("abc", Path("/x y")) == "python -m studio train --resume abc --data-dir '/x y'"


def test_resume_of_an_unknown_job_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from studio.cli import main

    assert main(["train", "--resume", "nosuchjob", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: no training job 'nosuchjob' in {tmp_path.resolve()}"


def _running_job(tmp_path: Path, owner: str | None, updated: object = None) -> tuple[Any, str]:
    """A job row in ``tmp_path/data`` marked running by ``owner`` (last written at ``updated``)."""
    from studio.config import StudioConfig
    from studio.jobs import JobRunner

    pics = tmp_path / "pics"
    pics.mkdir(parents=True, exist_ok=True)
    _pic(pics / "a.png")
    runner = JobRunner(StudioConfig(data_dir=tmp_path / "data", device="cpu"), registrar=None)
    job = runner.submit(TrainSpec(trigger="zq"), [pics / "a.png"])
    values = {"status": "running", "owner": owner} | ({"updated_at": updated} if updated else {})
    runner._update(job, **values)
    return runner, job


def test_recover_leaves_jobs_of_live_processes_alone(tmp_path: Path) -> None:
    import datetime as dt
    import socket
    import subprocess
    import sys

    from studio.config import StudioConfig
    from studio.jobs import JobRunner, _process_start

    host = socket.gethostname()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        old = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
        cases = {
            "live": (f"{host}:{live.pid}:{_process_start(live.pid)}:t", None),
            "dead": (f"{host}:{dead.pid}:1:t", None),
            "reused pid": (f"{host}:{live.pid}:not-its-start:t", None),
            "remote fresh": ("elsewhere:1:2:t", None),
            "remote stale": ("elsewhere:1:2:t", old),
            "legacy": (None, None),
        }
        jobs = {name: _running_job(tmp_path, owner, when)[1] for name, (owner, when) in cases.items()}
        fresh = JobRunner(StudioConfig(data_dir=tmp_path / "data", device="cpu"), registrar=None)
        fresh.recover()
        after = {name: fresh.status(job).status for name, job in jobs.items()}
        assert after == {
            "live": "running",
            "dead": "failed",
            "reused pid": "failed",
            "remote fresh": "running",
            "remote stale": "failed",
            "legacy": "failed",
        }
    finally:
        live.kill()
        live.wait()


def test_resume_of_a_job_running_elsewhere_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket
    import subprocess
    import sys

    from studio.cli import main
    from studio.jobs import _process_start

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        owner = f"{socket.gethostname()}:{live.pid}:{_process_start(live.pid)}:t"
        runner, job = _running_job(tmp_path, owner)
        assert main(["train", "--resume", str(job), "--data-dir", str(tmp_path / "data")]) == 2
        assert "is running in another process" in capsys.readouterr().err
        assert runner.status(job).status == "running"
    finally:
        live.kill()
        live.wait()


def test_an_older_jobs_table_gains_the_owner_column(tmp_path: Path) -> None:
    from sqlalchemy import inspect, text

    from studio.jobs_db import make_engine

    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    with make_engine(url).begin() as conn:
        conn.execute(text("ALTER TABLE train_jobs DROP COLUMN owner"))  # what an older version made
    columns = {c["name"] for c in inspect(make_engine(url)).get_columns("train_jobs")}
    assert "owner" in columns


# 7 -------------------------------------------------------------------------------------------------
def _kohya_tree(root: Path) -> Path:
    concept = root / "10_zqx star"
    concept.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (16, 16), (40 * i, 20, 30)).save(concept / f"k{i}.png")
        (concept / f"k{i}.txt").write_text(f"zqx, star {i}", encoding="utf-8")
    return root


def test_kohya_repeat_folders_are_read_with_their_repeats(tmp_path: Path) -> None:
    from pipelines.training.data import BatchPlan

    root = _kohya_tree(tmp_path / "kohya")
    items = items_from_folder(root)
    assert [(i.path.name, i.caption, i.repeats, i.dataset) for i in items] == [
        ("k0.png", "zqx, star 0", 10, "10_zqx star"),
        ("k1.png", "zqx, star 1", 10, "10_zqx star"),
    ]
    plan = BatchPlan([(16, 16)] * 2, batch_size=4, seed=0, repeats=[10, 10])
    assert plan.per_epoch == 5  # 20 views of 2 pictures in batches of 4
    seen = [i for b in plan.epoch(0) for i in b]
    assert sorted(seen) == [0] * 10 + [1] * 10
    (tmp_path / "plain" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match="named like kohya's '10_name': sub"):
        items_from_folder(tmp_path / "plain")


def test_a_picture_in_two_kohya_subsets_counts_in_each(tmp_path: Path) -> None:
    import shutil

    from studio.config import StudioConfig
    from studio.jobs import JobRunner, folder_files

    root = _kohya_tree(tmp_path / "kohya")
    closeup = root / "3_zqx closeup"
    closeup.mkdir()
    shutil.copy(root / "10_zqx star" / "k0.png", closeup / "k0.png")
    (closeup / "k0.txt").write_text("zqx, closeup", encoding="utf-8")
    shutil.copy(root / "10_zqx star" / "k1.png", root / "10_zqx star" / "k1_copy.png")  # same subset
    runner = JobRunner(StudioConfig(data_dir=tmp_path / "data", device="cpu"), registrar=None)
    manifest = runner.store_pictures(folder_files(root))
    assert sorted((m["caption"], m["repeats"], m["dataset"]) for m in manifest) == [
        ("zqx, closeup", 3, "3_zqx closeup"),
        ("zqx, star 0", 10, "10_zqx star"),
        ("zqx, star 1", 10, "10_zqx star"),
    ]


def test_kohya_repeats_reach_the_job_and_the_metadata(tmp_path: Path) -> None:
    from pipelines.training.lora_train import dataset_dirs
    from pipelines.training.metadata import RunInfo, kohya_metadata
    from studio.config import StudioConfig
    from studio.jobs import JobRunner, folder_files

    root = _kohya_tree(tmp_path / "kohya")
    runner = JobRunner(StudioConfig(data_dir=tmp_path / "data", device="cpu"), registrar=None)
    manifest = runner.store_pictures(folder_files(root))
    assert [(m["caption"], m["repeats"], m["dataset"]) for m in manifest] == [
        ("zqx, star 0", 10, "10_zqx star"),
        ("zqx, star 1", 10, "10_zqx star"),
    ]
    spec = TrainSpec(trigger="zqx", steps=5, learning_rate=1e-4)
    items = [ImageItem(Path(m["path"]), m["caption"], m["repeats"], m["dataset"]) for m in manifest]
    examples = prepare_examples(items, spec, [(16, 16)])
    dirs = dataset_dirs(examples)
    captions = tuple(e.caption for e in examples)
    info = RunInfo(
        "pocket",
        "m",
        (16, 16),
        "epsilon",
        20,
        0,
        20,
        5,
        0.0,
        1.0,
        0.1,
        captions,
        dataset_dirs=dirs,
        caption_dirs=tuple(e.dataset for e in examples),
    )
    meta = kohya_metadata(spec, info)
    assert meta["ss_num_train_images"] == "20"
    assert json.loads(meta["ss_dataset_dirs"]) == {"10_zqx star": {"n_repeats": 10, "img_count": 2}}
    tags = json.loads(meta["ss_tag_frequency"])
    assert tags == {"10_zqx star": {"zqx": 2, "star 0": 1, "star 1": 1}}
