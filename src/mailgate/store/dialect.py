"""The few statements whose SQL differs between SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Table
from sqlalchemy.dialects import postgresql, sqlite


def insert_ignoring_conflicts(
    conn: Connection, table: Table, rows: Sequence[dict[str, Any]]
) -> None:
    """``INSERT ... ON CONFLICT DO NOTHING``: for rows another writer may add first."""
    if not rows:
        return
    module = sqlite if conn.dialect.name == "sqlite" else postgresql
    conn.execute(module.insert(table).on_conflict_do_nothing(), list(rows))
