"""A1111 prompts for diffusers: emphasis ``(word:1.2)``, ``BREAK``, prompts past 75 tokens, clip skip.

A prompt is parsed as AUTOMATIC1111 parses it (``modules/prompt_parser.py``), cut into chunks of 75
tokens that are wrapped in BOS/EOS, encoded one by one and concatenated along the sequence axis
(``modules/sd_hijack_clip.py``); each token's embedding is multiplied by its weight and the chunk is
rescaled to its original mean (``modules/sd_emphasis.py``, "Original"). SDXL concatenates both text
encoders' hidden states and takes the pooled output of the second encoder's first chunk
(``modules/sd_models_xl.py`` over sgm's ``GeneralConditioner``). Positive and negative are padded to
the same number of chunks with the empty prompt's encoding (``modules/sd_samplers_cfg_denoiser.py``,
``pad_cond_uncond``), since a diffusers pipeline runs both through one batched UNet call.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# A1111 modules/prompt_parser.py re_attention (v1.6+: spaces allowed around the weight) and re_break
RE_ATTENTION = re.compile(
    r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""",
    re.X,
)
RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
CHUNK_LENGTH = 75  # A1111's tokens per chunk (77 with BOS and EOS)
COMMA_BACKTRACK = 20  # A1111's default "Prompt word wrap length limit" (opts.comma_padding_backtrack)
BREAK_WEIGHT = -1.0  # marks a BREAK in the parsed list, as A1111 does
EMPHASIS_EPS = 1e-6  # |mean| / mean |z| below which the mean is noise


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """(text, weight) runs of an A1111 prompt (A1111 ``modules/prompt_parser.py`` parse_prompt_attention).

    ``(a)`` ×1.1, ``[a]`` ÷1.1, ``(a:w)`` ×w, ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` literal; brackets left
    open apply to the end; ``BREAK`` is ``("BREAK", -1)``; runs of equal weight are merged."""
    res: list[list[Any]] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= multiplier

    for m in RE_ATTENTION.finditer(text):
        part, weight = m.group(0), m.group(1)
        if part.startswith("\\"):
            res.append([part[1:], 1.0])
        elif part == "(":
            round_brackets.append(len(res))
        elif part == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            try:
                multiply_range(round_brackets.pop(), float(weight))
            except ValueError:
                raise ValueError(f"bad emphasis weight {weight!r} in {part!r}") from None
        elif part == ")" and round_brackets:
            multiply_range(round_brackets.pop(), ROUND_MULTIPLIER)
        elif part == "]" and square_brackets:
            multiply_range(square_brackets.pop(), SQUARE_MULTIPLIER)
        else:
            for i, piece in enumerate(RE_BREAK.split(part)):
                if i > 0:
                    res.append(["BREAK", BREAK_WEIGHT])
                res.append([piece, 1.0])
    for pos in round_brackets:
        multiply_range(pos, ROUND_MULTIPLIER)
    for pos in square_brackets:
        multiply_range(pos, SQUARE_MULTIPLIER)
    if not res:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return [(str(t), float(w)) for t, w in res]


def uses_prompt_syntax(text: str) -> bool:
    """True when A1111 would read ``text`` differently from plain words (emphasis, escapes, BREAK)."""
    return parse_prompt_attention(text) != [(text, 1.0)]


@dataclass(frozen=True)
class PromptChunk:
    """One encoder window: BOS, 75 tokens (EOS-padded), EOS, and a weight per token (A1111 PromptChunk)."""

    tokens: tuple[int, ...]
    multipliers: tuple[float, ...]


