"""Initial catalog schema, with the database's full-text index over search_documents.

SQLite: an FTS5 external-content table ``adapter_fts`` kept in sync by triggers.
PostgreSQL: a generated, weighted ``tsv`` tsvector column with a GIN index.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

SQLITE_FTS = [
    "CREATE VIRTUAL TABLE adapter_fts USING fts5(name, tags, triggers, files, description, "
    "content='search_documents', content_rowid='adapter_id', tokenize='unicode61 remove_diacritics 2')",
    "CREATE TRIGGER search_documents_ai AFTER INSERT ON search_documents BEGIN "
    "INSERT INTO adapter_fts(rowid, name, tags, triggers, files, description) "
    "VALUES (new.adapter_id, new.name, new.tags, new.triggers, new.files, new.description); END",
    "CREATE TRIGGER search_documents_ad AFTER DELETE ON search_documents BEGIN "
    "INSERT INTO adapter_fts(adapter_fts, rowid, name, tags, triggers, files, description) "
    "VALUES ('delete', old.adapter_id, old.name, old.tags, old.triggers, old.files, old.description); END",
    "CREATE TRIGGER search_documents_au AFTER UPDATE ON search_documents BEGIN "
    "INSERT INTO adapter_fts(adapter_fts, rowid, name, tags, triggers, files, description) "
    "VALUES ('delete', old.adapter_id, old.name, old.tags, old.triggers, old.files, old.description); "
    "INSERT INTO adapter_fts(rowid, name, tags, triggers, files, description) "
    "VALUES (new.adapter_id, new.name, new.tags, new.triggers, new.files, new.description); END",
]

# Weights: name and trigger words A, tags and file names B, description C (ts_rank's {D, C, B, A}).
POSTGRES_FTS = [
    "ALTER TABLE search_documents ADD COLUMN tsv tsvector GENERATED ALWAYS AS ("
    "setweight(to_tsvector('simple', coalesce(name, '')), 'A') || "
    "setweight(to_tsvector('simple', coalesce(triggers, '')), 'A') || "
    "setweight(to_tsvector('simple', coalesce(tags, '')), 'B') || "
    "setweight(to_tsvector('simple', coalesce(files, '')), 'B') || "
    "setweight(to_tsvector('simple', left(coalesce(description, ''), 200000)), 'C')) STORED",
    "CREATE INDEX ix_search_documents_tsv ON search_documents USING gin (tsv)",
]


def upgrade() -> None:
    """Create every table, then the dialect's full-text index."""
    op.create_table(
        "adapters",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=400), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.Column("description_html", sa.Text(), nullable=False),
        sa.Column("description_text", sa.Text(), nullable=False),
        sa.Column("base_family", sa.String(length=16), nullable=True),
        sa.Column("base_model", sa.String(length=64), nullable=True),
        sa.Column("nsfw_level", sa.Integer(), nullable=False),
        sa.Column("creator", sa.String(length=200), nullable=True),
        sa.Column("civitai_model_id", sa.BigInteger(), nullable=True),
        sa.Column("hf_repo", sa.String(length=300), nullable=True),
        sa.Column("source_url", sa.String(length=1000), nullable=True),
        sa.Column("license", sa.String(length=100), nullable=True),
        sa.Column("allow_no_credit", sa.Boolean(), nullable=True),
        sa.Column("allow_commercial_use", sa.String(length=100), nullable=True),
        sa.Column("allow_derivatives", sa.Boolean(), nullable=True),
        sa.Column("allow_different_license", sa.Boolean(), nullable=True),
        sa.Column("poi", sa.Boolean(), nullable=False),
        sa.Column("download_count", sa.BigInteger(), nullable=False),
        sa.Column("favorite_count", sa.BigInteger(), nullable=False),
        sa.Column("comment_count", sa.BigInteger(), nullable=False),
        sa.Column("rating_count", sa.BigInteger(), nullable=False),
        sa.Column("rating", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("extra", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adapters")),
        sa.UniqueConstraint("civitai_model_id", name=op.f("uq_adapters_civitai_model_id")),
    )
    op.create_index(op.f("ix_adapters_base_family"), "adapters", ["base_family"], unique=False)
    op.create_index(op.f("ix_adapters_created_at"), "adapters", ["created_at"], unique=False)
    op.create_index(op.f("ix_adapters_download_count"), "adapters", ["download_count"], unique=False)
    op.create_index(op.f("ix_adapters_nsfw_level"), "adapters", ["nsfw_level"], unique=False)
    op.create_index(op.f("ix_adapters_rating"), "adapters", ["rating"], unique=False)
    op.create_index(op.f("ix_adapters_source"), "adapters", ["source"], unique=False)
    op.create_table(
        "catalog_state",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_catalog_state")),
    )
    op.create_table(
        "tags",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tags")),
        sa.UniqueConstraint("name", name=op.f("uq_tags_name")),
    )
    op.create_table(
        "adapter_tags",
        sa.Column("adapter_id", sa.Integer(), nullable=False),
        sa.Column("tag_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["adapter_id"],
            ["adapters.id"],
            name=op.f("fk_adapter_tags_adapter_id_adapters"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["tag_id"], ["tags.id"], name=op.f("fk_adapter_tags_tag_id_tags"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("adapter_id", "tag_id", name=op.f("pk_adapter_tags")),
    )
    op.create_index(op.f("ix_adapter_tags_tag_id"), "adapter_tags", ["tag_id"], unique=False)
    op.create_table(
        "adapter_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("adapter_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=400), nullable=False),
        sa.Column("civitai_version_id", sa.BigInteger(), nullable=True),
        sa.Column("base_model", sa.String(length=64), nullable=True),
        sa.Column("base_family", sa.String(length=16), nullable=True),
        sa.Column("description_html", sa.Text(), nullable=False),
        sa.Column("download_url", sa.String(length=1000), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("download_count", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["adapter_id"],
            ["adapters.id"],
            name=op.f("fk_adapter_versions_adapter_id_adapters"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adapter_versions")),
        sa.UniqueConstraint("civitai_version_id", name=op.f("uq_adapter_versions_civitai_version_id")),
    )
    op.create_index(op.f("ix_adapter_versions_adapter_id"), "adapter_versions", ["adapter_id"], unique=False)
    op.create_table(
        "search_documents",
        sa.Column("adapter_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("tags", sa.Text(), nullable=False),
        sa.Column("triggers", sa.Text(), nullable=False),
        sa.Column("files", sa.Text(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["adapter_id"],
            ["adapters.id"],
            name=op.f("fk_search_documents_adapter_id_adapters"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("adapter_id", name=op.f("pk_search_documents")),
    )
    op.create_table(
        "adapter_files",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("file_name", sa.String(length=500), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=True),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.Column("autov2", sa.String(length=10), nullable=True),
        sa.Column("hashes", sa.JSON(), nullable=False),
        sa.Column("format", sa.String(length=32), nullable=True),
        sa.Column("primary", sa.Boolean(), nullable=False),
        sa.Column("remote_url", sa.String(length=1000), nullable=True),
        sa.Column("stored", sa.Boolean(), nullable=False),
        sa.Column("header_metadata", sa.JSON(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=True),
        sa.Column("num_modules", sa.Integer(), nullable=True),
        sa.Column("components", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["adapter_versions.id"],
            name=op.f("fk_adapter_files_version_id_adapter_versions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adapter_files")),
    )
    op.create_index(op.f("ix_adapter_files_autov2"), "adapter_files", ["autov2"], unique=False)
    op.create_index(op.f("ix_adapter_files_sha256"), "adapter_files", ["sha256"], unique=False)
    op.create_index(op.f("ix_adapter_files_version_id"), "adapter_files", ["version_id"], unique=False)
    op.create_table(
        "preview_images",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("adapter_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("civitai_image_id", sa.BigInteger(), nullable=True),
        sa.Column("url", sa.String(length=1000), nullable=True),
        sa.Column("local_sha256", sa.String(length=64), nullable=True),
        sa.Column("local_ext", sa.String(length=8), nullable=True),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("nsfw_level", sa.Integer(), nullable=False),
        sa.Column("blurhash", sa.String(length=100), nullable=True),
        sa.Column("prompt", sa.Text(), nullable=True),
        sa.Column("negative_prompt", sa.Text(), nullable=True),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.ForeignKeyConstraint(
            ["adapter_id"],
            ["adapters.id"],
            name=op.f("fk_preview_images_adapter_id_adapters"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["adapter_versions.id"],
            name=op.f("fk_preview_images_version_id_adapter_versions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_preview_images")),
    )
    op.create_index(op.f("ix_preview_images_adapter_id"), "preview_images", ["adapter_id"], unique=False)
    op.create_index(
        op.f("ix_preview_images_civitai_image_id"), "preview_images", ["civitai_image_id"], unique=False
    )
    op.create_index(op.f("ix_preview_images_version_id"), "preview_images", ["version_id"], unique=False)
    op.create_table(
        "trigger_words",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("adapter_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("word", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["adapter_id"],
            ["adapters.id"],
            name=op.f("fk_trigger_words_adapter_id_adapters"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["adapter_versions.id"],
            name=op.f("fk_trigger_words_version_id_adapter_versions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_trigger_words")),
    )
    op.create_index(op.f("ix_trigger_words_adapter_id"), "trigger_words", ["adapter_id"], unique=False)
    op.create_index(op.f("ix_trigger_words_version_id"), "trigger_words", ["version_id"], unique=False)
    op.create_table(
        "embeddings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("adapter_id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=True),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("embedder", sa.String(length=200), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["adapter_id"],
            ["adapters.id"],
            name=op.f("fk_embeddings_adapter_id_adapters"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["image_id"],
            ["preview_images.id"],
            name=op.f("fk_embeddings_image_id_preview_images"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_embeddings")),
    )
    op.create_index(op.f("ix_embeddings_adapter_id"), "embeddings", ["adapter_id"], unique=False)
    op.create_index("ix_embeddings_embedder_channel", "embeddings", ["embedder", "channel"], unique=False)
    op.create_index(op.f("ix_embeddings_image_id"), "embeddings", ["image_id"], unique=False)
    op.execute("INSERT INTO catalog_state (key, value) VALUES ('revision', '0')")
    dialect = op.get_bind().dialect.name
    statements = {"sqlite": SQLITE_FTS, "postgresql": POSTGRES_FTS}.get(dialect, [])
    for statement in statements:
        op.execute(statement)


def downgrade() -> None:
    """Drop everything ``upgrade`` created."""
    if op.get_bind().dialect.name == "sqlite":
        for name in ("search_documents_ai", "search_documents_ad", "search_documents_au"):
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
        op.execute("DROP TABLE IF EXISTS adapter_fts")
    for table in (
        "embeddings",
        "trigger_words",
        "preview_images",
        "adapter_files",
        "search_documents",
        "adapter_versions",
        "adapter_tags",
        "tags",
        "catalog_state",
        "adapters",
    ):
        op.drop_table(table)
