"""/v0/inboxes (AgentMail's inboxes are our agents) through the real app on SQLite and
PostgreSQL, and through the real ``agentmail`` SDK against a running gateway."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest
from agentmail import AgentMail, AgentMailEnvironment
from agentmail.core.api_error import ApiError
from agentmail.inboxes.types import CreateInboxRequest
from sqlalchemy import func, select

from mailgate.config import Settings
from mailgate.runtime import Runtime
from mailgate.store.schema import agents, audit_log, contacts, messages
from mailgate.testing.gateway import running_gateway
from tests.conftest import AgentHandle, make_agent
from tests.integration.api_support import api_client, auth, deliver

pytestmark = pytest.mark.anyio


def v0_code(response: httpx.Response, status: int) -> str:
    """The stable code of an AgentMail-shaped error body with ``status``."""
    assert response.status_code == status, response.text
    body = response.json()
    assert {"name", "message", "code"} <= body.keys(), body
    return str(body["code"])


def count_agents(runtime: Runtime) -> int:
    with runtime.db.read() as conn:
        return int(conn.execute(select(func.count()).select_from(agents)).scalar_one())


def audit_actions(runtime: Runtime, target_id: str) -> list[str]:
    with runtime.db.read() as conn:
        rows = conn.execute(
            select(audit_log.c.action)
            .where(audit_log.c.target_id == target_id)
            .order_by(audit_log.c.seq)
        ).scalars()
        return list(rows)


async def create(client: httpx.AsyncClient, key: str, **body: Any) -> httpx.Response:
    return await client.post("/v0/inboxes", json=body, headers=auth(key))


async def test_an_owner_creates_an_inbox_and_the_same_client_id_returns_it_again(
    runtime: Runtime, agent: AgentHandle
) -> None:
    domain = runtime.settings.agent_domain
    async with api_client(runtime) as client:
        first = await create(
            client, agent.owner_key, username="Sales", display_name="Sales Bot",
            client_id="sales-1", metadata={"team": "emea", "seats": 3, "vip": True},
        )  # fmt: skip
        again = await create(client, agent.owner_key, username="other", client_id="sales-1")

    assert first.status_code == 200, first.text
    body = first.json()
    assert body["inbox_id"] == body["email"] == f"sales@{domain}"
    assert body["pod_id"] == agent.workspace_id
    assert body["display_name"] == "Sales Bot"
    assert body["client_id"] == "sales-1"
    assert body["metadata"] == {"team": "emea", "seats": 3, "vip": True}
    assert "status" not in body  # omitted: active
    assert again.status_code == 200, again.text
    assert again.json() == body
    assert count_agents(runtime) == 2  # the fixture's agent and this one, no third
    with runtime.db.read() as conn:
        agent_id = conn.execute(
            select(agents.c.id).where(agents.c.client_id == "sales-1")
        ).scalar_one()
    assert audit_actions(runtime, agent_id) == ["agent.created"]
    # The new inbox receives mail at once.
    assert runtime.tenancy.resolve_recipient(f"sales@{domain}") is not None


async def test_an_inbox_without_a_username_gets_a_random_address_on_the_agent_domain(
    runtime: Runtime, agent: AgentHandle
) -> None:
    async with api_client(runtime) as client:
        one = await client.post("/v0/inboxes", headers=auth(agent.owner_key))
        two = await create(client, agent.owner_key, domain=runtime.settings.agent_domain.upper())

    assert one.status_code == two.status_code == 200, (one.text, two.text)
    local_one, _, domain_one = one.json()["inbox_id"].partition("@")
    local_two, _, domain_two = two.json()["inbox_id"].partition("@")
    assert domain_one == domain_two == runtime.settings.agent_domain
    assert local_one != local_two and len(local_one) == 12


async def test_bad_create_requests_are_refused_and_write_nothing(
    runtime: Runtime, agent: AgentHandle
) -> None:
    taken = agent.address.partition("@")[0]
    async with api_client(runtime) as client:
        foreign = await create(client, agent.owner_key, username="x", domain="example.com")
        bad_name = await create(client, agent.owner_key, username="-bad name-")
        bad_meta = await create(client, agent.owner_key, metadata={"nested": {"a": 1}})
        unknown = await create(client, agent.owner_key, usernme="typo")
        clash = await create(client, agent.owner_key, username=taken)
        paused = await create(client, agent.owner_key, username="p", status="paused")
        by_agent = await create(client, agent.agent_key, username="mine")

    assert v0_code(foreign, 400) == "validation_failed"
    assert foreign.json()["name"] == "ValidationError"
    assert [e["field"] for e in foreign.json()["errors"]] == ["domain"]
    assert v0_code(bad_name, 400) == "validation_failed"
    assert [e["field"] for e in bad_name.json()["errors"]] == ["username"]
    assert v0_code(bad_meta, 400) == "validation_failed"
    assert v0_code(unknown, 400) == "validation_failed"
    assert v0_code(clash, 409) == "conflict"
    assert v0_code(paused, 501) == "not_implemented"
    assert "status" in paused.json()["message"]
    assert v0_code(by_agent, 403) == "missing_scope"
    assert count_agents(runtime) == 1


async def test_inboxes_are_listed_newest_first_in_pages(
    runtime: Runtime, agent: AgentHandle
) -> None:
    async with api_client(runtime) as client:
        for n in range(4):
            created = await create(client, agent.owner_key, username=f"box{n}")
            assert created.status_code == 200, created.text
        pages: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 2}
            if token:
                params["page_token"] = token
            page = await client.get("/v0/inboxes", params=params, headers=auth(agent.owner_key))
            assert page.status_code == 200, page.text
            pages.append(page.json())
            token = page.json().get("next_page_token")
            if not token:
                break
        oldest_first = await client.get(
            "/v0/inboxes", params={"ascending": "true", "limit": 100},
            headers=auth(agent.owner_key),
        )  # fmt: skip
        bad_token = await client.get(
            "/v0/inboxes", params={"page_token": "nope"}, headers=auth(agent.owner_key)
        )
        bad_limit = await client.get(
            "/v0/inboxes", params={"limit": 0}, headers=auth(agent.owner_key)
        )

    assert [p["count"] for p in pages] == [2, 2, 1]
    listed = [i["inbox_id"].partition("@")[0] for p in pages for i in p["inboxes"]]
    assert listed == ["box3", "box2", "box1", "box0", agent.address.partition("@")[0]]
    ascending = [i["inbox_id"].partition("@")[0] for i in oldest_first.json()["inboxes"]]
    assert ascending == list(reversed(listed))
    assert v0_code(bad_token, 400) == "validation_failed"
    assert v0_code(bad_limit, 400) == "validation_failed"


async def test_an_inbox_is_found_by_address_percent_encoded_address_and_agent_id(
    runtime: Runtime, agent: AgentHandle
) -> None:
    encoded = agent.address.replace("@", "%40")
    async with api_client(runtime) as client:
        plain = await client.get(f"/v0/inboxes/{agent.address}", headers=auth(agent.owner_key))
        percent = await client.get(f"/v0/inboxes/{encoded}", headers=auth(agent.owner_key))
        upper = await client.get(
            f"/v0/inboxes/{agent.address.upper()}", headers=auth(agent.owner_key)
        )
        by_id = await client.get(f"/v0/inboxes/{agent.agent_id}", headers=auth(agent.agent_key))
        missing = await client.get(
            "/v0/inboxes/nobody@agents.invalid", headers=auth(agent.owner_key)
        )

    for response in (plain, percent, upper, by_id):
        assert response.status_code == 200, response.text
        assert response.json()["inbox_id"] == agent.address
        assert response.json()["pod_id"] == agent.workspace_id
    # An agent made before /v0 existed still has an updated_at (its creation).
    assert plain.json()["updated_at"] == plain.json()["created_at"]
    assert v0_code(missing, 404) == "not_found"
    assert missing.json()["name"] == "NotFoundError"


async def test_patch_replaces_the_display_name_and_merges_metadata(
    runtime: Runtime, agent: AgentHandle
) -> None:
    url = f"/v0/inboxes/{agent.address}"
    headers = auth(agent.owner_key)
    async with api_client(runtime) as client:
        first = await client.patch(
            url, json={"display_name": "Help", "metadata": {"a": "1", "b": 2}}, headers=headers
        )
        merged = await client.patch(url, json={"metadata": {"b": None, "c": True}}, headers=headers)
        renamed = await client.patch(url, json={"display_name": "Help Desk"}, headers=headers)
        active = await client.patch(url, json={"status": "active"}, headers=headers)
        cleared = await client.patch(url, json={"metadata": None}, headers=headers)
        empty_meta = await client.patch(url, json={"metadata": {}}, headers=headers)
        nothing = await client.patch(url, json={}, headers=headers)
        paused = await client.patch(url, json={"status": "paused"}, headers=headers)
        odd_status = await client.patch(url, json={"status": "sleeping"}, headers=headers)
        by_agent = await client.patch(
            url, json={"display_name": "Mine"}, headers=auth(agent.agent_key)
        )

    assert first.status_code == 200, first.text
    assert first.json()["metadata"] == {"a": "1", "b": 2}
    assert merged.json()["metadata"] == {"a": "1", "c": True}
    assert renamed.json()["display_name"] == "Help Desk"
    assert renamed.json()["metadata"] == {"a": "1", "c": True}  # untouched
    assert active.status_code == 200 and "status" not in active.json()
    assert cleared.status_code == 200 and "metadata" not in cleared.json()
    assert cleared.json()["updated_at"] > cleared.json()["created_at"]
    assert v0_code(empty_meta, 400) == "validation_failed"
    assert v0_code(nothing, 400) == "validation_failed"
    assert v0_code(paused, 501) == "not_implemented"
    assert v0_code(odd_status, 400) == "validation_failed"
    assert by_agent.status_code == 200 and by_agent.json()["display_name"] == "Mine"
    assert audit_actions(runtime, agent.agent_id).count("agent.updated") == 6


async def test_an_agent_key_sees_only_its_own_inbox(runtime: Runtime, agent: AgentHandle) -> None:
    other = runtime.tenancy.create_agent(agent.workspace_id, "other bot")
    async with api_client(runtime) as client:
        listed = await client.get("/v0/inboxes", headers=auth(agent.agent_key))
        seen = await client.get(f"/v0/inboxes/{other.address}", headers=auth(agent.agent_key))
        patched = await client.patch(
            f"/v0/inboxes/{other.address}",
            json={"display_name": "x"},
            headers=auth(agent.agent_key),
        )
        deleted = await client.delete(f"/v0/inboxes/{other.address}", headers=auth(agent.agent_key))
        own_delete = await client.delete(
            f"/v0/inboxes/{agent.address}", headers=auth(agent.agent_key)
        )

    assert [i["inbox_id"] for i in listed.json()["inboxes"]] == [agent.address]
    assert listed.json()["count"] == 1
    assert v0_code(seen, 404) == "not_found"
    assert v0_code(patched, 404) == "not_found"
    assert v0_code(deleted, 404) == "not_found"
    assert v0_code(own_delete, 403) == "missing_scope"
    assert count_agents(runtime) == 2


async def test_another_workspaces_owner_cannot_see_change_or_delete_an_inbox(
    runtime: Runtime, agent: AgentHandle
) -> None:
    stranger = make_agent(runtime, "stranger", workspace="globex")
    url = f"/v0/inboxes/{agent.address}"
    async with api_client(runtime) as client:
        seen = await client.get(url, headers=auth(stranger.owner_key))
        patched = await client.patch(
            url, json={"display_name": "x"}, headers=auth(stranger.owner_key)
        )
        deleted = await client.delete(url, headers=auth(stranger.owner_key))
        listed = await client.get("/v0/inboxes", headers=auth(stranger.owner_key))

    assert v0_code(seen, 404) == "not_found"
    assert v0_code(patched, 404) == "not_found"
    assert v0_code(deleted, 404) == "not_found"
    assert [i["inbox_id"] for i in listed.json()["inboxes"]] == [stranger.address]


async def test_deleting_an_inbox_removes_the_agent_its_mail_keys_and_lists(
    runtime: Runtime, agent: AgentHandle
) -> None:
    deliver(runtime, agent, subject="hello")
    runtime.rules.add_contact(
        agent.workspace_id, agent.agent_id, address="friend@example.com", actor="test"
    )
    local, domain = agent.address.split("@")
    tagged = f"{local}+orders@{domain}"
    for address in (agent.address, tagged):  # SMTP has seen both lately
        assert runtime.tenancy.resolve_recipient(address) is not None
        assert runtime.tenancy.cached_recipient(address) is not None
    async with api_client(runtime) as client:
        deleted = await client.delete(f"/v0/inboxes/{agent.address}", headers=auth(agent.owner_key))
        again = await client.get(f"/v0/inboxes/{agent.address}", headers=auth(agent.owner_key))
        key_after = await client.get("/v0/inboxes", headers=auth(agent.agent_key))

    assert deleted.status_code == 204, deleted.text
    assert v0_code(again, 404) == "not_found"
    assert v0_code(key_after, 401) == "invalid_api_key"
    with runtime.db.read() as conn:
        assert conn.execute(select(func.count()).select_from(messages)).scalar_one() == 0
        assert conn.execute(select(func.count()).select_from(contacts)).scalar_one() == 0
        [row] = conn.execute(select(audit_log).where(audit_log.c.action == "agent.deleted")).all()
    assert row.target_id == agent.agent_id and row.detail["addresses"] == [agent.address]
    assert row.actor.startswith("owner:")
    for address in (agent.address, tagged):  # refused at RCPT at once, not after the TTL
        assert runtime.tenancy.cached_recipient(address) is None
        assert runtime.tenancy.resolve_recipient(address) is None


async def test_the_agentmail_sdk_creates_lists_updates_and_deletes_inboxes(
    runtime: Runtime, settings: Settings, agent: AgentHandle
) -> None:
    def scenario() -> None:
        with running_gateway(settings) as gw, httpx.Client(timeout=30) as http:
            env = AgentMailEnvironment(http=gw.http_url, websockets=gw.ws_url)
            owner = AgentMail(api_key=agent.owner_key, environment=env, httpx_client=http)
            made = owner.inboxes.create(
                request=CreateInboxRequest(username="sdk", display_name="SDK", client_id="c-1")
            )
            same = owner.inboxes.create(request=CreateInboxRequest(client_id="c-1"))
            assert same.inbox_id == made.inbox_id == f"sdk@{settings.agent_domain}"
            assert made.pod_id == agent.workspace_id and made.display_name == "SDK"
            page = owner.inboxes.list(limit=1)
            assert page.count == 1 and page.next_page_token
            rest = owner.inboxes.list(limit=10, page_token=page.next_page_token)
            assert [i.inbox_id for i in page.inboxes + rest.inboxes] == [
                made.inbox_id,
                agent.address,
            ]
            updated = owner.inboxes.update(made.inbox_id, metadata={"k": "v"})
            assert updated.metadata == {"k": "v"} and updated.display_name == "SDK"
            assert owner.inboxes.get(made.inbox_id).metadata == {"k": "v"}
            as_agent = AgentMail(api_key=agent.agent_key, environment=env, httpx_client=http)
            with pytest.raises(ApiError) as refused:
                as_agent.inboxes.create(request=CreateInboxRequest(username="nope"))
            assert refused.value.status_code == 403
            owner.inboxes.delete(made.inbox_id)
            with pytest.raises(ApiError) as gone:
                owner.inboxes.get(made.inbox_id)
            assert gone.value.status_code == 404

    await anyio.to_thread.run_sync(scenario)
