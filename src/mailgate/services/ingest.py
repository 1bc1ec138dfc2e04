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

from sqlalchemy import Connection, select, update
from sqlalchemy.exc import IntegrityError

from mailgate.clock import Clock
from mailgate.domain import threads as threading_rules
from mailgate.domain.mime import ParsedMessage, ParseLimits, parse_message
from mailgate.ids import new_id
from mailgate.services.events import MESSAGE_RECEIVED, append_event
from mailgate.services.tenancy import Recipient
from mailgate.store.blobs import BlobStore
from mailgate.store.committer import Committer
from mailgate.store.dialect import insert_ignoring_conflicts
from mailgate.store.schema import attachments, messages, thread_refs, threads

GENERATED_ID_DOMAIN = "mailgate.invalid"
MAX_THREAD_PARTICIPANTS = 100


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
    """A parsed message whose blobs are already durable, ready to commit."""

    raw_sha256: str
    raw_size: int
    parsed: ParsedMessage
    rfc_message_id: str
    message_id_generated: bool
    attachment_shas: tuple[str, ...]


class IngestService:
    def __init__(
        self,
        committer: Committer,
        blobs: BlobStore,
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
        """Parse and write blobs: the CPU and disk work that needs no transaction."""
        raw_sha = hashlib.sha256(raw).hexdigest()
        parsed = parse_message(raw, self.limits)
        self.blobs.put(raw, raw_sha)
        shas = tuple(self.blobs.put(a.data) for a in parsed.attachments)
        if parsed.message_id:
            rfc_id, generated = parsed.message_id, False
        else:
            # Derived from the bytes, so a redelivered copy gets the same id and dedups.
            rfc_id, generated = f"{raw_sha[:32]}@{GENERATED_ID_DOMAIN}", True
        return Prepared(raw_sha, len(raw), parsed, rfc_id, generated, shas)

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
        """As :meth:`ingest`, without blocking the event loop."""
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
        results: list[Stored] = []
        seen: set[str] = set()
        for recipient in recipients:
            if recipient.agent_id in seen:
                continue
            seen.add(recipient.agent_id)
            existing = self._find_duplicate(conn, recipient.agent_id, dedup_key)
            if existing is not None:
                results.append(existing)
                continue
            try:
                with conn.begin_nested():
                    results.append(
                        self._insert(conn, prepared, envelope, recipient, dedup_key, now)
                    )
            except IntegrityError:
                # Another node stored the same copy between our check and our insert.
                existing = self._find_duplicate(conn, recipient.agent_id, dedup_key)
                if existing is None:
                    raise
                results.append(existing)
        return results

    @staticmethod
    def _find_duplicate(conn: Connection, agent_id: str, dedup_key: str) -> Stored | None:
        row = conn.execute(
            select(messages.c.id, messages.c.thread_id).where(
                messages.c.agent_id == agent_id, messages.c.dedup_key == dedup_key
            )
        ).first()
        if row is None:
            return None
        return Stored(agent_id, row.id, row.thread_id, True, "duplicate")

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
        decision, keys = self._decide_thread(conn, prepared, recipient.agent_id, people, now)
        thread_id = decision.thread_id
        if thread_id is None:
            thread_id = new_id("thr")
            conn.execute(
                threads.insert().values(
                    id=thread_id,
                    workspace_id=recipient.workspace_id,
                    agent_id=recipient.agent_id,
                    subject=parsed.subject[:1000],
                    subject_key=threading_rules.subject_key(parsed.subject),
                    participants=sorted(people)[:MAX_THREAD_PARTICIPANTS],
                    message_count=1,
                    first_message_at=now,
                    last_message_at=now,
                )
            )
        else:
            self._touch_thread(conn, thread_id, people, now)
        self._remember_refs(conn, recipient.agent_id, thread_id, keys)

        message_id = new_id("msg")
        sender = parsed.from_[0].as_dict() if parsed.from_ else None
        to = [a.as_dict() for a in parsed.to]
        cc = [a.as_dict() for a in parsed.cc]
        conn.execute(
            messages.insert().values(
                id=message_id,
                workspace_id=recipient.workspace_id,
                agent_id=recipient.agent_id,
                thread_id=thread_id,
                direction="inbound",
                folder="inbox",
                source=envelope.source,
                dedup_key=dedup_key,
                rfc_message_id=prepared.rfc_message_id,
                message_id_generated=prepared.message_id_generated,
                raw_sha256=prepared.raw_sha256,
                raw_size=prepared.raw_size,
                subject=parsed.subject,
                from_addr=[a.as_dict() for a in parsed.from_],
                from_address=(parsed.from_[0].address.lower()[:320] or None)
                if parsed.from_
                else None,
                to_addrs=to,
                cc_addrs=cc,
                reply_to=[a.as_dict() for a in parsed.reply_to],
                sent_date=parsed.date,
                in_reply_to=parsed.in_reply_to,
                references=list(parsed.references),
                text_body=parsed.text,
                html_body=parsed.html,
                preview=parsed.preview[:300],
                defects=list(parsed.defects),
                labels=[],
                mail_from=envelope.mail_from[:1000],
                rcpt_to=recipient.address,
                client_address=envelope.client_address,
                helo=(envelope.helo or "")[:300] or None,
                received_at=now,
            )
        )
        if parsed.attachments:
            conn.execute(
                attachments.insert(),
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
    ) -> tuple[threading_rules.ThreadDecision, list[tuple[str, str]]]:
        parsed = prepared.parsed
        keys = threading_rules.reference_keys(
            prepared.rfc_message_id, parsed.in_reply_to, parsed.references
        )
        known = {
            row.ref_key: row.thread_id
            for row in conn.execute(
                select(thread_refs.c.ref_key, thread_refs.c.thread_id).where(
                    thread_refs.c.agent_id == agent_id,
                    thread_refs.c.ref_key.in_([k for k, _ in keys]),
                )
            )
        }
        normalized = threading_rules.normalize_subject(parsed.subject)
        candidates: list[threading_rules.ThreadCandidate] = []
        if not known and normalized:
            rows = conn.execute(
                select(threads.c.id, threads.c.participants)
                .where(
                    threads.c.agent_id == agent_id,
                    threads.c.subject_key == threading_rules.subject_key(parsed.subject),
                    threads.c.last_message_at >= now - self.thread_window,
                )
                .order_by(threads.c.last_message_at.desc())
                .limit(10)
            )
            candidates = [
                threading_rules.ThreadCandidate(row.id, frozenset(row.participants)) for row in rows
            ]
        decision = threading_rules.decide_thread(keys, known, normalized, people, candidates)
        return decision, [(k, r) for k, r in keys if k not in known]

    @staticmethod
    def _touch_thread(conn: Connection, thread_id: str, people: set[str], now: datetime) -> None:
        row = conn.execute(
            select(threads.c.participants, threads.c.message_count).where(threads.c.id == thread_id)
        ).one()
        merged = sorted(set(row.participants) | people)[:MAX_THREAD_PARTICIPANTS]
        conn.execute(
            update(threads)
            .where(threads.c.id == thread_id)
            .values(
                participants=merged,
                message_count=row.message_count + 1,
                last_message_at=now,
            )
        )

    @staticmethod
    def _remember_refs(
        conn: Connection, agent_id: str, thread_id: str, keys: list[tuple[str, str]]
    ) -> None:
        # Another node may record the same reference first; its thread wins that key.
        unique = dict.fromkeys(k for k, _ in keys)
        insert_ignoring_conflicts(
            conn,
            thread_refs,
            [{"agent_id": agent_id, "ref_key": k, "thread_id": thread_id} for k in unique],
        )


def _participants(parsed: ParsedMessage, *, exclude: str) -> set[str]:
    addresses = (*parsed.from_, *parsed.to, *parsed.cc, *parsed.reply_to)
    found = {a.address.lower() for a in addresses if a.address}
    found.discard(exclude.lower())
    return found
