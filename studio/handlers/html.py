"""HTML fragments of the studio (adapter cards, the detail view, job progress), built from DTOs.

Every string that comes from a catalog, a file or a person is escaped with ``html.escape``; the only
HTML taken as is is the catalog's description, which the catalog sanitised (nh3) when it stored it.
Buttons carry ``data-action``/``data-id`` attributes; the UI turns clicks on them into events.
"""

from __future__ import annotations

import html
import re
import urllib.parse
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from adapters_db import AdapterRecord, ImageRecord, SearchHit
from pipelines.lora_formats.detect import dataset_tag_counts

NSFW_NAMES = {0: "", 1: "soft", 2: "mature", 3: "x"}


def esc(value: Any) -> str:
    """Escaped text of any value (``None`` → empty)."""
    return "" if value is None else html.escape(str(value), quote=True)


# Markdown's inline punctuation (emphasis, code, links and images, strikethrough); ``<`` and ``&`` are
# HTML-escaped. Block syntax (``#``, ``-``, ``1.``) needs no escape: these texts never start a line.
_MD_PUNCT = re.compile(r"([\\`*_\[\]~])")


def md(value: Any) -> str:
    """Text for a Markdown component: shown as typed, never as HTML or Markdown (``None`` → empty)."""
    text = "" if value is None else html.escape(str(value), quote=False)
    return _MD_PUNCT.sub(r"\\\1", text).replace("\n", " ")


def md_code(value: Any) -> str:
    """Text in a code chip inside Markdown (a backtick span cannot hold every text; ``<code>`` can)."""
    return f"<code>{esc(value)}</code>"


def strength(spec: Any) -> str:
    """An adapter's strength in a recipe as people read it: the weight times its text-encoder and UNet
    multipliers (``<lora:x:0.8>`` is 0.8), both when they differ (``te 0.5/unet 0.8``)."""
    te, unet = spec.weight * spec.te, spec.weight * spec.unet
    if te == unet:
        return f"{te:g}"
    return f"te {te:g}/unet {unet:g}"


def mix_text(adapters: Sequence[Any]) -> str:
    """One line naming a recipe's adapters with their strengths."""
    return ", ".join(f"{a.label} {strength(a)}" for a in adapters) or "no adapters"


def file_url(path: str | Path) -> str:
    """URL of a local file through Gradio's file route (relative, so a root path works)."""
    return "gradio_api/file=" + urllib.parse.quote(str(Path(path).resolve()))


def image_src(image: ImageRecord | None) -> str | None:
    """Where a preview can be loaded from: the local copy, else an http(s) URL, else None."""
    if image is None:
        return None
    if image.local_path is not None and Path(image.local_path).is_file():
        return file_url(image.local_path)
    if image.url and urllib.parse.urlsplit(image.url).scheme in ("http", "https"):
        return image.url
    return None


def _thumb(record: AdapterRecord) -> str:
    src = image_src(record.cover_image)
    if src:
        return f'<img src="{esc(src)}" alt="{esc(record.name)}" loading="lazy" referrerpolicy="no-referrer">'
    initials = "".join(w[0] for w in record.name.split()[:2]).upper() or "?"
    return f'<div class="as-noimg">{esc(initials)}</div>'


def _badges(record: AdapterRecord) -> str:
    badges = [record.base_model or record.base_family or "unknown base"]
    badges.append("local" if record.has_local_file else "remote")
    if record.nsfw_level:
        badges.append(f"nsfw: {NSFW_NAMES.get(record.nsfw_level, record.nsfw_level)}")
    return " ".join(f'<span class="as-badge">{esc(b)}</span>' for b in badges)


def _chips(words: Iterable[str], limit: int = 6) -> str:
    items = list(words)[:limit]
    return " ".join(f"<code>{esc(w)}</code>" for w in items)


def adapter_card(
    record: AdapterRecord, *, why: str = "", in_mix: bool = False, score: float | None = None
) -> str:
    """One card: preview, name, base model, why it matched, trigger words, add/details buttons."""
    if in_mix:
        add = '<button class="as-btn" disabled>✓ in the mix</button>'
    elif record.has_local_file:
        add = (
            f'<button class="as-btn as-primary" data-action="add" data-id="{record.id}">+ Add to mix</button>'
        )
    else:
        add = (
            '<button class="as-btn" disabled title="only listed; import its file first">remote only</button>'
        )
    parts = [
        f'<div class="as-card" data-adapter-id="{record.id}">',
        f'<div class="as-thumb">{_thumb(record)}</div>',
        '<div class="as-body">',
        f'<div class="as-name" title="{esc(record.name)}">{esc(record.name)}</div>',
        f'<div class="as-meta">{_badges(record)}</div>',
    ]
    if why:
        parts.append(f'<div class="as-why">{esc(why)}</div>')
    if record.trigger_words:
        parts.append(f'<div class="as-triggers">{_chips(record.trigger_words)}</div>')
    if score is not None:
        parts.append(f'<div class="as-score">score {score:.3f}</div>')
    parts.append(
        f'<div class="as-actions">{add}'
        f'<button class="as-btn" data-action="detail" data-id="{record.id}">Details</button></div>'
    )
    parts.append("</div></div>")
    return "".join(parts)


