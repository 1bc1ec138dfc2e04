"""Routes for the review inbox and the trash (``/v1/review``, message trash/restore).

Held mail (``review``, ``quarantine``) is for owner keys: they list it, release it to
its agent or trash it. Any key with ``messages:write`` trashes and restores what it can
see: owners anything in their workspace, agents their own delivered mail. A move that
does not apply to the message's folder, or that lost a race with another move, is
``409 invalid_folder_transition``. Like every route, these map one service call.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from mailgate.api.auth import PrincipalDep, RuntimeDep
from mailgate.api.errors import PROBLEM_JSON, PROBLEM_RESPONSES, Problem
from mailgate.api.schemas import FolderChangeOut, HeldFolder, MessageList, MessageSummaryOut
from mailgate.api.v1 import AgentFilter, Cursor, Limit
from mailgate.services.queries import DEFAULT_LIMIT

router = APIRouter(prefix="/v1", responses=PROBLEM_RESPONSES)

_CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {
        "model": Problem,
        "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        "description": "The message is not in a folder this move applies to, or another "
        "move won the race (`invalid_folder_transition`)",
    }
}


# -- review inbox -----------------------------------------------------------------------


@router.get("/review", tags=["review"])
def list_held(
    runtime: RuntimeDep,
    principal: PrincipalDep,
    folder: HeldFolder | None = None,
    agent_id: AgentFilter = None,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> MessageList:
    """Mail rules held for a human, newest first (owner keys): ``review`` and
    ``quarantine``, or the one named by ``folder``. Each entry has the rule
    ``decision`` that held it."""
    page = runtime.queries.list_held(
        principal, folder=folder, agent_id=agent_id, limit=limit, cursor=cursor
    )
    return MessageList(
        messages=[MessageSummaryOut.of(m) for m in page.items], next_cursor=page.next_cursor
    )


@router.post("/review/{message_id}/release", tags=["review"], responses=_CONFLICT)
def release_held(runtime: RuntimeDep, principal: PrincipalDep, message_id: str) -> FolderChangeOut:
    """Deliver held mail to its agent: it moves to the inbox and the agent gets
    ``message.received`` (owner keys)."""
    return FolderChangeOut.of_change(runtime.mailbox.release(principal, message_id))


@router.post("/review/{message_id}/trash", tags=["review"], responses=_CONFLICT)
def trash_held(runtime: RuntimeDep, principal: PrincipalDep, message_id: str) -> FolderChangeOut:
    """Reject held mail: it moves to the trash, never having reached the agent
    (owner keys; restore puts it back in review)."""
    return FolderChangeOut.of_change(runtime.mailbox.trash_held(principal, message_id))


# -- trash ------------------------------------------------------------------------------


@router.post("/messages/{message_id}/trash", tags=["trash"], responses=_CONFLICT)
def trash_message(runtime: RuntimeDep, principal: PrincipalDep, message_id: str) -> FolderChangeOut:
    """Move a message to the trash (soft, reversible until retention purges it)."""
    return FolderChangeOut.of_change(runtime.mailbox.trash(principal, message_id))


@router.post("/messages/{message_id}/restore", tags=["trash"], responses=_CONFLICT)
def restore_message(
    runtime: RuntimeDep, principal: PrincipalDep, message_id: str
) -> FolderChangeOut:
    """Put a trashed message back in the folder it was trashed from."""
    return FolderChangeOut.of_change(runtime.mailbox.restore(principal, message_id))


@router.get("/trash", tags=["trash"])
def list_trash(
    runtime: RuntimeDep,
    principal: PrincipalDep,
    agent_id: AgentFilter = None,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> MessageList:
    """Trashed mail, newest first: the workspace's for owner keys, the agent's own
    delivered mail for agent keys."""
    page = runtime.queries.list_trash(principal, agent_id=agent_id, limit=limit, cursor=cursor)
    return MessageList(
        messages=[MessageSummaryOut.of(m) for m in page.items], next_cursor=page.next_cursor
    )
