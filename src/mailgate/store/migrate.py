"""Schema migrations (Alembic), run programmatically.

``mailgate migrate`` upgrades to head; ``mailgate serve`` checks first and refuses to
start on a database that is behind (unless ``--migrate``).
"""

from __future__ import annotations

import functools
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from mailgate.errors import DatabaseNotMigrated
from mailgate.store.db import Database

_SCRIPTS = Path(__file__).parent / "migrations"


def _config(db: Database) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_SCRIPTS))
    cfg.set_main_option("sqlalchemy.url", db.url.render_as_string(hide_password=False))
    return cfg


def head_revision() -> str | None:
    """The newest revision the code knows (read once: scripts do not change at run time)."""
    return _head()


@functools.cache
def _head() -> str | None:
    cfg = Config()
    cfg.set_main_option("script_location", str(_SCRIPTS))
    return ScriptDirectory.from_config(cfg).get_current_head()


def current_revision(db: Database) -> str | None:
    with db.engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(db: Database) -> str | None:
    """Upgrade the database to the newest schema; returns the revision now in force."""
    cfg = _config(db)
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    return current_revision(db)


def ensure_migrated(db: Database) -> None:
    """Raises:
    DatabaseNotMigrated: the database is empty or behind the code's schema.
    """
    current, head = current_revision(db), head_revision()
    if current != head:
        where = "empty" if current is None else f"at revision {current}"
        raise DatabaseNotMigrated(
            f"database is {where}, code needs {head}: run `mailgate migrate` "
            "(or `mailgate serve --migrate`)"
        )
