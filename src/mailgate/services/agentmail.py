"""Our messages and threads as AgentMail's models (``Message``, ``MessageItem``,
``ThreadItem``, ``Thread``, ``AttachmentResponse``, ``RawMessageResponse``).

Every read goes through :func:`~mailgate.services.queries.visible_messages`, so an
agent key sees only its agent's mail that has reached it, and anything else is
``NotFound`` exactly like an id that never existed.

**Labels.** AgentMail labels a message with system labels and the caller's own. Ours:

=============  ===============================================  ======================
label          meaning                                          stored?
=============  ===============================================  ======================
``received``   inbound mail                                     computed (direction)
``sent``       outbound mail a transport accepted               computed (folder sent)
``queued``     outbound mail not yet handed to a transport      computed (folder outbox)
``trash``      in the trash (restorable)                        computed (folder)
``blocked``    held by a rule for review (owners only)          computed (folder review)
``spam``       quarantined by a rule (owners only)              computed (folder quarantine)
``unread``     not yet marked read                              stored (ingest sets it)
anything else  the caller's own labels                          stored
=============  ===============================================  ======================

Computed labels follow the folder, so they cannot be added or removed by a label
update (moves have their own routes); ``unread`` can, and ``read`` is accepted as
its opposite (adding ``read`` removes ``unread``). Held mail maps onto AgentMail's
``blocked``/``spam`` so its ``include_blocked``/``include_spam`` switches keep their
meaning: like ``trash``, such mail is left out of listings unless asked for (or
named in ``labels``). ``include_unauthenticated`` is accepted and changes nothing:
our inbound rules, not the listing, decide what unauthenticated mail may reach.

Label filters run in SQL (:func:`_has_label`), so paging stays keyset-exact.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import (
    ColumnElement,
    Connection,
    Text,
    and_,
    cast,
    exists,
    func,
    literal,
    not_,
    or_,
    select,
    true,
)
from sqlalchemy.dialects.postgresql import JSONB

from mailgate.clock import Clock, SystemClock
from mailgate.config import Settings
from mailgate.domain import folders
from mailgate.domain.extract import reply_html, reply_text
from mailgate.domain.keys import MESSAGES_READ, MESSAGES_WRITE, Principal
from mailgate.errors import NotFound, ValidationFailed
from mailgate.services import audit
from mailgate.services.links import LinkSigner
from mailgate.services.queries import (
    check_limit,
    decode_seq_cursor,
    decode_time_cursor,
    encode_cursor,
    encode_seq_cursor,
    page_rows,
    visible_messages,
)
from mailgate.store.blobs import BlobStore
from mailgate.store.db import Database
from mailgate.store.schema import agent_addresses, attachments, messages, threads

RECEIVED: Final = "received"
SENT: Final = "sent"
QUEUED: Final = "queued"
TRASH: Final = "trash"
BLOCKED: Final = "blocked"
SPAM: Final = "spam"
UNREAD: Final = "unread"
READ: Final = "read"

FOLDER_LABELS: Final = {
    folders.SENT: SENT,
    folders.OUTBOX: QUEUED,
    folders.TRASH: TRASH,
    folders.REVIEW: BLOCKED,
    folders.QUARANTINE: SPAM,
}
SYSTEM_LABELS: Final = frozenset({RECEIVED, *FOLDER_LABELS.values()})
"""Labels that follow the message's direction or folder; a label update cannot move them."""

MAX_LABELS: Final = 50
MAX_LABEL_CHARS: Final = 100
_LABEL_BAD = re.compile(r"[\x00-\x1f\x7f]")

_PATH_UNSAFE = re.compile(r"[/?#%\\\s]|[^\x21-\x7e]")
_NAME_SPECIALS = re.compile(r'[()<>\[\]:;@\\,."]')


