"""``/v0/webhooks`` and ``/v0/inboxes/{inbox_id}/webhooks``: AgentMail's push webhooks.

An owner key manages every webhook of its workspace (a workspace webhook may be
narrowed with ``inbox_ids``); an agent key manages only its own inbox's webhooks
(``events:read``), and another inbox's webhook is ``404`` to it. ``inbox_ids`` are
inbox ids (addresses) on the wire and agent ids in the store. Pods and custom
delivery headers have no counterpart here: a request using them is ``501``. Each
route parses, resolves inbox ids, calls one :class:`WebhookService` method and maps
the record to AgentMail's ``Webhook``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Self

from fastapi import APIRouter, Path, Query, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Connection

from mailgate.api.auth import PrincipalDep, RuntimeDep
from mailgate.api.v0.common import (
    DEFAULT_LIMIT,
    InboxDep,
    LimitQuery,
    PageTokenQuery,
    check_page_limit,
    find_inbox,
    primary_address,
)
from mailgate.domain.keys import Principal
from mailgate.runtime import Runtime
from mailgate.services.webhooks import WebhookRecord, WebhookService, refuse_unsupported

router = APIRouter(prefix="/v0")

_EXCLUDE_NONE: dict[str, Any] = {"response_model_exclude_none": True}
WebhookIdPath = Annotated[str, Path(description="The webhook's id (`whk_...`).")]


class WebhookOut(BaseModel):
    """AgentMail's ``Webhook``. ``pod_id`` is the workspace id."""

    webhook_id: str
    url: str
    event_types: list[str] | None = None
    inbox_ids: list[str] | None = None
    pod_id: str | None = None
    inbox_id: str | None = Field(None, description="Set on an inbox's own webhook.")
    secret: str = Field(description="`whsec_...`: verify deliveries with it (Svix).")
    enabled: bool
    updated_at: datetime
    created_at: datetime
    client_id: str | None = None

    @classmethod
    def of(cls, conn: Connection, record: WebhookRecord) -> Self:
        inbox_ids = None
        if record.inbox_agent_ids is not None:
            inbox_ids = [primary_address(conn, a) for a in record.inbox_agent_ids]
        return cls(
            webhook_id=record.id,
            url=record.url,
            event_types=list(record.event_types) if record.event_types is not None else None,
            inbox_ids=inbox_ids,
            pod_id=record.workspace_id,
            inbox_id=primary_address(conn, record.agent_id) if record.agent_id else None,
            secret=record.secret,
            enabled=record.enabled,
            updated_at=record.updated_at,
            created_at=record.created_at,
            client_id=record.client_id,
        )


class ListWebhooksOut(BaseModel):
    count: int = Field(description="Webhooks on this page.")
    limit: int
    next_page_token: str | None = None
    webhooks: list[WebhookOut] = Field(description="Newest first unless `ascending`.")


class CreateWebhookIn(BaseModel):
    """AgentMail's ``CreateWebhookRequest`` (``CreateInboxWebhookRequest`` on an inbox)."""

    model_config = ConfigDict(extra="forbid")

    url: str
    event_types: list[str]
    inbox_ids: list[str] | None = Field(None, description="Only these inboxes' events.")
    pod_ids: list[str] | None = Field(None, description="Not supported (501 when non-empty).")
    client_id: str | None = Field(None, description="The same client_id gives the same webhook.")
    headers: dict[str, str] | None = Field(None, description="Not supported (501 when non-empty).")


class UpdateWebhookIn(BaseModel):
    """AgentMail's ``UpdateWebhookRequest`` (``UpdateInboxWebhookRequest`` on an inbox)."""

    model_config = ConfigDict(extra="forbid")

    event_types: list[str] | None = Field(None, description="Replaces the list when non-empty.")
    enabled: bool | None = Field(
        None, description="Re-enabling does not deliver what happened while disabled."
    )
    add_inbox_ids: list[str] | None = None
    remove_inbox_ids: list[str] | None = None
    add_pod_ids: list[str] | None = Field(None, description="Not supported.")
    remove_pod_ids: list[str] | None = Field(None, description="Not supported.")


def _service(runtime: Runtime) -> WebhookService:
    return runtime.webhooks


def _agent_ids(runtime: Runtime, principal: Principal, inbox_ids: list[str] | None) -> list[str]:
    """Our agent ids for inbox ids the caller may see.

    Raises:
        NotFound: an inbox that does not exist or the caller may not see.
    """
    if not inbox_ids:
        return []
    with runtime.db.read() as conn:
        return [find_inbox(conn, principal, ref).agent_id for ref in inbox_ids]


def _out(runtime: Runtime, record: WebhookRecord) -> WebhookOut:
    with runtime.db.read() as conn:
        return WebhookOut.of(conn, record)


def _create(
    runtime: Runtime, principal: Principal, body: CreateWebhookIn, agent_id: str | None
) -> WebhookOut:
    refuse_unsupported(pod_ids=body.pod_ids, headers=body.headers)
    record, _ = _service(runtime).create(
        principal,
        url=body.url,
        event_types=body.event_types,
        inbox_agent_ids=_agent_ids(runtime, principal, body.inbox_ids) or None,
        agent_id=agent_id,
        client_id=body.client_id,
    )
    return _out(runtime, record)


def _list(
    runtime: Runtime,
    principal: Principal,
    agent_id: str | None,
    limit: int,
    page_token: str | None,
    ascending: bool,
) -> ListWebhooksOut:
    page = _service(runtime).list_webhooks(
        principal,
        agent_id=agent_id,
        limit=check_page_limit(limit),
        page_token=page_token,
        ascending=ascending,
    )
    with runtime.db.read() as conn:
        items = [WebhookOut.of(conn, r) for r in page.items]
    return ListWebhooksOut(
        count=len(items), limit=limit, next_page_token=page.next_page_token, webhooks=items
    )


