"""The durable pull feed: lease, ack, nack, extend, dead letters and long-poll.

Modelled on SQS visibility timeouts, Pub/Sub subscriptions and JetStream consumers.
A *consumer* is a named subscription of one scope (an agent id, or ``"*"`` for the
whole workspace). Each consumer owns one ``deliveries`` row per event it has seen;
the row is the whole state machine::

    pending ──lease──▶ pending (leased, hidden until visible_at) ──ack──▶ acked
       ▲                   │ lease expires / nack                      ▲
       └───────────────────┘                                           │ late ack
    pending ──lease with delivery_count >= max_deliveries──▶ dead ─────┘
    dead ──redrive──▶ pending (delivery_count 0)

Rows are made lazily: a lease first leases from the rows that exist, and only when
they run short *materialises* rows for the consumer's events past its ``cursor_seq``
and leases again, all in one write transaction, so a pull costs one commit (one
fsync) whatever its batch size. Materialising on demand keeps the pending set near
what is actually in flight, so the per-pull queries stay small however long the
backlog of events is.

Ordering: events of one thread share an ``order_key``; only the lowest pending row of
each key is deliverable, and it stays the head (even while leased) until it is acked
or dead-lettered. Other threads proceed meanwhile.

Concurrency: on PostgreSQL several processes may pull the same consumer at once.
Deliverable rows are claimed with ``FOR UPDATE SKIP LOCKED``, and materialisation runs
only in the puller that wins the consumer row's lock (the others skip it, and lease
what is already materialised). On SQLite ``Database.write()`` serialises writers, so
the same statements without row locks are correct.

No lost events on PostgreSQL: a sequence hands out ``seq`` at insert time but
transactions commit in any order, so ``seq`` 7 may become visible after ``seq`` 8. A
cursor that jumped to 8 would skip 7 for ever. The cursor therefore advances only
through *settled* sequence numbers: present, or missing for longer than
``gap_settle_seconds`` (a rolled-back insert). Events above a young gap are still
materialised and delivered at once; only the cursor waits.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Connection,
    Select,
    any_,
    cast,
    exists,
    false,
    func,
    insert,
    literal,
    select,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert

from mailgate.clock import Clock
from mailgate.config import Settings
from mailgate.errors import ValidationFailed
from mailgate.ids import new_id
from mailgate.store.db import Database
from mailgate.store.schema import UtcDateTime, consumers, deliveries, events

__all__ = [
    "MATERIALISE_BATCH",
    "MAX_IDS_PER_CALL",
    "MAX_PENDING_ROWS",
    "WORKSPACE_SCOPE",
    "AckResult",
    "DeadLetter",
    "DeadLetterPage",
    "ExtendResult",
    "FeedListener",
    "FeedNotifier",
    "FeedService",
    "LeasedEvent",
    "NackResult",
    "RedriveResult",
]

WORKSPACE_SCOPE = "*"
"""The scope of owner-key consumers: every event of the workspace."""

MATERIALISE_BATCH = 500
"""Most delivery rows one lease creates; bounds the work a single pull can trigger."""

MAX_PENDING_ROWS = 5000
"""Materialising pauses while a consumer has this many pending rows. Each pull's
queries are linear in the pending set, so this bounds their cost; the price is that a
single thread queued deeper than this holds back newer events until it drains."""

MAX_IDS_PER_CALL = 1000
"""Most event ids one ack / nack / extend / redrive accepts."""

PENDING, ACKED, DEAD = "pending", "acked", "dead"

_CONSUMER_NAME = re.compile(r"[A-Za-z0-9._-]{1,200}")

SYSTEM_PREFIX = "webhook."
"""Consumer names the gateway's own pushers use (``webhook.<id>``). Clients may not
lease, ack, nack or extend them: an owner pulling a webhook's consumer would take its
events away from the receiver. Listing and redriving their dead letters is allowed."""
_SCOPE_MAX = 40  # consumers.scope is String(40)


# -- results ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LeasedEvent:
    """One event leased to the caller, hidden from other pullers until
    ``lease_expires_at`` unless acked, nacked or extended first."""

    event_id: str
    type: str
    created_at: datetime
    agent_id: str | None
    thread_id: str | None
    payload: dict[str, Any]
    delivery_count: int
    lease_expires_at: datetime


@dataclass(frozen=True, slots=True)
class AckResult:
    """What an ack did to each id (acks are idempotent, so none of this is an error)."""

    acked: tuple[str, ...]
    already_acked: tuple[str, ...]
    not_found: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class NackResult:
    """``finished`` ids were already acked or dead and were left alone."""

    nacked: tuple[str, ...]
    visible_at: datetime
    finished: tuple[str, ...]
    not_found: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ExtendResult:
    """``not_leased`` ids exist but hold no live lease (expired, nacked, never leased,
    acked or dead): the caller has lost them and must not assume exclusivity."""

    extended: tuple[str, ...]
    lease_expires_at: datetime
    not_leased: tuple[str, ...]
    not_found: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RedriveResult:
    redriven: tuple[str, ...]
    not_dead: tuple[str, ...]
    not_found: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An event a consumer gave up on after ``max_deliveries`` leases."""

    consumer: str
    scope: str
    event_id: str
    type: str
    created_at: datetime
    agent_id: str | None
    thread_id: str | None
    payload: dict[str, Any]
    delivery_count: int
    last_delivered_at: datetime | None
    dead_at: datetime | None


