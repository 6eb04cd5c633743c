"""Every kind of bad input gets its own error class with a message naming the file and the problem."""

from __future__ import annotations

import json
import pickle
import random
import struct

import pytest
import torch

from pipelines.lora_formats import (
    FamilyMismatchError,
    LoraFormatError,
    NonFiniteWeightsError,
    NotSafetensorsError,
    PickledFileError,
    ShapeMismatchError,
    UnknownFormatError,
    UnmatchedKeysError,
    architecture_shapes,
    check_against_model,
    inspect,
    load,
    load_state_dict,
)
from tests.pipelines.lora_fixtures import random_kohya, tiny_shapes, write
from tests.pipelines.test_lora_formats_read import SDXL_LDM

NAME = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def small_lora(rank: int = 2, width: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        f"{NAME}.lora_down.weight": torch.randn(rank, width, generator=g),
        f"{NAME}.lora_up.weight": torch.randn(width, rank, generator=g),
        f"{NAME}.alpha": torch.tensor(1.0),
    }


@pytest.fixture
def good_file(tmp_path):
    return write(tmp_path / "good.safetensors", small_lora(), {"ss_output_name": "good"})


def expect(error: type[LoraFormatError], path, *fragments: str):
    """Both load and inspect raise exactly ``error`` naming the file and each fragment."""
    for reader in (load, inspect):
        with pytest.raises(LoraFormatError) as caught:
            reader(path)
        assert type(caught.value) is error, f"{reader.__name__}: {caught.value!r}"
        message = str(caught.value)
        assert str(path) in message
        for fragment in fragments:
            assert fragment in message, message


@pytest.fixture
def no_unpickling(monkeypatch):
    """Fail the test if anything tries to unpickle."""

    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    for target, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(target, name, refuse)


def test_pickled_checkpoint_is_refused_unopened(tmp_path):
    ckpt = tmp_path / "lora.ckpt"
    torch.save(small_lora(), ckpt)  # a real pickle (torch's zip container)
    disguised = tmp_path / "lora.safetensors"
    disguised.write_bytes(ckpt.read_bytes())
    legacy = tmp_path / "legacy.safetensors"
    legacy.write_bytes(pickle.dumps({"a": 1}, protocol=2))  # raw pickle magic 0x80 0x02
    folder = tmp_path / "peft"
    folder.mkdir()
    torch.save(small_lora(), folder / "adapter_model.bin")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
        mp.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
        mp.setattr(pickle, "Unpickler", lambda *a, **k: pytest.fail("unpickled"))
        mp.setattr(torch, "load", lambda *a, **k: pytest.fail("unpickled"))
        for path in (ckpt, disguised, legacy):
            expect(PickledFileError, path, "pickle", "never opened")
        with pytest.raises(PickledFileError, match=r"adapter_model\.bin"):
            load(folder)


def test_truncated_file(good_file, no_unpickling):
    data = good_file.read_bytes()
    good_file.write_bytes(data[:-10])
    expect(NotSafetensorsError, good_file, "truncated")
    good_file.write_bytes(data[:30])  # cut inside the header
    expect(NotSafetensorsError, good_file, "header length")


def test_random_bytes(tmp_path, no_unpickling):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(random.Random(0).randbytes(4096))
    expect(NotSafetensorsError, path, "not a safetensors file")


def test_zero_byte_file(tmp_path, no_unpickling):
    path = tmp_path / "empty.safetensors"
    path.touch()
    expect(NotSafetensorsError, path, "empty (0 bytes)")


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (json.dumps({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}).encode(), "needs 8 bytes"),
        (
            json.dumps({"t": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}).encode(),
            "unsupported dtype",
        ),
        (json.dumps({"__metadata__": {"a": 1}}).encode(), "strings to strings"),
    ],
)
def test_malformed_header(tmp_path, header, fragment):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    expect(NotSafetensorsError, path, fragment)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(tmp_path, bad):
    sd = small_lora()
    sd[f"{NAME}.lora_up.weight"][3, 1] = bad
    path = write(tmp_path / "nan.safetensors", sd)
    with pytest.raises(NonFiniteWeightsError) as caught:
        load(path)
    assert str(path) in str(caught.value) and f"{NAME}.lora_up.weight" in str(caught.value)
    assert ("NaN" if bad != bad else "infinite") in str(caught.value)
    with pytest.raises(NonFiniteWeightsError, match="lora_up"):
        load_state_dict(sd)


