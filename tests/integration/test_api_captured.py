"""``/v1/captured``: the capture outbox over HTTP, with the isolation every read has
(agent keys see their agent's mail, owners their workspace's; others get 404 or an
empty page), on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from mailgate.runtime import Runtime
from mailgate.testing import build_message
from mailgate.transports import CaptureTransport, OutgoingMessage
from tests.conftest import AgentHandle, make_agent
from tests.integration.api_support import api_client, auth, problem_code

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def capture(runtime: Runtime, agent: AgentHandle, subject: str = "Hello") -> bytes:
    """What the delivery service does before the capture transport: store, then send."""
    raw = build_message(to="bob@example.org", sender=agent.address, subject=subject)
    runtime.blobs.put(raw)
    message = OutgoingMessage(
        outbound_id=f"out_{subject.lower()}",
        workspace_id=agent.workspace_id,
        agent_id=agent.agent_id,
        mail_from=agent.address,
        recipients=("bob@example.org",),
        raw=raw,
        rfc_message_id="m@example.com",
        subject=subject,
    )
    await CaptureTransport(runtime.db, runtime.clock).send(message)
    return raw


async def test_an_agent_lists_reads_and_downloads_what_it_would_have_sent(
    runtime: Runtime, agent: AgentHandle
) -> None:
    raw = await capture(runtime, agent)
    async with api_client(runtime) as client:
        listing = await client.get("/v1/captured", headers=auth(agent.agent_key))
        assert listing.status_code == 200, listing.text
        [item] = listing.json()["captured"]
        assert listing.json()["next_cursor"] is None
        assert {k: item[k] for k in ("agent_id", "outbound_id", "mail_from", "recipients")} == {
            "agent_id": agent.agent_id,
            "outbound_id": "out_hello",
            "mail_from": agent.address,
            "recipients": ["bob@example.org"],
        }
        assert (item["subject"], item["size"]) == ("Hello", len(raw))
        one = await client.get(f"/v1/captured/{item['captured_id']}", headers=auth(agent.agent_key))
        assert one.json() == item
        got = await client.get(
            f"/v1/captured/{item['captured_id']}/raw", headers=auth(agent.agent_key)
        )
    assert got.status_code == 200
    assert got.content == raw
    assert got.headers["content-type"] == "message/rfc822"


async def test_other_agents_and_other_workspaces_see_nothing(
    runtime: Runtime, agent: AgentHandle
) -> None:
    await capture(runtime, agent)
    neighbour = runtime.tenancy.create_agent(agent.workspace_id, "neighbour bot")
    stranger = make_agent(runtime, "stranger bot", workspace="elsewhere")
    async with api_client(runtime) as client:
        mine = (await client.get("/v1/captured", headers=auth(agent.owner_key))).json()
        captured_id = mine["captured"][0]["captured_id"]
        for key in (neighbour.api_key, stranger.owner_key, stranger.agent_key):
            listing = await client.get("/v1/captured", headers=auth(key))
            assert listing.json()["captured"] == []
            filtered = await client.get(
                "/v1/captured", params={"agent_id": agent.agent_id}, headers=auth(key)
            )
            assert filtered.json()["captured"] == []
            for path in (f"/v1/captured/{captured_id}", f"/v1/captured/{captured_id}/raw"):
                response = await client.get(path, headers=auth(key))
                assert response.status_code == 404
                assert problem_code(response) == "not_found"


async def test_owners_see_the_workspace_and_may_filter_by_agent(
    runtime: Runtime, agent: AgentHandle
) -> None:
    other = runtime.tenancy.create_agent(agent.workspace_id, "other bot")
    other_handle = AgentHandle(
        agent.workspace_id, agent.owner_key, other.agent_id, other.address, other.api_key
    )
    await capture(runtime, agent, "First")
    await capture(runtime, other_handle, "Second")
    async with api_client(runtime) as client:
        everything = await client.get("/v1/captured", headers=auth(agent.owner_key))
        only_other = await client.get(
            "/v1/captured", params={"agent_id": other.agent_id}, headers=auth(agent.owner_key)
        )
    assert [c["subject"] for c in everything.json()["captured"]] == ["Second", "First"]
    assert [c["subject"] for c in only_other.json()["captured"]] == ["Second"]


async def test_the_listing_pages_with_a_cursor(runtime: Runtime, agent: AgentHandle) -> None:
    for subject in ("One", "Two", "Three"):
        await capture(runtime, agent, subject)
    seen: list[str] = []
    cursor: str | None = None
    async with api_client(runtime) as client:
        while True:
            params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            page = (
                await client.get("/v1/captured", params=params, headers=auth(agent.agent_key))
            ).json()
            seen += [c["subject"] for c in page["captured"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        bad = await client.get(
            "/v1/captured", params={"cursor": "nonsense"}, headers=auth(agent.agent_key)
        )
    assert seen == ["Three", "Two", "One"]
    assert problem_code(bad) == "validation_failed"


async def test_an_agent_key_without_messages_read_is_forbidden(
    runtime: Runtime, agent: AgentHandle
) -> None:
    await capture(runtime, agent)
    key = runtime.tenancy.create_key(
        agent.workspace_id, agent_id=agent.agent_id, scopes=("events:read",)
    )
    async with api_client(runtime) as client:
        response = await client.get("/v1/captured", headers=auth(key.api_key))
    assert response.status_code == 403
    assert problem_code(response) == "missing_scope"
