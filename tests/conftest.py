"""Shared fixtures: real databases (SQLite always, PostgreSQL when reachable).

Every test starts on an empty, migrated database and never sees another test's rows.
Migrating costs ~0.14 s (Alembic, fsynced), so it happens once per session per
backend: SQLite tests get a copy of a migrated template file, PostgreSQL tests share
one migrated database emptied before each test. Without a reachable PostgreSQL server
its tests skip with a loud reason, except under ``CI=true`` where that is a failure.
"""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest

from mailgate.config import Settings, load_settings
from mailgate.runtime import Runtime
from mailgate.store import migrate
from mailgate.store.db import Database
from mailgate.store.schema import metadata

# Tests never reach the internet, DNS included: sender authentication is off unless a
# test turns it on with its own loopback DNS server (mailgate.testing.dns). Set in the
# environment so that gateways started as subprocesses inherit it too.
os.environ["MAILGATE_SENDER_AUTH"] = "false"

PG_ADMIN_URL = os.environ.get(
    "MAILGATE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"


def _pg_reachable() -> str | None:
    """None when PostgreSQL answers, else the reason it does not."""
    import psycopg

    dsn = PG_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
    try:
        with psycopg.connect(dsn, connect_timeout=3) as conn:
            conn.execute("select 1")
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".strip()
    return None


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """Name of a migrated database this session's PostgreSQL tests share (created once)."""
    reason = _pg_reachable()
    if reason is not None:
        message = f"PostgreSQL not reachable at {PG_ADMIN_URL}: {reason}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message} (required under CI=true)")
        pytest.skip(f"!!! SKIPPING POSTGRESQL TESTS !!! {message}")
    name = f"mg_test_{uuid.uuid4().hex[:10]}"
    _admin(f'CREATE DATABASE "{name}"')
    db = Database(_url_for(name))
    migrate.upgrade(db)
    db.dispose()
    yield name
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _url_for(name: str) -> str:
    base, _, _ = PG_ADMIN_URL.rpartition("/")
    return f"{base}/{name}"


def _admin(sql: str, database: str | None = None) -> None:
    import psycopg

    dsn = PG_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
    if database is not None:
        dsn = dsn.rpartition("/")[0] + f"/{database}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql)


_EMPTY = "; ".join(
    [f'DELETE FROM "{t.name}"' for t in reversed(metadata.sorted_tables)]
    + [
        f"SELECT setval(pg_get_serial_sequence('{t.name}', 'seq'), 1, false)"
        for t in metadata.sorted_tables
        if "seq" in t.c and t.c.seq.primary_key
    ]
)
"""Every table emptied (dependents first) and every ``seq`` counter restarted, in one
transaction: ~5 ms, where TRUNCATE (new files, an fsync each) took ~90 ms."""


@pytest.fixture
def pg_url(pg_database: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """The session's migrated PostgreSQL database, emptied for this test.

    Emptying every table instead of a database per test: copying a template costs
    ~0.5 s (a checkpoint), which at ~1,500 PostgreSQL tests was most of the suite's
    time. A test marked ``breaks_schema`` (it drops a table to make the
    store fail) gets a copy of its own instead.
    """
    if request.node.get_closest_marker("breaks_schema") is None:
        _admin(f"BEGIN; {_EMPTY}; COMMIT", pg_database)
        yield _url_for(pg_database)
        return
    _admin(f"BEGIN; {_EMPTY}; COMMIT", pg_database)
    name = f"mg_scratch_{uuid.uuid4().hex[:12]}"
    _admin(f'CREATE DATABASE "{name}" TEMPLATE "{pg_database}"')
    yield _url_for(name)
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite database file, made once per session, that tests copy."""
    path = tmp_path_factory.mktemp("sqlite-template") / "mailgate.db"
    db = Database(f"sqlite:///{path}")
    migrate.upgrade(db)
    db.dispose()
    return path


@pytest.fixture
def sqlite_url(tmp_path: Path, sqlite_template: Path) -> str:
    """A fresh migrated SQLite database: an online backup of the template (consistent
    whatever state its WAL is in), ~2 ms instead of migrating again."""
    path = tmp_path / "mailgate.db"
    with (
        closing(sqlite3.connect(sqlite_template)) as source,
        closing(sqlite3.connect(path)) as target,
    ):
        source.backup(target)
    return f"sqlite:///{path}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> str:
    """Each test using this runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return load_settings(data_dir=tmp_path, database_url=database_url)


@pytest.fixture
def db(settings: Settings) -> Iterator[Database]:
    database = Database(settings.effective_database_url)
    yield database
    database.dispose()


@pytest.fixture
def runtime(settings: Settings) -> Iterator[Runtime]:
    """The whole service graph on this test's database (group commit on, as in serve)."""
    rt = Runtime.build(settings)
    yield rt
    rt.close()


@dataclass(frozen=True)
class AgentHandle:
    """A workspace with one agent, and the keys to act as either."""

    workspace_id: str
    owner_key: str
    agent_id: str
    address: str
    agent_key: str


def make_agent(runtime: Runtime, name: str = "support bot", workspace: str = "acme") -> AgentHandle:
    ws = runtime.tenancy.create_workspace(workspace)
    agent = runtime.tenancy.create_agent(ws.workspace_id, name)
    return AgentHandle(
        ws.workspace_id, ws.owner_api_key, agent.agent_id, agent.address, agent.api_key
    )


@pytest.fixture
def agent(runtime: Runtime) -> AgentHandle:
    return make_agent(runtime)