def hit_cards(hits: Sequence[SearchHit], mix_ids: Iterable[int] = (), empty: str = "") -> str:
    """The card grid of search hits (``empty``: what to say when there are none)."""
    ids = set(mix_ids)
    if not hits:
        return f'<div class="as-empty">{esc(empty or "No matching adapters.")}</div>'
    cards = [adapter_card(h.adapter, why=h.why, in_mix=h.adapter.id in ids) for h in hits]
    return f'<div class="as-cards">{"".join(cards)}</div>'


def record_cards(
    records: Sequence[AdapterRecord],
    mix_ids: Iterable[int] = (),
    why: dict[int, str] | None = None,
    empty: str = "",
) -> str:
    """The card grid of catalog records."""
    ids, why = set(mix_ids), why or {}
    if not records:
        text = empty or "The catalog has no adapters matching these filters."
        return f'<div class="as-empty">{esc(text)}</div>'
    cards = [adapter_card(r, why=why.get(r.id, ""), in_mix=r.id in ids) for r in records]
    return f'<div class="as-cards">{"".join(cards)}</div>'


def tag_frequencies(record: AdapterRecord, limit: int = 25) -> list[tuple[str, int]]:
    """Caption tag counts from the files' kohya ``ss_tag_frequency`` metadata, most frequent first."""
    counts: Counter[str] = Counter()
    for file in record.files:
        for tags in dataset_tag_counts(file.header_metadata.get("ss_tag_frequency", "")).values():
            for tag, count in tags.items():
                counts[tag] += int(count)
    return counts.most_common(limit)


def _licence(record: AdapterRecord) -> str:
    lic = record.licence

    def flag(value: Any) -> str:
        return (
            "not stated"
            if value is None
            else ("yes" if value is True else "no" if value is False else str(value))
        )

    rows = [
        ("Licence", lic.license or "not stated"),
        ("Commercial use", flag(lic.allow_commercial_use)),
        ("Use without credit", flag(lic.allow_no_credit)),
        ("Derivatives", flag(lic.allow_derivatives)),
        ("Different licence", flag(lic.allow_different_license)),
    ]
    return _table(rows)


