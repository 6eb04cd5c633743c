"""Stored vectors: what text each channel embeds, computing the missing ones, loading them for FAISS.

Channels: ``meta`` (one vector per adapter: name, trigger words, tags, description), ``prompt`` (one
per preview-image prompt or training caption) and ``image`` (one per local preview image, when the
embedder has an image tower). Each row records the embedder name, dimension and a hash of its
content, so a changed text or another embedder gets a fresh vector. Vectors are derived data:
:func:`embed_missing` owns its transactions and commits in chunks (an interrupted run resumes).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from adapters_db.models import Adapter, Embedding, PreviewImage, Tag, TriggerWord, adapter_tags
from adapters_db.text import clean_prompt

if TYPE_CHECKING:
    from adapters_db.catalog import Catalog
    from adapters_db.embedders import Embedder, EmbeddingCache

log = logging.getLogger(__name__)

CHUNK = 2048
META_DESCRIPTION_CHARS = 600


@dataclass(frozen=True)
class Item:
    """One thing to embed: its owner, channel and content."""

    adapter_id: int
    image_id: int | None
    channel: str
    text: str | None = None
    image_path: str | None = None

    def content_hash(self, embedder_name: str) -> str:
        """SHA-256 over embedder name, channel and content."""
        body = self.text if self.text is not None else f"file:{self.image_path}"
        return hashlib.sha256(f"{embedder_name}\0{self.channel}\0{body}".encode()).hexdigest()


def meta_text(name: str, triggers: list[str], tags: list[str], description: str) -> str:
    """The text of an adapter's ``meta`` vector."""
    parts = [name, ", ".join(dict.fromkeys(triggers)), ", ".join(tags), description[:META_DESCRIPTION_CHARS]]
    return ". ".join(p.strip() for p in parts if p and p.strip())


def meta_items(session: Session) -> list[Item]:
    """The ``meta`` item of every adapter."""
    triggers: dict[int, list[str]] = {}
    for adapter_id, word in session.execute(
        select(TriggerWord.adapter_id, TriggerWord.word).order_by(
            TriggerWord.adapter_id, TriggerWord.position
        )
    ):
        triggers.setdefault(adapter_id, []).append(word)
    tags: dict[int, list[str]] = {}
    for adapter_id, tag in session.execute(select(adapter_tags.c.adapter_id, Tag.name).join(Tag)):
        tags.setdefault(adapter_id, []).append(tag)
    rows = session.execute(select(Adapter.id, Adapter.name, Adapter.description_text).order_by(Adapter.id))
    return [
        Item(aid, None, "meta", meta_text(name, triggers.get(aid, []), tags.get(aid, []), desc or ""))
        for aid, name, desc in rows
    ]


def prompt_items(session: Session) -> list[Item]:
    """The ``prompt`` item of every preview image or caption that has a prompt."""
    rows = session.execute(
        select(PreviewImage.adapter_id, PreviewImage.id, PreviewImage.prompt)
        .where(PreviewImage.prompt.is_not(None))
        .order_by(PreviewImage.id)
    )
    out = []
    for adapter_id, image_id, prompt in rows:
        text = " ".join(clean_prompt(prompt).split())
        if text:
            out.append(Item(adapter_id, image_id, "prompt", text))
    return out


def image_items(session: Session, catalog: Catalog) -> list[Item]:
    """The ``image`` item of every preview image stored locally."""
    rows = session.execute(
        select(PreviewImage.adapter_id, PreviewImage.id, PreviewImage.local_sha256, PreviewImage.local_ext)
        .where(PreviewImage.local_sha256.is_not(None))
        .order_by(PreviewImage.id)
    )
    out = []
    for adapter_id, image_id, sha, ext in rows:
        path = catalog.store.path_for(sha, "images", ext or "")
        if path.is_file():
            out.append(Item(adapter_id, image_id, "image", image_path=str(path)))
    return out


def _existing(
    session: Session, embedder_name: str, dim: int
) -> dict[tuple[str, int, int | None], tuple[int, str]]:
    """Stored vectors of the embedder by item; one of another dimension (an embedder of the same name
    but another size) has no content hash, so it counts as stale."""
    rows = session.execute(
        select(
            Embedding.id,
            Embedding.channel,
            Embedding.adapter_id,
            Embedding.image_id,
            Embedding.content_hash,
            Embedding.dim,
        ).where(Embedding.embedder == embedder_name)
    )
    return {(ch, aid, iid): (eid, h if d == dim else "") for eid, ch, aid, iid, h, d in rows}