def tokenize_line(
    parsed: Sequence[tuple[str, float]],
    tokenize: Callable[[list[str]], list[list[int]]],
    *,
    id_start: int,
    id_end: int,
    comma_token: int | None,
    chunk_length: int = CHUNK_LENGTH,
    comma_backtrack: int = COMMA_BACKTRACK,
) -> list[PromptChunk]:
    """Chunks of a parsed prompt (A1111 ``modules/sd_hijack_clip.py`` tokenize_line, without embeddings).

    A ``BREAK`` closes the chunk; a full chunk whose last comma is at most ``comma_backtrack`` tokens back
    moves the words after that comma to the next chunk."""
    chunks: list[PromptChunk] = []
    tokens: list[int] = []
    mults: list[float] = []
    last_comma = -1

    def next_chunk() -> None:
        nonlocal tokens, mults, last_comma
        pad = chunk_length - len(tokens)
        body, weights = tokens + [id_end] * max(pad, 0), mults + [1.0] * max(pad, 0)
        chunks.append(PromptChunk((id_start, *body, id_end), (1.0, *weights, 1.0)))
        tokens, mults, last_comma = [], [], -1

    for ids, (text, weight) in zip(tokenize([t for t, _ in parsed]), parsed, strict=True):
        if text == "BREAK" and weight == BREAK_WEIGHT:
            next_chunk()
            continue
        for token in ids:
            if token == comma_token:
                last_comma = len(tokens)
            elif (
                comma_backtrack != 0
                and len(tokens) == chunk_length
                and last_comma != -1
                and len(tokens) - last_comma <= comma_backtrack
            ):
                cut = last_comma + 1
                moved, moved_mults = tokens[cut:], mults[cut:]
                tokens, mults = tokens[:cut], mults[:cut]
                next_chunk()
                tokens, mults = moved, moved_mults
            if len(tokens) == chunk_length:
                next_chunk()
            tokens.append(token)
            mults.append(weight)
    if tokens or not chunks:
        next_chunk()
    return chunks


def chunk_ids(chunk: PromptChunk, id_end: int, id_pad: int) -> list[int]:
    """A chunk's token ids with every position after its first EOS set to the pad token
    (A1111 ``process_tokens``: SD2/SDXL's OpenCLIP pads with ``!``, CLIP-L with EOS)."""
    ids = list(chunk.tokens)
    if id_pad != id_end:
        first = ids.index(id_end)
        ids[first + 1 :] = [id_pad] * (len(ids) - first - 1)
    return ids


