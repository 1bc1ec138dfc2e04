"""Group commit: many write jobs, one transaction, one fsync.

SMTP must not answer ``250`` before the message is durable, and an fsync per message
caps throughput at the disk's sync rate. The :class:`GroupCommitter` runs queued jobs
back to back in one write transaction, commits once, and only then resolves every
job's future. If a job fails, the batch is rolled back and run again with each job in
its own SAVEPOINT, so a failing job rolls back alone and gets its exception. Callers still wait for durability; they just share the fsync.

:class:`DirectCommitter` has the same port and runs each job in its own transaction in
the caller's thread: for the CLI, tests and one-off tools.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol, TypeVar

from sqlalchemy import Connection

from mailgate.store.db import Database

T = TypeVar("T")
Job = Callable[[Connection], Any]
log = logging.getLogger(__name__)


class Committer(Protocol):
    def submit(self, job: Callable[[Connection], T]) -> Future[T]:
        """Run ``job`` in a write transaction; the future resolves after the commit."""
        ...


class DirectCommitter:
    def __init__(self, db: Database, on_commit: Callable[[], None] | None = None) -> None:
        self.db = db
        self.on_commit = on_commit

    def submit(self, job: Callable[[Connection], T]) -> Future[T]:
        future: Future[T] = Future()
        try:
            with self.db.write() as conn:
                result = job(conn)
        except BaseException as exc:
            future.set_exception(exc)
        else:
            future.set_result(result)
            if self.on_commit is not None:
                self.on_commit()
        return future


_STOP = object()


class GroupCommitter:
    """A writer thread that batches jobs into shared transactions."""

    def __init__(
        self,
        db: Database,
        *,
        max_batch: int = 64,
        on_commit: Callable[[], None] | None = None,
    ) -> None:
        self.db = db
        self.max_batch = max_batch
        self.on_commit = on_commit
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
        self._started = False
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if not self._started:
                self._started = True
                self._thread.start()

    def submit(self, job: Callable[[Connection], T]) -> Future[T]:
        self.start()
        future: Future[T] = Future()
        self._queue.put((job, future))
        return future

    def stop(self) -> None:
        """Finish every queued job, then stop the thread."""
        if self._started:
            self._queue.put(_STOP)
            self._thread.join()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if _STOP in batch:
                stopping = True
                batch = [item for item in batch if item is not _STOP]
            if batch:
                self._commit(batch)

    def _commit(self, batch: list[tuple[Job, Future[Any]]]) -> None:
        live = [(job, future) for job, future in batch if future.set_running_or_notify_cancel()]
        if not live:
            return
        # Optimistic first: the whole batch in one transaction with no savepoints (two
        # statements per job saved). Jobs are functions of the connection alone, so if
        # one fails, the rolled-back batch can simply run again with each job isolated.
        try:
            with self.db.write() as conn:
                results = [job(conn) for job, _ in live]
        except Exception:
            self._commit_isolated(live)
            return
        for (_, future), result in zip(live, results, strict=True):
            future.set_result(result)
        if self.on_commit is not None:
            self.on_commit()

    def _commit_isolated(self, live: list[tuple[Job, Future[Any]]]) -> None:
        """Each job in its own SAVEPOINT: a failing job rolls back alone."""
        outcomes: list[tuple[Future[Any], bool, Any]] = []
        try:
            with self.db.write() as conn:
                for job, future in live:
                    try:
                        with conn.begin_nested():
                            outcomes.append((future, True, job(conn)))
                    except Exception as exc:
                        outcomes.append((future, False, exc))
        except Exception as exc:  # the commit itself failed: nothing in the batch is durable
            log.exception("group commit of %d jobs failed", len(live))
            for _, future in live:
                future.set_exception(exc)
            return
        for future, ok, value in outcomes:
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        if self.on_commit is not None:
            self.on_commit()
