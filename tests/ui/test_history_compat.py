"""A1111 habits of ``python -m studio generate`` and the history: ``--seed -1`` (or no seed) is a random
seed, and the seed actually used is printed and recorded, so the recipe replays the same picture; the
history stores seeds beyond 32 bits on every database."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import create_engine, text
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.schema import CreateTable

from pipelines.pngmeta import read_recipe, read_text_chunks
from pipelines.recipe import MAX_SEED, MixRecipe, parse_a1111_parameters
from studio.cli import build_parser
from studio.cli import main as cli
from studio.commands import generate as gen_cmd
from studio.history import GenerationRow, HistoryStore
from tests.databases import BACKENDS, fresh_database
from tests.ui.test_views import FakeGeneration


def args_of(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["generate", "--out", "x.png", *argv])


@pytest.mark.parametrize("argv", [["--seed", "-1"], []])
def test_minus_one_and_no_seed_pick_a_random_seed(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gen_cmd, "random_seed", lambda: 3141592653)
    recipe = gen_cmd.recipe_from_args(args_of("--prompt", "a cat", *argv))
    assert recipe.seed == 3141592653


def test_random_seeds_are_in_a1111s_range_and_vary() -> None:
    seeds = {gen_cmd.recipe_from_args(args_of("--prompt", "x", "--seed", "-1")).seed for _ in range(20)}
    assert len(seeds) > 1 and all(0 <= s < 2**32 for s in seeds)


def test_explicit_seeds_are_kept_and_bad_ones_refused() -> None:
    assert gen_cmd.recipe_from_args(args_of("--prompt", "x", "--seed", "0")).seed == 0
    assert gen_cmd.recipe_from_args(args_of("--prompt", "x", "--seed", str(MAX_SEED))).seed == MAX_SEED
    for bad in ("-2", str(MAX_SEED + 1)):
        with pytest.raises(ValueError, match="seed must be"):
            gen_cmd.recipe_from_args(args_of("--prompt", "x", "--seed", bad))


def test_malformed_lora_tags_in_the_command_line_prompt_are_a_clear_error() -> None:
    with pytest.raises(ValueError, match="bad weight"):
        gen_cmd.recipe_from_args(args_of("--prompt", "a cat <lora:cat_v2:lots>"))


def test_random_seed_is_printed_recorded_and_replays(
    tiny_pipeline_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--data-dir", str(tmp_path / "data"), "--device", "cpu", "--steps", "2", "--size", "64x64"]
    new = ["--model", str(tiny_pipeline_dir), "--prompt", "a red circle"]
    first = tmp_path / "first.png"
    code = cli(["generate", *common, *new, "--seed", "-1", "--out", str(first)])
    assert code == 0
    out = capsys.readouterr()
    printed = re.search(r"seed (\d+)", out.err)
    assert printed is not None and out.out.strip() == str(first)
    seed = int(printed[1])
    assert 0 <= seed < 2**32
    assert read_recipe(first).seed == seed
    assert parse_a1111_parameters(read_text_chunks(first)["parameters"])["Seed"] == str(seed)

    again = tmp_path / "again.png"
    assert cli(["generate", *common, "--recipe", str(first), "--out", str(again)]) == 0
    explicit = tmp_path / "explicit.png"
    code = cli(["generate", *common, *new, "--seed", str(seed), "--out", str(explicit)])
    assert code == 0
    pixels = [np.asarray(Image.open(p)) for p in (first, again, explicit)]
    assert np.array_equal(pixels[0], pixels[1]) and np.array_equal(pixels[0], pixels[2])
    assert read_recipe(again).seed == seed


@pytest.mark.parametrize("dialect", [postgresql.dialect(), mysql.dialect()])
def test_history_seed_column_holds_64_bit_seeds(dialect: object) -> None:
    ddl = str(CreateTable(GenerationRow.__table__).compile(dialect=dialect))  # type: ignore[arg-type]
    assert re.search(r"\bseed BIGINT\b", ddl), ddl


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or a new PostgreSQL database dropped afterwards."""
    with fresh_database(request.param, tmp_path, "history") as url:
        yield url


SEEDS = (2**31, 2**32 - 1, MAX_SEED)  # random seeds reach 2^32 - 1; typed ones MAX_SEED


def test_history_records_seeds_past_32_bits(db_url: str, tmp_path: Path) -> None:
    store = HistoryStore(db_url, tmp_path / "history")
    try:
        ids = [store.record(FakeGeneration(MixRecipe("x", seed=seed))).id for seed in SEEDS]
        assert [store.get(i).recipe.seed for i in ids] == list(SEEDS)
        with store.engine.connect() as conn:
            stored = conn.execute(text("SELECT seed FROM history_generations ORDER BY seed")).scalars().all()
        assert stored == list(SEEDS)
    finally:
        store.dispose()


def test_history_table_of_an_older_version_is_widened(db_url: str, tmp_path: Path) -> None:
    engine = create_engine(db_url)
    ddl = str(CreateTable(GenerationRow.__table__).compile(dialect=engine.dialect))
    with engine.begin() as conn:  # the table as versions with a 32-bit seed column made it
        conn.execute(text(re.sub(r"\bseed BIGINT\b", "seed INTEGER", ddl)))
    engine.dispose()
    store = HistoryStore(db_url, tmp_path / "history")
    try:
        entry = store.record(FakeGeneration(MixRecipe("x", seed=2**32 - 1)))
        assert store.get(entry.id).recipe.seed == 2**32 - 1
        with store.engine.connect() as conn:
            assert conn.execute(text("SELECT seed FROM history_generations")).scalar_one() == 2**32 - 1
    finally:
        store.dispose()
