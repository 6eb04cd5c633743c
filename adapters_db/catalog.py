"""The catalog handle: database engine + session factory + file store + derived search indexes.

``open_catalog(url, data_dir)`` connects (SQLite file by default, any SQLAlchemy URL such as
PostgreSQL for shared deployments), creates or upgrades the schema with Alembic, and returns a
:class:`Catalog`. The caller owns sessions: ``with catalog.session() as s: ...`` commits on success
and rolls back on error; repository functions take that session.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from adapters_db.models import CatalogState
from adapters_db.store import FileStore

if TYPE_CHECKING:
    from adapters_db.embedders import Embedder
    from adapters_db.search_index import SearchIndex

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
log = logging.getLogger(__name__)
READ_ONLY_SQLSTATES = ("25006", "42501")  # PostgreSQL: read-only transaction, insufficient privilege


def is_read_only_error(exc: BaseException) -> bool:
    """Whether a database error says the catalog cannot be written (read-only file, role or transaction)."""
    if not isinstance(exc, DBAPIError):
        return False
    code = getattr(exc.orig, "pgcode", None) or getattr(exc.orig, "sqlstate", None)
    return code in READ_ONLY_SQLSTATES or "readonly database" in str(exc.orig).lower()


def default_url(data_dir: Path) -> str:
    """The embedded default: a SQLite file ``catalog.sqlite`` in the data directory."""
    return f"sqlite:///{Path(data_dir) / 'catalog.sqlite'}"


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA mmap_size=268435456")  # read through a 256 MiB map, not a read() call per page
    cur.close()


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets foreign keys, WAL and a busy timeout on every connection."""
    try:
        if url.startswith("sqlite"):
            if url in ("sqlite://", "sqlite:///:memory:"):
                raise ValueError("an in-memory SQLite catalog cannot be shared between sessions; use a file")
            engine = create_engine(url, poolclass=NullPool)
            event.listen(engine, "connect", _sqlite_pragmas)
            return engine
        return create_engine(url, pool_pre_ping=True)
    except ArgumentError as exc:  # a malformed URL or an unknown dialect (SQLAlchemy masks the password)
        raise ValueError(f"bad catalog URL: {exc}") from None


def migrate(engine: Engine) -> None:
    """Create or upgrade the schema to the newest Alembic revision."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    url = engine.url.render_as_string(hide_password=False)
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))  # ConfigParser interpolates "%"
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


class Catalog:
    """Engine, session factory, file store and (lazily) the embedder and search indexes."""

    def __init__(self, url: str, data_dir: Path, *, embedder: Embedder | str | None = None) -> None:
        self.url = url
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.engine = make_engine(url)
        self.session_factory = sessionmaker(self.engine, expire_on_commit=False)
        self.store = FileStore(self.data_dir / "files")
        self.index_dir = self.data_dir / "index"
        self._embedder_spec = embedder
        self._embedder: Embedder | None = None
        self._search_index: SearchIndex | None = None
        self.weight_encoder: Path | None = None  # WeightEncoder checkpoint (adapters_db.weightspace)
        self._lock = threading.RLock()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits when the block ends normally and rolls back on an exception."""
        with self.session_factory() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql`` (or another SQLAlchemy dialect name)."""
        return self.engine.dialect.name

    @property
    def embedder(self) -> Embedder:
        """The embedder (built on first use: the one given, else the best one available offline)."""
        with self._lock:
            if self._embedder is None:
                from adapters_db.embedders import resolve_embedder

                self._embedder = resolve_embedder(self._embedder_spec)
            return self._embedder

    def set_embedder(self, embedder: Embedder) -> None:
        """Switch embedder (the search indexes follow: vectors of another embedder are not mixed)."""
        with self._lock:
            self._embedder = embedder
            self._search_index = None

    def search_index(self, session: Session, *, show_progress: bool = False) -> SearchIndex:
        """Derived search indexes, loaded from disk or rebuilt when missing, stale or of another embedder.

        Before a rebuild, vectors missing for this embedder are computed inside ``session``.
        """
        from adapters_db.search_index import SearchIndex
        from adapters_db.vectors import embed_missing
        from adapters_db.weightspace import embed_weight_channels

        with self._lock:
            if self._search_index is None:
                self._search_index = SearchIndex(self.index_dir, self.embedder)
            index = self._search_index
            if not index.is_current(session) and not index.try_load(session):
                try:
                    with session.begin_nested():
                        embed_missing(self, self.embedder, session=session, show_progress=show_progress)
                        embed_weight_channels(self, session, self.embedder)
                except DBAPIError as exc:
                    if not is_read_only_error(exc):
                        raise
                    log.warning("read-only catalog: the search index is built from the vectors stored")
                index.rebuild(session, show_progress=show_progress)
            return index

    def revision(self, session: Session) -> int:
        """The catalog revision (bumped by every change; derived indexes compare against it)."""
        row = session.get(CatalogState, "revision")
        return int(row.value) if row is not None else 0

    def dispose(self) -> None:
        """Close the connection pool."""
        self.engine.dispose()


def bump_revision(session: Session) -> int:
    """Increment the catalog revision inside the caller's transaction; returns the new value."""
    row = session.execute(
        select(CatalogState).where(CatalogState.key == "revision").with_for_update()
    ).scalar_one_or_none()
    if row is None:
        row = CatalogState(key="revision", value="0")
        session.add(row)
    row.value = str(int(row.value) + 1)
    session.flush()
    return int(row.value)


def open_catalog(url: str | None, data_dir: Path, *, embedder: Embedder | str | None = None) -> Catalog:
    """Open (and create or migrate) the catalog at ``url`` (default: SQLite file in ``data_dir``)."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    catalog = Catalog(url or default_url(data_dir), data_dir, embedder=embedder)
    migrate(catalog.engine)
    return catalog
