"""Every supported LoRA format loads to the same ΔW as its reference (max abs diff ≤ 1e-5)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.utils import convert_state_dict_to_kohya
from peft import get_peft_model_state_dict

from pipelines.lora_formats import (
    architecture_shapes,
    check_against_model,
    inspect,
    load,
    load_state_dict,
)
from tests.pipelines import lora_fixtures
from tests.pipelines.lora_fixtures import (
    TEXT_TARGETS,
    TOLERANCE,
    adapted_pipeline,
    deltas_of,
    loha_dense,
    lokr_dense,
    lora_config,
    max_diff,
    random_kohya,
    save_diffusers_reference,
    write,
)

UNET_SCALE, TEXT_SCALE = 8 / 4, 2 / 4


@pytest.fixture(scope="module")
def reference():
    """Tiny pipeline with PEFT LoRAs: unet r=4 α=8 (to_k rank 2, conv1 α=3), text encoder r=4 α=2."""
    unet = lora_config(r=4, alpha=8, rank_pattern={"to_k": 2}, alpha_pattern={"conv1": 3})
    return adapted_pipeline(0, unet=unet, text=lora_config(r=4, alpha=2, targets=TEXT_TARGETS))


@pytest.fixture(scope="module")
def peft_sd(reference):
    """PEFT-named state dict of both components, prefixed like diffusers' files."""
    pipe, _ = reference
    sd = {f"unet.{k}": v for k, v in get_peft_model_state_dict(pipe.unet).items()}
    sd.update({f"text_encoder.{k}": v for k, v in get_peft_model_state_dict(pipe.text_encoder).items()})
    return sd


def _scale(path: str) -> float:
    """PEFT scale of a reference module (alpha/r with the patterns of the fixture)."""
    if path.startswith("text_encoder"):
        return TEXT_SCALE
    if path.endswith("conv1"):
        return 3 / 4
    return 8 / 2 if path.endswith("to_k") else UNET_SCALE


def test_diffusers_file_with_adapter_metadata(reference, tmp_path):
    pipe, ref = reference
    file = save_diffusers_reference(pipe, tmp_path)
    weights = load(file)
    assert weights.format == "diffusers"
    assert max_diff(deltas_of(weights), ref) <= TOLERANCE
    assert weights.layers["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"].rank == 2
    assert load(tmp_path).layers.keys() == weights.layers.keys()  # the folder loads too


def test_kohya_from_diffusers_converter(peft_sd, reference):
    _, ref = reference
    kohya = convert_state_dict_to_kohya(peft_sd)  # writes alpha = rank; put the real alphas back
    alphas = {name.split(".")[0]: _scale(path) for name, path in _kohya_paths(kohya, peft_sd).items()}
    sd = {
        k: torch.tensor(alphas[k.split(".")[0]] * _rank(kohya, k)) if k.endswith(".alpha") else v
        for k, v in kohya.items()
    }
    assert any(k.startswith("lora_te1_") for k in sd)
    weights = load_state_dict(sd)
    assert weights.format == "kohya"
    assert max_diff(deltas_of(weights), ref) <= TOLERANCE
    renamed = {k.replace("lora_te1_", "lora_te_"): v for k, v in sd.items()}  # A1111's SD 1.x spelling
    assert max_diff(deltas_of(load_state_dict(renamed)), ref) <= TOLERANCE


def _kohya_paths(kohya: dict, peft_sd: dict) -> dict[str, str]:
    """kohya name → module path, by the order-preserving conversion of lora_A keys."""
    downs = [k for k in kohya if k.endswith(".lora_down.weight")]
    paths = [k.removesuffix(".lora_A.weight") for k in peft_sd if k.endswith(".lora_A.weight")]
    return {d.split(".")[0]: p for d, p in zip(downs, paths, strict=True)}


def _rank(kohya: dict, alpha_key: str) -> int:
    return kohya[alpha_key.replace(".alpha", ".lora_down.weight")].shape[0]


