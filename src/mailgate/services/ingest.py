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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, bindparam, select, update
from sqlalchemy.exc import IntegrityError

from mailgate.clock import Clock
from mailgate.domain import rules
from mailgate.domain.authres import stamp_message
from mailgate.domain.mime import ParsedMessage, ParseLimits, parse_message
from mailgate.domain.threads import (
    ThreadCandidate,
    decide_thread,
    normalize_subject,
    reference_keys,
    subject_key,
)
from mailgate.errors import InvalidSignature
from mailgate.ids import new_id
from mailgate.services.events import (
    MESSAGE_HELD,
    MESSAGE_QUARANTINED,
    MESSAGE_RECEIVED,
    MESSAGE_TRASHED,
    event_row,
)
from mailgate.services.feedback import FeedbackService
from mailgate.services.policy import PolicyCache
from mailgate.services.tenancy import Recipient
from mailgate.store.blobs import TieredBlobStore
from mailgate.store.committer import BatchJob, Committer
from mailgate.store.dialect import insert_ignoring_conflicts
from mailgate.store.schema import (
    UtcDateTime,
    attachments,
    audit_log,
    events,
    messages,
    thread_refs,
    threads,
    webhook_receipts,
)

GENERATED_ID_DOMAIN = "mailgate.invalid"
FOLDER_OF_ACTION: Mapping[str, str] = {
    "deliver": "inbox",
    "review": "review",
    "quarantine": "quarantine",
    "trash": "trash",
}
"""Where an inbound rule decision files the message."""
_NOT_CHECKED = rules.AuthResults()
MAX_THREAD_PARTICIPANTS = 100
LOOP_PARSE_MAX = 32 * 1024  # bytes: parse on the event loop up to this size


@dataclass(frozen=True, slots=True)
class SenderAuth:
    """What was verified about the sender, before the message reached ingest.

    SMTP ingress fills it from our own SPF/DKIM/DMARC/ARC checks (with ``header``, the
    ``Authentication-Results`` field to prepend); a webhook from the verdicts its
    provider reported (no header: they are the provider's claims, not our checks).
    """

    facts: rules.AuthResults
    """What rules and the known-contact bypass see."""
    record: Mapping[str, Any]
    """Stored as ``messages.auth_results`` (JSON); includes ``facts.as_dict()``."""
    header: str | None = None
    """``Authentication-Results: <authserv-id>; ...`` without CRLF, or None."""


@dataclass(frozen=True, slots=True)
class Receipt:
    """A provider's id for one delivery, remembered so its retries are answered again.

    ``strict``: the id is also an anti-replay token (Mailgun's signed ``token``), so
    the same id with a different body is refused rather than acknowledged.
    """

    provider: str
    event_id: str
    strict: bool = False


