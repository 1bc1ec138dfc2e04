"""The read side: messages, threads, raw bytes and attachments, as one caller may see them.

Every query is built on :func:`visible_messages` (or :func:`_visible_threads`), which pin
rows to the caller's workspace and, for an agent key, to its agent *and to the mail that
has reached it* (``visible_at`` set): held, quarantined or rule-trashed mail does not
exist for the agent, and a thread exists for it only once one of its messages does.
Owner keys see everything in their workspace. A row outside that scope is simply not
found, so a wrong-tenant id answers exactly like an id that never existed (no
existence leak).
Scopes are checked here, not at the edge, so every face (native ``/v1``, the
AgentMail-compatible ``/v0``, the MCP tools) gets the same authorisation for free.

Lists page with opaque cursors that name the last row returned (keyset pagination), so
a page costs the same at any depth and a row inserted while a caller walks the pages is
never returned twice.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeAlias, TypeVar

from sqlalchemy import (
    ColumnElement,
    Row,
    and_,
    exists,
    false,
    func,
    or_,
    select,
)
from sqlalchemy.exc import SQLAlchemyError

from mailgate.domain import folders
from mailgate.domain.keys import MESSAGES_READ, Principal
from mailgate.errors import NotFound, ServiceUnavailable, ValidationFailed
from mailgate.store import migrate
from mailgate.store.blobs import BlobStore
from mailgate.store.db import Database
from mailgate.store.schema import attachments, messages, threads

DEFAULT_LIMIT = 50
MAX_LIMIT = 100

T = TypeVar("T")
_Row: TypeAlias = Row[*tuple[Any, ...]]


@dataclass(frozen=True, slots=True)
class Address:
    name: str | None
    address: str


@dataclass(frozen=True, slots=True)
class MessageSummary:
    """What a mailbox listing shows: enough to decide whether to open the message."""

    message_id: str
    agent_id: str
    thread_id: str
    folder: str
    direction: str
    from_: Address | None
    to: tuple[Address, ...]
    cc: tuple[Address, ...]
    subject: str
    preview: str
    date: datetime | None
    received_at: datetime
    labels: tuple[str, ...]
    size: int
    attachment_count: int
    previous_folder: str | None
    """Where a trashed message is restored to; where released mail was held."""
    visible_at: datetime | None
    """When the message first reached its agent; None while it never has (held,
    quarantined or trashed on arrival). Agent keys only ever see messages with one."""
    decision: dict[str, Any] | None
    """The inbound rule decision (action, rule, reasons); owner keys only."""


@dataclass(frozen=True, slots=True)
class Envelope:
    """What the transport said, kept apart from the headers (which the sender wrote)."""

    mail_from: str | None
    rcpt_to: str | None
    client_address: str | None
    helo: str | None
    source: str


@dataclass(frozen=True, slots=True)
class AttachmentInfo:
    attachment_id: str
    filename: str | None
    content_type: str
    size: int
    content_id: str | None
    disposition: str | None


@dataclass(frozen=True, slots=True)
class MessageDetail:
    """One message with its parsed fields, envelope and attachment list (not the bytes)."""

    summary: MessageSummary
    reply_to: tuple[Address, ...]
    rfc_message_id: str
    message_id_generated: bool
    in_reply_to: str | None
    references: tuple[str, ...]
    text: str | None
    html: str | None
    defects: tuple[str, ...]
    envelope: Envelope
    attachments: tuple[AttachmentInfo, ...]
    auth_results: dict[str, Any] | None
    """Sender authentication (SPF, DKIM, DMARC, ARC) as checked at ingest, or None."""


@dataclass(frozen=True, slots=True)
class AttachmentContent:
    info: AttachmentInfo
    data: bytes


@dataclass(frozen=True, slots=True)
class ThreadSummary:
    thread_id: str
    agent_id: str
    subject: str
    participants: tuple[str, ...]
    message_count: int
    first_message_at: datetime
    last_message_at: datetime


@dataclass(frozen=True, slots=True)
class ThreadDetail:
    thread: ThreadSummary
    messages: tuple[MessageSummary, ...]  # oldest first


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a listing; ``next_cursor`` is None on the last page."""

    items: tuple[T, ...]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class MessageFilter:
    """Optional narrowing of a message listing; every field given must match."""

    folder: str | None = None
    thread_id: str | None = None
    from_address: str | None = None
    since: datetime | None = None
    agent_id: str | None = None
    folders: frozenset[str] | None = None
    """Any of these folders (the review inbox lists ``review`` and ``quarantine``)."""


