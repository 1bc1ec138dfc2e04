"""Known contacts and the workspace's bypass setting over HTTP, on SQLite and PostgreSQL.

Owner-only access and cross-workspace 404s for these routes are walked, with the rule
routes, in ``test_api_rules.py``.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import select

from mailgate.runtime import Runtime
from mailgate.store.schema import agents, audit_log, workspaces
from mailgate.testing import build_message
from tests.conftest import AgentHandle, make_agent
from tests.integration.api_support import api_client, auth, problem_code

pytestmark = pytest.mark.anyio


async def add(client: httpx.AsyncClient, key: str, **body: Any) -> dict[str, Any]:
    """POST a contact as ``key`` and return the created contact."""
    response = await client.post("/v1/contacts", json=body, headers=auth(key))
    assert response.status_code == 201, response.text
    payload: dict[str, Any] = response.json()
    return payload


def lookup(runtime: Runtime, agent_id: str, address: str) -> tuple[bool, bool]:
    """``(known, auto_approved)`` as ingest sees the sender right now."""
    with runtime.db.read() as conn:
        return runtime.policies.get(conn, agent_id).contacts.lookup(address)


# -- CRUD -------------------------------------------------------------------------------


async def test_an_owner_adds_reads_updates_and_deletes_a_contact(
    runtime: Runtime, agent: AgentHandle
) -> None:
    key = agent.owner_key
    async with api_client(runtime) as client:
        created = await add(
            client, key, agent_id=agent.agent_id, address=" Bob@Example.COM ", name="Bob"
        )
        assert created["contact_id"].startswith("con_")
        assert created["kind"] == "address" and created["value"] == "bob@example.com"
        assert created["scope"] == "agent" and created["agent_id"] == agent.agent_id
        assert created["auto_approve"] is True and created["name"] == "Bob"

        url = f"/v1/contacts/{created['contact_id']}"
        assert (await client.get(url, headers=auth(key))).json() == created
        patched = await client.patch(
            url, json={"name": "Robert", "auto_approve": False}, headers=auth(key)
        )
        assert patched.status_code == 200, patched.text
        assert patched.json() == {**created, "name": "Robert", "auto_approve": False}
        assert lookup(runtime, agent.agent_id, "bob@example.com") == (True, False)

        for nulled in ({"name": None}, {"auto_approve": None}):
            refused = await client.patch(url, json=nulled, headers=auth(key))
            assert refused.status_code == 422, refused.text
            assert [e["field"] for e in refused.json()["errors"]] == list(nulled)

        deleted = await client.delete(url, headers=auth(key))
        assert deleted.status_code == 200
        assert deleted.json() == {"contact_id": created["contact_id"], "deleted": True}
        gone = await client.get(url, headers=auth(key))
        assert gone.status_code == 404 and problem_code(gone) == "not_found"
    assert lookup(runtime, agent.agent_id, "bob@example.com") == (False, False)


async def test_the_listing_shows_workspace_contacts_first_and_filters_by_agent_and_scope(
    runtime: Runtime, agent: AgentHandle
) -> None:
    other = runtime.tenancy.create_agent(agent.workspace_id, "other bot")
    key = agent.owner_key
    async with api_client(runtime) as client:
        everyone = await add(client, key, domain="partner.example")
        mine = await add(client, key, agent_id=agent.agent_id, address="zed@x.example")
        also_mine = await add(client, key, agent_id=agent.agent_id, address="amy@x.example")
        theirs = await add(client, key, agent_id=other.agent_id, domain="other.example")

        async def ids(**params: str) -> list[str]:
            response = await client.get("/v1/contacts", params=params, headers=auth(key))
            assert response.status_code == 200, response.text
            return [c["contact_id"] for c in response.json()["contacts"]]

        listed = await ids()
        assert listed[0] == everyone["contact_id"]
        assert set(listed) == {
            everyone["contact_id"],
            mine["contact_id"],
            also_mine["contact_id"],
            theirs["contact_id"],
        }
        assert await ids(agent_id=agent.agent_id) == [
            everyone["contact_id"],
            also_mine["contact_id"],
            mine["contact_id"],
        ]
        assert await ids(agent_id=agent.agent_id, scope="agent") == [
            also_mine["contact_id"],
            mine["contact_id"],
        ]
        assert await ids(scope="workspace") == [everyone["contact_id"]]
        assert set(await ids(scope="agent")) == {
            mine["contact_id"],
            also_mine["contact_id"],
            theirs["contact_id"],
        }


async def test_a_domain_contact_covers_that_domain_only_and_workspace_contacts_cover_every_agent(
    runtime: Runtime, agent: AgentHandle
) -> None:
    other = runtime.tenancy.create_agent(agent.workspace_id, "other bot")
    async with api_client(runtime) as client:
        await add(client, agent.owner_key, domain="@Partner.Example.", auto_approve=False)
        await add(client, agent.owner_key, agent_id=agent.agent_id, address="me@solo.example")
    assert lookup(runtime, agent.agent_id, "anyone@partner.example") == (True, False)
    assert lookup(runtime, other.agent_id, "anyone@PARTNER.example") == (True, False)
    assert lookup(runtime, agent.agent_id, "x@mail.partner.example") == (False, False)
    assert lookup(runtime, agent.agent_id, "me@solo.example") == (True, True)
    assert lookup(runtime, other.agent_id, "me@solo.example") == (False, False)


# -- conflicts and validation -----------------------------------------------------------


async def test_the_same_contact_twice_for_one_owner_is_a_409_but_other_owners_may_have_it(
    runtime: Runtime, agent: AgentHandle
) -> None:
    other = runtime.tenancy.create_agent(agent.workspace_id, "other bot")
    key = agent.owner_key
    async with api_client(runtime) as client:
        first = await add(client, key, agent_id=agent.agent_id, address="bob@example.com")
        again = await client.post(
            "/v1/contacts",
            json={"agent_id": agent.agent_id, "address": "BOB@example.com", "name": "dup"},
            headers=auth(key),
        )
        assert again.status_code == 409, again.text
        assert problem_code(again) == "conflict"
        assert again.json()["contact_id"] == first["contact_id"]
        await add(client, key, agent_id=other.agent_id, address="bob@example.com")
        await add(client, key, address="bob@example.com")  # workspace-wide
        dup_ws = await client.post(
            "/v1/contacts", json={"address": "bob@example.com"}, headers=auth(key)
        )
        assert dup_ws.status_code == 409
        # Another workspace has its own address book.
        stranger = make_agent(runtime, "stranger", workspace="elsewhere")
        await add(client, stranger.owner_key, address="bob@example.com")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"address": "not-an-address"}, "address"),
        ({"address": "bob@localhost"}, "address"),
        ({"address": "two words@example.com"}, "address"),
        ({"address": "bob@1.2.3.4"}, "address"),
        ({"domain": "-bad-.example"}, "domain"),
        ({"domain": "example"}, "domain"),
        ({"domain": "a@example.com"}, "domain"),
        ({}, "address"),
        ({"address": "bob@example.com", "domain": "example.com"}, "address"),
        ({"address": "bob@example.com", "auto_approve": "yes"}, "auto_approve"),
        ({"address": "bob@example.com", "name": "n" * 201}, "name"),
        ({"address": "bob@example.com", "email": "x"}, "email"),
    ],
)
async def test_a_malformed_contact_is_a_422_naming_the_field(
    runtime: Runtime, agent: AgentHandle, body: dict[str, Any], field: str
) -> None:
    async with api_client(runtime) as client:
        response = await client.post("/v1/contacts", json=body, headers=auth(agent.owner_key))
    assert response.status_code == 422, response.text
    assert problem_code(response) == "validation_failed"
    assert field in [e["field"] for e in response.json()["errors"]]


async def test_a_contact_for_an_agent_of_another_workspace_is_a_404(
    runtime: Runtime, agent: AgentHandle
) -> None:
    stranger = make_agent(runtime, "stranger", workspace="elsewhere")
    async with api_client(runtime) as client:
        response = await client.post(
            "/v1/contacts",
            json={"agent_id": agent.agent_id, "address": "spy@evil.example"},
            headers=auth(stranger.owner_key),
        )
        listing = await client.get(
            "/v1/contacts", params={"agent_id": agent.agent_id}, headers=auth(stranger.owner_key)
        )
    assert response.status_code == 404 and problem_code(response) == "not_found"
    assert listing.status_code == 404
    assert lookup(runtime, agent.agent_id, "spy@evil.example") == (False, False)


# -- versions and audit -----------------------------------------------------------------


async def test_contact_changes_bump_the_owners_policy_version_and_reach_ingest_at_once(
    runtime: Runtime, agent: AgentHandle
) -> None:
    def versions() -> tuple[int, int]:
        with runtime.db.read() as conn:
            return (
                conn.execute(
                    select(agents.c.policy_version).where(agents.c.id == agent.agent_id)
                ).scalar_one(),
                conn.execute(
                    select(workspaces.c.policy_version).where(workspaces.c.id == agent.workspace_id)
                ).scalar_one(),
            )

    key = agent.owner_key
    start = versions()
    assert lookup(runtime, agent.agent_id, "bob@example.com") == (False, False)  # cached now
    async with api_client(runtime) as client:
        mine = await add(client, key, agent_id=agent.agent_id, address="bob@example.com")
        assert versions() == (start[0] + 1, start[1])
        assert lookup(runtime, agent.agent_id, "bob@example.com") == (True, True)
        await add(client, key, domain="partner.example")
        assert versions() == (start[0] + 1, start[1] + 1)
        assert lookup(runtime, agent.agent_id, "x@partner.example") == (True, True)
        await client.patch(
            f"/v1/contacts/{mine['contact_id']}", json={"auto_approve": False}, headers=auth(key)
        )
        assert versions() == (start[0] + 2, start[1] + 1)
        assert lookup(runtime, agent.agent_id, "bob@example.com") == (True, False)


async def test_contact_and_setting_changes_are_in_the_audit_log(
    runtime: Runtime, agent: AgentHandle
) -> None:
    key = agent.owner_key
    async with api_client(runtime) as client:
        contact = await add(client, key, agent_id=agent.agent_id, address="bob@example.com")
        url = f"/v1/contacts/{contact['contact_id']}"
        await client.patch(url, json={"name": "Bob"}, headers=auth(key))
        await client.delete(url, headers=auth(key))
        await client.patch(
            "/v1/workspace/settings", json={"contacts_bypass": False}, headers=auth(key)
        )
    with runtime.db.read() as conn:
        rows = conn.execute(
            select(audit_log)
            .where(audit_log.c.workspace_id == agent.workspace_id)
            .order_by(audit_log.c.seq)
        ).all()
    mine = [r for r in rows if r.action.startswith(("contact.", "workspace.settings"))]
    assert [r.action for r in mine] == [
        "contact.created",
        "contact.updated",
        "contact.deleted",
        "workspace.settings_updated",
    ]
    assert all(r.actor.startswith("owner:") for r in mine)
    assert mine[0].detail["value"] == "bob@example.com"
    assert mine[1].detail == {"agent_id": agent.agent_id, "name": "Bob"}
    assert mine[3].detail["contacts_bypass"] is False
    assert mine[3].detail["previous"] == {"contacts_bypass": True}


# -- workspace settings -----------------------------------------------------------------


async def test_turning_the_bypass_off_sends_authenticated_known_contacts_through_the_rules(
    runtime: Runtime, agent: AgentHandle
) -> None:
    key = agent.owner_key
    raw = build_message(to=agent.address, sender="bob@example.com", subject="invoice")
    dry_run = {
        "agent_id": agent.agent_id,
        "raw": raw.decode(),
        "auth": {"spf": "pass", "spf_domain": "example.com", "dmarc": "pass"},
    }
    async with api_client(runtime) as client:
        settings = await client.get("/v1/workspace/settings", headers=auth(key))
        assert settings.json() == {"workspace_id": agent.workspace_id, "contacts_bypass": True}
        await client.post(
            "/v1/rules",
            json={
                "agent_id": agent.agent_id,
                "action": "review",
                "condition": {"field": "subject", "match": "contains", "value": "invoice"},
            },
            headers=auth(key),
        )
        await add(client, key, agent_id=agent.agent_id, address="bob@example.com")
        bypassed = await client.post("/v1/rules/test", json=dry_run, headers=auth(key))
        assert bypassed.json()["contact_bypass"] is True
        assert bypassed.json()["action"] == "deliver"

        off = await client.patch(
            "/v1/workspace/settings", json={"contacts_bypass": False}, headers=auth(key)
        )
        assert off.json()["contacts_bypass"] is False
        with runtime.db.read() as conn:
            assert runtime.policies.get(conn, agent.agent_id).contacts_bypass is False
        ruled = await client.post("/v1/rules/test", json=dry_run, headers=auth(key))
        assert ruled.json()["contact_bypass"] is False
        assert ruled.json()["action"] == "review"

        noop = await client.patch("/v1/workspace/settings", json={}, headers=auth(key))
        assert noop.json()["contacts_bypass"] is False
        bad = await client.patch(
            "/v1/workspace/settings", json={"contacts_bypass": "no"}, headers=auth(key)
        )
        assert bad.status_code == 422
        assert [e["field"] for e in bad.json()["errors"]] == ["contacts_bypass"]
        null = await client.patch(
            "/v1/workspace/settings", json={"contacts_bypass": None}, headers=auth(key)
        )
        assert [e["field"] for e in null.json()["errors"]] == ["contacts_bypass"]


async def test_a_contact_that_is_known_but_not_auto_approved_never_skips_the_rules(
    runtime: Runtime, agent: AgentHandle
) -> None:
    key = agent.owner_key
    raw = build_message(to=agent.address, sender="bob@example.com", subject="invoice")
    async with api_client(runtime) as client:
        await client.post(
            "/v1/rules",
            json={
                "agent_id": agent.agent_id,
                "action": "review",
                "condition": {"field": "known_contact", "match": "is", "value": True},
            },
            headers=auth(key),
        )
        await add(client, key, domain="example.com", auto_approve=False)
        response = await client.post(
            "/v1/rules/test",
            json={"agent_id": agent.agent_id, "raw": raw.decode(), "auth": {"dmarc": "pass"}},
            headers=auth(key),
        )
    body = response.json()
    assert body["contact_bypass"] is False
    assert body["action"] == "review"  # the rule still sees the sender as a known contact
