"""Routes for agents' outbound tiers and the recipient allow/deny lists.

Owners read and change both in their workspace; an agent key may read its own tier
and the list entries that apply to it (so an agent can tell in advance what it may
send), and gets ``403 missing_scope`` on any change. Another workspace's agent or
entry is ``404``. Each route parses, calls one
:class:`~mailgate.services.outbound_admin.OutboundAdmin` method and maps the result.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, Self

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from mailgate.api.auth import PrincipalDep, RuntimeDep
from mailgate.api.errors import PROBLEM_RESPONSES
from mailgate.domain.tiers import TIERS, Tier
from mailgate.services.outbound_admin import Entry, ListName, TierInfo

router = APIRouter(prefix="/v1", responses=PROBLEM_RESPONSES)

_TIER_DOC = (
    "From narrowest to widest: `reply_only` (replies in threads with inbound mail), "
    "`known_contacts` (also new mail to known contacts), `allowlisted_domains` (also to "
    "allow-listed addresses and domains), `open` (anyone not suppressed or denied)."
)
_CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {
        **PROBLEM_RESPONSES[422],
        "description": "The value is already on that list for that scope (`conflict`)",
    }
}


class _Request(BaseModel):
    # A misspelt field must fail loudly, and a number is not a string.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class TierOut(BaseModel):
    """An agent's outbound tier."""

    agent_id: str
    name: str
    tier: Tier = Field(description=_TIER_DOC)
    tiers: list[Tier] = Field(description="Every tier, narrowest first.")

    @classmethod
    def of(cls, info: TierInfo) -> Self:
        return cls.model_validate(
            {"agent_id": info.agent_id, "name": info.name, "tier": info.tier, "tiers": TIERS}
        )


class TierIn(_Request):
    tier: Tier = Field(description=_TIER_DOC)
    reason: Annotated[str, StringConstraints(max_length=1000)] = Field(
        "", description="Why, for the audit log."
    )


class EntryOut(BaseModel):
    """One recipient list entry."""

    entry_id: str
    agent_id: str | None = Field(description="Null: it applies to every agent.")
    scope: Literal["agent", "workspace"]
    list: ListName = Field(
        description="`allow`: admitted under tier `allowlisted_domains`; `deny`: blocked."
    )
    kind: Literal["address", "domain"]
    value: str = Field(description="Lower-cased; a domain covers exactly that domain.")
    reason: str | None = Field(None, description="Why it is listed.")
    created_at: datetime

    @classmethod
    def of(cls, entry: Entry) -> Self:
        return cls.model_validate(
            {
                "entry_id": entry.entry_id,
                "agent_id": entry.agent_id,
                "scope": entry.scope,
                "list": entry.list,
                "kind": entry.kind,
                "value": entry.value,
                "reason": entry.reason,
                "created_at": entry.created_at,
            }
        )


class EntryList(BaseModel):
    entries: list[EntryOut] = Field(
        description="Workspace-wide entries first, then each agent's, by list and value."
    )


class EntryIn(_Request):
    """A new entry: an agent's (``agent_id``) or the whole workspace's (no ``agent_id``)."""

    list: ListName
    value: Annotated[str, StringConstraints(min_length=1, max_length=320)] = Field(
        description="An address (`bob@example.com`) or a domain (`example.com`)."
    )
    agent_id: Annotated[str, StringConstraints(min_length=1, max_length=40)] | None = None
    reason: Annotated[str, StringConstraints(max_length=500)] | None = Field(
        None, description="Why it is listed; kept on the entry."
    )


AgentQuery = Annotated[
    str | None, Query(max_length=40, description="Only what applies to this agent.")
]


# -- tiers --------------------------------------------------------------------------------


@router.get("/agents/{agent_id}/tier", tags=["outbound policy"])
def get_tier(runtime: RuntimeDep, principal: PrincipalDep, agent_id: str) -> TierOut:
    """An agent's tier: for owners, or the agent's own key."""
    return TierOut.of(runtime.outbound_admin.get_tier(principal, agent_id))


@router.put("/agents/{agent_id}/tier", tags=["outbound policy"])
def set_tier(runtime: RuntimeDep, principal: PrincipalDep, agent_id: str, body: TierIn) -> TierOut:
    """Raise or lower an agent's tier (owners). Applies to the agent's next request;
    audited as `agent.tier_changed` with `from`, `to` and `reason`."""
    info = runtime.outbound_admin.set_tier(principal, agent_id, body.tier, reason=body.reason)
    return TierOut.of(info)


# -- recipient lists ----------------------------------------------------------------------


@router.get("/recipient-lists", tags=["outbound policy"])
def list_entries(
    runtime: RuntimeDep,
    principal: PrincipalDep,
    list: ListName | None = None,
    agent_id: AgentQuery = None,
) -> EntryList:
    """Allow and deny entries. An agent key sees those that apply to it."""
    found = runtime.outbound_admin.list_entries(principal, list=list, agent_id=agent_id)
    return EntryList(entries=[EntryOut.of(e) for e in found])


@router.post("/recipient-lists", tags=["outbound policy"], status_code=201, responses=_CONFLICT)
def add_entry(runtime: RuntimeDep, principal: PrincipalDep, body: EntryIn) -> EntryOut:
    """Allow- or deny-list an address or a domain for an agent, or for the workspace
    (no `agent_id`). A deny entry blocks whatever the tier; an allow entry admits
    recipients under tier `allowlisted_domains`."""
    entry = runtime.outbound_admin.add_entry(
        principal, list=body.list, value=body.value, agent_id=body.agent_id, reason=body.reason
    )
    return EntryOut.of(entry)


@router.delete("/recipient-lists/{entry_id}", tags=["outbound policy"], status_code=204)
def remove_entry(runtime: RuntimeDep, principal: PrincipalDep, entry_id: str) -> Response:
    runtime.outbound_admin.remove_entry(principal, entry_id)
    return Response(status_code=204)
