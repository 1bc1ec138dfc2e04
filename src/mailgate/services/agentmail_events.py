"""Our feed events as AgentMail event frames: what /v0 webhooks POST and the /v0
websocket sends.

AgentMail's frames (its SDK's ``events`` types) carry whole objects: a received
message comes with its ``Message`` and ``ThreadItem``, outbound outcomes with the ids
an agent needs to find the message (``inbox_id``, ``thread_id``, ``message_id``). Our
events carry ids and a summary, so a frame is built at push time from the current
rows. ``event_id`` is our event id: a receiver dedupes redeliveries by it.

=========================  ======================  ======================================
ours                       AgentMail               body
=========================  ======================  ======================================
message.received           message.received        ``message`` (Message), ``thread``
outbound.sent              message.sent            ``send``: ids, timestamp, recipients
outbound.delivered         message.delivered       ``delivery``: same shape
outbound.bounced           message.bounced         ``bounce``: + type (Permanent/Transient),
                                                   sub_type (our reason), recipients
                                                   ``[{address, status}]``
outbound.complained        message.complained      ``complaint``: + type (complained /
                                                   unsubscribed), sub_type (source)
outbound.blocked           message.rejected        ``reject``: + reason (policy reasons)
outbound.rejected          message.rejected        ``reject``: reason "rejected by owner"
outbound.expired           message.rejected        ``reject``: reason "approval expired"
=========================  ======================  ======================================

Everything else (held, quarantined, released, trashed, restored, pending approval,
approved) has no AgentMail counterpart and is not pushed on /v0 surfaces; it stays
on the native feed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import Connection, select

from mailgate.domain.keys import Principal
from mailgate.errors import Forbidden, NotFound
from mailgate.services import events as ev
from mailgate.services.agentmail import iso, public_message_id
from mailgate.store.schema import outbound

__all__ = [
    "AGENTMAIL_TYPES",
    "EventLike",
    "MessageViews",
    "StoredEvent",
    "agentmail_type",
    "event_frame",
    "system_principal",
]

AGENTMAIL_TYPES: Mapping[str, str] = {
    ev.MESSAGE_RECEIVED: "message.received",
    ev.OUTBOUND_SENT: "message.sent",
    ev.OUTBOUND_DELIVERED: "message.delivered",
    ev.OUTBOUND_BOUNCED: "message.bounced",
    ev.OUTBOUND_COMPLAINED: "message.complained",
    ev.OUTBOUND_BLOCKED: "message.rejected",
    ev.OUTBOUND_REJECTED: "message.rejected",
    ev.OUTBOUND_EXPIRED: "message.rejected",
}
"""Our event type -> AgentMail's ``event_type``; a type not here is not pushed."""

_BODY_KEY: Mapping[str, str] = {
    "message.sent": "send",
    "message.delivered": "delivery",
    "message.bounced": "bounce",
    "message.complained": "complaint",
    "message.rejected": "reject",
}


