"""HTTP downloads into the content-addressed store: resumable, atomic, SHA-256-verified before use.

A download streams into ``<store>/tmp/dl-<hash of url>.part``; an interrupted one resumes with a
``Range`` request (a server that answers 200 instead of 206 restarts it). Only after the whole body
hashes to the expected SHA-256 (when one is known) is it renamed into the store; a mismatch deletes
the partial file and raises :class:`~adapters_db.store.HashMismatchError`. A transient failure that
outlasts the retries keeps the partial file to resume (``FileStore.collect_garbage`` removes stale ones).

Only http(s) URLs are fetched; redirects go to http(s) only, and one that leaves the request's origin
(scheme, host, port) drops ``Authorization`` and ``Cookie``, so a token never reaches a CDN or another
site. 429/5xx are retried after their ``Retry-After`` (up to ``max_retry_after_s``); JSON is capped in
size and total time, and gzip/deflate bodies are decoded.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters_db.store import CHUNK, FileStore, HashMismatchError, StoredFile

USER_AGENT = "adapter-studio/0.1 (+catalog importer)"
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
SECRET_HEADERS = ("Authorization", "Cookie")


class DownloadError(OSError):
    """A download that failed for a reason other than a hash mismatch (HTTP error, too big, …)."""


class _TransientError(DownloadError):
    """A failure worth retrying (a short or misplaced body)."""


@dataclass(frozen=True)
class HttpConfig:
    """Timeouts, retries and limits of the importers' HTTP client."""

    timeout_s: float = 30.0
    retries: int = 2
    backoff_s: float = 0.5
    max_bytes: int = 8 << 30
    headers: dict[str, str] = field(default_factory=dict)
    max_retry_after_s: float = 60.0  # a longer Retry-After (429/503) gives up at once
    max_json_bytes: int = 64 << 20
    json_deadline_s: float = 120.0  # a whole JSON/text response, however slowly it trickles


def url_origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of a URL: credentials never cross from one origin to another."""
    parts = urllib.parse.urlsplit(url)
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http(s) only, and drops credentials when one leaves the request's origin."""

    def http_error_302(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any) -> Any:
        """Refuse a redirect to anything but http(s) (urllib alone would follow ``ftp://``)."""
        target = urllib.parse.urljoin(req.full_url, headers.get("Location") or headers.get("URI") or "")
        if urllib.parse.urlsplit(target).scheme.lower() not in ("http", "https"):
            raise DownloadError(f"GET {req.full_url}: refused a redirect to a non-http(s) URL: {target}")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        """The next request, without ``Authorization``/``Cookie`` when the origin changes."""
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and url_origin(newurl) != url_origin(req.full_url):
            for name in SECRET_HEADERS:
                new.remove_header(name)
        return new


_OPENER = urllib.request.build_opener(_RedirectHandler)


def _open(url: str, config: HttpConfig, extra: dict[str, str] | None = None) -> Any:
    """GET ``url`` (http or https only) through the redirect-safe opener."""
    if urllib.parse.urlsplit(url).scheme.lower() not in ("http", "https"):
        raise DownloadError(f"GET {url}: not an http(s) URL")
    headers = {"User-Agent": USER_AGENT, **config.headers, **(extra or {})}
    return _OPENER.open(urllib.request.Request(url, headers=headers), timeout=config.timeout_s)


# What a flaky server or network raises: retried when transient (see ``_retry_delay``).
_NET_ERRORS = (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError, DownloadError)


def _retry_after(exc: urllib.error.HTTPError) -> float | None:
    value = (exc.headers.get("Retry-After") or "").strip() if exc.headers else ""
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _retry_delay(exc: Exception, attempt: int, config: HttpConfig) -> float | None:
    """Seconds to wait before retrying after ``exc`` (honouring Retry-After), or None: do not retry."""
    if isinstance(exc, urllib.error.HTTPError):
        if exc.code not in RETRY_STATUS:
            return None
        wait = _retry_after(exc)
        if wait is not None:
            return wait if wait <= config.max_retry_after_s else None
    elif isinstance(exc, DownloadError) and not isinstance(exc, _TransientError):
        return None
    return config.backoff_s * (attempt + 1)


