"""What every /v0 route shares: who is calling, which inbox and message a path names,
and AgentMail's paging and query conventions.

Ids on this face:

* An inbox id is the agent's address (``support@agents.example``); our agent id is
  accepted too. Starlette percent-decodes path segments, so ``a%40b.com`` works.
* A message id is the RFC 5322 Message-ID with its angle brackets, as AgentMail uses
  it (resolved by :meth:`AgentMailViews.resolve`). A Message-ID that cannot travel
  in one path segment (it holds ``/``, ``?``, ``#``, ``%``, a backslash or
  whitespace: the SDK pastes ids into URLs unescaped) is shown by its alias instead:
  our own message id (``msg_...``), which every route also accepts for any message.
* Thread, draft, webhook and attachment ids are ours.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Path, Query
from sqlalchemy import Connection, select

from mailgate.api.auth import PrincipalDep, RuntimeDep
from mailgate.domain.keys import Principal
from mailgate.errors import NotFound, ValidationFailed
from mailgate.services.agentmail import public_message_id as public_message_id
from mailgate.services.queries import MAX_LIMIT
from mailgate.store.schema import agent_addresses, agents

DEFAULT_LIMIT = 10
"""AgentMail's default page size (its SDK and toolkit ask for 10 when unset)."""


@dataclass(frozen=True, slots=True)
class InboxRef:
    """The agent a /v0 inbox id names, as the caller may see it."""

    agent_id: str
    workspace_id: str
    inbox_id: str  # the agent's primary address


def primary_address(conn: Connection, agent_id: str) -> str:
    """An agent's first address: its inbox id on this face."""
    address = conn.execute(
        select(agent_addresses.c.address)
        .where(agent_addresses.c.agent_id == agent_id)
        .order_by(agent_addresses.c.created_at, agent_addresses.c.address)
        .limit(1)
    ).scalar_one_or_none()
    return str(address or agent_id)


def find_inbox(conn: Connection, principal: Principal, inbox_id: str) -> InboxRef:
    """Raises:
    NotFound: no such inbox in the caller's workspace, or one an agent key may not see.
    """
    ref = inbox_id.strip()
    agent_id: str | None
    if "@" in ref:
        agent_id = conn.execute(
            select(agent_addresses.c.agent_id).where(
                agent_addresses.c.address == ref.lower(),
                agent_addresses.c.workspace_id == principal.workspace_id,
            )
        ).scalar_one_or_none()
    else:
        agent_id = conn.execute(
            select(agents.c.id).where(
                agents.c.id == ref, agents.c.workspace_id == principal.workspace_id
            )
        ).scalar_one_or_none()
    if agent_id is None or not principal.can_see_agent(agent_id):
        raise NotFound(f"no inbox {inbox_id}")
    return InboxRef(agent_id, principal.workspace_id, primary_address(conn, agent_id))


def list_param(raw: str | None, field: str) -> tuple[str, ...]:
    """A list query parameter (empty when absent). AgentMail's SDK sends lists as one
    JSON-encoded value (``labels=["unread","vip"]``); a bare string is taken as a
    one-item list, and a comma-free plain value too, so curl users are not punished.

    Raises:
        ValidationFailed: JSON that is not a list of strings.
    """
    if raw is None or raw == "":
        return ()
    text = raw.strip()
    if text.startswith("["):
        try:
            value: Any = json.loads(text)
        except ValueError:
            raise _invalid(field, "not valid JSON") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _invalid(field, "must be a JSON list of strings")
        return tuple(str(v) for v in value)
    return (text,)


def check_page_limit(limit: int) -> int:
    """Raises:
    ValidationFailed: ``limit`` outside 1..MAX_LIMIT.
    """
    if not 1 <= limit <= MAX_LIMIT:
        raise _invalid("limit", f"must be between 1 and {MAX_LIMIT}")
    return limit


def _invalid(field: str, message: str) -> ValidationFailed:
    return ValidationFailed(f"{field}: {message}", errors=[{"field": field, "message": message}])


def _inbox_dependency(
    runtime: RuntimeDep,
    principal: PrincipalDep,
    inbox_id: Annotated[str, Path(description="The inbox's email address (or agent id).")],
) -> InboxRef:
    with runtime.db.read() as conn:
        return find_inbox(conn, principal, inbox_id)


InboxDep = Annotated[InboxRef, Depends(_inbox_dependency)]
"""The inbox named by the ``{inbox_id}`` path segment, checked against the caller."""

LimitQuery = Annotated[int, Query(description="Items per page (1-100).")]
PageTokenQuery = Annotated[str | None, Query(description="`next_page_token` of the previous page.")]
