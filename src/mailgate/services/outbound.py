"""Send, reply and forward: the one policy gateway every outbound message passes.

A request goes through, in order:

1. the key's scope (403 without ``messages:send`` / ``messages:reply``);
2. the ``Idempotency-Key`` claim (:mod:`mailgate.services.idempotency`);
3. composition and validation (422 for header injection or a malformed field; the key
   is released, nothing is written);
4. one write transaction: gather the facts (tier, thread, contacts, lists,
   suppressions, rate counts, loop signals, outbound rules), run the guard pipeline
   (:mod:`mailgate.domain.guards`), and record everything the decision implies: the
   request, its recipients, its copy in the thread (folder ``outbox``), the event, the
   audit entry, the owner notification for held mail, and the idempotent response.

Nothing is sent here: an allowed request is ``queued`` for the delivery worker
(:mod:`mailgate.services.delivery`), which is woken after the commit.
"""

from __future__ import annotations

import builtins
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Any

from sqlalchemy import Connection, func, select, update

from mailgate.clock import Clock
from mailgate.config import Settings
from mailgate.domain import compose, guards
from mailgate.domain import delivery as states
from mailgate.domain.keys import MESSAGES_READ, MESSAGES_REPLY, MESSAGES_SEND, Principal
from mailgate.domain.mime import ParsedMessage, ParseLimits, parse_message
from mailgate.domain.threads import ref_key, subject_key
from mailgate.errors import AlreadyDecided, NotFound, ValidationFailed
from mailgate.ids import new_id
from mailgate.services import audit
from mailgate.services.events import (
    OUTBOUND_APPROVED,
    OUTBOUND_BLOCKED,
    OUTBOUND_EXPIRED,
    OUTBOUND_PENDING_APPROVAL,
    OUTBOUND_REJECTED,
    append_event,
)
from mailgate.services.idempotency import (
    Claim,
    IdempotencyStore,
    Replay,
    check_key,
    fingerprint,
)
from mailgate.services.ingest import message_columns
from mailgate.services.mailbox import Actor, Operator
from mailgate.services.policy import PolicyCache
from mailgate.services.queries import (
    Page,
    check_limit,
    decode_seq_cursor,
    encode_seq_cursor,
    page_rows,
)
from mailgate.store.blobs import TieredBlobStore
from mailgate.store.db import Database
from mailgate.store.dialect import insert_ignoring_conflicts
from mailgate.store.schema import (
    agent_addresses,
    agents,
    approvals,
    attachments,
    delivery_attempts,
    messages,
    outbound,
    outbound_recipients,
    owners,
    recipient_lists,
    suppressions,
    thread_refs,
    threads,
)

SYSTEM_SENDER = "mailgate"
"""Local part of the address owner notifications come from (at the agent domain)."""
HELD_STATES = (states.PENDING_APPROVAL, states.QUARANTINED)


@dataclass(frozen=True, slots=True)
class Submitted:
    """What the edge answers: the HTTP status and the stored (idempotent) body."""

    status: int
    body: dict[str, Any]
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class _Sender:
    agent_id: str
    workspace_id: str
    address: str
    addresses: tuple[str, ...]
    name: str
    tier: str


