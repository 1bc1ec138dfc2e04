"""Inbound ingestion: one raw message in, one stored message per recipient agent out.

The hot path, in order: parse once (outside any transaction), write the raw bytes and
attachments to the blob store (fsynced before anything names them), then one job on
the committer per message: for each recipient agent, in its own savepoint, dedup,
thread, insert the message, its attachments and its ``message.received`` event. The
caller is told the outcome only after the commit is durable, which is when SMTP may
answer ``250`` and a webhook ``2xx``.

Dedup: the same Message-ID with the same raw SHA-256, per agent, is stored once; a
second copy resolves to the first (``duplicate=True``) and is acknowledged again. In
one process the committer serialises copies; across PostgreSQL nodes the unique index
settles the race and the loser reads the winner's row.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, bindparam, select, update
from sqlalchemy.exc import IntegrityError

from mailgate.clock import Clock
from mailgate.domain import threads as threading_rules
from mailgate.domain.mime import ParsedMessage, ParseLimits, parse_message
from mailgate.ids import new_id
from mailgate.services.events import MESSAGE_RECEIVED, append_event
from mailgate.services.tenancy import Recipient
from mailgate.store.blobs import TieredBlobStore
from mailgate.store.committer import Committer
from mailgate.store.dialect import insert_ignoring_conflicts
from mailgate.store.schema import UtcDateTime, attachments, messages, thread_refs, threads

GENERATED_ID_DOMAIN = "mailgate.invalid"
MAX_THREAD_PARTICIPANTS = 100
LOOP_PARSE_MAX = 32 * 1024  # bytes: parse on the event loop up to this size


@dataclass(frozen=True, slots=True)
class Envelope:
    """What the transport said about the message (kept beside, never inside, the raw)."""

    mail_from: str
    client_address: str | None = None
    helo: str | None = None
    source: str = "smtp"


@dataclass(frozen=True, slots=True)
class Stored:
    """The outcome for one recipient agent."""

    agent_id: str
    message_id: str
    thread_id: str
    duplicate: bool
    thread_reason: str


@dataclass(frozen=True, slots=True)
class Prepared:
    """A parsed message ready to commit: large blobs already durable as files, small
    ones (``inline_blobs``, as ``(data, sha256)``) to be written in the transaction."""

    raw_sha256: str
    raw_size: int
    parsed: ParsedMessage
    rfc_message_id: str
    message_id_generated: bool
    attachment_shas: tuple[str, ...]
    inline_blobs: tuple[tuple[bytes, str], ...] = ()


class IngestService:
    def __init__(
        self,
        committer: Committer,
        blobs: TieredBlobStore,
        clock: Clock,
        *,
        limits: ParseLimits | None = None,
        thread_window: timedelta = timedelta(days=14),
    ) -> None:
        self.committer = committer
        self.blobs = blobs
        self.clock = clock
        self.limits = limits or ParseLimits()
        self.thread_window = thread_window

    def prepare(self, raw: bytes) -> Prepared:
        """Parse, and write large blobs: the CPU and disk work that needs no transaction."""
        raw_sha = hashlib.sha256(raw).hexdigest()
        parsed = parse_message(raw, self.limits)
        inline: list[tuple[bytes, str]] = []

        def keep(data: bytes, sha: str | None = None) -> str:
            digest = sha or hashlib.sha256(data).hexdigest()
            if self.blobs.inlines(len(data)):
                inline.append((data, digest))
            else:
                self.blobs.files.put(data, digest)
            return digest

        keep(raw, raw_sha)
        shas = tuple(keep(a.data) for a in parsed.attachments)
        if parsed.message_id:
            rfc_id, generated = parsed.message_id, False
        else:
            # Derived from the bytes, so a redelivered copy gets the same id and dedups.
            rfc_id, generated = f"{raw_sha[:32]}@{GENERATED_ID_DOMAIN}", True
        return Prepared(raw_sha, len(raw), parsed, rfc_id, generated, shas, tuple(inline))

    def ingest(
        self, raw: bytes, envelope: Envelope, recipients: Sequence[Recipient]
    ) -> list[Stored]:
        """Store ``raw`` for every recipient agent; returns once durable."""
        prepared = self.prepare(raw)
        return self.committer.submit(
            lambda conn: self.store(conn, prepared, envelope, recipients)
        ).result()

    async def ingest_async(
        self, raw: bytes, envelope: Envelope, recipients: Sequence[Recipient]
    ) -> list[Stored]:
        """As :meth:`ingest`, without blocking the event loop for long.

        A small message is parsed right on the loop: that costs ~100 µs, less than
        handing it to a thread and back, and its blobs all go to the database tier, so
        no file I/O happens on the loop. Larger ones are prepared in a thread.
        """
        if len(raw) <= LOOP_PARSE_MAX and self.blobs.inlines(len(raw)):
            prepared = self.prepare(raw)
        else:
            prepared = await asyncio.to_thread(self.prepare, raw)
        future = self.committer.submit(
            lambda conn: self.store(conn, prepared, envelope, recipients)
        )
        return await asyncio.wrap_future(future)

    def store(
        self,
        conn: Connection,
        prepared: Prepared,
        envelope: Envelope,
        recipients: Sequence[Recipient],
    ) -> list[Stored]:
        """Insert the message for each distinct recipient agent (inside the caller's
        transaction). Recipients of one agent (two of its addresses) get one copy."""
        now = self.clock.now()
        dedup_key = hashlib.sha256(
            f"{prepared.rfc_message_id}\x00{prepared.raw_sha256}".encode()
        ).hexdigest()
        # SQLite has one writer at a time (BEGIN IMMEDIATE), so check-then-insert cannot
        # race there; only PostgreSQL needs a savepoint to survive losing the race.
        guard_races = conn.dialect.name != "sqlite"
        results: list[Stored] = []
        seen: set[str] = set()
        blobs_written = False
        for recipient in recipients:
            if recipient.agent_id in seen:
                continue
            seen.add(recipient.agent_id)
            existing = _find_duplicate(conn, recipient.agent_id, dedup_key)
            if existing is not None:
                results.append(existing)
                continue
            if not blobs_written:
                for data, sha in prepared.inline_blobs:
                    self.blobs.put_in(conn, data, sha)
                blobs_written = True
            if not guard_races:
                results.append(self._insert(conn, prepared, envelope, recipient, dedup_key, now))
            else:
                try:
                    with conn.begin_nested():
                        results.append(
                            self._insert(conn, prepared, envelope, recipient, dedup_key, now)
                        )
                except IntegrityError:
                    # Another node stored the same copy between our check and our insert.
                    existing = _find_duplicate(conn, recipient.agent_id, dedup_key)
                    if existing is None:
                        raise
                    results.append(existing)
        return results

    def _insert(
        self,
        conn: Connection,
        prepared: Prepared,
        envelope: Envelope,
        recipient: Recipient,
        dedup_key: str,
        now: datetime,
    ) -> Stored:
        parsed = prepared.parsed
        people = _participants(parsed, exclude=recipient.address)
        decision, new_keys = self._decide_thread(conn, prepared, recipient.agent_id, people, now)
        thread_id = decision.thread_id
        if thread_id is None:
            thread_id = new_id("thr")
            conn.execute(
                _INSERT_THREAD,
                {
                    "id": thread_id,
                    "workspace_id": recipient.workspace_id,
                    "agent_id": recipient.agent_id,
                    "subject": parsed.subject[:1000],
                    "subject_key": threading_rules.subject_key(parsed.subject),
                    "participants": sorted(people)[:MAX_THREAD_PARTICIPANTS],
                    "message_count": 1,
                    "first_message_at": now,
                    "last_message_at": now,
                },
            )
        else:
            _touch_thread(conn, thread_id, people, now)
        if new_keys:
            # Another node may record the same reference first; its thread wins that key.
            insert_ignoring_conflicts(
                conn,
                thread_refs,
                [
                    {"agent_id": recipient.agent_id, "ref_key": k, "thread_id": thread_id}
                    for k in new_keys
                ],
            )

        message_id = new_id("msg")
        sender = parsed.from_[0].as_dict() if parsed.from_ else None
        to = [a.as_dict() for a in parsed.to]
        cc = [a.as_dict() for a in parsed.cc]
        conn.execute(
            _INSERT_MESSAGE,
            {
                "id": message_id,
                "workspace_id": recipient.workspace_id,
                "agent_id": recipient.agent_id,
                "thread_id": thread_id,
                "direction": "inbound",
                "folder": "inbox",
                "source": envelope.source,
                "dedup_key": dedup_key,
                "rfc_message_id": prepared.rfc_message_id,
                "message_id_generated": prepared.message_id_generated,
                "raw_sha256": prepared.raw_sha256,
                "raw_size": prepared.raw_size,
                "subject": parsed.subject,
                "from_addr": [a.as_dict() for a in parsed.from_],
                "from_address": (parsed.from_[0].address.lower()[:320] or None)
                if parsed.from_
                else None,
                "to_addrs": to,
                "cc_addrs": cc,
                "reply_to": [a.as_dict() for a in parsed.reply_to],
                "sent_date": parsed.date,
                "in_reply_to": parsed.in_reply_to,
                "references": list(parsed.references),
                "text_body": parsed.text,
                "html_body": parsed.html,
                "preview": parsed.preview[:300],
                "defects": list(parsed.defects),
                "labels": [],
                "mail_from": envelope.mail_from[:1000],
                "rcpt_to": recipient.address,
                "client_address": envelope.client_address,
                "helo": (envelope.helo or "")[:300] or None,
                "received_at": now,
            },
        )
        if parsed.attachments:
            conn.execute(
                _INSERT_ATTACHMENT,
                [
                    {
                        "id": new_id("att"),
                        "message_id": message_id,
                        "position": position,
                        "filename": att.filename,
                        "content_type": att.content_type[:255],
                        "disposition": att.disposition,
                        "content_id": att.content_id,
                        "size": len(att.data),
                        "sha256": sha,
                    }
                    for position, (att, sha) in enumerate(
                        zip(parsed.attachments, prepared.attachment_shas, strict=True)
                    )
                ],
            )
        append_event(
            conn,
            workspace_id=recipient.workspace_id,
            agent_id=recipient.agent_id,
            type=MESSAGE_RECEIVED,
            thread_id=thread_id,
            created_at=now,
            payload={
                "message_id": message_id,
                "thread_id": thread_id,
                "agent_id": recipient.agent_id,
                "folder": "inbox",
                "from": sender,
                "to": to,
                "cc": cc,
                "subject": parsed.subject,
                "preview": parsed.preview,
                "received_at": now.isoformat(),
            },
        )
        return Stored(recipient.agent_id, message_id, thread_id, False, decision.reason)

    def _decide_thread(
        self,
        conn: Connection,
        prepared: Prepared,
        agent_id: str,
        people: set[str],
        now: datetime,
    ) -> tuple[threading_rules.ThreadDecision, list[str]]:
        """The thread decision, plus the reference keys the agent has not seen yet."""
        parsed = prepared.parsed
        keys = threading_rules.reference_keys(
            prepared.rfc_message_id, parsed.in_reply_to, parsed.references
        )
        wanted = list(dict.fromkeys(k for k, _ in keys))
        known = {
            row.ref_key: row.thread_id
            for row in conn.execute(_SELECT_REFS, {"agent_id": agent_id, "keys": wanted})
        }
        normalized = threading_rules.normalize_subject(parsed.subject)
        candidates: list[threading_rules.ThreadCandidate] = []
        if not known and normalized:
            rows = conn.execute(
                _SELECT_SUBJECT_THREADS,
                {
                    "agent_id": agent_id,
                    "subject_key": threading_rules.subject_key(parsed.subject),
                    "since": now - self.thread_window,
                },
            )
            candidates = [
                threading_rules.ThreadCandidate(row.id, frozenset(row.participants)) for row in rows
            ]
        decision = threading_rules.decide_thread(keys, known, normalized, people, candidates)
        return decision, [k for k in wanted if k not in known]


# Statements built once: SQLAlchemy then reuses their compiled form from its cache
# without re-deriving cache keys from freshly built constructs on every message.
_INSERT_THREAD = threads.insert()
_INSERT_MESSAGE = messages.insert()
_INSERT_ATTACHMENT = attachments.insert()
_SELECT_DUPLICATE = select(messages.c.id, messages.c.thread_id).where(
    messages.c.agent_id == bindparam("agent_id"), messages.c.dedup_key == bindparam("dedup_key")
)
_SELECT_REFS = select(thread_refs.c.ref_key, thread_refs.c.thread_id).where(
    thread_refs.c.agent_id == bindparam("agent_id"),
    thread_refs.c.ref_key.in_(bindparam("keys", expanding=True)),
)
_SELECT_SUBJECT_THREADS = (
    select(threads.c.id, threads.c.participants)
    .where(
        threads.c.agent_id == bindparam("agent_id"),
        threads.c.subject_key == bindparam("subject_key"),
        threads.c.last_message_at >= bindparam("since", type_=UtcDateTime()),
    )
    .order_by(threads.c.last_message_at.desc())
    .limit(10)
)
_SELECT_THREAD_STATS = select(threads.c.participants, threads.c.message_count).where(
    threads.c.id == bindparam("thread_id")
)
_UPDATE_THREAD = (
    update(threads)
    .where(threads.c.id == bindparam("thread_id"))
    .values(
        participants=bindparam("participants"),
        message_count=bindparam("message_count"),
        last_message_at=bindparam("last_message_at", type_=UtcDateTime()),
    )
)


def _find_duplicate(conn: Connection, agent_id: str, dedup_key: str) -> Stored | None:
    row = conn.execute(_SELECT_DUPLICATE, {"agent_id": agent_id, "dedup_key": dedup_key}).first()
    if row is None:
        return None
    return Stored(agent_id, row.id, row.thread_id, True, "duplicate")


def _touch_thread(conn: Connection, thread_id: str, people: set[str], now: datetime) -> None:
    row = conn.execute(_SELECT_THREAD_STATS, {"thread_id": thread_id}).one()
    merged = sorted(set(row.participants) | people)[:MAX_THREAD_PARTICIPANTS]
    conn.execute(
        _UPDATE_THREAD,
        {
            "thread_id": thread_id,
            "participants": merged,
            "message_count": row.message_count + 1,
            "last_message_at": now,
        },
    )


def _participants(parsed: ParsedMessage, *, exclude: str) -> set[str]:
    addresses = (*parsed.from_, *parsed.to, *parsed.cc, *parsed.reply_to)
    found = {a.address.lower() for a in addresses if a.address}
    found.discard(exclude.lower())
    return found
