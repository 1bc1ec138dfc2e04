"""Appending to the feed. Always called inside the transaction of the change the event
describes, so an event exists if and only if its change committed."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from mailgate.ids import new_id
from mailgate.store.schema import events

MESSAGE_RECEIVED = "message.received"


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
    event_id = new_id("evt")
    conn.execute(
        _INSERT_EVENT,
        {
            "id": event_id,
            "workspace_id": workspace_id,
            "agent_id": agent_id,
            "type": type,
            "thread_id": thread_id,
            "payload": payload,
            "created_at": created_at,
        },
    )
    return event_id


_INSERT_EVENT = events.insert()
