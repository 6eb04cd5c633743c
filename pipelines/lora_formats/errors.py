"""The errors of LoRA file handling: one class per thing that can be wrong, all ValueErrors."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


class LoraFormatError(ValueError):
    """Base of every LoRA file error; the message names the file and what is wrong with it."""


class PickledFileError(LoraFormatError):
    """A pickled checkpoint (.ckpt/.pt/.pth/.bin or pickle/zip magic bytes): refused, never unpickled."""


class NotSafetensorsError(LoraFormatError):
    """Empty, truncated, garbage or otherwise malformed safetensors file."""


class NonFiniteWeightsError(LoraFormatError):
    """A tensor holds NaN or ±Inf."""


class UnknownFormatError(LoraFormatError):
    """Tensor names that follow no known LoRA naming, or parts of a module that do not fit together."""


class FamilyMismatchError(LoraFormatError):
    """The LoRA was made for another base model family than the loaded one."""


class UnmatchedKeysError(LoraFormatError):
    """The LoRA adapts modules the target model does not have."""


class ShapeMismatchError(LoraFormatError):
    """A LoRA update's shape differs from the weight it would be added to."""


def in_file(error: LoraFormatError, path: Path | str) -> LoraFormatError:
    """The same error class with the file named in front of its message (unless it already is)."""
    message = str(error)
    if message.startswith(str(path)):
        return error
    return type(error)(f"{path}: {message}")


def some(items: Iterable[str], limit: int = 5) -> str:
    """``'a', 'b', 'c' and 4 more`` — a short, quoted listing for error messages."""
    items = list(items)
    shown = ", ".join(repr(item) for item in items[:limit])
    return shown if len(items) <= limit else f"{shown} and {len(items) - limit} more"