@dataclass(frozen=True, slots=True)
class MessageQuery:
    """AgentMail's message listing filters (``from``/``to``/``subject``: substrings,
    case-insensitive, every value must match)."""

    labels: tuple[str, ...] = ()
    before: datetime | None = None
    after: datetime | None = None
    ascending: bool = False
    include_spam: bool = False
    include_blocked: bool = False
    include_trash: bool = False
    from_: tuple[str, ...] = ()
    to: tuple[str, ...] = ()
    subject: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ThreadQuery:
    """AgentMail's thread listing filters; a thread matches a label when one of its
    messages (that the caller may see) carries it."""

    labels: tuple[str, ...] = ()
    before: datetime | None = None
    after: datetime | None = None
    ascending: bool = False
    include_spam: bool = False
    include_blocked: bool = False
    include_trash: bool = False
    senders: tuple[str, ...] = ()
    recipients: tuple[str, ...] = ()
    subject: tuple[str, ...] = ()


_MESSAGE_COLUMNS = (
    messages.c.seq,
    messages.c.id,
    messages.c.agent_id,
    messages.c.thread_id,
    messages.c.direction,
    messages.c.folder,
    messages.c.rfc_message_id,
    messages.c.raw_size,
    messages.c.subject,
    messages.c.from_addr,
    messages.c.to_addrs,
    messages.c.cc_addrs,
    messages.c.reply_to,
    messages.c.in_reply_to,
    messages.c.references,
    messages.c.preview,
    messages.c.labels,
    messages.c.received_at,
    messages.c.folder_changed_at,
)


