"""Moving messages between folders: review release/trash, trash/restore, retention.

Each move is one transaction through the committer: read the message (within the
caller's reach; ``FOR UPDATE`` on PostgreSQL), let :mod:`mailgate.domain.folders`
decide, apply the decision with a *conditional* UPDATE (``WHERE`` the folder, previous
folder and visibility the decision was made on still hold), then append its events
and its audit entry. Of two owners releasing the same message at once, in one process
or in two, exactly one move happens; the other caller gets ``409
invalid_folder_transition`` (from the decision, having waited for the winner's lock,
or from an UPDATE that matched nothing).

Who may move what: owner keys anything in their workspace; agent keys (with
``messages:write``) may trash and restore their own *visible* mail only; releasing
held mail and trashing it from the review inbox are for owners. The CLI acts as the
:class:`Operator` (every workspace, audited as ``cli``).

Events follow visibility: an event about mail the agent can see carries its agent id;
one about mail it cannot see is workspace-scoped (``agent_id`` NULL; the payload still
names the agent), so only owner consumers get it. ``message.released`` is always for
owners; the agent learns of released mail from the ``message.received`` that comes
with it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeAlias

from sqlalchemy import (
    ColumnElement,
    Connection,
    bindparam,
    delete,
    exists,
    select,
    true,
    update,
)

from mailgate.clock import Clock
from mailgate.domain import folders
from mailgate.domain.folders import MessageState, Transition
from mailgate.domain.keys import MESSAGES_WRITE, Principal
from mailgate.errors import InvalidTransition, NotFound
from mailgate.services import audit
from mailgate.services.events import (
    MESSAGE_RECEIVED,
    MESSAGE_RELEASED,
    MESSAGE_RESTORED,
    MESSAGE_TRASHED,
    append_event,
)
from mailgate.services.queries import SUMMARY_COLUMNS, MessageSummary, summary_of, visible_messages
from mailgate.store.blobs import TieredBlobStore
from mailgate.store.committer import Committer
from mailgate.store.db import Database
from mailgate.store.schema import (
    attachments,
    drafts,
    messages,
    outbound,
    thread_refs,
    threads,
    webhook_receipts,
)

log = logging.getLogger(__name__)

PURGE_BATCH = 500
"""Most messages one purge transaction deletes (bounds its locks and its IN lists)."""

BLOB_GRACE = timedelta(hours=1)
"""A blob file written or re-put this recently is never purged (see :meth:`purge_trash`)."""

_EVENT_OF: dict[str, str] = {
    "trash": MESSAGE_TRASHED,
    "restore": MESSAGE_RESTORED,
    "release": MESSAGE_RELEASED,
}


@dataclass(frozen=True, slots=True)
class Operator:
    """Whoever runs the gateway's CLI on its host: may act in every workspace, and is
    audited as ``actor``."""

    actor: str = "cli"


Actor: TypeAlias = Principal | Operator


@dataclass(frozen=True, slots=True)
class FolderChange:
    """A move that happened: the message as it is now, and the move itself."""

    message: MessageSummary
    operation: str
    from_folder: str
    to_folder: str
    changed_at: datetime
    reached_agent: bool
    """The agent saw the message for the first time (``message.received`` emitted)."""


@dataclass(frozen=True, slots=True)
class PurgeResult:
    """What one :meth:`MailboxService.purge_trash` run deleted."""

    messages: int
    attachments: int
    threads_deleted: int
    threads_updated: int
    blob_rows: int
    blob_files: int
    receipts: int
    more: bool
    """The batch limit was reached: more expired trash may be waiting."""

    @property
    def anything(self) -> bool:
        return any(
            (self.messages, self.blob_rows, self.blob_files, self.receipts, self.threads_deleted)
        )


class MailboxService:
    def __init__(
        self,
        db: Database,
        committer: Committer,
        blobs: TieredBlobStore,
        clock: Clock,
        *,
        trash_retention: timedelta,
        blob_grace: timedelta = BLOB_GRACE,
    ) -> None:
        self.db = db
        self.committer = committer
        self.blobs = blobs
        self.clock = clock
        self.trash_retention = trash_retention
        self.blob_grace = blob_grace

    # -- moves --------------------------------------------------------------------------

    def trash(self, by: Actor, message_id: str) -> FolderChange:
        """Move a message to the trash (from any other folder), remembering where it was.

        Raises:
            Forbidden: an agent key without ``messages:write``.
            NotFound: no such message within the caller's reach (an agent's reach is
                its own visible mail).
            InvalidTransition: the message is already in the trash.
        """
        _require_write(by)
        return self._move(by, message_id, folders.trash)

    def trash_held(self, by: Actor, message_id: str) -> FolderChange:
        """The review inbox's trash: reject mail a rule held (owners only).

        Raises:
            Forbidden: an agent key.
            NotFound: no such message in the caller's workspace.
            InvalidTransition: the message is not held (review or quarantine).
        """
        _require_owner(by)
        return self._move(by, message_id, lambda state: folders.trash(state, held_only=True))

    def restore(self, by: Actor, message_id: str) -> FolderChange:
        """Put a trashed message back where it was; mail a rule trashed on arrival goes
        to the inbox and so reaches its agent for the first time.

        Raises:
            Forbidden: an agent key without ``messages:write``.
            NotFound: no such message within the caller's reach.
            InvalidTransition: the message is not in the trash.
        """
        _require_write(by)
        return self._move(by, message_id, folders.restore)

    def release(self, by: Actor, message_id: str) -> FolderChange:
        """Deliver held mail (review or quarantine) to its agent (owners only).

        Raises:
            Forbidden: an agent key.
            NotFound: no such message in the caller's workspace.
            InvalidTransition: the message is not held (already released, trashed, or
                another owner's release won the race).
        """
        _require_owner(by)
        return self._move(by, message_id, folders.release)

    def _move(
        self, by: Actor, message_id: str, decide: Callable[[MessageState], Transition]
    ) -> FolderChange:
        # Decided once, outside the job: a job may run twice (the group committer
        # re-runs a failed batch job by job), and must then do the same thing.
        now = self.clock.now()
        return self.committer.submit(
            lambda conn: self._apply(conn, by, message_id, decide, now)
        ).result()

    def _apply(
        self,
        conn: Connection,
        by: Actor,
        message_id: str,
        decide: Callable[[MessageState], Transition],
        now: datetime,
    ) -> FolderChange:
        row = conn.execute(
            select(*SUMMARY_COLUMNS, messages.c.workspace_id)
            .where(messages.c.id == message_id, _reach(by))
            .with_for_update(of=messages)
        ).first()
        if row is None:
            raise NotFound(f"no message {message_id}")
        state = MessageState(row.folder, row.previous_folder, row.visible_at is not None)
        move = decide(state)
        if not move.allowed:
            raise InvalidTransition(move.reason, folder=state.folder, operation=move.operation)
        values: dict[str, Any] = {
            "folder": move.to_folder,
            "previous_folder": move.previous_folder,
            "folder_changed_at": now,
        }
        if move.reaches_agent:
            values["visible_at"] = now
        changed = conn.execute(
            update(messages)
            .where(
                messages.c.id == message_id,
                messages.c.folder == state.folder,
                messages.c.previous_folder.is_not_distinct_from(state.previous_folder),
                messages.c.visible_at.is_not(None)
                if state.visible
                else messages.c.visible_at.is_(None),
            )
            .values(**values)
        )
        if changed.rowcount != 1:  # another writer moved it after our read (PostgreSQL)
            raise InvalidTransition(
                "the message was moved by someone else meanwhile", operation=move.operation
            )
        before = summary_of(row, _principal(by))
        after = dataclasses.replace(
            before,
            folder=move.to_folder,
            previous_folder=move.previous_folder,
            visible_at=now if move.reaches_agent else before.visible_at,
        )
        self._record(conn, row, move, by.actor, now)
        return FolderChange(
            message=after,
            operation=move.operation,
            from_folder=move.from_folder,
            to_folder=move.to_folder,
            changed_at=now,
            reached_agent=move.reaches_agent,
        )

    @staticmethod
    def _record(conn: Connection, row: Any, move: Transition, actor: str, now: datetime) -> None:
        """The move's events and audit entry, in its transaction. ``row`` is the
        message as read before the move (summary columns plus ``workspace_id``)."""
        base = {"message_id": row.id, "thread_id": row.thread_id, "agent_id": row.agent_id}
        event_type = _EVENT_OF[move.operation]
        # Released mail is announced to owners; the agent gets message.received.
        scoped = move.visible_after and move.operation != "release"
        append_event(
            conn,
            workspace_id=row.workspace_id,
            agent_id=row.agent_id if scoped else None,
            type=event_type,
            thread_id=row.thread_id,
            created_at=now,
            payload={
                **base,
                "from_folder": move.from_folder,
                "to_folder": move.to_folder,
                "actor": actor,
                "reason": move.reason,
            },
        )
        if move.reaches_agent:
            append_event(
                conn,
                workspace_id=row.workspace_id,
                agent_id=row.agent_id,
                type=MESSAGE_RECEIVED,
                thread_id=row.thread_id,
                created_at=now,
                # The shape ingest gives message.received, plus how the mail got here.
                payload={
                    **base,
                    "folder": move.to_folder,
                    "from": row.from_addr[0] if row.from_addr else None,
                    "to": row.to_addrs,
                    "cc": row.cc_addrs,
                    "subject": row.subject,
                    "preview": row.preview,
                    "received_at": row.received_at.isoformat(),
                    "via": move.operation,
                },
            )
        audit.record(
            conn,
            workspace_id=row.workspace_id,
            actor=actor,
            action=event_type,
            at=now,
            target_type="message",
            target_id=row.id,
            agent_id=row.agent_id,
            from_folder=move.from_folder,
            to_folder=move.to_folder,
            reached_agent=move.reaches_agent,
            reason=move.reason,
        )

    # -- retention ----------------------------------------------------------------------

    def purge_trash(
        self,
        now: datetime | None = None,
        *,
        limit: int = PURGE_BATCH,
        actor: str = "system",
    ) -> PurgeResult:
        """Delete trash older than ``trash_retention`` for good, and what only it used.

        Up to ``limit`` messages whose ``folder_changed_at`` is past the retention
        period go, with their attachment rows; threads left empty go with their
        ``thread_refs``, other threads count fewer messages. Expired
        ``webhook_receipts`` go too. Events are immutable history and stay. One audit
        entry records the run (when it deleted anything). Call again while
        ``more`` is True.

        Then blobs that no remaining message or attachment names are deleted, in a
        second transaction. Blobs are content-addressed, so an ingest running right
        now may be storing the very bytes being purged, and its message row commits
        only after the blob is "there". Both tiers guard against that race:

        * rows of ``blobs`` (small ones): the check for references and the delete run
          under :meth:`~mailgate.store.blobs.TieredBlobStore.lock_for_delete`, which on
          PostgreSQL waits for every transaction that wrote blob rows (so their
          messages are visible to the check) and holds new ones back until the
          delete commits (their insert then writes the row afresh). SQLite has one
          writer at a time, so there is nothing to race.
        * files (large ones) are written before any transaction, so no lock can cover
          them. Instead every ``put`` of bytes already stored refreshes the file's
          mtime, and a file modified within ``blob_grace`` (an hour) is never deleted:
          an ingest that re-used a file commits long before the grace runs out. See
          :meth:`~mailgate.store.blobs.LocalBlobStore.delete`.

        A crash between the two transactions leaves unreferenced blobs behind: wasted
        space, never a dangling reference.
        """
        now = now or self.clock.now()
        cutoff = now - self.trash_retention
        with self.db.write() as conn:
            purged = _purge_messages(conn, cutoff, limit)
            receipts = conn.execute(
                delete(webhook_receipts).where(webhook_receipts.c.expires_at < now)
            ).rowcount
            if purged.message_ids or receipts:
                audit.record(
                    conn,
                    workspace_id=None,
                    actor=actor,
                    action="trash.purged",
                    at=now,
                    retention_days=self.trash_retention.total_seconds() / 86400,
                    messages=len(purged.message_ids),
                    attachments=purged.attachments,
                    threads_deleted=purged.threads_deleted,
                    threads_updated=purged.threads_updated,
                    webhook_receipts=receipts,
                    by_workspace=dict(purged.by_workspace),
                    message_ids=purged.message_ids,
                )
        blob_rows, unused = self._delete_unused_blob_rows(purged.blob_shas)
        grace = self.blob_grace.total_seconds()
        files = sum(
            1 for sha in sorted(unused) if self.blobs.files.delete(sha, grace_seconds=grace)
        )
        result = PurgeResult(
            messages=len(purged.message_ids),
            attachments=purged.attachments,
            threads_deleted=purged.threads_deleted,
            threads_updated=purged.threads_updated,
            blob_rows=blob_rows,
            blob_files=files,
            receipts=receipts,
            # Only while this run made progress: rows skipped as locked stay candidates.
            more=purged.candidates >= limit and bool(purged.message_ids),
        )
        if result.anything:
            log.info("retention purged %s", result)
        return result

    def _delete_unused_blob_rows(self, shas: set[str]) -> tuple[int, set[str]]:
        """Delete the database-tier blobs among ``shas`` that nothing references any
        more; returns how many rows went and every unreferenced digest (whose files
        the caller deletes after this commits)."""
        if not shas:
            return 0, set()
        wanted = sorted(shas)
        with self.db.write() as conn:
            self.blobs.lock_for_delete(conn)
            used = set(
                conn.execute(
                    select(messages.c.raw_sha256).where(messages.c.raw_sha256.in_(wanted))
                ).scalars()
            )
            used |= set(
                conn.execute(
                    select(attachments.c.sha256).where(attachments.c.sha256.in_(wanted))
                ).scalars()
            )
            # What outbound requests will send (or sent, for the record) stays.
            used |= set(
                conn.execute(
                    select(outbound.c.raw_sha256).where(outbound.c.raw_sha256.in_(wanted))
                ).scalars()
            )
            # A draft's attachments are blobs named only inside its JSON; drafts are
            # few and short-lived, so they are read whole rather than indexed.
            for listed in conn.execute(select(drafts.c.attachments)).scalars():
                used |= {str(a.get("sha256")) for a in listed or () if a.get("sha256") in shas}
            unused = shas - used
            rows = self.blobs.delete_rows_in(conn, unused)
        return rows, unused


@dataclass
class _Purged:
    candidates: int
    message_ids: list[str]
    attachments: int
    threads_deleted: int
    threads_updated: int
    by_workspace: Counter[str]
    blob_shas: set[str]


def _purge_messages(conn: Connection, cutoff: datetime, limit: int) -> _Purged:
    """Delete up to ``limit`` messages trashed before ``cutoff`` (in the caller's
    transaction), fixing up their threads.

    On PostgreSQL the purge never *waits* for a row lock, so it cannot deadlock with
    ingest (which locks the threads it updates, in no particular order) or with a
    folder move: it locks the candidates' threads with ``SKIP LOCKED`` and purges only
    messages of threads it got, then locks those messages, again skipping any a move
    holds right now. What it skipped is still due and goes in a later run. While it
    holds a thread no message can join it (the foreign-key check of an insert waits
    for the lock), so "left empty" is decided on committed truth.
    """
    postgres = conn.dialect.name != "sqlite"
    candidates = conn.execute(
        select(messages.c.id, messages.c.thread_id)
        .where(messages.c.folder == folders.TRASH, messages.c.folder_changed_at < cutoff)
        .order_by(messages.c.folder_changed_at)
        .limit(limit)
    ).all()
    purged = _Purged(len(candidates), [], 0, 0, 0, Counter(), set())
    if not candidates:
        return purged
    thread_ids = sorted({row.thread_id for row in candidates})
    if postgres:
        thread_ids = list(
            conn.execute(
                select(threads.c.id)
                .where(threads.c.id.in_(thread_ids))
                .order_by(threads.c.id)
                .with_for_update(skip_locked=True)
            ).scalars()
        )
    # Re-checked under lock: a restore may have won since the first read.
    locked = select(
        messages.c.id, messages.c.thread_id, messages.c.workspace_id, messages.c.raw_sha256
    ).where(
        messages.c.id.in_([row.id for row in candidates]),
        messages.c.thread_id.in_(thread_ids),
        messages.c.folder == folders.TRASH,
        messages.c.folder_changed_at < cutoff,
    )
    if postgres:
        locked = locked.with_for_update(skip_locked=True)
    rows = conn.execute(locked).all()
    if not rows:
        return purged
    ids = [row.id for row in rows]
    purged.message_ids = ids
    purged.by_workspace.update(row.workspace_id for row in rows)
    purged.blob_shas.update(row.raw_sha256 for row in rows)
    purged.blob_shas.update(
        conn.execute(select(attachments.c.sha256).where(attachments.c.message_id.in_(ids)))
        .scalars()
        .all()
    )
    purged.attachments = conn.execute(
        delete(attachments).where(attachments.c.message_id.in_(ids))
    ).rowcount
    conn.execute(delete(messages).where(messages.c.id.in_(ids)))
    per_thread = Counter(row.thread_id for row in rows)
    emptied = list(
        conn.execute(
            select(threads.c.id).where(
                threads.c.id.in_(sorted(per_thread)),
                ~exists().where(messages.c.thread_id == threads.c.id),
            )
        ).scalars()
    )
    if emptied:
        conn.execute(delete(thread_refs).where(thread_refs.c.thread_id.in_(emptied)))
        conn.execute(delete(threads).where(threads.c.id.in_(emptied)))
    survivors = [
        {"b_thread": thread_id, "b_gone": count}
        for thread_id, count in per_thread.items()
        if thread_id not in set(emptied)
    ]
    if survivors:
        conn.execute(_DECREMENT_THREAD, survivors)
    purged.threads_deleted = len(emptied)
    purged.threads_updated = len(survivors)
    return purged


_DECREMENT_THREAD = (
    update(threads)
    .where(threads.c.id == bindparam("b_thread"))
    .values(message_count=threads.c.message_count - bindparam("b_gone"))
)


def _reach(by: Actor) -> ColumnElement[bool]:
    """The messages ``by`` may move: all (the operator), or what it may see."""
    if isinstance(by, Operator):
        return true()
    return visible_messages(by)


def _principal(by: Actor) -> Principal | None:
    return by if isinstance(by, Principal) else None


def _require_write(by: Actor) -> None:
    """Raises:
    Forbidden: an agent key without ``messages:write``.
    """
    if isinstance(by, Principal):
        by.require(MESSAGES_WRITE)


def _require_owner(by: Actor) -> None:
    """Raises:
    Forbidden: an agent key.
    """
    if isinstance(by, Principal):
        by.require_owner()
