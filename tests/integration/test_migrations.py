"""The migrations and the schema module describe the same database."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from mailgate.store.db import Database
from mailgate.store.schema import metadata


def test_migrated_database_matches_the_schema_module(db: Database) -> None:
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []
