"""Delivery: claim queued outbound mail with a lease, hand it on, record the outcome.

**Claim, lease, record.** A worker claims due rows in one transaction (``FOR UPDATE
SKIP LOCKED`` on PostgreSQL, so workers on many hosts never claim the same row; the
write lock on SQLite), moving them to ``sending`` with a lease, and inserts the
attempt row *before* calling the transport. After the transport answers, a second
transaction records the outcome, but only if this worker still holds the lease.

**The crash boundary.** If a worker dies after the transport accepted a message but
before the outcome committed, nothing can know whether the remote side has it. The
lease expires, another worker claims the row, marks the unfinished attempt
``interrupted`` and sends again: at-least-once, never silently lost. The second copy
carries the same bytes and so the same ``Message-ID`` (generated when the request was
made, not when it is sent), which lets receivers and people recognise it as a
duplicate; the attempts list of the request shows exactly when this happened. No
copy is ever sent twice outside that window: a recorded outcome is final for its
attempt, and a worker whose lease was taken over records nothing but its attempt.

**Local recipients** (addresses of agents on this gateway) are delivered by ingesting
the message directly, with no transport; ingest de-duplicates by Message-ID and
bytes, so a retry never gives a local agent a second copy.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import Connection, select, update

from mailgate.clock import Clock
from mailgate.domain import delivery as states
from mailgate.domain.delivery import RetryPolicy
from mailgate.errors import DeliveryError, PermanentDeliveryError, TemporaryDeliveryError
from mailgate.ids import new_id
from mailgate.services import audit
from mailgate.services.events import OUTBOUND_BOUNCED, OUTBOUND_SENT, append_event
from mailgate.services.ingest import Envelope
from mailgate.services.tenancy import Recipient
from mailgate.store.blobs import TieredBlobStore
from mailgate.store.db import Database
from mailgate.store.dialect import insert_ignoring_conflicts
from mailgate.store.schema import (
    delivery_attempts,
    messages,
    outbound,
    outbound_recipients,
    suppressions,
)
from mailgate.transports.base import OutgoingMessage, Transport, TransportReceipt

log = logging.getLogger(__name__)

INTERRUPTED_DETAIL = (
    "the worker's lease expired before it recorded an outcome: the transport may have "
    "accepted this attempt, so the next one may be a second copy (same Message-ID)"
)


@dataclass(frozen=True, slots=True)
class Claimed:
    """One request this worker now holds the lease of, and the attempt it is making."""

    id: str
    workspace_id: str
    agent_id: str | None
    kind: str
    mail_from: str
    recipients: tuple[str, ...]
    raw_sha256: str
    rfc_message_id: str
    subject: str
    message_id: str | None
    thread_id: str | None
    attempt: int
    attempt_id: str
    interrupted: bool
    """The previous attempt never recorded an outcome (a worker died mid-delivery)."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt came to (for callers and tests)."""

    outbound_id: str
    state: str
    attempt: int
    detail: str
    local: tuple[str, ...] = ()
    refused: dict[str, str] = field(default_factory=dict)


LocalResolver = Callable[[str], Recipient | None]
LocalDeliverer = Callable[[bytes, Envelope, Sequence[Recipient]], object]