def test_diffusers_legacy_processor_naming(peft_sd, reference):
    _, ref = reference
    sd = {}
    for key, value in peft_sd.items():
        path, part = key.rsplit(".lora_", 1)
        factor = "down" if part.startswith("A") else "up"
        value = value * _scale(path) if factor == "up" else value  # legacy files carry no alpha
        sd[_legacy_name(path, factor)] = value
    assert any(".processor.to_out_lora.up." in k for k in sd) and any("lora_linear_layer" in k for k in sd)
    weights = load_state_dict(sd)
    assert weights.format == "diffusers_legacy"
    assert max_diff(deltas_of(weights), ref) <= TOLERANCE


def _legacy_name(path: str, factor: str) -> str:
    """Old diffusers names: attention processors (``attn1.processor.to_q_lora.down.weight``), text
    encoder ``self_attn.to_q_lora`` and ``mlp.fc1.lora_linear_layer``, other layers ``lora.down``."""
    module, _, leaf = path.rpartition(".")
    if leaf == "0" and module.endswith(".to_out"):
        return f"{module.removesuffix('.to_out')}.processor.to_out_lora.{factor}.weight"
    if leaf in ("to_q", "to_k", "to_v"):
        return f"{module}.processor.{leaf}_lora.{factor}.weight"
    if leaf in ("q_proj", "k_proj", "v_proj", "out_proj"):
        return f"{module}.to_{leaf[0] if leaf != 'out_proj' else 'out'}_lora.{factor}.weight"
    if path.startswith("text_encoder"):
        return f"{path}.lora_linear_layer.{factor}.weight"
    return f"{path}.lora.{factor}.weight"


def test_peft_folder_with_patterns(reference, tmp_path):
    pipe, ref = reference
    folder = tmp_path / "adapter"
    folder.mkdir()
    sd = {f"base_model.model.{k}": v for k, v in get_peft_model_state_dict(pipe.unet).items()}
    write(folder / "adapter_model.safetensors", sd)
    pipe.unet.peft_config["default"].save_pretrained(folder)
    unet_ref = {k: v for k, v in ref.items() if k.startswith("unet.")}
    weights = load(folder)
    assert weights.format == "peft"
    assert max_diff(deltas_of(weights), unet_ref) <= TOLERANCE
    moved = write(tmp_path / "loose.safetensors", sd)  # a loose file needs its config named
    assert (
        max_diff(deltas_of(load(moved, adapter_config=folder / "adapter_config.json")), unet_ref) <= TOLERANCE
    )
    assert max_diff(deltas_of(load(moved)), unet_ref) > 0.1  # without it, alpha = rank: different ΔW


def test_peft_rslora_and_text_encoder(tmp_path):
    pipe, ref = adapted_pipeline(3, text=lora_config(r=4, alpha=6, targets=TEXT_TARGETS, use_rslora=True))
    sd = {f"base_model.model.{k}": v for k, v in get_peft_model_state_dict(pipe.text_encoder).items()}
    write(tmp_path / "adapter_model.safetensors", sd)
    pipe.text_encoder.peft_config["default"].save_pretrained(tmp_path)
    weights = load(tmp_path)
    assert weights.components() == {"text_encoder"}
    assert max_diff(deltas_of(weights), ref) <= TOLERANCE
    assert next(iter(weights.layers.values())).scale == pytest.approx(6 / math.sqrt(4))


