"""Group commit: jobs share a transaction but fail alone, and resolve after commit."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from datetime import UTC, datetime

import pytest
from sqlalchemy import Connection, func, select
from sqlalchemy.exc import IntegrityError

from mailgate.store.committer import GroupCommitter
from mailgate.store.db import Database
from mailgate.store.schema import workspaces

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _insert(name: str) -> Callable[[Connection], str]:
    def job(conn: Connection) -> str:
        conn.execute(workspaces.insert().values(id=name, name=name, created_at=NOW))
        return name

    return job


def test_a_failing_job_rolls_back_alone_and_its_batch_mates_commit(db: Database) -> None:
    committer = GroupCommitter(db, max_batch=16)
    futures: list[Future[str]] = []
    try:
        futures.append(committer.submit(_insert("ws_a")))
        futures.append(committer.submit(_insert("ws_a")))  # duplicate key
        futures.append(committer.submit(_insert("ws_b")))
        assert futures[0].result(10) == "ws_a"
        assert futures[2].result(10) == "ws_b"
        with pytest.raises(IntegrityError):
            futures[1].result(10)
    finally:
        committer.stop()
    with db.read() as conn:
        assert conn.execute(select(func.count()).select_from(workspaces)).scalar_one() == 2


def test_stop_finishes_every_queued_job_first(db: Database) -> None:
    committed: list[int] = []
    committer = GroupCommitter(db, max_batch=4, on_commit=lambda: committed.append(1))
    futures = [committer.submit(_insert(f"ws_{i}")) for i in range(20)]
    committer.stop()
    assert all(f.done() and f.exception() is None for f in futures)
    assert 5 <= len(committed) <= 20  # batches of at most four
    with db.read() as conn:
        assert conn.execute(select(func.count()).select_from(workspaces)).scalar_one() == 20
