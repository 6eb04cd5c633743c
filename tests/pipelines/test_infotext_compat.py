"""A1111 infotext (the PNG ``parameters`` text) read and written the way AUTOMATIC1111, Forge and
Civitai do: multi-line prompts, quoted values with escapes, key names with ``-`` and ``/``, a prompt
that looks like parameters, Civitai's JSON fields; ``<lora:…>`` tags and ``Lora hashes`` that A1111's
paste handler can map back to the file."""

from __future__ import annotations

import json
import re

import pytest

from pipelines.recipe import (
    AdapterSpec,
    MixRecipe,
    a1111_parameters,
    parse_a1111_parameters,
    parse_lora_tags,
    quote,
)

A1111 = (
    "masterpiece, 1girl,\n"
    "red hair, (smile:1.2) <lora:name1:0.8>\n"
    "Negative prompt: lowres,\n"
    "bad hands\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 965400086, "
    "Size: 512x768, Model hash: 45dee52b, Model: v1-5-pruned-emaonly, Clip skip: 2, "
    "Hires upscale: 2, Hires upscaler: Latent, "
    'Lora hashes: "name1: abc123def456, name2: 0123456789ab", '
    'TI hashes: "easynegative: c74b4e810b03", Version: v1.6.0'
)


def test_reads_a1111_infotext_with_multiline_prompts_and_quoted_hashes() -> None:
    got = parse_a1111_parameters(A1111)
    assert got["prompt"] == "masterpiece, 1girl,\nred hair, (smile:1.2) <lora:name1:0.8>"
    assert got["negative_prompt"] == "lowres,\nbad hands"
    assert (got["Steps"], got["Seed"], got["CFG scale"], got["Size"]) == ("20", "965400086", "7", "512x768")
    assert (got["Schedule type"], got["Clip skip"], got["Hires upscale"]) == ("Karras", "2", "2")
    assert got["Lora hashes"] == "name1: abc123def456, name2: 0123456789ab"
    assert got["TI hashes"] == "easynegative: c74b4e810b03"
    assert (got["Model hash"], got["Version"]) == ("45dee52b", "v1.6.0")


def test_quoted_values_are_json_unescaped_like_a1111() -> None:
    text = 'a cat\nSteps: 5, Sampler: Euler, Note: "say \\"hi\\", then: go\\nback", Seed: 1'
    got = parse_a1111_parameters(text)
    assert got["Note"] == 'say "hi", then: go\nback'
    assert (got["Steps"], got["Seed"], got["prompt"]) == ("5", "1", "a cat")


def test_keys_with_dashes_and_slashes_are_read() -> None:
    text = "x\nSteps: 5, Sampler: Euler, Hypertile U-Net: True, ToMe ratio/step: 0.5, Seed: 9"
    got = parse_a1111_parameters(text)
    assert (got["Hypertile U-Net"], got["ToMe ratio/step"], got["Seed"]) == ("True", "0.5", "9")


@pytest.mark.parametrize(
    "text,prompt",
    [
        ("Steps: a stone staircase, moss", "Steps: a stone staircase, moss"),  # fewer than 3 fields
        ("a tower\nSteps: a stone staircase, moss", "a tower\nSteps: a stone staircase, moss"),
    ],
)
def test_a_prompt_that_starts_with_steps_stays_the_prompt(text: str, prompt: str) -> None:
    got = parse_a1111_parameters(text)
    assert got["prompt"] == prompt and "Steps" not in got


def test_prompt_containing_steps_before_the_parameters_line() -> None:
    text = "Steps: stairs, Seed: of doubt, Size: huge\nSteps: 4, Sampler: Euler, Seed: 2"
    got = parse_a1111_parameters(text)
    assert got["prompt"] == "Steps: stairs, Seed: of doubt, Size: huge"
    assert (got["Steps"], got["Seed"], got["negative_prompt"]) == ("4", "2", "")


def test_infotext_without_negative_prompt_or_prompt() -> None:
    got = parse_a1111_parameters("a red circle\nSteps: 3, Sampler: DDIM, Seed: 7")
    assert (got["prompt"], got["negative_prompt"], got["Seed"]) == ("a red circle", "", "7")
    got = parse_a1111_parameters("Negative prompt: blur\nSteps: 3, Sampler: DDIM, Seed: 7")
    assert (got["prompt"], got["negative_prompt"]) == ("", "blur")


