"""The learned gate (AutoLoRA-style) as a fusion policy: exactness at its fixed points, training,
checkpoints and its distillation into blocks × keyframes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.blocks import UnetLayout
from pipelines.engine import attach
from pipelines.fusion import AdapterInfo, make_policy
from pipelines.fusion.gate import Gate
from pipelines.gate.distill import distill, record_gates
from pipelines.gate.network import GateConfig, GateNetwork
from pipelines.gate.train import GateLora, GateTrainConfig, gate_layers, train_gate
from pipelines.tiny import build_tiny_pipeline
from tests.pipelines.lora_fixtures import random_lora

KW = dict(num_inference_steps=3, height=64, width=64, output_type="np")


@pytest.fixture(scope="module")
def setup():
    pipe = build_tiny_pipeline(0)
    return pipe, [random_lora(pipe, 1), random_lora(pipe, 2)]


def images(pipe, adapters, policy) -> np.ndarray:
    with attach(pipe, adapters, policy, num_steps=3):
        return pipe("a red circle", generator=torch.Generator().manual_seed(0), **KW).images


def mix_of(loras):
    return [(AdapterInfo("a", 0.8), loras[0]), (AdapterInfo("b", 0.6), loras[1])]


def test_gate_forced_to_one_equals_linear(setup):
    pipe, loras = setup
    linear = images(pipe, mix_of(loras), make_policy("linear"))
    forced = images(pipe, mix_of(loras), make_policy("gate", {"force": 1.0}))
    assert np.abs(linear - forced).max() <= 1e-5
    base = pipe("a red circle", generator=torch.Generator().manual_seed(0), **KW).images
    assert np.abs(linear - base).max() > 1e-2


def test_untrained_gate_is_linear(setup):
    pipe, loras = setup
    net = GateNetwork(
        gate_layers(pipe, [GateLora("a", loras[0], ("x",)), GateLora("b", loras[1], ("y",))]),
        GateConfig(prompt_dim=32),
    )
    linear = images(pipe, mix_of(loras), make_policy("linear"))
    gated = images(pipe, mix_of(loras), Gate(network=net))
    assert np.abs(linear - gated).max() <= 1e-5


def test_gradients_reach_only_gate_parameters(setup):
    pipe, loras = setup
    gl = [GateLora("a", loras[0], ("a red cat",)), GateLora("b", loras[1], ("a blue car",))]
    net, losses = train_gate(
        pipe, gl, [(0, 1), (1, 0)], GateTrainConfig(steps=2, batch_size=2, images_per_lora=2, sample_steps=2)
    )
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert all(p.grad is None for p in pipe.unet.parameters())
    assert all(p.grad is None for p in pipe.text_encoder.parameters())
    moved = [float((layer.w_out - 2.0).abs().max()) for layer in net.layers.values()]
    assert max(moved) > 0  # the optimiser changed gate parameters


def test_mix_term_trains_the_gate_on_two_concept_pictures(setup):
    """With accepted two-concept pictures the gate sees a third term (both LoRAs on): its loss is
    larger than the AutoLoRA loss alone on the same draws, and it moves the gate differently."""
    from pipelines.gate.train import decode_latents, mix_latents

    pipe, loras = setup
    gl = [GateLora("a", loras[0], ("a red cat",)), GateLora("b", loras[1], ("a blue car",))]
    cfg = GateTrainConfig(steps=2, batch_size=2, images_per_lora=2, sample_steps=2)
    lat = mix_latents(pipe, gl, ["a red cat and a blue car"] * 2, [5, 6], cfg)
    assert lat.shape[0] == 2 and decode_latents(pipe, lat).shape == (2, 64, 64, 3)
    data = {0: (lat, ["a red cat"] * 2), 1: (lat, ["a blue car"] * 2)}
    plain, plain_losses = train_gate(pipe, gl, [(0, 1)], cfg, data=data)
    mixed, mixed_losses = train_gate(
        pipe, gl, [(0, 1)], cfg, data=data, mixes={(0, 1): (lat, ["a red cat and a blue car"] * 2)}
    )
    assert mixed_losses[0] > plain_losses[0]  # same draws for the first two terms, plus an MSE ≥ 0
    assert all(p.grad is None for p in pipe.unet.parameters())
    pairs = zip(plain.parameters(), mixed.parameters(), strict=True)
    delta = [float((a - b).detach().abs().max()) for a, b in pairs]
    assert max(delta) > 0


def test_gate_training_refuses_an_empty_loss(setup):
    pipe, loras = setup
    gl = [GateLora("a", loras[0], ("a red cat",)), GateLora("b", loras[1], ("a blue car",))]
    with pytest.raises(ValueError, match="nothing to train"):
        train_gate(pipe, gl, [(0, 1)], GateTrainConfig(steps=1, fit_weight=0.0, hinge_weight=0.0))


def test_checkpoint_round_trip_and_refusal(setup, tmp_path):
    pipe, loras = setup
    net = GateNetwork(gate_layers(pipe, [GateLora("a", loras[0], ("x",))]), GateConfig(prompt_dim=32), "sd1")
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = net.save(tmp_path / "gate.safetensors")
    back = GateNetwork.load(path)
    assert back.family == "sd1" and back.cfg == net.cfg
    assert all(
        torch.equal(a, b) for a, b in zip(net.state_dict().values(), back.state_dict().values(), strict=True)
    )
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an adapter-studio gate"):
        GateNetwork.load(tmp_path / "other.safetensors")


def test_damaged_gate_files_are_refused_with_their_name(setup, tmp_path):
    """Junk, a few bytes, a cut header, cut tensor data, a pickle: a ValueError naming the file."""
    pipe, loras = setup
    net = GateNetwork(gate_layers(pipe, [GateLora("a", loras[0], ("x",))]), GateConfig(prompt_dim=32), "sd1")
    good = net.save(tmp_path / "gate.safetensors").read_bytes()
    header_end = 8 + int.from_bytes(good[:8], "little")
    cases = {
        "junk": b"\xff" * 8 + b"garbage!",
        "tiny": b"ab",
        "cut_header": good[: header_end - 20],
        "cut_data": good[: header_end + (len(good) - header_end) // 2],
        "pickle": b"\x80\x04\x95" + good[3:],
    }
    for name, data in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        with pytest.raises(ValueError, match=name):
            GateNetwork.load(path)
    with pytest.raises(ValueError, match="needs a checkpoint"):
        Gate(checkpoint="  ")


def test_rank_one_export_keeps_blocks_without_attention(setup):
    """A gated layer outside the cross-attention blocks makes the LBW vector full-length (a short one
    would switch that layer off); attention-only records keep the short vector."""
    pipe, _ = setup
    layout = UnetLayout.from_config(pipe.unet.config)
    short, full = layout.attention_ids(), layout.all_ids()
    plain = next(b for b in full if b not in short and b != "BASE")
    attn = [b for b in short if b != "BASE"][:2]
    gates = torch.full((4, 3, 1), 0.5)  # steps × layers × adapters, every layer at 0.5
    result = distill(gates, [attn[0], attn[1], plain], layout, num_steps=4)
    vector = [float(x) for x in result.lbw_vectors[0].split(",")]
    assert len(vector) == len(full)
    weights = dict(zip(full, vector, strict=True))
    keyframes = [float(k.split("@")[0]) for k in result.keyframes[0].split(",")]
    for block in (*attn, plain):
        assert weights[block] * max(keyframes) == pytest.approx(0.5, abs=1e-3)
    attention_only = distill(gates[:, :2], attn, layout, num_steps=4)
    assert len(attention_only.lbw_vectors[0].split(",")) == len(short)


def test_applied_gates_are_recorded_per_layer_and_step(setup):
    pipe, loras = setup
    with attach(pipe, mix_of(loras), make_policy("gate", {"force": 1.0}), num_steps=3) as mix:
        pipe("a red circle", generator=torch.Generator().manual_seed(0), **KW)
    g = mix.gates()
    assert g.shape == (3, len(mix.layers), 2)
    assert torch.allclose(g[:, :, 0], torch.full_like(g[:, :, 0], 0.8))
    assert torch.allclose(g[:, :, 1], torch.full_like(g[:, :, 1], 0.6))


def test_distilled_schedule_reproduces_gate_images(setup):
    """Stated tolerance: max |Δpixel| ≤ 1e-3 (pixels in [0, 1]) for a gate whose variation is over
    blocks and steps (what keyframes can carry); the rank-one export is closer to it than linear is."""
    pipe, loras = setup
    net = GateNetwork(
        gate_layers(pipe, [GateLora("a", loras[0], ("x",)), GateLora("b", loras[1], ("y",))]),
        GateConfig(prompt_dim=32),
    )
    torch.manual_seed(3)
    from pipelines.blocks import block_id

    layout = UnetLayout.from_config(pipe.unet.config)
    shift = {b: torch.randn(1) for b in layout.all_ids()}
    trend = {b: torch.randn(1, 32) * 0.5 for b in layout.all_ids()}
    with torch.no_grad():  # the same gate for every layer of a block, varying with the block and step
        for path in net.channels:
            layer, block = net.layer(path), block_id(path, layout)
            layer.b.add_(shift[block])
            layer.time.weight.add_(trend[block])
    adapters = mix_of(loras)
    gates, _, blocks = record_gates(pipe, adapters, Gate(network=net), ["a red circle"], [0], 3, 7.5)
    assert gates.std() > 0.01
    result = distill(gates, blocks, UnetLayout.from_config(pipe.unet.config), num_steps=3)
    assert all(0 <= e < 1 for e in result.relative_error)
    gated = images(pipe, adapters, Gate(network=net))
    distilled = images(pipe, adapters, make_policy("schedule", result.fusion_args()))
    linear = images(pipe, adapters, make_policy("linear"))
    diff = np.abs(gated - distilled)
    assert diff.max() <= 1e-3
    assert np.abs(gated - linear).mean() > 0.01  # the gate really differs from linear
    rank_one = images(pipe, adapters, make_policy("schedule", result.rank_one_args()))
    assert np.abs(gated - rank_one).mean() <= np.abs(gated - linear).mean()
    assert all("@" in k for k in result.keyframes) and result.lbw_vectors[0].count(",") >= 2


@pytest.mark.parametrize("conv", [False, True])
def test_adapter_outputs_with_unequal_ranks(conv):
    """Each adapter's own gated output B_i·(g_i·s_i·A_i·x), for ranks 2, 5 and an adapter absent here."""
    from pipelines.lora_weights import LoraLayer
    from pipelines.multilora import GateTable, MultiLoraConv2d, MultiLoraLinear

    g = torch.Generator().manual_seed(0)
    base = torch.nn.Conv2d(6, 7, 1) if conv else torch.nn.Linear(6, 7)
    shape = (1, 1) if conv else ()
    loras = {
        a: LoraLayer(
            torch.randn(r, 6, *shape, generator=g), torch.randn(7, r, *shape, generator=g), alpha=float(r + 1)
        )
        for a, r in ((0, 2), (2, 5))
    }  # adapter 1 skips this layer
    table = GateTable(1, 3)
    table.set(torch.tensor([[0.7, 0.4, 1.3]]))
    layer = (MultiLoraConv2d if conv else MultiLoraLinear)(base, list(loras.items()), table, 0, torch.float32)
    x = torch.randn(2, 6, 3, 3, generator=g) if conv else torch.randn(2, 4, 6, generator=g)
    got = layer.adapter_outputs(x)
    flat = x.permute(0, 2, 3, 1) if conv else x
    for a, gate in enumerate((0.7, 0.4, 1.3)):
        want = torch.zeros(*flat.shape[:-1], 7)
        if a in loras:
            lo = loras[a]
            want = gate * lo.scale * flat @ lo.down.flatten(1).T @ lo.up.flatten(1).T
        torch.testing.assert_close(got[..., a, :], want, atol=1e-5, rtol=1e-5)
