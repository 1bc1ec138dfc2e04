"""The database handle: one engine, durable settings, read and write transactions.

SQLite runs in WAL mode with ``synchronous=FULL`` (a commit is fsynced before it
returns), foreign keys on and a busy timeout. Write transactions open with
``BEGIN IMMEDIATE`` and are serialised by a process-wide lock, so writers queue in
Python instead of spinning in SQLite's busy handler; readers never wait for writers.
PostgreSQL runs with ``synchronous_commit=on``; its writers run concurrently and use
row locks (``FOR UPDATE SKIP LOCKED``) where they compete.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool


class Database:
    """One engine plus the transaction helpers every service uses."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = make_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        self._write_lock = threading.Lock() if self.is_sqlite else None
        kwargs: dict[str, Any] = {"echo": echo}
        if self.is_sqlite:
            if self.url.database and self.url.database != ":memory:":
                Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs.update(pool_size=10, max_overflow=20, pool_pre_ping=True)
        self.engine: Engine = create_engine(self.url, **kwargs)
        if self.is_sqlite:
            _configure_sqlite(self.engine)
        else:
            _configure_postgres(self.engine)

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read transaction (deferred on SQLite: sees one consistent snapshot)."""
        with self.engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction, committed durably when the block exits cleanly.

        On SQLite the process-wide write lock is held for the whole transaction.
        """
        txn = self.begin_write()
        try:
            yield txn.conn
        except BaseException:
            txn.finish(commit=False)
            raise
        txn.finish(commit=True)

    def try_begin_write(self) -> WriteTransaction | None:
        """:meth:`begin_write` if the process write lock is free right now, else None."""
        if self._write_lock is not None and not self._write_lock.acquire(blocking=False):
            return None
        return self._begin_locked()

    def begin_write(self) -> WriteTransaction:
        """An open write transaction that the caller must :meth:`~WriteTransaction.finish`.

        For callers that start, use and finish a transaction on different threads (the
        loop committer); everything else uses :meth:`write`.
        """
        if self._write_lock is not None:
            self._write_lock.acquire()
        return self._begin_locked()

    def _begin_locked(self) -> WriteTransaction:
        try:
            conn = self.engine.connect()
            if self._write_lock is not None:
                conn = conn.execution_options(sqlite_begin="IMMEDIATE")
            try:
                conn.begin()
            except BaseException:
                conn.close()
                raise
        except BaseException:
            if self._write_lock is not None:
                self._write_lock.release()
            raise
        return WriteTransaction(conn, self._write_lock)

    def dispose(self) -> None:
        self.engine.dispose()


class WriteTransaction:
    """A write transaction opened by :meth:`Database.begin_write`."""

    def __init__(self, conn: Connection, lock: threading.Lock | None) -> None:
        self.conn = conn
        self._lock = lock

    def finish(self, *, commit: bool) -> None:
        """Commit (durably) or roll back, then release the connection and the lock."""
        try:
            if commit:
                self.conn.commit()
            else:
                self.conn.rollback()
        finally:
            try:
                self.conn.close()
            finally:
                if self._lock is not None:
                    self._lock.release()


def _configure_sqlite(engine: Engine) -> None:
    """Durable pragmas, and take over BEGIN from pysqlite (so SAVEPOINT works and
    writers can ask for BEGIN IMMEDIATE)."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


def _configure_postgres(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        with dbapi_conn.cursor() as cur:
            cur.execute("SET synchronous_commit = on")
        dbapi_conn.commit()


def single_connection_engine(url: str) -> Engine:
    """An engine without pooling, for one-shot tools (migrations, test set-up)."""
    return create_engine(url, poolclass=NullPool)