def test_civitai_infotext_keeps_its_json_fields_whole() -> None:
    resources = [
        {"type": "checkpoint", "modelVersionId": 128713, "modelName": "DreamShaper, v8"},
        {"type": "lora", "weight": 0.8, "modelVersionId": 62833},
    ]
    text = (
        "a fox <lora:fox_v2:0.8>\r\nNegative prompt: blurry\r\n"
        "Steps: 30, CFG scale: 7, Sampler: DPM++ 2M Karras, Seed: 1234567, Size: 512x768, Clip skip: 2, "
        "Created Date: 2024-01-05T10:11:12.0000000Z, "
        f"Civitai resources: {json.dumps(resources, separators=(',', ':'))}, "
        'Civitai metadata: {"remixOfId":123}'
    )
    got = parse_a1111_parameters(text)
    assert (got["prompt"], got["negative_prompt"]) == ("a fox <lora:fox_v2:0.8>", "blurry")
    assert (got["Seed"], got["Size"], got["Clip skip"]) == ("1234567", "512x768", "2")
    assert got["Created Date"] == "2024-01-05T10:11:12.0000000Z"
    assert json.loads(got["Civitai resources"]) == resources
    assert json.loads(got["Civitai metadata"]) == {"remixOfId": 123}


def test_forge_infotext() -> None:
    text = (
        "astronaut riding a horse\n"
        "Steps: 20, Sampler: Euler, Schedule type: Simple, CFG scale: 1, Distilled CFG Scale: 3.5, "
        "Seed: 2716523411, Size: 896x1152, Model hash: bea01d51bd, Model: flux1-dev-bnb-nf4-v2, "
        'Lora hashes: "flux_realism: 4a8e9d9d9b1c", Version: f2.0.1v1.10.1-previous-313-g8a042934, '
        "Module 1: ae, Diffusion in Low Bits: Automatic (fp16 LoRA)"
    )
    got = parse_a1111_parameters(text)
    assert got["Distilled CFG Scale"] == "3.5" and got["Seed"] == "2716523411"
    assert got["Diffusion in Low Bits"] == "Automatic (fp16 LoRA)" and got["Module 1"] == "ae"
    assert got["Lora hashes"] == "flux_realism: 4a8e9d9d9b1c"


def test_quote_follows_a1111() -> None:
    assert quote("Euler a") == "Euler a"
    assert quote("a, b") == '"a, b"' and quote("C:\\m") == '"C:\\\\m"' and quote('x\n"y"') == '"x\\n\\"y\\""'
    assert quote("ünï, x") == '"ünï, x"'  # ensure_ascii=False, as A1111


def recipe(**changes: object) -> MixRecipe:
    base = MixRecipe(
        "a red circle,\nbold lines",
        negative_prompt="blurry,\nlow contrast",
        adapters=(
            AdapterSpec("sha256:" + "a" * 64, "Style, Noir", weight=0.7),
            AdapterSpec("/loras/star.safetensors", weight=0.5, te=0.0),
        ),
        model="C:\\models\\sd15, pruned.safetensors",
        seed=4294967295,
        steps=25,
        guidance=5.5,
    )
    return base.with_(**changes)


HASHES = {"Style, Noir": "0123456789ab", "star": "abcdefabcdef"}


def test_written_infotext_round_trips_through_the_a1111_reader() -> None:
    r = recipe()
    text = a1111_parameters(r, HASHES, "DPM++ 2M", 512, 768)
    got = parse_a1111_parameters(text)
    assert got["negative_prompt"] == "blurry,\nlow contrast"
    assert got["prompt"].startswith("a red circle,\nbold lines <lora:")
    assert (got["Steps"], got["Seed"], got["CFG scale"], got["Size"]) == (
        "25",
        "4294967295",
        "5.5",
        "512x768",
    )
    assert got["Model"] == "sd15, pruned"  # the checkpoint's name (quoted: it holds a comma), not its folder


def a1111_paste(text: str) -> dict[str, str]:
    """What A1111's Lora extension does on paste (``lora_script.infotext_pasted``): every
    ``<lora:ALIAS:`` whose alias is a key of ``Lora hashes`` is mapped to that hash."""
    hashes_text = parse_a1111_parameters(text)["Lora hashes"]
    pairs = [x.strip().split(":", 1) for x in hashes_text.split(",")]
    hashes = {x[0].strip().replace(",", ""): x[1].strip() for x in pairs}
    prompt = parse_a1111_parameters(text)["prompt"]
    return {alias: hashes[alias] for alias in re.findall("<lora:([^:]+):", prompt) if alias in hashes}


def test_a1111_maps_every_written_tag_back_to_its_hash() -> None:
    text = a1111_parameters(recipe(), HASHES, "DPM++ 2M", 512, 768)
    mapped = a1111_paste(text)
    assert sorted(mapped.values()) == sorted(HASHES.values())
    _, tags = parse_lora_tags(parse_a1111_parameters(text)["prompt"])
    assert [t.weights() for t in tags] == [(0.7, 0.7), (0.0, 0.5)]


