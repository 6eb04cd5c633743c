"""The fusion engine against diffusers' own LoRA path, and its exactness properties."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from pipelines import lora_formats
from pipelines.adapter_cache import AdapterCache
from pipelines.engine import Engine, attach, model_modules
from pipelines.fusion import REGISTRY, AdapterInfo, make_policy
from pipelines.fusion.orthogonal import orthogonalised_deltas
from pipelines.lora_weights import LoraLayer, LoraWeights
from pipelines.models import ModelStore
from pipelines.path_plan import PathPlanner
from pipelines.pngmeta import read_recipe, read_text_chunks
from pipelines.recipe import AdapterSpec, MixRecipe
from tests.pipelines.lora_fixtures import (
    TEXT_TARGETS,
    adapted_pipeline,
    lora_config,
    save_diffusers_reference,
)

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2"]
STEPS = 3
KW = dict(num_inference_steps=STEPS, height=64, width=64, output_type="np")


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two LoRAs (UNet + text encoder) in diffusers format and the same two in kohya format."""
    root = tmp_path_factory.mktemp("loras")
    files = {}
    for name, seed in (("a", 1), ("b", 2)):
        pipe, _ = adapted_pipeline(
            seed, unet=lora_config(4, 8, TARGETS), text=lora_config(4, 4, TEXT_TARGETS)
        )
        folder = root / name
        diff = save_diffusers_reference(pipe, folder)
        files[f"{name}_diffusers"] = diff
        kohya = root / f"{name}_kohya.safetensors"
        lora_formats.save_kohya(lora_formats.load(diff), kohya)
        files[f"{name}_kohya"] = kohya
    return files


@pytest.fixture()
def pipe(tiny_pipeline_dir: Path) -> StableDiffusionPipeline:
    p = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    p.set_progress_bar_config(disable=True)
    return p


def diffusers_reference(tiny_pipeline_dir: Path, files: list[Path], weights: list[float]) -> np.ndarray:
    """diffusers' own load_lora_weights + set_adapters, same seed."""
    p = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    p.set_progress_bar_config(disable=True)
    names = []
    for i, f in enumerate(files):
        p.load_lora_weights(str(f), adapter_name=f"n{i}")
        names.append(f"n{i}")
    p.set_adapters(names, weights)
    return p("a red circle", generator=torch.Generator().manual_seed(0), **KW).images


def run(
    pipe: StableDiffusionPipeline,
    adapters: list,
    policy: str = "linear",
    params: dict | None = None,
    planner: PathPlanner | None = None,
) -> np.ndarray:
    with attach(pipe, adapters, make_policy(policy, params), num_steps=STEPS, planner=planner):
        return pipe("a red circle", generator=torch.Generator().manual_seed(0), **KW).images


def loaded(files: dict[str, Path], fmt: str, weights: tuple[float, float] = (0.7, 0.4)) -> list:
    return [
        (AdapterInfo(n, w), lora_formats.load(files[f"{n}_{fmt}"]))
        for n, w in zip("ab", weights, strict=True)
    ]


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_linear_equals_diffusers(fmt, lora_files, pipe, tiny_pipeline_dir):
    ref = diffusers_reference(tiny_pipeline_dir, [lora_files[f"a_{fmt}"], lora_files[f"b_{fmt}"]], [0.7, 0.4])
    ours = run(pipe, loaded(lora_files, fmt))
    base = pipe("a red circle", generator=torch.Generator().manual_seed(0), **KW).images
    assert np.abs(ref - base).max() > 1e-2  # the LoRAs do change the picture
    assert np.abs(ours - ref).max() <= 1e-4


def test_gate_zero_is_base_exactly(lora_files, pipe):
    base = pipe("a red circle", generator=torch.Generator().manual_seed(0), **KW).images
    assert np.array_equal(run(pipe, loaded(lora_files, "kohya", (0.0, 0.0))), base)


@pytest.mark.parametrize(
    "policy,params", [("linear", None), ("schedule", {"schedule": ["1@0,0@1", "0.2@0,1@1"]})]
)
def test_fused_equals_unfused(policy, params, lora_files, pipe):
    adapters = loaded(lora_files, "kohya")
    fused = run(pipe, adapters, policy, params, PathPlanner(static=False, mode="fused"))
    unfused = run(pipe, adapters, policy, params, PathPlanner(static=False, mode="unfused"))
    stacked = run(pipe, adapters, policy, params, PathPlanner(static=False, mode="stacked"))
    assert np.abs(fused - unfused).max() <= 1e-5
    assert np.abs(stacked - unfused).max() <= 1e-5
    base = pipe("a red circle", generator=torch.Generator().manual_seed(0), **KW).images
    assert np.abs(fused - base).max() > 1e-3  # the adapters did change the picture


