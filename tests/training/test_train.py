"""The trainer on the tiny pipeline: loss, resume after a kill or a cancel, outputs, options."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pipelines import lora_formats
from pipelines.tiny import build_tiny_pipeline
from pipelines.training import TrainingCancelled, TrainProgress, TrainResult, TrainSpec, train_lora
from pipelines.training.checkpoint import list_checkpoints, load_latest
from pipelines.training.data import items_from_folder, prepare_examples
from pipelines.training.lora_train import ADAPTER, Geometry, LoraTrainer
from pipelines.training.orthogonal import BasisRegistry, subspace_overlap
from tests.training.conftest import TRIGGER, fast_spec

ROOT = Path(__file__).resolve().parents[2]
# with a distilled prior (the pocket model's default), so kill-and-resume covers class pictures and the
# teacher's predictions too
REFERENCE = fast_spec(
    steps=6, checkpoint_every=2, class_word="shape", num_class_images=2, class_steps=2, prior_target="base"
)


@dataclass
class Reference:
    result: TrainResult
    lora: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def reference(
    tmp_path_factory: pytest.TempPathFactory, tiny_pipeline_dir: Path, concept_dir: Path
) -> Reference:
    """One uninterrupted 6-step run whose outputs several tests inspect."""
    out = tmp_path_factory.mktemp("ref") / "zq.safetensors"
    result = train_lora(
        REFERENCE, tiny_pipeline_dir, concept_dir, out, work_dir=out.parent / "work", device="cpu"
    )
    final = load_latest(result.work_dir / "checkpoints")
    assert final is not None and final["step"] == 6
    return Reference(result, final["lora"])


def _assert_same_lora(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, f"resumed run differs from the uninterrupted one by {worst}"


def _unet_out(pipe) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([100, 700]), e).sample


def _trainer(spec, concept_dir: Path, work: Path, pipe=None) -> LoraTrainer:
    pipe = pipe or build_tiny_pipeline()
    geometry = Geometry.of(pipe, spec)
    examples = prepare_examples(items_from_folder(concept_dir), spec, list(geometry.buckets))
    trainer = LoraTrainer(spec, pipe, examples, work, torch.device("cpu"), None)
    trainer.prepare()
    return trainer


def test_a_few_steps_lower_the_loss(concept_dir: Path, tmp_path: Path) -> None:
    trainer = _trainer(
        fast_spec(steps=6, learning_rate=1e-2, targets="all", checkpoint_every=100), concept_dir, tmp_path
    )
    before = trainer.probe_loss()
    trainer.run()
    after = trainer.probe_loss()
    assert after < 0.9 * before, (before, after)


def test_outputs_files_metadata_and_samples(reference: Reference) -> None:
    r = reference.result
    assert r.kohya_path.is_file() and (r.diffusers_path / "pytorch_lora_weights.safetensors").is_file()
    assert r.steps == 6 and len(r.losses) == 6 and r.resumed_from == 0
    assert r.loss_curve.is_file() and r.sample_images and all(p.is_file() for p in r.sample_images)
    info = lora_formats.inspect(r.kohya_path)
    meta = info.metadata
    assert info.format == "kohya" and info.rank == 4
    assert meta["modelspec.trigger_phrase"] == TRIGGER
    assert meta["modelspec.thumbnail"].startswith("data:image/png;base64,")
    tags = json.loads(meta["ss_tag_frequency"])["images"]
    assert sum(tags.values()) == 7 and any(TRIGGER in t for t in tags)
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_max_train_steps"]) == ("4", "4", "6")
    assert meta["ss_num_train_images"] == "7" and meta["ss_resolution"] == "(32, 32)"
    assert meta["ss_mixed_precision"] == "no"  # what ran on the CPU, not the spec's "auto"
    assert TRIGGER in info.trigger_words
    losses = [json.loads(line)["loss"] for line in (r.work_dir / "loss.jsonl").read_text().splitlines()]
    assert losses == pytest.approx(list(r.losses))


def test_saved_files_load_in_diffusers_with_the_trained_delta(reference: Reference) -> None:
    weights = lora_formats.load(reference.result.kohya_path)
    assert len(weights.layers) == len([k for k in reference.lora if "lora_A" in k])
    expected = build_tiny_pipeline()
    with torch.no_grad():
        for path, layer in weights.layers.items():
            module = expected.unet.get_submodule(path.split(".", 1)[1])
            module.weight += layer.delta().reshape(module.weight.shape)
    want, base = _unet_out(expected), _unet_out(build_tiny_pipeline())
    assert (want - base).abs().max() > 1e-4  # the adapter does something
    for source in (reference.result.kohya_path, reference.result.diffusers_path):
        pipe = build_tiny_pipeline()
        pipe.load_lora_weights(str(source))
        assert torch.allclose(_unet_out(pipe), want, atol=1e-5)


def test_saved_file_loads_in_the_engine(reference: Reference) -> None:
    from pipelines.engine import attach
    from pipelines.fusion.base import AdapterInfo, make_policy

    weights = lora_formats.load(reference.result.kohya_path)
    pipe = build_tiny_pipeline()
    base = _unet_out(pipe)
    diffusers_pipe = build_tiny_pipeline()
    diffusers_pipe.load_lora_weights(str(reference.result.kohya_path))
    with attach(pipe, [(AdapterInfo(TRIGGER), weights)], make_policy("linear")):
        mixed = _unet_out(pipe)
    assert torch.allclose(mixed, _unet_out(diffusers_pipe), atol=1e-5)
    assert torch.equal(_unet_out(pipe), base)  # detached again


def test_kill_and_resume_matches_the_uninterrupted_run(
    reference: Reference, tiny_pipeline_dir: Path, concept_dir: Path, tmp_path: Path
) -> None:
    work, out = tmp_path / "work", tmp_path / "zq.safetensors"
    script = f"""
