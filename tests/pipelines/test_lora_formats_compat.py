"""LoRA files as the tools in the wild write them: kohya-ss / LyCORIS / A1111 key layouts and metadata,
and kohya files of ours read by diffusers' own kohya converter."""

from __future__ import annotations

import json
import struct
from types import SimpleNamespace

import pytest
import safetensors
import safetensors.torch
import torch
from diffusers.loaders.lora_conversion_utils import (
    _convert_non_diffusers_lora_to_diffusers,
    _maybe_map_sgm_blocks_to_diffusers,
)
from diffusers.utils.state_dict_utils import (
    DIFFUSERS_OLD_TO_PEFT,
    convert_state_dict,
    convert_unet_state_dict_to_peft,
)

from pipelines.lora_formats import (
    LoraFormatError,
    NotSafetensorsError,
    UnknownFormatError,
    architecture_shapes,
    check_against_model,
    detect_family,
    inspect,
    load,
    load_state_dict,
    save_kohya,
)
from pipelines.lora_formats.architectures import canonical_path
from pipelines.lora_weights import LoraLayer, LoraWeights
from tests.pipelines.lora_fixtures import TOLERANCE, deltas_of, max_diff, random_kohya, write

ATTN2_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"

# SD 1.x modules under their LDM/SGM names, as kohya-ss's compvis conversion (networks/lora.py) and
# some exporters write them: blocks 1 and 11 together (diffusers' SGM map gathers block ids by
# prefix), and the first up level's upsampler at output_blocks_2_1 (no attention at that level).
SD1_LDM = {
    "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k": "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",  # noqa: E501
    "lora_unet_input_blocks_1_0_in_layers_2": "unet.down_blocks.0.resnets.0.conv1",
    "lora_unet_input_blocks_10_0_emb_layers_1": "unet.down_blocks.3.resnets.0.time_emb_proj",
    "lora_unet_input_blocks_11_0_out_layers_3": "unet.down_blocks.3.resnets.1.conv2",
    "lora_unet_input_blocks_9_0_op": "unet.down_blocks.2.downsamplers.0.conv",
    "lora_unet_middle_block_1_proj_in": "unet.mid_block.attentions.0.proj_in",
    "lora_unet_output_blocks_1_0_skip_connection": "unet.up_blocks.0.resnets.1.conv_shortcut",
    "lora_unet_output_blocks_2_1_conv": "unet.up_blocks.0.upsamplers.0.conv",
    "lora_unet_output_blocks_5_2_conv": "unet.up_blocks.1.upsamplers.0.conv",
    "lora_unet_output_blocks_11_1_transformer_blocks_0_ff_net_2": "unet.up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2",  # noqa: E501
    "lora_te_text_model_encoder_layers_11_mlp_fc1": "text_encoder.encoder.layers.11.mlp.fc1",
}


def test_sd1_lora_with_ldm_block_names(tmp_path):
    shapes = architecture_shapes("sd1")
    sd, ref = random_kohya(SD1_LDM, shapes, seed=3)
    file = write(tmp_path / "sd1_ldm.safetensors", sd)
    weights = load(file)
    assert weights.family == "sd1"  # not SDXL: these block numbers exist only in the four-level UNet
    assert max_diff(deltas_of(weights), ref) <= TOLERANCE
    check_against_model(weights, "sd1", shapes)
    assert inspect(file).family == "sd1"


