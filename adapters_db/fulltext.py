"""The database's own full-text search over ``search_documents``: SQLite FTS5 or PostgreSQL tsvector.

Both backends index the same five fields with the same emphasis (name and trigger words first, then
tags and file names, then the description). SQLite ranks with FTS5's ``bm25()`` and column weights,
PostgreSQL with ``ts_rank`` over the A/B/C-weighted ``tsv`` column; queries are built from the
project tokenizer's words (alphanumeric only, so no query syntax can be injected).
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import or_, select, text
from sqlalchemy.orm import Session

from adapters_db.models import SearchDocument
from adapters_db.text import has_cjk, words

# FTS5 bm25 column weights: name, tags, triggers, files, description.
FTS5_WEIGHTS = (4.0, 2.0, 4.0, 2.0, 1.0)
# ts_rank weights {D, C, B, A}: description C, tags/files B, name/triggers A.
PG_WEIGHTS = "{0.05, 0.25, 0.5, 1.0}"
MAX_TERMS = 32


def query_words(query: str, max_terms: int = MAX_TERMS) -> list[str]:
    """Distinct words of a query, in order, at most ``max_terms`` (longest words kept first)."""
    distinct = list(dict.fromkeys(w for w in words(query) if len(w) > 1 or not w.isascii()))
    if len(distinct) <= max_terms:
        return distinct
    keep = set(sorted(distinct, key=len, reverse=True)[:max_terms])
    return [w for w in distinct if w in keep]


def ranked_ids(
    session: Session, query: str, limit: int = 200, *, any_word: bool = True
) -> list[tuple[int, float]]:
    """Adapters matching the query's words (any word, or all words), best first: ``[(id, score)]``.

    Scores are positive, larger is better; their scale depends on the backend (use the order).
    """
    terms = query_words(query)
    if not terms:
        return []
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        return _sqlite(session, terms, limit, any_word)
    if dialect == "postgresql":
        return _postgres(session, terms, limit, any_word)
    raise RuntimeError(f"full-text search is not implemented for the {dialect} dialect")


def _sqlite(session: Session, terms: Sequence[str], limit: int, any_word: bool) -> list[tuple[int, float]]:
    joiner = " OR " if any_word else " AND "
    match = joiner.join(f'"{t}"' for t in terms)
    weights = ", ".join(str(w) for w in FTS5_WEIGHTS)
    rows = session.execute(
        text(
            f"SELECT rowid, -bm25(adapter_fts, {weights}) AS score FROM adapter_fts "
            "WHERE adapter_fts MATCH :match ORDER BY bm25(adapter_fts, " + weights + ") LIMIT :limit"
        ),
        {"match": match, "limit": limit},
    ).all()
    return [(int(r[0]), float(r[1])) for r in rows]


def _postgres(session: Session, terms: Sequence[str], limit: int, any_word: bool) -> list[tuple[int, float]]:
    joiner = " | " if any_word else " & "
    tsquery = joiner.join(f"'{t}'" for t in terms)
    rows = session.execute(
        text(
            "SELECT adapter_id, ts_rank(CAST(:weights AS real[]), tsv, q, 1) AS score "
            "FROM search_documents, to_tsquery('simple', :tsq) AS q WHERE tsv @@ q "
            "ORDER BY score DESC, adapter_id LIMIT :limit"
        ),
        {"weights": PG_WEIGHTS, "tsq": tsquery, "limit": limit},
    ).all()
    return [(int(r[0]), float(r[1])) for r in rows]


def match_all_ids(session: Session, query: str, limit: int = 100_000) -> list[int]:
    """Ids of adapters containing every word of the query (browsing filter). A CJK word (a character
    bigram: the database keeps a CJK run as one token) matches as a substring of any field."""
    terms = query_words(query, max_terms=10_000)
    plain = [t for t in terms if not has_cjk(t)]
    cjk = [t for t in terms if has_cjk(t)]
    ids = [i for i, _ in ranked_ids(session, " ".join(plain), limit, any_word=False)] if plain else None
    if not cjk:
        return ids or []
    doc = SearchDocument
    fields = (doc.name, doc.tags, doc.triggers, doc.files, doc.description)
    conds = [or_(*(f.contains(t, autoescape=True) for f in fields)) for t in cjk]
    if ids is not None:
        conds.append(SearchDocument.adapter_id.in_(ids))
    found = session.execute(select(SearchDocument.adapter_id).where(*conds).limit(limit)).scalars()
    keep = set(found)
    return [i for i in ids if i in keep] if ids is not None else sorted(keep)


def matching_ids(session: Session, words_: list[str], limit: int = 1000) -> list[int]:
    """Adapters containing any of the given words, unranked (the same set on both backends)."""
    terms = [w for w in dict.fromkeys(query_words(" ".join(words_)))]
    if not terms:
        return []
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        sql = "SELECT rowid FROM adapter_fts WHERE adapter_fts MATCH :q LIMIT :limit"
        params = {"q": " OR ".join(f'"{t}"' for t in terms), "limit": limit}
    elif dialect == "postgresql":
        sql = "SELECT adapter_id FROM search_documents WHERE tsv @@ to_tsquery('simple', :q) LIMIT :limit"
        params = {"q": " | ".join(f"'{t}'" for t in terms), "limit": limit}
    else:
        raise RuntimeError(f"full-text search is not implemented for the {dialect} dialect")
    return [int(i) for i in session.execute(text(sql), params).scalars().all()]