@dataclass(frozen=True, slots=True)
class Envelope:
    """What the transport said about the message (kept beside, never inside, the raw)."""

    mail_from: str
    client_address: str | None = None
    helo: str | None = None
    source: str = "smtp"
    auth: SenderAuth | None = None
    """None when sender authentication is off: rules see ``none`` verdicts."""
    receipt: Receipt | None = None


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
    ones (``inline_blobs``, as ``(data, sha256)``) to be written in the transaction.

    ``raw`` is what we store: the received bytes with our ``Authentication-Results``
    on top and forged ones removed. ``received_sha256`` is the hash of the bytes as
    received, which dedup uses, so a redelivery dedups whatever its checks said.
    """

    raw: bytes
    raw_sha256: str
    received_sha256: str
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
        policies: PolicyCache | None = None,
        authserv_id: str = "mailgate.localhost",
        receipt_days: float = 4.0,
        feedback: FeedbackService | None = None,
    ) -> None:
        self.committer = committer
        self.blobs = blobs
        self.clock = clock
        self.limits = limits or ParseLimits()
        self.thread_window = thread_window
        self.policies = policies or PolicyCache()
        self.authserv_id = authserv_id
        self.receipt_days = receipt_days
        self.feedback = feedback
        """Applies delivery reports (bounces) to outbound mail, in this transaction."""

    def prepare(self, raw: bytes, envelope: Envelope | None = None) -> Prepared:
        """Stamp, parse, and write large blobs: the work that needs no transaction."""
        received_sha = hashlib.sha256(raw).hexdigest()
        header = envelope.auth.header if envelope is not None and envelope.auth else None
        stored = stamp_message(raw, header, self.authserv_id)
        raw_sha = received_sha if stored is raw else hashlib.sha256(stored).hexdigest()
        raw = stored
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
            rfc_id, generated = f"{received_sha[:32]}@{GENERATED_ID_DOMAIN}", True
        return Prepared(
            raw, raw_sha, received_sha, len(raw), parsed, rfc_id, generated, shas, tuple(inline)
        )

    def ingest(
        self, raw: bytes, envelope: Envelope, recipients: Sequence[Recipient]
    ) -> list[Stored]:
        """Store ``raw`` for every recipient agent; returns once durable.

        Blocks the calling thread until the commit: call it from threads (sync routes,
        the CLI), never on the event loop, whose loop committer would then wait on
        itself; there use :meth:`ingest_async`.
        """
        prepared = self.prepare(raw, envelope)
        return self.committer.submit(self._job(prepared, envelope, recipients)).result()

    async def ingest_async(
        self, raw: bytes, envelope: Envelope, recipients: Sequence[Recipient]
    ) -> list[Stored]:
        """As :meth:`ingest`, without blocking the event loop for long.

        A small message is parsed right on the loop: that costs ~100 µs, less than
        handing it to a thread and back, and its blobs all go to the database tier, so
        no file I/O happens on the loop. Larger ones are prepared in a thread.
        """
        if len(raw) <= LOOP_PARSE_MAX and self.blobs.inlines(len(raw)):
            prepared = self.prepare(raw, envelope)
        else:
            prepared = await asyncio.to_thread(self.prepare, raw, envelope)
        future = self.committer.submit(self._job(prepared, envelope, recipients))
        return await asyncio.wrap_future(future)

    def _job(
        self, prepared: Prepared, envelope: Envelope, recipients: Sequence[Recipient]
    ) -> BatchJob[tuple[Prepared, Envelope, Sequence[Recipient]], list[Stored]]:
        """A commit job that the committer may merge with other ingests (store_many)."""
        return BatchJob(
            self.store_many,
            (prepared, envelope, recipients),
            lambda conn: self.store(conn, prepared, envelope, recipients),
        )

    def store(
        self,
        conn: Connection,
        prepared: Prepared,
        envelope: Envelope,
        recipients: Sequence[Recipient],
    ) -> list[Stored]:
        """Insert one message for each distinct recipient agent (in the caller's
        transaction). Recipients of one agent (two of its addresses) get one copy.

        On PostgreSQL another node may store the same copy between our duplicate check
        and our insert; the unique index refuses ours, and running again finds theirs.
        SQLite has one writer at a time (BEGIN IMMEDIATE), so it cannot race.
        """
        item = (prepared, envelope, recipients)
        if conn.dialect.name == "sqlite":
            return self.store_many(conn, [item])[0]
        try:
            with conn.begin_nested():
                return self.store_many(conn, [item])[0]
        except IntegrityError:
            return self.store_many(conn, [item])[0]

    def store_many(
        self,
        conn: Connection,
        items: Sequence[tuple[Prepared, Envelope, Sequence[Recipient]]],
    ) -> list[list[Stored]]:
        """:meth:`store` for a whole group-commit batch at once.

        Three reads for the batch (duplicates, known references, subject candidates),
        the decisions in memory in arrival order (so a batch that holds a message and
        its reply, or two copies of one message, comes out as if stored one by one),
        then one ``executemany`` per table. Per-statement overhead, not SQL, was most
        of the cost of storing a 4 KB message one statement at a time.
        """
        return _Batch(self, conn, items, self.clock.now()).run()


@dataclass(frozen=True, slots=True)
class _Unit:
    """One message for one recipient agent."""

    item: int
    prepared: Prepared
    envelope: Envelope
    recipient: Recipient
    dedup_key: str

    @property
    def agent_id(self) -> str:
        return self.recipient.agent_id

    def reference_keys(self) -> list[tuple[str, str]]:
        parsed = self.prepared.parsed
        return reference_keys(self.prepared.rfc_message_id, parsed.in_reply_to, parsed.references)


class _Batch:
    """The in-memory state of one :meth:`IngestService.store_many` call."""

    def __init__(
        self,
        service: IngestService,
        conn: Connection,
        items: Sequence[tuple[Prepared, Envelope, Sequence[Recipient]]],
        now: datetime,
    ) -> None:
        self.service = service
        self.conn = conn
        self.blob_store = service.blobs
        self.now = now
        self.thread_window = service.thread_window
        self.items = items
        self.units: list[_Unit] = []
        self.results: list[list[Stored]] = [[] for _ in items]
        self.answered: set[int] = set()
        """Items answered from a provider receipt: they store nothing."""
        self.copies: dict[int, int] = {}
        """Item -> the earlier item of this batch carrying the same provider event."""
        self.new_receipts: list[dict[str, Any]] = []
        self.new_threads: dict[str, dict[str, Any]] = {}
        # threads that existed before this batch: id -> (new participants, new messages)
        self.touched: dict[str, tuple[set[str], int]] = {}
        self.refs: list[dict[str, str]] = []
        self.messages: list[dict[str, Any]] = []
        self.attachments: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.audits: list[dict[str, Any]] = []
        self.blobs: dict[str, bytes] = {}

    def run(self) -> list[list[Stored]]:
        self._answer_from_receipts()
        self._plan_units()
        if self.units:
            stored = self._load_duplicates()
            refs = self._load_refs()
            candidates = self._load_subject_candidates(refs)
            for unit in self.units:
                key = (unit.agent_id, unit.dedup_key)
                found = stored.get(key)
                if found is not None:
                    result = Stored(unit.agent_id, found[0], found[1], True, "duplicate")
                else:
                    result = self._add(unit, refs, candidates)
                    stored[key] = (result.message_id, result.thread_id)
                self.results[unit.item].append(result)
        self._record_receipts()
        self._write()
        return self.results

    def _plan_units(self) -> None:
        """One unit per distinct recipient agent of every item still to store."""
        for index, (prepared, envelope, recipients) in enumerate(self.items):
            if index in self.answered:
                continue
            dedup_key = hashlib.sha256(
                f"{prepared.rfc_message_id}\x00{prepared.received_sha256}".encode()
            ).hexdigest()
            agents: set[str] = set()
            for recipient in recipients:
                if recipient.agent_id not in agents:
                    agents.add(recipient.agent_id)
                    self.units.append(_Unit(index, prepared, envelope, recipient, dedup_key))

    # -- provider receipts ---------------------------------------------------------------

    def _answer_from_receipts(self) -> None:
        """Answer provider retries from their receipt; refuse a replayed strict token.

        Items are taken in arrival order, so of two posts of one event in this batch
        the first stores and the second is answered with the first's results.

        Raises:
            InvalidSignature: a strict receipt's id came back with another body
                (a captured Mailgun token reused to inject a different message).
        """
        wanted = {
            (env.receipt.provider, env.receipt.event_id[:200])
            for _, env, _ in self.items
            if env.receipt is not None
        }
        if not wanted:
            return
        params = {
            "providers": sorted({p for p, _ in wanted}),
            "ids": sorted({e for _, e in wanted}),
        }
        known: dict[tuple[str, str], tuple[str, list[Stored]]] = {}
        for row in self.conn.execute(_SELECT_RECEIPTS, params):
            if (row.provider, row.event_id) in wanted:
                known[(row.provider, row.event_id)] = (
                    row.body_sha256,
                    [
                        Stored(r["agent_id"], r["message_id"], r["thread_id"], True, "duplicate")
                        for r in row.results
                    ],
                )
        first_of: dict[tuple[str, str], int] = {}
        for index, (prepared, envelope, _) in enumerate(self.items):
            receipt = envelope.receipt
            if receipt is None:
                continue
            key = (receipt.provider, receipt.event_id[:200])
            if key in known:
                body_sha, self.results[index] = known[key]
            elif key in first_of:
                body_sha = self.items[first_of[key]][0].received_sha256
                self.copies[index] = first_of[key]
            else:
                first_of[key] = index
                continue
            if receipt.strict and body_sha != prepared.received_sha256:
                raise InvalidSignature(
                    "webhook token already used for another message", reason="replayed_token"
                )
            self.answered.add(index)

    def _record_receipts(self) -> None:
        for index, first in self.copies.items():
            self.results[index] = [
                Stored(r.agent_id, r.message_id, r.thread_id, True, "duplicate")
                for r in self.results[first]
            ]
        expires = self.now + timedelta(days=self.service.receipt_days)
        for index, (prepared, envelope, _) in enumerate(self.items):
            receipt = envelope.receipt
            if receipt is None or index in self.answered:
                continue
            self.new_receipts.append(
                {
                    "provider": receipt.provider,
                    "event_id": receipt.event_id[:200],
                    "body_sha256": prepared.received_sha256,
                    "results": [
                        {
                            "agent_id": r.agent_id,
                            "message_id": r.message_id,
                            "thread_id": r.thread_id,
                        }
                        for r in self.results[index]
                    ],
                    "created_at": self.now,
                    "expires_at": expires,
                }
            )

    # -- reads: one query each for the whole batch -------------------------------------

    def _load_duplicates(self) -> dict[tuple[str, str], tuple[str, str]]:
        pairs = {(u.agent_id, u.dedup_key) for u in self.units}
        rows = self.conn.execute(_SELECT_DUPLICATES, _in_params(pairs))
        return {
            (row.agent_id, row.dedup_key): (row.id, row.thread_id)
            for row in rows
            if (row.agent_id, row.dedup_key) in pairs
        }

    def _load_refs(self) -> dict[tuple[str, str], str]:
        pairs = {(u.agent_id, key) for u in self.units for key, _ in u.reference_keys()}
        rows = self.conn.execute(_SELECT_REFS, _in_params(pairs))
        return {
            (row.agent_id, row.ref_key): row.thread_id
            for row in rows
            if (row.agent_id, row.ref_key) in pairs
        }

    def _load_subject_candidates(
        self, refs: dict[tuple[str, str], str]
    ) -> dict[tuple[str, str], list[ThreadCandidate]]:
        """Recent threads with the subjects of messages that may need the fallback:
        none of their references known, and a subject left after normalising."""
        pairs = {
            (u.agent_id, subject_key(u.prepared.parsed.subject))
            for u in self.units
            if normalize_subject(u.prepared.parsed.subject)
            and not any((u.agent_id, key) in refs for key, _ in u.reference_keys())
        }
        if not pairs:
            return {}
        params = {**_in_params(pairs), "since": self.now - self.thread_window}
        found: dict[tuple[str, str], list[ThreadCandidate]] = {}
        for row in self.conn.execute(_SELECT_SUBJECT_THREADS, params):
            if (row.agent_id, row.subject_key) in pairs:
                found.setdefault((row.agent_id, row.subject_key), []).append(
                    ThreadCandidate(row.id, frozenset(row.participants))
                )
        return found

    # -- decisions, in arrival order ---------------------------------------------------

    def _add(
        self,
        unit: _Unit,
        refs: dict[tuple[str, str], str],
        candidates: dict[tuple[str, str], list[ThreadCandidate]],
    ) -> Stored:
        parsed, agent_id = unit.prepared.parsed, unit.agent_id
        people = _participants(parsed, exclude=unit.recipient.address)
        keys = unit.reference_keys()
        known = {k: refs[(agent_id, k)] for k, _ in keys if (agent_id, k) in refs}
        skey = subject_key(parsed.subject)
        normalized = normalize_subject(parsed.subject)
        pool = candidates.get((agent_id, skey), []) if not known and normalized else []
        decision = decide_thread(keys, known, normalized, people, pool)
        thread_id = decision.thread_id
        if thread_id is None:
            thread_id = self._new_thread(unit, people, skey)
            # Newest first, like the query: later messages in this batch may thread
            # onto it by subject.
            candidates.setdefault((agent_id, skey), []).insert(
                0, ThreadCandidate(thread_id, frozenset(people))
            )
        else:
            self._touch(thread_id, people)
        for key, _ in keys:
            if (agent_id, key) not in refs:
                refs[(agent_id, key)] = thread_id
                self.refs.append({"agent_id": agent_id, "ref_key": key, "thread_id": thread_id})
        message_id = self._add_message(unit, thread_id)
        return Stored(agent_id, message_id, thread_id, False, decision.reason)

    def _new_thread(self, unit: _Unit, people: set[str], skey: str) -> str:
        thread_id = new_id("thr")
        self.new_threads[thread_id] = {
            "id": thread_id,
            "workspace_id": unit.recipient.workspace_id,
            "agent_id": unit.agent_id,
            "subject": unit.prepared.parsed.subject[:1000],
            "subject_key": skey,
            "participants": sorted(people)[:MAX_THREAD_PARTICIPANTS],
            "message_count": 1,
            "first_message_at": self.now,
            "last_message_at": self.now,
        }
        return thread_id

    def _touch(self, thread_id: str, people: set[str]) -> None:
        row = self.new_threads.get(thread_id)
        if row is None:  # existed before this batch: updated in _write
            seen, count = self.touched.get(thread_id, (set(), 0))
            self.touched[thread_id] = (seen | people, count + 1)
            return
        row["participants"] = sorted(set(row["participants"]) | people)[:MAX_THREAD_PARTICIPANTS]
        row["message_count"] += 1

    def _decide(self, unit: _Unit) -> rules.RuleDecision:
        """The agent's rules and contacts applied to this message (pure, cached policy)."""
        policy = self.service.policies.get(self.conn, unit.agent_id)
        auth = unit.envelope.auth
        return policy.decide(
            unit.prepared.parsed,
            raw=unit.prepared.raw,
            size=unit.prepared.raw_size,
            auth=auth.facts if auth is not None else _NOT_CHECKED,
            limits=self.service.limits,
        )

    def _add_message(self, unit: _Unit, thread_id: str) -> str:
        prepared, parsed, recipient = unit.prepared, unit.prepared.parsed, unit.recipient
        envelope = unit.envelope
        message_id = new_id("msg")
        decision = self._decide(unit)
        folder = FOLDER_OF_ACTION[decision.action]
        sender = parsed.from_[0].as_dict() if parsed.from_ else None
        to = [a.as_dict() for a in parsed.to]
        cc = [a.as_dict() for a in parsed.cc]
        decided = decision.as_dict()
        for data, sha in prepared.inline_blobs:
            self.blobs.setdefault(sha, data)
        self.messages.append(
            {
                "id": message_id,
                "workspace_id": recipient.workspace_id,
                "agent_id": recipient.agent_id,
                "thread_id": thread_id,
                "direction": "inbound",
                "folder": folder,
                "source": envelope.source,
                "dedup_key": unit.dedup_key,
                "rfc_message_id": prepared.rfc_message_id,
                "message_id_generated": prepared.message_id_generated,
                "raw_sha256": prepared.raw_sha256,
                "raw_size": prepared.raw_size,
                **message_columns(parsed, to=to, cc=cc),
                "mail_from": envelope.mail_from[:1000],
                "rcpt_to": recipient.address,
                "client_address": envelope.client_address,
                "helo": (envelope.helo or "")[:300] or None,
                "received_at": self.now,
                "visible_at": self.now if folder == "inbox" else None,
                # A rule's trash is restorable to where the mail was headed: the inbox.
                "previous_folder": "inbox" if folder == "trash" else None,
                "folder_changed_at": self.now,
                # New mail is unread until the agent removes the label (AgentMail's
                # convention, which /v0 clients rely on to find what to work on).
                "labels": [UNREAD],
                "decision": decided,
                "auth_results": dict(envelope.auth.record) if envelope.auth else None,
            }
        )
        self.attachments.extend(
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
        )
        payload: dict[str, Any] = {
            "message_id": message_id,
            "thread_id": thread_id,
            "agent_id": recipient.agent_id,
            "folder": folder,
            "from": sender,
            "to": to,
            "cc": cc,
            "subject": parsed.subject,
            "preview": parsed.preview,
            "received_at": self.now.isoformat(),
        }
        if folder == "inbox":
            event_type, event_agent = MESSAGE_RECEIVED, recipient.agent_id
        else:
            # Mail the agent may not see yet: the event goes to owners only.
            event_type, event_agent = _HELD_EVENTS[folder], None
            payload.update(rule_id=decision.rule_id, reasons=list(decision.reasons), actor="rule")
        self.events.append(
            event_row(
                workspace_id=recipient.workspace_id,
                agent_id=event_agent,
                type=event_type,
                thread_id=thread_id,
                created_at=self.now,
                payload=payload,
            )
        )
        self.audits.append(
            {
                "id": new_id("aud"),
                "workspace_id": recipient.workspace_id,
                "actor": "system",
                "action": "inbound.decided",
                "target_type": "message",
                "target_id": message_id,
                "detail": {**decided, "folder": folder, "agent_id": recipient.agent_id},
                "created_at": self.now,
            }
        )
        if self.service.feedback is not None:  # a bounce: one header scan for other mail
            self.service.feedback.apply_inbound(
                self.conn,
                prepared.raw,
                workspace_id=recipient.workspace_id,
                agent_id=recipient.agent_id,
                now=self.now,
            )
        return message_id

    # -- writes: one executemany per table ---------------------------------------------

    def _write(self) -> None:
        conn = self.conn
        self.blob_store.put_many_in(conn, self.blobs)
        if self.new_threads:
            conn.execute(_INSERT_THREAD, list(self.new_threads.values()))
        if self.touched:
            self._update_threads()
        # Another node may record the same reference first; its thread wins that key.
        insert_ignoring_conflicts(conn, thread_refs, self.refs)
        for statement, rows in (
            (_INSERT_MESSAGE, self.messages),
            (_INSERT_ATTACHMENT, self.attachments),
            (_INSERT_EVENT, self.events),
            (_INSERT_AUDIT, self.audits),
            (_INSERT_RECEIPT, self.new_receipts),
        ):
            if rows:
                conn.execute(statement, rows)

    def _update_threads(self) -> None:
        current = {
            row.id: row
            for row in self.conn.execute(_SELECT_THREAD_STATS, {"ids": list(self.touched)})
        }
        self.conn.execute(
            _UPDATE_THREAD,
            [
                {
                    "thread_id": thread_id,
                    "participants": sorted(set(current[thread_id].participants) | people)[
                        :MAX_THREAD_PARTICIPANTS
                    ],
                    "message_count": current[thread_id].message_count + count,
                    "last_message_at": self.now,
                }
                for thread_id, (people, count) in self.touched.items()
            ],
        )


