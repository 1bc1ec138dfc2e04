"""Drafts: unsent messages an agent keeps, edits and finally sends through the policy
gateway (AgentMail's drafts, served on ``/v0``).

A draft is plain (its own recipients), a reply (``in_reply_to``: subject and threading
come from that message at send time; its recipients are derived from it when the
draft is made, unless given, and may be edited like any draft's) or a forward
(``forward_of``: the message travels attached). Its kind is fixed at creation.
Attachment bytes are blobs, like a message's; the row keeps their metadata.

Sending is the one delicate part. It must never send twice, even when two callers
send the same draft at once or a caller retries after a timeout, and it must not
lose the draft when the message is refused as malformed:

1. a conditional ``UPDATE ... SET send_status='sending' WHERE send_status IS NULL OR
   'failed'`` marks the draft (edits and deletes are refused while it holds);
2. the message goes through :class:`~mailgate.services.outbound.OutboundService` with
   an ``Idempotency-Key`` *derived from the draft id*: of two concurrent sends the
   idempotency store lets one compose and record, the other gets the first's answer
   (or ``409`` while it runs), so the draft is sent at most once whoever wins step 1;
3. once the request is recorded (allowed, held for approval, or blocked) the draft is
   deleted, as AgentMail removes sent drafts. A send that fails validation records
   nothing: the draft goes back to ``failed`` and can be fixed and sent again. A crash
   between 2 and 3 leaves the draft ``sending``; sending it again replays the recorded
   answer (the key is kept ``idempotency_ttl_hours``) and finishes the deletion.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, and_, delete, or_, select, update
from sqlalchemy.exc import IntegrityError

from mailgate.clock import Clock
from mailgate.config import Settings
from mailgate.domain import compose
from mailgate.domain.keys import MESSAGES_READ, MESSAGES_SEND, Principal
from mailgate.errors import (
    Conflict,
    HeaderInjection,
    IdempotencyInFlight,
    MailgateError,
    NotFound,
    ValidationFailed,
)
from mailgate.ids import new_id
from mailgate.services.outbound import OutboundService, Submitted
from mailgate.services.queries import MAX_LIMIT, Page, encode_cursor
from mailgate.store.blobs import TieredBlobStore
from mailgate.store.db import Database
from mailgate.store.schema import agent_addresses, agents, drafts, idempotency_keys, messages

SENDING = "sending"
FAILED = "failed"
PREVIEW_CHARS = 200

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
"""What may never reach a header (as :mod:`mailgate.domain.compose` checks at send
time); drafts refuse it at once so a draft never holds an injection attempt."""


def draft_key(draft_id: str) -> str:
    """The Idempotency-Key a draft's send uses: one per draft, so it sends once."""
    return f"draft:{draft_id}"


@dataclass(frozen=True, slots=True)
class DraftFields:
    """What a create or update sets. For an update, only fields in ``given`` change
    (AgentMail: an omitted field is kept, ``null`` clears it)."""

    to: tuple[str, ...] = ()
    cc: tuple[str, ...] = ()
    bcc: tuple[str, ...] = ()
    reply_to: tuple[str, ...] = ()
    subject: str | None = None
    text: str | None = None
    html: str | None = None
    given: frozenset[str] = field(default_factory=frozenset)


