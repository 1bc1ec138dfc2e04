"""``/v0/inboxes``: AgentMail's inboxes, which here are agents.

``inbox_id`` is the agent's address, ``pod_id`` its workspace. An owner key sees and
manages every inbox of its workspace; an agent key sees only its own inbox, may
update its display name and metadata, and gets ``403`` for create and delete.
Another workspace's inbox is ``404``, like one that does not exist. Each route parses,
calls one :class:`~mailgate.services.inboxes.InboxService` method and maps the result.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Self

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from mailgate.api.auth import PrincipalDep, RuntimeDep
from mailgate.api.v0.common import (
    DEFAULT_LIMIT,
    InboxDep,
    LimitQuery,
    PageTokenQuery,
    check_page_limit,
)
from mailgate.runtime import Runtime
from mailgate.services.inboxes import Inbox, InboxService

router = APIRouter(prefix="/v0")

_Value = StrictStr | StrictBool | StrictInt | StrictFloat


class InboxOut(BaseModel):
    """AgentMail's ``Inbox``. ``status`` is omitted: every inbox here is active."""

    pod_id: str = Field(description="The workspace id.")
    inbox_id: str = Field(description="The inbox's address.")
    email: str
    display_name: str | None = None
    client_id: str | None = None
    metadata: dict[str, Any] | None = None
    updated_at: datetime
    created_at: datetime

    @classmethod
    def of(cls, inbox: Inbox) -> Self:
        return cls(
            pod_id=inbox.workspace_id,
            inbox_id=inbox.inbox_id,
            email=inbox.inbox_id,
            display_name=inbox.display_name,
            client_id=inbox.client_id,
            metadata=inbox.metadata,
            updated_at=inbox.updated_at,
            created_at=inbox.created_at,
        )


class ListInboxesOut(BaseModel):
    count: int = Field(description="Inboxes on this page.")
    limit: int
    next_page_token: str | None = None
    inboxes: list[InboxOut]


class CreateInboxIn(BaseModel):
    """AgentMail's ``CreateInboxRequest``."""

    model_config = ConfigDict(extra="forbid")

    username: str | None = Field(None, description="Local part; random when omitted.")
    domain: str | None = Field(None, description="Only the gateway's agent domain.")
    display_name: str | None = None
    client_id: str | None = Field(None, description="The same client_id gives the same inbox.")
    status: str | None = Field(None, description="Only `active` (pausing is not supported).")
    metadata: dict[str, _Value] | None = None


class UpdateInboxIn(BaseModel):
    """AgentMail's ``UpdateInboxRequest`` (absent and null differ for ``metadata``)."""

    model_config = ConfigDict(extra="forbid")

    display_name: str | None = None
    status: str | None = None
    metadata: dict[str, _Value | None] | None = Field(
        None,
        description="Merged: keys set, a null value removes its key; null clears all.",
    )


def _service(runtime: Runtime) -> InboxService:
    return runtime.inboxes


_EXCLUDE_NONE: dict[str, Any] = {"response_model_exclude_none": True}


@router.post("/inboxes", response_model=InboxOut, **_EXCLUDE_NONE)
def create_inbox(
    runtime: RuntimeDep, principal: PrincipalDep, body: CreateInboxIn | None = None
) -> InboxOut:
    """Create an inbox (owner key). A repeated ``client_id`` returns the first inbox."""
    body = body or CreateInboxIn.model_validate({})
    inbox, _ = _service(runtime).create(
        principal,
        username=body.username,
        domain=body.domain,
        display_name=body.display_name,
        client_id=body.client_id,
        metadata=body.metadata,
        status=body.status,
    )
    return InboxOut.of(inbox)


@router.get("/inboxes", response_model=ListInboxesOut, **_EXCLUDE_NONE)
def list_inboxes(
    runtime: RuntimeDep,
    principal: PrincipalDep,
    limit: LimitQuery = DEFAULT_LIMIT,
    page_token: PageTokenQuery = None,
    ascending: Annotated[bool, Query(description="Oldest first.")] = False,
) -> ListInboxesOut:
    """The caller's inboxes, newest first."""
    page, token = _service(runtime).list(
        principal, limit=check_page_limit(limit), page_token=page_token, ascending=ascending
    )
    return ListInboxesOut(
        count=len(page),
        limit=limit,
        next_page_token=token,
        inboxes=[InboxOut.of(i) for i in page],
    )


@router.get("/inboxes/{inbox_id}", response_model=InboxOut, **_EXCLUDE_NONE)
def get_inbox(runtime: RuntimeDep, principal: PrincipalDep, inbox: InboxDep) -> InboxOut:
    return InboxOut.of(_service(runtime).get(principal, inbox.agent_id))


@router.patch("/inboxes/{inbox_id}", response_model=InboxOut, **_EXCLUDE_NONE)
def update_inbox(
    runtime: RuntimeDep, principal: PrincipalDep, inbox: InboxDep, body: UpdateInboxIn
) -> InboxOut:
    """Change the display name or metadata (merged, as AgentMail does)."""
    changes = body.model_dump(include=body.model_fields_set)
    return InboxOut.of(_service(runtime).update(principal, inbox.agent_id, changes))


@router.delete("/inboxes/{inbox_id}", status_code=204, response_class=Response)
def delete_inbox(runtime: RuntimeDep, principal: PrincipalDep, inbox: InboxDep) -> Response:
    """Delete the inbox with its mail, keys and lists (owner key)."""
    _service(runtime).delete(principal, inbox.agent_id)
    return Response(status_code=204)
