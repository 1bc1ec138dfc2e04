"""The capture transport: the embedded default, which sends nothing and keeps a record.

Every message the gateway would have sent becomes a ``captured`` row (envelope, subject,
Message-ID and the SHA-256 of the bytes, which the delivery service already put in the
blob store), so a developer can see exactly what left, byte for byte, through
``GET /v1/captured`` without any mail server. The row is committed durably before the
transport answers 250, like a real relay's queue.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, false, select

from mailgate.clock import Clock
from mailgate.domain.keys import MESSAGES_READ, Principal
from mailgate.errors import NotFound
from mailgate.ids import new_id
from mailgate.services.queries import (
    DEFAULT_LIMIT,
    Page,
    check_limit,
    decode_seq_cursor,
    encode_seq_cursor,
    page_rows,
)
from mailgate.store.blobs import BlobStore
from mailgate.store.db import Database
from mailgate.store.schema import captured
from mailgate.transports.base import OutgoingMessage, TransportReceipt


class CaptureTransport:
    """Stores what would have been sent; never fails for a remote reason."""

    name = "capture"

    def __init__(self, db: Database, clock: Clock) -> None:
        self.db = db
        self.clock = clock

    async def send(self, message: OutgoingMessage) -> TransportReceipt:
        """Record ``message`` (its bytes must already be in the blob store under their
        SHA-256) and answer 250 once the row is committed."""
        captured_id = new_id("cap")
        await asyncio.to_thread(self._insert, captured_id, message)
        return TransportReceipt(
            transport=self.name,
            code=250,
            detail=f"2.0.0 captured as {captured_id}",
            provider_message_id=captured_id,
        )

    def _insert(self, captured_id: str, message: OutgoingMessage) -> None:
        with self.db.write() as conn:
            conn.execute(
                captured.insert(),
                dict(
                    id=captured_id,
                    workspace_id=message.workspace_id,
                    agent_id=message.agent_id,
                    outbound_id=message.outbound_id,
                    mail_from=message.mail_from,
                    recipients=list(message.recipients),
                    rfc_message_id=message.rfc_message_id,
                    subject=message.subject,
                    raw_sha256=hashlib.sha256(message.raw).hexdigest(),
                    raw_size=len(message.raw),
                    created_at=self.clock.now(),
                ),
            )

    async def aclose(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class CapturedMessage:
    """One captured message's envelope and metadata (the bytes via ``get_raw``)."""

    captured_id: str
    workspace_id: str
    agent_id: str | None
    outbound_id: str
    mail_from: str
    recipients: tuple[str, ...]
    rfc_message_id: str
    subject: str
    size: int
    created_at: datetime


class CapturedService:
    """Reads of the capture outbox, with the same isolation as every other read: agent
    keys (scope ``messages:read``) see their agent's mail, owner keys their workspace's;
    anything else is not found."""

    def __init__(self, db: Database, blobs: BlobStore) -> None:
        self.db = db
        self.blobs = blobs

    def list(
        self,
        principal: Principal,
        *,
        agent_id: str | None = None,
        limit: int = DEFAULT_LIMIT,
        cursor: str | None = None,
    ) -> Page[CapturedMessage]:
        """Captured mail, newest first.

        Raises:
            Forbidden: the key lacks ``messages:read``.
            ValidationFailed: ``limit`` out of range or a malformed ``cursor``.
        """
        principal.require(MESSAGES_READ)
        check_limit(limit)
        query = (
            select(captured)
            .where(_visible(principal))
            .order_by(captured.c.seq.desc())
            .limit(limit + 1)
        )
        if agent_id is not None:
            query = query.where(captured.c.agent_id == agent_id)
        if cursor is not None:
            query = query.where(captured.c.seq < decode_seq_cursor(cursor))
        with self.db.read() as conn:
            rows = conn.execute(query).all()
        page, last = page_rows(rows, limit)
        next_cursor = encode_seq_cursor(last.seq) if last is not None else None
        return Page(tuple(_captured(row) for row in page), next_cursor)

    def get(self, principal: Principal, captured_id: str) -> CapturedMessage:
        """One captured message's metadata.

        Raises:
            Forbidden: the key lacks ``messages:read``.
            NotFound: no such captured message visible to the caller.
        """
        principal.require(MESSAGES_READ)
        with self.db.read() as conn:
            row = conn.execute(
                select(captured).where(captured.c.id == captured_id, _visible(principal))
            ).first()
        if row is None:
            raise NotFound(f"no captured message {captured_id}")
        return _captured(row)

    def get_raw(self, principal: Principal, captured_id: str) -> bytes:
        """The bytes exactly as they would have been sent (signature and all).

        Raises:
            Forbidden: the key lacks ``messages:read``.
            NotFound: no such captured message visible to the caller.
        """
        principal.require(MESSAGES_READ)
        with self.db.read() as conn:
            sha = conn.execute(
                select(captured.c.raw_sha256).where(
                    captured.c.id == captured_id, _visible(principal)
                )
            ).scalar_one_or_none()
        if sha is None:
            raise NotFound(f"no captured message {captured_id}")
        return self.blobs.get(sha)


def _visible(principal: Principal) -> ColumnElement[bool]:
    in_workspace = captured.c.workspace_id == principal.workspace_id
    if principal.is_owner:
        return in_workspace
    if principal.agent_id is None:
        return false()  # an agent key without an agent would be a bug: match nothing
    return and_(in_workspace, captured.c.agent_id == principal.agent_id)


def _captured(row: Any) -> CapturedMessage:
    return CapturedMessage(
        captured_id=row.id,
        workspace_id=row.workspace_id,
        agent_id=row.agent_id,
        outbound_id=row.outbound_id,
        mail_from=row.mail_from,
        recipients=tuple(row.recipients),
        rfc_message_id=row.rfc_message_id,
        subject=row.subject,
        size=int(row.raw_size),
        created_at=row.created_at,
    )