class DraftService:
    def __init__(
        self,
        db: Database,
        blobs: TieredBlobStore,
        clock: Clock,
        settings: Settings,
        outbound: OutboundService,
    ) -> None:
        self.db = db
        self.blobs = blobs
        self.clock = clock
        self.settings = settings
        self.outbound = outbound

    # -- create ------------------------------------------------------------------------

    def create(
        self,
        principal: Principal,
        agent_id: str,
        fields: DraftFields,
        *,
        attachments: Sequence[compose.AttachmentIn] = (),
        labels: Sequence[str] = (),
        in_reply_to: str | None = None,
        forward_of: str | None = None,
        reply_all: bool = False,
        client_id: str | None = None,
    ) -> tuple[Any, bool]:
        """A new draft, or the agent's existing one with the same ``client_id``
        (returned as is; a retry of a create never makes two drafts). Returns the row
        and whether it was created.

        ``in_reply_to`` / ``forward_of`` are our message ids, already checked as
        visible to the caller in the agent's inbox.

        Raises:
            Forbidden: the key lacks ``messages:send``.
            HeaderInjection, ValidationFailed: a malformed field; nothing is written.
        """
        principal.require(MESSAGES_SEND)
        if in_reply_to and forward_of:
            raise _invalid("forward_of", "in_reply_to and forward_of are mutually exclusive")
        if reply_all and not in_reply_to:
            raise _invalid("reply_all", "only for a reply draft (in_reply_to)")
        _check_headers(fields, labels, attachments)
        if client_id is not None:
            existing = self._by_client_id(agent_id, client_id)
            if existing is not None:
                return existing, False
        now = self.clock.now()
        to, cc = fields.to, fields.cc
        if in_reply_to:
            derived_to, derived_cc = self._reply_recipients(agent_id, in_reply_to, reply_all)
            to = fields.to or derived_to
            cc = tuple(dict.fromkeys((*derived_cc, *fields.cc)))
        metadata, blobs = self._keep(attachments)
        draft_id = new_id("drf")
        try:
            with self.db.write() as conn:
                ws = self._workspace(conn, agent_id)
                self.blobs.put_many_in(conn, blobs)
                conn.execute(
                    drafts.insert(),
                    dict(
                        id=draft_id,
                        workspace_id=ws,
                        agent_id=agent_id,
                        client_id=client_id,
                        to_addrs=list(to),
                        cc_addrs=list(cc),
                        bcc_addrs=list(fields.bcc),
                        reply_to=list(fields.reply_to),
                        subject=fields.subject,
                        text_body=fields.text,
                        html_body=fields.html,
                        attachments=metadata,
                        labels=list(dict.fromkeys(labels)),
                        in_reply_to=in_reply_to,
                        forward_of=forward_of,
                        send_status=None,
                        outbound_id=None,
                        created_at=now,
                        updated_at=now,
                    ),
                )
        except IntegrityError:
            # Two creates with one client_id raced: the other insert won.
            if client_id is not None:
                existing = self._by_client_id(agent_id, client_id)
                if existing is not None:
                    return existing, False
            raise
        return self.get(principal, draft_id, agent_id=agent_id), True

    def _by_client_id(self, agent_id: str, client_id: str) -> Any:
        with self.db.read() as conn:
            return conn.execute(
                select(drafts).where(drafts.c.agent_id == agent_id, drafts.c.client_id == client_id)
            ).first()

    def _reply_recipients(
        self, agent_id: str, message_id: str, reply_all: bool
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Who a reply draft goes to unless told otherwise, as the reply would compute
        it (only reply-all fills Cc). The draft keeps the result, so what it shows is
        what it sends, edits included."""
        with self.db.read() as conn:
            row = conn.execute(select(messages).where(messages.c.id == message_id)).one()
            name = conn.execute(select(agents.c.name).where(agents.c.id == agent_id)).scalar_one()
            own = tuple(
                conn.execute(
                    select(agent_addresses.c.address)
                    .where(agent_addresses.c.agent_id == agent_id)
                    .order_by(agent_addresses.c.created_at, agent_addresses.c.address)
                ).scalars()
            )
        original = compose.Original(
            rfc_message_id=row.rfc_message_id,
            subject=row.subject or "",
            from_=tuple(_mailboxes(row.from_addr)),
            reply_to=tuple(_mailboxes(row.reply_to)),
            to=tuple(_mailboxes(row.to_addrs)),
            cc=tuple(_mailboxes(row.cc_addrs)),
            references=tuple(row.references or ()),
        )
        composed = compose.reply(
            original,
            sender=compose.mailbox_of(own[0], name),
            own_addresses=own,
            text="",
            html=None,
            reply_all=reply_all,
        )
        return (
            tuple(m.address for m in composed.to),
            tuple(m.address for m in composed.cc),
        )

    def _keep(
        self, attachments: Sequence[compose.AttachmentIn]
    ) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
        """Attachment metadata for the row, and the small blobs to write in its
        transaction (large ones go to the file tier now, as ingest does)."""
        metadata: list[dict[str, Any]] = []
        inline: dict[str, bytes] = {}
        for a in attachments:
            sha = hashlib.sha256(a.data).hexdigest()
            if self.blobs.inlines(len(a.data)):
                inline[sha] = a.data
            else:
                self.blobs.files.put(a.data, sha)
            metadata.append(
                {
                    "attachment_id": new_id("att"),
                    "filename": a.filename,
                    "content_type": a.content_type,
                    "content_id": a.content_id,
                    "disposition": "inline" if a.inline else "attachment",
                    "sha256": sha,
                    "size": len(a.data),
                }
            )
        return metadata, inline

    @staticmethod
    def _workspace(conn: Connection, agent_id: str) -> str:
        return str(
            conn.execute(select(agents.c.workspace_id).where(agents.c.id == agent_id)).scalar_one()
        )

    # -- read --------------------------------------------------------------------------

    def get(self, principal: Principal, draft_id: str, *, agent_id: str | None = None) -> Any:
        """One draft row the caller may see (in ``agent_id``'s inbox when given).

        Raises:
            NotFound: no such draft visible to the caller.
        """
        principal.require(MESSAGES_READ)
        with self.db.read() as conn:
            return self._visible(conn, principal, draft_id, agent_id)

    def attachment(
        self, principal: Principal, draft_id: str, attachment_id: str, *, agent_id: str | None
    ) -> dict[str, Any]:
        """The metadata of one attachment of a draft the caller may see.

        Raises:
            NotFound: no such draft visible to the caller, or no such attachment on it.
        """
        return _attachment_of(self.get(principal, draft_id, agent_id=agent_id), attachment_id)

    def attachment_bytes(self, draft_id: str, attachment_id: str) -> tuple[dict[str, Any], bytes]:
        """Metadata and bytes of a draft's attachment, for a signed link (the link is
        the credential, so no principal). A draft that was sent or deleted has none.

        Raises:
            NotFound: no such draft or attachment.
        """
        with self.db.read() as conn:
            row = conn.execute(select(drafts).where(drafts.c.id == draft_id)).first()
        if row is None:
            raise NotFound(f"no draft {draft_id}")
        meta = _attachment_of(row, attachment_id)
        return meta, self.blobs.get(str(meta["sha256"]))

    @staticmethod
    def _visible(
        conn: Connection, principal: Principal, draft_id: str, agent_id: str | None
    ) -> Any:
        query = select(drafts).where(
            drafts.c.id == draft_id, drafts.c.workspace_id == principal.workspace_id
        )
        if not principal.is_owner:
            query = query.where(drafts.c.agent_id == principal.agent_id)
        if agent_id is not None:
            query = query.where(drafts.c.agent_id == agent_id)
        row = conn.execute(query).first()
        if row is None:
            raise NotFound(f"no draft {draft_id}")
        return row

    def list(
        self,
        principal: Principal,
        *,
        agent_id: str | None = None,
        limit: int = 10,
        cursor: str | None = None,
        labels: Sequence[str] = (),
        before: datetime | None = None,
        after: datetime | None = None,
        ascending: bool = False,
    ) -> Page[Any]:
        """Drafts by ``updated_at`` (newest first unless ``ascending``), optionally
        only those carrying every one of ``labels``.

        Raises:
            ValidationFailed: a bad limit or cursor.
        """
        principal.require(MESSAGES_READ)
        if not 1 <= limit <= MAX_LIMIT:
            raise _invalid("limit", f"must be between 1 and {MAX_LIMIT}")
        query = select(drafts).where(drafts.c.workspace_id == principal.workspace_id)
        if not principal.is_owner:
            query = query.where(drafts.c.agent_id == principal.agent_id)
        if agent_id is not None:
            query = query.where(drafts.c.agent_id == agent_id)
        if before is not None:
            query = query.where(drafts.c.updated_at < before)
        if after is not None:
            query = query.where(drafts.c.updated_at > after)
        if cursor:
            at, seq = _decode_cursor(cursor)
            if ascending:
                query = query.where(
                    or_(
                        drafts.c.updated_at > at,
                        and_(drafts.c.updated_at == at, drafts.c.seq > seq),
                    )
                )
            else:
                query = query.where(
                    or_(
                        drafts.c.updated_at < at,
                        and_(drafts.c.updated_at == at, drafts.c.seq < seq),
                    )
                )
        order = (
            (drafts.c.updated_at, drafts.c.seq)
            if ascending
            else (drafts.c.updated_at.desc(), drafts.c.seq.desc())
        )
        wanted = set(labels)
        found: list[Any] = []
        batch = max(limit + 1, 50)
        offset = 0
        with self.db.read() as conn:
            # Labels live in a JSON list whose containment test differs per backend;
            # drafts are few, so they are filtered here, a batch at a time.
            while len(found) <= limit:
                rows = conn.execute(query.order_by(*order).limit(batch).offset(offset)).all()
                found.extend(r for r in rows if wanted <= set(r.labels))
                if len(rows) < batch:
                    break
                offset += batch
        page = found[:limit]
        more = len(found) > limit
        next_cursor = _encode_cursor(page[-1].updated_at, page[-1].seq) if more else None
        return Page(tuple(page), next_cursor)

    # -- update / delete ---------------------------------------------------------------

    def update(
        self,
        principal: Principal,
        agent_id: str,
        draft_id: str,
        fields: DraftFields,
        *,
        add_attachments: Sequence[compose.AttachmentIn] = (),
        remove_attachments: Sequence[str] = (),
        add_labels: Sequence[str] = (),
        remove_labels: Sequence[str] = (),
    ) -> Any:
        """Change the fields in ``fields.given``; the kind (plain, reply, forward)
        stays.

        Raises:
            NotFound: no such draft visible to the caller.
            Conflict: the draft is being sent.
            HeaderInjection, ValidationFailed: a malformed field; nothing changes.
        """
        principal.require(MESSAGES_SEND)
        _check_headers(fields, add_labels, add_attachments)
        metadata, blobs = self._keep(add_attachments)
        now = self.clock.now()
        with self.db.write() as conn:
            row = self._visible(conn, principal, draft_id, agent_id)
            known = {a["attachment_id"] for a in row.attachments}
            unknown = [a for a in remove_attachments if a not in known]
            if unknown:
                raise _invalid("remove_attachments", f"no attachment {unknown[0]} on this draft")
            values: dict[str, Any] = {"updated_at": now}
            columns = {
                "to": "to_addrs",
                "cc": "cc_addrs",
                "bcc": "bcc_addrs",
                "reply_to": "reply_to",
                "subject": "subject",
                "text": "text_body",
                "html": "html_body",
            }
            for name in fields.given & columns.keys():
                value = getattr(fields, name)
                values[columns[name]] = list(value) if isinstance(value, tuple) else value
            gone = set(remove_attachments)
            values["attachments"] = [
                a for a in row.attachments if a["attachment_id"] not in gone
            ] + metadata
            removed = set(remove_labels)
            values["labels"] = [
                label for label in dict.fromkeys([*row.labels, *add_labels]) if label not in removed
            ]
            self.blobs.put_many_in(conn, blobs)
            changed = conn.execute(
                update(drafts).where(drafts.c.id == draft_id, _not_sending()).values(**values)
            ).rowcount
            if changed != 1:
                raise Conflict(f"draft {draft_id} is being sent", state=SENDING)
            return conn.execute(select(drafts).where(drafts.c.id == draft_id)).one()

    def delete(self, principal: Principal, agent_id: str, draft_id: str) -> None:
        """Raises:
        NotFound: no such draft visible to the caller.
        Conflict: the draft is being sent.
        """
        principal.require(MESSAGES_SEND)
        with self.db.write() as conn:
            self._visible(conn, principal, draft_id, agent_id)
            changed = conn.execute(
                delete(drafts).where(drafts.c.id == draft_id, _not_sending())
            ).rowcount
            if changed != 1:
                raise Conflict(f"draft {draft_id} is being sent", state=SENDING)

    # -- send --------------------------------------------------------------------------

    def send(self, principal: Principal, agent_id: str, draft_id: str) -> Submitted:
        """Send a draft through the policy gateway, at most once (see the module
        docstring); the draft is gone once its request is recorded.

        Raises:
            Forbidden: the key lacks the scope the kind needs.
            NotFound: no such draft (nor a recorded send of it), or the message it
                answers or forwards is gone.
            IdempotencyInFlight: the same draft is being sent right now (409).
            HeaderInjection, ValidationFailed: the draft is not a sendable message;
                it is kept, marked ``failed``.
        """
        now = self.clock.now()
        with self.db.write() as conn:
            try:
                row = self._visible(conn, principal, draft_id, agent_id)
            except NotFound:
                replay = self._recorded(conn, agent_id, draft_id)
                if replay is None:
                    raise
                return replay
            conn.execute(
                update(drafts)
                .where(drafts.c.id == draft_id, _not_sending())
                .values(send_status=SENDING, updated_at=now)
            )
        key = draft_key(draft_id)
        payload = {"draft": draft_id}
        try:
            attachments = tuple(
                compose.AttachmentIn(
                    filename=a["filename"],
                    content_type=a["content_type"],
                    data=self.blobs.get(a["sha256"]),
                    content_id=a.get("content_id"),
                    inline=a.get("disposition") == "inline",
                )
                for a in row.attachments
            )
            if row.in_reply_to:
                submitted = self.outbound.reply(
                    principal,
                    row.in_reply_to,
                    text=row.text_body,
                    html=row.html_body,
                    to=tuple(row.to_addrs),
                    cc=tuple(row.cc_addrs),
                    bcc=tuple(row.bcc_addrs),
                    reply_to=tuple(row.reply_to),
                    attachments=attachments,
                    idempotency_key=key,
                    payload=payload,
                )
            else:
                draft = compose.Draft(
                    to=tuple(row.to_addrs),
                    cc=tuple(row.cc_addrs),
                    bcc=tuple(row.bcc_addrs),
                    reply_to=tuple(row.reply_to),
                    subject=row.subject or "",
                    text=row.text_body,
                    html=row.html_body,
                    attachments=attachments,
                )
                if row.forward_of:
                    submitted = self.outbound.forward(
                        principal, row.forward_of, draft, idempotency_key=key, payload=payload
                    )
                else:
                    submitted = self.outbound.send(
                        principal, draft, agent_id=agent_id, idempotency_key=key, payload=payload
                    )
        except IdempotencyInFlight:
            raise  # another send of this draft is running: it owns the draft now
        except MailgateError:
            # Nothing was recorded (the outbound service records a request and its
            # answer together): the draft stays, to be fixed and sent again.
            with self.db.write() as conn:
                conn.execute(
                    update(drafts)
                    .where(drafts.c.id == draft_id)
                    .values(send_status=FAILED, updated_at=self.clock.now())
                )
            raise
        with self.db.write() as conn:
            conn.execute(delete(drafts).where(drafts.c.id == draft_id))
        return submitted

    @staticmethod
    def _recorded(conn: Connection, agent_id: str, draft_id: str) -> Submitted | None:
        """The answer of a send of this draft that already happened (the draft is
        gone), so a retried send replays instead of answering 404."""
        row = conn.execute(
            select(idempotency_keys.c.response_status, idempotency_keys.c.response_body).where(
                idempotency_keys.c.agent_id == agent_id,
                idempotency_keys.c.key == draft_key(draft_id),
                idempotency_keys.c.state == "done",
            )
        ).first()
        if row is None:
            return None
        return Submitted(int(row.response_status), dict(row.response_body), replayed=True)

    # -- views -------------------------------------------------------------------------

    def public_ids(self, message_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        """(rfc_message_id, our id) of messages drafts refer to, for their views."""
        wanted = sorted({m for m in message_ids if m})
        if not wanted:
            return {}
        with self.db.read() as conn:
            rows = conn.execute(
                select(messages.c.id, messages.c.rfc_message_id).where(messages.c.id.in_(wanted))
            ).all()
        return {r.id: (r.rfc_message_id, r.id) for r in rows}


def preview(row: Any) -> str | None:
    """The start of the draft's text, whitespace collapsed (AgentMail's ``preview``)."""
    text = row.text_body
    if not text and row.html_body:
        text = re.sub(r"<[^>]*>", " ", row.html_body)
    if not text:
        return None
    return " ".join(text.split())[:PREVIEW_CHARS]


def _mailboxes(values: Any) -> list[compose.Mailbox]:
    """Stored address JSON (``[{"address", "name"}]``) as mailboxes, skipping junk."""
    out = []
    for v in values or ():
        address = (v.get("address") or "").strip()
        if "@" in address:
            out.append(compose.mailbox_of(address, v.get("name") or ""))
    return out


def _not_sending() -> Any:
    return or_(drafts.c.send_status.is_(None), drafts.c.send_status != SENDING)


def _check_headers(
    fields: DraftFields, labels: Sequence[str], attachments: Sequence[compose.AttachmentIn]
) -> None:
    """Raises:
    HeaderInjection: a header-bound value holds a control character.
    """
    bad: list[dict[str, str]] = []
    for name in ("to", "cc", "bcc", "reply_to"):
        for i, value in enumerate(getattr(fields, name)):
            if _CONTROL.search(value):
                bad.append({"field": f"{name}[{i}]", "message": "contains a control character"})
    if fields.subject and _CONTROL.search(fields.subject):
        bad.append({"field": "subject", "message": "contains a control character"})
    for i, a in enumerate(attachments):
        for attr in ("filename", "content_type", "content_id"):
            value = getattr(a, attr)
            if value and _CONTROL.search(value):
                bad.append(
                    {"field": f"attachments[{i}].{attr}", "message": "contains a control character"}
                )
    if bad:
        raise HeaderInjection(
            "a header field holds a control character (CR, LF, ...); refused", errors=bad
        )


def _encode_cursor(at: datetime, seq: int) -> str:
    return encode_cursor("d", f"{at.isoformat()}|{seq}")


def _decode_cursor(cursor: str) -> tuple[datetime, int]:
    """Raises:
    ValidationFailed: not a page token this listing handed out.
    """
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        kind, _, value = text.partition(":")
        at, _, seq = value.rpartition("|")
        if kind != "d":
            raise ValueError(kind)
        return datetime.fromisoformat(at), int(seq)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise _invalid("page_token", "not a page token this listing handed out") from None


def _attachment_of(row: Any, attachment_id: str) -> dict[str, Any]:
    """Raises:
    NotFound: the draft has no attachment ``attachment_id``.
    """
    for meta in row.attachments:
        if meta["attachment_id"] == attachment_id:
            return dict(meta)
    raise NotFound(f"no attachment {attachment_id} on draft {row.id}")


def _invalid(field: str, message: str) -> ValidationFailed:
    return ValidationFailed(f"{field}: {message}", errors=[{"field": field, "message": message}])


__all__ = ["DraftFields", "DraftService", "draft_key", "preview"]
