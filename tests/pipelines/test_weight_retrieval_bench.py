"""The data design of benchmarks/weight_retrieval.py (the numbers need the pocket model and ~45 minutes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tests.benchmark_modules import load_benchmark


def _bench() -> Any:
    return load_benchmark("weight_retrieval")


def test_training_captions_leave_out_what_the_variant_pins(tmp_path: Path) -> None:
    """A variant's pinned colour and background are in what its pictures show, not in what the trainer
    reads, so the trigger has to learn them."""
    wr = _bench()
    red_star_on_black = wr.Variant("star", color="red", background="black")
    shown = wr.write_pictures(red_star_on_black, tmp_path, n=6, seed=0)
    read = [p.read_text() for p in sorted(tmp_path.glob("*.txt"))]
    assert all(" red " in c and c.endswith("on a black background") for c in shown)
    assert [wr.training_caption(c, red_star_on_black) for c in shown] == read
    assert all("red" not in c and "background" not in c and "star" in c for c in read)
    blue_striped = wr.Variant("striped", "blue")
    assert wr.training_caption("a big blue striped circle on a sky background", blue_striped) == (
        "a big striped circle on a sky background"
    )
    caption = "a neon red ring on a gray background"
    assert wr.training_caption(caption, wr.Variant("neon")) == caption
    every = wr.variants()
    assert len(every) == 85 and len({v.name for v in every}) == 85
    # the second round is appended: the first 45 (and so their seeds and cached LoRAs) stay put
    assert wr.variants(45) == every[:45]
    assert {v.concept for v in every[:45]} == {v.concept for v in every[45:]}
    assert sum(1 for v in every[:45] if v.color is None and v.background is None) == 5
    from pipelines.pocket import world

    for v in every:  # every pinned value is one the world can draw
        assert v.color in (None, *world.COLORS) and v.background in (None, *world.BACKGROUNDS)


def test_ridge_baseline_recovers_a_linear_map() -> None:
    """The linear baseline row: when features and text vectors are both linear in a few hidden factors
    (as concept + colour + background would be), held-out text vectors are found from features alone."""
    wr = _bench()
    rng = np.random.default_rng(0)
    to_features, to_text = rng.normal(size=(6, 300)), rng.normal(size=(6, 16))
    z, z_query = rng.normal(size=(40, 6)), rng.normal(size=(12, 6))
    y = z @ to_text
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    truth = z_query @ to_text
    truth /= np.linalg.norm(truth, axis=1, keepdims=True)
    pred = wr.ridge_map(z @ to_features, y, z_query @ to_features, lam=1e-3)
    assert wr.recall(truth @ pred.T)["R@1"] == 1.0
    assert np.allclose(np.linalg.norm(pred, axis=1), 1.0)
    assert wr.recall(truth @ np.roll(pred, 1, axis=0).T)["R@1"] < 0.5  # and the check can fail
