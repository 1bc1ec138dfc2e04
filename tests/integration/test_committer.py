"""Group commit: jobs share a transaction but fail alone, and resolve after commit."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future
from datetime import UTC, datetime

import pytest
from sqlalchemy import Connection, func, select
from sqlalchemy.exc import IntegrityError

from mailgate.store.committer import BatchJob, GroupCommitter, LoopGroupCommitter, run_jobs
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


@pytest.mark.anyio
async def test_the_loop_committer_runs_jobs_on_the_loop_and_isolates_a_failure(
    sqlite_url: str,
) -> None:
    db = Database(sqlite_url)
    committer = LoopGroupCommitter(db, max_batch=8)
    await committer.attach()
    try:
        loop_thread = threading.get_ident()
        ran_on: list[int] = []

        def job(name: str) -> Callable[[Connection], str]:
            insert = _insert(name)

            def run(conn: Connection) -> str:
                ran_on.append(threading.get_ident())
                return insert(conn)

            return run

        ok = committer.submit(job("ws_1"))
        dup = committer.submit(job("ws_1"))
        # A submission from another thread (a sync route in the threadpool) still works.
        other = await asyncio.to_thread(committer.submit, job("ws_2"))
        assert await asyncio.wrap_future(ok) == "ws_1"
        assert await asyncio.wrap_future(other) == "ws_2"
        with pytest.raises(IntegrityError):
            await asyncio.wrap_future(dup)
        assert loop_thread in ran_on
    finally:
        await committer.detach()
        committer.stop()
    with db.read() as conn:
        assert conn.execute(select(func.count()).select_from(workspaces)).scalar_one() == 2
    db.dispose()


@pytest.mark.anyio
async def test_detaching_the_loop_committer_finishes_queued_jobs(sqlite_url: str) -> None:
    db = Database(sqlite_url)
    committer = LoopGroupCommitter(db, max_batch=4)
    await committer.attach()
    futures = [committer.submit(_insert(f"ws_{i}")) for i in range(10)]
    await committer.detach()
    committer.stop()
    assert all(f.done() and f.exception() is None for f in futures)
    db.dispose()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_consecutive_batch_jobs_run_in_one_call_and_keep_their_order(db: Database) -> None:
    calls: list[list[int]] = []

    def runner(conn: Connection, payloads: list[int]) -> list[int]:
        calls.append(payloads)
        return [p * 10 for p in payloads]

    def single(p: int) -> Callable[[Connection], int]:
        return lambda conn: runner(conn, [p])[0]

    jobs: list[Callable[[Connection], object]] = [
        BatchJob(runner, 1, single(1)),
        BatchJob(runner, 2, single(2)),
        lambda conn: "plain",
        BatchJob(runner, 3, single(3)),
    ]
    with db.write() as conn:
        assert run_jobs(conn, jobs) == [10, 20, "plain", 30]
    assert calls == [[1, 2], [3]]
