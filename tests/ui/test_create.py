"""Create-tab handlers without Gradio: search, the mix, recipes, generation, A/B, warnings."""

from __future__ import annotations

import json
import threading
from dataclasses import replace

import numpy as np
import pytest

from pipelines.engine import GenerationCancelled
from pipelines.pngmeta import read_recipe, read_text_chunks
from studio.handlers import create, generate, policies
from studio.handlers.plots import block_gates
from studio.handlers.state import MAX_MIX, MixItem, SessionState
from tests.ui.fixtures import pixels

SIZE = dict(width=32, height=32, steps=2)


def with_mix(services, *names: str, **weights: float) -> SessionState:
    state = SessionState()
    for name in names:
        state, _ = create.add_adapter(services, state, name)
    for i, item in enumerate(state.mix):
        if item.name in weights:
            state = create.update_adapter(state, i, weight=weights[item.name], te=1, unet=1)
    return state


def test_search_ranks_the_trigger_match_first_and_hides_nsfw(studio):
    services, ids = studio
    hits = create.search_adapters(services, "a zq star on grass <lora:Beta Waves:0.5>")
    names = [h.adapter.name for h in hits]
    assert names[0] == "Alpha Stars" and "zq star" in hits[0].why
    assert "Delta Secret" not in names
    assert create.search_adapters(services, "   ") == []
    data = create.hit_data(hits)
    assert data[0]["id"] == ids["Alpha Stars"] and data[0]["local"] is True


@pytest.mark.parametrize(
    "ref", ["Alpha Stars", "alpha stars", "alpha_stars", "{id}", "sha256:{sha}", "{autov2}"]
)
def test_add_adapter_by_any_reference(studio, ref):
    services, ids = studio
    record = create.resolve_adapter(services, ids["Alpha Stars"])
    sha = record.files[0].sha256
    text = ref.format(id=ids["Alpha Stars"], sha=sha, autov2=sha[:10])
    state, warnings = create.add_adapter(services, SessionState(), text, 0.5)
    assert [(m.name, m.weight, m.sha256) for m in state.mix] == [("Alpha Stars", 0.5, sha)]
    assert warnings == []


def test_add_adapter_refusals(studio):
    services, _ = studio
    with pytest.raises(LookupError, match="no adapter 'Nope'"):
        create.add_adapter(services, SessionState(), "Nope")
    state, _ = create.add_adapter(services, SessionState(), "Alpha Stars")
    again, notes = create.add_adapter(services, state, "Alpha Stars")
    assert again == state and notes == ["'Alpha Stars' is already in the mix"]
    full = state.with_mix(tuple(MixItem(f"x{i}", f"{i:064x}") for i in range(MAX_MIX)))
    with pytest.raises(ValueError, match=f"at most {MAX_MIX}"):
        create.add_adapter(services, full, "Beta Waves")


def test_conflicting_adapters_are_warned_about(studio):
    services, _ = studio
    _, warnings = create.add_adapter(services, with_mix(services, "Alpha Stars"), "Gamma Counter")
    assert len(warnings) == 1 and "'Alpha Stars' and 'Gamma Counter' conflict" in warnings[0]
    assert "48 of the 48 layers" in warnings[0] or "layers both adapt" in warnings[0]
    _, calm = create.add_adapter(services, with_mix(services, "Alpha Stars"), "Beta Waves")
    assert calm == []


def test_update_remove_and_validation(studio):
    services, _ = studio
    state = with_mix(services, "Alpha Stars", "Beta Waves")
    state = create.update_adapter(state, 1, weight=0.3, te=0.5, unet=1.5, blocks="outd", schedule="1@0, 0@1")
    assert (state.mix[1].weight, state.mix[1].te, state.mix[1].unet) == (0.3, 0.5, 1.5)
    assert (state.mix[1].blocks, state.mix[1].schedule) == ("OUTD", "1@0, 0@1")
    with pytest.raises(ValueError, match="unknown block preset"):
        create.update_adapter(state, 0, weight=1, te=1, unet=1, blocks="SIDEWAYS")
    with pytest.raises(ValueError, match="bad keyframes"):
        create.update_adapter(state, 0, weight=1, te=1, unet=1, schedule="much@later")
    with pytest.raises(IndexError):
        create.update_adapter(state, 5, weight=1, te=1, unet=1)
    assert [m.name for m in create.remove_adapter(state, 0).mix] == ["Beta Waves"]
    assert create.clear_mix(state).mix == ()


