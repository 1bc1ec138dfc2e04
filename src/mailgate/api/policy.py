"""Routes for rules, known contacts and the workspace's policy settings.

Owner keys only: an agent key gets ``403 missing_scope`` (agents must not edit the
rules that screen their own mail), and every object is pinned to the caller's
workspace by :class:`~mailgate.services.rules_admin.RulesService`, so another
workspace's rule, contact, agent or message is ``404``. Each route parses, calls one
service method and maps the result.

A body that is not JSON at all is ``400 bad_request`` (naming ``body``) on these
routes, while JSON of the wrong shape stays ``422 validation_failed`` naming each
field: the first is a broken client, the second a fixable request.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from mailgate.api.auth import PrincipalDep, RuntimeDep
from mailgate.api.errors import PROBLEM_RESPONSES
from mailgate.api.policy_schemas import (
    ContactDeleted,
    ContactIn,
    ContactList,
    ContactOut,
    ContactPatch,
    Direction,
    ReorderIn,
    RuleDeleted,
    RuleIn,
    RuleList,
    RuleOut,
    RulePatch,
    RuleTestIn,
    RuleTestOut,
    Scope,
    WorkspaceSettingsOut,
    WorkspaceSettingsPatch,
)
from mailgate.errors import PayloadTooLarge

router = APIRouter(prefix="/v1", responses=PROBLEM_RESPONSES)


def _problem(description: str) -> dict[str, Any]:
    """An extra documented problem response (same body schema as every other)."""
    return {**PROBLEM_RESPONSES[422], "description": description}


_BAD_JSON: dict[int | str, dict[str, Any]] = {
    400: _problem("The body is not JSON (`bad_request`, `errors` names `body`)")
}
_CONFLICT: dict[int | str, dict[str, Any]] = {
    409: _problem("The owner already has this contact (`conflict`)")
}

AgentQuery = Annotated[
    str | None, Query(max_length=40, description="Only what applies to this agent.")
]
ScopeQuery = Annotated[
    Scope,
    Query(
        description="`agent`: agents' own; `workspace`: the workspace's; `all`: both "
        "(with `agent_id`: exactly what applies to that agent)."
    ),
]


# -- rules ------------------------------------------------------------------------------


@router.post("/rules", tags=["rules"], status_code=201, responses=_BAD_JSON)
def create_rule(runtime: RuntimeDep, principal: PrincipalDep, body: RuleIn) -> RuleOut:
    """Add a rule for an agent, or a workspace default (no `agent_id`).

    A rule with an invalid regex or an unknown field is `422` naming its path, e.g.
    `condition.any[1].value`.
    """
    principal.require_owner()
    data = body.model_dump(exclude={"agent_id"}, exclude_unset=True)
    rule = runtime.rules.create_rule(
        principal.workspace_id, body.agent_id, data, actor=principal.actor
    )
    return RuleOut.of(rule)


@router.get("/rules", tags=["rules"])
def list_rules(
    runtime: RuntimeDep,
    principal: PrincipalDep,
    agent_id: AgentQuery = None,
    scope: ScopeQuery = "all",
    direction: Direction | None = None,
) -> RuleList:
    """Rules in evaluation order: agents' own by position, then the workspace defaults."""
    principal.require_owner()
    found = runtime.rules.list_rules(
        principal.workspace_id, agent_id=agent_id, scope=scope, direction=direction
    )
    return RuleList(rules=[RuleOut.of(r) for r in found])


@router.post("/rules/reorder", tags=["rules"], responses=_BAD_JSON)
def reorder_rules(runtime: RuntimeDep, principal: PrincipalDep, body: ReorderIn) -> RuleList:
    """Put one owner's rules in a new order; `rule_ids` must name each of them once."""
    principal.require_owner()
    found = runtime.rules.reorder(
        principal.workspace_id, body.agent_id, body.rule_ids, actor=principal.actor
    )
    return RuleList(rules=[RuleOut.of(r) for r in found])


@router.post("/rules/test", tags=["rules"], responses=_BAD_JSON)
def test_rules(runtime: RuntimeDep, principal: PrincipalDep, body: RuleTestIn) -> RuleTestOut:
    """Dry run: which rule an agent's policy picks for a stored or pasted message, each
    condition's result, and the action. Nothing is stored or moved."""
    principal.require_owner()
    raw = None
    if body.raw is not None:
        raw = body.raw.encode("utf-8")
        if len(raw) > runtime.settings.max_message_size:
            raise PayloadTooLarge(
                f"the message is over {runtime.settings.max_message_size} bytes",
                limit=runtime.settings.max_message_size,
            )
    decision = runtime.rules.test_rule(
        principal.workspace_id,
        agent_id=body.agent_id,
        message_id=body.message_id,
        raw=raw,
        rule=body.rule,
        auth=body.auth.facts() if body.auth is not None else None,
    )
    return RuleTestOut.of_decision(decision)


@router.get("/rules/{rule_id}", tags=["rules"])
def get_rule(runtime: RuntimeDep, principal: PrincipalDep, rule_id: str) -> RuleOut:
    principal.require_owner()
    return RuleOut.of(runtime.rules.get_rule(principal.workspace_id, rule_id))


