"""Alembic migrations of the catalog schema (run by ``adapters_db.catalog.migrate``)."""
