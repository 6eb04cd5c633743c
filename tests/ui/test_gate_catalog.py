"""Gate checkpoints in the catalog: register → list → resolve → generate on the tiny pipeline, the
family refusal (catalog and engine), search leaving gates out, and the ``gate`` CLI."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import adapters_db
from adapters_db import HashingEmbedder
from adapters_db.gates import (
    GateRegistrationError,
    RoutedLora,
    find_gate,
    list_gates,
    register_gate,
    routing_mismatch,
    warn_routing_mismatch,
)
from pipelines.fusion.gate import GateMismatchError
from pipelines.gate.network import GateConfig, GateNetwork
from pipelines.gate.train import GateLora, GateTrainConfig, gate_layers
from pipelines.lora_formats import save_kohya
from pipelines.lora_weights import LoraWeights
from pipelines.recipe import AdapterSpec, MixRecipe
from studio.cli import main as cli
from studio.config import StudioConfig
from studio.handlers.create import mix_item
from studio.handlers.generate import gate_notes
from studio.handlers.policies import gate_choices
from studio.services import Services, build_services
from tests.pipelines.lora_fixtures import random_lora


def random_gate(pipe, loras: list[LoraWeights], family: str | None, seed: int = 0) -> GateNetwork:
    """A gate with perturbed parameters (so that it differs from ``linear``)."""
    hidden = int(pipe.text_encoder.config.hidden_size)
    net = GateNetwork(
        gate_layers(pipe, [GateLora(str(i), lo, ("x",)) for i, lo in enumerate(loras)]),
        GateConfig(prompt_dim=hidden),
        family,
    )
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return net


@pytest.fixture(scope="module")
def gate_studio(
    tmp_path_factory: pytest.TempPathFactory, tiny_pipeline_dir: Path
) -> Iterator[tuple[Services, dict[str, Path], dict[str, str]]]:
    """Services on the tiny pipeline marked as an ``sd1`` model, two LoRAs in the catalog."""
    root = tmp_path_factory.mktemp("gate-studio")
    model = str(tiny_pipeline_dir)
    config = StudioConfig(data_dir=root / "data", model=model, device="cpu", dtype="fp32")
    services = build_services(config, embedder=HashingEmbedder(64), start_jobs=False, seed=False)
    pipe = services.models.get(model).pipe
    pipe.studio_family = "sd1"
    services.models.put(model, pipe)  # re-read the family from the marker
    files, hashes = {}, {}
    for i, name in enumerate(("alpha", "beta")):
        path = root / f"{name}.safetensors"
        save_kohya(random_lora(pipe, i + 1), path, {"modelspec.title": name})
        files[name] = path
    with services.catalog.session() as session:
        summary = adapters_db.import_paths(session, services.catalog, list(files.values()), base_family="sd1")
        assert all(r.ok for r in summary.results)
        for r in summary.results:
            hashes[Path(r.source).stem] = r.sha256
    yield services, files, hashes
    services.close()


def recipe(hashes: dict[str, str], fusion: str, args: dict) -> MixRecipe:
    return MixRecipe(
        prompt="a red circle",
        adapters=tuple(AdapterSpec(f"sha256:{hashes[n]}", n, 0.8) for n in ("alpha", "beta")),
        fusion=fusion,
        fusion_args=args,
        model="",
        steps=3,
        seed=1,
        width=64,
        height=64,
    )


def test_register_list_resolve_generate(gate_studio, tmp_path, caplog):
    services, files, hashes = gate_studio
    model = services.config.model
    pipe = services.models.get(model).pipe
    from pipelines import lora_formats

    loras = [lora_formats.load(files[n]) for n in ("alpha", "beta")]
    path = random_gate(pipe, loras, "sd1").save(tmp_path / "g.safetensors")
    with services.catalog.session() as session:
        gate = register_gate(
            session,
            services.catalog,
            path,
            name="alpha-beta gate",
            loras=[RoutedLora(n, hashes[n]) for n in ("alpha", "beta")],
        )
        again = register_gate(session, services.catalog, path)
    assert again.id == gate.id and gate.families == ("sd1",) and gate.layers > 0
    assert gate.path is not None and gate.path.is_file() and gate.path != path  # content-addressed copy
    assert [lo.sha256 for lo in gate.loras] == [hashes["alpha"], hashes["beta"]]
    with services.catalog.session() as session:
        assert [g.id for g in list_gates(session, services.catalog)] == [gate.id]
        assert [g.id for g in list_gates(session, services.catalog, base_family="sd1")] == [gate.id]
        assert list_gates(session, services.catalog, base_family="sdxl") == []
        for ref in ("alpha-beta gate", "ALPHA-BETA GATE", gate.autov2, f"sha256:{gate.sha256}", str(gate.id)):
            found = find_gate(session, services.catalog, ref)
            assert found is not None and found.id == gate.id, ref
        assert find_gate(session, services.catalog, "alpha") is None  # a LoRA is no gate
        record = adapters_db.get_adapter(session, services.catalog, gate.id)
    with pytest.raises(ValueError, match="gate checkpoint, not a LoRA"):
        mix_item(record)
    assert gate_choices(services)[0][1] == f"sha256:{gate.sha256}"
    engine = services.engine
    models = services.models
    with caplog.at_level(logging.WARNING, logger="adapters_db.gates"):
        by_name = engine.generate(
            recipe(hashes, "gate", {"checkpoint": "alpha-beta gate"}).with_(model=model)
        )
        assert "trained to route" not in caplog.text  # the mix is the gate's own pair
        only_alpha = recipe(hashes, "gate", {"checkpoint": "alpha-beta gate"}).with_(model=model)
        engine.generate(only_alpha.with_(adapters=only_alpha.adapters[:1]))
        assert "trained to route alpha, beta" in caplog.text and "beta missing" in caplog.text
    by_hash = engine.generate(recipe(hashes, "gate", {"checkpoint": gate.autov2}).with_(model=model))
    by_path = engine.generate(recipe(hashes, "gate", {"checkpoint": str(path)}).with_(model=model))
    linear = engine.generate(recipe(hashes, "linear", {}).with_(model=model))
    assert models.get(model).pipe is pipe
    a, b, c, lin = (np.asarray(g.images[0], np.float32) for g in (by_name, by_hash, by_path, linear))
    assert np.array_equal(a, b) and np.array_equal(a, c)
    assert np.abs(a - lin).mean() > 0.5  # the perturbed gate really routes differently
    assert by_name.gates.shape[0] == 3 and not torch.allclose(by_name.gates, linear.gates)
    with pytest.raises(FileNotFoundError, match="neither a file nor a gate"):
        engine.generate(recipe(hashes, "gate", {"checkpoint": "no such gate"}).with_(model=model))
    with services.catalog.session() as session:
        items = [
            mix_item(adapters_db.find_by_hash(session, services.catalog, hashes[n]))
            for n in ("beta", "alpha")
        ]
    args = {"checkpoint": "alpha-beta gate"}
    assert gate_notes(services, "gate", args, items) == []  # any order
    (note,) = gate_notes(services, "gate", args, items[:1])
    assert "trained to route alpha, beta" in note and "alpha missing" in note
    assert gate_notes(services, "linear", args, items[:1]) == []


def test_gate_of_another_family_is_refused(gate_studio, tmp_path):
    services, files, _ = gate_studio
    model = services.config.model
    pipe = services.models.get(model).pipe
    from pipelines import lora_formats

    loras = [lora_formats.load(files[n]) for n in ("alpha", "beta")]
    path = random_gate(pipe, loras, "sdxl").save(tmp_path / "xl.safetensors")
    with services.catalog.session() as session:
        gate = register_gate(session, services.catalog, path, name="xl gate")
        assert gate.families == ("sdxl",)
        assert all(g.id != gate.id for g in list_gates(session, services.catalog, base_family="sd1"))
    rec = MixRecipe(
        prompt="a red circle",
        adapters=tuple(AdapterSpec(str(files[n]), n, 0.8) for n in ("alpha", "beta")),
        fusion="gate",
        model=model,
        steps=2,
        width=64,
        height=64,
    )
    with pytest.raises(GateMismatchError, match="fits sdxl models; this model is 'sd1'"):
        services.engine.generate(rec.with_(fusion_args={"checkpoint": "xl gate"}))
    with pytest.raises(GateMismatchError, match="trained for 'sdxl' models; this model is 'sd1'"):
        services.engine.generate(rec.with_(fusion_args={"checkpoint": str(path)}))
    # a gate for other layer shapes is refused too, even without a family
    net = GateNetwork({"unet.down_blocks.0.attentions.0.proj_in": 999}, GateConfig(prompt_dim=32))
    odd = net.save(tmp_path / "odd.safetensors")
    with pytest.raises(GateMismatchError, match="999 channels"):
        services.engine.generate(rec.with_(fusion_args={"checkpoint": str(odd)}))


def test_search_leaves_gates_out(gate_studio, tmp_path):
    services, files, _ = gate_studio
    pipe = services.models.get(services.config.model).pipe
    from pipelines import lora_formats

    loras = [lora_formats.load(files[n]) for n in ("alpha", "beta")]
    path = random_gate(pipe, loras, "sd1", seed=5).save(tmp_path / "searchable.safetensors")
    with services.catalog.session() as session:
        gate = register_gate(session, services.catalog, path, name="alpha zebra gate", tags=["zebra"])
        hits = adapters_db.search(session, services.catalog, "alpha zebra gate", k=10, include_nsfw=True)
        browse = adapters_db.list_adapters(session, services.catalog, kind="lora", include_nsfw=True)
    assert hits and all(h.adapter.kind != "gate" for h in hits)
    assert gate.id not in {h.adapter.id for h in hits}
    assert gate.id not in {r.id for r in browse.items} and len(browse.items) == 2
    # the Catalog tab's type filter: gates alone, LoRAs alone, by name too (gates are listed, not searched)
    from studio.handlers import catalog as C

    def records(**q):
        return C.browse(services, C.CatalogQuery(include_nsfw=True, **q)).items

    def ids(**q):
        return [r.id for r in records(**q)]

    assert gate.id in ids(kind="gate") and {r.kind for r in records(kind="gate")} == {"gate"}
    assert ids(kind="gate", text="zebra") == [gate.id]
    assert ids(kind="gate", text="alpha beta nothing") == []
    assert gate.id not in ids(kind="lora") and len(ids(kind="lora")) == 2
    assert gate.id not in ids(kind="lora", text="alpha") and ids(kind="lora", text="alpha")
    assert ids(kind="locon") == [] and gate.id in ids()
    with pytest.raises(ValueError, match="unknown adapter type"):
        C.CatalogQuery(kind="checkpoint")


def test_gate_cli_train_register_list(tiny_pipeline_dir, tmp_path, capsys):
    from pipelines.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(0)
    paths = []
    for i, name in enumerate(("cat", "car")):
        path = tmp_path / f"{name}.safetensors"
        save_kohya(random_lora(pipe, 10 + i), path)
        (tmp_path / f"{name}.txt").write_text(f"# prompts\na photo of a {name}\na drawing of a {name}\n")
        paths.append(path)
    data = tmp_path / "data"
    out = tmp_path / "gate.safetensors"
    base = ["gate", "train", "--data-dir", str(data), "--model", str(tiny_pipeline_dir), "--device", "cpu"]
    base += [a for p in paths for a in ("--lora", str(p))]
    fast = ["--steps", "2", "--batch-size", "2", "--images-per-lora", "2", "--sample-steps", "2"]
    assert cli([*base, *fast, "--out", str(out)]) == 2  # no prompts for these LoRAs
    assert "no prompts for LoRA 'cat'" in capsys.readouterr().err
    prompts = [a for n in ("cat", "car") for a in ("--prompts", f"{n}={tmp_path / (n + '.txt')}")]
    args = [*base, *fast, *prompts, "--pair", "0:1", "--no-time", "--out", str(out), "--register"]
    assert cli(args) == 0
    assert capsys.readouterr().out.strip() == str(out)
    net = GateNetwork.load(out)
    assert not net.cfg.use_time and net.cfg.use_prompt and net.channels
    assert cli(["gate", "list", "--data-dir", str(data)]) == 0
    listed = capsys.readouterr().out.strip().splitlines()
    assert len(listed) == 1 and "\tgate\t" in listed[0] and listed[0].endswith("cat, car")
    assert cli([*base, *prompts, "--pair", "0:0"]) == 2
    assert "two different positions" in capsys.readouterr().err


def test_register_refuses_a_family_the_gate_was_not_trained_for(gate_studio, tmp_path, capsys):
    services, files, _ = gate_studio
    pipe = services.models.get(services.config.model).pipe
    from pipelines import lora_formats

    loras = [lora_formats.load(files[n]) for n in ("alpha", "beta")]
    sd1 = random_gate(pipe, loras, "sd1", seed=7).save(tmp_path / "g1.safetensors")
    with services.catalog.session() as session:
        with pytest.raises(GateRegistrationError, match=r"trained for 'sd1' models.*registered for pocket"):
            register_gate(session, services.catalog, sd1, name="g1b", families=["pocket", "sd15"])
        assert all(g.name != "g1b" for g in list_gates(session, services.catalog))
        same = register_gate(session, services.catalog, sd1, name="g1", families=["sd15", "SD 1.5"])
        assert same.families == ("sd1",)  # its own family, by any alias, is fine
    data = tmp_path / "data"
    register = ["gate", "register", "--data-dir", str(data)]
    assert cli([*register, str(sd1), "--name", "g1b", "--family", "pocket"]) == 2
    assert "trained for 'sd1' models and only runs on them" in capsys.readouterr().err
    assert cli(["gate", "list", "--data-dir", str(data), "--family", "pocket"]) == 0
    assert capsys.readouterr().out == ""
    # a gate file that records no family takes the families named
    anyfam = random_gate(pipe, loras, None, seed=8).save(tmp_path / "any.safetensors")
    assert cli([*register, str(anyfam), "--name", "free", "--family", "pocket", "--family", "sd1"]) == 0
    listed = capsys.readouterr().out.strip()
    assert "\tfree\t" in listed and listed.endswith("\tpocket,sd1")


def test_gate_train_refuses_zero_steps_up_front(tiny_pipeline_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match="steps must be ≥ 1, got 0"):
        GateTrainConfig(steps=0)
    lora = tmp_path / "cat.safetensors"
    out = tmp_path / "gate.safetensors"
    args = ["gate", "train", "--data-dir", str(tmp_path / "data"), "--model", str(tiny_pipeline_dir)]
    args += ["--lora", str(lora), "--lora", str(lora), "--steps", "0", "--out", str(out)]
    assert cli(args) == 2  # refused before the LoRAs are even looked at
    assert "invalid gate training option: steps must be ≥ 1, got 0" in capsys.readouterr().err
    assert not out.exists()


def test_routing_mismatch_compares_the_mix_with_the_routed_loras(gate_studio, tmp_path, caplog):
    services, files, hashes = gate_studio
    pipe = services.models.get(services.config.model).pipe
    from pipelines import lora_formats

    loras = [lora_formats.load(files[n]) for n in ("alpha", "beta")]
    path = random_gate(pipe, loras, "sd1", seed=9).save(tmp_path / "routes.safetensors")
    routes = [RoutedLora("alpha", hashes["alpha"]), RoutedLora("beta", hashes["beta"])]
    with services.catalog.session() as session:
        register_gate(session, services.catalog, path, name="routes gate", loras=routes)
        gate = find_gate(session, services.catalog, "routes gate")
    assert gate is not None
    a, b = ("alpha", hashes["alpha"]), ("beta", hashes["beta"])
    assert routing_mismatch(gate, [b, a]) is None  # any order
    assert routing_mismatch(gate, [("my alpha", hashes["alpha"]), ("b", hashes["beta"][:10])]) is None
    assert routing_mismatch(gate, [("alpha", None), ("BETA", None)]) is None  # names when no hash
    other = routing_mismatch(gate, [a, ("beta", "f" * 64)])  # same name, other file
    assert other is not None and "beta not among them; beta missing" in other
    one = routing_mismatch(gate, [a])
    assert one is not None and "'routes gate' was trained to route alpha, beta" in one
    assert "(beta missing)" in one
    none = routing_mismatch(gate, [])
    assert none is not None and "no LoRA" in none and "alpha, beta missing" in none
    extra = routing_mismatch(gate, [a, b, ("gamma", "e" * 64)])
    assert extra is not None and "gamma not among them" in extra and "missing" not in extra
    with caplog.at_level("WARNING", logger="adapters_db.gates"):
        assert warn_routing_mismatch(gate, [a]) == one
    assert one in caplog.text
    unrouted = dataclasses.replace(gate, loras=())
    assert routing_mismatch(unrouted, [("gamma", None)]) is None  # nothing recorded: nothing to compare
