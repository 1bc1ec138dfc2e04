"""Appending to the feed. Always called inside the transaction of the change the event
describes, so an event exists if and only if its change committed."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from mailgate.ids import new_id
from mailgate.store.schema import events

MESSAGE_RECEIVED = "message.received"
"""Mail reached the agent (delivered by ingest, released from review, or restored
into the inbox for the first time). The only event that hands content to an agent."""
MESSAGE_HELD = "message.held"
"""A rule held inbound mail for review by a human (workspace-scoped: owners only)."""
MESSAGE_QUARANTINED = "message.quarantined"
"""A rule quarantined inbound mail (workspace-scoped: owners only)."""
MESSAGE_RELEASED = "message.released"
"""An owner released held or quarantined mail to the agent."""
MESSAGE_TRASHED = "message.trashed"
MESSAGE_RESTORED = "message.restored"

OUTBOUND_PENDING_APPROVAL = "outbound.pending_approval"
"""Policy held an agent's outbound mail for an owner (workspace-scoped: owners only)."""
OUTBOUND_APPROVED = "outbound.approved"
OUTBOUND_REJECTED = "outbound.rejected"
OUTBOUND_EXPIRED = "outbound.expired"
OUTBOUND_BLOCKED = "outbound.blocked"
"""Policy blocked (or quarantined) a request; nothing will be sent."""
OUTBOUND_SENT = "outbound.sent"
"""A transport accepted the message (relay 250, SendGrid 202, capture stored)."""
OUTBOUND_DELIVERED = "outbound.delivered"
"""The recipient's server reported delivery (provider event)."""
OUTBOUND_BOUNCED = "outbound.bounced"
"""Permanent failure: a 5xx from the relay, a DSN, a provider bounce or drop."""
OUTBOUND_COMPLAINED = "outbound.complained"
"""A recipient reported the message as spam (or unsubscribed)."""


def event_row(
    *,
    workspace_id: str,
    agent_id: str | None,
    type: str,
    payload: dict[str, Any],
    created_at: datetime,
    thread_id: str | None = None,
) -> dict[str, Any]:
    """The row of a new event, for callers that insert many at once."""
    return {
        "id": new_id("evt"),
        "workspace_id": workspace_id,
        "agent_id": agent_id,
        "type": type,
        "thread_id": thread_id,
        "payload": payload,
        "created_at": created_at,
    }


def append_event(
    conn: Connection,
    *,
    workspace_id: str,
    agent_id: str | None,
    type: str,
    payload: dict[str, Any],
    created_at: datetime,
    thread_id: str | None = None,
) -> str:
    """Insert one event; returns its public id. Deliveries are made lazily per consumer."""
    row = event_row(
        workspace_id=workspace_id,
        agent_id=agent_id,
        type=type,
        payload=payload,
        created_at=created_at,
        thread_id=thread_id,
    )
    conn.execute(_INSERT_EVENT, row)
    return str(row["id"])


_INSERT_EVENT = events.insert()
