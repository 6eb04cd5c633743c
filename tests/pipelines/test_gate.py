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