def apply_emphasis(z: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
    """z × each token's weight, rescaled to z's original mean (A1111 ``modules/sd_emphasis.py`` Original).

    Where the weighted mean is ~0 next to the values (a text encoder with an untrained final LayerNorm
    gives tokens of zero mean) the rescale would divide noise by noise; it is skipped there."""
    zf = z.float()
    original_mean = zf.mean()
    weighted = zf * multipliers.to(zf).reshape(*multipliers.shape, 1).expand(zf.shape)
    new_mean = weighted.mean()
    if new_mean.abs() <= EMPHASIS_EPS * weighted.abs().mean():
        return weighted.to(z.dtype)
    return (weighted * (original_mean / new_mean)).to(z.dtype)


def select_hidden(
    hidden_states: Sequence[torch.Tensor], last: torch.Tensor, clip_skip: int | None, final_norm: Any
) -> torch.Tensor:
    """CLIP output at A1111's clip skip (1 = last layer): ``hidden_states[-n]`` through the final layer norm
    (A1111 ``modules/sd_hijack_clip.py`` FrozenCLIPEmbedderWithCustomWords.encode_with_transformers)."""
    if clip_skip is None or clip_skip <= 1:
        return last
    return final_norm(hidden_states[-clip_skip])


def final_layer_norm(model: Any) -> Any:
    """A CLIP text model's final LayerNorm (transformers 5 keeps it on the model, 4 on ``text_model``)."""
    return getattr(model, "text_model", model).final_layer_norm


def pad_cond_uncond(
    cond: torch.Tensor, uncond: torch.Tensor, empty: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad the shorter of cond/uncond with the empty prompt's chunk encoding until both have as many
    chunks (A1111 ``modules/sd_samplers_cfg_denoiser.py`` CFGDenoiser.pad_cond_uncond / pad_cond)."""
    repeats = (cond.shape[1] - uncond.shape[1]) // empty.shape[1]
    if repeats < 0:
        cond = torch.cat([cond, empty.to(cond).repeat(cond.shape[0], -repeats, 1)], dim=1)
    elif repeats > 0:
        uncond = torch.cat([uncond, empty.to(uncond).repeat(uncond.shape[0], repeats, 1)], dim=1)
    return cond, uncond


# ---- the text encoders of a diffusers pipeline


@dataclass(frozen=True)
class TextEncoder:
    """One tokenizer + CLIP text model of a pipeline and which of its outputs the UNet reads."""

    tokenizer: Any
    model: Any
    hidden: int | None  # None: last_hidden_state (A1111 clip skip applies); -2: SDXL's penultimate layer
    clip_skip: int | None = None

    @property
    def window(self) -> int:
        """Tokens per encoder call: the tokenizer's model_max_length, capped by the position table
        (a transformers tokenizer built without it reports 1e30)."""
        positions = getattr(self.model.config, "max_position_embeddings", None) or CHUNK_LENGTH + 2
        return int(min(self.tokenizer.model_max_length, positions))

    @property
    def chunk_length(self) -> int:
        """Prompt tokens per chunk (A1111's 75 for CLIP's 77-token window)."""
        return self.window - 2

    def ids(self) -> tuple[int, int, int, int | None]:
        """(BOS, EOS, pad, comma) token ids."""
        tok = self.tokenizer
        comma = tok.convert_tokens_to_ids(",</w>")
        comma = None if comma is None or comma == tok.unk_token_id else int(comma)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return int(tok.bos_token_id), int(tok.eos_token_id), int(pad), comma

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, untruncated, without BOS/EOS (A1111 ``tokenize``)."""
        out = self.tokenizer(texts, truncation=False, add_special_tokens=False, verbose=False)
        return [list(ids) for ids in out["input_ids"]]

    def count_tokens(self, text: str) -> int:
        """Prompt tokens of a plain text, without BOS/EOS."""
        return len(self.tokenize([text])[0])

    def chunks(self, text: str) -> list[PromptChunk]:
        """The prompt's chunks for this encoder."""
        bos, eos, _, comma = self.ids()
        return tokenize_line(
            parse_prompt_attention(text),
            self.tokenize,
            id_start=bos,
            id_end=eos,
            comma_token=comma,
            chunk_length=self.chunk_length,
        )

    def encode(self, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(all chunks' hidden states concatenated: 1 × 77·n × C, the first chunk's pooled output or None)."""
        _, eos, pad, _ = self.ids()
        device = next(self.model.parameters()).device
        use_mask = bool(getattr(self.model.config, "use_attention_mask", False))
        zs, pooled = [], None
        for chunk in self.chunks(text):
            ids = torch.tensor([chunk_ids(chunk, eos, pad)], device=device)
            mask = None
            if use_mask:  # as the tokenizer's mask: BOS … first EOS
                mask = (torch.arange(ids.shape[1], device=device) <= chunk.tokens.index(eos)).long()[None]
            wants_hidden = self.hidden is not None or (self.clip_skip or 1) > 1
            out = self.model(ids, attention_mask=mask, output_hidden_states=wants_hidden)
            if self.hidden is not None:
                z = out.hidden_states[self.hidden]
            else:
                z = select_hidden(
                    out.hidden_states if wants_hidden else (),
                    out[0],
                    self.clip_skip,
                    final_layer_norm(self.model),
                )
            if pooled is None and out[0].ndim == 2:
                pooled = out[0]
            zs.append(apply_emphasis(z, torch.tensor([chunk.multipliers])))
        return torch.cat(zs, dim=1), pooled


def pipeline_encoders(
    pipe: Any, clip_skip: int | None = None, family: str | None = None
) -> list[TextEncoder]:
    """The text encoders of an SD 1.x/2.x/pocket or SDXL pipeline, as A1111 reads them.

    SD 1.x and pocket: the last layer, or A1111's clip skip. SD 2.x (diffusers' converted text encoder
    already ends at OpenCLIP's penultimate layer) and SDXL (penultimate layer of both encoders, no final
    norm) ignore clip skip, as A1111 does without its ``sdxl_clip_l_skip`` option. ``[]`` for a pipeline
    without tokenizer and text encoder."""
    pairs = [
        (getattr(pipe, t, None), getattr(pipe, m, None))
        for t, m in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
    ]
    pairs = [(t, m) for t, m in pairs if t is not None and m is not None]
    if not pairs:
        return []
    if getattr(pipe, "text_encoder_2", None) is not None:
        return [TextEncoder(t, m, hidden=-2) for t, m in pairs]
    skip = None if family == "sd2" else clip_skip
    layers = int(pairs[0][1].config.num_hidden_layers)
    if skip is not None and not 1 <= skip <= layers:
        raise ValueError(f"clip skip must be 1 to {layers} for this {layers}-layer text encoder, got {skip}")
    return [TextEncoder(t, m, hidden=None, clip_skip=skip) for t, m in pairs]


def needs_embeddings(encoders: Sequence[TextEncoder], *texts: str) -> bool:
    """True when the pipeline's own prompt strings would differ from A1111: emphasis/escapes/BREAK, more
    than one chunk of tokens, or a clip skip (diffusers' ``clip_skip`` skips no layer of the negative)."""
    if any((e.clip_skip or 1) > 1 for e in encoders):
        return True
    first = encoders[0]
    return any(uses_prompt_syntax(t) or first.count_tokens(t) > first.chunk_length for t in texts)


def encode_prompt(
    encoders: Sequence[TextEncoder], text: str, *, zero: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states of every encoder concatenated along the channel axis, pooled output of the last
    encoder that has one); ``zero``: zeros of one chunk (SDXL's empty negative: sgm
    ``force_zero_embeddings``)."""
    parts = [e.encode(text) for e in encoders]
    lengths = {z.shape[1] for z, _ in parts}
    if len(lengths) != 1:
        raise ValueError(f"the text encoders cut the prompt into different chunk counts: {sorted(lengths)}")
    z = torch.cat([p[0].to(parts[0][0].device) for p in parts], dim=-1)
    pooled = next((p for _, p in reversed(parts) if p is not None), None)
    if zero:
        z = torch.zeros_like(z[:, : encoders[0].window])
        pooled = None if pooled is None else torch.zeros_like(pooled)
    return z, pooled


def prompt_embeddings(
    pipe: Any,
    prompt: str,
    negative_prompt: str = "",
    *,
    clip_skip: int | None = None,
    family: str | None = None,
    force: bool = False,
) -> dict[str, torch.Tensor] | None:
    """Pipeline keyword arguments (``prompt_embeds``, ``negative_prompt_embeds`` and, for SDXL, the pooled
    pair) that encode the prompts as A1111 does, or None when the prompt strings give the same result
    (plain words within one chunk, no clip skip): the pipeline then encodes them itself, as before.
    Call it where the text-encoder LoRAs are attached."""
    encoders = pipeline_encoders(pipe, clip_skip, family)
    if not encoders:
        if force:
            raise ValueError("the pipeline has no tokenizer and text encoder to encode the prompt with")
        return None
    if not force and not needs_embeddings(encoders, prompt, negative_prompt):
        return None
    with torch.no_grad():
        cond, pooled = encode_prompt(encoders, prompt)
        config = getattr(pipe, "config", None)
        zero = not negative_prompt and bool(getattr(config, "force_zeros_for_empty_prompt", False))
        uncond, neg_pooled = encode_prompt(encoders, negative_prompt, zero=zero)
        if cond.shape[1] != uncond.shape[1]:
            empty, _ = encode_prompt(encoders, "")
            cond, uncond = pad_cond_uncond(cond, uncond, empty)
    out = {"prompt_embeds": cond, "negative_prompt_embeds": uncond}
    if getattr(pipe, "text_encoder_2", None) is not None:
        if pooled is None or neg_pooled is None:
            raise ValueError("the SDXL pipeline's second text encoder gives no pooled output")
        out |= {"pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": neg_pooled}
    return out