def _update(
    runtime: Runtime,
    principal: Principal,
    webhook_id: str,
    body: UpdateWebhookIn,
    agent_id: str | None,
) -> WebhookOut:
    refuse_unsupported(add_pod_ids=body.add_pod_ids, remove_pod_ids=body.remove_pod_ids)
    record = _service(runtime).update(
        principal,
        webhook_id,
        agent_id=agent_id,
        event_types=body.event_types,
        enabled=body.enabled,
        add_inbox_agent_ids=_agent_ids(runtime, principal, body.add_inbox_ids),
        remove_inbox_agent_ids=_agent_ids(runtime, principal, body.remove_inbox_ids),
    )
    return _out(runtime, record)


AscendingQuery = Annotated[bool, Query(description="Oldest first.")]


# -- workspace (or, for an agent key, its inbox's) webhooks ------------------------------


@router.get("/webhooks", response_model=ListWebhooksOut, **_EXCLUDE_NONE)
def list_webhooks(
    runtime: RuntimeDep,
    principal: PrincipalDep,
    limit: LimitQuery = DEFAULT_LIMIT,
    page_token: PageTokenQuery = None,
    ascending: AscendingQuery = False,
) -> ListWebhooksOut:
    """Every webhook the caller manages, newest first."""
    return _list(runtime, principal, None, limit, page_token, ascending)


@router.post("/webhooks", response_model=WebhookOut, **_EXCLUDE_NONE)
def create_webhook(
    runtime: RuntimeDep, principal: PrincipalDep, body: CreateWebhookIn
) -> WebhookOut:
    """Create a webhook (an agent key's is its inbox's). A repeated ``client_id``
    returns the first webhook."""
    return _create(runtime, principal, body, None)


@router.get("/webhooks/{webhook_id}", response_model=WebhookOut, **_EXCLUDE_NONE)
def get_webhook(
    runtime: RuntimeDep, principal: PrincipalDep, webhook_id: WebhookIdPath
) -> WebhookOut:
    return _out(runtime, _service(runtime).get(principal, webhook_id))


@router.patch("/webhooks/{webhook_id}", response_model=WebhookOut, **_EXCLUDE_NONE)
def update_webhook(
    runtime: RuntimeDep,
    principal: PrincipalDep,
    webhook_id: WebhookIdPath,
    body: UpdateWebhookIn,
) -> WebhookOut:
    return _update(runtime, principal, webhook_id, body, None)


@router.delete("/webhooks/{webhook_id}", status_code=204, response_class=Response)
def delete_webhook(
    runtime: RuntimeDep, principal: PrincipalDep, webhook_id: WebhookIdPath
) -> Response:
    """Delete the webhook; events not yet delivered to it are dropped."""
    _service(runtime).delete(principal, webhook_id)
    return Response(status_code=204)


# -- an inbox's own webhooks ---------------------------------------------------------------


@router.get("/inboxes/{inbox_id}/webhooks", response_model=ListWebhooksOut, **_EXCLUDE_NONE)
def list_inbox_webhooks(
    runtime: RuntimeDep,
    principal: PrincipalDep,
    inbox: InboxDep,
    limit: LimitQuery = DEFAULT_LIMIT,
    page_token: PageTokenQuery = None,
    ascending: AscendingQuery = False,
) -> ListWebhooksOut:
    return _list(runtime, principal, inbox.agent_id, limit, page_token, ascending)


@router.post("/inboxes/{inbox_id}/webhooks", response_model=WebhookOut, **_EXCLUDE_NONE)
def create_inbox_webhook(
    runtime: RuntimeDep, principal: PrincipalDep, inbox: InboxDep, body: CreateWebhookIn
) -> WebhookOut:
    """A webhook fixed to this inbox (``inbox_ids`` and ``pod_ids`` are not accepted)."""
    refuse_unsupported(inbox_ids=body.inbox_ids)
    return _create(runtime, principal, body, inbox.agent_id)


@router.get("/inboxes/{inbox_id}/webhooks/{webhook_id}", response_model=WebhookOut, **_EXCLUDE_NONE)
def get_inbox_webhook(
    runtime: RuntimeDep, principal: PrincipalDep, inbox: InboxDep, webhook_id: WebhookIdPath
) -> WebhookOut:
    return _out(runtime, _service(runtime).get(principal, webhook_id, agent_id=inbox.agent_id))


@router.patch(
    "/inboxes/{inbox_id}/webhooks/{webhook_id}", response_model=WebhookOut, **_EXCLUDE_NONE
)
def update_inbox_webhook(
    runtime: RuntimeDep,
    principal: PrincipalDep,
    inbox: InboxDep,
    webhook_id: WebhookIdPath,
    body: UpdateWebhookIn,
) -> WebhookOut:
    """Only ``event_types`` and ``enabled`` change on an inbox's webhook."""
    return _update(runtime, principal, webhook_id, body, inbox.agent_id)


@router.delete(
    "/inboxes/{inbox_id}/webhooks/{webhook_id}", status_code=204, response_class=Response
)
def delete_inbox_webhook(
    runtime: RuntimeDep, principal: PrincipalDep, inbox: InboxDep, webhook_id: WebhookIdPath
) -> Response:
    _service(runtime).delete(principal, webhook_id, agent_id=inbox.agent_id)
    return Response(status_code=204)
