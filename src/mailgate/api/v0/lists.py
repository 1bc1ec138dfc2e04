"""``/v0/lists`` and ``/v0/inboxes/{inbox_id}/lists``: AgentMail's allow/block lists.

The top level is the workspace's lists, the inbox level one agent's. Each list is a
view of a policy object we already have (contacts, an inbound trash rule, recipient
allow/deny entries): :mod:`mailgate.services.agentmail_lists` documents the mapping
and who may change what. ``direction`` is ``send``, ``receive`` or ``reply`` and
``type`` is ``allow`` or ``block``; anything else is ``400``, and ``reply/allow`` is
``501``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Self

from fastapi import APIRouter, Path, Response
from pydantic import BaseModel, ConfigDict, Field

from mailgate.api.auth import PrincipalDep, RuntimeDep
from mailgate.api.v0.common import (
    DEFAULT_LIMIT,
    InboxDep,
    InboxRef,
    LimitQuery,
    PageTokenQuery,
    check_page_limit,
)
from mailgate.domain.keys import Principal
from mailgate.runtime import Runtime
from mailgate.services.agentmail_lists import AgentMailLists, ListEntry

router = APIRouter(prefix="/v0")

DirectionPath = Annotated[str, Path(description="`send`, `receive` or `reply`.")]
TypePath = Annotated[str, Path(description="`allow` or `block`.")]
EntryPath = Annotated[str, Path(description="An email address or a domain.")]


class ListEntryOut(BaseModel):
    """AgentMail's ``ListEntry``."""

    entry: str
    organization_id: str = Field(description="The workspace id.")
    reason: str | None = None
    direction: str
    list_type: str
    entry_type: str = Field(description="`email` or `domain`.")
    created_at: datetime
    read_only: bool

    @classmethod
    def of(cls, entry: ListEntry) -> Self:
        return cls(
            entry=entry.entry,
            organization_id=entry.workspace_id,
            reason=entry.reason,
            direction=entry.direction,
            list_type=entry.list_type,
            entry_type=entry.entry_type,
            created_at=entry.created_at,
            read_only=entry.read_only,
        )


class ListEntriesOut(BaseModel):
    count: int = Field(description="Entries on this page.")
    limit: int
    next_page_token: str | None = None
    entries: list[ListEntryOut] = Field(description="Ordered by entry, ascending.")


class InboxListEntryOut(ListEntryOut):
    """AgentMail's ``PodListEntry``: what the inbox-level routes answer."""

    pod_id: str = Field(description="The workspace id.")
    inbox_id: str | None = Field(None, description="The inbox the entry belongs to.")

    @classmethod
    def of_inbox(cls, entry: ListEntry, inbox: InboxRef) -> Self:
        return cls(
            **ListEntryOut.of(entry).model_dump(),
            pod_id=inbox.workspace_id,
            inbox_id=inbox.inbox_id,
        )


class InboxListEntriesOut(BaseModel):
    count: int = Field(description="Entries on this page.")
    limit: int
    next_page_token: str | None = None
    entries: list[InboxListEntryOut] = Field(description="Ordered by entry, ascending.")


class CreateEntryIn(BaseModel):
    """AgentMail's ``CreateListEntryRequest``."""

    model_config = ConfigDict(extra="forbid")

    entry: str = Field(description="An email address or a domain.")
    reason: str | None = None


def _service(runtime: Runtime) -> AgentMailLists:
    return runtime.agentmail_lists


def _page(
    runtime: Runtime,
    principal: Principal,
    direction: str,
    type_: str,
    agent_id: str | None,
    limit: int,
    page_token: str | None,
) -> ListEntriesOut:
    entries, token = _service(runtime).list_entries(
        principal,
        direction,
        type_,
        agent_id=agent_id,
        limit=check_page_limit(limit),
        page_token=page_token,
    )
    return ListEntriesOut(
        count=len(entries),
        limit=limit,
        next_page_token=token,
        entries=[ListEntryOut.of(e) for e in entries],
    )


# -- workspace lists ------------------------------------------------------------------------


