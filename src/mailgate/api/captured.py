"""Routes for the capture outbox (``/v1/captured``): what the gateway would have sent.

With the ``capture`` transport (the embedded default) nothing leaves; every message
delivery would have sent is listed here with its envelope, and ``/raw`` serves the
exact bytes (DKIM signature included). Agent keys (``messages:read``) see their own
agent's mail, owner keys the workspace's; another tenant's id is ``404``.
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Response

from mailgate.api.auth import PrincipalDep, RuntimeDep
from mailgate.api.errors import PROBLEM_RESPONSES
from mailgate.api.schemas import _Model
from mailgate.api.v1 import AgentFilter, Cursor, Limit, content_disposition
from mailgate.services.queries import DEFAULT_LIMIT

router = APIRouter(prefix="/v1", responses=PROBLEM_RESPONSES, tags=["captured"])

_BINARY = {"schema": {"type": "string", "format": "binary"}}


class CapturedOut(_Model):
    captured_id: str
    agent_id: str | None
    outbound_id: str
    mail_from: str
    recipients: list[str]
    rfc_message_id: str
    subject: str
    size: int
    created_at: datetime


class CapturedList(_Model):
    captured: list[CapturedOut]
    next_cursor: str | None


@router.get("/captured")
def list_captured(
    runtime: RuntimeDep,
    principal: PrincipalDep,
    agent_id: AgentFilter = None,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> CapturedList:
    """Captured outbound mail, newest first."""
    page = runtime.captured.list(principal, agent_id=agent_id, limit=limit, cursor=cursor)
    return CapturedList(
        captured=[CapturedOut.of(c) for c in page.items], next_cursor=page.next_cursor
    )


@router.get("/captured/{captured_id}")
def get_captured(runtime: RuntimeDep, principal: PrincipalDep, captured_id: str) -> CapturedOut:
    """One captured message's envelope and metadata."""
    return CapturedOut.of(runtime.captured.get(principal, captured_id))


@router.get(
    "/captured/{captured_id}/raw",
    response_class=Response,
    responses={200: {"content": {"message/rfc822": _BINARY}, "description": "Raw MIME"}},
)
def get_captured_raw(runtime: RuntimeDep, principal: PrincipalDep, captured_id: str) -> Response:
    """The message byte for byte as it would have been sent."""
    raw = runtime.captured.get_raw(principal, captured_id)
    headers = {
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "private, no-store",
        "Content-Disposition": content_disposition(f"{captured_id}.eml"),
    }
    return Response(raw, media_type="message/rfc822", headers=headers)
