"""Untrusted PNG metadata and recipes: A1111 infotext from web previews parses in linear time, a recipe
that is valid JSON but wrong is refused with one line naming the file and the field, a damaged or hostile
PNG is a one-line error, and a replayed recipe never reads a system file as a LoRA."""

from __future__ import annotations

import json
import random
import re
import struct
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from adapters_db.importers.sidecars import MAX_INFOTEXT_CHARS, image_parameters, parse_infotext
from pipelines.pngmeta import RECIPE_KEY, read_recipe, read_text_chunks
from pipelines.recipe import (
    AdapterSpec,
    MixRecipe,
    parse_a1111_parameters,
    parse_lora_tags,
    search_field,
)
from studio.cli import build_parser
from studio.cli import main as cli
from studio.commands.generate import recipe_from_args

FAST_S = 1.0  # the regexes these replace took seconds (quadratic) on the same inputs
SIZE = 20_000

ADVERSARIAL = {
    "words and spaces, no colon": "ab " * (SIZE // 3),
    "one long word": "a" * SIZE,
    "unbalanced quotes": 'aa: "' * (SIZE // 5),
    "backslashes in a quote": 'aa: "' + "\\" * SIZE,
    "spaces between key and colon": "a" + " " * SIZE + "x",
}


def _timed(fn: object, *args: object) -> float:
    t0 = time.perf_counter()
    fn(*args)  # type: ignore[operator]
    return time.perf_counter() - t0


@pytest.mark.parametrize("text", ADVERSARIAL.values(), ids=ADVERSARIAL.keys())
def test_a1111_parameters_parse_in_linear_time(text: str) -> None:
    assert _timed(parse_a1111_parameters, "Steps: 1, Seed: 2, " + text) < FAST_S
    assert _timed(parse_a1111_parameters, text) < FAST_S


@pytest.mark.parametrize("text", ADVERSARIAL.values(), ids=ADVERSARIAL.keys())
def test_preview_infotext_parses_in_linear_time(text: str) -> None:
    assert _timed(parse_infotext, "a cat\nSteps: 1, " + text) < FAST_S


def test_lora_tags_without_a_closing_bracket_parse_in_linear_time() -> None:
    assert _timed(parse_lora_tags, "<lora:a" * (SIZE // 7)) < FAST_S
    assert _timed(parse_lora_tags, "<lora:a:" * (SIZE // 8)) < FAST_S
    assert parse_lora_tags("x <lora:a:0.5> y <lora:b") == ("x y <lora:b", parse_lora_tags("<lora:a:0.5>")[1])


def test_many_fields_that_look_like_json_parse_fast() -> None:
    line = "Steps: 1, Seed: 2, " + 'aa: ["x, ' * 40_000  # each failed decode cost time ∝ its position
    assert _timed(parse_a1111_parameters, line) < 2.0


def test_json_nested_too_deep_is_read_as_text() -> None:
    got = parse_a1111_parameters("p\nSteps: 1, Sampler: x, Civitai resources: " + "[" * 100_000)
    assert got["Steps"] == "1" and got["Civitai resources"] == "[" * 100_000


# A1111's ``re_param`` and the preview importer's former pattern, for the linear scan to agree with
A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
PREVIEW_PARAM = re.compile(r'\s*([\w][\w \-/+]*?):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def test_linear_field_search_finds_what_the_regexes_find() -> None:
    rng = random.Random(0)
    alphabet = list('ab_1 :,"\\-/+\t\u00e9\u2028\u3000Z9.[]{}')
    lenient = {"key_chars": r"\w \-/+", "min_key": 1, "empty_quotes": True}
    for _ in range(20_000):
        line = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))
        pos = rng.randint(0, len(line))
        for regex, kwargs in ((A1111_PARAM, {}), (PREVIEW_PARAM, lenient)):
            m = regex.search(line, pos)
            want = None if m is None else (m[1], m[2], m.start(2), m.end())
            assert search_field(line, pos, **kwargs) == want, (line, pos)  # type: ignore[arg-type]


def test_huge_preview_infotext_is_not_read() -> None:
    assert parse_infotext("a cat\nSteps: 1, " + "a: b, " * (MAX_INFOTEXT_CHARS // 6)) == {}
    assert parse_infotext("a cat\nSteps: 20, Sampler: Euler")["Sampler"] == "Euler"


# ----------------------------------------------------------------------------------- recipe JSON
GOOD = {"version": 1, "prompt": "a cat", "adapters": [{"ref": "sha256:" + "a" * 64, "weight": 0.8}]}


def _recipe(**changes: object) -> str:
    data = json.loads(json.dumps(GOOD))
    for key, value in changes.items():
        if value is None and key in ("prompt", "version"):
            data.pop(key)
        else:
            data[key] = value
    return json.dumps(data)


BAD_RECIPES = {
    "steps text": (_recipe(steps="x"), "'steps'"),
    "steps 2.5": (_recipe(steps=2.5), "'steps'"),
    "steps 0": (_recipe(steps=0), "'steps'"),
    "seed 1e400": (_recipe().replace('"version": 1', '"version": 1, "seed": 1e400'), "seed"),
    "guidance NaN": (_recipe().replace('"version": 1', '"version": 1, "guidance": NaN'), "'guidance'"),
    "guidance 10**400": (_recipe(guidance=10**400), "'guidance'"),
    "weight Infinity": (_recipe().replace('"weight": 0.8', '"weight": Infinity'), "adapter 1 field 'weight'"),
    "weight text": (_recipe(adapters=[{"ref": "x", "te": "heavy"}]), "adapter 1 field 'te'"),
    "adapters text": (_recipe(adapters="abc"), "'adapters'"),
    "adapters object": (_recipe(adapters={"ref": "x"}), "'adapters'"),
    "adapter a list": (_recipe(adapters=[["x"]]), "adapter 1"),
    "adapter without ref": (_recipe(adapters=[{"weight": 1}]), "adapter 1 field 'ref' is missing"),
    "adapter ref a number": (_recipe(adapters=[{"ref": 5}]), "adapter 1 field 'ref'"),
    "adapter sha256 not hex": (_recipe(adapters=[{"ref": "x", "sha256": "../x"}]), "'sha256'"),
    "adapter field from the future": (_recipe(adapters=[{"ref": "x", "dora": 1}]), "'dora' is unknown"),
    "field from the future": (_recipe(hires=True), "'hires' is unknown"),
    "version from the future": (_recipe(version=2), "version 2 .*newer"),
    "version true": (_recipe(version=True), "version True"),
    "missing prompt": (_recipe(prompt=None), "'prompt' is missing"),
    "prompt null": (json.dumps({**GOOD, "prompt": None}), "'prompt'"),
    "model empty": (_recipe(model=""), "'model'"),
    "model a number": (_recipe(model=3), "'model'"),
    "sampler a number": (_recipe(sampler=3), "'sampler'"),
    "width text": (_recipe(width="512"), "'width'"),
    "batch 0": (_recipe(batch_size=0), "'batch_size'"),
    "nested too deep": ('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", "not valid JSON"),
    "not an object": ("[1, 2]", "not a JSON object"),
    "null": ("null", "not a JSON object"),
    "int of 5000 digits": (_recipe(seed=1).replace('"seed": 1', '"seed": ' + "9" * 5000), "not valid JSON"),
}


@pytest.mark.parametrize("text,field", BAD_RECIPES.values(), ids=BAD_RECIPES.keys())
def test_wrong_recipes_are_refused_naming_the_field(text: str, field: str) -> None:
    with pytest.raises(ValueError, match=field) as err:
        MixRecipe.from_json(text)
    assert "\n" not in str(err.value) and len(str(err.value)) < 400


def test_every_field_the_studio_writes_reads_back() -> None:
    full = MixRecipe(
        "p",
        "n",
        (
            AdapterSpec("/x/a.safetensors", "A", 0.5, 0.9, 1.1, "b" * 64, "a_file"),
            AdapterSpec("sha256:" + "c" * 64),
        ),
        "blocks",
        {"blocks": "OUTD"},
        "some/model",
        2**63 - 1,
        30,
        7,
        512,
        768,
        "Euler a",
        2,
        2,
    )
    assert MixRecipe.from_json(full.to_json()) == full
    assert MixRecipe.from_json('{"prompt": "x"}') == MixRecipe("x")  # version and defaults may be absent


# ----------------------------------------------------------------------------------- PNG files
def _png(path: Path, text: dict[str, str] | None = None, *, compressed: bool = False) -> Path:
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        if compressed:
            info.add_itxt(key, value, zip=True)
        else:
            info.add_text(key, value)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@pytest.mark.parametrize("compressed", [False, True])
def test_a_wrong_recipe_in_a_png_names_the_file_and_the_field(tmp_path: Path, compressed: bool) -> None:
    path = _png(tmp_path / "bad.png", {RECIPE_KEY: _recipe(steps="x")}, compressed=compressed)
    with pytest.raises(ValueError, match=r"bad\.png: recipe field 'steps'"):
        read_recipe(path)


def test_damaged_and_hostile_pngs_are_one_line_errors_naming_the_file(tmp_path: Path) -> None:
    good = _png(tmp_path / "good.png", {RECIPE_KEY: _recipe()}).read_bytes()
    cases = {"text.png": b"hello", "truncated.png": good[:60]}
    too_big = zlib.compress(b" " * 2_000_000)  # decompresses past PIL's MAX_TEXT_CHUNK
    cases["big_itxt.png"] = (
        good[:33] + _chunk(b"iTXt", RECIPE_KEY.encode() + b"\0\1\0\0\0" + too_big) + good[33:]
    )
    header = struct.pack(">IIBBBBB", 20_000, 20_000, 8, 0, 0, 0, 0)  # a decompression bomb by its size
    cases["bomb.png"] = good[:8] + _chunk(b"IHDR", header) + _chunk(b"IEND", b"")
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=re.escape(str(tmp_path / name)) + ": ") as err:
            read_recipe(tmp_path / name)
        assert "\n" not in str(err.value)
    assert image_parameters(tmp_path / "bomb.png") == {}


def test_an_a1111_png_says_its_parameters_are_not_replayed(tmp_path: Path) -> None:
    path = _png(tmp_path / "a1111.png", {"parameters": "a cat\nSteps: 20, Sampler: Euler a, Seed: 1"})
    with pytest.raises(ValueError, match=r"a1111\.png: .*A1111 `parameters` text, which is not replayed"):
        read_recipe(path)


def test_text_of_an_animated_png_is_read_without_decoding_its_frames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text(RECIPE_KEY, _recipe())
    frames = [Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(3)]
    path = tmp_path / "anim.png"
    frames[0].save(path, save_all=True, append_images=frames[1:], pnginfo=info)

    def refuse(*_: object) -> None:
        raise AssertionError("frames decoded: thousands of large frames would take minutes")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", refuse)
    assert read_text_chunks(path)[RECIPE_KEY] == _recipe()


# ----------------------------------------------------------------------------------- generate --recipe
def _replay(png: Path, out: Path) -> MixRecipe:
    args = build_parser().parse_args(["generate", "--recipe", str(png), "--out", str(out)])
    return recipe_from_args(args)


@pytest.mark.parametrize("target", ["/dev/zero", "passwd"])
def test_a_replayed_adapter_ref_to_a_system_file_is_refused(tmp_path: Path, target: str) -> None:
    if target == "passwd":
        target = str(tmp_path / "passwd")
        Path(target).write_text("root:x:0:0:root:/root:/bin/bash\n")
    elif not Path(target).exists():
        pytest.skip(f"{target} is absent here")
    png = _png(tmp_path / "r.png", {RECIPE_KEY: _recipe(adapters=[{"ref": target}])})
    with pytest.raises(ValueError, match=r"r\.png: recipe adapter 1 field 'ref' .*not a \.safetensors"):
        _replay(png, tmp_path / "o.png")


def test_a_replayed_adapter_ref_that_is_a_lora_file_or_absent_still_replays(tmp_path: Path) -> None:
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"")
    refs = [{"ref": str(lora)}, {"ref": str(tmp_path / "elsewhere.safetensors"), "sha256": "d" * 64}]
    png = _png(tmp_path / "r.png", {RECIPE_KEY: _recipe(adapters=refs)})
    assert [a.ref for a in _replay(png, tmp_path / "o.png").adapters] == [r["ref"] for r in refs]


def test_generate_recipe_with_a_bad_png_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = _png(tmp_path / "r.png", {RECIPE_KEY: _recipe(adapters="abc")})
    assert cli(["generate", "--recipe", str(png), "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"error: {png}: recipe field 'adapters'")
