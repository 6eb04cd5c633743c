"""The ``blocks`` and ``schedule`` policies read sd-webui-lora-block-weight (hako-mikan) and sd-webui-loractl
(cheald) syntax as those extensions do, and their exports parse back to the same per-layer, per-step weights.

Reference values are copied from hako-mikan/sd-webui-lora-block-weight ``scripts/lora_block_weight.py``
(BLOCKID*, DEF_WEIGHT_PRESET, ratiodealer, loradealer) and cheald/sd-webui-loractl ``loractl/lib/utils.py``
and ``test/tests.py``.
"""

from __future__ import annotations

import pytest
import torch

from pipelines.blocks import BLOCKID12, BLOCKID17, UnetLayout, block_id, preset, vector_weights
from pipelines.fusion import AdapterInfo, FusionContext, LayerInfo, make_policy
from pipelines.fusion.blocks import parse_block_spec, to_lbw
from pipelines.fusion.schedule import keyframe_value, loractl_entry, parse_keyframes, to_loractl
from pipelines.recipe import parse_lora_tags

SD15 = UnetLayout(
    ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, 2
)
SDXL = UnetLayout(
    ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    2,
)

# sd-webui-lora-block-weight, scripts/lora_block_weight.py
LBW_BLOCKID26 = ["BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12))]
LBW_BLOCKID17 = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00"] + [
    f"OUT{i:02d}" for i in range(3, 12)
]
LBW_BLOCKID12 = [
    "BASE",
    "IN04",
    "IN05",
    "IN07",
    "IN08",
    "M00",
    "OUT00",
    "OUT01",
    "OUT02",
    "OUT03",
    "OUT04",
    "OUT05",
]
LBW_BLOCKID20 = ["BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9))]
LBW_PRESETS = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
}


def context(paths: list[str], layout: UnetLayout, n_adapters: int = 1) -> FusionContext:
    """A fusion context over ``paths`` (every adapter on every layer, weight 1), no model needed."""
    layers = tuple(LayerInfo(p, block_id(p, layout)) for p in paths)
    factors = {(li, ai): torch.zeros(1) for li in range(len(layers)) for ai in range(n_adapters)}
    adapters = tuple(AdapterInfo(f"a{i}") for i in range(n_adapters))
    return FusionContext(layers, adapters, factors, layout=layout)


def block_multipliers(spec: object, paths: list[str], layout: UnetLayout) -> list[float]:
    policy = make_policy("blocks", {"blocks": spec})
    policy.prepare(context(paths, layout))
    return policy.gates(0, 1)[:, 0].tolist()


# --- block ids and presets ---------------------------------------------------------------------------


def test_block_lists_are_the_extensions():
    assert list(BLOCKID17) == LBW_BLOCKID17 and list(BLOCKID12) == LBW_BLOCKID12
    assert list(SD15.attention_ids()) == LBW_BLOCKID17 and list(SD15.all_ids()) == LBW_BLOCKID26
    assert list(SDXL.attention_ids()) == LBW_BLOCKID12 and list(SDXL.all_ids()) == LBW_BLOCKID20