class AgentMailViews:
    """Reads (and the label update) of the ``/v0`` face. Methods take the caller's
    connection so a route, or another service, composes them in one transaction."""

    def __init__(
        self,
        db: Database,
        blobs: BlobStore,
        settings: Settings,
        *,
        clock: Clock | None = None,
    ) -> None:
        self.db = db
        self.blobs = blobs
        self.settings = settings
        self.clock = clock or SystemClock()
        self.links = LinkSigner(settings, self.clock)

    # -- messages -----------------------------------------------------------------------

    def message(self, conn: Connection, principal: Principal, message_id: str) -> dict[str, Any]:
        """The full ``Message`` of ``message_id`` (our ``msg_`` id, or an RFC
        Message-ID with or without brackets: the newest copy the caller may see).

        Raises:
            Forbidden: the key lacks ``messages:read``.
            NotFound: no such message visible to the caller.
        """
        principal.require(MESSAGES_READ)
        row = self._message_row(conn, principal, message_id, full=True)
        return self._messages_full(conn, [row])[0]

    def list_messages(
        self,
        conn: Connection,
        principal: Principal,
        agent_id: str,
        query: MessageQuery,
        *,
        limit: int,
        page_token: str | None,
    ) -> dict[str, Any]:
        """``ListMessagesResponse`` for one inbox: newest first unless ``ascending``.

        Raises:
            Forbidden: the key lacks ``messages:read``.
            ValidationFailed: ``limit`` out of range or a malformed ``page_token``.
        """
        principal.require(MESSAGES_READ)
        check_limit(limit)
        order = messages.c.seq.asc() if query.ascending else messages.c.seq.desc()
        stmt = (
            select(*_MESSAGE_COLUMNS)
            .where(visible_messages(principal), messages.c.agent_id == agent_id)
            .order_by(order)
            .limit(limit + 1)
        )
        if page_token:
            after_seq = _decode_page_token(page_token)
            stmt = stmt.where(
                messages.c.seq > after_seq if query.ascending else messages.c.seq < after_seq
            )
        stmt = stmt.where(*_message_conditions(conn, query))
        rows, last = page_rows(conn.execute(stmt).all(), limit)
        items = self._message_items(conn, rows)
        return {
            "count": len(items),
            "limit": limit,
            "next_page_token": encode_seq_cursor(last.seq) if last is not None else None,
            "messages": items,
        }

    def raw(self, conn: Connection, principal: Principal, message_id: str) -> dict[str, Any]:
        """``RawMessageResponse``: a signed link to the message's bytes as received.

        Raises:
            Forbidden: the key lacks ``messages:read``.
            NotFound: no such message visible to the caller.
        """
        principal.require(MESSAGES_READ)
        row = self._message_row(conn, principal, message_id)
        link = self.links.sign("raw", row.id, f"/v0/messages/{row.id}/raw/download")
        return {
            "message_id": public_message_id(row.rfc_message_id, row.id),
            "size": int(row.raw_size),
            "download_url": link.url,
            "expires_at": iso(link.expires_at),
        }

    def raw_bytes(self, conn: Connection, message_id: str) -> bytes:
        """The stored bytes of ``message_id`` (our id), for a signed link's holder.

        Raises:
            NotFound: no such message.
        """
        sha = conn.execute(
            select(messages.c.raw_sha256).where(messages.c.id == message_id)
        ).scalar_one_or_none()
        if sha is None:
            raise NotFound(f"no message {message_id}")
        return self.blobs.get(str(sha))

    def update_labels(
        self,
        conn: Connection,
        principal: Principal,
        message_id: str,
        *,
        add: Sequence[str],
        remove: Sequence[str],
    ) -> dict[str, Any]:
        """Adds and removes stored labels (``UpdateMessageResponse``), audited as
        ``message.labels_updated``. Run it in a write transaction.

        Raises:
            Forbidden: the key lacks ``messages:write``.
            NotFound: no such message visible to the caller.
            ValidationFailed: a system label, an empty or over-long label, a label in
                both lists, or more than :data:`MAX_LABELS` labels on the message.
        """
        principal.require(MESSAGES_WRITE)
        add_set, remove_set = label_changes(add, remove)
        row = self._message_row(conn, principal, message_id)
        stored = [str(label) for label in row.labels]
        updated = [label for label in stored if label not in remove_set]
        updated += sorted(label for label in add_set if label not in updated)
        if len(updated) > MAX_LABELS:
            raise _invalid("add_labels", f"a message holds at most {MAX_LABELS} labels")
        if updated != stored:
            now = self.clock.now()
            conn.execute(messages.update().where(messages.c.id == row.id).values(labels=updated))
            audit.record(
                conn,
                workspace_id=principal.workspace_id,
                actor=principal.actor,
                action="message.labels_updated",
                at=now,
                target_type="message",
                target_id=row.id,
                added=sorted(add_set - set(stored)),
                removed=sorted(remove_set & set(stored)),
            )
        return {
            "message_id": public_message_id(row.rfc_message_id, row.id),
            "labels": _labels(row.direction, row.folder, updated),
        }

    def label_sent_copy(
        self, conn: Connection, message_id: str, add: Sequence[str], remove: Sequence[str]
    ) -> None:
        """Put the labels a send asked for (``labels`` on send, ``add_labels`` /
        ``remove_labels`` on a draft's send) on the agent's copy of what it just sent.

        The send checked who may act for the agent, and the edge checked the labels
        with :func:`label_changes` before sending, so nothing is refused here after
        the mail has gone. Idempotent (a replayed send applies them again); existing
        labels keep their order, new ones follow as given. Run it in a write
        transaction.
        """
        add_set, remove_set = label_changes(add, remove)
        current = conn.execute(
            select(messages.c.labels).where(messages.c.id == message_id)
        ).scalar_one_or_none()
        if current is None:
            return
        added = [label.strip() for label in add if label.strip() in add_set]
        merged = [x for x in dict.fromkeys([*current, *added]) if x not in remove_set]
        if merged != list(current):
            conn.execute(messages.update().where(messages.c.id == message_id).values(labels=merged))

    # -- attachments ----------------------------------------------------------------------

    def attachment(
        self,
        conn: Connection,
        principal: Principal,
        attachment_id: str,
        *,
        message_id: str | None = None,
        thread_id: str | None = None,
        agent_id: str | None = None,
    ) -> dict[str, Any]:
        """``AttachmentResponse``: metadata plus signed ``download_url`` (and
        ``text_url``) valid until ``expires_at``. The attachment must belong to the
        named message (our id) or thread, in ``agent_id``'s mail when given.

        Raises:
            Forbidden: the key lacks ``messages:read``.
            NotFound: no such attachment where the caller may see it.
        """
        principal.require(MESSAGES_READ)
        stmt = (
            select(attachments)
            .join(messages, messages.c.id == attachments.c.message_id)
            .where(attachments.c.id == attachment_id, visible_messages(principal))
        )
        if message_id is not None:
            stmt = stmt.where(messages.c.id == message_id)
        if thread_id is not None:
            stmt = stmt.where(messages.c.thread_id == thread_id)
        if agent_id is not None:
            stmt = stmt.where(messages.c.agent_id == agent_id)
        row = conn.execute(stmt).first()
        if row is None:
            raise NotFound(f"no attachment {attachment_id}")
        download = self.links.sign("attachment", row.id, f"/v0/attachments/{row.id}/download")
        text = self.links.sign("attachment-text", row.id, f"/v0/attachments/{row.id}/text")
        body = _attachment(row)
        body.update(
            download_url=download.url,
            text_url=text.url,
            expires_at=iso(download.expires_at),
        )
        return body

    def attachment_bytes(
        self, conn: Connection, attachment_id: str
    ) -> tuple[dict[str, Any], bytes]:
        """An attachment's metadata and bytes, for a signed link's holder.

        Raises:
            NotFound: no such attachment.
        """
        row = conn.execute(select(attachments).where(attachments.c.id == attachment_id)).first()
        if row is None:
            raise NotFound(f"no attachment {attachment_id}")
        return _attachment(row), self.blobs.get(str(row.sha256))

    # -- threads --------------------------------------------------------------------------

    def thread_item(self, conn: Connection, principal: Principal, thread_id: str) -> dict[str, Any]:
        """The ``ThreadItem`` of ``thread_id`` as the caller may see it.

        Raises:
            Forbidden: the key lacks ``messages:read``.
            NotFound: no such thread visible to the caller.
        """
        principal.require(MESSAGES_READ)
        row = self._thread_row(conn, principal, thread_id)
        return self._thread_items(conn, principal, [row])[0]

    def thread(
        self,
        conn: Connection,
        principal: Principal,
        thread_id: str,
        *,
        agent_id: str | None = None,
        limit: int = 100,
        page_token: str | None = None,
    ) -> dict[str, Any]:
        """``Thread``: the ``ThreadItem`` plus a page of full messages. The first page
        holds the newest messages, each page ordered oldest first; ``next_page_token``
        continues with older ones.

        Raises:
            Forbidden: the key lacks ``messages:read``.
            NotFound: no such thread visible to the caller (in ``agent_id``'s inbox).
            ValidationFailed: ``limit`` out of range or a malformed ``page_token``.
        """
        principal.require(MESSAGES_READ)
        check_limit(limit)
        row = self._thread_row(conn, principal, thread_id, agent_id=agent_id)
        body = self._thread_items(conn, principal, [row])[0]
        stmt = (
            select(*_MESSAGE_COLUMNS, messages.c.text_body, messages.c.html_body)
            .where(messages.c.thread_id == row.id, visible_messages(principal))
            .order_by(messages.c.seq.desc())
            .limit(limit + 1)
        )
        if page_token:
            stmt = stmt.where(messages.c.seq < _decode_page_token(page_token))
        rows, last = page_rows(conn.execute(stmt).all(), limit)
        full = self._messages_full(conn, list(reversed(rows)))
        body.update(
            count=len(full),
            limit=limit,
            next_page_token=encode_seq_cursor(last.seq) if last is not None else None,
            messages=full,
        )
        return body

    def list_threads(
        self,
        conn: Connection,
        principal: Principal,
        query: ThreadQuery,
        *,
        agent_id: str | None,
        limit: int,
        page_token: str | None,
    ) -> dict[str, Any]:
        """``ListThreadsResponse``: most recent activity first unless ``ascending``;
        ``agent_id`` None lists every inbox the caller may see.

        Raises:
            Forbidden: the key lacks ``messages:read``.
            ValidationFailed: ``limit`` out of range or a malformed ``page_token``.
        """
        principal.require(MESSAGES_READ)
        check_limit(limit)
        at, tid = threads.c.last_message_at, threads.c.id
        order = (at.asc(), tid.asc()) if query.ascending else (at.desc(), tid.desc())
        stmt = (
            select(threads)
            .where(threads.c.workspace_id == principal.workspace_id)
            .where(*_thread_conditions(conn, principal, query))
            .order_by(*order)
            .limit(limit + 1)
        )
        if agent_id is not None:
            stmt = stmt.where(threads.c.agent_id == agent_id)
        if page_token:
            last_at, last_id = decode_time_cursor(page_token, "t")
            if query.ascending:
                stmt = stmt.where(or_(at > last_at, and_(at == last_at, tid > last_id)))
            else:
                stmt = stmt.where(or_(at < last_at, and_(at == last_at, tid < last_id)))
        rows, last = page_rows(conn.execute(stmt).all(), limit)
        items = self._thread_items(conn, principal, rows)
        next_token = None
        if last is not None:
            next_token = encode_cursor("t", f"{_utc(last.last_message_at).isoformat()}|{last.id}")
        return {
            "count": len(items),
            "limit": limit,
            "next_page_token": next_token,
            "threads": items,
        }

    # -- building blocks --------------------------------------------------------------------

    def resolve(
        self, conn: Connection, principal: Principal, message_id: str, *, agent_id: str
    ) -> str:
        """Our id of the message ``message_id`` names in ``agent_id``'s inbox: our
        ``msg_`` id, or its Message-ID with or without brackets (newest copy).

        Raises:
            NotFound: no such message visible to the caller in that inbox.
        """
        return str(self._message_row(conn, principal, message_id, agent_id=agent_id).id)

    def _message_row(
        self,
        conn: Connection,
        principal: Principal,
        message_id: str,
        *,
        full: bool = False,
        agent_id: str | None = None,
    ) -> Any:
        ref = message_id.strip()
        extra = (messages.c.text_body, messages.c.html_body) if full else ()
        stmt = select(*_MESSAGE_COLUMNS, *extra).where(visible_messages(principal))
        if agent_id is not None:
            stmt = stmt.where(messages.c.agent_id == agent_id)
        if ref.startswith("msg_"):
            stmt = stmt.where(messages.c.id == ref)
        else:
            # Stored bare; accepted with or without AgentMail's angle brackets.
            bare = ref.strip("<>").strip()
            stmt = stmt.where(messages.c.rfc_message_id.in_([bare, f"<{bare}>"]))
        row = conn.execute(stmt.order_by(messages.c.seq.desc()).limit(1)).first()
        if row is None:
            raise NotFound(f"no message {message_id}")
        return row

    def _thread_row(
        self,
        conn: Connection,
        principal: Principal,
        thread_id: str,
        *,
        agent_id: str | None = None,
    ) -> Any:
        stmt = select(threads).where(
            threads.c.id == thread_id,
            threads.c.workspace_id == principal.workspace_id,
            _has_visible_message(principal),
        )
        if agent_id is not None:
            stmt = stmt.where(threads.c.agent_id == agent_id)
        row = conn.execute(stmt).first()
        if row is None:
            raise NotFound(f"no thread {thread_id}")
        return row

    def _message_items(self, conn: Connection, rows: Sequence[Any]) -> list[dict[str, Any]]:
        inboxes = _inbox_ids(conn, {r.agent_id for r in rows})
        files = _attachments_of(conn, [r.id for r in rows])
        return [_message_item(r, inboxes[r.agent_id], files.get(r.id, [])) for r in rows]

    def _messages_full(self, conn: Connection, rows: Sequence[Any]) -> list[dict[str, Any]]:
        items = self._message_items(conn, rows)
        budget = self.settings.extract_max_chars
        for item, row in zip(items, rows, strict=True):
            text, html = row.text_body, row.html_body
            item["reply_to"] = [formatted(a) for a in row.reply_to]
            item["text"] = text
            item["html"] = html
            item["extracted_text"] = reply_text(text, html, max_chars=budget).text
            item["extracted_html"] = reply_html(html, max_chars=budget).text
        return items

    def _thread_items(
        self, conn: Connection, principal: Principal, rows: Sequence[Any]
    ) -> list[dict[str, Any]]:
        """ThreadItems for a page of thread rows: one query for their visible messages,
        one for those messages' attachments, one for the inbox ids."""
        if not rows:
            return []
        found = conn.execute(
            select(*_MESSAGE_COLUMNS)
            .where(messages.c.thread_id.in_([r.id for r in rows]), visible_messages(principal))
            .order_by(messages.c.seq)
        ).all()
        by_thread: dict[str, list[Any]] = defaultdict(list)
        for m in found:
            by_thread[m.thread_id].append(m)
        files = _attachments_of(conn, [m.id for m in found])
        inboxes = _inbox_ids(conn, {r.agent_id for r in rows})
        return [_thread_item(r, inboxes[r.agent_id], by_thread.get(r.id, []), files) for r in rows]


