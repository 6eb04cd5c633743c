"""The ``gate`` and ``pocket`` commands and the weight-space encoder used as a person would: the README's
own commands work on a fresh data dir, bad input is refused up front with one line (never a traceback,
never after a long run), nothing non-finite is written or registered, progress is shown, and files are
written atomically."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipelines.gate.network import GateConfig, GateNetwork
from pipelines.gate.train import GateLora, GateTrainConfig, gate_layers, train_gate
from pipelines.lora_formats import save_kohya
from pipelines.lora_weights import LoraLayer, LoraWeights
from pipelines.pocket.evaluate import LORA_DIR, WEIGHTS_DIR
from pipelines.tiny import build_tiny_pipeline
from studio.cli import main as cli
from studio.commands.gate import resolve_loras
from tests.pipelines.lora_fixtures import random_lora

FAST = [
    "--steps",
    "2",
    "--batch-size",
    "2",
    "--images-per-lora",
    "2",
    "--sample-steps",
    "2",
    "--device",
    "cpu",
]


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(0)


@pytest.fixture(scope="module")
def files(pipe, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two LoRAs with prompt files, two text-encoder-only LoRAs and two gate files (one NaN)."""
    root = tmp_path_factory.mktemp("gate-cli")
    out = {}
    for i, name in enumerate(("cat", "car")):
        save_kohya(random_lora(pipe, 40 + i), root / f"{name}.safetensors")
        (root / f"{name}.txt").write_text(f"a photo of a {name}\na drawing of a {name}\n")
        out[name], out[f"{name}.txt"] = root / f"{name}.safetensors", root / f"{name}.txt"
    g = torch.Generator().manual_seed(3)
    for name in ("te1", "te2"):
        layers = {
            f"text_encoder.{n}": LoraLayer(
                torch.randn(4, m.in_features, generator=g) * 0.1,
                torch.randn(m.out_features, 4, generator=g) * 0.1,
                4,
            )
            for n, m in pipe.text_encoder.named_modules()
            if isinstance(m, torch.nn.Linear) and n.endswith("q_proj")
        }
        save_kohya(LoraWeights(layers, "unknown"), root / f"{name}.safetensors")
        out[name] = root / f"{name}.safetensors"
    loras = [GateLora(str(i), random_lora(pipe, 40 + i), ("x",)) for i in range(2)]
    hidden = int(pipe.text_encoder.config.hidden_size)
    for i, name in enumerate(("gate_a", "gate_b")):
        net = GateNetwork(gate_layers(pipe, loras), GateConfig(prompt_dim=hidden))
        with torch.no_grad():
            next(net.parameters()).add_(i + 1)
        out[name] = net.save(root / f"{name}.safetensors")
    tensors = load_file(str(out["gate_a"]))
    key = next(iter(tensors))
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    from safetensors import safe_open

    with safe_open(str(out["gate_a"]), framework="pt") as fh:
        meta = fh.metadata()
    save_file(tensors, str(root / "gate_nan.safetensors"), metadata=meta)
    out["gate_nan"] = root / "gate_nan.safetensors"
    return out


def train_args(
    tiny_pipeline_dir: Path, data: Path, *loras: Path, prompts: dict[str, Path] | None = None
) -> list[str]:
    args = ["gate", "train", "--data-dir", str(data), "--model", str(tiny_pipeline_dir), *FAST]
    args += [a for p in loras for a in ("--lora", str(p))]
    return args + [a for n, f in (prompts or {}).items() for a in ("--prompts", f"{n}={f}")]


def no_pipeline(*_a, **_k):
    raise AssertionError("the model was loaded although the command should have been refused before")


# --- gate train --------------------------------------------------------------------------------------


@pytest.mark.skipif(
    not (LORA_DIR / "pocket-star.safetensors").is_file(), reason="bundled pocket LoRAs absent"
)
def test_readme_pocket_lora_names_work_on_a_fresh_data_dir(tmp_path: Path) -> None:
    """README: `gate train --lora pocket-star --lora pocket-striped …` on a data dir never seeded."""
    import argparse

    args = argparse.Namespace(
        lora=["pocket-star", "pocket-striped"], prompts=[], data_dir=str(tmp_path / "fresh"), db_url=None
    )
    star, striped = resolve_loras(args)
    assert star.path == LORA_DIR / "pocket-star.safetensors" and star.name == "pocket-star"
    assert striped.path == LORA_DIR / "pocket-striped.safetensors"
    assert any("star" in p for p in star.prompts) and any("striped" in p for p in striped.prompts)
    args.lora = ["pocket-nothing", "pocket-star"]
    with pytest.raises(FileNotFoundError, match=r"neither a \.safetensors file nor in the catalog"):
        resolve_loras(args)