def test_insert_trigger_words_adds_only_missing_ones(studio):
    services, _ = studio
    state = with_mix(services, "Alpha Stars", "Beta Waves")
    out = create.insert_triggers("a ZQ STAR in the sky", state)
    assert out == "a ZQ STAR in the sky, outdoors, vx wave"
    assert create.insert_triggers(out, state) == out


def test_recipe_merges_prompt_tags_and_per_adapter_settings(studio):
    services, _ = studio
    state = with_mix(services, "Alpha Stars")
    state = create.update_adapter(state, 0, weight=0.9, te=1, unet=1, blocks="OUTD", schedule="1@0,0.5@1")
    req = generate.GenerateRequest(
        "a star <lora:Beta Waves:0.4:0.8> <lora:alpha_stars:0.6>", fusion="blocks", seed=5
    )
    recipe, notes = generate.build_recipe(services, state, req)
    assert recipe.prompt == "a star" and recipe.seed == 5
    assert [(a.label, a.weight, a.te, a.unet) for a in recipe.adapters] == [
        ("Alpha Stars", 1.0, 0.6, 0.6),
        ("Beta Waves", 1.0, 0.4, 0.8),
    ]
    assert recipe.fusion_args == {"blocks": ["OUTD", "ALL"]}
    assert len(notes) == 2
    keyed, notes = generate.build_recipe(
        services, SessionState(), replace(req, prompt="x <lora:Beta Waves:1@0,0@1>", fusion="linear")
    )
    assert keyed.fusion == "schedule" and keyed.fusion_args["schedule"] == ["1@0,0@1"]
    assert any("schedule" in n for n in notes)
    with pytest.raises(LookupError, match="no adapter 'Missing One'"):
        generate.build_recipe(services, state, replace(req, prompt="<lora:Missing One:1>"))
    rnd, _ = generate.build_recipe(services, state, replace(req, seed=-1))
    assert 0 <= rnd.seed < 2**32


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(steps=0), "steps must be 1 to 150"),
        (dict(width=33), "multiples of 8"),
        (dict(guidance=-1), "guidance"),
        (dict(sampler="Warp 9"), "unknown sampler"),
        (dict(batch_count=0), "batch count"),
        (dict(seed=-2), "seed"),
    ],
)
def test_generate_request_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        generate.GenerateRequest("p", **bad)


def test_policy_parameters():
    assert policies.policy_names()[0] == "linear"
    assert "gate" not in policies.comparable_policies() and "ties" in policies.comparable_policies()
    assert policies.policy_defaults("switch") == {"period": 5, "order": None}
    assert "blocks" not in policies.policy_defaults("blocks")
    assert json.loads(policies.set_param("{}", "order", "1, 0")) == {"order": [1, 0]}
    with pytest.raises(ValueError, match="not valid JSON"):
        policies.parse_params("{period: 2")
    with pytest.raises(ValueError, match="must be a JSON object"):
        policies.parse_params("[1, 2]")
    with pytest.raises(ValueError, match="unknown fusion policy"):
        policies.policy_defaults("mystery")


def test_generate_records_history_and_gates_equal_the_weights(studio):
    services, _ = studio
    state = with_mix(services, "Alpha Stars", "Beta Waves", **{"Alpha Stars": 0.7, "Beta Waves": 0.4})
    steps = []
    req = generate.GenerateRequest("a zq star", seed=11, **SIZE)
    res = generate.generate(services, state, req, owner="ana", on_step=lambda i, n: steps.append((i, n)))
    assert steps == [(1, 2), (2, 2)]
    ((path, caption),) = res.images
    assert "seed 11" in caption and res.state.images == (path,) and res.heatmap is not None
    recipe = read_recipe(path)
    assert (
        recipe.seed == 11 and [a.weight for a in recipe.adapters] == [0.7, 0.4] and recipe.adapters[0].sha256
    )
    assert "Lora hashes" in read_text_chunks(path)["parameters"]
    entry = services.history.get(res.entries[0], owner="ana")
    assert entry.recipe == recipe and entry.heatmap.is_file()
    gen = services.engine.generate(recipe)
    ids, table = block_gates(gen.gates, gen.blocks)
    assert table.shape == (2, len(ids), 2)
    assert np.allclose(table[0], 0.7) and np.allclose(table[1], 0.4)  # linear: every gate is the weight
    assert np.array_equal(pixels(path), np.asarray(gen.images[0]))  # same recipe, same pixels
    plain = generate.generate(services, SessionState(), req)
    assert not np.array_equal(pixels(plain.images[0][0]), pixels(path))  # the mix changes the picture