class OutboundService:
    def __init__(
        self,
        db: Database,
        blobs: TieredBlobStore,
        clock: Clock,
        settings: Settings,
        policies: PolicyCache,
        *,
        signer: Callable[[str], Callable[[bytes], bytes] | None] | None = None,
        wake: Callable[[], None] | None = None,
    ) -> None:
        self.db = db
        self.blobs = blobs
        self.clock = clock
        self.settings = settings
        self.policies = policies
        self.idempotency = IdempotencyStore(
            db,
            ttl=timedelta(hours=settings.idempotency_ttl_hours),
            lock=timedelta(seconds=settings.idempotency_lock_seconds),
        )
        self.limits = ParseLimits(
            max_header_bytes=settings.max_header_bytes, max_parts=settings.max_mime_parts
        )
        self._signer = signer
        self._wake = wake or (lambda: None)

    def on_queued(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` after every commit that queued work for delivery."""
        self._wake = wake

    def on_signer(self, signer: Callable[[str], Callable[[bytes], bytes] | None]) -> None:
        """DKIM: ``signer(domain)`` gives a signing function, or None (no key)."""
        self._signer = signer

    # -- submit ------------------------------------------------------------------------

    def send(
        self,
        principal: Principal,
        draft: compose.Draft,
        *,
        idempotency_key: str | None,
        payload: Any,
        agent_id: str | None = None,
    ) -> Submitted:
        """New mail from the agent (a new thread).

        Raises:
            Forbidden: the key lacks ``messages:send``.
            IdempotencyKeyMissing, IdempotencyKeyReused, IdempotencyInFlight: see
                :mod:`mailgate.services.idempotency`.
            HeaderInjection, ValidationFailed: a malformed field; nothing is written.
        """
        principal.require(MESSAGES_SEND)

        def make(sender: _Sender, conn: Connection) -> tuple[compose.Composed, _Context]:
            return compose.validate(draft, sender=_mailbox(sender)), _Context()

        return self._submit(principal, "send", agent_id, idempotency_key, payload, make)

    def reply(
        self,
        principal: Principal,
        message_id: str,
        *,
        text: str | None,
        html: str | None,
        reply_all: bool = False,
        attachments: Sequence[compose.AttachmentIn] = (),
        headers: dict[str, str] | None = None,
        to: Sequence[str] = (),
        cc: Sequence[str] = (),
        bcc: Sequence[str] = (),
        reply_to: Sequence[str] = (),
        idempotency_key: str | None,
        payload: Any,
    ) -> Submitted:
        """A reply in the thread of ``message_id``; only the agent owning it may reply.

        ``to`` replaces the derived recipients; ``cc``/``bcc`` add to them;
        ``reply_to`` sets Reply-To. Recipients that were not on the message answered
        are judged by the agent's tier like new mail (see the ``tier`` guard step).

        Raises:
            Forbidden: the key lacks ``messages:reply``.
            NotFound: no such message visible to the caller.
            (and as :meth:`send`)
        """
        principal.require(MESSAGES_REPLY)
        original = self._original(principal, message_id)

        def make(sender: _Sender, conn: Connection) -> tuple[compose.Composed, _Context]:
            composed = compose.reply(
                original.original,
                sender=_mailbox(sender),
                own_addresses=sender.addresses,
                text=text,
                html=html,
                reply_all=reply_all,
                attachments=tuple(attachments),
                headers=headers or {},
                to=to,
                cc=cc,
                bcc=bcc,
                reply_to=reply_to,
            )
            return composed, original.context

        return self._submit(principal, "reply", original.agent_id, idempotency_key, payload, make)

    def forward(
        self,
        principal: Principal,
        message_id: str,
        draft: compose.Draft,
        *,
        idempotency_key: str | None,
        payload: Any,
    ) -> Submitted:
        """``message_id`` attached whole (message/rfc822) to new mail: a new thread.

        Raises:
            Forbidden: the key lacks ``messages:send``.
            NotFound: no such message visible to the caller.
            (and as :meth:`send`)
        """
        principal.require(MESSAGES_SEND)
        original = self._original(principal, message_id, with_raw=True)

        def make(sender: _Sender, conn: Connection) -> tuple[compose.Composed, _Context]:
            composed = compose.forward(original.original, sender=_mailbox(sender), draft=draft)
            return composed, _Context(replied_message_id=original.context.replied_message_id)

        return self._submit(principal, "forward", original.agent_id, idempotency_key, payload, make)

    def _submit(
        self,
        principal: Principal,
        kind: guards.Kind,
        agent_id: str | None,
        idempotency_key: str | None,
        payload: Any,
        make: Callable[[_Sender, Connection], tuple[compose.Composed, _Context]],
    ) -> Submitted:
        key = check_key(idempotency_key)
        target = self._target_agent(principal, agent_id)
        now = self.clock.now()
        claimed = self.idempotency.claim(
            agent_id=target,
            workspace_id=principal.workspace_id,
            key=key,
            endpoint=kind,
            request_sha256=fingerprint(kind, payload),
            now=now,
        )
        if isinstance(claimed, Replay):
            return Submitted(claimed.status, claimed.body, replayed=True)
        try:
            with self.db.read() as conn:
                sender = self._sender(conn, target)
                composed, context = make(sender, conn)
            built = self._build(sender, composed, now)
            submitted = self._record(principal, kind, sender, composed, context, built, claimed)
        except BaseException:
            # Nothing was committed (the work and its response commit together), so
            # the key is free for a corrected retry; a committed key is not touched.
            self.idempotency.release(claimed)
            raise
        if submitted.body["status"] == states.QUEUED or submitted.body.get("notified"):
            self._wake()
        return submitted

    # -- building ----------------------------------------------------------------------

    def _build(self, sender: _Sender, composed: compose.Composed, now: datetime) -> _Built:
        if not self.settings.outbound_auto_submitted:
            composed = replace(composed, auto_submitted="")
        outbound_id = new_id("out")
        domain = sender.address.rpartition("@")[2]
        rfc_id = compose.message_id_for(outbound_id, domain)
        raw = compose.build(composed, message_id=rfc_id, date=now)
        sign = self._signer(domain) if self._signer is not None else None
        if sign is not None:
            raw = sign(raw)
        parsed = parse_message(raw, self.limits)
        return _Built(outbound_id, rfc_id, raw, hashlib.sha256(raw).hexdigest(), parsed)

    # -- the transaction -----------------------------------------------------------------

    def _record(
        self,
        principal: Principal,
        kind: guards.Kind,
        sender: _Sender,
        composed: compose.Composed,
        context: _Context,
        built: _Built,
        claim: Claim,
    ) -> Submitted:
        now = self.clock.now()
        recipients = tuple(dict.fromkeys(r.lower() for r in composed.recipients))
        attachment_blobs = {
            hashlib.sha256(a.data).hexdigest(): a.data for a in built.parsed.attachments
        }
        self._keep_files({built.sha256: built.raw, **attachment_blobs})
        with self.db.write() as conn:
            facts = self._facts(conn, kind, sender, recipients, composed, context, built, now)
            decision = guards.decide(facts)
            action = decision.action
            state = {
                "allow": states.QUEUED,
                "hold": states.PENDING_APPROVAL,
                "quarantine": states.QUARANTINED,
                "block": states.BLOCKED,
            }[action]
            inline = {
                sha: data
                for sha, data in {built.sha256: built.raw, **attachment_blobs}.items()
                if self.blobs.inlines(len(data))
            }
            message_id = thread_id = None
            if action != "block":
                self.blobs.put_many_in(conn, inline)
                thread_id = context.thread_id or self._new_thread(conn, sender, built, now)
                message_id = self._store_copy(conn, sender, thread_id, built, now)
            row = {
                "id": built.outbound_id,
                "workspace_id": sender.workspace_id,
                "agent_id": sender.agent_id,
                "kind": kind,
                "state": state,
                "decision": decision.as_dict(),
                "message_id": message_id,
                "thread_id": thread_id,
                "replied_message_id": context.replied_message_id,
                "rfc_message_id": built.rfc_message_id,
                "subject": composed.subject,
                "mail_from": sender.address,
                "recipients": list(recipients),
                "raw_sha256": built.sha256,
                "raw_size": len(built.raw),
                "attempts": 0,
                "next_attempt_at": now if state == states.QUEUED else None,
                "expires_at": (
                    now + timedelta(hours=self.settings.approval_expiry_hours)
                    if state in HELD_STATES
                    else None
                ),
                "created_at": now,
                "updated_at": now,
            }
            conn.execute(outbound.insert(), dict(**row))
            kinds = {a.address.lower(): "to" for a in composed.to}
            for a in composed.cc:
                kinds.setdefault(a.address.lower(), "cc")
            conn.execute(
                outbound_recipients.insert(),
                [
                    {
                        "outbound_id": built.outbound_id,
                        "address": r,
                        "workspace_id": sender.workspace_id,
                        "agent_id": sender.agent_id,
                        "domain": guards.domain_of(r),
                        "kind": kinds.get(r, "bcc"),
                        "status": "blocked"
                        if state == states.BLOCKED
                        else states.QUEUED
                        if state == states.QUEUED
                        else "held",
                        "created_at": now,
                        "updated_at": now,
                    }
                    for r in recipients
                ],
            )
            body = _view(row, composed)
            notified = False
            if state in HELD_STATES:
                notified = self._notify_owners(conn, sender, row, composed, decision, now)
                append_event(
                    conn,
                    workspace_id=sender.workspace_id,
                    agent_id=sender.agent_id,
                    type=OUTBOUND_PENDING_APPROVAL,
                    thread_id=thread_id,
                    created_at=now,
                    payload=_event_payload(row, composed),
                )
            elif state == states.BLOCKED:
                append_event(
                    conn,
                    workspace_id=sender.workspace_id,
                    agent_id=sender.agent_id,
                    type=OUTBOUND_BLOCKED,
                    thread_id=thread_id,
                    created_at=now,
                    payload=_event_payload(row, composed),
                )
            audit.record(
                conn,
                workspace_id=sender.workspace_id,
                actor=principal.actor,
                action="outbound.decided",
                at=now,
                target_type="outbound",
                target_id=built.outbound_id,
                kind=kind,
                agent_id=sender.agent_id,
                state=state,
                decision=decision.as_dict(),
                message=composed.as_facts(),
            )
            self.idempotency.complete(
                conn, claim, status=201, body=body, outbound_id=built.outbound_id
            )
        if notified:
            body = {**body, "notified": True}
        return Submitted(201, body)

    def _keep_files(self, blobs: dict[str, bytes]) -> None:
        """Large blobs go to the file tier before the transaction (as ingest does)."""
        for sha, data in blobs.items():
            if not self.blobs.inlines(len(data)):
                self.blobs.files.put(data, sha)

    def _facts(
        self,
        conn: Connection,
        kind: guards.Kind,
        sender: _Sender,
        recipients: tuple[str, ...],
        composed: compose.Composed,
        context: _Context,
        built: _Built,
        now: datetime,
    ) -> guards.OutboundFacts:
        s = self.settings
        policy = self.policies.get(conn, sender.agent_id)
        known = frozenset(r for r in recipients if policy.contacts.lookup(r)[0])
        lists = conn.execute(
            select(recipient_lists.c.list, recipient_lists.c.value).where(
                recipient_lists.c.workspace_id == sender.workspace_id,
                recipient_lists.c.scope.in_([sender.agent_id, "*"]),
            )
        ).all()
        allow = {v for kind_, v in lists if kind_ == "allow"}
        deny = {v for kind_, v in lists if kind_ == "deny"}

        def listed(values: set[str], r: str) -> str | None:
            if r in values:
                return r
            domain = guards.domain_of(r)
            return domain if domain in values else None

        suppressed = {
            row.address: row.reason
            for row in conn.execute(
                select(suppressions.c.address, suppressions.c.reason).where(
                    suppressions.c.workspace_id == sender.workspace_id,
                    suppressions.c.address.in_(recipients),
                )
            )
        }
        counted = outbound.c.state.not_in([states.BLOCKED, states.REJECTED, states.EXPIRED])
        hour, day = now - timedelta(hours=1), now - timedelta(days=1)
        last_hour, last_day = conn.execute(
            select(
                func.count().filter(outbound.c.created_at > hour),
                func.count(),
            ).where(outbound.c.agent_id == sender.agent_id, outbound.c.created_at > day, counted)
        ).one()
        per_domain: dict[str, int] = dict(
            conn.execute(
                select(outbound_recipients.c.domain, func.count())
                .where(
                    outbound_recipients.c.agent_id == sender.agent_id,
                    outbound_recipients.c.created_at > hour,
                    outbound_recipients.c.domain.in_({guards.domain_of(r) for r in recipients}),
                    outbound_recipients.c.status != "blocked",
                )
                .group_by(outbound_recipients.c.domain)
            ).all()
        )
        loop = None
        if kind == "reply" and context.loop is not None:
            window = now - timedelta(minutes=s.loop_window_minutes)
            replies = conn.execute(
                select(func.count()).where(
                    outbound.c.thread_id == context.thread_id,
                    outbound.c.agent_id == sender.agent_id,
                    outbound.c.kind == "reply",
                    outbound.c.created_at > window,
                    counted,
                )
            ).scalar_one()
            loop = guards.LoopFacts(
                auto_submitted=context.loop.auto_submitted,
                precedence=context.loop.precedence,
                list_id=context.loop.list_id,
                return_path=context.loop.return_path,
                from_address=context.loop.from_address,
                replies_in_window=replies,
                cap=s.loop_thread_cap,
                window_minutes=s.loop_window_minutes,
            )
        return guards.OutboundFacts(
            kind=kind,
            has_scope=True,  # checked before the claim: a missing scope is a 403
            tier=sender.tier,
            recipients=recipients,
            content=guards.ContentFacts(
                size=len(built.raw),
                max_size=s.outbound_max_bytes,
                attachment_names=tuple(a.filename for a in composed.attachments),
                blocked_extensions=frozenset(e.lower() for e in s.outbound_blocked_extensions),
            ),
            thread_has_inbound=context.thread_has_inbound,
            correspondents=context.correspondents,
            known_contacts=known,
            allowlisted=frozenset(r for r in recipients if listed(allow, r)),
            denied={r: hit for r in recipients if (hit := listed(deny, r)) is not None},
            suppressed=suppressed,
            limits=guards.RateLimits(s.rate_per_hour, s.rate_per_day, s.rate_per_domain_hour),
            counts=guards.RateCounts(last_hour, last_day, per_domain),
            loop=loop,
            rule=policy.decide_outbound(built.parsed, raw=built.raw, limits=self.limits),
        )

    def _new_thread(self, conn: Connection, sender: _Sender, built: _Built, now: datetime) -> str:
        thread_id = new_id("thr")
        parsed = built.parsed
        people = sorted(
            {a.address.lower() for a in (*parsed.to, *parsed.cc) if a.address}
            - set(sender.addresses)
        )[:100]
        conn.execute(
            threads.insert(),
            dict(
                id=thread_id,
                workspace_id=sender.workspace_id,
                agent_id=sender.agent_id,
                subject=parsed.subject[:1000],
                subject_key=subject_key(parsed.subject),
                participants=people,
                message_count=0,
                first_message_at=now,
                last_message_at=now,
            ),
        )
        return thread_id

    def _store_copy(
        self, conn: Connection, sender: _Sender, thread_id: str, built: _Built, now: datetime
    ) -> str:
        """The agent's copy of its outbound mail, in its thread, folder ``outbox``."""
        parsed = built.parsed
        message_id = new_id("msg")
        conn.execute(
            messages.insert(),
            dict(
                **_message_row(parsed, built),
                id=message_id,
                workspace_id=sender.workspace_id,
                agent_id=sender.agent_id,
                thread_id=thread_id,
                direction="outbound",
                folder="outbox",
                source="api",
                mail_from=sender.address,
                rcpt_to=None,
                received_at=now,
                visible_at=now,
                folder_changed_at=now,
            ),
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
                        "sha256": hashlib.sha256(att.data).hexdigest(),
                    }
                    for position, att in enumerate(parsed.attachments)
                ],
            )
        # Replies from recipients quote our Message-ID: they must find this thread.
        insert_ignoring_conflicts(
            conn,
            thread_refs,
            [
                {
                    "agent_id": sender.agent_id,
                    "ref_key": ref_key(built.rfc_message_id),
                    "thread_id": thread_id,
                }
            ],
        )
        people = {a.address.lower() for a in (*parsed.to, *parsed.cc) if a.address}
        current = conn.execute(
            select(threads.c.participants).where(threads.c.id == thread_id)
        ).scalar_one()
        conn.execute(
            update(threads)
            .where(threads.c.id == thread_id)
            .values(
                message_count=threads.c.message_count + 1,
                last_message_at=now,
                participants=sorted((set(current) | people) - set(sender.addresses))[:100],
            )
        )
        return message_id

    def _notify_owners(
        self,
        conn: Connection,
        sender: _Sender,
        row: dict[str, Any],
        composed: compose.Composed,
        decision: guards.OutboundDecision,
        now: datetime,
    ) -> bool:
        """Queue the owners' notification: an email to every owner address, and a POST
        to ``approval_webhook_url`` when set. Both are outbound rows the delivery worker
        sends with the same retries as agent mail; neither passes the agent policy."""
        emails = sorted(
            {
                e.lower()
                for e in conn.execute(
                    select(owners.c.email).where(
                        owners.c.workspace_id == sender.workspace_id, owners.c.email.is_not(None)
                    )
                ).scalars()
                if e
            }
        )
        queued = False
        if emails:
            notice_id = new_id("out")
            domain = self.settings.agent_domain
            from_ = compose.mailbox_of(f"{SYSTEM_SENDER}@{domain}", "mailgate")
            reasons = "\n".join(f"- {r}" for r in decision.reasons)
            text = (
                f"{sender.name} <{sender.address}> wants to send a message that needs "
                f"your approval.\n\nTo: {', '.join(row['recipients'])}\n"
                f"Subject: {composed.subject}\n\nWhy it was held:\n{reasons}\n\n"
                f"Approve:  mailgate outbox approve {row['id']}\n"
                f"Reject:   mailgate outbox reject {row['id']} --comment '...'\n"
                f"API:      POST /v1/outbound/{row['id']}/approve\n\n"
                f"It expires at {row['expires_at'].isoformat()} if nobody decides.\n"
            )
            notice = compose.validate(
                compose.Draft(
                    to=tuple(emails),
                    subject=f"[mailgate] Approval needed: {composed.subject}"[:900],
                    text=text,
                ),
                sender=from_,
            )
            rfc_id = compose.message_id_for(notice_id, domain)
            self._queue_system(
                conn,
                kind="notification",
                outbound_id=notice_id,
                about=row,
                mail_from=from_.address,
                recipients=emails,
                rfc_id=rfc_id,
                subject=notice.subject,
                raw=compose.build(notice, message_id=rfc_id, date=now),
                now=now,
            )
            queued = True
        url = self.settings.approval_webhook_url
        if url:
            hook_id = new_id("out")
            body = json.dumps(
                {
                    "type": OUTBOUND_PENDING_APPROVAL,
                    "outbound_id": row["id"],
                    "agent_id": sender.agent_id,
                    "workspace_id": sender.workspace_id,
                    "recipients": row["recipients"],
                    "subject": composed.subject,
                    "reasons": list(decision.reasons),
                    "expires_at": row["expires_at"].isoformat(),
                },
                sort_keys=True,
            ).encode()
            self._queue_system(
                conn,
                kind="webhook",
                outbound_id=hook_id,
                about=row,
                mail_from="",
                recipients=[url],
                rfc_id=hook_id,
                subject="",
                raw=body,
                now=now,
            )
            queued = True
        return queued

    def _queue_system(
        self,
        conn: Connection,
        *,
        kind: str,
        outbound_id: str,
        about: dict[str, Any],
        mail_from: str,
        recipients: list[str],
        rfc_id: str,
        subject: str,
        raw: bytes,
        now: datetime,
    ) -> None:
        """Queue a system notification about the request ``about`` (no agent, no
        policy): its bytes stored, then a row the delivery worker sends."""
        sha = hashlib.sha256(raw).hexdigest()
        if self.blobs.inlines(len(raw)):
            self.blobs.put_in(conn, raw, sha)
        else:
            self.blobs.files.put(raw, sha)
        conn.execute(
            outbound.insert(),
            dict(
                id=outbound_id,
                workspace_id=about["workspace_id"],
                agent_id=None,
                kind=kind,
                state=states.QUEUED,
                decision={"action": "allow", "reasons": [f"owner notification for {about['id']}"]},
                replied_message_id=None,
                rfc_message_id=rfc_id,
                subject=subject,
                mail_from=mail_from,
                recipients=recipients,
                raw_sha256=sha,
                raw_size=len(raw),
                attempts=0,
                next_attempt_at=now,
                created_at=now,
                updated_at=now,
            ),
        )

    # -- reading -----------------------------------------------------------------------

    def _target_agent(self, principal: Principal, agent_id: str | None) -> str:
        if not principal.is_owner:
            assert principal.agent_id is not None
            if agent_id is not None and agent_id != principal.agent_id:
                raise NotFound(f"no agent {agent_id}")
            return principal.agent_id
        if agent_id is None:
            raise ValidationFailed(
                "an owner key must name the sending agent",
                errors=[{"field": "agent_id", "message": "required with an owner key"}],
            )
        with self.db.read() as conn:
            found = conn.execute(
                select(agents.c.id).where(
                    agents.c.id == agent_id, agents.c.workspace_id == principal.workspace_id
                )
            ).first()
        if found is None:
            raise NotFound(f"no agent {agent_id}")
        return agent_id

    @staticmethod
    def _sender(conn: Connection, agent_id: str) -> _Sender:
        row = conn.execute(
            select(agents.c.workspace_id, agents.c.name, agents.c.tier).where(
                agents.c.id == agent_id
            )
        ).one()
        addresses = tuple(
            conn.execute(
                select(agent_addresses.c.address)
                .where(agent_addresses.c.agent_id == agent_id)
                .order_by(agent_addresses.c.created_at, agent_addresses.c.address)
            ).scalars()
        )
        return _Sender(agent_id, row.workspace_id, addresses[0], addresses, row.name, row.tier)

    def _original(
        self, principal: Principal, message_id: str, *, with_raw: bool = False
    ) -> _OriginalInfo:
        """The message a reply/forward answers, if the caller may see it (an agent key:
        only its own agent's messages that reached it)."""
        from mailgate.services.queries import visible_messages

        with self.db.read() as conn:
            row = conn.execute(
                select(messages).where(
                    messages.c.id == message_id,
                    messages.c.workspace_id == principal.workspace_id,
                    visible_messages(principal),
                )
            ).first()
            if row is None:
                raise NotFound(f"no message {message_id}")
            has_inbound = (
                conn.execute(
                    select(messages.c.id)
                    .where(
                        messages.c.thread_id == row.thread_id,
                        messages.c.direction == "inbound",
                        messages.c.visible_at.is_not(None),
                    )
                    .limit(1)
                ).first()
                is not None
            )
        raw = self.blobs.get(row.raw_sha256)
        headers = BytesHeaderParser(policy=compat32).parsebytes(raw)
        original = compose.Original(
            rfc_message_id=row.rfc_message_id,
            subject=row.subject,
            from_=tuple(_mailboxes(row.from_addr)),
            reply_to=tuple(_mailboxes(row.reply_to)),
            to=tuple(_mailboxes(row.to_addrs)),
            cc=tuple(_mailboxes(row.cc_addrs)),
            references=tuple(row.references or ()),
            raw=raw if with_raw else None,
        )
        loop = None
        if row.direction == "inbound":
            loop = _LoopHeaders(
                auto_submitted=_header(headers, "Auto-Submitted"),
                precedence=(_header(headers, "Precedence") or "").strip().lower() or None,
                list_id=_header(headers, "List-Id"),
                return_path=row.mail_from if row.source == "smtp" else None,
                from_address=row.from_address or "",
            )
        context = _Context(
            thread_id=row.thread_id,
            replied_message_id=row.id,
            thread_has_inbound=has_inbound,
            correspondents=frozenset(
                m.address.lower()
                for m in (*original.from_, *original.reply_to, *original.to, *original.cc)
            ),
            loop=loop,
        )
        return _OriginalInfo(row.agent_id, original, context)

    def list(
        self,
        principal: Principal,
        *,
        agent_id: str | None = None,
        state: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Page[dict[str, Any]]:
        """Outbound requests, newest first. Agent keys see their own agent's.

        Raises:
            Forbidden: an agent key without ``messages:read``.
            ValidationFailed: a bad limit, state or cursor.
        """
        principal.require(MESSAGES_READ)
        check_limit(limit)
        if state is not None and state not in states.STATES:
            raise ValidationFailed(
                f"unknown state {state!r}",
                errors=[{"field": "state", "message": f"one of {', '.join(states.STATES)}"}],
            )
        query = select(outbound).where(
            outbound.c.workspace_id == principal.workspace_id, outbound.c.agent_id.is_not(None)
        )
        if not principal.is_owner:
            query = query.where(outbound.c.agent_id == principal.agent_id)
        elif agent_id is not None:
            query = query.where(outbound.c.agent_id == agent_id)
        if state is not None:
            query = query.where(outbound.c.state == state)
        if cursor:
            query = query.where(outbound.c.seq < decode_seq_cursor(cursor))
        with self.db.read() as conn:
            rows = conn.execute(query.order_by(outbound.c.seq.desc()).limit(limit + 1)).all()
        page, last = page_rows(rows, limit)
        next_cursor = encode_seq_cursor(last.seq) if last is not None else None
        return Page(tuple(_summary(r) for r in page), next_cursor)

    def get(self, principal: Principal, outbound_id: str) -> dict[str, Any]:
        """One request with its decision, approval and delivery attempts.

        Raises:
            NotFound: no such request visible to the caller.
        """
        principal.require(MESSAGES_READ)
        with self.db.read() as conn:
            row = self._visible(conn, principal, outbound_id)
            verdicts = conn.execute(
                select(approvals).where(approvals.c.outbound_id == outbound_id)
            ).all()
            attempts = conn.execute(
                select(delivery_attempts)
                .where(delivery_attempts.c.outbound_id == outbound_id)
                .order_by(delivery_attempts.c.number)
            ).all()
            recipients = conn.execute(
                select(outbound_recipients)
                .where(outbound_recipients.c.outbound_id == outbound_id)
                .order_by(outbound_recipients.c.address)
            ).all()
        detail = _summary(row)
        detail.update(
            decision=row.decision,
            last_error=row.last_error,
            provider_message_id=row.provider_message_id,
            recipients=[
                {"address": r.address, "kind": r.kind, "status": r.status, "detail": r.detail}
                for r in recipients
            ],
            approvals=[
                {
                    "id": v.id,
                    "actor": v.actor,
                    "verdict": v.verdict,
                    "comment": v.comment,
                    "created_at": v.created_at.isoformat(),
                }
                for v in verdicts
            ],
            attempts=[
                {
                    "number": a.number,
                    "transport": a.transport,
                    "worker": a.worker,
                    "started_at": a.started_at.isoformat(),
                    "finished_at": a.finished_at.isoformat() if a.finished_at else None,
                    "outcome": a.outcome,
                    "code": a.code,
                    "detail": a.detail,
                }
                for a in attempts
            ],
        )
        return detail

    @staticmethod
    def _visible(conn: Connection, principal: Principal, outbound_id: str) -> Any:
        query = select(outbound).where(
            outbound.c.id == outbound_id,
            outbound.c.workspace_id == principal.workspace_id,
            outbound.c.agent_id.is_not(None),
        )
        if not principal.is_owner:
            query = query.where(outbound.c.agent_id == principal.agent_id)
        row = conn.execute(query).first()
        if row is None:
            raise NotFound(f"no outbound request {outbound_id}")
        return row

    # -- approvals ----------------------------------------------------------------------

    def approve(self, by: Actor, outbound_id: str, *, comment: str = "") -> dict[str, Any]:
        """Release held (or quarantined) mail for delivery, exactly once.

        Two owners approving at the same instant: both run the conditional update; the
        database lets one match (``state`` still held) and the other sees zero rows,
        and the unique ``approvals.outbound_id`` backs that up.

        Raises:
            Forbidden: not an owner.
            NotFound: no such request in the workspace.
            AlreadyDecided: it is no longer waiting (approved, rejected or expired).
        """
        return self._decide(by, outbound_id, "approved", comment)

    def reject(self, by: Actor, outbound_id: str, *, comment: str = "") -> dict[str, Any]:
        """Refuse held mail: it is never sent; the agent's outbox copy is removed.

        Raises:
            (as :meth:`approve`)
        """
        return self._decide(by, outbound_id, "rejected", comment)

    def _decide(self, by: Actor, outbound_id: str, verdict: str, comment: str) -> dict[str, Any]:
        actor, workspace_id = _owner(by)
        now = self.clock.now()
        new_state = states.QUEUED if verdict == "approved" else states.REJECTED
        with self.db.write() as conn:
            query = select(outbound).where(
                outbound.c.id == outbound_id, outbound.c.agent_id.is_not(None)
            )
            if workspace_id is not None:
                query = query.where(outbound.c.workspace_id == workspace_id)
            row = conn.execute(query).first()
            if row is None:
                raise NotFound(f"no outbound request {outbound_id}")
            self._apply_verdict(conn, row, verdict, new_state, actor, comment, now)
        if new_state == states.QUEUED:
            self._wake()
        return self.get_as_system(outbound_id)

    def _apply_verdict(
        self,
        conn: Connection,
        row: Any,
        verdict: str,
        new_state: str,
        actor: str,
        comment: str,
        now: datetime,
    ) -> None:
        changed = conn.execute(
            update(outbound)
            .where(outbound.c.id == row.id, outbound.c.state.in_(HELD_STATES))
            .values(
                state=new_state,
                next_attempt_at=now if new_state == states.QUEUED else None,
                updated_at=now,
            )
        ).rowcount
        if changed != 1:
            current = conn.execute(
                select(outbound.c.state).where(outbound.c.id == row.id)
            ).scalar_one()
            raise AlreadyDecided(
                f"outbound request {row.id} is {current}, not waiting for approval",
                state=current,
            )
        conn.execute(
            approvals.insert(),
            dict(
                id=new_id("apr"),
                outbound_id=row.id,
                workspace_id=row.workspace_id,
                actor=actor,
                verdict=verdict,
                comment=comment[:4000],
                created_at=now,
            ),
        )
        conn.execute(
            update(outbound_recipients)
            .where(outbound_recipients.c.outbound_id == row.id)
            .values(status=states.QUEUED if new_state == states.QUEUED else verdict, updated_at=now)
        )
        if new_state != states.QUEUED and row.message_id is not None:
            _withdraw_copy(conn, row.message_id)
        event = {
            "approved": OUTBOUND_APPROVED,
            "rejected": OUTBOUND_REJECTED,
            "expired": OUTBOUND_EXPIRED,
        }[verdict]
        append_event(
            conn,
            workspace_id=row.workspace_id,
            agent_id=row.agent_id,
            type=event,
            thread_id=row.thread_id,
            created_at=now,
            payload={
                "outbound_id": row.id,
                "agent_id": row.agent_id,
                "actor": actor,
                "comment": comment,
                "state": new_state,
            },
        )
        audit.record(
            conn,
            workspace_id=row.workspace_id,
            actor=actor,
            action=f"outbound.{verdict}",
            at=now,
            target_type="outbound",
            target_id=row.id,
            comment=comment,
            agent_id=row.agent_id,
        )

    def expire_pending(self, *, limit: int = 500) -> int:
        """Held requests nobody decided on in time become ``expired`` (audited)."""
        now = self.clock.now()
        with self.db.write() as conn:
            rows = conn.execute(
                select(outbound)
                .where(outbound.c.state.in_(HELD_STATES), outbound.c.expires_at <= now)
                .limit(limit)
            ).all()
            for row in rows:
                self._apply_verdict(
                    conn, row, "expired", states.EXPIRED, "system", "approval window passed", now
                )
        return len(rows)

    def get_as_system(self, outbound_id: str) -> dict[str, Any]:
        """:meth:`get` with owner visibility in the request's own workspace (the CLI,
        and answers to approvals).

        Raises:
            NotFound: no such request.
        """
        with self.db.read() as conn:
            workspace_id = conn.execute(
                select(outbound.c.workspace_id).where(outbound.c.id == outbound_id)
            ).scalar_one_or_none()
        if workspace_id is None:
            raise NotFound(f"no outbound request {outbound_id}")
        return self.get(
            Principal(workspace_id=workspace_id, key_id="system", kind="owner"), outbound_id
        )

    def pending(self, by: Actor, *, limit: int = 100) -> builtins.list[dict[str, Any]]:
        """Held requests waiting for an owner, oldest first (the approval queue)."""
        _, workspace_id = _owner(by)
        query = select(outbound).where(outbound.c.state.in_(HELD_STATES))
        if workspace_id is not None:
            query = query.where(outbound.c.workspace_id == workspace_id)
        with self.db.read() as conn:
            rows = conn.execute(query.order_by(outbound.c.seq).limit(limit)).all()
        out = []
        for r in rows:
            item = _summary(r)
            item["decision"] = r.decision
            out.append(item)
        return out


# -- helpers -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _LoopHeaders:
    auto_submitted: str | None
    precedence: str | None
    list_id: str | None
    return_path: str | None
    from_address: str


@dataclass(frozen=True, slots=True)
class _Context:
    thread_id: str | None = None
    replied_message_id: str | None = None
    thread_has_inbound: bool = False
    correspondents: frozenset[str] = frozenset()
    loop: _LoopHeaders | None = None


@dataclass(frozen=True, slots=True)
class _OriginalInfo:
    agent_id: str
    original: compose.Original
    context: _Context


@dataclass(frozen=True, slots=True)
class _Built:
    outbound_id: str
    rfc_message_id: str
    raw: bytes
    sha256: str
    parsed: ParsedMessage


def _mailbox(sender: _Sender) -> compose.Mailbox:
    return compose.mailbox_of(sender.address, sender.name)


def _mailboxes(values: Any) -> list[compose.Mailbox]:
    out = []
    for v in values or ():
        address = (v.get("address") or "").strip()
        if address and "@" in address:
            out.append(compose.mailbox_of(address, v.get("name") or ""))
    return out


def _header(headers: Any, name: str) -> str | None:
    value = headers.get(name)
    return None if value is None else " ".join(str(value).split())


def _owner(by: Actor) -> tuple[str, str | None]:
    """(audit actor, workspace id or None for the operator) of an owner-only call."""
    if isinstance(by, Operator):
        return by.actor, None
    by.require_owner()
    return by.actor, by.workspace_id


def _withdraw_copy(conn: Connection, message_id: str) -> None:
    """Mail that will never be sent leaves the agent's outbox (the request keeps the
    raw and the decision)."""
    thread_id = conn.execute(
        select(messages.c.thread_id).where(messages.c.id == message_id)
    ).scalar_one_or_none()
    if thread_id is None:
        return
    conn.execute(messages.delete().where(messages.c.id == message_id))
    conn.execute(
        update(threads)
        .where(threads.c.id == thread_id)
        .values(message_count=threads.c.message_count - 1)
    )


def _message_row(parsed: ParsedMessage, built: _Built) -> dict[str, Any]:
    return {
        **message_columns(parsed),
        "dedup_key": hashlib.sha256(
            f"{built.rfc_message_id}\x00{built.sha256}".encode()
        ).hexdigest(),
        "rfc_message_id": built.rfc_message_id,
        "message_id_generated": False,
        "raw_sha256": built.sha256,
        "raw_size": len(built.raw),
    }


def _summary(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "agent_id": row.agent_id,
        "kind": row.kind,
        "status": row.state,
        "action": (row.decision or {}).get("action"),
        "reasons": (row.decision or {}).get("reasons", []),
        "message_id": row.message_id,
        "thread_id": row.thread_id,
        "rfc_message_id": row.rfc_message_id,
        "from": row.mail_from,
        "recipients": list(row.recipients),
        "attempts": row.attempts,
        "next_attempt_at": row.next_attempt_at.isoformat() if row.next_attempt_at else None,
        "expires_at": row.expires_at.isoformat() if row.expires_at else None,
        "created_at": row.created_at.isoformat(),
        "sent_at": row.sent_at.isoformat() if row.sent_at else None,
        "delivered_at": row.delivered_at.isoformat() if row.delivered_at else None,
    }


def _view(row: dict[str, Any], composed: compose.Composed) -> dict[str, Any]:
    """The first response (stored for idempotent replays)."""
    return {
        "id": row["id"],
        "agent_id": row["agent_id"],
        "kind": row["kind"],
        "status": row["state"],
        "decision": row["decision"],
        "message_id": row["message_id"],
        "thread_id": row["thread_id"],
        "rfc_message_id": row["rfc_message_id"],
        "from": row["mail_from"],
        "to": [a.address for a in composed.to],
        "cc": [a.address for a in composed.cc],
        "bcc": [a.address for a in composed.bcc],
        "subject": composed.subject,
        "expires_at": row["expires_at"].isoformat() if row["expires_at"] else None,
        "created_at": row["created_at"].isoformat(),
    }


def _event_payload(row: dict[str, Any], composed: compose.Composed) -> dict[str, Any]:
    return {
        "outbound_id": row["id"],
        "agent_id": row["agent_id"],
        "message_id": row["message_id"],
        "thread_id": row["thread_id"],
        "status": row["state"],
        "recipients": row["recipients"],
        "subject": composed.subject,
        "reasons": row["decision"]["reasons"],
        "codes": row["decision"]["codes"],
    }


__all__ = ["OutboundService", "Submitted"]
