"""Writers: kohya / diffusers / PEFT round trips, and diffusers' and PEFT's own loaders accept the files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_kohya
from peft import PeftModel
from peft.tuners.lora import LoraLayer as PeftLoraLayer

from pipelines.lora_formats import (
    LoraFormatError,
    NonFiniteWeightsError,
    inspect,
    load,
    save_diffusers,
    save_kohya,
    save_peft,
)
from pipelines.lora_weights import LoraLayer, LoraWeights
from pipelines.tiny import build_tiny_pipeline
from tests.pipelines.lora_fixtures import (
    TEXT_TARGETS,
    TOLERANCE,
    adapted_pipeline,
    deltas_of,
    lora_config,
    max_diff,
    module_weights,
    save_diffusers_reference,
)

TUCKER_PATH = "unet.up_blocks.1.resnets.1.conv2"


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> LoraWeights:
    """The PEFT reference adapter (unet r=4 α=8, text encoder r=4 α=2) read from diffusers' own file,
    plus a LoCon-Tucker conv layer and a layer of another rank and alpha."""
    pipe, ref = adapted_pipeline(
        0, unet=lora_config(r=4, alpha=8), text=lora_config(r=4, alpha=2, targets=TEXT_TARGETS)
    )
    loaded = load(save_diffusers_reference(pipe, tmp_path_factory.mktemp("ref")))
    assert max_diff(deltas_of(loaded), ref) <= TOLERANCE
    g = torch.Generator().manual_seed(11)
    tucker = LoraLayer(
        down=torch.randn(3, 32, 1, 1, generator=g) * 0.2,
        up=torch.randn(32, 3, 1, 1, generator=g) * 0.2,
        alpha=1.5,
        mid=torch.randn(3, 3, 3, 3, generator=g) * 0.2,
    )
    first = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    narrow = dataclasses.replace(
        loaded.layers[first], down=loaded.layers[first].down[:2], up=loaded.layers[first].up[:, :2], alpha=5.0
    )
    layers = {**loaded.layers, TUCKER_PATH: tucker, first: narrow}
    return LoraWeights(
        layers=layers, family="unknown", metadata={"ss_output_name": "ref"}, format="diffusers"
    )


def _keys(file: Path) -> list[str]:
    """Tensor names of a safetensors file."""
    with safetensors.safe_open(str(file), "pt") as f:
        return list(f.keys())


def _split(weights: LoraWeights, component: str) -> dict[str, torch.Tensor]:
    return {p: d for p, d in deltas_of(weights).items() if p.startswith(f"{component}.")}


def test_kohya_round_trip(weights, tmp_path):
    file = tmp_path / "out.safetensors"
    save_kohya(weights, file)
    back = load(file)
    assert back.format == "kohya"
    assert max_diff(deltas_of(back), deltas_of(weights)) <= TOLERANCE
    with safetensors.safe_open(str(file), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    assert any(
        k.startswith("lora_te_text_model_encoder_layers_") for k in keys
    )  # kohya's text_model spelling
    assert not any(".lora_mid." in k for k in keys)  # Tucker core merged for readers without LoCon support
    assert meta["ss_network_module"] == "networks.lora" and meta["modelspec.sai_model_spec"] == "1.0.0"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("Dynamic", "8")  # one alpha, ratios folded
    assert {float(v) for k, v in safetensors.torch.load_file(str(file)).items() if k.endswith(".alpha")} == {
        8.0
    }
    assert meta["modelspec.title"] == "out" and meta["ss_output_name"] == "ref"
    assert not list(tmp_path.glob(".*.tmp"))


def test_diffusers_round_trip(weights, tmp_path):
    save_diffusers(weights, tmp_path / "d.safetensors")
    back = load(tmp_path / "d.safetensors")
    assert back.format == "diffusers"
    assert max_diff(deltas_of(back), deltas_of(weights)) <= TOLERANCE


def test_peft_round_trip(weights, tmp_path):
    for component in ("unet", "text_encoder"):
        save_peft(weights, tmp_path / component, component=component)
        back = load(tmp_path / component)
        assert back.format == "peft"
        assert max_diff(deltas_of(back), _split(weights, component)) <= TOLERANCE
    config = json.loads((tmp_path / "unet" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_dora"]) == (4, 8, False)
    assert config["rank_pattern"] == {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 2,
        "up_blocks.1.resnets.1.conv2": 3,
    }
    assert config["alpha_pattern"]["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] == 5


def test_peft_library_loads_our_folder(weights, tmp_path):
    save_peft(weights, tmp_path, component="unet")
    unet = PeftModel.from_pretrained(build_tiny_pipeline(1).unet, str(tmp_path))
    theirs = {
        f"unet.{name.removeprefix('base_model.model.')}": m.get_delta_weight("default")
        for name, m in unet.named_modules()
        if isinstance(m, PeftLoraLayer)
    }
    assert max_diff(theirs, _split(weights, "unet")) <= TOLERANCE


@pytest.mark.parametrize("saver", [save_kohya, save_diffusers])
def test_diffusers_load_lora_weights_accepts_our_file(saver, weights, tiny_pipeline_dir, tmp_path):
    file = tmp_path / "lora.safetensors"
    saver(weights, file)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    before = module_weights(pipe)
    pipe.load_lora_weights(str(file))
    pipe.fuse_lora(components=["unet", "text_encoder"])
    after = module_weights(pipe)
    fused = {path: after[path] - before[path] for path in weights.layers}
    assert max_diff(fused, deltas_of(weights)) <= TOLERANCE
    assert all(torch.equal(after[p], before[p]) for p in before if p not in weights.layers)


def test_kohya_names_agree_with_diffusers_converter(weights, tmp_path):
    save_kohya(weights, tmp_path / "k.safetensors")
    ours = {k for k in _keys(tmp_path / "k.safetensors") if ".lora_down." in k}
    peft = {f"{p}.lora_A.weight": layer.down for p, layer in weights.layers.items()}
    theirs = {k for k in convert_state_dict_to_kohya(peft) if ".lora_down." in k}
    # diffusers names text encoders lora_te1_ and, under transformers 5, without kohya's text_model_
    theirs = {k.replace("lora_te1_encoder_", "lora_te_text_model_encoder_") for k in theirs}
    assert ours == theirs


def test_metadata_family_and_trigger_words(weights, tmp_path):
    tags = json.dumps({"10_cat": {" cat": 9, "blue": 4}, "5_x": {"blue": 6}})
    meta = {
        "ss_tag_frequency": tags,
        "modelspec.trigger_phrase": "mycat",
        "sshs_model_hash": "stale",
        "lora_adapter_metadata": "{}",
        "ss_network_args": '{"algo": "loha"}',
    }
    sdxl = dataclasses.replace(weights, family="sdxl", metadata=meta)
    save_kohya(sdxl, tmp_path / "x.safetensors", metadata={"modelspec.title": "Mine", "ss_extra": {"a": 1}})
    info = inspect(tmp_path / "x.safetensors")
    assert info.family == "sdxl" and info.trigger_words == ["mycat", "cat", "blue"]
    assert info.metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert info.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert info.metadata["modelspec.title"] == "Mine" and json.loads(info.metadata["ss_extra"]) == {"a": 1}
    assert not {"sshs_model_hash", "lora_adapter_metadata", "ss_network_args"} & info.metadata.keys()
    assert any(k.startswith("lora_te1_") for k in _keys(tmp_path / "x.safetensors"))
    pocket = dataclasses.replace(weights, family="pocket", metadata={})
    save_diffusers(pocket, tmp_path / "p.safetensors")
    assert (
        inspect(tmp_path / "p.safetensors").metadata["modelspec.architecture"] == "adapter-studio-pocket/lora"
    )
    assert load(tmp_path / "p.safetensors").family == "pocket"


def _dora_weights() -> LoraWeights:
    """A DoRA adapter from PEFT on a linear and a 1×1 conv layer."""
    pipe, _ = adapted_pipeline(4, unet=lora_config(r=2, alpha=4, targets=["to_v", "proj_in"], use_dora=True))
    layers = {}
    for name, m in pipe.unet.named_modules():
        if isinstance(m, PeftLoraLayer):
            magnitude = m.lora_magnitude_vector["default"].weight.detach().reshape(-1)
            layers[f"unet.{name}"] = LoraLayer(
                down=m.lora_A["default"].weight.detach().clone(),
                up=m.lora_B["default"].weight.detach().clone(),
                alpha=4.0,
                dora_scale=magnitude.clone(),
            )
    return LoraWeights(layers=layers, family="unknown", format="dora")


@pytest.mark.parametrize("saver", [save_kohya, save_diffusers, lambda w, p: save_peft(w, p.parent / "peft")])
def test_dora_round_trips(saver, tmp_path):
    weights = _dora_weights()
    saver(weights, tmp_path / "dora.safetensors")
    back = load(tmp_path / ("peft" if (tmp_path / "peft").exists() else "dora.safetensors"))
    assert back.format == "dora"
    assert max_diff(deltas_of(back), deltas_of(weights)) <= TOLERANCE
    assert (
        max_diff(
            {p: layer.dora_scale for p, layer in back.layers.items()},
            {p: layer.dora_scale for p, layer in weights.layers.items()},
        )
        == 0
    )


def test_dora_layout_in_kohya_file(tmp_path):
    save_kohya(_dora_weights(), tmp_path / "k.safetensors")
    sd = safetensors.torch.load_file(str(tmp_path / "k.safetensors"))
    shapes = {k: tuple(v.shape) for k, v in sd.items() if k.endswith("dora_scale")}
    assert {len(s) for s in shapes.values()} == {2, 4}  # linear and conv layers
    assert all(s[1:] == (1,) * (len(s) - 1) for s in shapes.values())  # LyCORIS wd_on_output: (out, 1, …)


def test_mixed_dora_cannot_be_a_peft_config(tmp_path):
    weights = _dora_weights()
    first = next(iter(weights.layers))
    mixed = dataclasses.replace(
        weights, layers={**weights.layers, first: dataclasses.replace(weights.layers[first], dora_scale=None)}
    )
    with pytest.raises(LoraFormatError, match="some layers are DoRA"):
        save_peft(mixed, tmp_path)
    with pytest.raises(LoraFormatError, match="no text_encoder layers"):
        save_peft(weights, tmp_path, component="text_encoder")
    assert not any(tmp_path.iterdir())


def test_failed_write_keeps_the_old_file(weights, tmp_path, monkeypatch):
    file = tmp_path / "keep.safetensors"
    save_kohya(weights, file)
    original = file.read_bytes()
    first = next(iter(weights.layers))
    bad_layer = dataclasses.replace(weights.layers[first], up=weights.layers[first].up * float("nan"))
    with pytest.raises(NonFiniteWeightsError, match="NaN"):
        save_kohya(dataclasses.replace(weights, layers={**weights.layers, first: bad_layer}), file)

    def crash(tensors, filename, metadata=None):  # writes half a file, then dies
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_diffusers(weights, file)
    assert file.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["keep.safetensors"]