def test_a1111_name_of_an_adapter_is_what_the_tag_and_hash_use() -> None:
    spec = AdapterSpec("sha256:" + "a" * 64, "Detail Tweaker LoRA (细节调整)", a1111_name="add_detail")
    text = a1111_parameters(MixRecipe("p", adapters=(spec,)), {spec.label: "0123456789ab"}, "Euler", 8, 8)
    assert text.splitlines()[0] == "p <lora:add_detail:1>"
    assert a1111_paste(text) == {"add_detail": "0123456789ab"}
    assert MixRecipe.from_json(MixRecipe("p", adapters=(spec,)).to_json()).adapters[0] == spec
    windows = AdapterSpec("C:\\loras\\add_detail.safetensors")  # --lora on Windows: the stem, not the path
    assert (windows.label, windows.tag) == ("add_detail", "add_detail")


def test_recipes_written_before_a1111_name_still_load() -> None:
    old = (
        '{"adapters": [{"name": "A", "ref": "sha256:' + "c" * 64 + '", "sha256": null, "te": 1.0, '
        '"unet": 1.0, "weight": 0.5}], "batch_size": 1, "fusion": "linear", "fusion_args": {}, '
        '"guidance": 7.5, "height": null, "model": "pocket", "negative_prompt": "", "prompt": "x", '
        '"sampler": null, "seed": 3, "steps": 20, "version": 1, "width": null}'
    )
    r = MixRecipe.from_json(old)
    assert (r.adapters[0].name, r.adapters[0].a1111_name, r.adapters[0].weight, r.seed) == ("A", "", 0.5, 3)
    assert r.to_json() == old  # written back unchanged: readable by the versions before the field


@pytest.mark.parametrize("weight", [1e-5, 2.5e-7, 123456789.0])
def test_written_weights_parse_back(weight: float) -> None:
    spec = AdapterSpec("/l/x.safetensors", weight=weight)
    text = a1111_parameters(MixRecipe("p", adapters=(spec,)), {}, "Euler", 8, 8)
    _, tags = parse_lora_tags(text.splitlines()[0])
    assert tags[0].weights() == pytest.approx((weight, weight), rel=1e-5)


@pytest.mark.parametrize(
    "tag,weights",
    [
        ("<lora:name:0.8>", (0.8, 0.8)),
        ("<lora:name:0.8:0.5>", (0.8, 0.5)),
        ("<lyco:name:0.7>", (0.7, 0.7)),
        ("<lora:name>", (1.0, 1.0)),
        ("<lora:name:te=0.3:unet=0.9>", (0.3, 0.9)),
        ("<lora:name:0.6:unet=0.2>", (0.6, 0.2)),
        ("<lora:name:1e-1>", (0.1, 0.1)),
        ("<lora:name:1:hr=0.5>", (1.0, 1.0)),  # loractl's hires-pass weight: there is no hires pass
    ],
)
def test_a1111_tags_read(tag: str, weights: tuple[float, float]) -> None:
    clean, tags = parse_lora_tags(f"a cat, {tag}, smiling")
    assert clean == "a cat, , smiling" and [t.name for t in tags] == ["name"]
    assert tags[0].weights() == pytest.approx(weights)


@pytest.mark.parametrize(
    "tag,match",
    [
        ("<lora:name:1:lbw=OUTD>", r"lbw=OUTD.*blocks"),
        ("<lora:name:1:1:lbw=1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1>", "blocks"),
        ("<lora:name:1:dyn=16>", "dyn"),
        ("<lora:name:0.8:0.5:16>", "dyn"),
        ("<lora:name:1:start=10>", "start"),
        ("<lora:name:nan>", "bad weight"),
        ("<lora:name:inf>", "bad weight"),
        ("<lora:name:1,0,0,1>", "bad weight"),
    ],
)
def test_a1111_tags_the_studio_cannot_follow_are_clear_errors(tag: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_lora_tags(f"a cat {tag}")


def test_keyframed_tags_still_read() -> None:
    _, tags = parse_lora_tags("x <lora:name:0@0,1@0.5:unet=1@0,0.2@1>")
    assert tags[0].is_scheduled() and tags[0].te == "0@0,1@0.5" and tags[0].unet == "1@0,0.2@1"


@pytest.mark.parametrize(
    ("model", "title"),
    [
        ("pocket", "pocket"),
        ("runwayml/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5"),
        ("/home/alice/models/sd15/", "sd15"),
        ("/home/alice/ckpt/v1-5-pruned-emaonly.safetensors", "v1-5-pruned-emaonly"),
        ("C:\\models\\dreamshaper_8.safetensors", "dreamshaper_8"),
    ],
)
def test_the_model_field_names_the_model_not_its_folders(model: str, title: str) -> None:
    text = a1111_parameters(MixRecipe("p", model=model), {}, "Euler", 8, 8)
    assert f"Model: {quote(title)}," in text and "alice" not in text
