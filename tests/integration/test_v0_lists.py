"""/v0 allow/block lists through the real app on SQLite and PostgreSQL (and the real
``agentmail`` SDK against a running gateway): each list is a view of contacts, a
tagged inbound trash rule or the recipient allow/deny lists, and takes effect there."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest
from agentmail import AgentMail, AgentMailEnvironment
from agentmail.core.api_error import ApiError
from sqlalchemy import select

from mailgate.config import Settings
from mailgate.runtime import Runtime
from mailgate.store.schema import messages
from mailgate.testing.gateway import running_gateway
from tests.conftest import AgentHandle, make_agent
from tests.integration.api_support import api_client, auth, deliver
from tests.integration.outbound_support import send, set_tier

pytestmark = pytest.mark.anyio

LISTS = [("receive", "allow"), ("receive", "block"), ("send", "allow"), ("send", "block"),
         ("reply", "block")]  # fmt: skip


def v0_code(response: httpx.Response, status: int) -> str:
    """The stable code of an AgentMail-shaped error body with ``status``."""
    assert response.status_code == status, response.text
    body = response.json()
    assert {"name", "message", "code"} <= body.keys(), body
    return str(body["code"])


def folder_of(runtime: Runtime, message_id: str) -> tuple[str, bool]:
    """(folder, reached the agent) of a stored message."""
    with runtime.db.read() as conn:
        row = conn.execute(
            select(messages.c.folder, messages.c.visible_at).where(messages.c.id == message_id)
        ).one()
    return str(row.folder), row.visible_at is not None


@pytest.mark.parametrize(("direction", "kind"), LISTS)
async def test_an_owner_adds_lists_gets_and_deletes_an_inbox_entry_on_every_list(
    runtime: Runtime, agent: AgentHandle, direction: str, kind: str
) -> None:
    base = f"/v0/inboxes/{agent.address}/lists/{direction}/{kind}"
    headers = auth(agent.owner_key)
    async with api_client(runtime) as client:
        added = await client.post(
            base, json={"entry": "Spam@Example.com", "reason": "noisy"}, headers=headers
        )
        domain = await client.post(base, json={"entry": "example.org"}, headers=headers)
        repeat = await client.post(base, json={"entry": "spam@example.com"}, headers=headers)
        listed = await client.get(base, headers=headers)
        got = await client.get(f"{base}/spam@example.com", headers=headers)
        top_level = await client.get(f"/v0/lists/{direction}/{kind}", headers=headers)
        removed = await client.delete(f"{base}/spam@example.com", headers=headers)
        after = await client.get(f"{base}/spam@example.com", headers=headers)
        removed_again = await client.delete(f"{base}/spam@example.com", headers=headers)

    assert added.status_code == 200, added.text
    body = added.json()
    assert body["entry"] == "spam@example.com"
    assert (body["direction"], body["list_type"], body["entry_type"]) == (direction, kind, "email")
    assert body["organization_id"] == body["pod_id"] == agent.workspace_id
    assert body["inbox_id"] == agent.address
    assert body["read_only"] is False
    assert body["reason"] == "noisy"  # kept on every list, read back as given
    assert domain.json()["entry_type"] == "domain"
    assert repeat.status_code == 200 and repeat.json() == body
    assert listed.json()["count"] == 2
    assert [e["entry"] for e in listed.json()["entries"]] == ["example.org", "spam@example.com"]
    assert got.status_code == 200 and got.json() == body
    assert top_level.json()["entries"] == []  # the inbox's entry is not the workspace's
    assert removed.status_code == 204, removed.text
    assert v0_code(after, 404) == "not_found"
    assert v0_code(removed_again, 404) == "not_found"


async def test_unknown_directions_and_types_are_a_validation_error_and_reply_allow_is_501(
    runtime: Runtime, agent: AgentHandle
) -> None:
    headers = auth(agent.owner_key)
    async with api_client(runtime) as client:
        bad_direction = await client.get("/v0/lists/sideways/block", headers=headers)
        bad_type = await client.post(
            f"/v0/inboxes/{agent.address}/lists/send/maybe",
            json={"entry": "a@example.com"},
            headers=headers,
        )
        reply_allow = await client.get("/v0/lists/reply/allow", headers=headers)
        bad_entry = await client.post(
            "/v0/lists/send/block", json={"entry": "not an address"}, headers=headers
        )
        bad_token = await client.get(
            "/v0/lists/send/block", params={"page_token": "zzz"}, headers=headers
        )

    assert v0_code(bad_direction, 400) == "validation_failed"
    assert bad_direction.json()["name"] == "ValidationError"
    assert [e["field"] for e in bad_direction.json()["errors"]] == ["direction"]
    assert v0_code(bad_type, 400) == "validation_failed"
    assert [e["field"] for e in bad_type.json()["errors"]] == ["type"]
    assert v0_code(reply_allow, 501) == "not_implemented"
    assert v0_code(bad_entry, 400) == "validation_failed"
    assert [e["field"] for e in bad_entry.json()["errors"]] == ["entry"]
    assert v0_code(bad_token, 400) == "validation_failed"
    assert runtime.outbound_admin.list_entries(_owner(runtime, agent)) == []


def _owner(runtime: Runtime, agent: AgentHandle) -> Any:
    return runtime.tenancy.authenticate(agent.owner_key)


async def test_workspace_lists_page_by_entry_with_a_page_token(
    runtime: Runtime, agent: AgentHandle
) -> None:
    headers = auth(agent.owner_key)
    values = ["c@example.com", "a@example.com", "example.net", "b@example.com", "d.example"]
    async with api_client(runtime) as client:
        for value in values:
            made = await client.post(
                "/v0/lists/receive/block", json={"entry": value}, headers=headers
            )
            assert made.status_code == 200, made.text
        seen: list[str] = []
        counts: list[int] = []
        token: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 2} | ({"page_token": token} if token else {})
            page = await client.get("/v0/lists/receive/block", params=params, headers=headers)
            assert page.status_code == 200, page.text
            seen += [e["entry"] for e in page.json()["entries"]]
            counts.append(page.json()["count"])
            token = page.json().get("next_page_token")
            if not token:
                break

    assert seen == sorted(values)
    assert counts == [2, 2, 1]
    assert all("pod_id" not in e for e in page.json()["entries"])


async def test_a_receive_block_entry_keeps_that_senders_mail_out_of_the_inbox(
    runtime: Runtime, agent: AgentHandle
) -> None:
    async with api_client(runtime) as client:
        for entry, url in (
            ("pest@example.com", f"/v0/inboxes/{agent.address}/lists/receive/block"),
            ("spam.example", "/v0/lists/receive/block"),  # a workspace-wide domain entry
        ):
            made = await client.post(url, json={"entry": entry}, headers=auth(agent.owner_key))
            assert made.status_code == 200, made.text

    blocked = deliver(runtime, agent, sender="pest@example.com", subject="buy now")
    by_domain = deliver(runtime, agent, sender="anyone@spam.example", subject="deal")
    welcome = deliver(runtime, agent, sender="friend@example.com", subject="hi")

    assert folder_of(runtime, blocked.message_id) == ("trash", False)
    assert folder_of(runtime, by_domain.message_id) == ("trash", False)
    assert folder_of(runtime, welcome.message_id) == ("inbox", True)


async def test_a_send_block_entry_blocks_sends_and_replies_share_it(
    runtime: Runtime, agent: AgentHandle
) -> None:
    set_tier(runtime, agent.agent_id, "open")
    lists = f"/v0/inboxes/{agent.address}/lists"
    async with api_client(runtime) as client:
        before = await send(client, agent.agent_key, {"to": ["x@partner.example"], "text": "1"})
        made = await client.post(
            f"{lists}/send/block",
            json={"entry": "x@partner.example"},
            headers=auth(agent.owner_key),
        )
        after = await send(client, agent.agent_key, {"to": ["x@partner.example"], "text": "2"})
        as_reply = await client.get(
            f"{lists}/reply/block/x@partner.example", headers=auth(agent.owner_key)
        )
        removed = await client.delete(
            f"{lists}/reply/block/x@partner.example", headers=auth(agent.owner_key)
        )
        send_list = await client.get(f"{lists}/send/block", headers=auth(agent.owner_key))

    assert before.json()["decision"]["action"] != "block", before.text
    assert made.status_code == 200, made.text
    assert after.json()["decision"]["action"] == "block", after.text
    assert after.json()["decision"]["codes"] == ["denied"]
    assert as_reply.status_code == 200 and as_reply.json()["direction"] == "reply"
    assert removed.status_code == 204
    assert send_list.json()["entries"] == []  # one deny list behind both


async def test_allow_entries_are_known_contacts_and_allow_listed_recipients(
    runtime: Runtime, agent: AgentHandle
) -> None:
    set_tier(runtime, agent.agent_id, "allowlisted_domains")
    lists = f"/v0/inboxes/{agent.address}/lists"
    headers = auth(agent.owner_key)
    async with api_client(runtime) as client:
        refused = await send(client, agent.agent_key, {"to": ["p@partner.example"], "text": "1"})
        await client.post(f"{lists}/send/allow", json={"entry": "partner.example"}, headers=headers)
        admitted = await send(client, agent.agent_key, {"to": ["p@partner.example"], "text": "2"})
        await client.post(
            f"{lists}/receive/allow", json={"entry": "boss@example.com", "reason": "Boss"},
            headers=headers,
        )  # fmt: skip

    assert refused.json()["decision"]["action"] == "block", refused.text
    assert admitted.json()["decision"]["action"] != "block", admitted.text
    [contact] = runtime.rules.list_contacts(agent.workspace_id, agent_id=agent.agent_id)
    assert (contact.agent_id, contact.value, contact.name) == (
        agent.agent_id,
        "boss@example.com",
        "Boss",
    )
    assert contact.auto_approve is True


async def test_an_agent_key_may_only_add_block_entries_to_its_own_inbox(
    runtime: Runtime, agent: AgentHandle
) -> None:
    other = runtime.tenancy.create_agent(agent.workspace_id, "other bot")
    stranger = make_agent(runtime, "stranger", workspace="globex")
    own = f"/v0/inboxes/{agent.address}/lists"
    key = auth(agent.agent_key)
    entry = {"entry": "pest@example.com"}
    async with api_client(runtime) as client:
        block = await client.post(f"{own}/receive/block", json=entry, headers=key)
        send_block = await client.post(f"{own}/send/block", json=entry, headers=key)
        allow = await client.post(f"{own}/receive/allow", json=entry, headers=key)
        delete = await client.delete(f"{own}/receive/block/pest@example.com", headers=key)
        top = await client.post("/v0/lists/receive/block", json=entry, headers=key)
        top_read = await client.get("/v0/lists/receive/block", headers=key)
        others = await client.get(f"/v0/inboxes/{other.address}/lists/send/block", headers=key)
        foreign = await client.post(
            f"/v0/inboxes/{agent.address}/lists/send/block",
            json=entry,
            headers=auth(stranger.owner_key),
        )

    assert block.status_code == 200, block.text
    assert send_block.status_code == 200, send_block.text
    assert v0_code(allow, 403) == "missing_scope"
    assert allow.json()["name"] == "ForbiddenError"
    assert v0_code(delete, 403) == "missing_scope"
    assert v0_code(top, 403) == "missing_scope"
    assert top_read.status_code == 200, top_read.text
    assert v0_code(others, 404) == "not_found"
    assert v0_code(foreign, 404) == "not_found"
    assert [c.value for c in runtime.rules.list_contacts(agent.workspace_id)] == []


async def test_the_agentmail_sdk_manages_workspace_and_inbox_lists(
    runtime: Runtime, settings: Settings, agent: AgentHandle
) -> None:
    def scenario() -> None:
        with running_gateway(settings) as gw, httpx.Client(timeout=30) as http:
            env = AgentMailEnvironment(http=gw.http_url, websockets=gw.ws_url)
            owner = AgentMail(api_key=agent.owner_key, environment=env, httpx_client=http)
            made = owner.lists.create("send", "block", entry="bad@example.com", reason="x")
            assert (made.entry, made.entry_type, made.list_type, made.reason) == (
                "bad@example.com",
                "email",
                "block",
                "x",
            )
            assert made.organization_id == agent.workspace_id
            listed = owner.lists.list("send", "block", limit=5)
            assert listed.count == 1 and listed.entries[0].entry == "bad@example.com"
            assert owner.lists.get("send", "block", "bad@example.com").direction == "send"
            owner.lists.delete("send", "block", "bad@example.com")
            with pytest.raises(ApiError) as gone:
                owner.lists.get("send", "block", "bad@example.com")
            assert gone.value.status_code == 404

            inbox = owner.inboxes.lists.create(
                agent.address, "receive", "block", entry="spam.example", reason="spam"
            )
            assert inbox.inbox_id == agent.address and inbox.pod_id == agent.workspace_id
            assert inbox.reason == "spam" and inbox.entry_type == "domain"
            page = owner.inboxes.lists.list(agent.address, "receive", "block")
            assert [e.entry for e in page.entries] == ["spam.example"]
            owner.inboxes.lists.delete(agent.address, "receive", "block", "spam.example")
            assert owner.inboxes.lists.list(agent.address, "receive", "block").count == 0
            with pytest.raises(ApiError) as bad:
                owner.lists.list("sideways", "block")
            assert bad.value.status_code == 400

    await anyio.to_thread.run_sync(scenario)