@router.patch("/rules/{rule_id}", tags=["rules"], responses=_BAD_JSON)
def update_rule(
    runtime: RuntimeDep, principal: PrincipalDep, rule_id: str, body: RulePatch
) -> RuleOut:
    """Change some fields; the merged rule is validated as a whole."""
    principal.require_owner()
    rule = runtime.rules.update_rule(
        principal.workspace_id, rule_id, body.changes(), actor=principal.actor
    )
    return RuleOut.of(rule)


@router.delete("/rules/{rule_id}", tags=["rules"])
def delete_rule(runtime: RuntimeDep, principal: PrincipalDep, rule_id: str) -> RuleDeleted:
    """Delete a rule; the owner's later rules move up one."""
    principal.require_owner()
    runtime.rules.delete_rule(principal.workspace_id, rule_id, actor=principal.actor)
    return RuleDeleted(rule_id=rule_id)


@router.post("/rules/{rule_id}/enable", tags=["rules"])
def enable_rule(runtime: RuntimeDep, principal: PrincipalDep, rule_id: str) -> RuleOut:
    principal.require_owner()
    rule = runtime.rules.update_rule(
        principal.workspace_id, rule_id, {"enabled": True}, actor=principal.actor
    )
    return RuleOut.of(rule)


@router.post("/rules/{rule_id}/disable", tags=["rules"])
def disable_rule(runtime: RuntimeDep, principal: PrincipalDep, rule_id: str) -> RuleOut:
    """Keep the rule but stop applying it."""
    principal.require_owner()
    rule = runtime.rules.update_rule(
        principal.workspace_id, rule_id, {"enabled": False}, actor=principal.actor
    )
    return RuleOut.of(rule)


# -- contacts ---------------------------------------------------------------------------


@router.post("/contacts", tags=["contacts"], status_code=201, responses={**_BAD_JSON, **_CONFLICT})
def create_contact(runtime: RuntimeDep, principal: PrincipalDep, body: ContactIn) -> ContactOut:
    """Add a known sender (an address, or every address at a domain) for an agent or
    the whole workspace (no `agent_id`)."""
    principal.require_owner()
    contact = runtime.rules.add_contact(
        principal.workspace_id,
        body.agent_id,
        address=body.address,
        domain=body.domain,
        name=body.name,
        auto_approve=body.auto_approve,
        actor=principal.actor,
    )
    return ContactOut.of(contact)


@router.get("/contacts", tags=["contacts"])
def list_contacts(
    runtime: RuntimeDep,
    principal: PrincipalDep,
    agent_id: AgentQuery = None,
    scope: ScopeQuery = "all",
) -> ContactList:
    """Known contacts: the workspace's first, then each agent's, by value."""
    principal.require_owner()
    found = runtime.rules.list_contacts(principal.workspace_id, agent_id=agent_id, scope=scope)
    return ContactList(contacts=[ContactOut.of(c) for c in found])


@router.get("/contacts/{contact_id}", tags=["contacts"])
def get_contact(runtime: RuntimeDep, principal: PrincipalDep, contact_id: str) -> ContactOut:
    principal.require_owner()
    return ContactOut.of(runtime.rules.get_contact(principal.workspace_id, contact_id))


@router.patch("/contacts/{contact_id}", tags=["contacts"], responses=_BAD_JSON)
def update_contact(
    runtime: RuntimeDep, principal: PrincipalDep, contact_id: str, body: ContactPatch
) -> ContactOut:
    """Rename a contact or change whether its authenticated mail skips the rules."""
    principal.require_owner()
    contact = runtime.rules.update_contact(
        principal.workspace_id,
        contact_id,
        name=body.name,
        auto_approve=body.auto_approve,
        actor=principal.actor,
    )
    return ContactOut.of(contact)


@router.delete("/contacts/{contact_id}", tags=["contacts"])
def delete_contact(runtime: RuntimeDep, principal: PrincipalDep, contact_id: str) -> ContactDeleted:
    principal.require_owner()
    runtime.rules.delete_contact(principal.workspace_id, contact_id, actor=principal.actor)
    return ContactDeleted(contact_id=contact_id)


# -- workspace settings -----------------------------------------------------------------


@router.get("/workspace/settings", tags=["workspace"])
def get_settings(runtime: RuntimeDep, principal: PrincipalDep) -> WorkspaceSettingsOut:
    principal.require_owner()
    return WorkspaceSettingsOut.of(runtime.rules.get_settings(principal.workspace_id))


@router.patch("/workspace/settings", tags=["workspace"], responses=_BAD_JSON)
def update_settings(
    runtime: RuntimeDep, principal: PrincipalDep, body: WorkspaceSettingsPatch
) -> WorkspaceSettingsOut:
    """`contacts_bypass`: whether an authenticated, auto-approved contact skips the
    rules (default true)."""
    principal.require_owner()
    settings = runtime.rules.update_settings(
        principal.workspace_id, contacts_bypass=body.contacts_bypass, actor=principal.actor
    )
    return WorkspaceSettingsOut.of(settings)
