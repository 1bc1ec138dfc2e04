"""The few statements whose SQL differs between SQLite and PostgreSQL."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Executable, Table
from sqlalchemy.dialects import postgresql, sqlite


def insert_ignoring_conflicts(
    conn: Connection, table: Table, rows: Sequence[dict[str, Any]]
) -> None:
    """``INSERT ... ON CONFLICT DO NOTHING``: for rows another writer may add first."""
    if rows:
        conn.execute(_insert_ignore(table, conn.dialect.name), list(rows))


@functools.cache
def _insert_ignore(table: Table, dialect: str) -> Executable:
    """Built once per table and backend: statement construction is the costly part."""
    if dialect == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing()
    return postgresql.insert(table).on_conflict_do_nothing()