def test_planner_stacks_high_rank_deep_layers_within_its_budget(lora_files, pipe):
    adapters = loaded(lora_files, "kohya")
    roomy = PathPlanner(static=False)
    run(pipe, adapters, "schedule", {"schedule": ["1@0,0@1", "0.2@0,1@1"]}, roomy)
    assert roomy.stacked_bytes > 0  # 2 adapters: Σ gᵢΔWᵢ is cheaper than re-fusing rank-R factors
    tight = PathPlanner(static=False, stack_budget=0)
    run(pipe, adapters, "schedule", {"schedule": ["1@0,0@1", "0.2@0,1@1"]}, tight)
    assert tight.stacked_bytes == 0


@pytest.mark.parametrize("policy", sorted(REGISTRY))
def test_base_weights_bit_identical_after_every_policy(policy, lora_files, pipe):
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    before_te = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    modules = dict(model_modules(pipe))
    params = {"gate": {"force": 0.7}}.get(policy)  # a trained gate is tested in test_gate.py
    out = run(pipe, loaded(lora_files, "kohya"), policy, params)
    assert np.isfinite(out).all()
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())
    assert all(torch.equal(before_te[k], v) for k, v in pipe.text_encoder.state_dict().items())
    assert all(a is b for a, b in zip(modules.values(), model_modules(pipe).values(), strict=True))


@pytest.mark.parametrize("mode", ["gram_schmidt", "symmetric"])
def test_orthogonalised_deltas_are_orthogonal(mode, lora_files, pipe):
    adapters = loaded(lora_files, "kohya")
    policy = make_policy("orthogonal", {"mode": mode})
    with attach(pipe, adapters, policy) as mix:
        shared = [
            li for li in range(len(mix.layers)) if sum(1 for (lj, _) in policy.ctx.factors if lj == li) == 2
        ]
        assert shared
        for li in shared:
            d = orthogonalised_deltas(policy, li)
            a, b = (v.flatten().double() for v in d.values())
            assert abs(float(a @ b)) / float(a.norm() * b.norm()) <= 1e-5
    report = policy.report()
    assert report["layers"] and all(
        0 <= e <= 1 + 1e-6 for s in report["layers"] for e in s["retained_energy"].values()
    )
    assert any(
        v > 0.01 for s in report["layers"] for v in s["overlap"].values()
    )  # there was overlap to remove


def test_gram_schmidt_keeps_first_adapter_and_removes_shared_output_space(lora_files, pipe):
    adapters = loaded(lora_files, "kohya")
    policy = make_policy("orthogonal", {"order": [1, 0]})
    with attach(pipe, adapters, policy):
        li = next(li for (li, ai) in policy.ctx.factors if ai == 0 and (li, 1) in policy.ctx.factors)
        d = orthogonalised_deltas(policy, li)
        first = adapters[1][1].layers[policy.ctx.layers[li].path].delta() * 0.4
        assert torch.allclose(d[1], first, atol=1e-6)  # the priority adapter is untouched


def test_blocks_diffusers_dict_equals_diffusers_set_adapters(lora_files, pipe, tiny_pipeline_dir):
    scales = {"unet": {"down": 0.0, "mid": 1.0, "up": {"block_1": [0.3, 1.0, 0.5]}}, "text_encoder": 0.5}
    p = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    p.set_progress_bar_config(disable=True)
    p.load_lora_weights(str(lora_files["a_diffusers"]), adapter_name="a")
    p.set_adapters(["a"], [scales])
    ref = p("a red circle", generator=torch.Generator().manual_seed(0), **KW).images
    ours = run(
        pipe, [(AdapterInfo("a"), lora_formats.load(lora_files["a_kohya"]))], "blocks", {"blocks": scales}
    )
    assert np.abs(ours - ref).max() <= 1e-4


def test_a_bad_block_vector_names_its_adapter(lora_files, pipe):
    with pytest.raises(ValueError, match=r"block weights of 'b': .*values, got 3"):
        run(pipe, loaded(lora_files, "kohya"), "blocks", {"blocks": ["ALL", "1,0,0"]})