# -- translation ----------------------------------------------------------------------------


def iso(moment: datetime) -> str:
    """ISO 8601 in UTC with a ``Z``, as AgentMail writes times."""
    return _utc(moment).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def formatted(address: Any) -> str:
    """``Name <addr>`` (the name quoted when it holds specials), or the bare address."""
    addr = str(address.get("address") or "")
    name = str(address.get("name") or "").strip()
    if not name:
        return addr
    if _NAME_SPECIALS.search(name):
        name = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{name} <{addr}>"


def public_message_id(rfc_message_id: str, message_id: str) -> str:
    """The id /v0 shows for a message: its Message-ID in angle brackets (AgentMail's
    form; we store it bare), or our id when it cannot travel as one URL path segment
    (the rule of ``api/v0/common.py``, repeated so services do not import the API)."""
    bracketed = _bracketed(rfc_message_id)
    if bracketed and not _PATH_UNSAFE.search(bracketed):
        return bracketed
    return message_id


def _bracketed(msg_id: str | None) -> str:
    bare = (msg_id or "").strip().strip("<>").strip()
    return f"<{bare}>" if bare else ""


def _labels(direction: str, folder: str, stored: Iterable[str]) -> list[str]:
    system = [RECEIVED] if direction == "inbound" else []
    if folder in FOLDER_LABELS:
        system.append(FOLDER_LABELS[folder])
    return system + [label for label in stored if label not in system]


