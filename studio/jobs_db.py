"""The training-job table (SQLAlchemy 2.0): its own declarative base, created on the catalog database."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, Engine, Float, Integer, String, Text, create_engine, event, inspect, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

STATUSES = ("queued", "running", "done", "failed", "cancelled")
ACTIVE = ("queued", "running")


def utcnow() -> datetime:
    """The current time in UTC (naive values are never stored)."""
    return datetime.now(UTC)


class JobsBase(DeclarativeBase):
    """Declarative base of the jobs tables (separate from the catalog's models)."""


class TrainJobRow(JobsBase):
    """One training job: what to train, where it stands, and how it ended."""

    __tablename__ = "train_jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), index=True, default="queued")
    device: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(Text)
    spec_json: Mapped[str] = mapped_column(Text)
    images_json: Mapped[str] = mapped_column(
        Text
    )  # [{"path", "caption", "name", "sha256", "repeats", "dataset"}]
    work_dir: Mapped[str] = mapped_column(Text)
    out_path: Mapped[str] = mapped_column(Text)
    register: Mapped[int] = mapped_column(Integer, default=1)
    phase: Mapped[str] = mapped_column(String(32), default="")
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer, default=0)
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    eta_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    sample_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    adapter_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # the process running it: "host:pid:start-token:runner-token" (set when it starts running)
    owner: Mapped[str | None] = mapped_column(String(300), nullable=True)
    # who started it in a studio run with --auth (None: the CLI, or a studio without --auth)
    user: Mapped[str | None] = mapped_column("user_name", String(200), nullable=True)
    # 1 when another process asked the running job to stop (its owner polls this with each progress write)
    cancel_requested: Mapped[int | None] = mapped_column(Integer, nullable=True, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    """Wait for locks instead of failing at once; WAL lets the UI read while a job writes."""
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.close()


def make_engine(url: str) -> Engine:
    """An engine on the catalog URL with the jobs tables created (idempotent)."""
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    JobsBase.metadata.create_all(engine)
    _add_missing_columns(engine)
    return engine


def _add_missing_columns(engine: Engine) -> None:
    """Bring a table made by an older version up to date (columns added since are nullable)."""
    have = {c["name"] for c in inspect(engine).get_columns(TrainJobRow.__tablename__)}
    for column in TrainJobRow.__table__.columns:
        if column.name not in have:
            kind = column.type.compile(dialect=engine.dialect)
            with contextlib.suppress(DBAPIError), engine.begin() as conn:  # another process may win
                conn.execute(text(f"ALTER TABLE {TrainJobRow.__tablename__} ADD COLUMN {column.name} {kind}"))


def make_sessionmaker(engine: Engine) -> sessionmaker:
    """Sessions that keep attribute values after commit (rows are copied into DTOs anyway)."""
    return sessionmaker(engine, expire_on_commit=False)