@pytest.mark.parametrize(
    "layout,path,expected",
    [
        # diffusers path → LDM key LBW matches (A1111 converts kohya names to these)
        (SD15, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj", "BASE"),
        (SD15, "unet.conv_in", "IN00"),  # input_blocks_0
        (SD15, "unet.down_blocks.0.resnets.0.conv1", "IN01"),  # input_blocks_1_0
        (SD15, "unet.down_blocks.0.attentions.0.proj_in", "IN01"),  # input_blocks_1_1
        (SD15, "unet.down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k", "IN02"),
        (SD15, "unet.down_blocks.0.downsamplers.0.conv", "IN03"),  # input_blocks_3_0_op
        (SD15, "unet.down_blocks.2.attentions.1.proj_out", "IN08"),
        (SD15, "unet.down_blocks.3.resnets.1.conv2", "IN11"),
        (SD15, "unet.mid_block.attentions.0.proj_in", "M00"),
        (SD15, "unet.up_blocks.0.upsamplers.0.conv", "OUT02"),  # output_blocks_2_1_conv
        (SD15, "unet.up_blocks.1.attentions.0.proj_in", "OUT03"),
        (SD15, "unet.up_blocks.1.upsamplers.0.conv", "OUT05"),  # output_blocks_5_2_conv
        (SD15, "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_q", "OUT11"),
        (SDXL, "text_encoder_2.text_model.encoder.layers.3.mlp.fc1", "BASE"),
        (SDXL, "unet.down_blocks.0.resnets.1.conv1", "IN02"),
        (SDXL, "unet.down_blocks.1.attentions.0.proj_in", "IN04"),
        (SDXL, "unet.down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_v", "IN08"),
        (SDXL, "unet.up_blocks.0.attentions.2.proj_out", "OUT02"),
        (SDXL, "unet.up_blocks.1.attentions.0.proj_in", "OUT03"),
        (SDXL, "unet.up_blocks.2.resnets.2.conv1", "OUT08"),
    ],
)
def test_module_paths_map_to_the_ldm_block(layout, path, expected):
    assert block_id(path, layout) == expected


@pytest.mark.parametrize("name", [n for n in LBW_PRESETS if n not in ("ALL", "ALL0.5")])
def test_sd15_presets_are_the_extension_vectors(name):
    values = [float(v) for v in LBW_PRESETS[name].split(",")]
    expected = dict.fromkeys(LBW_BLOCKID26, 0.0) | dict(zip(LBW_BLOCKID17, values, strict=True))
    assert preset(name, SD15) == expected
    assert vector_weights(values, SD15) == expected


@pytest.mark.parametrize("name,value", [("ALL", 1.0), ("ALL0.5", 0.5)])
def test_all_presets_cover_every_block(name, value):
    """Intentional difference (documented): LBW's 17-value ALL zeroes the 9 blocks without attention."""
    weights = preset(name, SD15)
    assert [weights[b] for b in LBW_BLOCKID17] == [float(v) for v in LBW_PRESETS[name].split(",")]
    assert set(weights.values()) == {value} and len(weights) == 26


def test_sdxl_presets_cut_the_twelve_attention_blocks():
    def vec(name: str) -> list[float]:
        w = preset(name, SDXL)
        return [w[b] for b in LBW_BLOCKID12]

    assert vec("INS") == [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    assert vec("IND") == [1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    assert vec("MIDD") == [1, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0]
    assert vec("OUTD") == [1, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0]
    assert vec("OUTS") == [1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1]
    assert preset("OUTD", SDXL)["IN02"] == 0.0 and preset("OUTD", SDXL)["OUT06"] == 0.0


# --- which modules a block weight reaches -------------------------------------------------------------

UNBLOCKED_SD15 = [
    "unet.time_embedding.linear_1",
    "unet.time_embedding.linear_2",
    "unet.conv_norm_out",
    "unet.conv_out",
]


@pytest.mark.parametrize("spec", ["NONE", "OUTD", "INS", "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0", {"IN00": 0.0}])
def test_modules_outside_every_block_keep_weight_one(spec):
    """LBW's ratiodealer matches no block in time_embed / out.0 / out.2 / label_emb keys: ratio stays 1."""
    paths = [*UNBLOCKED_SD15, "unet.conv_in"]
    assert block_multipliers(spec, paths, SD15) == [1.0, 1.0, 1.0, 1.0, 0.0]


def test_sdxl_added_embedding_keeps_weight_one():
    paths = [
        "unet.add_embedding.linear_1",
        "unet.time_embedding.linear_1",
        "unet.down_blocks.1.attentions.0.proj_in",
    ]
    assert block_multipliers("OUTD", paths, SDXL) == [1.0, 1.0, 0.0]


def test_vector_weights_reach_the_right_layers():
    paths = [
        "text_encoder.text_model.encoder.layers.0.mlp.fc1",
        "unet.down_blocks.0.attentions.0.proj_in",
        "unet.down_blocks.0.downsamplers.0.conv",
        "unet.mid_block.attentions.0.proj_in",
        "unet.up_blocks.3.attentions.2.proj_out",
    ]
    vector = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1,1.1,1.2,1.3,1.4,1.5,1.6,1.7"
    assert block_multipliers(vector, paths, SD15) == pytest.approx([0.1, 0.2, 0.0, 0.8, 1.7])
    assert block_multipliers(f"lbw={vector}", paths, SD15) == block_multipliers(vector, paths, SD15)


# --- special values and malformed vectors -------------------------------------------------------------


def test_inherited_weight_values():
    """LBW's ``X``, ``X+d``, ``X-d``: the inherited weight (1 without ``x=``), plus or minus d."""
    weights = parse_block_spec("X,X+0.25,X-0.5,1e-1,0,0,0,0,0,0,0,0,0,0,0,0,0", SD15)
    assert [weights[b] for b in ("BASE", "IN01", "IN02", "IN04")] == [1.0, 1.25, 0.5, 0.1]


@pytest.mark.parametrize(
    "spec,message",
    [
        ("R,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1", "random"),
        ("1,1,1,1,1,1,1,1,U,1,1,1,1,1,1,1,1", "random"),
        ("1,1,,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1", "empty"),
        ("1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,", "empty"),
        ("1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,abc", "'abc'"),
        ("1,0,0", "17 or 26 values, got 3"),
    ],
)
def test_bad_vectors_are_refused_with_the_reason(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_block_spec(spec, SD15)


def test_an_sd15_vector_is_refused_on_sdxl():
    with pytest.raises(ValueError, match="12 or 20 values, got 17"):
        parse_block_spec(LBW_PRESETS["OUTD"], SDXL)


# --- loractl keyframes ---------------------------------------------------------------------------------


def test_loractl_reference_parsing():
    """cheald/sd-webui-loractl test/tests.py: test_sorted_positions (ours: positions, weights)."""
    assert parse_keyframes("1") == 1.0
    assert parse_keyframes("1@0,0.5@3,1@6") == ([0.0, 3.0, 6.0], [1.0, 0.5, 1.0])
    assert parse_keyframes("0.5@3,1@6,1@0") == ([0.0, 3.0, 6.0], [1.0, 0.5, 1.0])
    assert parse_keyframes("0.5@0,0.5@0.5,0@1") == ([0.0, 0.5, 1.0], [0.5, 0.5, 0.0])
    assert parse_keyframes("1@0;0.5@3;1@6") == ([0.0, 3.0, 6.0], [1.0, 0.5, 1.0])
    assert parse_keyframes("0@0,1") == ([0.0, 1.0], [0.0, 1.0])  # a bare later weight sits at position 1


def test_loractl_reference_absolute_steps():
    """cheald/sd-webui-loractl test/tests.py: test_weight_interpolation (positions > 1 are step numbers)."""
    frames = parse_keyframes("0.75@0;0.5@3;1@6")
    assert [keyframe_value(frames, s, 30) for s in (0, 3, 6, 9)] == [0.75, 0.5, 1.0, 1.0]
    frames = parse_keyframes("0.5@5,1.0@10")
    assert [keyframe_value(frames, s, 30) for s in (0, 5, 8, 15)] == pytest.approx([0.5, 0.5, 0.8, 1.0])
    assert [keyframe_value(parse_keyframes("1.0"), s, 30) for s in (0, 15, 30)] == [1.0, 1.0, 1.0]


def test_fractional_positions_span_first_to_last_step():
    ramp = parse_keyframes("0@0,1@1")
    assert [keyframe_value(ramp, s, 5) for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    late = parse_keyframes("0.25@0.5,1@1")  # before the first keyframe: its weight (loractl README)
    assert [keyframe_value(late, s, 11) for s in (0, 3, 5, 8, 10)] == pytest.approx(
        [0.25, 0.25, 0.25, 0.7, 1.0]
    )
    early = parse_keyframes("1@0,0@0.5")  # after the last keyframe: its weight
    assert [keyframe_value(early, s, 5) for s in range(5)] == [1.0, 0.5, 0.0, 0.0, 0.0]


def test_a_bare_first_weight_followed_by_keyframes_is_refused():
    """loractl returns the first number as a constant and drops the rest; we refuse instead."""
    with pytest.raises(ValueError, match="bare weight"):
        parse_keyframes("0.5,1@1")


def schedule_table(
    spec: object, paths: list[str], layout: UnetLayout, steps: int, n: int = 1, **kw
) -> torch.Tensor:
    """(steps × layers × adapters) gates of the schedule policy."""
    policy = make_policy("schedule", {"schedule": spec, **kw})
    policy.prepare(context(paths, layout, n))
    return torch.stack([policy.gates(s, steps) for s in range(steps)])


MIXED = [
    "text_encoder.text_model.encoder.layers.0.mlp.fc1",
    "unet.down_blocks.0.attentions.0.proj_in",
    "unet.up_blocks.3.attentions.2.proj_out",
]


def test_a_list_of_numbers_is_one_constant_per_adapter():
    table = schedule_table([0.5, 2.0], MIXED, SD15, steps=3, n=2)
    assert torch.equal(table[:, :, 0], torch.full((3, 3), 0.5))
    assert torch.equal(table[:, :, 1], torch.full((3, 3), 2.0))
    with pytest.raises(ValueError, match="3 entries for 2 adapters"):
        schedule_table([0.5, 2.0, 1.0], MIXED, SD15, steps=3, n=2)


def test_separate_text_encoder_and_unet_keyframes():
    """loractl ``te=1:unet=0@0,1@1``: text encoder at 1, UNet ramping; ``unet`` falls back to ``te``."""
    table = schedule_table(loractl_entry("1", "0@0,1@1"), MIXED, SD15, steps=5)
    assert table[:, 0, 0].tolist() == [1.0] * 5
    assert table[:, 1, 0].tolist() == table[:, 2, 0].tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    table = schedule_table(loractl_entry("0.2@0,1@1", None), MIXED, SD15, steps=5)
    assert table[:, 0, 0].tolist() == pytest.approx([0.2] * 5)  # text encoders: the step-0 value
    assert table[:, 1, 0].tolist() == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert loractl_entry("0.5", "0.5") == "0.5"


# --- round trips through the A1111 syntax -------------------------------------------------------------


def test_keyframes_round_trip_exactly():
    frames = ([0.0, 1 / 3, 0.5, 1.0], [0.123456789, 1 / 7, 1e-5, 2.0])
    text = to_loractl(frames)
    assert "e" not in text  # plain decimals: A1111 prompt tags take digits, '.', '@', ','
    assert parse_keyframes(text) == frames
    assert to_loractl(0.1) == "0.1" and parse_keyframes(to_loractl(1 / 3)) == 1 / 3


def test_block_vectors_round_trip_exactly():
    short = parse_block_spec(",".join(["0.1", str(1 / 3), *["0"] * 14, "2"]), SD15)
    assert to_lbw(short, SD15).count(",") == 16 and parse_block_spec(to_lbw(short, SD15), SD15) == short
    full = preset("ALL0.5", SD15) | {"IN03": 1e-5}
    assert to_lbw(full, SD15).count(",") == 25 and parse_block_spec(to_lbw(full, SD15), SD15) == full
    assert to_lbw(preset("OUTD", SDXL), SDXL) == "1,0,0,0,0,0,1,1,1,0,0,0"


def test_schedule_with_blocks_round_trips_through_the_tag_syntax():
    """A rank-one schedule × block recipe → ``<lora:name:te=…:unet=…>`` + LBW vector → parsed back: same
    gates for every layer and step."""
    paths = [*MIXED, "unet.mid_block.attentions.0.proj_in", "unet.time_embedding.linear_1"]
    te, unet, blocks = "0.3@0,1@0.6", f"1@0,{1 / 3}@0.5,0@1", "OUTALL"
    original = schedule_table(loractl_entry(te, unet), paths, SD15, steps=7, blocks=blocks)

    te_text, unet_text = to_loractl(parse_keyframes(te)), to_loractl(parse_keyframes(unet))
    vector = to_lbw(parse_block_spec(blocks, SD15), SD15)
    _, tags = parse_lora_tags(f"a cat <lora:style:te={te_text}:unet={unet_text}>")
    replayed = schedule_table(loractl_entry(tags[0].te, tags[0].unet), paths, SD15, steps=7, blocks=vector)
    assert torch.equal(replayed, original)
    unet_curve = [1, 7 / 9, 5 / 9, 1 / 3, 2 / 9, 1 / 9, 0]
    assert original[:, 0, 0].tolist() == pytest.approx([0.3] * 7)  # BASE: the te schedule's step-0 value
    assert original[:, 1, 0].tolist() == [0.0] * 7  # IN01 is off in OUTALL
    assert original[:, 2, 0].tolist() == pytest.approx(unet_curve)  # OUT11 is on
    assert original[:, 3, 0].tolist() == [0.0] * 7  # M00 is off
    assert original[:, 4, 0].tolist() == pytest.approx(unet_curve)  # time embedding: in no block
