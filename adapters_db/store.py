"""Content-addressed file store: adapter files and preview images keyed by SHA-256, written atomically.

Layout under ``root``: ``lora/ab/<sha256>.safetensors``, ``images/ab/<sha256>.<ext>`` and ``tmp/`` for
writes in progress. A write goes to a temp file in ``tmp/`` (same file system), is fsynced and
verified, then ``os.replace``-d into place, so a reader never sees a half-written file. A file whose
catalog row was never committed (a crash between write and commit) is invisible to the catalog and
removed by :meth:`FileStore.collect_garbage`; a re-import of the same bytes reuses it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 20
KINDS: dict[str, str] = {"lora": ".safetensors", "images": ""}


class HashMismatchError(ValueError):
    """The bytes do not have the SHA-256 they were announced with."""


@dataclass(frozen=True)
class StoredFile:
    """Where a blob landed: its hashes, size, path and whether identical bytes were already there."""

    sha256: str
    size_bytes: int
    path: Path
    existed: bool

    @property
    def autov2(self) -> str:
        """Civitai's AutoV2 hash: the first 10 hex digits of the SHA-256 (upper case, as Civitai shows)."""
        return autov2(self.sha256)


def autov2(sha256: str) -> str:
    """AutoV2 hash as Civitai displays it: first 10 hex characters of the SHA-256, upper case."""
    return sha256[:10].upper()


def sha256_file(path: Path) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


_BLOB_NAME = re.compile(r"[0-9a-f]{64}")  # a blob's file name before its extension


def _normalise_sha(sha256: str) -> str:
    sha = sha256.strip().lower()
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ValueError(f"not a SHA-256 hex digest: {sha256!r}")
    return sha


class FileStore:
    """Content-addressed blobs on disk (see module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"

    def path_for(self, sha256: str, kind: str = "lora", ext: str | None = None) -> Path:
        """Final path of a blob; ``ext`` overrides the kind's extension (images keep theirs)."""
        sha = _normalise_sha(sha256)
        suffix = KINDS[kind] if ext is None else ext
        return self.root / kind / sha[:2] / f"{sha}{suffix}"

    def has(self, sha256: str, kind: str = "lora", ext: str | None = None) -> bool:
        """Whether the blob exists in the store."""
        return self.path_for(sha256, kind, ext).is_file()

    def put_file(
        self, src: Path, *, kind: str = "lora", ext: str | None = None, expected_sha256: str | None = None
    ) -> StoredFile:
        """Copy ``src`` into the store atomically (hash while copying; verify ``expected_sha256``)."""
        with open(src, "rb") as fh:
            return self.put_stream(fh, kind=kind, ext=ext, expected_sha256=expected_sha256)

    def put_bytes(
        self, data: bytes, *, kind: str = "lora", ext: str | None = None, expected_sha256: str | None = None
    ) -> StoredFile:
        """Store an in-memory blob atomically."""
        import io

        return self.put_stream(io.BytesIO(data), kind=kind, ext=ext, expected_sha256=expected_sha256)

    def put_stream(
        self, fh: BinaryIO, *, kind: str = "lora", ext: str | None = None, expected_sha256: str | None = None
    ) -> StoredFile:
        """Write a stream to a temp file, fsync, verify, then rename into its content address."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(prefix="put-", suffix=".part", dir=self.tmp_dir)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in iter(lambda: fh.read(CHUNK), b""):
                    h.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            return self.adopt(tmp, h.hexdigest(), size, kind=kind, ext=ext, expected_sha256=expected_sha256)
        finally:
            tmp.unlink(missing_ok=True)

    def adopt(
        self,
        tmp: Path,
        sha256: str,
        size: int,
        *,
        kind: str = "lora",
        ext: str | None = None,
        expected_sha256: str | None = None,
    ) -> StoredFile:
        """Move an already hashed, fsynced temp file (in ``tmp_dir``) to its content address."""
        if expected_sha256 is not None and _normalise_sha(expected_sha256) != sha256:
            raise HashMismatchError(
                f"SHA-256 mismatch: expected {expected_sha256.lower()}, got {sha256} ({size} bytes)"
            )
        dest = self.path_for(sha256, kind, ext)
        if dest.is_file() and dest.stat().st_size == size:
            return StoredFile(sha256, size, dest, existed=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
        return StoredFile(sha256, size, dest, existed=False)

    def remove(self, sha256: str, kind: str = "lora", ext: str | None = None) -> bool:
        """Delete a blob; ``False`` if it was not there."""
        path = self.path_for(sha256, kind, ext)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True

    def iter_blobs(self, kind: str = "lora") -> Iterator[tuple[str, Path]]:
        """Every blob of one kind as ``(sha256, path)``: files named by a SHA-256 in the folder of its first
        two hex digits, as :meth:`path_for` writes them (anything else there is not the store's)."""
        base = self.root / kind
        if not base.is_dir():
            return
        for path in base.glob("*/*"):
            sha = path.name.split(".", 1)[0]
            if _BLOB_NAME.fullmatch(sha) and path.parent.name == sha[:2] and path.is_file():
                yield sha, path

    def collect_garbage(
        self, referenced: Iterable[str], *, kind: str = "lora", grace_s: float = 3600.0
    ) -> list[Path]:
        """Remove blobs no catalog row references and stale temp files older than ``grace_s`` seconds.

        The grace period protects an import in another process that wrote its file and has not
        committed yet.
        """
        keep = {s.lower() for s in referenced}
        cutoff = time.time() - grace_s
        removed: list[Path] = []
        for sha, path in list(self.iter_blobs(kind)):
            if sha not in keep and path.stat().st_mtime <= cutoff:
                path.unlink(missing_ok=True)
                removed.append(path)
        if self.tmp_dir.is_dir():
            for path in self.tmp_dir.iterdir():
                if path.is_file() and path.stat().st_mtime <= cutoff:
                    path.unlink(missing_ok=True)
                    removed.append(path)
        return removed

    def copy_out(self, sha256: str, dest: Path, kind: str = "lora", ext: str | None = None) -> Path:
        """Copy a blob to ``dest`` (e.g. to hand a file to another tool)."""
        shutil.copyfile(self.path_for(sha256, kind, ext), dest)
        return dest


def _fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it survives a power loss (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