@router.get("/lists/{direction}/{type}", response_model=ListEntriesOut)
def list_entries(
    runtime: RuntimeDep,
    principal: PrincipalDep,
    direction: DirectionPath,
    type: TypePath,
    limit: LimitQuery = DEFAULT_LIMIT,
    page_token: PageTokenQuery = None,
) -> ListEntriesOut:
    """The workspace's entries on one list."""
    return _page(runtime, principal, direction, type, None, limit, page_token)


@router.post("/lists/{direction}/{type}", response_model=ListEntryOut)
def create_entry(
    runtime: RuntimeDep,
    principal: PrincipalDep,
    direction: DirectionPath,
    type: TypePath,
    body: CreateEntryIn,
) -> ListEntryOut:
    """Add a workspace entry (owner key); an entry already there is returned."""
    entry = _service(runtime).add_entry(
        principal, direction, type, body.entry, reason=body.reason, agent_id=None
    )
    return ListEntryOut.of(entry)


@router.get("/lists/{direction}/{type}/{entry}", response_model=ListEntryOut)
def get_entry(
    runtime: RuntimeDep,
    principal: PrincipalDep,
    direction: DirectionPath,
    type: TypePath,
    entry: EntryPath,
) -> ListEntryOut:
    return ListEntryOut.of(
        _service(runtime).get_entry(principal, direction, type, entry, agent_id=None)
    )


@router.delete("/lists/{direction}/{type}/{entry}", status_code=204, response_class=Response)
def delete_entry(
    runtime: RuntimeDep,
    principal: PrincipalDep,
    direction: DirectionPath,
    type: TypePath,
    entry: EntryPath,
) -> Response:
    """Remove a workspace entry (owner key)."""
    _service(runtime).remove_entry(principal, direction, type, entry, agent_id=None)
    return Response(status_code=204)


# -- inbox lists ----------------------------------------------------------------------------


@router.get("/inboxes/{inbox_id}/lists/{direction}/{type}", response_model=InboxListEntriesOut)
def list_inbox_entries(
    runtime: RuntimeDep,
    principal: PrincipalDep,
    inbox: InboxDep,
    direction: DirectionPath,
    type: TypePath,
    limit: LimitQuery = DEFAULT_LIMIT,
    page_token: PageTokenQuery = None,
) -> InboxListEntriesOut:
    """One inbox's own entries on one list."""
    page = _page(runtime, principal, direction, type, inbox.agent_id, limit, page_token)
    return InboxListEntriesOut(
        count=page.count,
        limit=page.limit,
        next_page_token=page.next_page_token,
        entries=[
            InboxListEntryOut(**e.model_dump(), pod_id=inbox.workspace_id, inbox_id=inbox.inbox_id)
            for e in page.entries
        ],
    )


@router.post("/inboxes/{inbox_id}/lists/{direction}/{type}", response_model=InboxListEntryOut)
def create_inbox_entry(
    runtime: RuntimeDep,
    principal: PrincipalDep,
    inbox: InboxDep,
    direction: DirectionPath,
    type: TypePath,
    body: CreateEntryIn,
) -> InboxListEntryOut:
    """Add an inbox entry; an agent key may add block entries to its own inbox."""
    entry = _service(runtime).add_entry(
        principal, direction, type, body.entry, reason=body.reason, agent_id=inbox.agent_id
    )
    return InboxListEntryOut.of_inbox(entry, inbox)


@router.get(
    "/inboxes/{inbox_id}/lists/{direction}/{type}/{entry}", response_model=InboxListEntryOut
)
def get_inbox_entry(
    runtime: RuntimeDep,
    principal: PrincipalDep,
    inbox: InboxDep,
    direction: DirectionPath,
    type: TypePath,
    entry: EntryPath,
) -> InboxListEntryOut:
    found = _service(runtime).get_entry(principal, direction, type, entry, agent_id=inbox.agent_id)
    return InboxListEntryOut.of_inbox(found, inbox)


@router.delete(
    "/inboxes/{inbox_id}/lists/{direction}/{type}/{entry}",
    status_code=204,
    response_class=Response,
)
def delete_inbox_entry(
    runtime: RuntimeDep,
    principal: PrincipalDep,
    inbox: InboxDep,
    direction: DirectionPath,
    type: TypePath,
    entry: EntryPath,
) -> Response:
    """Remove an inbox entry (owner key)."""
    _service(runtime).remove_entry(principal, direction, type, entry, agent_id=inbox.agent_id)
    return Response(status_code=204)