# Statements built once: SQLAlchemy then reuses their compiled form from its cache
# without re-deriving cache keys from freshly built constructs on every batch.
_INSERT_THREAD = threads.insert()
_INSERT_MESSAGE = messages.insert()
_INSERT_ATTACHMENT = attachments.insert()
_INSERT_EVENT = events.insert()
_INSERT_AUDIT = audit_log.insert()
_INSERT_RECEIPT = webhook_receipts.insert()
_SELECT_RECEIPTS = select(
    webhook_receipts.c.provider,
    webhook_receipts.c.event_id,
    webhook_receipts.c.body_sha256,
    webhook_receipts.c.results,
).where(
    webhook_receipts.c.provider.in_(bindparam("providers", expanding=True)),
    webhook_receipts.c.event_id.in_(bindparam("ids", expanding=True)),
)
_HELD_EVENTS: Mapping[str, str] = {
    "review": MESSAGE_HELD,
    "quarantine": MESSAGE_QUARANTINED,
    "trash": MESSAGE_TRASHED,
}
_SELECT_DUPLICATES = select(
    messages.c.agent_id, messages.c.dedup_key, messages.c.id, messages.c.thread_id
).where(
    messages.c.agent_id.in_(bindparam("agents", expanding=True)),
    messages.c.dedup_key.in_(bindparam("keys", expanding=True)),
)
_SELECT_REFS = select(thread_refs.c.agent_id, thread_refs.c.ref_key, thread_refs.c.thread_id).where(
    thread_refs.c.agent_id.in_(bindparam("agents", expanding=True)),
    thread_refs.c.ref_key.in_(bindparam("keys", expanding=True)),
)
_SELECT_SUBJECT_THREADS = (
    select(threads.c.agent_id, threads.c.subject_key, threads.c.id, threads.c.participants)
    .where(
        threads.c.agent_id.in_(bindparam("agents", expanding=True)),
        threads.c.subject_key.in_(bindparam("keys", expanding=True)),
        threads.c.last_message_at >= bindparam("since", type_=UtcDateTime()),
    )
    .order_by(threads.c.last_message_at.desc())
)
_SELECT_THREAD_STATS = select(threads.c.id, threads.c.participants, threads.c.message_count).where(
    threads.c.id.in_(bindparam("ids", expanding=True))
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


def _in_params(pairs: set[tuple[str, str]]) -> dict[str, list[str]]:
    """``agent_id IN (...) AND key IN (...)``, filtered to ``pairs`` by the caller.

    Row-value ``(agent_id, key) IN (...)`` would be exact, but SQLite answers it with a
    full table scan; two plain IN lists use the (agent_id, key) index on both backends,
    and the few cross-product extras (another agent's key) are dropped in Python.
    """
    return {"agents": sorted({a for a, _ in pairs}), "keys": sorted({k for _, k in pairs})}


UNREAD = "unread"
"""The stored label of inbound mail the agent has not marked read."""


def message_columns(
    parsed: ParsedMessage,
    *,
    to: list[dict[str, str]] | None = None,
    cc: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    """The ``messages`` columns that come from the parsed message itself (inbound and
    the agents' own outbound copies alike); ``to``/``cc`` when already converted."""
    return {
        "subject": parsed.subject,
        "from_addr": [a.as_dict() for a in parsed.from_],
        "from_address": (parsed.from_[0].address.lower()[:320] or None) if parsed.from_ else None,
        "to_addrs": to if to is not None else [a.as_dict() for a in parsed.to],
        "cc_addrs": cc if cc is not None else [a.as_dict() for a in parsed.cc],
        "reply_to": [a.as_dict() for a in parsed.reply_to],
        "sent_date": parsed.date,
        "in_reply_to": parsed.in_reply_to,
        "references": list(parsed.references),
        "text_body": parsed.text,
        "html_body": parsed.html,
        "preview": parsed.preview[:300],
        "defects": list(parsed.defects),
        "labels": [],
    }


def _participants(parsed: ParsedMessage, *, exclude: str) -> set[str]:
    addresses = (*parsed.from_, *parsed.to, *parsed.cc, *parsed.reply_to)
    found = {a.address.lower() for a in addresses if a.address}
    found.discard(exclude.lower())
    return found