def _chunks(items: list[Item], size: int) -> Iterator[list[Item]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def pending_items(
    session: Session,
    catalog: Catalog,
    embedder: Embedder,
    channels: tuple[str, ...] = ("meta", "prompt", "image"),
    adapter_ids: set[int] | None = None,
) -> list[Item]:
    """Items whose vector for ``embedder`` is missing or stale; stale rows are deleted."""
    items: list[Item] = []
    if "meta" in channels:
        items += meta_items(session)
    if "prompt" in channels:
        items += prompt_items(session)
    if "image" in channels and embedder.supports_images:
        items += image_items(session, catalog)
    if adapter_ids is not None:
        items = [it for it in items if it.adapter_id in adapter_ids]
    existing = _existing(session, embedder.name, embedder.dim)
    todo = []
    for it in items:
        key = (it.channel, it.adapter_id, it.image_id)
        if existing.get(key, (0, ""))[1] != it.content_hash(embedder.name):
            todo.append(it)
    stale = [
        existing[k][0] for k in ((it.channel, it.adapter_id, it.image_id) for it in todo) if k in existing
    ]
    for start in range(0, len(stale), 500):
        session.execute(delete(Embedding).where(Embedding.id.in_(stale[start : start + 500])))
    return todo


def _vectors_of(
    embedder: Embedder, chunk: list[Item], cache: EmbeddingCache | None
) -> list[np.ndarray | None]:
    texts = [it for it in chunk if it.text is not None]
    pics = [it for it in chunk if it.text is None]
    found: dict[int, np.ndarray | None] = {}
    if texts:
        batch = [it.text or "" for it in texts]
        arr = cache.embed(embedder, batch) if cache is not None else embedder.embed_texts(batch)
        found.update({id(it): v for it, v in zip(texts, arr, strict=True)})
    if pics:
        found.update({id(it): v for it, v in zip(pics, _picture_vectors(embedder, pics), strict=True)})
    return [None if (v := found[id(it)]) is None else np.asarray(v, np.float32) for it in chunk]


def _picture_vectors(embedder: Embedder, pics: list[Item]) -> list[np.ndarray | None]:
    """Image vectors; a picture that cannot be read (damaged, not a picture, too large) gets ``None`` and a
    warning, so one bad preview never stops the other vectors (it is retried at the next rebuild)."""
    from adapters_db.embedders import ImageReadError

    try:
        return list(embedder.embed_images([it.image_path for it in pics]))
    except ImageReadError:
        pass
    out: list[np.ndarray | None] = []
    for it in pics:
        try:
            out.append(embedder.embed_images([it.image_path])[0])
        except ImageReadError as exc:
            log.warning("preview image of adapter %s left out of image search: %s", it.adapter_id, exc)
            out.append(None)
    return out


def _rows(embedder: Embedder, chunk: list[Item], vectors: list[np.ndarray | None]) -> list[Embedding]:
    return [
        Embedding(
            adapter_id=it.adapter_id,
            image_id=it.image_id,
            channel=it.channel,
            embedder=embedder.name,
            dim=embedder.dim,
            content_hash=it.content_hash(embedder.name),
            vector=v.tobytes(),
        )
        for it, v in zip(chunk, vectors, strict=True)
        if v is not None
    ]


def embed_missing(
    catalog: Catalog,
    embedder: Embedder | None = None,
    *,
    session: Session | None = None,
    channels: tuple[str, ...] = ("meta", "prompt", "image"),
    cache: EmbeddingCache | None = None,
    adapter_ids: set[int] | None = None,
    show_progress: bool = False,
) -> int:
    """Compute and store every missing or stale vector of ``embedder``; returns how many were made.

    With ``session`` the rows join the caller's transaction; without, this function commits each
    chunk of 512 itself (a long run that is interrupted resumes where it stopped).
    """
    embedder = embedder or catalog.embedder
    if session is not None:
        todo = pending_items(session, catalog, embedder, channels, adapter_ids)
    else:
        with catalog.session() as own:
            todo = pending_items(own, catalog, embedder, channels, adapter_ids)
    bar = None
    if show_progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc=f"embedding ({embedder.name})", unit="vec")
    made = 0
    for chunk in _chunks(todo, CHUNK):
        vectors = _vectors_of(embedder, chunk, cache)
        made += sum(v is not None for v in vectors)
        if session is not None:
            session.add_all(_rows(embedder, chunk, vectors))
            session.flush()
        else:
            with catalog.session() as own:
                own.add_all(_rows(embedder, chunk, vectors))
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return made


@dataclass(frozen=True)
class StoredVectors:
    """Vectors of one channel: ``(n, dim)`` float32 with their adapter ids and image ids (−1: none)."""

    vectors: np.ndarray
    adapter_ids: np.ndarray
    image_ids: np.ndarray


def load_vectors(session: Session, embedder_name: str, dim: int, channel: str) -> StoredVectors:
    """Every stored vector of a channel made by this embedder (of adapters that still exist)."""
    rows = session.execute(
        select(Embedding.adapter_id, Embedding.image_id, Embedding.vector)
        .where(Embedding.embedder == embedder_name, Embedding.channel == channel, Embedding.dim == dim)
        .order_by(Embedding.id)
    ).all()
    vectors = np.zeros((len(rows), dim), np.float32)
    adapter_ids = np.zeros(len(rows), np.int64)
    image_ids = np.full(len(rows), -1, np.int64)
    for i, (aid, iid, blob) in enumerate(rows):
        vectors[i] = np.frombuffer(blob, dtype=np.float32)
        adapter_ids[i] = aid
        image_ids[i] = -1 if iid is None else iid
    return StoredVectors(vectors, adapter_ids, image_ids)