@pytest.mark.parametrize(
    ("sd", "fragment"),
    [
        ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, "full model checkpoint"),
        ({"emb_params": torch.zeros(2, 768)}, "textual-inversion embedding"),
        ({"foo.bar": torch.zeros(2)}, "no known LoRA naming"),
        ({f"{NAME}.diff": torch.zeros(2, 2)}, "LyCORIS full"),
        ({f"{NAME}.lora_down.weight": torch.zeros(2, 32)}, "missing lora_up.weight"),
        ({**small_lora(), "unet.x.lora_A.weight": torch.zeros(2, 2)}, "not a kohya LoRA tensor name"),
        (
            {f"{NAME}.lora_down.weight": torch.zeros(2, 32), f"{NAME}.lora_up.weight": torch.zeros(32, 3)},
            "rank 2",
        ),
        (
            {
                f"lora_unet_{name}.{part}": torch.zeros(2, 2)
                for name in ("input_blocks_4_1_proj_in", "down_blocks_9_resnets_0_conv1")
                for part in ("lora_down.weight", "lora_up.weight")
            },
            "mixes SGM and diffusers block names",
        ),
    ],
)
def test_unknown_or_broken_naming(tmp_path, sd, fragment):
    expect(UnknownFormatError, write(tmp_path / "odd.safetensors", sd), fragment)


def test_empty_safetensors(tmp_path):
    expect(UnknownFormatError, write(tmp_path / "none.safetensors", {}), "holds no tensors")


def test_dora_magnitude_of_neither_axis_is_refused(tmp_path):
    sd = small_lora() | {f"{NAME}.dora_scale": torch.ones(2, 16)}
    with pytest.raises(UnknownFormatError, match="neither one value per output channel"):
        load(write(tmp_path / "dora.safetensors", sd))


def test_bad_adapter_config(tmp_path):
    sd = {
        "base_model.model.x.lora_A.weight": torch.zeros(2, 4),
        "base_model.model.x.lora_B.weight": torch.zeros(4, 2),
    }
    write(tmp_path / "adapter_model.safetensors", sd)
    (tmp_path / "adapter_config.json").write_text("{oops")
    with pytest.raises(LoraFormatError, match=r"adapter_config\.json: not a valid JSON"):
        load(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA", "r": 2}))
    with pytest.raises(UnknownFormatError, match="'LOHA' is not LoRA"):
        load(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 8}))
    with pytest.raises(UnknownFormatError, match="rank 8 but the tensors have rank 2"):
        load(tmp_path)


def test_folder_without_weights(tmp_path):
    with pytest.raises(LoraFormatError, match=r"no \.safetensors files"):
        load(tmp_path)
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.safetensors")


def test_sdxl_lora_against_sd15_model(tmp_path):
    sd, _ = random_kohya(SDXL_LDM, architecture_shapes("sdxl"))
    weights = load(write(tmp_path / "xl.safetensors", sd, {"modelspec.title": "Neon XL"}))
    with pytest.raises(FamilyMismatchError) as caught:
        check_against_model(weights, "sd1", architecture_shapes("sd1"))
    assert str(caught.value) == (
        "this LoRA ('Neon XL') is for Stable Diffusion XL, the loaded model is Stable Diffusion 1.x"
    )
    check_against_model(weights, None, architecture_shapes("sdxl"))  # unknown model family: no verdict


def test_unmatched_modules():
    sd, _ = random_kohya(
        {
            "lora_unet_down_blocks_2_attentions_1_proj_out": "unet.down_blocks.2.attentions.1.proj_out",
            **{NAME: "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"},
        },
        architecture_shapes("sd1"),
    )
    weights = load_state_dict(sd)
    with pytest.raises(
        UnmatchedKeysError, match=r"1 module\(s\) the model does not have: 'unet.down_blocks.2"
    ):
        check_against_model(weights, None, tiny_shapes())
    odd = {
        "lora_unet_foo_bar.lora_down.weight": torch.ones(2, 4),
        "lora_unet_foo_bar.lora_up.weight": torch.ones(4, 2),
    }
    with pytest.raises(
        UnmatchedKeysError, match=r"'unet\.foo\.bar'"
    ):  # named by diffusers' own key converter
        check_against_model(load_state_dict(odd), None, tiny_shapes())


def test_wrong_shapes():
    weights = load_state_dict(small_lora(width=320))  # an SD 1.x-width layer on the tiny model
    with pytest.raises(ShapeMismatchError) as caught:
        check_against_model(weights, None, tiny_shapes())
    assert "attn1.to_q (model (32, 32), LoRA (320, 320))" in str(caught.value)
    check_against_model(load_state_dict(small_lora()), None, tiny_shapes())


def test_conv_1x1_and_linear_are_the_same_map():
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"  # a 1×1 conv in SD 1.x-layout UNets
    flat = {f"{name}.lora_down.weight": torch.ones(2, 32), f"{name}.lora_up.weight": torch.ones(32, 2)}
    check_against_model(load_state_dict(flat), None, tiny_shapes())