def _attachment(row: Any) -> dict[str, Any]:
    return {
        "attachment_id": row.id,
        "filename": row.filename,
        "size": int(row.size),
        "content_type": row.content_type,
        "content_disposition": row.disposition,
        "content_id": row.content_id,
    }


def _message_item(row: Any, inbox_id: str, files: list[dict[str, Any]]) -> dict[str, Any]:
    senders = row.from_addr
    received = iso(row.received_at)
    return {
        "inbox_id": inbox_id,
        "thread_id": row.thread_id,
        "message_id": public_message_id(row.rfc_message_id, row.id),
        "labels": _labels(row.direction, row.folder, row.labels),
        "timestamp": received,
        "from": formatted(senders[0]) if senders else "",
        "to": [formatted(a) for a in row.to_addrs],
        "cc": [formatted(a) for a in row.cc_addrs],
        "subject": row.subject,
        "preview": row.preview,
        "attachments": files,
        "in_reply_to": _bracketed(row.in_reply_to) or None,
        "references": [_bracketed(str(r)) for r in row.references],
        "size": int(row.raw_size),
        "updated_at": iso(row.folder_changed_at or row.received_at),
        "created_at": received,
    }


def _thread_item(
    row: Any, inbox_id: str, found: list[Any], files: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    labels: list[str] = []
    senders: list[str] = []
    recipients: list[str] = []
    for m in found:
        for label in _labels(m.direction, m.folder, m.labels):
            if label not in labels:
                labels.append(label)
        for a in m.from_addr[:1]:
            if formatted(a) not in senders:
                senders.append(formatted(a))
        for a in [*m.to_addrs, *m.cc_addrs]:
            if formatted(a) not in recipients:
                recipients.append(formatted(a))
    received = [m.received_at for m in found if m.direction == "inbound"]
    sent = [m.received_at for m in found if m.direction != "inbound"]
    newest = found[-1] if found else None
    last_at = newest.received_at if newest is not None else row.last_message_at
    item: dict[str, Any] = {
        "inbox_id": inbox_id,
        "thread_id": row.id,
        "labels": labels,
        "timestamp": iso(last_at),
        "received_timestamp": iso(max(received)) if received else None,
        "sent_timestamp": iso(max(sent)) if sent else None,
        "senders": senders,
        "recipients": recipients,
        "subject": newest.subject if newest is not None else row.subject,
        "preview": newest.preview if newest is not None else "",
        "attachments": [f for m in found for f in files.get(m.id, [])],
        "last_message_id": (
            public_message_id(newest.rfc_message_id, newest.id) if newest is not None else ""
        ),
        "message_count": len(found),
        "size": sum(int(m.raw_size) for m in found),
        "updated_at": iso(last_at),
        "created_at": iso(found[0].received_at if found else row.first_message_at),
    }
    return item


def _inbox_ids(conn: Connection, agent_ids: set[str]) -> dict[str, str]:
    """Each agent's first address (its inbox id), the agent id when it has none."""
    result = {agent_id: agent_id for agent_id in agent_ids}
    if not agent_ids:
        return result
    rows = conn.execute(
        select(agent_addresses.c.agent_id, agent_addresses.c.address)
        .where(agent_addresses.c.agent_id.in_(sorted(agent_ids)))
        .order_by(agent_addresses.c.created_at.desc(), agent_addresses.c.address.desc())
    ).all()
    for agent_id, address in rows:  # oldest last: it wins
        result[agent_id] = str(address)
    return result


def _attachments_of(conn: Connection, message_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = defaultdict(list)
    if not message_ids:
        return found
    rows = conn.execute(
        select(attachments)
        .where(attachments.c.message_id.in_(message_ids))
        .order_by(attachments.c.message_id, attachments.c.position)
    ).all()
    for row in rows:
        found[row.message_id].append(_attachment(row))
    return found


# -- filters in SQL ---------------------------------------------------------------------------


def _has_label(conn: Connection, label: str) -> ColumnElement[bool]:
    """``messages.labels`` (a JSON list) contains ``label``.

    The one dialect-specific expression of this module: PostgreSQL tests JSON
    containment (``labels::jsonb @> '["x"]'``), SQLite walks the list with
    ``json_each``. Both read the stored list as written by ingest and label updates.
    """
    if conn.dialect.name == "postgresql":
        return cast(messages.c.labels, JSONB).contains(cast(literal(json.dumps([label])), JSONB))
    each = func.json_each(messages.c.labels).table_valued("value").alias("label_each")
    return exists(select(literal(1)).select_from(each).where(each.c.value == label))


def _label_condition(conn: Connection, label: str) -> ColumnElement[bool]:
    """A label as a condition: system labels are folders or the direction."""
    if label == RECEIVED:
        return messages.c.direction == "inbound"
    for folder, name in FOLDER_LABELS.items():
        if label == name:
            return messages.c.folder == folder
    if label == READ:
        return not_(_has_label(conn, UNREAD))
    return _has_label(conn, label)


def _hidden_folders(
    labels: Sequence[str], include_spam: bool, include_blocked: bool, include_trash: bool
) -> list[str]:
    """Folders a listing leaves out unless asked for (by a switch or a label)."""
    hidden = []
    if not (include_trash or TRASH in labels):
        hidden.append(folders.TRASH)
    if not (include_spam or SPAM in labels):
        hidden.append(folders.QUARANTINE)
    if not (include_blocked or BLOCKED in labels):
        hidden.append(folders.REVIEW)
    return hidden


def _contains(expr: Any, value: str) -> ColumnElement[bool]:
    return func.lower(cast(expr, Text)).contains(value.lower(), autoescape=True)


def _message_conditions(conn: Connection, query: MessageQuery) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = [
        _label_condition(conn, label) for label in query.labels
    ]
    hidden = _hidden_folders(
        query.labels, query.include_spam, query.include_blocked, query.include_trash
    )
    if hidden:
        conditions.append(messages.c.folder.not_in(hidden))
    if query.before is not None:
        conditions.append(messages.c.received_at < _utc(query.before))
    if query.after is not None:
        conditions.append(messages.c.received_at > _utc(query.after))
    conditions += [_contains(messages.c.from_addr, v) for v in query.from_]
    conditions += [
        or_(_contains(messages.c.to_addrs, v), _contains(messages.c.cc_addrs, v)) for v in query.to
    ]
    conditions += [_contains(messages.c.subject, v) for v in query.subject]
    return conditions


def _has_visible_message(
    principal: Principal, *conditions: ColumnElement[bool]
) -> ColumnElement[bool]:
    """The thread has a message the caller may see (meeting ``conditions``)."""
    return exists().where(
        messages.c.thread_id == threads.c.id, visible_messages(principal), *conditions
    )


def _thread_conditions(
    conn: Connection, principal: Principal, query: ThreadQuery
) -> list[ColumnElement[bool]]:
    hidden = _hidden_folders(
        query.labels, query.include_spam, query.include_blocked, query.include_trash
    )
    shown = messages.c.folder.not_in(hidden) if hidden else true()
    conditions = [_has_visible_message(principal, shown)]
    conditions += [
        _has_visible_message(principal, _label_condition(conn, label)) for label in query.labels
    ]
    if query.before is not None:
        conditions.append(threads.c.last_message_at < _utc(query.before))
    if query.after is not None:
        conditions.append(threads.c.last_message_at > _utc(query.after))
    conditions += [
        _has_visible_message(principal, _contains(messages.c.from_addr, v)) for v in query.senders
    ]
    conditions += [
        _has_visible_message(
            principal,
            or_(_contains(messages.c.to_addrs, v), _contains(messages.c.cc_addrs, v)),
        )
        for v in query.recipients
    ]
    conditions += [_contains(threads.c.subject, v) for v in query.subject]
    return conditions


def _decode_page_token(token: str) -> int:
    try:
        return decode_seq_cursor(token)
    except ValidationFailed:
        raise _invalid("page_token", "not a page token this listing handed out") from None


def label_changes(
    add: Sequence[str],
    remove: Sequence[str],
    *,
    fields: tuple[str, str] = ("add_labels", "remove_labels"),
) -> tuple[set[str], set[str]]:
    """The stored labels to add and remove, ``read`` turned into ``unread``'s opposite.
    ``fields`` name the two lists in errors.

    Raises:
        ValidationFailed: see :meth:`AgentMailViews.update_labels`.
    """
    add_set: set[str] = set()
    remove_set: set[str] = set()
    for field, values, into, opposite in (
        (fields[0], add, add_set, remove_set),
        (fields[1], remove, remove_set, add_set),
    ):
        for raw in values:
            label = raw.strip()
            if not label or len(label) > MAX_LABEL_CHARS or _LABEL_BAD.search(label):
                raise _invalid(field, f"labels are 1-{MAX_LABEL_CHARS} printable characters")
            if label in SYSTEM_LABELS:
                raise _invalid(field, f"{label!r} follows the message's folder; it cannot be set")
            if label == READ:
                opposite.add(UNREAD)
            else:
                into.add(label)
    if add_set & remove_set:
        raise _invalid(fields[0], "a label cannot be both added and removed")
    return add_set, remove_set


def _invalid(field: str, message: str) -> ValidationFailed:
    return ValidationFailed(f"{field}: {message}", errors=[{"field": field, "message": message}])