def test_a_non_finite_learning_rate_is_refused(
    tiny_pipeline_dir, files, tmp_path, capsys, monkeypatch
) -> None:
    monkeypatch.setattr("pipelines.models.load_pipeline", no_pipeline)
    out = tmp_path / "g.safetensors"
    args = train_args(tiny_pipeline_dir, tmp_path / "d", files["cat"], files["car"])
    assert cli([*args, "--lr", "inf", "--out", str(out)]) == 2
    assert "lr must be a finite number > 0, got inf" in capsys.readouterr().err
    assert not out.exists()


def test_diverging_training_raises_instead_of_returning_a_nan_gate(pipe) -> None:
    loras = [GateLora(str(i), random_lora(pipe, 50 + i), (f"a photo of {i}",)) for i in range(2)]
    cfg = GateTrainConfig(steps=2, batch_size=1, lr=1e20, images_per_lora=1, sample_steps=1)
    with pytest.raises(RuntimeError, match="gate training diverged"):
        train_gate(pipe, loras, [(0, 1)], cfg)


def test_out_path_is_checked_before_training(tiny_pipeline_dir, files, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr("pipelines.models.load_pipeline", no_pipeline)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    prompts = {"cat": files["cat.txt"], "car": files["car.txt"]}
    args = train_args(tiny_pipeline_dir, tmp_path / "d", files["cat"], files["car"], prompts=prompts)
    assert cli([*args, "--out", str(blocker / "g.safetensors")]) == 2
    assert f"cannot create {blocker}" in capsys.readouterr().err
    (tmp_path / "dir.safetensors").mkdir()
    assert cli([*args, "--out", str(tmp_path / "dir.safetensors")]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_text_encoder_only_loras_are_refused_before_sampling(
    tiny_pipeline_dir, files, tmp_path, capsys
) -> None:
    prompts = {"te1": files["cat.txt"], "te2": files["car.txt"]}
    args = train_args(tiny_pipeline_dir, tmp_path / "d", files["te1"], files["te2"], prompts=prompts)
    assert cli([*args, "--out", str(tmp_path / "g.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "adapts a UNet layer" in err and "sampling each LoRA" not in err


def test_the_same_lora_twice_is_refused(tiny_pipeline_dir, files, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr("pipelines.models.load_pipeline", no_pipeline)
    copy = tmp_path / "cat_copy.safetensors"
    copy.write_bytes(files["cat"].read_bytes())
    prompts = {"cat": files["cat.txt"], "cat_copy": files["cat.txt"]}
    args = train_args(tiny_pipeline_dir, tmp_path / "d", files["cat"], copy, prompts=prompts)
    assert cli(args) == 2
    assert "are the same file" in capsys.readouterr().err


def test_a_missing_prompt_file_is_named_with_its_option(tiny_pipeline_dir, files, tmp_path, capsys) -> None:
    args = train_args(tiny_pipeline_dir, tmp_path / "d", files["cat"], files["car"])
    assert cli([*args, "--prompts", f"cat={tmp_path / 'none.txt'}"]) == 2
    assert f"--prompts 'cat={tmp_path / 'none.txt'}': no such file" in capsys.readouterr().err


def test_register_name_is_checked_before_training(
    tiny_pipeline_dir, files, tmp_path, capsys, monkeypatch
) -> None:
    data = tmp_path / "d"
    assert cli(["gate", "register", "--data-dir", str(data), str(files["gate_a"]), "--name", "taken"]) == 0
    capsys.readouterr()
    monkeypatch.setattr("pipelines.models.load_pipeline", no_pipeline)
    prompts = {"cat": files["cat.txt"], "car": files["car.txt"]}
    args = train_args(tiny_pipeline_dir, data, files["cat"], files["car"], prompts=prompts)
    assert cli([*args, "--register", "--name", "Taken", "--out", str(tmp_path / "g.safetensors")]) == 2
    assert "a gate named 'taken' is already in the catalog" in capsys.readouterr().err
    assert cli([*args, "--register", "--name", "  "]) == 2
    assert "--name is empty" in capsys.readouterr().err


# --- gate register -----------------------------------------------------------------------------------


def test_register_refuses_a_second_gate_of_the_same_name(files, tmp_path, capsys) -> None:
    reg = ["gate", "register", "--data-dir", str(tmp_path / "d")]
    assert cli([*reg, str(files["gate_a"]), "--name", "g1"]) == 0
    assert cli([*reg, str(files["gate_b"]), "--name", "G1"]) == 2
    err = capsys.readouterr().err
    assert "a gate named 'g1' is already in the catalog (id 1" in err and "catalog delete --id 1" in err
    assert cli([*reg, str(files["gate_a"]), "--name", "g1"]) == 0  # the same bytes again: fine
    capsys.readouterr()
    assert cli(["gate", "list", "--data-dir", str(tmp_path / "d")]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1


def test_register_says_when_the_bytes_are_already_catalogued(files, tmp_path, capsys) -> None:
    reg = ["gate", "register", "--data-dir", str(tmp_path / "d"), str(files["gate_a"])]
    assert cli([*reg, "--name", "first"]) == 0
    capsys.readouterr()
    assert cli([*reg, "--name", "second"]) == 0
    captured = capsys.readouterr()
    assert "\tfirst\t" in captured.out
    assert "already in the catalog as 'first'" in captured.err and "nothing was changed" in captured.err


def test_register_refuses_a_malformed_lora_hash(files, tmp_path, capsys) -> None:
    reg = ["gate", "register", "--data-dir", str(tmp_path / "d"), str(files["gate_a"])]
    assert cli([*reg, "--lora", "cat=zzz"]) == 2
    assert "--lora 'cat=zzz': write NAME or NAME=SHA256" in capsys.readouterr().err
    assert cli([*reg, "--lora", f"cat=sha256:{'ab' * 32}", "--lora", "car"]) == 0


def test_a_gate_with_nan_weights_is_neither_registered_nor_loaded(files, tmp_path, capsys) -> None:
    reg = ["gate", "register", "--data-dir", str(tmp_path / "d"), str(files["gate_nan"])]
    assert cli(reg) == 2
    assert "holds NaN or infinite values" in capsys.readouterr().err
    with pytest.raises(ValueError, match="NaN or infinite"):
        GateNetwork.load(files["gate_nan"])


# --- pocket ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--n", "0"], "--n must be ≥ 1, got 0"),
        (["--lora-n", "-1"], "--lora-n must be ≥ 0"),
        (["--steps", "0"], "--steps must be ≥ 1"),
        (["--guidance", "nan"], "--guidance must be a finite number"),
    ],
)
def test_pocket_eval_refuses_options_that_measure_nothing(option, message, capsys, monkeypatch) -> None:
    monkeypatch.setattr("pipelines.models.load_pipeline", no_pipeline)
    assert cli(["pocket", "eval", *option]) == 2
    assert message in capsys.readouterr().err


def test_pocket_threads_must_be_positive(capsys) -> None:
    with pytest.raises(SystemExit):
        cli(["pocket", "eval", "--threads", "0"])
    assert "--threads: must be ≥ 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("stage", "before"),
    [("latents", "vae"), ("unet", "latents"), ("export", "classifier"), ("loras", "export")],
)
def test_pocket_train_stage_names_the_stage_to_run_first(stage, before, tmp_path, capsys) -> None:
    args = ["pocket", "train", "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "out")]
    assert cli([*args, "--stage", stage]) == 2
    assert f"run `python -m studio pocket train --stage {before}` first" in capsys.readouterr().err


@pytest.mark.skipif(not (WEIGHTS_DIR / "model_index.json").is_file(), reason="bundled pocket model absent")
def test_pocket_eval_judges_a_model_folder_with_its_own_loras_and_shows_progress(tmp_path, capsys) -> None:
    """A folder `pocket train --out` wrote holds its own concept LoRAs: those are the ones measured."""
    model = tmp_path / "model"
    model.mkdir()
    for item in WEIGHTS_DIR.iterdir():
        if item.name != "loras":
            (model / item.name).symlink_to(item)
    (model / "loras").mkdir()
    (model / "loras" / "pocket-star.safetensors").symlink_to(LORA_DIR / "pocket-star.safetensors")
    args = ["pocket", "eval", "--model", str(model), "--n", "1", "--lora-n", "1", "--steps", "1"]
    assert cli(args) == 0
    captured = capsys.readouterr()
    assert "lora star" in captured.out and "lora heart" not in captured.out
    assert "concept LoRAs: 100%" in captured.err  # a progress bar over the LoRAs' pictures too
    assert cli(["pocket", "eval", "--model", str(model), "--n", "1", "--lora-n", "0", "--steps", "1"]) == 0
    assert "lora " not in capsys.readouterr().out


# --- weight-space encoder ----------------------------------------------------------------------------


def _encoder_setup():
    from pipelines.weightspace import EncoderConfig, WeightEncoder
    from tests.adapters_db.test_weightspace import synthetic_lora

    torch.manual_seed(0)
    loras = [synthetic_lora(("pixel",), seed=1), synthetic_lora(("neon",), seed=2)]
    config = EncoderConfig.for_adapters(loras, 8, "hashing", d_model=16, depth=1)
    return loras, config, WeightEncoder(config).eval()


def test_save_encoder_is_atomic(tmp_path, monkeypatch) -> None:
    import safetensors.torch

    from pipelines.weightspace import load_encoder, save_encoder

    _, _, model = _encoder_setup()
    folder = save_encoder(model, tmp_path / "enc")
    real = safetensors.torch.save_file

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")  # a crash halfway through the write
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_encoder(model, folder)
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    load_encoder(folder)  # the previous checkpoint is intact
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]


def test_train_encoder_refuses_data_it_cannot_learn_from() -> None:
    from pipelines.weightspace import EncoderTrainConfig, train_encoder

    loras, config, _ = _encoder_setup()
    vecs = [np.ones(8, np.float32), np.ones((2, 8), np.float32)]
    fit = EncoderTrainConfig(steps=1)
    with pytest.raises(ValueError, match="2 adapters and 1 sets"):
        train_encoder(loras, vecs[:1], config, fit)
    with pytest.raises(ValueError, match=r"expected \(n ≥ 1, 8\)"):
        train_encoder(loras, [np.ones(4, np.float32), vecs[1]], config, fit)
    with pytest.raises(ValueError, match="NaN"):
        train_encoder(loras, [np.full(8, np.nan, np.float32), vecs[1]], config, fit)
    with pytest.raises(ValueError, match="steps must be ≥ 1"):
        train_encoder(loras, vecs, config, EncoderTrainConfig(steps=0))
    train_encoder(loras, vecs, config, fit)


def test_reindex_warns_about_an_encoder_of_another_embedder_and_foreign_layers(
    tmp_path, caplog, monkeypatch
) -> None:
    import adapters_db
    from adapters_db import HashingEmbedder
    from adapters_db.weightspace import ENCODER_DIR, encoder_vectors
    from pipelines.weightspace import EncoderConfig, WeightEncoder, save_encoder
    from tests.adapters_db.test_weightspace import synthetic_lora

    cat = adapters_db.open_catalog(None, tmp_path / "data", embedder=HashingEmbedder(64))
    lora = synthetic_lora(("pixel",), seed=1)
    foreign = LoraWeights(
        {"unet.nothing.like.it": LoraLayer(torch.ones(2, 3), torch.ones(5, 2), 2)}, lora.family
    )
    weights = {tmp_path / "l1.safetensors": lora, tmp_path / "l2.safetensors": foreign}
    monkeypatch.setattr("adapters_db.weightspace._load", lambda path: weights[path])
    files = {1: ("0" * 64, tmp_path / "l1.safetensors"), 2: ("1" * 64, tmp_path / "l2.safetensors")}
    other = EncoderConfig.for_adapters([lora], cat.embedder.dim + 1, "other-embedder", d_model=16, depth=1)
    folder = save_encoder(WeightEncoder(other), cat.data_dir / ENCODER_DIR)
    with caplog.at_level(logging.WARNING, logger="adapters_db.weightspace"):
        assert encoder_vectors(cat, cat.embedder, [1, 2], files) == {}
    assert "fitted for embedder 'other-embedder'" in caplog.text and str(folder) in caplog.text
    # an encoder of the right space whose layers the second adapter lacks: that one is left out
    mine = EncoderConfig.for_adapters([lora], cat.embedder.dim, cat.embedder.name, d_model=16, depth=1)
    save_encoder(WeightEncoder(mine), folder)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="adapters_db.weightspace"):
        vectors = encoder_vectors(cat, cat.embedder, [1, 2], files)
    assert list(vectors) == [1]
    assert "share no layer with the weight encoder" in caplog.text
    cat.dispose()
