"""Agents' outbound tiers and the recipient allow/deny lists over HTTP, on SQLite and
PostgreSQL: who may read and change them, isolation between workspaces, validation,
the audit trail, and that the outbound gateway applies a change to the next send."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import select

from mailgate.domain.keys import Principal
from mailgate.errors import ValidationFailed
from mailgate.runtime import Runtime
from mailgate.services.mailbox import Operator
from mailgate.store.schema import audit_log
from tests.conftest import AgentHandle, make_agent
from tests.integration.api_support import api_client, auth, problem_code
from tests.integration.outbound_support import send

pytestmark = pytest.mark.anyio


def audit_rows(runtime: Runtime, action: str) -> list[Any]:
    with runtime.db.read() as conn:
        return list(
            conn.execute(
                select(audit_log).where(audit_log.c.action == action).order_by(audit_log.c.seq)
            ).all()
        )


def error_fields(response: httpx.Response) -> set[str]:
    return {e["field"] for e in response.json()["errors"]}


async def put_tier(
    client: httpx.AsyncClient, key: str, agent_id: str, tier: str, reason: str = ""
) -> httpx.Response:
    return await client.put(
        f"/v1/agents/{agent_id}/tier", json={"tier": tier, "reason": reason}, headers=auth(key)
    )


async def add_entry(client: httpx.AsyncClient, key: str, **body: Any) -> httpx.Response:
    return await client.post("/v1/recipient-lists", json=body, headers=auth(key))


# -- tiers --------------------------------------------------------------------------------


async def test_an_owner_reads_and_sets_a_tier_and_the_change_is_audited_once(
    runtime: Runtime, agent: AgentHandle
) -> None:
    url = f"/v1/agents/{agent.agent_id}/tier"
    async with api_client(runtime) as client:
        before = await client.get(url, headers=auth(agent.owner_key))
        changed = await put_tier(client, agent.owner_key, agent.agent_id, "open", "pilot done")
        again = await put_tier(client, agent.owner_key, agent.agent_id, "open", "retry")
        after = await client.get(url, headers=auth(agent.owner_key))

    assert before.status_code == 200, before.text
    assert before.json() == {
        "agent_id": agent.agent_id,
        "name": "support bot",
        "tier": "reply_only",
        "tiers": ["reply_only", "known_contacts", "allowlisted_domains", "open"],
    }
    assert changed.status_code == 200, changed.text
    assert changed.json()["tier"] == "open"
    assert again.status_code == 200 and again.json()["tier"] == "open"
    assert after.json()["tier"] == "open"
    [row] = audit_rows(runtime, "agent.tier_changed")  # the no-op was not audited
    assert row.workspace_id == agent.workspace_id
    assert row.actor.startswith("owner:")
    assert (row.target_type, row.target_id) == ("agent", agent.agent_id)
    assert row.detail == {"from": "reply_only", "to": "open", "reason": "pilot done"}


async def test_an_agent_reads_its_own_tier_but_may_not_change_it(
    runtime: Runtime, agent: AgentHandle
) -> None:
    other = runtime.tenancy.create_agent(agent.workspace_id, "other bot")
    async with api_client(runtime) as client:
        own = await client.get(f"/v1/agents/{agent.agent_id}/tier", headers=auth(agent.agent_key))
        sibling = await client.get(
            f"/v1/agents/{other.agent_id}/tier", headers=auth(agent.agent_key)
        )
        raise_own = await put_tier(client, agent.agent_key, agent.agent_id, "open")
        raise_sibling = await put_tier(client, agent.agent_key, other.agent_id, "open")

    assert own.status_code == 200 and own.json()["tier"] == "reply_only"
    assert sibling.status_code == 404 and problem_code(sibling) == "not_found"
    assert raise_own.status_code == 403 and problem_code(raise_own) == "missing_scope"
    assert raise_sibling.status_code == 403 and problem_code(raise_sibling) == "missing_scope"
    assert runtime.outbound_admin.get_tier(_owner(agent), agent.agent_id).tier == "reply_only"
    assert audit_rows(runtime, "agent.tier_changed") == []


async def test_another_workspaces_owner_gets_404_for_an_agents_tier(
    runtime: Runtime, agent: AgentHandle
) -> None:
    stranger = make_agent(runtime, "intruder", workspace="evil corp")
    async with api_client(runtime) as client:
        read = await client.get(
            f"/v1/agents/{agent.agent_id}/tier", headers=auth(stranger.owner_key)
        )
        write = await put_tier(client, stranger.owner_key, agent.agent_id, "open")
        missing = await put_tier(client, agent.owner_key, "agt_nope", "open")

    assert read.status_code == 404 and problem_code(read) == "not_found"
    assert write.status_code == 404 and problem_code(write) == "not_found"
    assert missing.status_code == 404 and problem_code(missing) == "not_found"
    assert runtime.outbound_admin.get_tier(_owner(agent), agent.agent_id).tier == "reply_only"


@pytest.mark.parametrize("tier", ["wide_open", "", "OPEN"])
async def test_an_unknown_tier_is_422_naming_tier(
    runtime: Runtime, agent: AgentHandle, tier: str
) -> None:
    async with api_client(runtime) as client:
        response = await put_tier(client, agent.owner_key, agent.agent_id, tier)

    assert response.status_code == 422 and problem_code(response) == "validation_failed"
    assert error_fields(response) == {"tier"}


def test_the_service_refuses_an_unknown_tier_by_field(runtime: Runtime, agent: AgentHandle) -> None:
    with pytest.raises(ValidationFailed) as caught:
        runtime.outbound_admin.set_tier(Operator(), agent.agent_id, "everyone")

    assert caught.value.code == "validation_failed"
    assert [e["field"] for e in caught.value.extra["errors"]] == ["tier"]


async def test_a_tier_change_applies_to_the_agents_next_send(
    runtime: Runtime, agent: AgentHandle
) -> None:
    mail = {"to": ["carol@example.com"], "subject": "hi", "text": "hello"}
    async with api_client(runtime) as client:
        blocked = await send(client, agent.agent_key, mail)
        await put_tier(client, agent.owner_key, agent.agent_id, "open")
        allowed = await send(client, agent.agent_key, mail)

    assert blocked.status_code == 201, blocked.text
    assert blocked.json()["decision"]["action"] == "block"
    assert "tier" in blocked.json()["decision"]["codes"]
    assert allowed.json()["decision"]["action"] == "allow", allowed.text


# -- recipient lists ----------------------------------------------------------------------


async def test_an_owner_adds_lists_and_removes_entries(
    runtime: Runtime, agent: AgentHandle
) -> None:
    key = agent.owner_key
    async with api_client(runtime) as client:
        deny = await add_entry(client, key, list="deny", value=" Spam.Example ")
        allow = await add_entry(
            client, key, list="allow", value="Bob@Partner.Example", agent_id=agent.agent_id,
            reason=" our partner's buyer ",
        )  # fmt: skip
        at_domain = await add_entry(client, key, list="allow", value="@partner.example")
        everything = await client.get("/v1/recipient-lists", headers=auth(key))
        allows = await client.get("/v1/recipient-lists?list=allow", headers=auth(key))
        removed = await client.delete(
            f"/v1/recipient-lists/{deny.json()['entry_id']}", headers=auth(key)
        )
        again = await client.delete(
            f"/v1/recipient-lists/{deny.json()['entry_id']}", headers=auth(key)
        )
        left = await client.get("/v1/recipient-lists", headers=auth(key))

    assert deny.status_code == 201, deny.text
    created = deny.json()
    assert created["entry_id"].startswith("rcl_")
    assert (created["list"], created["kind"], created["value"]) == (
        "deny",
        "domain",
        "spam.example",
    )
    assert (created["scope"], created["agent_id"]) == ("workspace", None)
    assert allow.json()["kind"] == "address" and allow.json()["value"] == "bob@partner.example"
    assert allow.json()["reason"] == "our partner's buyer" and created["reason"] is None
    assert (allow.json()["scope"], allow.json()["agent_id"]) == ("agent", agent.agent_id)
    assert (at_domain.json()["kind"], at_domain.json()["value"]) == ("domain", "partner.example")
    # Workspace-wide first (by list, then value), then each agent's.
    assert [e["value"] for e in everything.json()["entries"]] == [
        "partner.example",
        "spam.example",
        "bob@partner.example",
    ]
    assert {e["list"] for e in allows.json()["entries"]} == {"allow"}
    assert len(allows.json()["entries"]) == 2
    assert removed.status_code == 204 and removed.content == b""
    assert again.status_code == 404 and problem_code(again) == "not_found"
    assert [e["value"] for e in left.json()["entries"]] == [
        "partner.example",
        "bob@partner.example",
    ]
    added = audit_rows(runtime, "recipient_list.added")
    assert [r.detail["value"] for r in added] == [
        "spam.example",
        "bob@partner.example",
        "partner.example",
    ]
    assert added[1].detail == {
        "list": "allow",
        "kind": "address",
        "value": "bob@partner.example",
        "agent_id": agent.agent_id,
        "reason": "our partner's buyer",
    }
    [gone] = audit_rows(runtime, "recipient_list.removed")
    assert gone.target_id == created["entry_id"] and gone.detail["value"] == "spam.example"


async def test_a_duplicate_entry_is_409_but_the_other_list_or_scope_is_not(
    runtime: Runtime, agent: AgentHandle
) -> None:
    key = agent.owner_key
    async with api_client(runtime) as client:
        first = await add_entry(client, key, list="deny", value="bad.example")
        twice = await add_entry(client, key, list="deny", value="BAD.example.")
        other_list = await add_entry(client, key, list="allow", value="bad.example")
        agent_scope = await add_entry(
            client, key, list="deny", value="bad.example", agent_id=agent.agent_id
        )

    assert first.status_code == 201
    assert twice.status_code == 409 and problem_code(twice) == "conflict"
    assert twice.json()["entry_id"] == first.json()["entry_id"]
    assert other_list.status_code == 201
    assert agent_scope.status_code == 201


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"list": "deny", "value": "not a domain"}, "value"),
        ({"list": "deny", "value": "a@b@c.example"}, "value"),
        ({"list": "deny", "value": "192.0.2.1"}, "value"),
        ({"list": "deny", "value": "@"}, "value"),
        ({"list": "block", "value": "example.com"}, "list"),
        ({"list": "deny", "value": 7}, "value"),
        ({"list": "deny"}, "value"),
        ({"list": "deny", "value": "x.example", "reason": "a\nb"}, "reason"),
        ({"list": "deny", "value": "x.example", "reason": "r" * 501}, "reason"),
    ],
)
async def test_a_malformed_entry_is_422_naming_its_field(
    runtime: Runtime, agent: AgentHandle, body: dict[str, Any], field: str
) -> None:
    async with api_client(runtime) as client:
        response = await add_entry(client, agent.owner_key, **body)

    assert response.status_code == 422 and problem_code(response) == "validation_failed"
    assert error_fields(response) == {field}


async def test_agents_read_the_entries_that_apply_to_them_and_change_none(
    runtime: Runtime, agent: AgentHandle
) -> None:
    other = runtime.tenancy.create_agent(agent.workspace_id, "other bot")
    owner = agent.owner_key
    async with api_client(runtime) as client:
        mine = await add_entry(
            client, owner, list="allow", value="a.example", agent_id=agent.agent_id
        )
        await add_entry(client, owner, list="allow", value="b.example", agent_id=other.agent_id)
        await add_entry(client, owner, list="deny", value="c.example")
        seen = await client.get("/v1/recipient-lists", headers=auth(agent.agent_key))
        for_other = await client.get(
            f"/v1/recipient-lists?agent_id={other.agent_id}", headers=auth(agent.agent_key)
        )
        owner_view = await client.get(
            f"/v1/recipient-lists?agent_id={other.agent_id}", headers=auth(owner)
        )
        post = await add_entry(client, agent.agent_key, list="allow", value="d.example")
        delete = await client.delete(
            f"/v1/recipient-lists/{mine.json()['entry_id']}", headers=auth(agent.agent_key)
        )

    assert [e["value"] for e in seen.json()["entries"]] == ["c.example", "a.example"]
    assert for_other.status_code == 404 and problem_code(for_other) == "not_found"
    assert [e["value"] for e in owner_view.json()["entries"]] == ["c.example", "b.example"]
    assert post.status_code == 403 and problem_code(post) == "missing_scope"
    assert delete.status_code == 403 and problem_code(delete) == "missing_scope"


async def test_entries_never_cross_workspaces(runtime: Runtime, agent: AgentHandle) -> None:
    stranger = make_agent(runtime, "intruder", workspace="evil corp")
    async with api_client(runtime) as client:
        entry = await add_entry(client, agent.owner_key, list="deny", value="x.example")
        theirs = await client.get("/v1/recipient-lists", headers=auth(stranger.owner_key))
        by_agent = await client.get(
            f"/v1/recipient-lists?agent_id={agent.agent_id}", headers=auth(stranger.owner_key)
        )
        for_our_agent = await add_entry(
            client, stranger.owner_key, list="allow", value="y.example", agent_id=agent.agent_id
        )
        delete = await client.delete(
            f"/v1/recipient-lists/{entry.json()['entry_id']}", headers=auth(stranger.owner_key)
        )
        ours = await client.get("/v1/recipient-lists", headers=auth(agent.owner_key))

    assert theirs.status_code == 200 and theirs.json() == {"entries": []}
    assert by_agent.status_code == 404 and problem_code(by_agent) == "not_found"
    assert for_our_agent.status_code == 404 and problem_code(for_our_agent) == "not_found"
    assert delete.status_code == 404 and problem_code(delete) == "not_found"
    assert [e["entry_id"] for e in ours.json()["entries"]] == [entry.json()["entry_id"]]


async def test_the_gateway_applies_allow_and_deny_entries_to_the_next_send(
    runtime: Runtime, agent: AgentHandle
) -> None:
    owner = agent.owner_key
    async with api_client(runtime) as client:
        await put_tier(client, owner, agent.agent_id, "allowlisted_domains")
        outside = await send(client, agent.agent_key, {"to": ["x@partner.example"], "text": "1"})
        await add_entry(client, owner, list="allow", value="partner.example")
        inside = await send(client, agent.agent_key, {"to": ["x@partner.example"], "text": "2"})
        await add_entry(
            client, owner, list="deny", value="x@partner.example", agent_id=agent.agent_id
        )
        denied = await send(client, agent.agent_key, {"to": ["x@partner.example"], "text": "3"})

    assert outside.json()["decision"]["action"] == "block", outside.text
    assert outside.json()["decision"]["codes"] == ["tier"]
    assert inside.json()["decision"]["action"] == "allow", inside.text
    assert denied.json()["decision"]["action"] == "block"
    assert denied.json()["decision"]["codes"] == ["denied"]


def _owner(agent: AgentHandle) -> Principal:
    return Principal(workspace_id=agent.workspace_id, key_id="test", kind="owner")