class QueryService:
    """Reads for API callers. Each method is one short read transaction."""

    def __init__(self, db: Database, blobs: BlobStore) -> None:
        self.db = db
        self.blobs = blobs

    # -- messages -----------------------------------------------------------------------

    def list_messages(
        self,
        principal: Principal,
        filters: MessageFilter | None = None,
        *,
        limit: int = DEFAULT_LIMIT,
        cursor: str | None = None,
    ) -> Page[MessageSummary]:
        """Messages newest first (by arrival order, ``seq``).

        An agent key naming another agent in ``filters.agent_id`` gets an empty page,
        as it would for an agent that does not exist.

        Raises:
            Forbidden: the key lacks ``messages:read``.
            ValidationFailed: ``limit`` out of range or a malformed ``cursor``.
        """
        principal.require(MESSAGES_READ)
        filters = filters or MessageFilter()
        check_limit(limit)
        query = (
            select(*SUMMARY_COLUMNS)
            .where(visible_messages(principal))
            .order_by(messages.c.seq.desc())
            .limit(limit + 1)
        )
        if cursor is not None:
            query = query.where(messages.c.seq < decode_seq_cursor(cursor))
        if filters.agent_id is not None:
            query = query.where(messages.c.agent_id == filters.agent_id)
        if filters.folder is not None:
            query = query.where(messages.c.folder == filters.folder)
        if filters.folders is not None:
            query = query.where(messages.c.folder.in_(sorted(filters.folders)))
        if filters.thread_id is not None:
            query = query.where(messages.c.thread_id == filters.thread_id)
        if filters.since is not None:
            query = query.where(messages.c.received_at >= _as_utc(filters.since))
        if filters.from_address is not None:
            query = query.where(_from_matches(filters.from_address))
        with self.db.read() as conn:
            rows = conn.execute(query).all()
        rows, last = page_rows(rows, limit)
        next_cursor = encode_seq_cursor(last.seq) if last is not None else None
        return Page(tuple(summary_of(row, principal) for row in rows), next_cursor)

    def list_held(
        self,
        principal: Principal,
        *,
        folder: str | None = None,
        agent_id: str | None = None,
        limit: int = DEFAULT_LIMIT,
        cursor: str | None = None,
    ) -> Page[MessageSummary]:
        """The review inbox: mail rules held for a human, newest first (owner keys).

        ``folder`` narrows it to ``review`` or ``quarantine``; by default both.

        Raises:
            Forbidden: an agent key (held mail is for owners).
            ValidationFailed: ``folder`` is not a held folder, ``limit`` out of range
                or a malformed ``cursor``.
        """
        principal.require_owner()
        if folder is not None and folder not in folders.HELD:
            raise ValidationFailed(
                f"{folder!r} is not a held folder",
                errors=[{"field": "folder", "message": "must be review or quarantine"}],
            )
        filters = MessageFilter(
            agent_id=agent_id, folders=frozenset({folder}) if folder else folders.HELD
        )
        return self.list_messages(principal, filters, limit=limit, cursor=cursor)

    def list_trash(
        self,
        principal: Principal,
        *,
        agent_id: str | None = None,
        limit: int = DEFAULT_LIMIT,
        cursor: str | None = None,
    ) -> Page[MessageSummary]:
        """Trashed mail, newest first: everything in the workspace for owner keys, the
        agent's own visible mail for agent keys (what it may restore).

        Raises:
            Forbidden: the key lacks ``messages:read``.
            ValidationFailed: ``limit`` out of range or a malformed ``cursor``.
        """
        filters = MessageFilter(agent_id=agent_id, folder=folders.TRASH)
        return self.list_messages(principal, filters, limit=limit, cursor=cursor)

    def get_message(self, principal: Principal, message_id: str) -> MessageDetail:
        """One message with everything parsed from it.

        Raises:
            Forbidden: the key lacks ``messages:read``.
            NotFound: no such message visible to the caller.
        """
        principal.require(MESSAGES_READ)
        query = select(*SUMMARY_COLUMNS, *_DETAIL_COLUMNS).where(
            messages.c.id == message_id, visible_messages(principal)
        )
        with self.db.read() as conn:
            row = conn.execute(query).first()
            if row is None:
                raise NotFound(f"no message {message_id}")
            found = conn.execute(
                select(attachments)
                .where(attachments.c.message_id == message_id)
                .order_by(attachments.c.position)
            ).all()
        return MessageDetail(
            summary=summary_of(row, principal),
            reply_to=_addresses(row.reply_to),
            rfc_message_id=row.rfc_message_id,
            message_id_generated=bool(row.message_id_generated),
            in_reply_to=row.in_reply_to,
            references=tuple(row.references),
            text=row.text_body,
            html=row.html_body,
            defects=tuple(str(d) for d in row.defects),
            envelope=Envelope(
                mail_from=row.mail_from,
                rcpt_to=row.rcpt_to,
                client_address=row.client_address,
                helo=row.helo,
                source=row.source,
            ),
            attachments=tuple(_attachment_info(a) for a in found),
            auth_results=row.auth_results,
        )

    def get_raw(self, principal: Principal, message_id: str) -> bytes:
        """The message exactly as it arrived (the stored blob, byte for byte).

        Raises:
            Forbidden: the key lacks ``messages:read``.
            NotFound: no such message visible to the caller.
        """
        principal.require(MESSAGES_READ)
        with self.db.read() as conn:
            sha = conn.execute(
                select(messages.c.raw_sha256).where(
                    messages.c.id == message_id, visible_messages(principal)
                )
            ).scalar_one_or_none()
        if sha is None:
            raise NotFound(f"no message {message_id}")
        return self.blobs.get(sha)

    def get_attachment(
        self, principal: Principal, message_id: str, attachment_id: str
    ) -> AttachmentContent:
        """An attachment's metadata and bytes; it must belong to that message.

        Raises:
            Forbidden: the key lacks ``messages:read``.
            NotFound: no such attachment on a message visible to the caller.
        """
        principal.require(MESSAGES_READ)
        query = (
            select(attachments)
            .join(messages, messages.c.id == attachments.c.message_id)
            .where(
                attachments.c.id == attachment_id,
                attachments.c.message_id == message_id,
                visible_messages(principal),
            )
        )
        with self.db.read() as conn:
            row = conn.execute(query).first()
        if row is None:
            raise NotFound(f"no attachment {attachment_id} on message {message_id}")
        return AttachmentContent(_attachment_info(row), self.blobs.get(row.sha256))

    # -- threads ------------------------------------------------------------------------

    def list_threads(
        self,
        principal: Principal,
        *,
        agent_id: str | None = None,
        limit: int = DEFAULT_LIMIT,
        cursor: str | None = None,
    ) -> Page[ThreadSummary]:
        """Threads with the most recent activity first (ties broken by id).

        The sort key moves when a thread gets a message, so a thread that is active while
        a caller pages may appear again on the first page of a fresh walk; within one
        walk the keyset cursor never repeats a (time, id) position.

        Raises:
            Forbidden: the key lacks ``messages:read``.
            ValidationFailed: ``limit`` out of range or a malformed ``cursor``.
        """
        principal.require(MESSAGES_READ)
        check_limit(limit)
        query = (
            select(*_thread_columns(principal))
            .where(_visible_threads(principal))
            .order_by(threads.c.last_message_at.desc(), threads.c.id.desc())
            .limit(limit + 1)
        )
        if agent_id is not None:
            query = query.where(threads.c.agent_id == agent_id)
        if cursor is not None:
            at, last_id = decode_time_cursor(cursor)
            query = query.where(
                or_(
                    threads.c.last_message_at < at,
                    and_(threads.c.last_message_at == at, threads.c.id < last_id),
                )
            )
        with self.db.read() as conn:
            rows = conn.execute(query).all()
        rows, last = page_rows(rows, limit)
        next_cursor = None
        if last is not None:
            next_cursor = encode_cursor("t", f"{last.last_message_at.isoformat()}|{last.id}")
        return Page(tuple(_thread(row) for row in rows), next_cursor)

    def get_thread(self, principal: Principal, thread_id: str) -> ThreadDetail:
        """A thread and all its messages the caller may see, oldest first.

        Raises:
            Forbidden: the key lacks ``messages:read``.
            NotFound: no such thread visible to the caller.
        """
        principal.require(MESSAGES_READ)
        with self.db.read() as conn:
            row = conn.execute(
                select(*_thread_columns(principal)).where(
                    threads.c.id == thread_id, _visible_threads(principal)
                )
            ).first()
            if row is None:
                raise NotFound(f"no thread {thread_id}")
            found = conn.execute(
                select(*SUMMARY_COLUMNS)
                .where(messages.c.thread_id == thread_id, visible_messages(principal))
                .order_by(messages.c.seq)
            ).all()
        return ThreadDetail(_thread(row), tuple(summary_of(m, principal) for m in found))

    # -- operations ---------------------------------------------------------------------

    def check_ready(self) -> None:
        """Whether this process can serve: the database answers and is fully migrated.

        Raises:
            DatabaseNotMigrated: the schema is behind the code.
            ServiceUnavailable: the database cannot be reached.
        """
        try:
            migrate.ensure_migrated(self.db)
        except SQLAlchemyError as exc:
            # The driver's message can name hosts and users: keep it out of the reply.
            raise ServiceUnavailable("database unreachable") from exc