def test_blocks_none_preset_keeps_only_nothing(lora_files, pipe):
    base = pipe("a red circle", generator=torch.Generator().manual_seed(0), **KW).images
    out = run(pipe, loaded(lora_files, "kohya"), "blocks", {"blocks": "NONE"})
    assert np.array_equal(out, base)


def test_schedule_gates_follow_keyframes(lora_files, pipe):
    adapters = loaded(lora_files, "kohya", (1.0, 1.0))
    with attach(
        pipe, adapters, make_policy("schedule", {"schedule": ["1@0,0@1", "0@0,1@1"]}), num_steps=STEPS
    ) as mix:
        pipe("a red circle", generator=torch.Generator().manual_seed(0), **KW)
    gates = mix.gates()
    unet_rows = [i for i, layer in enumerate(mix.layers) if layer.is_unet]
    assert gates.shape == (STEPS, len(mix.layers), 2)
    row = unet_rows[0]
    assert torch.allclose(gates[:, row, 0], torch.tensor([1.0, 0.5, 0.0]))
    assert torch.allclose(gates[:, row, 1], torch.tensor([0.0, 0.5, 1.0]))


def test_switch_rotates_one_adapter_per_period(lora_files, pipe):
    adapters = loaded(lora_files, "kohya", (1.0, 1.0))
    with attach(pipe, adapters, make_policy("switch", {"period": 2}), num_steps=4) as mix:
        pipe(
            "a red circle",
            generator=torch.Generator().manual_seed(0),
            num_inference_steps=4,
            height=64,
            width=64,
            output_type="np",
        )
    row = next(i for i, layer in enumerate(mix.layers) if layer.is_unet and (i, 1) in mix.policy.ctx.factors)
    assert mix.gates()[:, row].tolist() == [[1, 0], [1, 0], [0, 1], [0, 1]]


def test_klora_moves_from_content_to_style(lora_files, pipe):
    adapters = loaded(lora_files, "kohya", (1.0, 1.0))
    policy = make_policy("klora", {"k": 8})
    with attach(pipe, adapters, policy, num_steps=10):
        first = policy.gates(0, 10)
        last = policy.gates(9, 10)
    unet = policy.ctx.unet_rows()
    shared = (
        torch.tensor(
            [
                (li, 1) in policy.ctx.factors and (li, 0) in policy.ctx.factors
                for li in range(len(policy.ctx.layers))
            ]
        )
        & unet
    )
    assert ((first[shared] > 0).sum(1) == 1).all()  # exactly one delta per layer and step
    assert last[shared, 1].sum() >= first[shared, 1].sum()  # τ(p) grows: the style LoRA wins more late
    assert last[shared, 1].sum() > 0


def test_family_mismatch_is_refused_and_nothing_attached(pipe):
    modules = dict(model_modules(pipe))
    path = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    w = LoraWeights({path: LoraLayer(torch.zeros(4, 2048), torch.zeros(32, 4))}, family="sdxl")
    with (
        pytest.raises(lora_formats.FamilyMismatchError, match="Stable Diffusion XL"),
        attach(pipe, [(AdapterInfo("xl"), w)], make_policy("linear"), family="sd1"),
    ):
        pass
    assert all(a is b for a, b in zip(modules.values(), model_modules(pipe).values(), strict=True))


@pytest.mark.parametrize(
    "layers,error",
    [
        (
            {"unet.nope.to_q": LoraLayer(torch.zeros(2, 32), torch.zeros(32, 2))},
            lora_formats.UnmatchedKeysError,
        ),
        (
            {
                "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": LoraLayer(
                    torch.zeros(2, 40), torch.zeros(32, 2)
                )
            },
            lora_formats.ShapeMismatchError,
        ),
        (
            {
                "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": LoraLayer(
                    torch.full((2, 32), float("nan")), torch.zeros(32, 2)
                )
            },
            lora_formats.NonFiniteWeightsError,
        ),
    ],
)
def test_bad_mixes_are_refused(layers, error, pipe):
    good = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k": LoraLayer(
            torch.ones(2, 32), torch.ones(32, 2)
        )
    }
    modules = dict(model_modules(pipe))
    with (
        pytest.raises(error),
        attach(
            pipe,
            [(AdapterInfo("ok"), LoraWeights(good, None)), (AdapterInfo("bad"), LoraWeights(layers, None))],
            make_policy("linear"),
        ),
    ):
        pass
    assert all(a is b for a, b in zip(modules.values(), model_modules(pipe).values(), strict=True))


