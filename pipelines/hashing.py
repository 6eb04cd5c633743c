"""Content hashes of model files as Civitai and A1111 show them."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a whole file (Civitai's ``SHA256``)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def autov2(sha256: str) -> str:
    """Civitai's AutoV2: the first 10 hex chars of the file's SHA-256, upper case."""
    return sha256[:10].upper()


def addnet_hash(path: str | Path) -> str:
    """SHA-256 of a safetensors file's tensor data, skipping the header (A1111 / kohya "AutoV3")."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        header = fh.read(8)
        if len(header) < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", header)
        fh.seek(8 + n)
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def short_hash(sha256: str) -> str:
    """The 12-char short hash A1111 writes in ``Lora hashes``."""
    return sha256[:12]