def _table(rows: Sequence[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
    return f'<table class="as-kv">{body}</table>'


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _files(record: AdapterRecord) -> str:
    rows = []
    for f in record.files:
        where = (
            "stored locally" if f.is_local else (f"remote: {f.remote_url}" if f.remote_url else "not stored")
        )
        rows.append(
            f"<tr><td>{esc(f.file_name)}</td><td>{esc(_size(f.size_bytes))}</td>"
            f"<td><code>{esc(f.sha256 or '?')}</code></td><td><code>{esc(f.autov2 or '')}</code></td>"
            f"<td>{esc(f.format or '')}{'' if f.rank is None else esc(f', rank {f.rank}')}</td>"
            f"<td>{esc(where)}</td></tr>"
        )
    head = "<tr><th>File</th><th>Size</th><th>SHA-256</th><th>AutoV2</th><th>Format</th><th>Where</th></tr>"
    return f'<table class="as-files">{head}{"".join(rows)}</table>'


def _versions(record: AdapterRecord) -> str:
    rows = [
        f"<tr><td>{esc(v.name)}</td><td>{esc(v.base_model or v.base_family or '')}</td>"
        f"<td>{esc(v.created_at.date() if v.created_at else '')}</td><td>{_chips(v.trigger_words, 12)}</td>"
        f"<td>{len(v.files)}</td></tr>"
        for v in record.versions
    ]
    head = "<tr><th>Version</th><th>Base model</th><th>Created</th><th>Trigger words</th><th>Files</th></tr>"
    return f'<table class="as-files">{head}{"".join(rows)}</table>'


def _previews(record: AdapterRecord, show_nsfw: bool) -> str:
    out = []
    for image in record.images:
        if image.kind == "caption" or (image.nsfw_level and not show_nsfw):
            continue
        src = image_src(image)
        params = {k: v for k, v in image.params.items() if not str(k).startswith("_")}
        summary = ", ".join(f"{k}: {v}" for k, v in list(params.items())[:8])
        pic = f'<img src="{esc(src)}" loading="lazy" referrerpolicy="no-referrer">' if src else ""
        use = (
            f'<button class="as-btn" data-action="use_prompt" data-id="{image.id}">Use this prompt</button>'
            if image.prompt
            else ""
        )
        out.append(
            f'<div class="as-preview">{pic}<div class="as-prompt">{esc(image.prompt or "")}</div>'
            f'<div class="as-params">{esc(summary)}</div>{use}</div>'
        )
    return f'<div class="as-previews">{"".join(out)}</div>' if out else "<p>No preview images.</p>"


def detail_view(record: AdapterRecord, *, in_mix: bool = False, show_nsfw: bool = False) -> str:
    """The detail view of one adapter (the description is the catalog's sanitised HTML)."""
    freq = tag_frequencies(record)
    add = (
        '<button class="as-btn" disabled>✓ in the mix</button>'
        if in_mix
        else f'<button class="as-btn as-primary" data-action="add" data-id="{record.id}">'
        "+ Add to mix</button>"
        if record.has_local_file
        else f'<button class="as-btn as-primary" data-action="download" data-id="{record.id}" '
        'title="download its file, verify its SHA-256, then use it">⤓ Download file</button>'
        if record.downloadable
        else '<button class="as-btn" disabled>remote only</button>'
    )
    facts = [
        ("Id", record.id),
        ("Kind", record.kind),
        ("Source", record.source),
        ("Creator", record.creator or ""),
        ("Base model", record.base_model or ""),
        ("Base family", record.base_family or "unknown"),
        ("Downloads", record.stats.downloads),
        ("Rating", f"{record.stats.rating:.2f} ({record.stats.ratings})"),
        ("NSFW level", record.nsfw_level),
    ]
    link = ""
    if record.source_url and urllib.parse.urlsplit(record.source_url).scheme in ("http", "https"):
        link = (
            f'<p><a href="{esc(record.source_url)}" target="_blank" rel="noopener noreferrer">'
            "source page</a></p>"
        )
    sections = [
        f'<div class="as-detail" data-adapter-id="{record.id}">',
        f'<h2>{esc(record.name)}</h2><div class="as-meta">{_badges(record)}</div>',
        f'<div class="as-actions">{add}</div>{link}',
        f'<div class="as-cols"><div>{_table(facts)}</div><div>{_licence(record)}</div></div>',
        f"<h3>Trigger words</h3><p>{_chips(record.trigger_words, 50) or 'none'}</p>",
        f"<h3>Tags</h3><p>{_chips(record.tags, 50) or 'none'}</p>",
        '<h3>Description</h3><div class="as-description">'
        f"{record.description_html or '<p>No description.</p>'}"
        "</div>",
        f"<h3>Versions</h3>{_versions(record)}",
        f"<h3>Files and hashes</h3>{_files(record)}",
    ]
    if freq:
        sections.append(
            "<h3>Training tag frequencies</h3><p>"
            + " ".join(f"<code>{esc(t)} × {n}</code>" for t, n in freq)
            + "</p>"
        )
    sections.append(f"<h3>Preview images</h3>{_previews(record, show_nsfw)}")
    sections.append("</div>")
    return "".join(sections)


def progress_bar(fraction: float, label: str) -> str:
    """A labelled progress bar."""
    pct = max(0.0, min(1.0, fraction)) * 100
    return (
        f'<div class="as-progress"><div class="as-progress-fill" style="width:{pct:.1f}%"></div>'
        f"<span>{esc(label)}</span></div>"
    )


def message(text: str, kind: str = "info") -> str:
    """A short boxed message (``info``, ``warn`` or ``error``)."""
    return f'<div class="as-msg as-{esc(kind)}">{esc(text)}</div>'


def history_cards(entries: Sequence[Any], empty: str = "No generations yet.") -> str:
    """Cards of history entries: first image, date, prompt, mix, and open/send buttons."""
    if not entries:
        return f'<div class="as-empty">{esc(empty)}</div>'
    cards = []
    for e in entries:
        pic = f'<img src="{esc(file_url(e.images[0]))}" alt="">' if e.images and e.images[0].is_file() else ""
        mix = mix_text(e.recipe.adapters)
        cards.append(
            f'<div class="as-card" data-entry-id="{esc(e.id)}"><div class="as-thumb">{pic}</div>'
            f'<div class="as-body"><div class="as-why">{esc(e.created_at.strftime("%Y-%m-%d %H:%M"))} · '
            f"{esc(e.kind)} · seed {e.recipe.seed}</div>"
            f'<div class="as-name" title="{esc(e.prompt)}">{esc(e.prompt or "(no prompt)")}</div>'
            f'<div class="as-why">{esc(e.recipe.fusion)} · {esc(mix)}</div>'
            '<div class="as-actions">'
            f'<button class="as-btn as-primary" data-action="open" data-id="{esc(e.id)}">Open</button>'
            f'<button class="as-btn" data-action="send" data-id="{esc(e.id)}">Send to Create</button>'
            "</div></div></div>"
        )
    return f'<div class="as-cards as-history">{"".join(cards)}</div>'