import os, signal, sys, torch
torch.set_num_threads({torch.get_num_threads()})
from pipelines.training import TrainSpec, train_lora
spec = TrainSpec.from_json(sys.argv[1])
def die(p):
    if p.phase == "training" and p.step == 5:
        os.kill(os.getpid(), signal.SIGKILL)
train_lora(spec, {str(tiny_pipeline_dir)!r}, {str(concept_dir)!r}, {str(out)!r}, work_dir={str(work)!r},
           device="cpu", progress=die)
"""
    proc = subprocess.run(
        [sys.executable, "-c", script, REFERENCE.to_json()],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [s for s, _ in list_checkpoints(work / "checkpoints")] == [2, 4]
    assert not out.exists()
    result = train_lora(REFERENCE, tiny_pipeline_dir, concept_dir, out, work_dir=work, device="cpu")
    assert result.resumed_from == 4 and out.is_file()
    final = load_latest(work / "checkpoints")
    _assert_same_lora(final["lora"], reference.lora)
    assert result.losses == pytest.approx(reference.result.losses, abs=1e-6)


def test_cancel_checkpoints_writes_nothing_and_resumes(
    reference: Reference, tiny_pipeline_dir: Path, concept_dir: Path, tmp_path: Path
) -> None:
    work, out = tmp_path / "work", tmp_path / "zq.safetensors"
    cancel = threading.Event()

    def at_three(p: TrainProgress) -> None:
        if p.phase == "training" and p.step == 3:
            cancel.set()

    with pytest.raises(TrainingCancelled) as stopped:
        train_lora(
            REFERENCE,
            tiny_pipeline_dir,
            concept_dir,
            out,
            work_dir=work,
            device="cpu",
            progress=at_three,
            cancel=cancel,
        )
    assert stopped.value.step == 3
    assert not out.exists() and not (tmp_path / "zq_diffusers").exists()
    assert list_checkpoints(work / "checkpoints")[-1][0] == 3
    result = train_lora(REFERENCE, tiny_pipeline_dir, concept_dir, out, work_dir=work, device="cpu")
    assert result.resumed_from == 3
    _assert_same_lora(load_latest(work / "checkpoints")["lora"], reference.lora)


def test_work_dir_of_another_run_is_refused(
    reference: Reference, tiny_pipeline_dir: Path, concept_dir: Path
) -> None:
    other = fast_spec(steps=6, learning_rate=5e-4)
    with pytest.raises(ValueError, match="belongs to another training run"):
        train_lora(
            other,
            tiny_pipeline_dir,
            concept_dir,
            reference.result.work_dir / "x.safetensors",
            work_dir=reference.result.work_dir,
            device="cpu",
        )


def test_a_passed_pipeline_is_restored(concept_dir: Path, tmp_path: Path) -> None:
    pipe = build_tiny_pipeline()
    before = _unet_out(pipe)
    train_lora(fast_spec(steps=2), pipe, concept_dir, tmp_path / "a.safetensors", device="cpu")
    assert not any(ADAPTER in n for n, _ in pipe.unet.named_parameters())
    assert torch.equal(_unet_out(pipe), before)


def test_dora_rslora_loraplus_text_encoder_prior_and_accumulation(concept_dir: Path, tmp_path: Path) -> None:
    spec = fast_spec(
        steps=2,
        rank=4,
        alpha=2.0,
        use_dora=True,
        use_rslora=True,
        lora_plus_ratio=16.0,
        train_text_encoder=True,
        text_encoder_lr=5e-4,
        class_word="shape",
        num_class_images=2,
        class_steps=2,
        grad_accum=2,
        batch_size=1,
        cache_latents=False,
        noise_offset=0.05,
        caption_dropout=0.3,
        targets="all",
        lr_scheduler="cosine",
        lr_warmup_steps=1,
    )
    pipe = build_tiny_pipeline()
    trainer = _trainer(spec, concept_dir, tmp_path / "work", pipe)
    assert len(trainer.class_examples) == 2 and all(e.path.is_file() for e in trainer.class_examples)
    lrs = sorted({g["initial_lr"] for g in trainer.optimizer.param_groups})  # before the warm-up scaling
    assert lrs == pytest.approx(sorted({5e-4, 1e-3, 5e-4 * 16, 1e-3 * 16}))  # LoRA+ B groups at 16×
    trainer.run()
    assert all(torch.isfinite(torch.tensor(trainer.losses)))
    trained_out = _unet_out(pipe)
    result = trainer.finish(tmp_path / "dora.safetensors", "tiny", 0.0)
    trainer.detach()
    weights = lora_formats.load(result.kohya_path)
    assert weights.components() == {"unet", "text_encoder"}
    assert all(layer.dora_scale is not None for layer in weights.layers.values())
    assert any(layer.is_conv for layer in weights.layers.values())
    # rsLoRA: PEFT scale alpha/sqrt(r) = 2/2 = 1 → kohya alpha = scale × r = 4
    assert all(layer.alpha == pytest.approx(4.0) for layer in weights.layers.values())
    assert result.metadata["ss_network_module"] == "lycoris.kohya"
    assert result.metadata["ss_num_reg_images"] == "2"
    fresh = build_tiny_pipeline()
    fresh.load_lora_weights(str(result.diffusers_path))
    assert torch.allclose(_unet_out(fresh), trained_out, atol=1e-4)


def test_prior_prompts_follow_the_captions_and_class_images_follow_their_prompts(
    concept_dir: Path, tmp_path: Path
) -> None:
    """{caption}: each class image is made from a picture's caption with the trigger → class word; a
    changed prompt remakes only its picture, changed settings remake all of them."""
    from pipelines.training.sampling import generate_class_images

    spec = fast_spec(class_word="shape", num_class_images=3, class_steps=2)
    pipe = build_tiny_pipeline()
    trainer = _trainer(spec, concept_dir, tmp_path / "work", pipe)
    captions = [e.caption for e in trainer.examples]
    assert [e.caption for e in trainer.class_examples] == [c.replace(TRIGGER, "shape") for c in captions[:3]]
    assert all(TRIGGER not in e.caption and "shape" in e.caption for e in trainer.class_examples)
    trainer.detach()
    folder = tmp_path / "class"
    first = generate_class_images(pipe, ["a red circle", "a blue ring"], (32, 32), folder, 0, steps=2)
    stamps = [q.stat().st_mtime_ns for q in first]
    again = generate_class_images(pipe, ["a red circle", "a green ring"], (32, 32), folder, 0, steps=2)
    assert again == first and again[0].stat().st_mtime_ns == stamps[0]
    assert again[1].stat().st_mtime_ns != stamps[1]
    redo = generate_class_images(pipe, ["a red circle", "a green ring"], (32, 32), folder, 0, steps=3)
    assert redo[0].stat().st_mtime_ns != stamps[0]
    explicit = TrainSpec(trigger="zq", prior_prompts=("a big {class_word}", "a ring"), class_word="shape")
    assert [explicit.prior_prompt("zq", k) for k in range(3)] == ["a big shape", "a ring", "a big shape"]
    plain = TrainSpec(trigger="zq")
    assert plain.prior_prompt("a red zq on a white background") == "a red on a white background"
    with pytest.raises(ValueError, match="needs a class word"):
        TrainSpec(trigger="zq", prior_preservation=True, class_prompt="a photo of {class_word}")


def test_distilled_prior_trains_towards_the_untouched_model(concept_dir: Path, tmp_path: Path) -> None:
    """prior_target="base": the class pictures' target is the base model's own prediction (zero at the
    start, when the LoRA adds nothing), computed with every adapter bypassed, which leaves the adapters
    on and the trainable parameters as they were."""
    import numpy as np

    from pipelines.training.lora_train import adapters_disabled

    spec = fast_spec(
        steps=3,
        class_word="shape",
        num_class_images=2,
        class_steps=2,
        prior_target="base",
        train_text_encoder=True,
        targets="all",
        learning_rate=1e-2,
    )
    pipe = build_tiny_pipeline()
    trainer = _trainer(spec, concept_dir, tmp_path / "work", pipe)
    parts = list(trainer.components.values())

    def prior(distil: bool) -> float:
        gen, rng = torch.Generator().manual_seed(3), np.random.default_rng(3)
        with torch.no_grad():
            return float(
                trainer.diffusion_loss(
                    trainer.class_examples, [0], trainer.class_cache, rng, gen, 0.0, distil
                )
            )

    assert prior(distil=True) == 0.0 and prior(distil=False) > 0.0
    trains = [n for m in parts for n, p in m.named_parameters() if p.requires_grad]
    trainer.run()
    assert prior(distil=True) > 0.0
    assert [n for m in parts for n, p in m.named_parameters() if p.requires_grad] == trains
    with adapters_disabled(parts):
        bypassed = _unet_out(pipe)
    assert torch.equal(bypassed, _unet_out(build_tiny_pipeline()))
    assert not torch.allclose(_unet_out(pipe), bypassed)  # the adapters are back on
    result = trainer.finish(tmp_path / "distil.safetensors", "tiny", 0.0)
    assert "prior targets: the base model's predictions" in result.metadata["ss_training_comment"]
    with pytest.raises(ValueError, match="prior_target"):
        fast_spec(prior_target="teacher")


def test_orthogonal_adapters_have_orthogonal_down_projections(
    concept_dir: Path, tmp_path: Path, tiny_pipeline_dir: Path
) -> None:
    registry = BasisRegistry(tmp_path / "basis.json")
    spec = fast_spec(steps=2, orthogonal=True)
    results = []
    for name in ("first", "second"):
        results.append(
            train_lora(
                spec,
                tiny_pipeline_dir,
                concept_dir,
                tmp_path / f"{name}.safetensors",
                work_dir=tmp_path / name,
                device="cpu",
                basis=lambda family, n=name: registry.allocate(family, n, spec.rank),
            )
        )
    a, b = (lora_formats.load(r.kohya_path) for r in results)
    for path, la in a.layers.items():
        lb = b.layers[path]
        assert subspace_overlap(la.down, lb.down) < 1e-5
        assert torch.allclose(la.down @ la.down.T, torch.eye(4), atol=1e-5)  # frozen at the basis
    assert any(float(la.up.abs().max()) > 0 for la in a.layers.values())  # B trained
    args = json.loads(results[1].metadata["ss_network_args"])
    assert json.loads(args["orthogonal_basis"])["start"] == 4
    with pytest.raises(ValueError, match="needs a basis slot"):
        train_lora(spec, tiny_pipeline_dir, concept_dir, tmp_path / "x.safetensors", device="cpu")


def test_bf16_autocast_on_cpu_runs(concept_dir: Path, tmp_path: Path) -> None:
    trainer = _trainer(fast_spec(steps=1, mixed_precision="bf16"), concept_dir, tmp_path)
    assert trainer.amp is None  # the helper passes no autocast; build one the way train_lora does
    from pipelines.training.lora_train import resolve_precision

    assert resolve_precision(fast_spec(mixed_precision="bf16"), torch.device("cpu")) == (
        torch.float32,
        torch.bfloat16,
    )
    trainer.amp = torch.bfloat16
    trainer.run()
    assert torch.isfinite(torch.tensor(trainer.losses)).all()
    with pytest.raises(ValueError, match="fp16 mixed precision needs a CUDA device"):
        resolve_precision(fast_spec(mixed_precision="fp16"), torch.device("cpu"))


def test_sdxl_pipeline_trains_with_both_text_encoders(concept_dir: Path, tmp_path: Path) -> None:
    from tests.training.conftest import build_tiny_sdxl_pipeline

    pipe = build_tiny_sdxl_pipeline()
    spec = fast_spec(steps=2, train_text_encoder=True, learning_rate=1e-2, targets="attn-mlp")
    trainer = _trainer(spec, concept_dir, tmp_path / "work", pipe)
    assert set(trainer.components) == {"unet", "text_encoder", "text_encoder_2"}
    trainer.run()
    assert all(torch.isfinite(torch.tensor(trainer.losses)))
    result = trainer.finish(tmp_path / "xl.safetensors", "tiny-xl", 0.0)
    trainer.detach()
    weights = lora_formats.load(result.kohya_path)
    assert weights.components() == {"unet", "text_encoder", "text_encoder_2"}
    reloaded = build_tiny_sdxl_pipeline()
    reloaded.load_lora_weights(str(result.diffusers_path))
    for path, layer in list(weights.layers.items())[:5]:  # diffusers holds the same factors
        component, name = path.split(".", 1)
        module = getattr(reloaded, component).get_submodule(name)
        got = module.lora_B["default_0"].weight @ module.lora_A["default_0"].weight
        assert torch.allclose(got, layer.delta(), atol=1e-5)


def test_gradient_checkpointing_changes_memory_not_results(concept_dir: Path, tmp_path: Path) -> None:
    runs = []
    for flag in (False, True):
        trainer = _trainer(fast_spec(steps=2, gradient_checkpointing=flag), concept_dir, tmp_path / str(flag))
        trainer.run()
        runs.append(({k: p.detach().clone() for k, p in trainer.lora_tensors().items()}, trainer.losses))
    _assert_same_lora(runs[0][0], runs[1][0])
    assert runs[0][1] == pytest.approx(runs[1][1], abs=1e-6)


def test_epochs_set_the_number_of_steps(concept_dir: Path, tmp_path: Path) -> None:
    pipe = build_tiny_pipeline()
    spec = fast_spec(epochs=2, batch_size=2, grad_accum=1)
    geometry = Geometry.of(pipe, spec)
    examples = prepare_examples(items_from_folder(concept_dir), spec, list(geometry.buckets))
    trainer = LoraTrainer(spec, pipe, examples, tmp_path, torch.device("cpu"), None)
    assert trainer.plan.per_epoch == 3 + 1  # six square pictures in pairs, the wide one alone
    assert trainer.total == 8
    accumulated = LoraTrainer(
        fast_spec(epochs=2, batch_size=2, grad_accum=3), pipe, examples, tmp_path, torch.device("cpu"), None
    )
    assert accumulated.total == 3  # ceil(2 × 4 micro-batches / 3)
