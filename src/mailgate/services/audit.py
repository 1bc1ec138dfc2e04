"""The append-only audit log: written in the same transaction as the change it records."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from mailgate.ids import new_id
from mailgate.store.schema import audit_log


def record(
    conn: Connection,
    *,
    workspace_id: str | None,
    actor: str,
    action: str,
    at: datetime,
    target_type: str | None = None,
    target_id: str | None = None,
    **detail: Any,
) -> None:
    conn.execute(
        audit_log.insert(),
        dict(
            id=new_id("aud"),
            workspace_id=workspace_id,
            actor=actor,
            action=action,
            target_type=target_type,
            target_id=target_id,
            detail=detail,
            created_at=at,
        ),
    )
