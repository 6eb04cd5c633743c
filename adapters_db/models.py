"""SQLAlchemy 2.0 typed ORM models of the catalog (private to adapters_db: DTOs leave, ORM rows never do).

One ``Adapter`` (a Civitai "model" or one local LoRA) has ``AdapterVersion`` rows, each with its
``AdapterFile`` rows (content-addressed by SHA-256), ``TriggerWord`` rows and ``PreviewImage`` rows
(with the generation parameters people used). ``Embedding`` rows hold the vectors of every channel,
tagged with the embedder that made them. ``SearchDocument`` is the text the database's full-text
index (SQLite FTS5 / PostgreSQL tsvector) covers. ``CatalogState`` holds the revision counter that
derived indexes compare against.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Timezone-aware current time (stored as UTC)."""
    return datetime.now(UTC)


UNSEARCHABLE_KINDS = ("gate",)  # catalogued, but not adapters a prompt retrieves (gate checkpoints)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


adapter_tags = Table(
    "adapter_tags",
    Base.metadata,
    Column("adapter_id", ForeignKey("adapters.id", ondelete="CASCADE"), primary_key=True),
    Column("tag_id", ForeignKey("tags.id", ondelete="CASCADE"), primary_key=True, index=True),
)


class Adapter(Base):
    __tablename__ = "adapters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(400))
    kind: Mapped[str] = mapped_column(String(32), default="lora")
    source: Mapped[str] = mapped_column(String(32), default="local", index=True)
    description_html: Mapped[str] = mapped_column(Text, default="")
    description_text: Mapped[str] = mapped_column(Text, default="")
    base_family: Mapped[str | None] = mapped_column(String(16), index=True)
    base_model: Mapped[str | None] = mapped_column(String(64))
    nsfw_level: Mapped[int] = mapped_column(Integer, default=0, index=True)
    creator: Mapped[str | None] = mapped_column(String(200))
    civitai_model_id: Mapped[int | None] = mapped_column(BigInteger, unique=True)
    hf_repo: Mapped[str | None] = mapped_column(String(300))
    source_url: Mapped[str | None] = mapped_column(String(1000))
    # licence / permission flags (Civitai's allow* fields; ``license`` as an SPDX-ish id when known)
    license: Mapped[str | None] = mapped_column(String(100))
    allow_no_credit: Mapped[bool | None] = mapped_column(Boolean)
    allow_commercial_use: Mapped[str | None] = mapped_column(String(100))
    allow_derivatives: Mapped[bool | None] = mapped_column(Boolean)
    allow_different_license: Mapped[bool | None] = mapped_column(Boolean)
    poi: Mapped[bool] = mapped_column(Boolean, default=False)
    # stats
    download_count: Mapped[int] = mapped_column(BigInteger, default=0, index=True)
    favorite_count: Mapped[int] = mapped_column(BigInteger, default=0)
    comment_count: Mapped[int] = mapped_column(BigInteger, default=0)
    rating_count: Mapped[int] = mapped_column(BigInteger, default=0)
    rating: Mapped[float] = mapped_column(Float, default=0.0, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    extra: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    versions: Mapped[list[AdapterVersion]] = relationship(
        back_populates="adapter",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="AdapterVersion.position",
    )
    tags: Mapped[list[Tag]] = relationship(secondary=adapter_tags, order_by="Tag.name")


class Tag(Base):
    __tablename__ = "tags"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)


