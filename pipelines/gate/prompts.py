"""Prompts that ask for a LoRA's concept, for gate training: the pocket world's captions for its
concept LoRAs, else the LoRA's own prompts (catalog sample prompts, training captions, trigger words)."""

from __future__ import annotations

from collections.abc import Sequence

POCKET_PREFIX = "pocket-"


def pocket_concept(name: str) -> str | None:
    """The pocket concept a LoRA name or file stem stands for (``pocket-star`` → ``star``), or None."""
    from pipelines.pocket.concepts import CONCEPTS

    key = name.strip().lower()
    key = key[len(POCKET_PREFIX) :] if key.startswith(POCKET_PREFIX) else key
    return key if key in CONCEPTS else None


def concept_prompts(trigger: str, n: int = 64, seed: int = 0) -> tuple[str, ...]:
    """Distinct captions of fresh pocket scenes showing a concept, e.g. "a big red star on a white
    background" or "a striped blue circle on a black background"."""
    from pipelines.pocket.concepts import concept_scenes

    scenes = concept_scenes(trigger, n, seed)
    return tuple(dict.fromkeys(s.caption(with_size=i % 2 == 0) for i, s in enumerate(scenes)))


def lora_prompts(
    name: str, trigger_words: Sequence[str] = (), catalog_prompts: Sequence[str] = (), n: int = 64
) -> tuple[str, ...]:
    """Prompts for a LoRA: pocket captions for a pocket concept, else its catalog prompts, else
    its trigger words; empty when nothing is known."""
    concept = pocket_concept(name)
    if concept is not None:
        return concept_prompts(concept, n)
    prompts = [p.strip() for p in catalog_prompts if p and p.strip()]
    if prompts:
        return tuple(dict.fromkeys(prompts))[:n]
    words = [w.strip() for w in trigger_words if w and w.strip()]
    return (", ".join(words),) if words else ()


def read_prompt_file(text: str) -> tuple[str, ...]:
    """One prompt per non-empty line (``#`` starts a comment line)."""
    lines = (line.strip() for line in text.splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))
