"""HTTP downloads into the content-addressed store: resumable, atomic, SHA-256-verified before use.

A download streams into ``<store>/tmp/dl-<hash of url>.part``; an interrupted one resumes with a
``Range`` request (a server that answers 200 instead of 206 restarts it). Only after the whole body
hashes to the expected SHA-256 (when one is known) is it renamed into the store; a mismatch deletes
the partial file and raises :class:`~adapters_db.store.HashMismatchError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters_db.store import CHUNK, FileStore, HashMismatchError, StoredFile

USER_AGENT = "adapter-studio/0.1 (+catalog importer)"


class DownloadError(OSError):
    """A download that failed for a reason other than a hash mismatch (HTTP error, too big, …)."""


@dataclass(frozen=True)
class HttpConfig:
    """Timeouts, retries and limits of the importers' HTTP client."""

    timeout_s: float = 30.0
    retries: int = 2
    backoff_s: float = 0.5
    max_bytes: int = 8 << 30
    headers: dict[str, str] = field(default_factory=dict)


def _request(url: str, config: HttpConfig, extra: dict[str, str] | None = None) -> urllib.request.Request:
    headers = {"User-Agent": USER_AGENT, **config.headers, **(extra or {})}
    return urllib.request.Request(url, headers=headers)


def get_json(url: str, config: HttpConfig = HttpConfig()) -> Any:
    """GET a JSON document (retries on connection errors and 5xx; raises ``DownloadError``)."""
    last: Exception | None = None
    for attempt in range(config.retries + 1):
        try:
            with urllib.request.urlopen(
                _request(url, config, {"Accept": "application/json"}), timeout=config.timeout_s
            ) as resp:
                return json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                raise DownloadError(f"GET {url}: HTTP {exc.code} {exc.reason}") from exc
            last = exc
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            last = exc
        except json.JSONDecodeError as exc:
            raise DownloadError(f"GET {url}: not JSON ({exc.msg})") from exc
        time.sleep(config.backoff_s * (attempt + 1))
    raise DownloadError(f"GET {url}: {last}")


def get_text(url: str, config: HttpConfig = HttpConfig()) -> str | None:
    """GET a text document; ``None`` on 404."""
    try:
        with urllib.request.urlopen(_request(url, config), timeout=config.timeout_s) as resp:
            return resp.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise DownloadError(f"GET {url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise DownloadError(f"GET {url}: {exc}") from exc


def partial_path(store: FileStore, url: str) -> Path:
    """Where the partial download of ``url`` lives (stable across runs, so it can resume)."""
    return store.tmp_dir / f"dl-{hashlib.sha256(url.encode()).hexdigest()[:24]}.part"


def _fetch_into(url: str, part: Path, config: HttpConfig) -> None:
    """Append the rest of ``url`` to ``part`` (resuming with a Range request when it exists)."""
    have = part.stat().st_size if part.exists() else 0
    extra = {"Range": f"bytes={have}-"} if have else {}
    try:
        resp = urllib.request.urlopen(_request(url, config, extra), timeout=config.timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # asked past the end: the partial file is already complete
            return
        raise DownloadError(f"GET {url}: HTTP {exc.code} {exc.reason}") from exc
    with resp:
        mode = "ab" if have and resp.status == 206 else "wb"
        written = have if mode == "ab" else 0
        with open(part, mode) as out:
            for chunk in iter(lambda: resp.read(CHUNK), b""):
                written += len(chunk)
                if written > config.max_bytes:
                    raise DownloadError(f"GET {url}: larger than the {config.max_bytes} byte limit")
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        length = resp.headers.get("Content-Length")
        expected = (have if mode == "ab" else 0) + int(length) if length and length.isdigit() else None
        if expected is not None and written != expected:
            raise DownloadError(f"GET {url}: connection closed after {written} of {expected} bytes")


def download_to_store(
    url: str,
    store: FileStore,
    *,
    expected_sha256: str | None = None,
    kind: str = "lora",
    ext: str | None = None,
    config: HttpConfig = HttpConfig(),
) -> StoredFile:
    """Download ``url`` into the store (resume, retry, verify SHA-256, rename atomically)."""
    store.tmp_dir.mkdir(parents=True, exist_ok=True)
    if expected_sha256 and store.has(expected_sha256, kind, ext):
        path = store.path_for(expected_sha256, kind, ext)
        return StoredFile(expected_sha256.lower(), path.stat().st_size, path, existed=True)
    part = partial_path(store, url)
    last: Exception | None = None
    for attempt in range(config.retries + 1):
        try:
            _fetch_into(url, part, config)
            break
        except (urllib.error.URLError, TimeoutError, ConnectionError, DownloadError) as exc:
            last = exc
            if isinstance(exc, DownloadError) and "HTTP 4" in str(exc):
                part.unlink(missing_ok=True)
                raise
            time.sleep(config.backoff_s * (attempt + 1))
    else:
        raise DownloadError(f"GET {url}: gave up after {config.retries + 1} attempts ({last})")
    digest = hashlib.sha256()
    with open(part, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
    size = part.stat().st_size
    try:
        return store.adopt(
            part, digest.hexdigest(), size, kind=kind, ext=ext, expected_sha256=expected_sha256
        )
    except HashMismatchError as exc:
        part.unlink(missing_ok=True)
        raise HashMismatchError(f"{url}: {exc}") from None
    finally:
        part.unlink(missing_ok=True)