class AdapterVersion(Base):
    __tablename__ = "adapter_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer, default=0)
    name: Mapped[str] = mapped_column(String(400), default="")
    civitai_version_id: Mapped[int | None] = mapped_column(BigInteger, unique=True)
    base_model: Mapped[str | None] = mapped_column(String(64))
    base_family: Mapped[str | None] = mapped_column(String(16))
    description_html: Mapped[str] = mapped_column(Text, default="")
    download_url: Mapped[str | None] = mapped_column(String(1000))
    created_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    download_count: Mapped[int] = mapped_column(BigInteger, default=0)

    adapter: Mapped[Adapter] = relationship(back_populates="versions")
    files: Mapped[list[AdapterFile]] = relationship(
        back_populates="version",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="AdapterFile.id",
    )
    trigger_words: Mapped[list[TriggerWord]] = relationship(
        cascade="all, delete-orphan", passive_deletes=True, order_by="TriggerWord.position"
    )
    images: Mapped[list[PreviewImage]] = relationship(
        back_populates="version",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="PreviewImage.position",
    )


class AdapterFile(Base):
    __tablename__ = "adapter_files"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("adapter_versions.id", ondelete="CASCADE"), index=True)
    file_name: Mapped[str] = mapped_column(String(500))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    autov2: Mapped[str | None] = mapped_column(String(10), index=True)
    hashes: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    format: Mapped[str | None] = mapped_column(String(32))
    primary: Mapped[bool] = mapped_column(Boolean, default=True)
    remote_url: Mapped[str | None] = mapped_column(String(1000))
    stored: Mapped[bool] = mapped_column(Boolean, default=False)
    header_metadata: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    rank: Mapped[int | None] = mapped_column(Integer)
    num_modules: Mapped[int | None] = mapped_column(Integer)
    components: Mapped[list[str]] = mapped_column(JSON, default=list)

    version: Mapped[AdapterVersion] = relationship(back_populates="files")


class TriggerWord(Base):
    __tablename__ = "trigger_words"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("adapter_versions.id", ondelete="CASCADE"), index=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer, default=0)
    word: Mapped[str] = mapped_column(Text)

    adapter: Mapped[Adapter] = relationship()


class PreviewImage(Base):
    __tablename__ = "preview_images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("adapter_versions.id", ondelete="CASCADE"), index=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer, default=0)
    civitai_image_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    url: Mapped[str | None] = mapped_column(String(1000))
    local_sha256: Mapped[str | None] = mapped_column(String(64))
    local_ext: Mapped[str | None] = mapped_column(String(8))
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    nsfw_level: Mapped[int] = mapped_column(Integer, default=0)
    blurhash: Mapped[str | None] = mapped_column(String(100))
    prompt: Mapped[str | None] = mapped_column(Text)
    negative_prompt: Mapped[str | None] = mapped_column(Text)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # "preview" (a gallery image), "sample" (made by the trainer), "caption" (a training caption, no image)
    kind: Mapped[str] = mapped_column(String(16), default="preview")

    version: Mapped[AdapterVersion] = relationship(back_populates="images")
    adapter: Mapped[Adapter] = relationship()


class Embedding(Base):
    """One vector: of an adapter's metadata text, of one preview prompt, or of one preview image."""

    __tablename__ = "embeddings"
    __table_args__ = (Index("ix_embeddings_embedder_channel", "embedder", "channel"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), index=True)
    image_id: Mapped[int | None] = mapped_column(
        ForeignKey("preview_images.id", ondelete="CASCADE"), index=True
    )
    channel: Mapped[str] = mapped_column(String(16))
    embedder: Mapped[str] = mapped_column(String(200))
    dim: Mapped[int] = mapped_column(Integer)
    content_hash: Mapped[str] = mapped_column(String(64))
    vector: Mapped[bytes] = mapped_column(LargeBinary)


class SearchDocument(Base):
    """The text the database full-text index covers, one row per adapter (kept by the repository)."""

    __tablename__ = "search_documents"

    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(Text, default="")
    tags: Mapped[str] = mapped_column(Text, default="")
    triggers: Mapped[str] = mapped_column(Text, default="")
    files: Mapped[str] = mapped_column(Text, default="")
    description: Mapped[str] = mapped_column(Text, default="")


class CatalogState(Base):
    """Key/value state: ``revision`` (bumped by every change, compared by derived indexes)."""

    __tablename__ = "catalog_state"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
