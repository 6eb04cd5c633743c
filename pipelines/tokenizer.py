"""The real CLIP BPE tokenizer, built offline from the vocabulary file open_clip ships."""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

N_MERGES = 49152 - 256 - 2  # open_clip/tokenizer.py: merges[1 : 49152 - 256 - 2 + 1]
MAX_LENGTH = 77


def _bpe_file() -> Path:
    import open_clip

    return Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"


def _bytes_to_unicode() -> list[str]:
    """Byte → printable unicode table (openai/CLIP simple_tokenizer.bytes_to_unicode)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


@lru_cache(maxsize=1)
def vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP's 49,408-token vocabulary and its BPE merges (openai/CLIP SimpleTokenizer)."""
    with gzip.open(_bpe_file(), "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    merges = lines[1 : N_MERGES + 1]
    base = _bytes_to_unicode()
    tokens = base + [t + "</w>" for t in base]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer() -> CLIPTokenizer:
    """A transformers CLIPTokenizer identical to open_clip's, with no network access."""
    import tempfile

    vocab, merges = vocab_and_merges()
    with tempfile.TemporaryDirectory() as tmp:
        vocab_path = Path(tmp) / "vocab.json"
        merges_path = Path(tmp) / "merges.txt"
        vocab_path.write_text(json.dumps(vocab), encoding="utf-8")
        merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        tok = CLIPTokenizer(vocab=str(vocab_path), merges=str(merges_path), model_max_length=MAX_LENGTH)
    return tok