@dataclass(frozen=True, slots=True)
class DeadLetterPage:
    items: tuple[DeadLetter, ...]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class _Consumer:
    id: str
    cursor_seq: int


# -- wake-up signal --------------------------------------------------------------------


class FeedListener:
    """One long-poller's wake-up flag, bound to the event loop it waits in.

    ``notify()`` may run in any thread, so it only ever touches the flag through
    ``loop.call_soon_threadsafe``; asyncio primitives are not thread-safe.
    """

    def __init__(self, workspace_id: str | None, loop: asyncio.AbstractEventLoop) -> None:
        self.workspace_id = workspace_id
        self._loop = loop
        self._event = asyncio.Event()

    def clear(self) -> None:
        """Forget earlier wake-ups. Call *before* checking for work, so a notify that
        lands between the check and :meth:`wait` is not lost."""
        self._event.clear()

    async def wait(self, timeout: float) -> bool:
        """Wait for a wake-up or ``timeout`` seconds; True if woken."""
        try:
            async with asyncio.timeout(timeout):
                await self._event.wait()
        except TimeoutError:
            return False
        return True

    def _wake(self) -> None:
        # RuntimeError: the waiter's loop is closed, so there is nobody left to wake.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._event.set)


class FeedNotifier:
    """In-process "new events committed" signal for long-polls.

    Services call :meth:`notify` after committing events; waiting pulls re-check at
    once instead of at their next poll tick. It is only an accelerator: writes by
    other processes are caught by the poll interval, so a missed notify costs latency,
    never an event.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: set[FeedListener] = set()
        self.closed = False

    def close(self) -> None:
        """Shutting down: end every long-poll now (with what it has) instead of letting
        open waits hold up a graceful stop for up to ``feed_max_wait_seconds``."""
        self.closed = True
        self.notify(None)

    def notify(self, workspace_id: str | None = None) -> None:
        """Wake the long-polls of ``workspace_id`` (all of them when None).

        Safe to call from any thread, with or without a running event loop.
        """
        with self._lock:
            targets = [
                listener
                for listener in self._listeners
                if workspace_id is None
                or listener.workspace_id is None
                or listener.workspace_id == workspace_id
            ]
        for listener in targets:
            listener._wake()

    @contextmanager
    def listen(self, workspace_id: str | None = None) -> Iterator[FeedListener]:
        """Register a listener for the current event loop while the block runs.

        Raises:
            RuntimeError: called outside a running event loop.
        """
        listener = FeedListener(workspace_id, asyncio.get_running_loop())
        with self._lock:
            self._listeners.add(listener)
        try:
            yield listener
        finally:
            with self._lock:
                self._listeners.discard(listener)


# -- the service -----------------------------------------------------------------------


class FeedService:
    """Lease / ack / nack / extend / dead-letter use cases, one transaction each.

    ``scope`` always comes from the caller's key (its agent id, or ``"*"`` for owner
    keys); the service trusts it and never lets a consumer see events outside it.
    """

    def __init__(
        self,
        db: Database,
        settings: Settings,
        clock: Clock,
        notifier: FeedNotifier,
        *,
        gap_settle_seconds: float = 30.0,
    ) -> None:
        """``gap_settle_seconds`` must exceed the longest transaction that inserts an
        event (PostgreSQL): a sequence gap younger than that may still commit."""
        self._db = db
        self._settings = settings
        self._clock = clock
        self._notifier = notifier
        self._gap_settle = timedelta(seconds=gap_settle_seconds)
        # Highest seq known settled (global, never decreases): gap scans start here,
        # so the events table is walked about once per process, not once per consumer.
        self._settled_horizon = 0
        self._horizon_lock = threading.Lock()

    # -- pulling ------------------------------------------------------------------------

    def lease(
        self,
        workspace_id: str,
        scope: str,
        consumer: str,
        *,
        limit: int,
        lease_seconds: float,
        system: bool = False,
    ) -> list[LeasedEvent]:
        """Lease up to ``limit`` deliverable events, oldest first, for ``lease_seconds``.

        Creates the consumer on first use (cursor 0: it sees every retained event),
        except a ``system`` one, which only its owner creates (none: nothing leased).
        Events whose delivery count has reached ``feed_max_deliveries`` are
        dead-lettered instead of leased, which unblocks the next event of their
        thread in the same call. An empty list means nothing is deliverable now.

        New delivery rows are made only when the existing ones cannot fill the batch
        (and fewer than ``MAX_PENDING_ROWS`` are pending), so the cost of a pull
        follows what is in flight, not the length of the backlog.

        Raises:
            ValidationFailed: bad consumer name, scope, limit or lease_seconds.
        """
        self._check(
            scope=scope, consumer=consumer, limit=limit, lease_seconds=lease_seconds, system=system
        )
        now = self._clock.now()
        expires = now + timedelta(seconds=lease_seconds)
        with self._db.write() as conn:
            if system:
                # A system consumer is made by its owner (a webhook, at the newest
                # event) and removed with it; recreating it here at cursor 0 would
                # replay all history to a webhook deleted while it was being drained.
                found = self._find_consumer(conn, workspace_id, scope, consumer)
                if found is None:
                    return []
                consumer_id = found
            else:
                consumer_id = self._claim_consumer(conn, workspace_id, scope, consumer, now)
            leased = self._lease_rows(conn, consumer_id, now, expires, limit)
            if len(leased) < limit and self._has_room(conn, consumer_id):
                row = self._lock_consumer(conn, consumer_id)
                if row is not None and self._materialise(conn, row, workspace_id, scope, now):
                    leased += self._lease_rows(conn, consumer_id, now, expires, limit - len(leased))
        leased.sort(key=lambda pair: pair[0])
        return [event for _, event in leased]

    async def pull(
        self,
        workspace_id: str,
        scope: str,
        consumer: str,
        *,
        limit: int,
        lease_seconds: float,
        wait_seconds: float,
    ) -> list[LeasedEvent]:
        """:meth:`lease`, long-polling up to ``wait_seconds`` while nothing is deliverable.

        Wakes on :meth:`FeedNotifier.notify` for this workspace or every
        ``feed_poll_interval`` (events written by other processes), so it neither
        busy-loops nor sleeps past the deadline by more than one lease. The database
        work runs in a worker thread. If the caller is cancelled while a lease is in
        flight, that lease still commits; its events come back when it expires.

        Raises:
            ValidationFailed: bad consumer name, scope, limit, lease or wait.
        """
        self._check(
            scope=scope,
            consumer=consumer,
            limit=limit,
            lease_seconds=lease_seconds,
            wait_seconds=wait_seconds,
        )
        deadline = time.monotonic() + wait_seconds
        with self._notifier.listen(workspace_id) as listener:
            while True:
                listener.clear()
                batch = await asyncio.to_thread(
                    self.lease,
                    workspace_id,
                    scope,
                    consumer,
                    limit=limit,
                    lease_seconds=lease_seconds,
                )
                remaining = deadline - time.monotonic()
                if batch or remaining <= 0 or self._notifier.closed:
                    return batch
                await listener.wait(min(self._settings.feed_poll_interval, remaining))

    # -- settling -----------------------------------------------------------------------

    def ack(
        self,
        workspace_id: str,
        scope: str,
        consumer: str,
        event_ids: Sequence[str],
        *,
        system: bool = False,
    ) -> AckResult:
        """Mark events done for this consumer; they are never delivered to it again.

        Idempotent. An expired lease may still be acked (the work was done), and so
        may a dead-lettered event: leaving it dead would invite a duplicate redrive.

        Raises:
            ValidationFailed: bad consumer name or scope, or too many ids.
        """
        ids = self._check_ids(scope, consumer, event_ids, system=system)
        now = self._clock.now()
        with self._db.write() as conn:
            consumer_id = self._find_consumer(conn, workspace_id, scope, consumer)
            if consumer_id is None or not ids:
                return AckResult((), (), tuple(ids))
            done = self._update_returning(
                conn,
                consumer_id,
                ids,
                deliveries.c.state != ACKED,
                state=ACKED,
                leased=False,
                finished_at=now,
            )
            known = self._existing(conn, consumer_id, [i for i in ids if i not in done])
        return AckResult(
            acked=tuple(i for i in ids if i in done),
            already_acked=tuple(i for i in ids if i in known),
            not_found=tuple(i for i in ids if i not in done and i not in known),
        )

    def nack(
        self,
        workspace_id: str,
        scope: str,
        consumer: str,
        event_ids: Sequence[str],
        *,
        delay_seconds: float = 0,
        system: bool = False,
    ) -> NackResult:
        """Give events back: they become deliverable again after ``delay_seconds``.

        The delivery count is kept, so a nack still moves an event toward the dead
        letters (a poison event cannot loop for ever). Acked or dead events are left
        alone and reported as ``finished``.

        Raises:
            ValidationFailed: bad consumer name, scope or delay, or too many ids.
        """
        self._check(scope=scope, consumer=consumer, delay_seconds=delay_seconds, system=system)
        ids = self._check_ids(scope, consumer, event_ids, system=system)
        now = self._clock.now()
        visible_at = now + timedelta(seconds=delay_seconds)
        with self._db.write() as conn:
            consumer_id = self._find_consumer(conn, workspace_id, scope, consumer)
            if consumer_id is None or not ids:
                return NackResult((), visible_at, (), tuple(ids))
            done = self._update_returning(
                conn,
                consumer_id,
                ids,
                deliveries.c.state == PENDING,
                leased=False,
                visible_at=visible_at,
            )
            known = self._existing(conn, consumer_id, [i for i in ids if i not in done])
        if delay_seconds == 0 and done:
            self._notifier.notify(workspace_id)
        return NackResult(
            nacked=tuple(i for i in ids if i in done),
            visible_at=visible_at,
            finished=tuple(i for i in ids if i in known),
            not_found=tuple(i for i in ids if i not in done and i not in known),
        )

    def extend(
        self,
        workspace_id: str,
        scope: str,
        consumer: str,
        event_ids: Sequence[str],
        *,
        lease_seconds: float,
    ) -> ExtendResult:
        """Push live leases to ``now + lease_seconds`` (a heartbeat for slow work).

        Only a lease that has not expired can be extended: once it expires another
        puller may already hold the event, so extending it would hide it from them.

        Raises:
            ValidationFailed: bad consumer name, scope or lease, or too many ids.
        """
        self._check(scope=scope, consumer=consumer, lease_seconds=lease_seconds)
        ids = self._check_ids(scope, consumer, event_ids)
        now = self._clock.now()
        expires = now + timedelta(seconds=lease_seconds)
        with self._db.write() as conn:
            consumer_id = self._find_consumer(conn, workspace_id, scope, consumer)
            if consumer_id is None or not ids:
                return ExtendResult((), expires, (), tuple(ids))
            done = self._update_returning(
                conn,
                consumer_id,
                ids,
                deliveries.c.state == PENDING,
                deliveries.c.leased == true(),
                deliveries.c.visible_at > now,
                visible_at=expires,
            )
            known = self._existing(conn, consumer_id, [i for i in ids if i not in done])
        return ExtendResult(
            extended=tuple(i for i in ids if i in done),
            lease_expires_at=expires,
            not_leased=tuple(i for i in ids if i in known),
            not_found=tuple(i for i in ids if i not in done and i not in known),
        )

    def redrive(
        self, workspace_id: str, scope: str, consumer: str, event_ids: Sequence[str]
    ) -> RedriveResult:
        """Put dead-lettered events back to pending with a fresh delivery budget.

        A redriven event is pending again, so it once more holds back the later
        pending events of its thread until it is acked or dies again.

        Raises:
            ValidationFailed: bad consumer name or scope, or too many ids.
        """
        ids = self._check_ids(scope, consumer, event_ids, system=True)
        now = self._clock.now()
        with self._db.write() as conn:
            consumer_id = self._find_consumer(conn, workspace_id, scope, consumer)
            if consumer_id is None or not ids:
                return RedriveResult((), (), tuple(ids))
            done = self._update_returning(
                conn,
                consumer_id,
                ids,
                deliveries.c.state == DEAD,
                state=PENDING,
                delivery_count=0,
                leased=False,
                visible_at=now,
                finished_at=None,
            )
            known = self._existing(conn, consumer_id, [i for i in ids if i not in done])
        if done:
            self._notifier.notify(workspace_id)
        return RedriveResult(
            redriven=tuple(i for i in ids if i in done),
            not_dead=tuple(i for i in ids if i in known),
            not_found=tuple(i for i in ids if i not in done and i not in known),
        )

    def dead_letters(
        self,
        workspace_id: str,
        *,
        consumer: str | None = None,
        scope: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> DeadLetterPage:
        """Dead-lettered events of a workspace (for owners), oldest event first.

        Filter by consumer name and/or scope; page with ``cursor`` → ``next_cursor``.

        Raises:
            ValidationFailed: bad consumer name, limit or cursor.
        """
        errors: list[dict[str, str]] = []
        if consumer is not None and not _CONSUMER_NAME.fullmatch(consumer):
            errors.append(_consumer_error())
        if not _in_range(limit, 1, self._settings.feed_max_limit):
            errors.append(_range_error("limit", 1, self._settings.feed_max_limit))
        after = _decode_cursor(cursor) if cursor is not None else None
        if cursor is not None and after is None:
            errors.append({"field": "cursor", "message": "not a cursor from this endpoint"})
        _raise_if(errors)

        d, c, e = deliveries, consumers, events
        query = (
            select(
                c.c.name,
                c.c.scope,
                d.c.consumer_id,
                d.c.event_seq,
                d.c.delivery_count,
                d.c.last_delivered_at,
                d.c.finished_at,
                e.c.id,
                e.c.type,
                e.c.created_at,
                e.c.agent_id,
                e.c.thread_id,
                e.c.payload,
            )
            .join_from(d, c, c.c.id == d.c.consumer_id)
            .join(e, e.c.seq == d.c.event_seq)
            .where(c.c.workspace_id == workspace_id, d.c.state == DEAD)
            .order_by(d.c.event_seq, d.c.consumer_id)
            .limit(limit + 1)
        )
        if consumer is not None:
            query = query.where(c.c.name == consumer)
        if scope is not None:
            query = query.where(c.c.scope == scope)
        if after is not None:
            seq, consumer_id = after
            query = query.where(
                (d.c.event_seq > seq) | ((d.c.event_seq == seq) & (d.c.consumer_id > consumer_id))
            )
        with self._db.read() as conn:
            rows = conn.execute(query).all()
        more = len(rows) > limit
        rows = rows[:limit]
        items = tuple(
            DeadLetter(
                consumer=r.name,
                scope=r.scope,
                event_id=r.id,
                type=r.type,
                created_at=r.created_at,
                agent_id=r.agent_id,
                thread_id=r.thread_id,
                payload=r.payload,
                delivery_count=r.delivery_count,
                last_delivered_at=r.last_delivered_at,
                dead_at=r.finished_at,
            )
            for r in rows
        )
        last = rows[-1] if rows else None
        next_cursor = (
            _encode_cursor(last.event_seq, last.consumer_id) if more and last is not None else None
        )
        return DeadLetterPage(items, next_cursor)

    # -- consumers ----------------------------------------------------------------------

    def _consumer_key(self, workspace_id: str, scope: str, name: str) -> Any:
        return (
            (consumers.c.workspace_id == workspace_id)
            & (consumers.c.scope == scope)
            & (consumers.c.name == name)
        )

    def _find_consumer(
        self, conn: Connection, workspace_id: str, scope: str, name: str
    ) -> str | None:
        key = self._consumer_key(workspace_id, scope, name)
        value = conn.execute(select(consumers.c.id).where(key)).scalar()
        return None if value is None else str(value)

    def _claim_consumer(
        self, conn: Connection, workspace_id: str, scope: str, name: str, now: datetime
    ) -> str:
        """The consumer's id, creating the row (cursor 0) on first use.

        Concurrent first pulls on PostgreSQL meet in ON CONFLICT DO NOTHING: the loser
        waits for the winner's commit and then reads its row.
        """
        key = self._consumer_key(workspace_id, scope, name)
        found = conn.execute(select(consumers.c.id).where(key)).scalar()
        if found is not None:
            return str(found)
        values = _new_consumer(workspace_id, scope, name, now)
        if self._db.is_sqlite:
            conn.execute(insert(consumers).values(values))
            return str(values["id"])
        made = conn.execute(
            pg_insert(consumers)
            .values(values)
            .on_conflict_do_nothing(index_elements=["workspace_id", "scope", "name"])
            .returning(consumers.c.id)
        ).scalar()
        if made is not None:
            return str(made)
        return str(conn.execute(select(consumers.c.id).where(key)).scalar_one())

    def _has_room(self, conn: Connection, consumer_id: str) -> bool:
        """Whether the consumer has fewer than ``MAX_PENDING_ROWS`` pending rows
        (counts at most that many, so it costs no more than the cap)."""
        capped = (
            select(literal(1))
            .where(deliveries.c.consumer_id == consumer_id, deliveries.c.state == PENDING)
            .limit(MAX_PENDING_ROWS)
            .subquery()
        )
        pending = conn.execute(select(func.count()).select_from(capped)).scalar_one()
        return int(pending) < MAX_PENDING_ROWS

    def _lock_consumer(self, conn: Connection, consumer_id: str) -> _Consumer | None:
        """The consumer row, locked for materialising; None if another puller holds it.

        SKIP LOCKED on PostgreSQL: a puller that finds another one materialising
        leases what already exists instead of queueing behind it. The cursor is read
        under the lock, so it is the latest committed one.
        """
        query = select(consumers.c.id, consumers.c.cursor_seq).where(consumers.c.id == consumer_id)
        if not self._db.is_sqlite:
            query = query.with_for_update(skip_locked=True)
        row = conn.execute(query).first()
        return None if row is None else _Consumer(row.id, int(row.cursor_seq))

    # -- materialising ------------------------------------------------------------------

    def _materialise(
        self, conn: Connection, row: _Consumer, workspace_id: str, scope: str, now: datetime
    ) -> bool:
        """Create pending rows for the consumer's unseen events and move its cursor;
        True if it made any. The caller holds the consumer row's lock.

        Takes events past the cursor that have no row yet (so events above a young
        gap, already materialised, are not duplicated while the cursor waits).
        """
        settled = None if self._db.is_sqlite else self._settled_through(conn, row.cursor_seq, now)
        in_scope = events.c.workspace_id == workspace_id
        if scope != WORKSPACE_SCOPE:
            in_scope = in_scope & (events.c.agent_id == scope)
        source = (
            select(
                literal(row.id),
                events.c.seq,
                events.c.id,
                func.coalesce(events.c.thread_id, events.c.id),
                literal(PENDING),
                literal(0),
                literal(now, UtcDateTime()),
                false(),
            )
            .where(
                in_scope,
                events.c.seq > row.cursor_seq,
                ~exists().where(
                    deliveries.c.consumer_id == row.id,
                    deliveries.c.event_seq == events.c.seq,
                ),
            )
            .order_by(events.c.seq)
            .limit(MATERIALISE_BATCH)
        )
        columns = [
            "consumer_id",
            "event_seq",
            "event_id",
            "order_key",
            "state",
            "delivery_count",
            "visible_at",
            "leased",
        ]
        if self._db.is_sqlite:
            stmt = insert(deliveries).from_select(columns, source)
        else:
            stmt = pg_insert(deliveries).from_select(columns, source).on_conflict_do_nothing()
        made = [int(s) for s in conn.execute(stmt.returning(deliveries.c.event_seq)).scalars()]
        if settled is None:  # SQLite: no writer was in flight, everything is settled
            new_cursor = max(made, default=row.cursor_seq)
        else:
            new_cursor = settled
            if len(made) >= MATERIALISE_BATCH:  # truncated: nothing past the batch is made
                new_cursor = min(new_cursor, max(made))
        if new_cursor > row.cursor_seq:
            conn.execute(
                update(consumers).where(consumers.c.id == row.id).values(cursor_seq=new_cursor)
            )
        return bool(made)

    def _settled_through(self, conn: Connection, cursor: int, now: datetime) -> int:
        """Highest seq at or above ``cursor`` below which no event can still appear
        (PostgreSQL only).

        Walks ``events`` by seq from the settled horizon and stops at the first gap
        whose next event is younger than ``gap_settle_seconds``: the missing seq may
        belong to a transaction that has not committed yet. One statement, so the gap
        scan and the maximum see the same snapshot; it runs before the insert that
        materialises, whose later snapshot sees at least as much.
        """
        lo = max(cursor, self._settled_horizon)
        window = (
            select(
                events.c.seq,
                events.c.created_at,
                func.lag(events.c.seq, 1, literal(lo, BigInteger()))
                .over(order_by=events.c.seq)
                .label("prev"),
            )
            .where(events.c.seq > lo)
            .subquery()
        )
        first_young_gap = (
            select(window.c.prev)
            .where(
                window.c.seq - window.c.prev > 1,
                window.c.created_at > now - self._gap_settle,
            )
            .order_by(window.c.seq)
            .limit(1)
            .scalar_subquery()
        )
        top = select(func.max(events.c.seq)).where(events.c.seq > lo).scalar_subquery()
        gap, highest = conn.execute(select(first_young_gap, top)).one()
        settled = int(gap) if gap is not None else int(highest) if highest is not None else lo
        with self._horizon_lock:
            self._settled_horizon = max(self._settled_horizon, settled)
        return settled

    # -- leasing ------------------------------------------------------------------------

    def _deliverable(self, consumer_id: str, now: datetime, limit: int) -> Select[Any]:
        """Heads of their order keys that are pending and visible, oldest first.

        A head is the lowest pending seq of its order key, found with one GROUP BY
        over the pending rows: linear in the pending set, where a per-row "is anything
        ahead of me" probe would walk each thread's rows once per candidate. The
        aggregate is a sub-select of the same statement, so it sees the same snapshot
        as the rows it filters.
        """
        d = deliveries.alias("d")
        p = deliveries.alias("p")
        heads = (
            select(func.min(p.c.event_seq).label("seq"))
            .where(p.c.consumer_id == consumer_id, p.c.state == PENDING)
            .group_by(p.c.order_key)
        )
        is_head: ColumnElement[bool]
        if self._db.is_sqlite:
            # SQLite evaluates an uncorrelated IN (sub-select) once into a temp index.
            is_head = d.c.event_seq.in_(heads)
        else:
            # ``= ANY(<one array>)``: PostgreSQL computes the heads once (an InitPlan)
            # and probes the primary key for each; an IN (sub-select) may instead be
            # planned as a nested loop that re-scans the aggregate per row, which is
            # what it picks on a table that has not been analysed yet.
            head_seqs = heads.subquery()
            one_array = select(func.array_agg(head_seqs.c.seq)).scalar_subquery()
            # The cast makes it a scalar operand: bare ANY (SELECT ...) means "any row".
            is_head = d.c.event_seq == any_(cast(one_array, ARRAY(BigInteger())))
        query = (
            select(d.c.event_seq, d.c.delivery_count)
            .where(
                d.c.consumer_id == consumer_id,
                d.c.state == PENDING,
                d.c.visible_at <= now,
                is_head,
            )
            .order_by(d.c.event_seq)
            .limit(limit)
        )
        if not self._db.is_sqlite:
            query = query.with_for_update(of=d, skip_locked=True)
        return query

    def _lease_rows(
        self,
        conn: Connection,
        consumer_id: str,
        now: datetime,
        expires: datetime,
        limit: int,
    ) -> list[tuple[int, LeasedEvent]]:
        """Lease deliverable rows with set-based updates; dead-letter the exhausted.

        Returns (seq, event) pairs so the caller can merge rounds in seq order. Loops
        only when it dead-lettered something, because that may have unblocked the next
        event of a thread; each round finishes rows, so it terminates.
        """
        max_deliveries = self._settings.feed_max_deliveries
        leased: list[tuple[int, LeasedEvent]] = []
        while len(leased) < limit:
            rows = conn.execute(self._deliverable(consumer_id, now, limit - len(leased))).all()
            if not rows:
                break
            counts = {int(r.event_seq): int(r.delivery_count) for r in rows}
            wanted = [seq for seq, count in counts.items() if count < max_deliveries]
            found = {int(e.seq): e for e in self._events(conn, wanted)}
            # An event deleted under its row (retention) can never be delivered: finish
            # it, or it would block its thread for ever.
            dead = [seq for seq in counts if seq not in found]
            if dead:
                conn.execute(
                    update(deliveries)
                    .where(deliveries.c.consumer_id == consumer_id)
                    .where(deliveries.c.event_seq.in_(dead))
                    .values(state=DEAD, leased=False, finished_at=now)
                )
            if found:
                conn.execute(
                    update(deliveries)
                    .where(deliveries.c.consumer_id == consumer_id)
                    .where(deliveries.c.event_seq.in_(list(found)))
                    .values(
                        delivery_count=deliveries.c.delivery_count + 1,
                        leased=True,
                        visible_at=expires,
                        last_delivered_at=now,
                    )
                )
                leased.extend(
                    (
                        seq,
                        LeasedEvent(
                            event_id=e.id,
                            type=e.type,
                            created_at=e.created_at,
                            agent_id=e.agent_id,
                            thread_id=e.thread_id,
                            payload=e.payload,
                            delivery_count=counts[seq] + 1,
                            lease_expires_at=expires,
                        ),
                    )
                    for seq, e in found.items()
                )
            if not dead:
                break
        return leased

    def _events(self, conn: Connection, seqs: list[int]) -> Sequence[Any]:
        """The chosen events' rows, fetched after the LIMIT so payloads of rows that
        were merely considered are never read."""
        if not seqs:
            return []
        return conn.execute(
            select(
                events.c.seq,
                events.c.id,
                events.c.type,
                events.c.created_at,
                events.c.agent_id,
                events.c.thread_id,
                events.c.payload,
            ).where(events.c.seq.in_(seqs))
        ).all()

    # -- helpers ------------------------------------------------------------------------

    def _update_returning(
        self,
        conn: Connection,
        consumer_id: str,
        ids: list[str],
        *conditions: Any,
        **values: Any,
    ) -> set[str]:
        """One set-based UPDATE over the consumer's rows for ``ids``; the ids it changed.

        RETURNING (not a prior SELECT) decides what changed, so two concurrent calls
        never both claim the same row.
        """
        stmt = (
            update(deliveries)
            .where(deliveries.c.consumer_id == consumer_id)
            .where(deliveries.c.event_id.in_(ids))
            .where(*conditions)
            .values(**values)
            .returning(deliveries.c.event_id)
        )
        return {str(i) for i in conn.execute(stmt).scalars()}

    def _existing(self, conn: Connection, consumer_id: str, ids: list[str]) -> set[str]:
        if not ids:
            return set()
        stmt = select(deliveries.c.event_id).where(
            deliveries.c.consumer_id == consumer_id, deliveries.c.event_id.in_(ids)
        )
        return {str(i) for i in conn.execute(stmt).scalars()}

    def _check(
        self,
        *,
        scope: str,
        consumer: str,
        limit: int | None = None,
        lease_seconds: float | None = None,
        wait_seconds: float | None = None,
        delay_seconds: float | None = None,
        system: bool = False,
    ) -> None:
        """``system``: the caller is the gateway itself, so :data:`SYSTEM_PREFIX` names
        are allowed.

        Raises:
        ValidationFailed: listing every bad field at once.
        """
        s = self._settings
        errors: list[dict[str, str]] = []
        if not 1 <= len(scope) <= _SCOPE_MAX:
            errors.append({"field": "scope", "message": f"must be 1-{_SCOPE_MAX} characters"})
        if not _CONSUMER_NAME.fullmatch(consumer):
            errors.append(_consumer_error())
        elif consumer.startswith(SYSTEM_PREFIX) and not system:
            errors.append(
                {"field": "consumer", "message": f"names starting {SYSTEM_PREFIX!r} are webhooks'"}
            )
        if limit is not None and not _in_range(limit, 1, s.feed_max_limit):
            errors.append(_range_error("limit", 1, s.feed_max_limit))
        if lease_seconds is not None and not _in_range(lease_seconds, 1, s.feed_max_lease_seconds):
            errors.append(_range_error("lease_seconds", 1, s.feed_max_lease_seconds))
        if wait_seconds is not None and not _in_range(wait_seconds, 0, s.feed_max_wait_seconds):
            errors.append(_range_error("wait_seconds", 0, s.feed_max_wait_seconds))
        if delay_seconds is not None and not _in_range(delay_seconds, 0, s.feed_max_lease_seconds):
            errors.append(_range_error("delay_seconds", 0, s.feed_max_lease_seconds))
        _raise_if(errors)

    def _check_ids(
        self, scope: str, consumer: str, event_ids: Sequence[str], *, system: bool = False
    ) -> list[str]:
        """The ids, de-duplicated in order.

        Raises:
            ValidationFailed: bad consumer/scope, or more than ``MAX_IDS_PER_CALL`` ids.
        """
        if isinstance(event_ids, str):  # a lone id would iterate as characters
            raise ValidationFailed(
                "invalid request",
                errors=[{"field": "event_ids", "message": "must be a list of event ids"}],
            )
        self._check(scope=scope, consumer=consumer, system=system)
        ids = list(dict.fromkeys(event_ids))
        if len(ids) > MAX_IDS_PER_CALL:
            raise ValidationFailed(
                "invalid request",
                errors=[
                    {"field": "event_ids", "message": f"at most {MAX_IDS_PER_CALL} ids per call"}
                ],
            )
        return ids


def _new_consumer(workspace_id: str, scope: str, name: str, now: datetime) -> dict[str, Any]:
    return {
        "id": new_id("con"),
        "workspace_id": workspace_id,
        "scope": scope,
        "name": name,
        "cursor_seq": 0,
        "created_at": now,
    }


def _in_range(value: float, low: float, high: float) -> bool:
    # bool is an int subclass; True is not a limit. NaN fails both comparisons.
    return not isinstance(value, bool) and low <= value <= high


def _range_error(field: str, low: float, high: float) -> dict[str, str]:
    return {"field": field, "message": f"must be between {low:g} and {high:g}"}


def _consumer_error() -> dict[str, str]:
    return {"field": "consumer", "message": "must be 1-200 characters of A-Z a-z 0-9 . _ -"}


def _raise_if(errors: list[dict[str, str]]) -> None:
    if errors:
        raise ValidationFailed("invalid request", errors=errors)


def _encode_cursor(seq: int, consumer_id: str) -> str:
    return base64.urlsafe_b64encode(f"{seq}:{consumer_id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[int, str] | None:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        seq, _, consumer_id = raw.partition(":")
        return (int(seq), consumer_id) if consumer_id else None
    except ValueError:
        return None
