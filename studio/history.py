"""History: every generation the studio made, with its exact recipe, its images and its gate heatmap.

One table (``history_generations``, own declarative base, created on the catalog database like the
jobs table) and PNG files under ``config.history_dir/<YYYY-MM-DD>/``. Each PNG carries A1111
``parameters`` and the pinned recipe JSON (``pipelines.pngmeta``), so a downloaded image replays
anywhere. Rows store image paths relative to the history folder, so a data folder can move.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    Engine,
    Float,
    String,
    Text,
    create_engine,
    event,
    func,
    inspect,
    or_,
    select,
)
from sqlalchemy import text as sql_text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from pipelines.pngmeta import pinned_recipe
from pipelines.recipe import MixRecipe


def utcnow() -> datetime:
    """The current time in UTC."""
    return datetime.now(UTC)


class HistoryBase(DeclarativeBase):
    """Declarative base of the history table (separate from the catalog's and the jobs' models)."""


class GenerationRow(HistoryBase):
    """One generation: the recipe that made it and where its images are."""

    __tablename__ = "history_generations"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    owner: Mapped[str] = mapped_column(String(200), default="", index=True)
    kind: Mapped[str] = mapped_column(String(16), default="generate")
    prompt: Mapped[str] = mapped_column(Text, default="")
    negative_prompt: Mapped[str] = mapped_column(Text, default="")
    adapters: Mapped[str] = mapped_column(Text, default="")  # names, for searching
    model: Mapped[str] = mapped_column(Text, default="")
    fusion: Mapped[str] = mapped_column(String(64), default="linear")
    seed: Mapped[int] = mapped_column(BigInteger, default=0)  # up to recipe.MAX_SEED (2^63 - 1)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    recipe_json: Mapped[str] = mapped_column(Text)
    images_json: Mapped[str] = mapped_column(Text)  # paths relative to the history folder
    heatmap: Mapped[str | None] = mapped_column(Text, nullable=True)


@dataclass(frozen=True)
class HistoryEntry:
    """A generation as the UI sees it (absolute paths, the recipe parsed)."""

    id: str
    created_at: datetime
    owner: str
    kind: str
    recipe: MixRecipe
    images: tuple[Path, ...]
    heatmap: Path | None
    seconds: float

    @property
    def prompt(self) -> str:
        """The prompt of the recipe."""
        return self.recipe.prompt

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """Names of the adapters of the mix."""
        return tuple(a.label for a in self.recipe.adapters)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    """Wait for locks instead of failing (the catalog and the jobs write to the same file)."""
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def make_engine(url: str) -> Engine:
    """An engine on the catalog URL with the history table created (idempotent)."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    HistoryBase.metadata.create_all(engine)
    _widen_seed(engine)
    return engine


def _widen_seed(engine: Engine) -> None:
    """Widen the ``seed`` column of a table made when it was a 32-bit INTEGER (PostgreSQL, MySQL), which
    refused every seed from 2^31 on, half of the random ones. SQLite's INTEGER is 64-bit already."""
    if engine.dialect.name not in ("postgresql", "mysql", "mariadb"):
        return
    columns = {c["name"]: c["type"] for c in inspect(engine).get_columns(GenerationRow.__tablename__)}
    if isinstance(columns.get("seed"), BigInteger):
        return
    table = GenerationRow.__tablename__
    alter = (
        f"ALTER TABLE {table} ALTER COLUMN seed TYPE BIGINT"
        if engine.dialect.name == "postgresql"
        else f"ALTER TABLE {table} MODIFY seed BIGINT NOT NULL"
    )
    with engine.begin() as conn:
        conn.execute(sql_text(alter))


class HistoryStore:
    """Record generations, list and search them, read one back."""

    def __init__(self, url: str, root: Path) -> None:
        self.root = Path(root)
        self.engine = make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    def record(
        self, generation: Any, *, owner: str = "", heatmap: Any = None, kind: str = "generate"
    ) -> HistoryEntry:
        """Save a :class:`~pipelines.engine.Generation`'s images (recipe embedded) and its row."""
        entry_id = uuid.uuid4().hex
        created = utcnow()
        folder = self.root / created.strftime("%Y-%m-%d")
        images = [generation.save(folder / f"{entry_id}-{i}.png", i) for i in range(len(generation.images))]
        heat_path = None
        if heatmap is not None:
            heat_path = folder / f"{entry_id}-gates.png"
            heatmap.save(heat_path, format="PNG")
        recipe = pinned_recipe(generation.recipe, generation.adapter_hashes)
        row = GenerationRow(
            id=entry_id,
            created_at=created,
            owner=owner,
            kind=kind,
            prompt=recipe.prompt,
            negative_prompt=recipe.negative_prompt,
            adapters=" ".join(a.label for a in recipe.adapters),
            model=recipe.model,
            fusion=recipe.fusion,
            seed=recipe.seed,
            seconds=float(generation.seconds),
            recipe_json=recipe.to_json(),
            images_json=json.dumps([self._relative(p) for p in images]),
            heatmap=None if heat_path is None else self._relative(heat_path),
        )
        with self.sessions() as s, s.begin():
            s.add(row)
        return self._entry(row)

    def get(self, entry_id: str, owner: str | None = None) -> HistoryEntry:
        """One generation (``owner`` given: only if it belongs to that owner)."""
        with self.sessions() as s:
            row = s.get(GenerationRow, str(entry_id).strip())
        if row is None or (owner is not None and row.owner != owner):
            raise KeyError(f"no generation {entry_id!r} in the history")
        return self._entry(row)

    def search(
        self, text: str = "", *, owner: str | None = None, limit: int = 20, offset: int = 0
    ) -> tuple[list[HistoryEntry], int]:
        """Newest first; every word of ``text`` must occur in the prompt, negative prompt, adapter names,
        fusion policy or model (case-insensitive). Returns (entries, total matches)."""
        conds = [self._word(w) for w in text.split()]
        if owner is not None:
            conds.append(GenerationRow.owner == owner)
        with self.sessions() as s:
            total = s.scalar(select(func.count(GenerationRow.id)).where(*conds)) or 0
            rows = s.scalars(
                select(GenerationRow)
                .where(*conds)
                .order_by(GenerationRow.created_at.desc(), GenerationRow.id)
                .offset(max(0, offset))
                .limit(max(1, limit))
            ).all()
        return [self._entry(r) for r in rows], int(total)

    @staticmethod
    def _word(word: str) -> Any:
        escaped = word.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        pattern = f"%{escaped}%"
        cols = (
            GenerationRow.prompt,
            GenerationRow.negative_prompt,
            GenerationRow.adapters,
            GenerationRow.fusion,
            GenerationRow.model,
        )
        return or_(*(func.lower(c).like(pattern, escape="\\") for c in cols))

    def _relative(self, path: Path) -> str:
        return str(Path(path).resolve().relative_to(self.root.resolve()))

    def _entry(self, row: GenerationRow) -> HistoryEntry:
        images: Sequence[str] = json.loads(row.images_json)
        created = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC)  # SQLite
        return HistoryEntry(
            id=row.id,
            created_at=created,
            owner=row.owner,
            kind=row.kind,
            recipe=MixRecipe.from_json(row.recipe_json),
            images=tuple(self.root / p for p in images),
            heatmap=None if row.heatmap is None else self.root / row.heatmap,
            seconds=row.seconds,
        )

    def dispose(self) -> None:
        """Close the connection pool."""
        self.engine.dispose()