# Family from SGM block names: their UNet layout decides only where the cross-attention width does not.
@pytest.mark.parametrize(
    ("shapes", "expected"),
    [
        ({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": (4, 320)}, None),  # SD 1.x or 2.x
        ({"lora_unet_output_blocks_2_1_conv.lora_down.weight": (4, 1280, 3, 3)}, None),
        (
            {
                "lora_unet_output_blocks_11_1_proj_in.lora_down.weight": (4, 320),
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 1024),
            },
            "sd2",
        ),
        ({"lora_unet_output_blocks_0_1_proj_in.lora_down.weight": (4, 1280)}, "sdxl"),  # SDXL-only
        (
            {
                "lora_unet_input_blocks_4_1_proj_in.lora_down.weight": (4, 640),
                "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 768),
            },
            "sdxl",  # the layout fits SDXL only by default; CLIP-L alone does not make it SD 1.x
        ),
    ],
)
def test_family_from_sgm_block_layout(shapes, expected):
    assert detect_family(shapes, {}) == expected


def _lora_file(tmp_path, metadata: dict[str, str]):
    g = torch.Generator().manual_seed(0)
    sd = {
        f"{ATTN2_K}.lora_down.weight": torch.randn(2, 768, generator=g),
        f"{ATTN2_K}.lora_up.weight": torch.randn(320, 2, generator=g),
    }
    return write(tmp_path / "meta.safetensors", sd, metadata)


# JSON that Python refuses with RecursionError or ValueError (its 4300-digit integer limit)
HOSTILE_JSON = ["[" * 100_000, "9" * 5000, '{"d": {"x": ' + "9" * 5000 + "}}"]


@pytest.mark.parametrize("raw", HOSTILE_JSON)
def test_garbage_metadata_does_not_break_inspect(tmp_path, raw):
    tags = json.dumps({"10_x": {"xyz": 9, "blue": 2}})
    info = inspect(_lora_file(tmp_path, {"ss_tag_frequency": raw, "ss_output_name": "x"}))
    assert (info.trigger_words, info.family) == ([], "sd1")
    info = inspect(_lora_file(tmp_path, {"ss_tag_frequency": tags, "ss_dataset_dirs": raw}))
    assert info.trigger_words == ["xyz"]  # a broken ss_dataset_dirs only loses the picture counts
    assert load(_lora_file(tmp_path, {"ss_tag_frequency": raw})).family == "sd1"


def test_deeply_nested_header_is_not_a_safetensors_file(tmp_path):
    header = b"[" * 100_000
    file = tmp_path / "deep.safetensors"
    file.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(NotSafetensorsError, match="header is not JSON"):
        inspect(file)


@pytest.mark.parametrize(
    "raw",
    ['{"unet.r": "2"}', '{"unet.lora_alpha": [1]}', '{"unet.rank_pattern": [1]}', "9" * 5000, "[" * 100_000],
)
def test_garbage_diffusers_adapter_metadata_is_a_format_error(raw):
    sd = {"unet.mid_block.attentions.0.proj_in.lora_A.weight": torch.ones(2, 4)}
    sd["unet.mid_block.attentions.0.proj_in.lora_B.weight"] = torch.ones(4, 2)
    with pytest.raises(UnknownFormatError, match=r"lora_adapter_metadata|adapter config"):
        load_state_dict(sd, {"lora_adapter_metadata": raw})


@pytest.mark.parametrize(
    ("alpha", "scale"),
    [
        (torch.tensor(3.0, dtype=torch.float16), 3 / 4),
        (torch.tensor(2.5, dtype=torch.bfloat16), 2.5 / 4),
        (torch.tensor([8.0]), 8 / 4),
        (torch.tensor(0.0), 1.0),  # kohya / LyCORIS: alpha 0 means alpha = rank
        (None, 1.0),  # old kohya files without alpha
    ],
)
def test_kohya_alpha_scale(alpha, scale):
    g = torch.Generator().manual_seed(1)
    down, up = torch.randn(4, 768, generator=g), torch.randn(320, 4, generator=g)
    sd = {f"{ATTN2_K}.lora_down.weight": down, f"{ATTN2_K}.lora_up.weight": up}
    if alpha is not None:
        sd[f"{ATTN2_K}.alpha"] = alpha
    (layer,) = load_state_dict(sd).layers.values()
    assert torch.allclose(layer.delta(), scale * up @ down, atol=TOLERANCE)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "pocket"])
def test_diffusers_kohya_converter_names_every_module_of_our_kohya_files(family, tmp_path):
    """diffusers' load_lora_weights path for kohya files (SGM map, kohya converter, PEFT renaming)
    finds each module of ours, one for one; SDXL's ``text_projection`` is a module it has no name for."""
    shapes = {p: s for p, s in architecture_shapes(family).items() if not p.endswith("text_projection")}
    layers = {
        path: LoraLayer(torch.zeros(1, *shape[1:]), torch.zeros(shape[0], 1, *[1] * (len(shape) - 2)))
        for path, shape in shapes.items()
    }
    file = tmp_path / "all.safetensors"
    save_kohya(LoraWeights(layers, family), file)
    sd = safetensors.torch.load_file(str(file))
    sd = _maybe_map_sgm_blocks_to_diffusers(sd, SimpleNamespace(layers_per_block=2))
    converted, _ = _convert_non_diffusers_lora_to_diffusers(sd)
    downs = [k for k in converted if ".down." in k]
    unet_downs = {k.removeprefix("unet."): k for k in downs if k.startswith("unet.")}
    unet = convert_unet_state_dict_to_peft(unet_downs)
    text = convert_state_dict({k: k for k in downs if not k.startswith("unet.")}, DIFFUSERS_OLD_TO_PEFT)
    found = [canonical_path(f"unet.{k}") for k in unet] + [canonical_path(k) for k in text]
    found = [path.removesuffix(".lora_A.weight") for path in found]
    assert len(downs) == len(layers)  # no two of our modules collapse onto one diffusers name
    assert sorted(found) == sorted(layers)
    assert load(file).layers.keys() == layers.keys()  # and we read our own names back


