"""Edge cases of the Create/Catalog handlers found in review: other-family LoRAs, prompt tags in the A/B
grid, per-adapter policy lists, name lookup in large catalogs, non-finite numbers, huge seeds, names
that A1111 tags cannot hold, and the smaller policy/sampler/paging checks."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import adapters_db
from pipelines.fusion import make_policy
from pipelines.fusion.base import per_adapter
from pipelines.lora_weights import LoraLayer, LoraWeights
from pipelines.pngmeta import read_recipe, read_text_chunks
from pipelines.recipe import MAX_SEED, AdapterSpec, MixRecipe, a1111_parameters, parse_lora_tags
from studio.handlers import catalog as C
from studio.handlers import conflicts, create, generate
from studio.handlers.state import MixItem, SessionState

SIZE = dict(width=32, height=32, steps=2)


def with_mix(services: Any, *names: str) -> SessionState:
    state = SessionState()
    for name in names:
        state, _ = create.add_adapter(services, state, name)
    return state


def history_files(services: Any) -> set[Path]:
    return set(Path(services.config.data_dir, "history").rglob("*.png"))


def sd1_lora(folder: Path) -> Path:
    """A kohya LoRA for SD 1.x (320-wide attention) on module names every SD-layout UNet has."""
    tensors = {}
    for proj in ("to_q", "to_k"):
        key = f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_{proj}"
        tensors[f"{key}.lora_down.weight"] = torch.randn(4, 320) * 0.1
        tensors[f"{key}.lora_up.weight"] = torch.randn(320, 4) * 0.1
        tensors[f"{key}.alpha"] = torch.tensor(4.0)
    path = folder / "sd1_detail.safetensors"
    save_file(tensors, str(path), {"ss_base_model_version": "sd_v1", "ss_output_name": "sd1_detail"})
    return path


def remote_record(model_id: int, name: str, downloads: int) -> dict[str, Any]:
    """A minimal Civitai model record with one remote file."""
    sha = f"{model_id:064x}"
    return {
        "id": model_id,
        "name": name,
        "type": "LORA",
        "stats": {"downloadCount": downloads},
        "modelVersions": [
            {
                "id": model_id * 10,
                "name": "v1",
                "baseModel": "SD 1.5",
                "files": [
                    {
                        "name": f"{name.lower().replace(' ', '_')}.safetensors",
                        "id": model_id,
                        "type": "Model",
                        "hashes": {"SHA256": sha.upper()},
                        "downloadUrl": f"https://civitai.com/api/download/models/{model_id * 10}",
                        "primary": True,
                    }
                ],
                "images": [],
            }
        ],
    }


# ---- 1. a LoRA of another base family in a non-empty mix


def test_pair_conflict_skips_layers_of_other_shapes():
    a = LoraWeights({"unet.x": LoraLayer(torch.ones(2, 8), torch.ones(8, 2))}, "pocket")
    b = LoraWeights({"unet.x": LoraLayer(torch.ones(2, 320), torch.ones(320, 2))}, "sd1")
    result = conflicts.pair_conflict(("a", a), ("b", b))
    assert result.shared == 0 and result.opposing == ()


def test_other_family_lora_warns_instead_of_crashing(fresh_studio, tmp_path):
    services, _ = fresh_studio
    with services.catalog.session() as session:
        assert adapters_db.import_file(session, services.catalog, sd1_lora(tmp_path)).ok
    family = services.model_info().family
    for first, second in (("Alpha Stars", "sd1_detail"), ("sd1_detail", "Alpha Stars")):
        state, warnings = create.add_adapter(services, with_mix(services, first), second)
        assert len(state.mix) == 2
        assert not any("conflict" in w or "could not compare" in w for w in warnings)
        if family not in (None, "sd1"):
            assert any("'sd1_detail' is made for Stable Diffusion 1.x" in w for w in warnings)


# ---- 2. the A/B grid runs the prompt's <lora:…> tags like Generate


def test_ab_grid_includes_prompt_tags(studio):
    services, _ = studio
    tags = "a zq star <lora:Alpha Stars:0.8> <lora:Beta Waves:0.5>"
    res = generate.ab_compare(
        services, SessionState(), generate.GenerateRequest(tags, seed=3, **SIZE), ["orthogonal"], True
    )
    assert [label for _, label in res.cells] == [
        "linear (current)",
        "orthogonal",
        "without Alpha Stars",
        "without Beta Waves",
    ]
    recipes = [read_recipe(p) for p, _ in res.cells]
    assert [[a.label for a in r.adapters] for r in recipes] == [
        ["Alpha Stars", "Beta Waves"],
        ["Alpha Stars", "Beta Waves"],
        ["Beta Waves"],
        ["Alpha Stars"],
    ]
    assert {r.prompt for r in recipes} == {"a zq star"}

    state = with_mix(services, "Alpha Stars")
    req = generate.GenerateRequest("a zq star <lora:Beta Waves:0.5>", seed=3, **SIZE)
    built, _ = generate.build_recipe(services, state, req)
    res = generate.ab_compare(services, state, req, ["orthogonal"], False)
    for path, _ in res.cells:
        assert read_recipe(path).adapters == built.adapters


# ---- 3. per-adapter lists in the policy parameters


@pytest.mark.parametrize(
    "fusion,params,match",
    [
        ("schedule", {"schedule": ["1@0,0@1"]}, "schedule has 1 entry for 2 adapters"),
        ("schedule", {"schedule": ["1@0,0@1", "1", "0.5"]}, "schedule has 3 entries for 2 adapters"),
        ("blocks", {"blocks": ["OUTD"]}, "blocks has 1 entry for 2 adapters"),
    ],
)
def test_per_adapter_lists_of_the_wrong_length_are_refused(studio, fusion, params, match):
    services, _ = studio
    state = with_mix(services, "Alpha Stars", "Beta Waves")
    before = history_files(services)
    req = generate.GenerateRequest("x", fusion=fusion, fusion_params=params, seed=1, **SIZE)
    with pytest.raises(ValueError, match=match):
        generate.generate(services, state, req)
    assert history_files(services) == before


def test_per_adapter_keeps_vectors_and_keyframe_pairs_for_all():
    assert per_adapter([1, 0, 1], 2) == [[1, 0, 1]] * 2
    assert per_adapter([[1, 0], [0, 1]], 3) == [[[1, 0], [0, 1]]] * 3
    assert per_adapter(["a", "b"], 2) == ["a", "b"]


def test_leave_one_out_drops_the_adapters_entry(studio):
    services, _ = studio
    state = with_mix(services, "Alpha Stars", "Beta Waves")
    params = {"schedule": ["0.3@0,1@0.6", "1@0,0.6@1"], "blocks": ["ALL", "OUTD"]}
    req = generate.GenerateRequest("x", fusion="schedule", fusion_params=params, seed=2, **SIZE)
    res = generate.ab_compare(services, state, req, [], True)
    args = [read_recipe(p).fusion_args for p, _ in res.cells]
    assert args[1:] == [
        {"schedule": ["1@0,0.6@1"], "blocks": ["OUTD"]},
        {"schedule": ["0.3@0,1@0.6"], "blocks": ["ALL"]},
    ]
    assert generate.without_adapter({"order": [2, 0, 1]}, 0, 3) == {"order": [1, 0]}


# ---- 4. names resolve however many other adapters share a word


def test_name_lookup_in_a_large_catalog_prefers_local_and_notes_ambiguity(fresh_studio):
    services, ids = fresh_studio
    records = [(f"r{i}", remote_record(9000 + i, f"Alpha Stars Pack {i}", 1000 + i)) for i in range(55)]
    records.append(("dup", remote_record(9999, "Alpha Stars", 10**6)))
    with services.catalog.session() as session:
        adapters_db.import_civitai_records(session, services.catalog, records)
    assert create.resolve_adapter(services, "Alpha Stars").id == ids["Alpha Stars"]
    assert create.resolve_adapter(services, "alpha_stars").id == ids["Alpha Stars"]
    assert create.resolve_adapter(services, "Alpha Stars Pack 7").name == "Alpha Stars Pack 7"
    state, notes = create.add_adapter(services, SessionState(), "alpha stars")
    assert state.mix[0].adapter_id == ids["Alpha Stars"]
    assert any("2 adapters answer to 'alpha stars'" in n and "'Alpha Stars'" in n for n in notes)
    _, notes = generate.build_recipe(
        services, SessionState(), generate.GenerateRequest("<lora:Alpha Stars:1>")
    )
    assert any("answer to 'Alpha Stars'" in n for n in notes)


# ---- 5. NaN / infinite keyframes and weights


@pytest.mark.parametrize("schedule", ["nan", "1@0,inf@1", "-inf", "1@nan"])
def test_non_finite_keyframes_are_refused(schedule):
    with pytest.raises(ValueError, match="finite"):
        create.check_schedule(schedule)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused(studio, value):
    services, _ = studio
    with pytest.raises(ValueError, match="finite"):
        create.add_adapter(services, SessionState(), "Alpha Stars", value)
    state = with_mix(services, "Alpha Stars")
    for field in ("weight", "te", "unet"):
        strengths = dict(weight=1.0, te=1.0, unet=1.0) | {field: value}
        with pytest.raises(ValueError, match="finite"):
            create.update_adapter(state, 0, **strengths)
    with pytest.raises(ValueError, match="finite"):
        MixItem("x", "0" * 64, weight=value)
    with pytest.raises(ValueError, match="finite"):
        AdapterSpec("sha256:" + "0" * 64, "x", weight=value).check()
    recipe, _ = generate.build_recipe(services, state, generate.GenerateRequest("x", seed=1, **SIZE))
    bad = recipe.with_(adapters=(replace(recipe.adapters[0], te=value),))
    with pytest.raises(ValueError, match="finite"):
        services.engine.generate(bad)


def test_schedule_policy_refuses_nan_from_the_parameters(studio):
    services, _ = studio
    state = with_mix(services, "Alpha Stars")
    req = generate.GenerateRequest("x", fusion="schedule", fusion_params={"schedule": "nan"}, seed=1, **SIZE)
    with pytest.raises(ValueError, match="finite"):
        generate.generate(services, state, req)


# ---- 6. seeds the history can store


@pytest.mark.parametrize("seed,count", [(2**63, 1), (2**64, 1), (2**70, 1), (MAX_SEED, 2), (-2, 1)])
def test_out_of_range_seeds_are_refused_up_front(seed, count):
    with pytest.raises(ValueError, match="seed must be"):
        generate.GenerateRequest("x", seed=seed, batch_count=count)


def test_recipe_seed_range():
    assert MixRecipe("x", seed=MAX_SEED).seed == MAX_SEED
    for bad in (MAX_SEED + 1, -1):
        with pytest.raises(ValueError, match="seed must be"):
            MixRecipe("x", seed=bad)


def test_largest_seed_generates_and_is_recorded(studio):
    services, _ = studio
    state = with_mix(services, "Alpha Stars")
    res = generate.generate(services, state, generate.GenerateRequest("x", seed=MAX_SEED, **SIZE))
    assert read_recipe(res.images[0][0]).seed == MAX_SEED
    assert services.history.get(res.entries[0]).recipe.seed == MAX_SEED


# ---- 7. names with ':' in the A1111 parameters text


def test_a1111_tags_of_names_with_colons_parse_back(fresh_studio):
    services, ids = fresh_studio
    record = create.resolve_adapter(services, ids["Alpha Stars"])
    C.edit_metadata(
        services,
        record.id,
        C.MetadataEdit(
            name="Style: Noir",
            tags=record.tags,
            trigger_words=record.trigger_words,
            base_family=record.base_family,
        ),
    )
    state = with_mix(services, "Style: Noir")
    res = generate.generate(services, state, generate.GenerateRequest("a circle", seed=1, **SIZE))
    first = read_text_chunks(res.images[0][0])["parameters"].splitlines()[0]
    assert first == "a circle <lora:alpha_stars:1>"  # the file stem, what A1111 finds the file by
    pasted, _ = generate.build_recipe(services, SessionState(), generate.GenerateRequest(first, seed=1))
    assert [(a.name, a.sha256) for a in pasted.adapters] == [("Style: Noir", state.mix[0].sha256)]


def test_a1111_parameters_never_write_unparseable_tags():
    recipe = MixRecipe("p", adapters=(AdapterSpec("sha256:" + "a" * 64, "A<b>: c", weight=0.5),))
    text = a1111_parameters(recipe, {"A<b>: c": "abcdef0123"}, "DDIM", 64, 64)
    _, tags = parse_lora_tags(text.splitlines()[0])
    assert [(t.name, t.te) for t in tags] == [("A_b__ c", "0.5")]
    assert 'Lora hashes: "A_b__ c: abcdef0123"' in text


# ---- 8. smaller checks


@pytest.mark.parametrize(
    "name,params,match",
    [
        ("switch", {"order": [5, 0]}, "switch order"),
        ("switch", {"order": [-1]}, "switch order"),
        ("klora", {"k": 0}, "whole number ≥ 1"),
        ("klora", {"k": -5}, "whole number ≥ 1"),
        ("klora", {"alpha": float("nan")}, "klora alpha must be a finite number"),
        ("switch", {"period": "abc"}, "switch period"),
        ("switch", {"period": 0}, "switch period"),
    ],
)
def test_policy_parameters_are_checked(studio, name, params, match):
    services, _ = studio
    state = with_mix(services, "Alpha Stars", "Beta Waves")
    req = generate.GenerateRequest("x", fusion=name, fusion_params=params, seed=1, **SIZE)
    with pytest.raises(ValueError, match=match):
        generate.generate(services, state, req)


def test_klora_k_is_checked_when_made():
    with pytest.raises(ValueError, match="whole number ≥ 1"):
        make_policy("klora", {"k": 0})


def test_pndm_refuses_fewer_steps_than_it_needs(studio):
    services, _ = studio
    state = with_mix(services, "Alpha Stars")
    before = history_files(services)
    for steps in (1, 3):
        req = generate.GenerateRequest("x", seed=1, sampler="PNDM", steps=steps, width=32, height=32)
        with pytest.raises(ValueError, match="PNDM sampler needs at least 4 steps"):
            generate.generate(services, state, req)
    assert history_files(services) == before
    ok = generate.GenerateRequest("x", seed=1, sampler="PNDM", steps=4, width=32, height=32)
    assert generate.generate(services, state, ok).entries


def test_catalog_page_past_the_end_shows_the_last_page(studio):
    services, _ = studio
    first = C.browse(services, C.CatalogQuery(page_size=2))
    pages = -(-first.total // 2)
    past = C.browse(services, C.CatalogQuery(page_size=2, page=pages + 3))
    assert past.page == pages and past.items and past.label().startswith(f"page {pages} of {pages}")
    searched = C.browse(services, C.CatalogQuery(text="zq star", page=5))
    assert searched.page < 5 and searched.items


def test_keyframed_tag_under_a_non_schedule_policy_gets_a_note(studio):
    services, _ = studio
    req = generate.GenerateRequest("x <lora:Beta Waves:0@0,1@1>", fusion="orthogonal", seed=1)
    recipe, notes = generate.build_recipe(services, SessionState(), req)
    assert recipe.fusion == "orthogonal"
    assert any("orthogonal policy ignores the keyframes of 'Beta Waves'" in n for n in notes)


def test_keyframed_tags_are_the_strengths_with_te_and_unet_apart(studio):
    services, _ = studio
    _, (both,), _ = generate.tag_items(services, "x <lora:Beta Waves:0@0,1@1>")
    assert (both.weight, both.te, both.unet, both.schedule) == (1.0, 1.0, 1.0, "0@0,1@1")
    _, (apart,), _ = generate.tag_items(services, "x <lora:Beta Waves:0.7:0@0,1@1>")
    assert (apart.weight, apart.te, apart.unet) == (1.0, 1.0, 1.0)
    args = generate.fusion_args("schedule", {}, [apart])
    assert args["schedule"] == [{"BASE": "0.7", "default": "0@0,1@1"}]  # loractl: te=0.7, unet keyframed
    _, (named,), _ = generate.tag_items(services, "x <lora:Beta Waves:te=0@0,1@1:unet=0.5>")
    assert generate.fusion_args("schedule", {}, [named])["schedule"] == [
        {"BASE": "0@0,1@1", "default": "0.5"}
    ]
    req = generate.GenerateRequest("x <lora:Beta Waves:0.7:0@0,1@1>", seed=1, **SIZE)
    recipe, _ = generate.build_recipe(services, SessionState(), req)
    assert recipe.fusion == "schedule" and recipe.fusion_args["schedule"] == [
        {"BASE": "0.7", "default": "0@0,1@1"}
    ]
    assert create.check_schedule('{"BASE": "1", "default": "0@0,1@1"}')  # the mix panel takes it back
    for bad in ('{"BASE": "1@"}', "{not json", '["1"]'):
        with pytest.raises(ValueError):
            create.check_schedule(bad)


def test_a1111_text_names_catalog_loras_by_their_file_stem(studio):
    services, _ = studio
    state = with_mix(services, "Beta Waves")
    assert state.mix[0].a1111_name == "beta_waves"  # imported from beta_waves.safetensors
    recipe, _ = generate.build_recipe(services, state, generate.GenerateRequest("x", seed=1, **SIZE))
    text = a1111_parameters(recipe, {}, "Euler", 32, 32)
    assert "<lora:beta_waves:" in text.splitlines()[0]
    _, (tag,) = parse_lora_tags(text.splitlines()[0])
    assert create.resolve_adapter(services, tag.name).name == "Beta Waves"  # and the studio reads it back
    items, notes = generate.mix_from_recipe(
        services,
        replace(recipe, fusion="schedule", fusion_args={"schedule": [{"BASE": "1", "default": "0@0,1@1"}]}),
    )
    assert not notes and items[0].schedule == '{"BASE": "1", "default": "0@0,1@1"}'