def _describe(url: str, exc: Exception) -> str:
    """A one-line message for a failed GET."""
    if isinstance(exc, DownloadError):
        text = str(exc)
    elif isinstance(exc, urllib.error.HTTPError):
        if 300 <= exc.code < 400 and "infinite loop" in str(exc.reason):
            text = f"GET {url}: too many redirects (a redirect loop), last HTTP {exc.code}"
        else:
            wait = _retry_after(exc) if exc.code in RETRY_STATUS else None
            later = f" (Retry-After {wait:.0f} s)" if wait is not None else ""
            text = f"GET {url}: HTTP {exc.code} {exc.reason}{later}"
    elif isinstance(exc, urllib.error.URLError):
        text = f"GET {url}: {exc.reason}"
    elif isinstance(exc, http.client.IncompleteRead):
        text = f"GET {url}: connection closed mid-body ({len(exc.partial)} bytes of this part read)"
    else:
        text = f"GET {url}: {type(exc).__name__}: {exc}"
    return " ".join(text.split())


def _read_small(resp: Any, url: str, config: HttpConfig) -> bytes:
    """A JSON/text body: capped in size and time, checked against Content-Length, decoded (gzip/deflate)."""
    deadline = time.monotonic() + config.json_deadline_s
    chunks: list[bytes] = []
    size = 0
    while chunk := resp.read1(1 << 16):
        size += len(chunk)
        if size > config.max_json_bytes:
            raise DownloadError(f"GET {url}: response larger than {config.max_json_bytes} bytes")
        if time.monotonic() > deadline:
            raise DownloadError(f"GET {url}: no complete response within {config.json_deadline_s:g} s")
        chunks.append(chunk)
    if getattr(resp, "length", None):  # Content-Length promised more than came
        raise http.client.IncompleteRead(b"".join(chunks), resp.length)
    body = b"".join(chunks)
    encoding = (resp.headers.get("Content-Encoding") or "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise DownloadError(f"GET {url}: unsupported Content-Encoding {encoding!r}")
    try:
        inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib header
        data = inflater.decompress(body, config.max_json_bytes + 1)
    except zlib.error:
        try:  # "deflate" as a raw stream, as some servers send it
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            data = inflater.decompress(body, config.max_json_bytes + 1)
        except zlib.error as exc:
            raise DownloadError(f"GET {url}: broken {encoding} body ({exc})") from None
    if len(data) > config.max_json_bytes:
        raise DownloadError(f"GET {url}: response larger than {config.max_json_bytes} bytes (decompressed)")
    return data


def _get_small(url: str, config: HttpConfig, extra: dict[str, str] | None = None) -> bytes | None:
    """The body of a small document (retrying transient failures); ``None`` on 404."""
    for attempt in range(config.retries + 1):
        try:
            with _open(url, config, extra) as resp:
                return _read_small(resp, url, config)
        except _NET_ERRORS as exc:
            if isinstance(exc, urllib.error.HTTPError) and exc.code == 404:
                return None
            delay = _retry_delay(exc, attempt, config)
            if delay is None or attempt == config.retries:
                raise DownloadError(_describe(url, exc)) from exc
            time.sleep(delay)
    raise AssertionError("unreachable")


def get_json(url: str, config: HttpConfig = HttpConfig()) -> Any:
    """GET a JSON document (retries on connection errors, 429 and 5xx; raises ``DownloadError``)."""
    body = _get_small(url, config, {"Accept": "application/json"})
    if body is None:
        raise DownloadError(f"GET {url}: HTTP 404 Not Found")
    try:
        return json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DownloadError(f"GET {url}: not JSON (not UTF-8 text: {exc.reason})") from exc
    except json.JSONDecodeError as exc:
        raise DownloadError(f"GET {url}: not JSON ({exc.msg})") from exc


def get_text(url: str, config: HttpConfig = HttpConfig()) -> str | None:
    """GET a text document; ``None`` on 404."""
    body = _get_small(url, config)
    return None if body is None else body.decode("utf-8", errors="replace")


def partial_path(store: FileStore, url: str) -> Path:
    """Where the partial download of ``url`` lives (stable across runs, so it can resume)."""
    return store.tmp_dir / f"dl-{hashlib.sha256(url.encode()).hexdigest()[:24]}.part"


def _range_start(resp: Any) -> int | None:
    """Where a 206 response's ``Content-Range: bytes START-END/TOTAL`` starts (None if unreadable)."""
    value = (resp.headers.get("Content-Range") or "").strip()
    unit, _, rest = value.partition(" ")
    first = rest.split("-", 1)[0]
    return int(first) if unit == "bytes" and first.isdigit() else None


def _fetch_into(url: str, part: Path, config: HttpConfig) -> None:
    """Append the rest of ``url`` to ``part`` (resuming with a Range request when it exists)."""
    have = part.stat().st_size if part.exists() else 0
    extra = {"Accept-Encoding": "identity", **({"Range": f"bytes={have}-"} if have else {})}
    try:
        resp = _open(url, config, extra)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # asked past the end: the partial file is already complete
            return
        raise
    with resp:
        encoding = (resp.headers.get("Content-Encoding") or "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise DownloadError(f"GET {url}: the server sent a {encoding}-encoded body, not the file")
        resumed = bool(have) and resp.status == 206
        if resumed and _range_start(resp) != have:
            part.unlink(missing_ok=True)
            raise _TransientError(f"GET {url}: the server resumed at the wrong offset; starting over")
        written = have if resumed else 0
        length = resp.headers.get("Content-Length")
        expected = written + int(length) if length and length.isdigit() else None
        if expected is not None and expected > config.max_bytes:
            raise DownloadError(f"GET {url}: {expected} bytes is more than the {config.max_bytes} byte limit")
        with open(part, "ab" if resumed else "wb") as out:
            for chunk in iter(lambda: resp.read(CHUNK), b""):
                written += len(chunk)
                if written > config.max_bytes:
                    raise DownloadError(f"GET {url}: larger than the {config.max_bytes} byte limit")
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if expected is not None and written != expected:
            raise _TransientError(f"GET {url}: connection closed after {written} of {expected} bytes")


def download_to_store(
    url: str,
    store: FileStore,
    *,
    expected_sha256: str | None = None,
    kind: str = "lora",
    ext: str | None = None,
    config: HttpConfig = HttpConfig(),
) -> StoredFile:
    """Download ``url`` into the store (resume, retry, verify SHA-256, rename atomically).

    A transient failure (dropped connection, timeout, 429/5xx) that outlasts the retries keeps the
    partial file for the next attempt to resume (``collect_garbage`` removes stale ones); any other
    failure (4xx, too big, refused redirect) deletes it."""
    store.tmp_dir.mkdir(parents=True, exist_ok=True)
    if expected_sha256 and store.has(expected_sha256, kind, ext):
        path = store.path_for(expected_sha256, kind, ext)
        return StoredFile(expected_sha256.lower(), path.stat().st_size, path, existed=True)
    part = partial_path(store, url)
    for attempt in range(config.retries + 1):
        try:
            _fetch_into(url, part, config)
            break
        except _NET_ERRORS as exc:
            delay = _retry_delay(exc, attempt, config)
            if delay is None:
                part.unlink(missing_ok=True)
                raise DownloadError(_describe(url, exc)) from exc
            if attempt == config.retries:
                kept = "; the partial file is kept to resume" if part.exists() else ""
                raise DownloadError(
                    f"{_describe(url, exc)} (gave up after {config.retries + 1} attempts{kept})"
                ) from exc
            time.sleep(delay)
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
        raise HashMismatchError(f"{url}: {exc}") from None
    finally:
        part.unlink(missing_ok=True)