def make_engine(pipe) -> Engine:
    store = ModelStore(torch.device("cpu"), torch.float32)
    store.put("tiny", pipe)
    return Engine(store, AdapterCache())


def test_engine_recipe_png_replays_bit_exactly(lora_files, pipe, tmp_path):
    engine = make_engine(pipe)
    recipe = MixRecipe(
        prompt="a red circle",
        model="tiny",
        steps=STEPS,
        seed=3,
        fusion="schedule",
        fusion_args={"schedule": "1@0,0.3@1"},
        adapters=(
            AdapterSpec(str(lora_files["a_kohya"]), "alpha", 0.8),
            AdapterSpec(str(lora_files["b_kohya"]), "beta", 0.5, te=0.0),
        ),
    )
    steps_seen = []
    first = engine.generate(recipe, on_step=lambda i, n: steps_seen.append((i, n)))
    assert steps_seen == [(1, STEPS), (2, STEPS), (3, STEPS)]
    assert first.gates.shape[0] == STEPS and first.columns == ["alpha", "beta"]
    out = first.save(tmp_path / "img.png")
    chunks = read_text_chunks(out)
    params = chunks["parameters"]
    assert "<lora:alpha:0.8>" in params and "<lora:beta:0:0.5>" in params
    assert "Steps: 3" in params and "Seed: 3" in params and 'Lora hashes: "alpha: ' in params
    replayed = read_recipe(out)
    assert replayed.adapters[0].sha256 == first.adapter_hashes["alpha"]
    second = engine.generate(replayed)
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(second.images[0]))
    assert engine.cache.disk_reads == 2  # the second run came from the cache


@pytest.mark.parametrize("sampler", ["Euler", "Euler a"])
def test_batch_images_are_the_single_images_of_seed_plus_i(sampler, lora_files, pipe, tmp_path):
    engine = make_engine(pipe)
    spec = AdapterSpec(str(lora_files["a_kohya"]), "alpha", 0.8)
    base = MixRecipe("a red circle", model="tiny", steps=STEPS, seed=7, sampler=sampler, adapters=(spec,))
    batch = engine.generate(replace(base, batch_size=3))
    singles = [engine.generate(replace(base, seed=7 + i)) for i in range(3)]
    for i, single in enumerate(singles):
        a, b = np.asarray(batch.images[i], np.int16), np.asarray(single.images[0], np.int16)
        assert np.abs(a - b).max() <= 1, (sampler, i)  # batched matmuls may differ in the last bit
    assert not np.array_equal(np.asarray(batch.images[0]), np.asarray(batch.images[1]))
    out = batch.save(tmp_path / "second.png", 1)
    assert "Seed: 8," in read_text_chunks(out)["parameters"]
    own = read_recipe(out)
    assert (own.seed, own.batch_size) == (8, 1)  # replaying the file gives that image, not the batch
    again = engine.generate(own)
    assert np.abs(np.asarray(again.images[0], np.int16) - np.asarray(batch.images[1], np.int16)).max() <= 1


def test_engine_refuses_changed_adapter_file(lora_files, pipe, tmp_path):
    engine = make_engine(pipe)
    spec = AdapterSpec(str(lora_files["a_kohya"]), "alpha", sha256="0" * 64)
    with pytest.raises(ValueError, match="changed on disk"):
        engine.generate(MixRecipe(prompt="x", model="tiny", steps=1, adapters=(spec,)))


def test_dora_matches_peft(tmp_path):
    from peft import get_peft_model_state_dict

    from pipelines.tiny import build_tiny_pipeline

    peft_pipe, _ = adapted_pipeline(5, unet=lora_config(4, 8, ["to_q", "to_v"], use_dora=True))
    ref = peft_pipe("a red circle", generator=torch.Generator().manual_seed(0), **KW).images
    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=get_peft_model_state_dict(peft_pipe.unet),
        unet_lora_adapter_metadata=peft_pipe.unet.peft_config["default"].to_dict(),
    )
    weights = lora_formats.load(tmp_path / "pytorch_lora_weights.safetensors")
    assert any(layer.dora_scale is not None for layer in weights.layers.values())
    ours = run(build_tiny_pipeline(5), [(AdapterInfo("d"), weights)])  # the same base as peft_pipe
    assert np.abs(ours - ref).max() <= 1e-4