# -- helpers ----------------------------------------------------------------------------

SUMMARY_COLUMNS = (
    messages.c.seq,
    messages.c.id,
    messages.c.agent_id,
    messages.c.thread_id,
    messages.c.folder,
    messages.c.direction,
    messages.c.from_addr,
    messages.c.to_addrs,
    messages.c.cc_addrs,
    messages.c.subject,
    messages.c.preview,
    messages.c.sent_date,
    messages.c.received_at,
    messages.c.labels,
    messages.c.raw_size,
    messages.c.previous_folder,
    messages.c.visible_at,
    messages.c.decision,
    select(func.count())
    .select_from(attachments)
    .where(attachments.c.message_id == messages.c.id)
    .scalar_subquery()
    .label("attachment_count"),
)

_DETAIL_COLUMNS = (
    messages.c.reply_to,
    messages.c.rfc_message_id,
    messages.c.message_id_generated,
    messages.c.in_reply_to,
    messages.c.references,
    messages.c.text_body,
    messages.c.html_body,
    messages.c.defects,
    messages.c.mail_from,
    messages.c.rcpt_to,
    messages.c.client_address,
    messages.c.helo,
    messages.c.source,
    messages.c.auth_results,
)


def visible_messages(principal: Principal) -> ColumnElement[bool]:
    """The messages the caller may see: its workspace's (owner keys), or its agent's
    that have reached it (agent keys)."""
    in_workspace = messages.c.workspace_id == principal.workspace_id
    if principal.is_owner:
        return in_workspace
    if principal.agent_id is None:
        # An agent key without an agent would be a bug: match nothing rather than all.
        return false()
    return and_(
        in_workspace,
        messages.c.agent_id == principal.agent_id,
        messages.c.visible_at.is_not(None),
    )