class EventLike(Protocol):
    """What a frame is built from: a leased feed event or a stored event row."""

    @property
    def event_id(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def agent_id(self) -> str | None: ...
    @property
    def thread_id(self) -> str | None: ...
    @property
    def payload(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An ``events`` row read directly (the websocket tails the table)."""

    seq: int
    event_id: str
    workspace_id: str
    type: str
    created_at: datetime
    agent_id: str | None
    thread_id: str | None
    payload: dict[str, Any]


class MessageViews(Protocol):
    """The /v0 read models a frame embeds (``mailgate.services.agentmail``)."""

    def message(self, conn: Connection, principal: Principal, message_id: str) -> dict[str, Any]:
        """Raises:
        NotFound: no such message visible to ``principal``.
        """
        ...

    def thread_item(self, conn: Connection, principal: Principal, thread_id: str) -> dict[str, Any]:
        """Raises:
        NotFound: no such thread visible to ``principal``.
        """
        ...


def system_principal(workspace_id: str) -> Principal:
    """Who the push side reads as for a workspace-wide surface: an owner of it (the
    event was already filtered to the surface's scope)."""
    return Principal(workspace_id=workspace_id, key_id="system:push", kind="owner")


def agentmail_type(event_type: str) -> str | None:
    """AgentMail's name for one of our event types, None when it has none."""
    return AGENTMAIL_TYPES.get(event_type)


def event_frame(
    conn: Connection,
    views: MessageViews,
    principal_or_workspace: Principal | str,
    event: EventLike,
) -> dict[str, Any] | None:
    """The AgentMail frame for ``event``, or None when it is not pushed on /v0 (a type
    AgentMail has no name for, or a message that is gone by now: retention, or an
    agent key that can no longer see it).

    ``principal_or_workspace``: the reader (an agent principal sees only its own
    messages), or a workspace id to read as its owner.
    """
    kind = agentmail_type(event.type)
    if kind is None:
        return None
    principal = (
        system_principal(principal_or_workspace)
        if isinstance(principal_or_workspace, str)
        else principal_or_workspace
    )
    frame: dict[str, Any] = {"type": "event", "event_type": kind, "event_id": event.event_id}
    if kind == "message.received":
        message_id = event.payload.get("message_id")
        thread_id = event.payload.get("thread_id") or event.thread_id
        if not message_id or not thread_id:
            return None
        try:
            frame["message"] = views.message(conn, principal, str(message_id))
            frame["thread"] = views.thread_item(conn, principal, str(thread_id))
        except (NotFound, Forbidden):  # gone, or no longer readable by this key
            return None
        return frame
    body = _outbound_body(conn, event)
    if body is None or not principal.can_see_agent(str(event.agent_id)):
        return None
    payload = event.payload
    if kind == "message.bounced":
        status = str(payload.get("status") or "bounced")
        body["type"] = "Permanent" if payload.get("permanent", True) else "Transient"
        body["sub_type"] = str(payload.get("reason") or "General")
        body["recipients"] = [{"address": a, "status": status} for a in _recipients(payload)]
    elif kind == "message.complained":
        body["type"] = str(payload.get("status") or "complained")
        body["sub_type"] = str(payload.get("source") or "")
        body["recipients"] = _recipients(payload)
    elif kind == "message.rejected":
        body["reason"] = _reject_reason(event.type, payload)
    else:  # sent, delivered
        body["recipients"] = _recipients(payload)
    frame[_BODY_KEY[kind]] = body
    return frame


def _outbound_body(conn: Connection, event: EventLike) -> dict[str, Any] | None:
    """The ids every outbound frame starts with, from the outbound row (bounce and
    approval events name only the request)."""
    # Imported here: mailgate.api.v0 imports the routes, which import the services
    # that import this module, so a module-level import would be a cycle.
    from mailgate.api.v0.common import primary_address

    outbound_id = event.payload.get("outbound_id")
    if not outbound_id or event.agent_id is None:
        return None
    row = conn.execute(
        select(
            outbound.c.id,
            outbound.c.agent_id,
            outbound.c.message_id,
            outbound.c.rfc_message_id,
            outbound.c.thread_id,
        ).where(outbound.c.id == str(outbound_id))
    ).first()
    if row is None or row.agent_id != event.agent_id:
        return None
    return {
        "inbox_id": primary_address(conn, row.agent_id),
        "thread_id": row.thread_id or event.thread_id or "",
        "message_id": public_message_id(row.rfc_message_id, row.message_id or row.id),
        "timestamp": iso(event.created_at),
    }


def _recipients(payload: Mapping[str, Any]) -> list[str]:
    listed = payload.get("recipients")
    if isinstance(listed, list):
        return [str(r) for r in listed]
    one = payload.get("recipient")
    return [str(one)] if one else []


def _reject_reason(event_type: str, payload: Mapping[str, Any]) -> str:
    if event_type == ev.OUTBOUND_EXPIRED:
        return "approval expired"
    if event_type == ev.OUTBOUND_REJECTED:
        comment = str(payload.get("comment") or "").strip()
        return f"rejected by owner: {comment}" if comment else "rejected by owner"
    reasons = payload.get("reasons") or payload.get("codes") or []
    return "; ".join(str(r) for r in reasons) or "blocked by policy"
