"""The static-weight oracle of benchmarks/gate_composition.py (its numbers need the pocket model)."""

from __future__ import annotations

from typing import Any

from tests.benchmark_modules import load_benchmark


def _bench() -> Any:
    return load_benchmark("gate_composition")


def _row(policy: str, pair: str, both: float, prompt: float, split: str = "held-out") -> dict:
    return {"policy": policy, "pair": pair, "split": split, "both_rate": both, "prompt_rate": prompt}


def test_static_grid_leaves_out_linear_and_covers_both_directions() -> None:
    gc = _bench()
    assert len(gc.STATIC_GRID) == 8 and (1.0, 1.0) not in gc.STATIC_GRID
    assert {a for a, _ in gc.STATIC_GRID} == {1.0, 1.25, 1.5}
    assert {b for _, b in gc.STATIC_GRID} == {0.75, 1.0, 1.25}


def test_block_rows_name_and_spell_the_diffusers_dict() -> None:
    gc = _bench()
    assert gc.block_spec((1.5, 1.5, 1.0)) == {"down": 1.5, "mid": 1.5, "up": 1.0}
    assert gc.block_row_name((1.5, 1.5, 1.0), (0.5, 0.5, 1.0)) == "blocks 1.5/1.5/1 + 0.5/0.5/1"
    assert len({gc.block_row_name(o, s) for o, s in gc.BLOCK_GRID}) == len(gc.BLOCK_GRID)


def test_best_static_picks_the_highest_both_rate_per_pair_and_ignores_gates() -> None:
    gc = _bench()
    rows = [
        _row("linear", "star×outline", 0.77, 0.69),
        _row("static 1.5/1.25", "star×outline", 0.85, 0.65),
        _row("static 1.25/1", "star×outline", 0.85, 0.70),  # tie on both: the better prompt rate wins
        _row("gate-full", "star×outline", 0.99, 0.99),  # not a static weighting
        _row("blocks 1/1/1 + 0/0/1", "heart×striped", 0.81, 0.19),
        _row("linear", "heart×striped", 0.90, 0.21, "held-out"),
        _row("static 1/0.75", "heart×striped", 0.83, 0.60),
        _row("linear", "star×striped", 0.44, 0.08, "train"),  # no grid row: no oracle
    ]
    best = {b["pair"]: b for b in gc.best_static(rows)}
    assert set(best) == {"star×outline", "heart×striped"}
    assert best["star×outline"]["best"] == "static 1.25/1"
    assert best["star×outline"]["both_rate"] == 0.85 and best["star×outline"]["linear_both_rate"] == 0.77
    assert best["heart×striped"]["best"] == "linear" and best["heart×striped"]["both_rate"] == 0.90
    rows.append(_row("blocks 1.5/1.5/1 + 0.5/0.5/1", "heart×striped", 0.92, 0.23))
    best = {b["pair"]: b for b in gc.best_static(rows)}
    assert best["heart×striped"]["best"] == "blocks 1.5/1.5/1 + 0.5/0.5/1"