def _visible_threads(principal: Principal) -> ColumnElement[bool]:
    """The threads the caller may see: for an agent key, its threads with at least one
    message that has reached it (a thread of held mail only does not exist for it)."""
    in_workspace = threads.c.workspace_id == principal.workspace_id
    if principal.is_owner:
        return in_workspace
    if principal.agent_id is None:
        return false()
    return and_(
        in_workspace,
        threads.c.agent_id == principal.agent_id,
        exists().where(messages.c.thread_id == threads.c.id, messages.c.visible_at.is_not(None)),
    )


def _thread_columns(principal: Principal) -> tuple[Any, ...]:
    """The thread row as the caller may see it: for an agent key, ``message_count``
    counts only the messages that have reached it, so held mail is not betrayed by it."""
    if principal.is_owner:
        return tuple(threads.c)
    visible_count = (
        select(func.count())
        .select_from(messages)
        .where(messages.c.thread_id == threads.c.id, messages.c.visible_at.is_not(None))
        .scalar_subquery()
        .label("message_count")
    )
    return (*(c for c in threads.c if c.name != "message_count"), visible_count)


def page_rows(rows: Sequence[_Row], limit: int) -> tuple[Sequence[_Row], _Row | None]:
    """A page from ``limit + 1`` fetched rows, and the row a next cursor continues
    after (None on the last page)."""
    page = rows[:limit]
    return page, (page[-1] if len(rows) > limit else None)


