"""Family and format detection, trigger words, pipeline family, module shapes, header-only inspection."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn

from pipelines.lora_formats import (
    detect_family,
    detect_format,
    inspect,
    load,
    module_shapes,
    pipeline_family,
    trigger_words,
)
from pipelines.lora_formats.architectures import UNET_CONFIGS
from pipelines.pocket.model import PocketConfig, build_unet
from pipelines.tiny import build_tiny_pipeline
from tests.pipelines.lora_fixtures import lora_config, write

ATTN2_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
FAMILY_CASES = [
    # metadata decides first
    ({}, {"ss_base_model_version": "sd_v1"}, "sd1"),
    ({}, {"ss_base_model_version": "sd_v2_768_v"}, "sd2"),
    ({}, {"ss_base_model_version": "sdxl_base_v1-0"}, "sdxl"),
    ({}, {"ss_base_model_version": "pocket_v1"}, "pocket"),
    ({}, {"modelspec.architecture": "stable-diffusion-v1/lora"}, "sd1"),
    ({}, {"modelspec.architecture": "stable-diffusion-v2-768-v/lora"}, "sd2"),
    ({}, {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, "sdxl"),
    ({}, {"modelspec.architecture": "adapter-studio-pocket/lora"}, "pocket"),
    ({}, {"modelspec.architecture": "stable-diffusion-xl-v1-refiner/lora"}, None),
    ({}, {"ss_v2": "True"}, "sd2"),
    ({f"{ATTN2_K}.lora_down.weight": (4, 768)}, {"ss_base_model_version": "sdxl_base_v1-0"}, "sdxl"),
    # then names only SDXL LoRAs have
    ({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (4, 1280)}, {}, "sdxl"),
    ({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": (4, 640)}, {}, "sdxl"),
    ({"text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": (4, 1280)}, {}, "sdxl"),
    (
        {"unet.down_blocks.2.attentions.0.transformer_blocks.5.attn1.to_q.lora_A.weight": (4, 1280)},
        {},
        "sdxl",
    ),
    (
        {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 768)},
        {},
        "sd1",
    ),  # te1 alone
    # then layer widths: cross-attention key input, else text-encoder width
    ({f"{ATTN2_K}.lora_down.weight": (4, 768)}, {}, "sd1"),
    ({"unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": (4, 1024)}, {}, "sd2"),
    (
        {
            "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.down.weight": (
                4,
                2048,
            )
        },
        {},
        "sdxl",
    ),
    ({f"{ATTN2_K}.hada_w1_b": (4, 64), f"{ATTN2_K}.hada_w1_a": (320, 4)}, {}, "pocket"),
    ({f"{ATTN2_K}.lokr_w1": (4, 8), f"{ATTN2_K}.lokr_w2": (80, 96)}, {}, "sd1"),  # in = 8·96
    (
        {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (320, 768)},
        {},
        "sd1",
    ),  # weight shapes
    ({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 1024)}, {}, "sd2"),
    ({f"{ATTN2_K}.lora_up.weight": (320, 4)}, {}, None),  # an up factor says nothing about the input
    ({f"{ATTN2_K}.lora_down.weight": (4, 32)}, {}, None),  # the tiny test model
]


@pytest.mark.parametrize(("shapes", "metadata", "expected"), FAMILY_CASES)
def test_detect_family(shapes, metadata, expected):
    assert detect_family(shapes, metadata) == expected


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (["lora_unet_x.lora_down.weight", "lora_unet_x.lora_up.weight", "lora_unet_x.alpha"], "kohya"),
        (["lora_unet_x.hada_w1_a", "lora_unet_x.alpha"], "lycoris_loha"),
        (["lora_unet_x.lokr_w1", "lora_unet_x.lokr_w2"], "lycoris_lokr"),
        (["lora_unet_x.lora_down.weight", "lora_unet_x.dora_scale"], "dora"),
        (["unet.x.lora_A.weight", "unet.x.lora_magnitude_vector"], "dora"),
        (["base_model.model.x.lora_A.weight"], "peft"),
        (["unet.a.attn1.processor.to_q_lora.down.weight"], "diffusers_legacy"),
        (["unet.x.lora.down.weight"], "diffusers_legacy"),
        (["unet.x.lora_A.weight", "unet.x.lora_B.weight"], "diffusers"),
        (["model.diffusion_model.input_blocks.0.0.weight"], None),
    ],
)
def test_detect_format(keys, expected):
    assert detect_format(keys) == expected


def test_trigger_words():
    tags = {"10_style": {" watercolor": 30, "cat": 4, "blue sky": 9}, "2_reg": {"cat": 7, "": 99, "bad": "x"}}
    meta = {"modelspec.trigger_phrase": "wtrclr, Watercolor ", "ss_tag_frequency": json.dumps(tags)}
    # per dataset, only tags at least half of its pictures carry; deduplicated against the phrase
    assert trigger_words(meta) == ["wtrclr", "Watercolor", "cat"]


def test_trigger_words_are_frequent_short_tags_not_captions():
    """kohya's ss_tag_frequency holds every caption tag, and whole sentences for BLIP-style captions:
    only what most pictures share is a trained word."""
    sentences = {f"a photo of a woman with red hair number {i}": 1 for i in range(20)}
    booru = {"zqx": 40, "1girl": 38, "solo": 25, "smile": 12, "outdoors": 3}
    booru["a long tag of six words"] = 40
    meta = {"ss_tag_frequency": json.dumps({"10_zqx": booru, "1_blip": sentences})}
    assert trigger_words(meta) == ["zqx", "1girl", "solo"]
    # the picture count from ss_dataset_dirs, when given, sets the bar (60 pictures: 30 needed)
    meta["ss_dataset_dirs"] = json.dumps({"10_zqx": {"n_repeats": 10, "img_count": 60}})
    assert trigger_words(meta) == ["zqx", "1girl"]
    many = {f"tag{i}": 10 for i in range(20)}
    assert len(trigger_words({"ss_tag_frequency": json.dumps({"a": many})})) == 8
    assert trigger_words({"ss_tag_frequency": json.dumps({"a": {"once": 1}})}) == []
    assert trigger_words({"ss_tag_frequency": "{not json"}) == []
    assert trigger_words({"ss_tag_frequency": '["a", "b"]'}) == []
    assert trigger_words({}) == []


def _pipe(**config) -> SimpleNamespace:
    return SimpleNamespace(unet=SimpleNamespace(config=config))


def test_pipeline_family():
    with torch.device("meta"):
        pocket_config = dict(build_unet(PocketConfig()).config)
    assert pipeline_family(_pipe(**UNET_CONFIGS["sd1"])) == "sd1"
    assert pipeline_family(_pipe(**UNET_CONFIGS["sd2"])) == "sd2"
    assert pipeline_family(_pipe(**UNET_CONFIGS["sdxl"])) == "sdxl"
    assert pipeline_family(_pipe(**pocket_config)) == "pocket"
    assert (
        pipeline_family(_pipe(cross_attention_dim=1280, addition_embed_type="text_time")) is None
    )  # refiner
    assert pipeline_family(_pipe(cross_attention_dim=2048)) is None  # 2048 without SDXL's time embedding
    assert pipeline_family(_pipe(cross_attention_dim=64, block_out_channels=(32, 64))) is None
    tiny = build_tiny_pipeline(0)
    assert pipeline_family(tiny) is None
    tiny.studio_family = "pocket"
    assert pipeline_family(tiny) == "pocket"
    assert pipeline_family(SimpleNamespace()) is None


def test_module_shapes_sees_through_peft():
    pipe = build_tiny_pipeline(0)
    expected = {
        f"{component}.{name}": m.weight.shape
        for component in ("unet", "text_encoder")
        for name, m in getattr(pipe, component).named_modules()
        if isinstance(m, nn.Linear | nn.Conv2d)
    }
    assert module_shapes(pipe) == expected
    assert "text_encoder.encoder.layers.0.self_attn.q_proj" in expected  # transformers 5 layout
    pipe.unet.add_adapter(lora_config())
    assert module_shapes(pipe) == expected


def test_inspect_reads_only_the_header(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    sd = {
        f"{ATTN2_K}.hada_w1_a": torch.randn(320, 4, generator=g),
        f"{ATTN2_K}.hada_w1_b": torch.randn(4, 768, generator=g),
        f"{ATTN2_K}.hada_w2_a": torch.randn(320, 4, generator=g),
        f"{ATTN2_K}.hada_w2_b": torch.randn(4, 768, generator=g),
        f"{ATTN2_K}.alpha": torch.tensor(2.0),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(8, 768, generator=g),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(3072, 8, generator=g),
    }
    meta = {"ss_tag_frequency": json.dumps({"a": {"cat": 2}}), "ss_output_name": "thing"}
    file = write(tmp_path / "loha.safetensors", sd, meta)

    def refuse(*args, **kwargs):
        raise AssertionError("inspect must not read tensor data")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(safetensors, "safe_open", refuse)
    info = inspect(file)
    assert (info.format, info.family, info.rank, info.num_modules) == ("lycoris_loha", "sd1", 16, 2)
    assert info.components == {"unet", "text_encoder"} and info.trigger_words == ["cat"]
    assert info.size_bytes == file.stat().st_size and info.metadata == meta and info.path == file
    with pytest.raises(AssertionError, match="must not read"):
        load(file)
