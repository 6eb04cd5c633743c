"""``python -m studio train``: options → TrainSpec, a real run, clear errors."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import lora_formats
from pipelines.training import TrainSpec
from studio.cli import common_parent, main
from studio.commands import train as train_cmd

ROOT = Path(__file__).resolve().parents[2]


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    train_cmd.register(parser.add_subparsers(dest="command"), common_parent())
    return parser.parse_args(["train", *argv])


def test_options_map_onto_the_spec() -> None:
    spec = train_cmd.spec_from_args(
        _parse(
            "--trigger",
            "sks",
            "--class-word",
            "dog",
            "--rank",
            "8",
            "--alpha",
            "4",
            "--steps",
            "50",
            "--lr",
            "3e-4",
            "--dora",
            "--rslora",
            "--train-text-encoder",
            "--no-bucketing",
            "--no-cache-latents",
            "--orthogonal",
            "--min-snr-gamma",
            "0",
            "--target-modules",
            "to_q, to_v",
            "--sample-prompt",
            "a {trigger}",
            "--no-prior",
            "--captions",
            "template",
            "--preset",
            "quick",
        )
    )
    assert spec == TrainSpec(
        trigger="sks",
        class_word="dog",
        rank=8,
        alpha=4.0,
        steps=50,
        learning_rate=3e-4,
        use_dora=True,
        use_rslora=True,
        train_text_encoder=True,
        bucketing=False,
        cache_latents=False,
        orthogonal=True,
        min_snr_gamma=None,
        target_modules=("to_q", "to_v"),
        sample_prompts=("a {trigger}",),
        prior_preservation=False,
        caption_source="template",
        sample_every=100,
    )  # quick preset's sampling
    assert train_cmd.spec_from_args(_parse("--trigger", "sks")) == TrainSpec(trigger="sks")
    prior = train_cmd.spec_from_args(
        _parse(
            "--trigger",
            "sks",
            "--prior-prompt",
            "a ring",
            "--prior-prompt",
            "a {class_word}",
            "--class-prompt",
            "{caption}, photo",
            "--prior-caption-dropout",
            "0.2",
            "--prior-target",
            "base",
            "--prior-loss-weight",
            "2",
        )
    )
    assert prior.prior_prompts == ("a ring", "a {class_word}") and prior.class_prompt == "{caption}, photo"
    assert (prior.prior_caption_dropout, prior.prior_target, prior.prior_loss_weight) == (0.2, "base", 2.0)
    with pytest.raises(SystemExit):
        _parse("--trigger", "sks", "--prior-target", "teacher")


def test_python_m_studio_train_writes_the_adapter(
    tiny_pipeline_dir: Path, concept_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "zq.safetensors"
    argv = [
        "train",
        "--images",
        str(concept_dir),
        "--trigger",
        "zq",
        "--model",
        str(tiny_pipeline_dir),
        "--out",
        str(out),
        "--steps",
        "2",
        "--rank",
        "4",
        "--resolution",
        "32",
        "--sample-every",
        "0",
        "--no-register",
        "--device",
        "cpu",
        "--data-dir",
        str(tmp_path / "data"),
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "studio", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    assert "job " in proc.stderr and "training" in proc.stderr  # job id and the progress bar
    info = lora_formats.inspect(out)
    assert info.rank == 4 and info.metadata["modelspec.trigger_phrase"] == "zq"


def test_errors_are_one_clear_line(
    tiny_pipeline_dir: Path, concept_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--model", str(tiny_pipeline_dir), "--data-dir", str(tmp_path / "data"), "--device", "cpu"]
    assert main(["train", "--images", str(concept_dir), *common]) == 2
    assert "error: --trigger is required" in capsys.readouterr().err
    existing = tmp_path / "taken.safetensors"
    existing.write_bytes(b"x")
    argv = ["train", "--images", str(concept_dir), "--trigger", "zq", "--out", str(existing), *common]
    assert main(argv) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.png").write_bytes(b"")
    assert main(["train", "--images", str(bad), "--trigger", "zq", *common]) == 2
    assert "error: empty.png: the file is empty (0 bytes)" in capsys.readouterr().err
    assert main(["train", "--images", str(tmp_path / "nowhere"), "--trigger", "zq", *common]) == 2
    assert "error: no such image folder" in capsys.readouterr().err
    assert main(["train", "--images", str(concept_dir), "--trigger", "zq", "--rank", "0", *common]) == 2
    assert "invalid training option: rank must be ≥ 1" in capsys.readouterr().err
