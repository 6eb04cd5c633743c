"""The mechanics of benchmarks/train_quality.py on the tiny pipeline (the numbers need the pocket model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.pocket.classifier import ConceptClassifier
from pipelines.tiny import build_tiny_pipeline
from pipelines.training import train_lora
from tests.benchmark_modules import load_benchmark
from tests.training.conftest import fast_spec


def _bench() -> Any:
    return load_benchmark("train_quality")


def test_prompts_rename_the_concept_and_folder_captions_use_the_trigger(tmp_path: Path) -> None:
    q = _bench()
    caps, scenes = q.prompts(5, 0, ("star",), {"star": "zqx"})
    assert all(" zqx " in c and "star" not in c for c in caps) and all(s.object == "star" for s in scenes)
    folder = q.concept_folder(tmp_path / "f", "heart", "zqh", 3, 0)
    texts = sorted(p.read_text() for p in folder.glob("*.txt"))
    assert len(texts) == 3 and all("zqh" in t and "heart" not in t for t in texts)


def test_evaluation_loads_and_removes_the_lora(concept_dir: Path, tmp_path: Path) -> None:
    q = _bench()
    pipe = build_tiny_pipeline()
    result = train_lora(
        fast_spec(steps=2, targets="all", learning_rate=1e-2),
        pipe,
        concept_dir,
        tmp_path / "zq.safetensors",
        device="cpu",
    )
    caps, _ = q.prompts(3, 0, ("circle",))
    before = q.generate(pipe, caps, 0, steps=2, guidance=3.0)
    assert before.shape == (3, 64, 64, 3) and before.dtype == np.uint8
    pipe.load_lora_weights(str(result.kohya_path), adapter_name="quality_eval")
    with_lora = q.generate(pipe, caps, 0, steps=2, guidance=3.0)
    pipe.delete_adapters("quality_eval")
    assert np.abs(with_lora.astype(int) - before).max() > 0  # the adapter changes the pictures
    assert np.array_equal(q.generate(pipe, caps, 0, steps=2, guidance=3.0), before)  # and leaves cleanly
    torch.manual_seed(0)
    judge = ConceptClassifier().eval()
    base = q.evaluate(pipe, None, "zq", "star", judge, n=3, steps=2, guidance=3.0)
    out = q.evaluate(
        pipe, result.kohya_path, "zq", "star", judge, n=3, steps=2, guidance=3.0, base=base["base_accuracy"]
    )
    assert 0.0 <= out["concept_rate"] <= 1.0 and set(out["base_accuracy"]) == set(q.BASE_ATTRIBUTES)
    drops = out["accuracy_drop_points"]
    assert all(drops[a] == 100 * (base["base_accuracy"][a] - out["base_accuracy"][a]) for a in drops)