def _dora_merged(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's merged weight m · (W + ΔW) / ‖W + ΔW‖ per output row (arXiv 2402.09353 eq. 5)."""
    direction = weight + delta
    norm = direction.reshape(direction.shape[0], -1).norm(dim=1)
    return direction * (magnitude / norm).reshape(-1, *[1] * (direction.dim() - 1))


def test_dora_peft_and_kohya_match_peft_merge(tmp_path):
    config = lora_config(r=4, alpha=4, targets=["to_q", "proj_in"], use_dora=True)
    pipe, ref = adapted_pipeline(5, unet=config)
    base = {
        f"unet.{n}": m.get_base_layer().weight.detach().clone()
        for n, m in pipe.unet.named_modules()
        if hasattr(m, "lora_magnitude_vector")
    }
    sd = {f"base_model.model.{k}": v for k, v in get_peft_model_state_dict(pipe.unet).items()}
    write(tmp_path / "adapter_model.safetensors", sd)
    config.save_pretrained(tmp_path)
    weights = load(tmp_path)
    assert weights.format == "dora"
    pipe.unet.fuse_lora()
    merged = {
        f"unet.{n}": m.get_base_layer().weight
        for n, m in pipe.unet.named_modules()
        if hasattr(m, "lora_magnitude_vector")
    }
    ours = {p: _dora_merged(base[p], layer.delta(), layer.dora_scale) for p, layer in weights.layers.items()}
    assert max_diff(ours, merged) <= TOLERANCE
    assert max_diff(deltas_of(weights), ref) <= TOLERANCE
    kohya = {}  # the same adapter in kohya/LyCORIS naming: dora_scale stored as (out, 1[, 1, 1])
    for path, layer in weights.layers.items():
        name = "lora_unet_" + path.removeprefix("unet.").replace(".", "_")
        kohya |= {
            f"{name}.lora_down.weight": layer.down,
            f"{name}.lora_up.weight": layer.up,
            f"{name}.alpha": torch.tensor(4.0),
            f"{name}.dora_scale": layer.dora_scale.reshape(-1, *[1] * (layer.down.dim() - 1)),
        }
    back = load_state_dict(kohya)
    assert back.format == "dora"
    assert (
        max_diff(
            {p: layer.dora_scale for p, layer in back.layers.items()},
            {p: layer.dora_scale for p, layer in weights.layers.items()},
        )
        == 0
    )


@pytest.fixture(scope="module")
def tiny_shapes():
    return lora_fixtures.tiny_shapes()


LINEAR = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"
CONV3 = "unet.down_blocks.1.resnets.0.conv1"
CONV1 = "unet.up_blocks.1.resnets.0.conv_shortcut"
TEXT = "text_encoder.encoder.layers.2.mlp.fc1"  # transformers 5 flattens CLIPTextModel


def _kohya(path: str) -> str:
    """kohya's name of a module: text encoders in transformers 4's ``text_model`` layout."""
    component, name = path.split(".", 1)
    name = name if component == "unet" else f"text_model.{name}"
    return {"unet": "lora_unet_", "text_encoder": "lora_te_"}[component] + name.replace(".", "_")


def test_loha_plain_and_tucker(tiny_shapes, tmp_path):
    g = torch.Generator().manual_seed(7)
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    sd, ref, ranks = {}, {}, {}
    for path, r, tucker in (
        (LINEAR, 3, False),
        (CONV3, 2, False),
        (CONV1, 4, False),
        (TEXT, 7, False),  # 7² > 32: capped
        ("unet.up_blocks.1.resnets.1.conv2", 2, True),
    ):
        shape = tuple(tiny_shapes[path])
        out, width = shape[0], math.prod(shape[1:])
        name, alpha = _kohya(path), float(r) / 2
        if tucker:
            parts = {
                "hada_w1_a": rnd(r, out),
                "hada_w1_b": rnd(r, shape[1]),
                "hada_t1": rnd(r, r, *shape[2:]),
                "hada_w2_a": rnd(r, out),
                "hada_w2_b": rnd(r, shape[1]),
                "hada_t2": rnd(r, r, *shape[2:]),
            }
        else:  # LyCORIS stores non-Tucker conv factors flattened to in·kh·kw
            parts = {
                "hada_w1_a": rnd(out, r),
                "hada_w1_b": rnd(r, width),
                "hada_w2_a": rnd(out, r),
                "hada_w2_b": rnd(r, width),
            }
        sd |= {f"{name}.{k}": v for k, v in parts.items()} | {f"{name}.alpha": torch.tensor(alpha)}
        ref[path] = loha_dense(
            *(parts[k] for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")),
            alpha / r,
            shape,
            parts.get("hada_t1"),
            parts.get("hada_t2"),
        )
        ranks[path] = min(r * r, out, width)
    file = write(tmp_path / "loha.safetensors", sd)
    weights = load(file)
    assert weights.format == "lycoris_loha"
    assert max_diff(deltas_of(weights), ref) <= TOLERANCE
    assert {p: layer.rank for p, layer in weights.layers.items()} == ranks
    assert inspect(file).rank == max(ranks.values())
    check_against_model(weights, None, tiny_shapes)


def test_lokr_variants(tiny_shapes, tmp_path):
    g = torch.Generator().manual_seed(8)
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    # LINEAR 32×32 = 4×4 ⊗ 8×8; TEXT fc1 37×32 = 1×4 ⊗ 37×8 (37 is prime); CONV3 64×32×3×3 = 8×4 ⊗ 8×8×3×3
    cases = {  # path: (parts, alpha, the rank alpha is divided by (None: scale 1))
        LINEAR: ({"lokr_w1": rnd(4, 4), "lokr_w2_a": rnd(8, 2), "lokr_w2_b": rnd(2, 8)}, 2.0, 2),
        TEXT: ({"lokr_w1_a": rnd(1, 1), "lokr_w1_b": rnd(1, 4), "lokr_w2": rnd(37, 8)}, 0.5, 1),
        CONV3: ({"lokr_w1": rnd(8, 4), "lokr_w2": rnd(8, 8, 3, 3)}, 5.0, None),
        "unet.up_blocks.1.resnets.1.conv2": (
            {
                "lokr_w1": rnd(4, 4),
                "lokr_t2": rnd(2, 2, 3, 3),
                "lokr_w2_a": rnd(2, 8),
                "lokr_w2_b": rnd(2, 8),
            },
            1.0,
            2,
        ),
    }
    sd, ref = {}, {}
    for path, (parts, alpha, dim) in cases.items():
        shape = tuple(tiny_shapes[path])
        name = _kohya(path)
        sd |= {f"{name}.{k}": v for k, v in parts.items()}
        sd[f"{name}.alpha"] = torch.tensor(alpha)
        w1 = parts["lokr_w1"] if "lokr_w1" in parts else parts["lokr_w1_a"] @ parts["lokr_w1_b"]
        if "lokr_t2" in parts:
            w2 = torch.einsum(
                "i j k l, j r, i p -> p r k l", parts["lokr_t2"], parts["lokr_w2_b"], parts["lokr_w2_a"]
            )
        elif "lokr_w2" in parts:
            w2 = parts["lokr_w2"]
        else:
            w2 = parts["lokr_w2_a"] @ parts["lokr_w2_b"]
        ref[path] = lokr_dense(w1, w2, 1.0 if dim is None else alpha / dim, shape)
    weights = load(write(tmp_path / "lokr.safetensors", sd))
    assert weights.format == "lycoris_lokr"
    assert max_diff(deltas_of(weights), ref) <= TOLERANCE
    assert weights.layers[LINEAR].rank == 4 * 2  # rank(w1)·rank(w2)
    assert weights.layers[CONV3].rank == 4 * 8  # rank(8×4 w1) · rank(8×72 w2)
    check_against_model(weights, None, tiny_shapes)


def test_locon_tucker_mid(tiny_shapes):
    g = torch.Generator().manual_seed(9)
    out, inp = tiny_shapes[CONV3][:2]
    down, mid, up = (
        torch.randn(*s, generator=g) * 0.2 for s in ((3, inp, 1, 1), (3, 3, 3, 3), (out, 3, 1, 1))
    )
    name = _kohya(CONV3)
    sd = {
        f"{name}.lora_down.weight": down,
        f"{name}.lora_mid.weight": mid,
        f"{name}.lora_up.weight": up,
        f"{name}.alpha": torch.tensor(1.5),
    }
    ref = torch.einsum("i j k l, p i, j r -> p r k l", mid, up[:, :, 0, 0], down[:, :, 0, 0]) * 1.5 / 3
    weights = load_state_dict(sd)
    assert weights.layers[CONV3].mid is not None
    assert max_diff(deltas_of(weights), {CONV3: ref}) <= TOLERANCE
    check_against_model(weights, None, tiny_shapes)


# SDXL's SGM/LDM module names as kohya-ss writes them, and the diffusers module each one is.
SDXL_LDM = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",  # noqa: E501
    "lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_2": "unet.down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2",  # noqa: E501
    "lora_unet_middle_block_1_proj_in": "unet.mid_block.attentions.0.proj_in",
    "lora_unet_output_blocks_2_1_transformer_blocks_3_attn1_to_out_0": "unet.up_blocks.0.attentions.2.transformer_blocks.3.attn1.to_out.0",  # noqa: E501
    "lora_unet_input_blocks_4_0_in_layers_2": "unet.down_blocks.1.resnets.0.conv1",
    "lora_unet_input_blocks_4_0_skip_connection": "unet.down_blocks.1.resnets.0.conv_shortcut",
    "lora_unet_output_blocks_5_0_emb_layers_1": "unet.up_blocks.1.resnets.2.time_emb_proj",
    "lora_unet_output_blocks_2_2_conv": "unet.up_blocks.0.upsamplers.0.conv",
    "lora_unet_input_blocks_3_0_op": "unet.down_blocks.0.downsamplers.0.conv",
    "lora_unet_middle_block_2_out_layers_3": "unet.mid_block.resnets.1.conv2",
    "lora_unet_time_embed_0": "unet.time_embedding.linear_1",
    "lora_unet_label_emb_0_2": "unet.add_embedding.linear_2",
    "lora_te1_text_model_encoder_layers_11_self_attn_k_proj": "text_encoder.encoder.layers.11.self_attn.k_proj",  # noqa: E501
    "lora_te2_text_model_encoder_layers_31_mlp_fc2": "text_encoder_2.text_model.encoder.layers.31.mlp.fc2",
}


def test_sdxl_sgm_names(tmp_path):
    shapes = architecture_shapes("sdxl")
    sd, ref = random_kohya(SDXL_LDM, shapes)
    file = write(tmp_path / "sdxl.safetensors", sd)
    weights = load(file)
    assert weights.family == "sdxl"
    assert max_diff(deltas_of(weights), ref) <= TOLERANCE
    check_against_model(weights, "sdxl", shapes)
    info = inspect(file)
    assert (info.family, info.num_modules, info.rank) == ("sdxl", len(SDXL_LDM), 2)
    assert info.components == {"unet", "text_encoder", "text_encoder_2"}


def test_sd15_diffusers_names_family_from_shapes():
    shapes = architecture_shapes("sd1")
    paths = [
        "unet.down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k",
        "unet.mid_block.attentions.0.proj_out",
        "unet.up_blocks.3.resnets.2.conv2",
        "text_encoder.encoder.layers.7.mlp.fc1",
    ]
    sd, ref = random_kohya({_kohya(p): p for p in paths}, shapes, seed=1)
    weights = load_state_dict(sd)
    assert weights.family == "sd1"
    assert max_diff(deltas_of(weights), ref) <= TOLERANCE
    check_against_model(weights, "sd1", shapes)


def test_load_state_dict_is_pure(peft_sd):
    before = {k: v.clone() for k, v in peft_sd.items()}
    keys = list(peft_sd)
    weights = load_state_dict(peft_sd, {"ss_output_name": "x"})
    assert list(peft_sd) == keys and all(torch.equal(peft_sd[k], before[k]) for k in keys)
    layer = next(iter(weights.layers.values()))
    layer.down.add_(1.0)  # the result owns its tensors
    assert all(torch.equal(peft_sd[k], before[k]) for k in keys)
    assert layer.down.dtype == torch.float32 and layer.down.device.type == "cpu"


def test_half_precision_file_loads_as_float32(reference, tmp_path):
    pipe, ref = reference
    sd = {f"unet.{k}": v.to(torch.bfloat16) for k, v in get_peft_model_state_dict(pipe.unet).items()}
    weights = load(write(tmp_path / "bf16.safetensors", sd))
    assert {layer.up.dtype for layer in weights.layers.values()} == {torch.float32}
    unet_ref = {k: v for k, v in ref.items() if k.startswith("unet.")}
    assert (
        max_diff(deltas_of(weights), {k: v / _scale(k) for k, v in unet_ref.items()}) <= 0.01
    )  # bf16 rounding
