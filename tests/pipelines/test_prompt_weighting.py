"""A1111 prompts: emphasis, BREAK, long prompts, negative padding and clip skip, against A1111's own
examples (modules/prompt_parser.py doctests) and against diffusers' encode_prompt on tiny pipelines."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from pipelines import prompt_weighting as pw
from pipelines.adapter_cache import AdapterCache
from pipelines.engine import Engine, attach, model_modules
from pipelines.fusion import AdapterInfo, make_policy
from pipelines.lora_weights import LoraLayer, LoraWeights
from pipelines.models import ModelStore
from pipelines.recipe import (
    AdapterSpec,
    MixRecipe,
    a1111_parameters,
    infotext_clip_skip,
    parse_a1111_parameters,
)
from pipelines.sd_parts import build_scheduler
from pipelines.tokenizer import clip_tokenizer
from studio.cli import build_parser
from studio.commands import generate as gen_cmd
from studio.handlers import generate as gen_handler
from studio.handlers.state import SessionState

STEPS = 3
# 120 one-token words, no commas (so A1111's comma backtrack does not move the chunk boundary)
WORDS = ("red circle blue square green star " * 20).split()[:120]
TAIL = ("yellow heart black triangle white moon " * 8).split()[:45]
LONG = " ".join(WORDS)
LONG_OTHER_TAIL = " ".join(WORDS[:75] + TAIL)


# ---- parsing: A1111's documented examples (modules/prompt_parser.py parse_prompt_attention doctests)

A1111_DOCTESTS = [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ["a ", 1.0],
            ["house", 1.5730000000000004],
            [" ", 1.1],
            ["on", 1.0],
            [" a ", 1.1],
            ["hill", 0.55],
            [", sun, ", 1.1],
            ["sky", 1.4641000000000006],
            [".", 1.1],
        ],
    ),
]


@pytest.mark.parametrize("text,expected", A1111_DOCTESTS)
def test_parse_equals_a1111_doctests_exactly(text, expected):
    assert [list(run) for run in pw.parse_prompt_attention(text)] == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        (
            "a (house:1.3) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.3),
                (" ", 1.0),
                ("on", 1 / 1.1),
                (" a ", 1.0),
                ("hill", 0.5),
                (", sun, ", 1.0),
                ("sky", 1.331),
                (".", 1.0),
            ],
        ),
        ("((word))", [("word", 1.21)]),
        ("[word]", [("word", 1 / 1.1)]),
        ("[[word]]", [("word", 1 / 1.21)]),
        ("(word : 1.3 ) x", [("word ", 1.3), (" x", 1.0)]),  # A1111 ≥ 1.6 allows spaces round the weight
        ("\\(a\\) \\[b\\] c\\\\d", [("(a) [b] c\\d", 1.0)]),
        ("a) b]", [("a) b]", 1.0)]),  # closing brackets with nothing open are text
        ("x [y (z", [("x ", 1.0), ("y ", 1 / 1.1), ("z", 1.1 / 1.1)]),  # open brackets run to the end
        ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("a BREAKfast", [("a BREAKfast", 1.0)]),  # BREAK is a whole word
        ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),  # A1111: BREAK in brackets is a word
        ("", [("", 1.0)]),
    ],
)
def test_parse_cases(text, expected):
    got = pw.parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_bad_weight_is_a_value_error():
    with pytest.raises(ValueError, match="bad emphasis weight"):
        pw.parse_prompt_attention("(a:1.2.3)")


@pytest.mark.parametrize(
    "text,special",
    [
        ("a red circle", False),
        ("a: red, circle", False),
        ("(red)", True),
        ("\\(red\\)", True),
        ("a BREAK b", True),
    ],
)
def test_uses_prompt_syntax(text, special):
    assert pw.uses_prompt_syntax(text) is special


# ---- chunking (A1111 sd_hijack_clip tokenize_line) with a word tokenizer

BOS, EOS, COMMA = 1000, 1001, 5


def word_ids(texts: list[str]) -> list[list[int]]:
    """One token per word, "," its own token (id 5)."""
    out = []
    for text in texts:
        ids = []
        for word in text.replace(",", " , ").split():
            ids.append(COMMA if word == "," else 10 + len(word))
        out.append(ids)
    return out


def chunks_of(text: str, **kw) -> list[pw.PromptChunk]:
    return pw.tokenize_line(
        pw.parse_prompt_attention(text), word_ids, id_start=BOS, id_end=EOS, comma_token=COMMA, **kw
    )


def test_chunks_are_bos_75_tokens_eos():
    chunks = chunks_of(" ".join(["w"] * 120))
    assert len(chunks) == 2
    for chunk in chunks:
        assert len(chunk.tokens) == 77 and chunk.tokens[0] == BOS and chunk.tokens[-1] == EOS
    assert chunks[0].tokens[1:76] == (11,) * 75
    assert chunks[1].tokens[1:46] == (11,) * 45 and chunks[1].tokens[46:] == (EOS,) * 31
    assert chunks_of("") == [pw.PromptChunk((BOS,) + (EOS,) * 76, (1.0,) * 77)]


def test_chunk_weights_and_break():
    chunks = chunks_of("a (bb:1.5) BREAK [ccc] BREAK")
    assert len(chunks) == 2  # a trailing BREAK opens no empty chunk
    assert chunks[0].tokens[:4] == (BOS, 11, 12, EOS) and chunks[0].multipliers[:4] == (1.0, 1.0, 1.5, 1.0)
    assert chunks[1].tokens[:3] == (BOS, 13, EOS) and chunks[1].multipliers[1] == pytest.approx(1 / 1.1)


def test_comma_backtrack_moves_the_last_words_to_the_next_chunk():
    text = " ".join(["w"] * 70) + ", " + " ".join(["x"] * 10)  # 70 + comma + 10 = 81 tokens
    moved = chunks_of(text)
    assert moved[0].tokens[70:73] == (11, COMMA, EOS)  # cut after the comma, EOS-padded
    assert moved[1].tokens[1:11] == (11,) * 10
    kept = chunks_of(text, comma_backtrack=0)
    assert kept[0].tokens[70:76] == (11, COMMA, 11, 11, 11, 11) and kept[1].tokens[1:7] == (11,) * 6
    far = chunks_of(" ".join(["w"] * 30) + ", " + " ".join(["x"] * 50))  # comma 44 tokens back: no move
    assert far[0].tokens[32:76] == (11,) * 44


def test_pad_after_first_eos_only_when_pad_differs():
    chunk = pw.PromptChunk((BOS, 11, EOS, EOS, EOS), (1.0,) * 5)
    assert pw.chunk_ids(chunk, EOS, EOS) == [BOS, 11, EOS, EOS, EOS]
    assert pw.chunk_ids(chunk, EOS, 0) == [BOS, 11, EOS, 0, 0]


def test_emphasis_scales_tokens_and_keeps_the_mean():
    z = torch.randn(1, 6, 4, generator=torch.Generator().manual_seed(0)) + 0.5
    ones = torch.ones(1, 6)
    assert torch.equal(pw.apply_emphasis(z, ones), z)
    mult = torch.tensor([[1.0, 1.0, 1.5, 1.0, 0.5, 1.0]])
    out = pw.apply_emphasis(z, mult)
    assert out.mean().item() == pytest.approx(z.mean().item(), rel=1e-5)
    scale = z.mean() / (z * mult[..., None]).mean()
    assert torch.allclose(out, z * mult[..., None] * scale, atol=1e-6)
    assert not torch.allclose(out, z, atol=1e-3)


def test_emphasis_skips_the_rescale_where_the_mean_is_noise():
    z = torch.randn(1, 6, 4, generator=torch.Generator().manual_seed(1))
    z = z - z.mean(dim=-1, keepdim=True)  # an untrained final LayerNorm: every token has zero mean
    mult = torch.tensor([[1.0, 1.3, 1.0, 1.0, 1.0, 1.0]])
    assert torch.equal(pw.apply_emphasis(z, mult), z * mult[..., None])


def test_pad_cond_uncond_appends_empty_chunks_to_the_shorter():
    empty = torch.full((1, 77, 3), 7.0)
    cond, uncond = torch.zeros(1, 231, 3), torch.ones(1, 77, 3)
    c, u = pw.pad_cond_uncond(cond, uncond, empty)
    assert c is cond and u.shape == (1, 231, 3)
    assert torch.equal(u[:, :77], uncond) and (u[:, 77:] == 7.0).all()
    u2, c2 = pw.pad_cond_uncond(uncond, cond, empty)
    assert u2.shape == (1, 231, 3) and c2 is cond


# ---- the tiny SD-1.5-layout pipeline


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir: Path) -> StableDiffusionPipeline:
    """The tiny pipeline with a final LayerNorm bias: at init its tokens have zero mean, and A1111's mean
    restoring would divide by ~0 (real CLIP's mean is far from 0)."""
    p = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    p.set_progress_bar_config(disable=True)
    with torch.no_grad():
        pw.final_layer_norm(p.text_encoder).bias.copy_(torch.linspace(-0.2, 0.3, 32))
    return p


def diffusers_embeds(pipe, prompt: str, negative: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' own encoding of prompt strings (truncated at 77 tokens)."""
    with torch.no_grad():
        return pipe.encode_prompt(prompt, torch.device("cpu"), 1, True, negative)


def ours(pipe, prompt: str, negative: str = "", **kw) -> dict[str, torch.Tensor]:
    out = pw.prompt_embeddings(pipe, prompt, negative, force=True, **kw)
    assert out is not None
    return out


def test_tiny_tokenizer_window_is_77(pipe):
    (encoder,) = pw.pipeline_encoders(pipe)
    assert (encoder.window, encoder.chunk_length) == (77, 75)
    assert encoder.count_tokens(LONG) == 120 and encoder.count_tokens(" ".join(TAIL)) == 45


def test_plain_prompt_keeps_the_strings_path_and_equals_diffusers(pipe):
    assert pw.prompt_embeddings(pipe, "a red circle", "") is None
    assert pw.prompt_embeddings(pipe, "a red circle", "blurry", clip_skip=1) is None
    got = ours(pipe, "a red circle", "blurry")
    cond, uncond = diffusers_embeds(pipe, "a red circle", "blurry")
    assert torch.equal(got["prompt_embeds"], cond) and torch.equal(got["negative_prompt_embeds"], uncond)


def test_weight_one_everywhere_equals_the_plain_prompt(pipe):
    got = pw.prompt_embeddings(pipe, "(a:1.0) (red:1) (circle:1.0)", "")
    assert got is not None  # the syntax is seen ...
    plain, _ = diffusers_embeds(pipe, "a red circle")
    assert torch.equal(got["prompt_embeds"], plain)  # ... and changes nothing


def test_emphasis_weights_the_token_and_keeps_the_mean(pipe):
    got = pw.prompt_embeddings(pipe, "a (red:1.5) circle", "")["prompt_embeds"]
    plain, _ = diffusers_embeds(pipe, "a red circle")
    mult = torch.ones(1, 77)
    mult[0, 2] = 1.5  # BOS, a, red
    weighted = plain * mult[..., None]
    expected = weighted * (plain.mean() / weighted.mean())
    assert torch.allclose(got, expected, atol=1e-5)
    assert got.mean().item() == pytest.approx(plain.mean().item(), rel=1e-5)
    assert (got - plain)[0, 2].abs().max() > 0.1


def test_long_prompt_is_two_chunks_encoded_separately(pipe):
    got = ours(pipe, LONG)
    assert got["prompt_embeds"].shape == (1, 154, 32)
    first, _ = diffusers_embeds(pipe, " ".join(WORDS[:75]))
    second, _ = diffusers_embeds(pipe, " ".join(WORDS[75:]))
    assert torch.equal(got["prompt_embeds"][:, :77], first)
    assert torch.equal(got["prompt_embeds"][:, 77:], second)
    empty, _ = diffusers_embeds(pipe, "")
    assert got["negative_prompt_embeds"].shape == (1, 154, 32)  # "" padded with the empty prompt's chunk
    assert torch.equal(got["negative_prompt_embeds"][:, :77], empty)
    assert torch.equal(got["negative_prompt_embeds"][:, 77:], empty)


def test_break_starts_a_new_chunk(pipe):
    got = ours(pipe, "a red circle BREAK a blue square")["prompt_embeds"]
    assert got.shape == (1, 154, 32)
    assert torch.equal(got[:, :77], diffusers_embeds(pipe, "a red circle")[0])
    assert torch.equal(got[:, 77:], diffusers_embeds(pipe, "a blue square")[0])


def test_long_negative_pads_the_positive(pipe):
    got = ours(pipe, "a red circle", f"blurry BREAK {LONG}")
    assert got["negative_prompt_embeds"].shape == (1, 231, 32)
    assert got["prompt_embeds"].shape == (1, 231, 32)
    empty, _ = diffusers_embeds(pipe, "")
    assert torch.equal(got["prompt_embeds"][:, :77], diffusers_embeds(pipe, "a red circle")[0])
    assert torch.equal(got["prompt_embeds"][:, 77:154], empty)
    assert torch.equal(got["prompt_embeds"][:, 154:], empty)
    assert torch.equal(got["negative_prompt_embeds"][:, :77], diffusers_embeds(pipe, "blurry")[0])


def test_clip_skip_2_is_the_penultimate_layer_through_the_final_norm(pipe):
    got = pw.prompt_embeddings(pipe, "a red circle", "blurry", clip_skip=2)
    assert got is not None
    te = pipe.text_encoder
    with torch.no_grad():
        for text, key in (("a red circle", "prompt_embeds"), ("blurry", "negative_prompt_embeds")):
            ids = pipe.tokenizer(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
            hidden = te(ids, output_hidden_states=True).hidden_states
            assert torch.allclose(got[key], pw.final_layer_norm(te)(hidden[-2]), atol=1e-6)
            assert not torch.allclose(got[key], te(ids)[0], atol=1e-3)
    with pytest.raises(ValueError, match="clip skip must be 1 to 5"):
        pw.prompt_embeddings(pipe, "a red circle", clip_skip=6)


def test_text_encoder_loras_apply_to_the_embeddings(pipe):
    modules = model_modules(pipe)
    paths = [p for p in modules if p.startswith("text_encoder.") and p.endswith(("q_proj", "v_proj"))]
    g = torch.Generator().manual_seed(0)
    layers = {
        p: LoraLayer(torch.randn(4, 32, generator=g) * 0.3, torch.randn(32, 4, generator=g) * 0.3)
        for p in paths
    }
    adapters = [(AdapterInfo("te"), LoraWeights(layers, None))]
    before = ours(pipe, "a (red:1.3) circle")["prompt_embeds"]
    with attach(pipe, adapters, make_policy("linear")):
        inside = ours(pipe, "a (red:1.3) circle")["prompt_embeds"]
        plain_ours = ours(pipe, "a red circle")["prompt_embeds"]
        plain_diffusers, _ = diffusers_embeds(pipe, "a red circle")
    assert torch.allclose(plain_ours, plain_diffusers, atol=1e-6)
    assert (inside - before).abs().max() > 1e-3
    assert torch.equal(ours(pipe, "a (red:1.3) circle")["prompt_embeds"], before)  # detached again


# ---- through the engine: images


def make_engine(pipe) -> Engine:
    store = ModelStore(torch.device("cpu"), torch.float32)
    store.put("tiny", pipe)
    return Engine(store, AdapterCache())


def image(engine: Engine, **kw) -> np.ndarray:
    recipe = MixRecipe(model="tiny", steps=STEPS, seed=3, **kw)
    return np.asarray(engine.generate(recipe).images[0], dtype=np.float32) / 255


def direct(pipe, prompt: str) -> np.ndarray:
    out = pipe(
        prompt=prompt,
        negative_prompt=None,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        width=64,
        height=64,
        generator=torch.Generator("cpu").manual_seed(3),
    )
    return np.asarray(out.images[0], dtype=np.float32) / 255


def test_engine_plain_prompt_is_bit_identical_to_the_pipeline(pipe):
    assert np.array_equal(image(make_engine(pipe), prompt="a red circle"), direct(pipe, "a red circle"))


def test_engine_second_chunk_changes_the_image(pipe):
    engine = make_engine(pipe)
    # diffusers alone truncates at 77 tokens: both prompts give the same picture
    assert np.array_equal(direct(pipe, LONG), direct(pipe, LONG_OTHER_TAIL))
    seen: list[tuple[int, ...]] = []  # what the UNet (and the gate fusion's pre-hook) is given
    hook = pipe.unet.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(tuple(kw["encoder_hidden_states"].shape)), with_kwargs=True
    )
    try:
        a = image(engine, prompt=LONG)
    finally:
        hook.remove()
    assert seen == [(2, 154, 32)] * STEPS
    b = image(engine, prompt=LONG_OTHER_TAIL)
    assert np.abs(a - b).mean() > 1e-3
    assert np.abs(a - direct(pipe, LONG)).mean() > 1e-3


def test_engine_emphasis_and_clip_skip_change_the_image(pipe):
    engine = make_engine(pipe)
    plain = image(engine, prompt="a red circle")
    assert np.array_equal(image(engine, prompt="a (red:1) circle"), plain)
    assert np.abs(image(engine, prompt="a (red circle:1.6)") - plain).mean() > 2e-4
    assert np.abs(image(engine, prompt="a red circle", clip_skip=2) - plain).mean() > 1e-3
    assert np.array_equal(image(engine, prompt="a red circle", clip_skip=1), plain)


# ---- SDXL: two text encoders, pooled output


@pytest.fixture(scope="module")
def xl() -> StableDiffusionXLPipeline:
    """A tiny SDXL pipeline (diffusers' own test configuration) with the offline CLIP tokenizers; the
    second pads with "!" as SDXL's OpenCLIP tokenizer does."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 × 8 + 32
        cross_attention_dim=64,
        norm_num_groups=1,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        sample_size=64,
    )
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=5,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
        projection_dim=32,
    )
    tokenizer_2 = clip_tokenizer()
    tokenizer_2.pad_token = "!"
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(config),
        text_encoder_2=CLIPTextModelWithProjection(config),
        tokenizer=clip_tokenizer(),
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=build_scheduler(),
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def xl_diffusers(xl, prompt: str, negative: str | None) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return xl.encode_prompt(prompt, device=torch.device("cpu"), negative_prompt=negative)


def test_sdxl_plain_prompt_equals_diffusers(xl):
    assert xl.tokenizer_2.pad_token_id == 0
    assert pw.prompt_embeddings(xl, "a red circle", "blurry") is None
    got = ours(xl, "a red circle", "blurry")
    cond, uncond, pooled, neg_pooled = xl_diffusers(xl, "a red circle", "blurry")
    assert got["prompt_embeds"].shape == (1, 77, 64)
    assert torch.equal(got["prompt_embeds"], cond) and torch.equal(got["negative_prompt_embeds"], uncond)
    assert torch.equal(got["pooled_prompt_embeds"], pooled)
    assert torch.equal(got["negative_pooled_prompt_embeds"], neg_pooled)
    zero = ours(xl, "a red circle", "")  # an empty negative is zeros (sgm force_zero_embeddings)
    assert not zero["negative_prompt_embeds"].any() and not zero["negative_pooled_prompt_embeds"].any()


def test_sdxl_long_prompt_pools_the_first_chunk_and_runs(xl):
    got = pw.prompt_embeddings(xl, LONG, "blurry", clip_skip=2)  # SDXL ignores clip skip, as A1111
    assert got is not None and got["prompt_embeds"].shape == (1, 154, 64)
    first, _, pooled, _ = xl_diffusers(xl, " ".join(WORDS[:75]), "blurry")
    assert torch.equal(got["prompt_embeds"][:, :77], first)
    assert torch.equal(got["pooled_prompt_embeds"], pooled)
    empty = ours(xl, "", "blurry")["prompt_embeds"]
    assert torch.equal(got["negative_prompt_embeds"][:, 77:], empty)
    assert pw.prompt_embeddings(xl, "a red circle", "", clip_skip=2) is None
    out = xl(
        **got,
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


# ---- the recipe, its JSON, A1111 parameters, the CLI and the Create request

OLD_JSON = (  # what the version before clip skip wrote for old_recipe()
    '{"adapters": [{"name": "x", "ref": "x.safetensors", "sha256": '
    '"abababababababababababababababababababababababababababababababab", "te": 1.0, '
    '"unet": 1.0, "weight": 0.8}], "batch_size": 1, "fusion": "linear", "fusion_args": {}, '
    '"guidance": 7.5, "height": null, "model": "pocket", "negative_prompt": "blurry", '
    '"prompt": "a (red:1.2) circle", "sampler": null, "seed": 7, "steps": 20, "version": 1, "width": null}'
)


def old_recipe() -> MixRecipe:
    return MixRecipe(
        prompt="a (red:1.2) circle",
        negative_prompt="blurry",
        adapters=(AdapterSpec("x.safetensors", "x", 0.8, sha256="ab" * 32),),
        seed=7,
        steps=20,
    )


def test_recipe_json_without_clip_skip_is_unchanged():
    assert old_recipe().to_json() == OLD_JSON  # written by the version before clip skip
    assert MixRecipe.from_json(OLD_JSON).clip_skip is None
    skipped = old_recipe().with_(clip_skip=2)
    assert json.loads(skipped.to_json())["clip_skip"] == 2
    assert MixRecipe.from_json(skipped.to_json()) == skipped


@pytest.mark.parametrize("bad", [0, 13, -1, 1.5, True, "2"])
def test_recipe_refuses_bad_clip_skip(bad):
    with pytest.raises(ValueError, match="clip skip"):
        MixRecipe(prompt="x", clip_skip=bad)


def test_clip_skip_round_trips_through_a1111_parameters():
    text = a1111_parameters(old_recipe().with_(clip_skip=2), {}, "DDIM", 64, 64)
    assert ", Clip skip: 2, " in text
    params = parse_a1111_parameters(text)
    assert params["Clip skip"] == "2" and infotext_clip_skip(params) == 2
    assert params["prompt"] == "a (red:1.2) circle <lora:x:0.8>"
    for skip in (None, 1):  # A1111 writes no field for the last layer
        plain = a1111_parameters(old_recipe().with_(clip_skip=skip), {}, "DDIM", 64, 64)
        assert "Clip skip" not in plain and infotext_clip_skip(parse_a1111_parameters(plain)) is None
    a1111 = "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Clip skip: 2"
    assert infotext_clip_skip(parse_a1111_parameters(a1111)) == 2
    with pytest.raises(ValueError, match="Clip skip"):
        infotext_clip_skip({"Clip skip": "two"})


def test_cli_clip_skip():
    def recipe(*argv: str) -> MixRecipe:
        args = build_parser().parse_args(["generate", "--out", "x.png", "--prompt", "(a cat:1.2)", *argv])
        return gen_cmd.recipe_from_args(args)

    assert recipe().clip_skip is None
    assert recipe("--clip-skip", "2").clip_skip == 2
    with pytest.raises(ValueError, match="clip skip"):
        recipe("--clip-skip", "0")


def test_generate_request_carries_clip_skip():
    services = SimpleNamespace(config=SimpleNamespace(model="tiny"), catalog=None)
    req = gen_handler.GenerateRequest("a (red:1.2) circle", seed=1, clip_skip=2)
    recipe, _ = gen_handler.build_recipe(services, SessionState(), req)
    assert recipe.clip_skip == 2 and recipe.prompt == "a (red:1.2) circle"
    assert gen_handler.request_from_recipe(recipe).clip_skip == 2
    assert (
        gen_handler.build_recipe(services, SessionState(), gen_handler.GenerateRequest("x"))[0].clip_skip
        is None
    )
    with pytest.raises(ValueError, match="clip skip"):
        gen_handler.GenerateRequest("x", clip_skip=13)