def _from_matches(address: str) -> ColumnElement[bool]:
    """Exact, case-insensitive match on the first ``From`` address (an indexed column)."""
    return messages.c.from_address == address.strip().lower()


def _as_utc(moment: datetime) -> datetime:
    """A naive time is read as UTC (what the API documents), an aware one converted."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_LIMIT:
        raise ValidationFailed(
            f"limit must be between 1 and {MAX_LIMIT}",
            errors=[{"field": "limit", "message": f"must be between 1 and {MAX_LIMIT}"}],
        )


def encode_cursor(kind: str, value: str) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{value}".encode()).decode().rstrip("=")


def _decode_cursor(kind: str, cursor: str) -> str:
    """The value inside a cursor of ``kind``; anything else is the caller's mistake.

    Raises:
        ValidationFailed: not a cursor this listing handed out.
    """
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        text = ""
    found, sep, value = text.partition(":")
    if found != kind or not sep or not value:
        raise _bad_cursor()
    return value


def encode_seq_cursor(seq: int) -> str:
    """The cursor after ``seq`` in a listing ordered by ``seq`` (read back with
    :func:`decode_seq_cursor`)."""
    return encode_cursor("m", str(seq))


def decode_seq_cursor(cursor: str) -> int:
    value = _decode_cursor("m", cursor)
    if not value.isdigit() or len(value) > 19:
        raise _bad_cursor()
    return int(value)


def decode_time_cursor(cursor: str, kind: str = "t") -> tuple[datetime, str]:
    """``(time, id)`` of a cursor made as ``encode_cursor(kind, f"{iso time}|{id}")``:
    for listings ordered by a time and then an id.

    Raises:
        ValidationFailed: not a cursor this listing handed out.
    """
    at_text, sep, last_id = _decode_cursor(kind, cursor).partition("|")
    try:
        at = datetime.fromisoformat(at_text)
    except ValueError:
        raise _bad_cursor() from None
    if not sep or not last_id or at.tzinfo is None:
        raise _bad_cursor()
    return at, last_id


def _bad_cursor() -> ValidationFailed:
    return ValidationFailed(
        "cursor is not one this listing handed out",
        errors=[{"field": "cursor", "message": "invalid cursor"}],
    )


def _address(value: Any) -> Address:
    return Address(name=value.get("name") or None, address=str(value.get("address") or ""))


def _addresses(values: Sequence[Any]) -> tuple[Address, ...]:
    return tuple(_address(v) for v in values)


def summary_of(row: _Row, principal: Principal | None) -> MessageSummary:
    """A listing entry from a row of :data:`SUMMARY_COLUMNS`. The rule decision is
    shown to owners only (``principal`` None: the server's operator, also shown)."""
    senders = row.from_addr
    owner = principal is None or principal.is_owner
    return MessageSummary(
        message_id=row.id,
        agent_id=row.agent_id,
        thread_id=row.thread_id,
        folder=row.folder,
        direction=row.direction,
        from_=_address(senders[0]) if senders else None,
        to=_addresses(row.to_addrs),
        cc=_addresses(row.cc_addrs),
        subject=row.subject,
        preview=row.preview,
        date=row.sent_date,
        received_at=row.received_at,
        labels=tuple(row.labels),
        size=int(row.raw_size),
        attachment_count=int(row.attachment_count),
        previous_folder=row.previous_folder,
        visible_at=row.visible_at,
        decision=row.decision if owner else None,
    )


def _attachment_info(row: _Row) -> AttachmentInfo:
    return AttachmentInfo(
        attachment_id=row.id,
        filename=row.filename,
        content_type=row.content_type,
        size=int(row.size),
        content_id=row.content_id,
        disposition=row.disposition,
    )


def _thread(row: _Row) -> ThreadSummary:
    return ThreadSummary(
        thread_id=row.id,
        agent_id=row.agent_id,
        subject=row.subject,
        participants=tuple(row.participants),
        message_count=int(row.message_count),
        first_message_at=row.first_message_at,
        last_message_at=row.last_message_at,
    )
