"""``python -m studio generate --fusion gate``: the checkpoint by path, by catalog name and by AutoV2
hash gives the same picture; an unknown name is a clear error, and a run without a gate opens no
catalog."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import adapters_db
from adapters_db import HashingEmbedder
from adapters_db.gates import register_gate
from pipelines.gate.network import GateConfig, GateNetwork
from pipelines.gate.train import GateLora, gate_layers
from pipelines.lora_formats import load, save_kohya
from pipelines.tiny import build_tiny_pipeline
from studio.cli import main as cli
from studio.config import StudioConfig
from tests.pipelines.lora_fixtures import random_lora


def test_generate_finds_a_gate_by_path_name_and_hash(tiny_pipeline_dir: Path, tmp_path: Path, capsys) -> None:
    pipe = build_tiny_pipeline(0)
    loras = []
    for i, name in enumerate(("cat", "car")):
        path = tmp_path / f"{name}.safetensors"
        save_kohya(random_lora(pipe, 20 + i), path)
        loras.append(path)
    net = GateNetwork(
        gate_layers(pipe, [GateLora(str(i), load(p), ("x",)) for i, p in enumerate(loras)]),
        GateConfig(prompt_dim=int(pipe.text_encoder.config.hidden_size)),
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    gate_file = net.save(tmp_path / "gate.safetensors")

    plain = tmp_path / "plain"
    base = ["generate", "--model", str(tiny_pipeline_dir), "--prompt", "a red circle", "--device", "cpu"]
    base += [
        "--steps",
        "2",
        "--size",
        "64x64",
        "--seed",
        "3",
        *(a for p in loras for a in ("--lora", str(p))),
    ]

    def run(data: Path, checkpoint: str, out: str) -> tuple[int, str]:
        args = [
            "--data-dir",
            str(data),
            "--fusion",
            "gate",
            "--fusion-args",
            json.dumps({"checkpoint": checkpoint}),
        ]
        code = cli([*base, *args, "--out", str(tmp_path / out)])
        return code, capsys.readouterr().err

    assert run(plain, str(gate_file), "by_path.png")[0] == 0
    assert not (plain / "catalog.sqlite").exists()  # a gate given as a file needs no catalog

    data = tmp_path / "data"
    catalog = adapters_db.open_catalog(
        StudioConfig(data_dir=data).catalog_url, data, embedder=HashingEmbedder(16)
    )
    with catalog.session() as session:
        record = register_gate(session, catalog, gate_file, name="my gate")
        session.commit()
    catalog.dispose()
    assert run(data, "my gate", "by_name.png")[0] == 0
    assert run(data, record.autov2, "by_hash.png")[0] == 0
    code, err = run(data, "no such gate", "missing.png")
    assert code == 2 and "neither a file nor a gate in the catalog" in err
    code, err = run(data, "", "empty.png")
    assert code == 2 and "needs a checkpoint" in err

    pictures = [np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("by_path", "by_name", "by_hash")]
    assert all(np.array_equal(pictures[0], p) for p in pictures[1:])
    assert pictures[0].shape == (64, 64, 3)
