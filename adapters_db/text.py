"""Text normalisation shared by indexing and querying: prompt cleaning, tokens, n-grams, trigger phrases.

One tokenizer for every lexical channel so that an index and its queries always agree: lower case,
Unicode word characters (underscores and punctuation split words), pure numbers dropped (prompt
weights such as ``(x:1.2)``), runs of CJK characters split into overlapping character bigrams.
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from collections.abc import Iterable

# A1111 extra-network tags: <lora:name:0.8>, <lyco:…>, <hypernet:…>
EXTRA_NETWORK = re.compile(r"<\s*(?:lora|lyco|lycoris|locon|hypernet|embedding)\s*:[^>]*>", re.IGNORECASE)
_WORD = re.compile(r"[^\W_]+")
_SEGMENT = re.compile(r"[,\n()\[\]{}|:;.!?<>\"]+")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")


def clean_prompt(prompt: str) -> str:
    """A prompt without its ``<lora:…>``-style extra-network tags and escaped parentheses."""
    text = EXTRA_NETWORK.sub(" ", prompt or "")
    return text.replace("\\(", "(").replace("\\)", ")")


def split_cjk(token: str) -> list[str]:
    """A token, or the CJK runs inside it as overlapping character bigrams (a lone character stays)."""
    if not has_cjk(token):
        return [token]
    out: list[str] = []
    for part in re.split(f"({_CJK.pattern}+)", token):
        if not part:
            continue
        if _CJK.match(part):
            out.extend([part] if len(part) == 1 else [part[i : i + 2] for i in range(len(part) - 1)])
        else:
            out.append(part)
    return out


def has_cjk(text: str) -> bool:
    """Whether a text holds CJK characters (whose words are written without spaces)."""
    return _CJK.search(text) is not None


def words(text: str) -> list[str]:
    """Lower-case word tokens (no pure numbers; CJK runs as character bigrams)."""
    norm = unicodedata.normalize("NFKC", text).lower()
    out: list[str] = []
    for tok in _WORD.findall(norm):
        if tok.isdigit():
            continue
        out.extend(split_cjk(tok))
    return out


def segments(text: str) -> list[list[str]]:
    """Word lists of the comma/bracket-separated segments of a prompt (tags of a tag list)."""
    return [w for w in (words(seg) for seg in _SEGMENT.split(clean_prompt(text))) if w]


def terms(text: str) -> list[str]:
    """Index terms: words plus word bigrams inside each prompt segment (``"long hair"``)."""
    out: list[str] = []
    for seg in segments(text):
        out.extend(seg)
        out.extend(f"{a} {b}" for a, b in itertools.pairwise(seg))
    return out


def trigger_phrases(trigger_words: Iterable[str], max_words: int = 6) -> set[tuple[str, ...]]:
    """Trigger words as token tuples: entries split on commas, extra-network tags dropped, ≤ max_words."""
    out: set[tuple[str, ...]] = set()
    for entry in trigger_words:
        for part in re.split(r"[,\n]+", clean_prompt(entry or "")):
            toks = tuple(words(part))
            if toks and len(toks) <= max_words:
                out.add(toks)
    return out


def remove_phrases(prompt: str, phrases: Iterable[str]) -> str:
    """Remove each phrase (case-insensitive, whole words, longest first) from a prompt."""
    out = prompt
    for phrase in sorted({p.strip() for p in phrases if p and p.strip()}, key=len, reverse=True):
        out = re.sub(r"(?<!\w)" + re.escape(phrase) + r"(?!\w)", "", out, flags=re.IGNORECASE)
    return out