def test_rewritten_kohya_file_drops_the_source_hash(tmp_path):
    layer = LoraLayer(torch.ones(1, 768), torch.ones(320, 1), alpha=1.0)
    path = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    metadata = {"modelspec.hash_sha256": "0x" + "ab" * 32, "sshs_model_hash": "cd" * 32}
    metadata["ss_output_name"] = "x"
    save_kohya(LoraWeights({path: layer}, "sd1", metadata), tmp_path / "copy.safetensors")
    with safetensors.safe_open(str(tmp_path / "copy.safetensors"), "pt") as f:
        written = f.metadata()
    assert written["ss_output_name"] == "x"
    assert "modelspec.hash_sha256" not in written and "sshs_model_hash" not in written


@pytest.mark.parametrize(
    ("part", "kind"),
    [
        ("diff_b", "LyCORIS full"),
        ("b_norm", "norm layers"),
        ("scalar", "use_scalar"),
        ("bias", "bias update"),
    ],
)
def test_lycoris_extra_parts_are_refused_by_name(part, kind, tmp_path):
    g = torch.Generator().manual_seed(2)
    sd = {
        f"{ATTN2_K}.lora_down.weight": torch.randn(2, 768, generator=g),
        f"{ATTN2_K}.lora_up.weight": torch.randn(320, 2, generator=g),
        f"{ATTN2_K}.{part}": torch.ones(320),
    }
    with pytest.raises(UnknownFormatError, match=rf"'{ATTN2_K}\.{part}'.*{kind}.*not supported"):
        load_state_dict(sd)
    with pytest.raises(UnknownFormatError, match=kind):
        inspect(write(tmp_path / "extra.safetensors", sd))


def _a1111_weight_decompose(
    updown: torch.Tensor, orig: torch.Tensor, dora_scale: torch.Tensor
) -> torch.Tensor:
    """A1111 extensions-builtin/Lora/network.py ``apply_weight_decompose`` (input-axis magnitudes)."""
    merged = updown + orig
    dim = orig.dim() - 1
    norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
    norm = norm.reshape(merged.shape[1], *[1] * dim).transpose(0, 1)
    return merged * (dora_scale / norm) - orig


@pytest.mark.parametrize("conv", [False, True])
def test_dora_per_input_channel_loads_and_applies_like_a1111(tmp_path, conv):
    from pipelines.engine import dora_delta
    from pipelines.lora_formats import save_diffusers

    g = torch.Generator().manual_seed(3)
    width, rank = 32, 4  # a square weight: the magnitude's shape, not its size, tells the axis
    name = (
        "lora_unet_down_blocks_0_resnets_0_conv1" if conv else "lora_unet_down_blocks_0_attentions_0_proj_in"
    )
    kernel = (3, 3) if conv else ()
    down = torch.randn(rank, width, *kernel, generator=g) * 0.1
    up = torch.randn(width, rank, *[1] * len(kernel), generator=g) * 0.1
    orig = torch.randn(width, width, *kernel, generator=g)
    magnitude = torch.rand(1, width, *[1] * len(kernel), generator=g) + 0.5  # LyCORIS wd_on_output=False
    sd = {
        f"{name}.lora_down.weight": down,
        f"{name}.lora_up.weight": up,
        f"{name}.alpha": torch.tensor(2.0),
        f"{name}.dora_scale": magnitude,
    }
    weights = load(write(tmp_path / "dora.safetensors", sd))
    (layer,) = weights.layers.values()
    assert layer.dora_axis == 1 and layer.dora_scale.shape == (width,)
    updown = (up.flatten(1) @ down.flatten(1)).reshape(orig.shape) * (2.0 / rank)
    expected = _a1111_weight_decompose(updown, orig, magnitude)
    assert torch.allclose(dora_delta(orig, layer), expected, atol=1e-5)
    rows = dora_delta(orig, LoraLayer(layer.down, layer.up, layer.alpha, dora_scale=layer.dora_scale))
    assert not torch.allclose(rows, expected, atol=1e-3)  # the other axis is a different update
    save_kohya(weights, tmp_path / "copy.safetensors")
    with safetensors.safe_open(str(tmp_path / "copy.safetensors"), "pt") as f:
        assert tuple(f.get_tensor(f"{name}.dora_scale").shape) == tuple(magnitude.shape)
        assert json.loads(f.metadata()["ss_network_args"])["wd_on_output"] == "False"
    again = load(tmp_path / "copy.safetensors")
    assert torch.allclose(dora_delta(orig, next(iter(again.layers.values()))), expected, atol=1e-5)
    with pytest.raises(LoraFormatError, match="no PEFT/diffusers form"):
        save_diffusers(weights, tmp_path / "d.safetensors")