class DeliveryService:
    def __init__(
        self,
        db: Database,
        blobs: TieredBlobStore,
        clock: Clock,
        transport: Transport,
        *,
        retry: RetryPolicy,
        lease: timedelta,
        worker_id: str,
        resolve_local: LocalResolver | None = None,
        deliver_local: LocalDeliverer | None = None,
        webhook_timeout: float = 10.0,
        rng: random.Random | None = None,
    ) -> None:
        self.db = db
        self.blobs = blobs
        self.clock = clock
        self.transport = transport
        self.retry = retry
        self.lease = lease
        self.worker_id = worker_id
        self.resolve_local = resolve_local
        self.deliver_local = deliver_local
        self.webhook_timeout = webhook_timeout
        self.rng = rng or random.Random()
        self._http: httpx.AsyncClient | None = None

    # -- claim ---------------------------------------------------------------------------

    def claim(self, limit: int) -> list[Claimed]:
        """Lease up to ``limit`` due requests (queued and due, or sending with an expired
        lease) and open an attempt for each; committed before returning."""
        if limit <= 0:
            return []
        now = self.clock.now()
        with self.db.write() as conn:
            due = ((outbound.c.state == states.QUEUED) & (outbound.c.next_attempt_at <= now)) | (
                (outbound.c.state == states.SENDING) & (outbound.c.lease_expires_at < now)
            )
            query = select(outbound).where(due).order_by(outbound.c.next_attempt_at).limit(limit)
            if conn.dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True)
            rows = conn.execute(query).all()
            claimed = [self._lease(conn, row, now) for row in rows]
        return claimed

    def _lease(self, conn: Connection, row: Any, now: datetime) -> Claimed:
        interrupted = row.state == states.SENDING
        if interrupted:
            conn.execute(
                update(delivery_attempts)
                .where(
                    delivery_attempts.c.outbound_id == row.id,
                    delivery_attempts.c.outcome.is_(None),
                )
                .values(outcome="interrupted", finished_at=now, detail=INTERRUPTED_DETAIL)
            )
        number = row.attempts + 1
        conn.execute(
            update(outbound)
            .where(outbound.c.id == row.id)
            .values(
                state=states.SENDING,
                attempts=number,
                lease_owner=self.worker_id,
                lease_expires_at=now + self.lease,
                updated_at=now,
            )
        )
        attempt_id = new_id("try")
        conn.execute(
            delivery_attempts.insert(),
            dict(
                id=attempt_id,
                outbound_id=row.id,
                number=number,
                transport=self._transport_name(row.kind),
                worker=self.worker_id,
                started_at=now,
            ),
        )
        return Claimed(
            id=row.id,
            workspace_id=row.workspace_id,
            agent_id=row.agent_id,
            kind=row.kind,
            mail_from=row.mail_from,
            recipients=tuple(row.recipients),
            raw_sha256=row.raw_sha256,
            rfc_message_id=row.rfc_message_id,
            subject=row.subject,
            message_id=row.message_id,
            thread_id=row.thread_id,
            attempt=number,
            attempt_id=attempt_id,
            interrupted=interrupted,
        )

    def _transport_name(self, kind: str) -> str:
        return "webhook" if kind == "webhook" else self.transport.name

    # -- deliver -------------------------------------------------------------------------

    async def deliver(self, job: Claimed) -> Outcome:
        """Make the attempt and record it. Never raises for a delivery failure: the
        failure is the recorded outcome."""
        raw = await asyncio.to_thread(self.blobs.get, job.raw_sha256)
        try:
            if job.kind == "webhook":
                receipt = await self._post_webhook(job, raw)
                local: tuple[str, ...] = ()
            else:
                local, remote = await asyncio.to_thread(self._split_local, job, raw)
                if remote:
                    receipt = await self.transport.send(
                        OutgoingMessage(
                            outbound_id=job.id,
                            workspace_id=job.workspace_id,
                            agent_id=job.agent_id,
                            mail_from=job.mail_from,
                            recipients=remote,
                            raw=raw,
                            rfc_message_id=job.rfc_message_id,
                            subject=job.subject,
                        )
                    )
                else:
                    receipt = TransportReceipt("local", 250, "delivered locally")
        except DeliveryError as exc:
            return await asyncio.to_thread(self._record_failure, job, exc)
        except Exception as exc:  # a transport bug must not strand the row in `sending`
            log.exception("transport failed on %s", job.id)
            error = TemporaryDeliveryError(f"{type(exc).__name__}: {exc}")
            return await asyncio.to_thread(self._record_failure, job, error)
        return await asyncio.to_thread(self._record_success, job, receipt, local)

    def _split_local(self, job: Claimed, raw: bytes) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Deliver to this gateway's own agents by ingest; return (local, remote)."""
        if self.resolve_local is None or self.deliver_local is None:
            return (), job.recipients
        found: list[Recipient] = []
        local: list[str] = []
        remote: list[str] = []
        for address in job.recipients:
            recipient = self.resolve_local(address)
            if recipient is None:
                remote.append(address)
            else:
                found.append(recipient)
                local.append(address)
        if found:
            self.deliver_local(raw, Envelope(mail_from=job.mail_from, source="local"), found)
        return tuple(local), tuple(remote)

    async def _post_webhook(self, job: Claimed, body: bytes) -> TransportReceipt:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self.webhook_timeout)
        url = job.recipients[0]
        try:
            response = await self._http.post(
                url,
                content=body,
                headers={
                    "content-type": "application/json",
                    "webhook-id": job.id,
                    "user-agent": "mailgate",
                },
            )
        except httpx.HTTPError as exc:
            raise TemporaryDeliveryError(f"{type(exc).__name__}: {exc}") from exc
        code = response.status_code
        if 200 <= code < 300:
            return TransportReceipt("webhook", code, response.reason_phrase)
        if code in (408, 429) or code >= 500:
            raise TemporaryDeliveryError(f"HTTP {code}", reply_code=code)
        raise PermanentDeliveryError(f"HTTP {code}", reply_code=code)

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    # -- record --------------------------------------------------------------------------

    def _hold_lease(self, conn: Connection, job: Claimed, values: dict[str, Any]) -> bool:
        """Apply ``values`` if this worker still holds the lease; False when another
        worker took the row over (then only the attempt row is recorded)."""
        changed = conn.execute(
            update(outbound)
            .where(
                outbound.c.id == job.id,
                outbound.c.state == states.SENDING,
                outbound.c.lease_owner == self.worker_id,
                outbound.c.attempts == job.attempt,
            )
            .values(**values)
        ).rowcount
        return changed == 1

    def _finish_attempt(
        self, conn: Connection, job: Claimed, outcome: str, code: int | None, detail: str
    ) -> None:
        conn.execute(
            update(delivery_attempts)
            .where(delivery_attempts.c.id == job.attempt_id)
            .values(outcome=outcome, code=code, detail=detail[:2000], finished_at=self.clock.now())
        )

    def _record_success(
        self, job: Claimed, receipt: TransportReceipt, local: tuple[str, ...]
    ) -> Outcome:
        now = self.clock.now()
        refused = {a.lower(): why for a, why in receipt.refused.items()}
        detail = f"{receipt.code or ''} {receipt.detail}".strip()
        with self.db.write() as conn:
            self._finish_attempt(conn, job, "sent", receipt.code, detail)
            held = self._hold_lease(
                conn,
                job,
                {
                    "state": states.SENT,
                    "sent_at": now,
                    "updated_at": now,
                    "transport": receipt.transport,
                    "provider_message_id": receipt.provider_message_id,
                    "lease_owner": None,
                    "lease_expires_at": None,
                    "next_attempt_at": None,
                    "last_error": None,
                },
            )
            if not held:
                return Outcome(job.id, "superseded", job.attempt, detail)
            for address in job.recipients:
                status, why = "sent", detail
                if address in local:
                    status, why = states.DELIVERED, "delivered to a local agent"
                elif address in refused:
                    status, why = states.BOUNCED, refused[address]
                self._set_recipient(conn, job.id, address, status, why, now)
            if job.message_id is not None:
                conn.execute(
                    update(messages)
                    .where(messages.c.id == job.message_id, messages.c.folder == "outbox")
                    .values(folder="sent", folder_changed_at=now)
                )
            if job.agent_id is not None:
                append_event(
                    conn,
                    workspace_id=job.workspace_id,
                    agent_id=job.agent_id,
                    type=OUTBOUND_SENT,
                    thread_id=job.thread_id,
                    created_at=now,
                    payload={
                        "outbound_id": job.id,
                        "agent_id": job.agent_id,
                        "message_id": job.message_id,
                        "thread_id": job.thread_id,
                        "rfc_message_id": job.rfc_message_id,
                        "transport": receipt.transport,
                        "recipients": list(job.recipients),
                        "attempt": job.attempt,
                        "refused": refused,
                    },
                )
            if refused:
                self._bounce(conn, job, refused, now)
        return Outcome(job.id, states.SENT, job.attempt, detail, local, refused)

    def _record_failure(self, job: Claimed, error: DeliveryError) -> Outcome:
        now = self.clock.now()
        permanent = isinstance(error, PermanentDeliveryError)
        decision = self.retry.decide(
            attempts=job.attempt,
            failure="permanent" if permanent else "temporary",
            now=now,
            rng=self.rng,
        )
        code = error.reply_code
        detail = f"{code or ''} {error.detail}".strip()
        with self.db.write() as conn:
            self._finish_attempt(conn, job, "failed" if permanent else "deferred", code, detail)
            if decision.retry:
                values: dict[str, Any] = {
                    "state": states.QUEUED,
                    "next_attempt_at": decision.retry_at,
                }
            else:
                values = {"state": decision.final_state, "next_attempt_at": None}
            values.update(
                updated_at=now, last_error=detail, lease_owner=None, lease_expires_at=None
            )
            if not self._hold_lease(conn, job, values):
                return Outcome(job.id, "superseded", job.attempt, detail)
            if decision.retry:
                for address in job.recipients:
                    self._set_recipient(conn, job.id, address, "deferred", detail, now)
                return Outcome(job.id, states.QUEUED, job.attempt, decision.reason)
            final = str(decision.final_state)
            for address in job.recipients:
                self._set_recipient(conn, job.id, address, final, detail, now)
            if permanent:
                self._bounce(conn, job, {a: detail for a in job.recipients}, now)
            elif job.agent_id is not None:
                _bounced_event(
                    conn, job, list(job.recipients), decision.reason, detail, now, permanent=False
                )
        return Outcome(job.id, final, job.attempt, decision.reason)

    @staticmethod
    def _set_recipient(
        conn: Connection, outbound_id: str, address: str, status: str, detail: str, now: datetime
    ) -> None:
        conn.execute(
            update(outbound_recipients)
            .where(
                outbound_recipients.c.outbound_id == outbound_id,
                outbound_recipients.c.address == address,
            )
            .values(status=status, detail=detail[:1000], updated_at=now)
        )

    def _bounce(
        self, conn: Connection, job: Claimed, refused: dict[str, str], now: datetime
    ) -> None:
        """A 5xx for some recipients: suppress them (hard bounce) and tell the agent."""
        if job.agent_id is None:
            return  # an owner notification bouncing says nothing about an agent
        insert_ignoring_conflicts(
            conn,
            suppressions,
            [
                {
                    "id": new_id("sup"),
                    "workspace_id": job.workspace_id,
                    "address": address,
                    "reason": "hard_bounce",
                    "source": "smtp",
                    "detail": why[:1000],
                    "outbound_id": job.id,
                    "created_at": now,
                }
                for address, why in sorted(refused.items())
            ],
        )
        for address in sorted(refused):
            audit.record(
                conn,
                workspace_id=job.workspace_id,
                actor="system",
                action="suppression.added",
                at=now,
                target_type="address",
                target_id=hashlib.sha256(address.encode()).hexdigest()[:40],
                address=address,
                reason="hard_bounce",
                source="smtp",
                outbound_id=job.id,
            )
        _bounced_event(
            conn,
            job,
            sorted(refused),
            "hard_bounce",
            next(iter(refused.values()), ""),
            now,
            permanent=True,
        )

    # -- one round -----------------------------------------------------------------------

    async def run_once(self, limit: int = 10) -> list[Outcome]:
        """Claim and deliver what is due now, concurrently (tests and the CLI)."""
        jobs = await asyncio.to_thread(self.claim, limit)
        return list(await asyncio.gather(*(self.deliver(job) for job in jobs)))


def _bounced_event(
    conn: Connection,
    job: Claimed,
    recipients: list[str],
    reason: str,
    detail: str,
    now: datetime,
    *,
    permanent: bool,
) -> None:
    """``outbound.bounced`` for the agent: a 5xx (``permanent``) or retries used up."""
    append_event(
        conn,
        workspace_id=job.workspace_id,
        agent_id=job.agent_id,
        type=OUTBOUND_BOUNCED,
        thread_id=job.thread_id,
        created_at=now,
        payload={
            "outbound_id": job.id,
            "agent_id": job.agent_id,
            "recipients": recipients,
            "reason": reason,
            "detail": detail,
            "source": "smtp" if permanent else "delivery",
            "permanent": permanent,
        },
    )