def test_batch_count_runs_consecutive_seeds(studio):
    services, _ = studio
    res = generate.generate(
        services, SessionState(), generate.GenerateRequest("x", seed=3, batch_count=2, **SIZE)
    )
    seeds = [services.history.get(e).recipe.seed for e in res.entries]
    assert seeds == [3, 4] and len(res.images) == 2


def test_cancel_stops_between_steps_and_records_nothing(studio):
    services, _ = studio
    before = services.history.search()[1]
    flag = threading.Event()
    req = generate.GenerateRequest("x", seed=1, width=32, height=32, steps=4)
    with pytest.raises(GenerationCancelled):
        generate.generate(services, SessionState(), req, cancel=flag, on_step=lambda i, n: flag.set())
    assert services.history.search()[1] == before


def test_ab_grid_renders_every_variant_with_one_seed(studio):
    services, _ = studio
    state = with_mix(services, "Alpha Stars", "Beta Waves")
    req = generate.GenerateRequest("a zq star", seed=4, **SIZE)
    res = generate.ab_compare(services, state, req, ["orthogonal", "linear"], leave_one_out=True)
    labels = [label for _, label in res.cells]
    assert labels == ["linear (current)", "orthogonal", "without Alpha Stars", "without Beta Waves"]
    assert res.grid.size == (4 * 128, 128 + 18)  # 32-pixel cells enlarged 4×
    recipes = [read_recipe(p) for p, _ in res.cells]
    assert {r.seed for r in recipes} == {4}
    assert [len(r.adapters) for r in recipes] == [2, 2, 1, 1]
    with pytest.raises(ValueError, match="add adapters"):
        generate.ab_compare(services, SessionState(), req, ["ties"], True)


def test_auto_mix_composes_from_retrieval(studio):
    services, _ = studio
    state, fusion, notes = create.auto_mix(services, SessionState(), "a zq star on grass")
    assert state.mix[0].name == "Alpha Stars" and state.mix[0].weight == 1.0
    assert fusion == ("linear" if len(state.mix) == 1 else "orthogonal")
    assert notes[0].startswith("auto mix: Alpha Stars")
    assert state.hits and state.hits[0][0] == state.mix[0].adapter_id


def test_mix_round_trips_through_a_recipe(studio):
    services, _ = studio
    state = with_mix(services, "Alpha Stars", "Beta Waves")
    state = create.update_adapter(state, 1, weight=0.25, te=0.5, unet=1, blocks="INS", schedule="1")
    recipe, _ = generate.build_recipe(services, state, generate.GenerateRequest("p", fusion="blocks", seed=1))
    items, notes = generate.mix_from_recipe(services, recipe)
    assert items == state.mix and notes == []
    req = generate.request_from_recipe(recipe)
    assert (req.fusion, req.fusion_params, req.seed) == ("blocks", {}, 1)


def test_history_replay_is_bit_identical_and_sends_back_to_create(studio):
    from studio.handlers import history as Hh
    from studio.handlers import html

    services, _ = studio
    state = with_mix(services, "Alpha Stars", "Beta Waves", **{"Beta Waves": 0.5})
    state = create.update_adapter(state, 0, weight=0.8, te=1, unet=1, blocks="OUTD")
    req = generate.GenerateRequest(
        "a zq star, outdoors", negative_prompt="blurry", fusion="blocks", seed=21, **SIZE
    )
    first = generate.generate(services, state, req, owner="ana")
    entries, total = Hh.history_page(services, "ana", "outdoors blurry")
    assert total >= 1 and entries[0].id == first.entries[0]
    cards = html.history_cards(entries)
    assert f'data-action="open" data-id="{first.entries[0]}"' in cards and "a zq star, outdoors" in cards
    view = Hh.open_entry(services, "ana", first.entries[0])
    assert json.loads(view.recipe_json)["seed"] == 21 and view.files == [str(entries[0].images[0])]
    with pytest.raises(KeyError):
        Hh.open_entry(services, "bo", first.entries[0])  # another owner's history stays hidden
    again, same = Hh.replay(services, SessionState(), "ana", first.entries[0])
    assert same is True and again.entries[0] != first.entries[0]
    assert np.array_equal(pixels(again.images[0][0]), pixels(first.images[0][0]))
    new, back, notes = Hh.send_to_create(services, SessionState(), "ana", first.entries[0])
    assert notes == [] and new.mix == state.mix
    assert (back.prompt, back.negative_prompt, back.fusion, back.seed, back.steps) == (
        "a zq star, outdoors",
        "blurry",
        "blocks",
        21,
        2,
    )
    with pytest.raises(ValueError, match="pages start at 1"):
        Hh.history_page(services, "ana", "", 0)
