"""The review inbox and the trash over HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import update

from mailgate.runtime import Runtime
from mailgate.store.schema import messages
from tests.conftest import AgentHandle
from tests.integration.api_support import api_client, auth, deliver, problem_code
from tests.integration.test_mailbox import file_as

pytestmark = pytest.mark.anyio

HELD_DECISION = {
    "action": "review",
    "rule_id": "rul_1",
    "rule_name": "unknown senders",
    "reasons": ["sender is not a known contact"],
    "contact_bypass": False,
}


def hold(runtime: Runtime, agent: AgentHandle, folder: str = "review", **message: str) -> str:
    """A message a rule held, with the rule's decision recorded on it."""
    stored = deliver(runtime, agent, **message)
    file_as(runtime, stored.message_id, folder)
    with runtime.db.write() as conn:
        conn.execute(
            update(messages)
            .where(messages.c.id == stored.message_id)
            .values(decision={**HELD_DECISION, "action": folder})
        )
    return stored.message_id


# -- the review inbox -------------------------------------------------------------------


async def test_owners_list_held_mail_with_the_decision_that_held_it(
    runtime: Runtime, agent: AgentHandle
) -> None:
    deliver(runtime, agent)
    review = hold(runtime, agent, subject="who is this")
    quarantine = hold(runtime, agent, "quarantine", subject="phish")
    async with api_client(runtime) as client:
        headers = auth(agent.owner_key)
        both = (await client.get("/v1/review", headers=headers)).json()
        one = (await client.get("/v1/review", params={"folder": "review"}, headers=headers)).json()
        mine = await client.get("/v1/review", params={"agent_id": agent.agent_id}, headers=headers)
    assert [m["message_id"] for m in both["messages"]] == [quarantine, review]
    assert both["next_cursor"] is None
    entry = both["messages"][1]
    assert (entry["folder"], entry["visible_at"]) == ("review", None)
    assert entry["decision"]["reasons"] == ["sender is not a known contact"]
    assert [m["message_id"] for m in one["messages"]] == [review]
    assert len(mine.json()["messages"]) == 2


async def test_the_review_listing_pages_with_a_cursor(runtime: Runtime, agent: AgentHandle) -> None:
    held = [hold(runtime, agent, subject=f"n{i}") for i in range(3)]
    seen: list[str] = []
    cursor: str | None = None
    async with api_client(runtime) as client:
        while True:
            params: dict[str, str | int] = {"limit": 2}
            if cursor:
                params["cursor"] = cursor
            body = (
                await client.get("/v1/review", params=params, headers=auth(agent.owner_key))
            ).json()
            seen += [m["message_id"] for m in body["messages"]]
            cursor = body["next_cursor"]
            if cursor is None:
                break
    assert seen == list(reversed(held))


async def test_the_review_inbox_is_for_owner_keys(runtime: Runtime, agent: AgentHandle) -> None:
    held = hold(runtime, agent)
    async with api_client(runtime) as client:
        headers = auth(agent.agent_key)
        listing = await client.get("/v1/review", headers=headers)
        release = await client.post(f"/v1/review/{held}/release", headers=headers)
        reject = await client.post(f"/v1/review/{held}/trash", headers=headers)
    for response in (listing, release, reject):
        assert response.status_code == 403
        assert problem_code(response) == "missing_scope"


async def test_a_folder_that_is_not_held_is_a_422_naming_the_field(
    runtime: Runtime, agent: AgentHandle
) -> None:
    async with api_client(runtime) as client:
        response = await client.get(
            "/v1/review", params={"folder": "inbox"}, headers=auth(agent.owner_key)
        )
    assert problem_code(response) == "validation_failed"
    assert [e["field"] for e in response.json()["errors"]] == ["folder"]


async def test_release_answers_the_message_and_the_move_and_the_agent_then_sees_it(
    runtime: Runtime, agent: AgentHandle
) -> None:
    held = hold(runtime, agent, subject="let me in")
    async with api_client(runtime) as client:
        before = await client.get(f"/v1/messages/{held}", headers=auth(agent.agent_key))
        response = await client.post(f"/v1/review/{held}/release", headers=auth(agent.owner_key))
        after = await client.get(f"/v1/messages/{held}", headers=auth(agent.agent_key))
        again = await client.post(f"/v1/review/{held}/release", headers=auth(agent.owner_key))
    assert problem_code(before) == "not_found"
    assert response.status_code == 200
    body = response.json()
    assert body["transition"]["operation"] == "release"
    assert (body["transition"]["from_folder"], body["transition"]["to_folder"]) == (
        "review",
        "inbox",
    )
    assert body["transition"]["reached_agent"] is True
    assert body["message"]["message_id"] == held
    assert body["message"]["folder"] == "inbox"
    assert body["message"]["previous_folder"] == "review"
    assert body["message"]["visible_at"] == body["transition"]["changed_at"]
    assert after.status_code == 200
    assert after.json()["decision"] is None  # the rule's reasons are for owners
    assert again.status_code == 409
    assert problem_code(again) == "invalid_folder_transition"
    assert again.json()["folder"] == "inbox"


async def test_rejected_held_mail_goes_to_the_trash_and_restores_to_review(
    runtime: Runtime, agent: AgentHandle
) -> None:
    held = hold(runtime, agent, "quarantine")
    headers = auth(agent.owner_key)
    async with api_client(runtime) as client:
        rejected = await client.post(f"/v1/review/{held}/trash", headers=headers)
        trash = (await client.get("/v1/trash", headers=headers)).json()
        agent_trash = (await client.get("/v1/trash", headers=auth(agent.agent_key))).json()
        restored = await client.post(f"/v1/messages/{held}/restore", headers=headers)
        review = (await client.get("/v1/review", headers=headers)).json()
    assert rejected.json()["transition"]["to_folder"] == "trash"
    assert rejected.json()["message"]["previous_folder"] == "quarantine"
    assert [m["message_id"] for m in trash["messages"]] == [held]
    assert agent_trash["messages"] == []  # it never reached the agent
    assert restored.json()["transition"]["to_folder"] == "quarantine"
    assert restored.json()["transition"]["reached_agent"] is False
    assert [m["message_id"] for m in review["messages"]] == [held]


async def test_the_review_trash_is_a_409_for_mail_that_is_not_held(
    runtime: Runtime, agent: AgentHandle
) -> None:
    stored = deliver(runtime, agent)
    async with api_client(runtime) as client:
        response = await client.post(
            f"/v1/review/{stored.message_id}/trash", headers=auth(agent.owner_key)
        )
    assert response.status_code == 409
    assert problem_code(response) == "invalid_folder_transition"


# -- trash and restore ------------------------------------------------------------------


async def test_an_agent_trashes_lists_and_restores_its_own_mail(
    runtime: Runtime, agent: AgentHandle
) -> None:
    stored = deliver(runtime, agent)
    kept = deliver(runtime, agent)
    headers = auth(agent.agent_key)
    async with api_client(runtime) as client:
        trashed = await client.post(f"/v1/messages/{stored.message_id}/trash", headers=headers)
        listing = (await client.get("/v1/trash", headers=headers)).json()
        inbox = (
            await client.get("/v1/messages", params={"folder": "inbox"}, headers=headers)
        ).json()
        restored = await client.post(f"/v1/messages/{stored.message_id}/restore", headers=headers)
        empty = (await client.get("/v1/trash", headers=headers)).json()
    assert trashed.status_code == 200
    assert trashed.json()["message"]["folder"] == "trash"
    assert [m["message_id"] for m in listing["messages"]] == [stored.message_id]
    assert [m["message_id"] for m in inbox["messages"]] == [kept.message_id]
    assert restored.json()["message"]["folder"] == "inbox"
    assert restored.json()["transition"]["reached_agent"] is False
    assert empty["messages"] == []


async def test_restoring_mail_that_is_not_in_the_trash_is_a_409(
    runtime: Runtime, agent: AgentHandle
) -> None:
    stored = deliver(runtime, agent)
    async with api_client(runtime) as client:
        response = await client.post(
            f"/v1/messages/{stored.message_id}/restore", headers=auth(agent.agent_key)
        )
    assert response.status_code == 409
    assert problem_code(response) == "invalid_folder_transition"
    assert response.json()["operation"] == "restore"


async def test_an_agent_cannot_trash_mail_it_has_not_been_shown(
    runtime: Runtime, agent: AgentHandle
) -> None:
    held = hold(runtime, agent)
    async with api_client(runtime) as client:
        trash = await client.post(f"/v1/messages/{held}/trash", headers=auth(agent.agent_key))
        ghost = await client.post("/v1/messages/msg_nope/trash", headers=auth(agent.agent_key))
    assert problem_code(trash) == "not_found"
    assert problem_code(ghost) == "not_found"


async def test_trash_and_restore_need_the_messages_write_scope(
    runtime: Runtime, agent: AgentHandle
) -> None:
    stored = deliver(runtime, agent)
    key = runtime.tenancy.create_key(
        agent.workspace_id, agent_id=agent.agent_id, scopes=("messages:read",)
    )
    async with api_client(runtime) as client:
        for verb in ("trash", "restore"):
            response = await client.post(
                f"/v1/messages/{stored.message_id}/{verb}", headers=auth(key.api_key)
            )
            assert response.status_code == 403
            assert problem_code(response) == "missing_scope"
            assert response.json()["scope"] == "messages:write"
        listing = await client.get("/v1/trash", headers=auth(key.api_key))
    assert listing.status_code == 200  # reading the trash needs messages:read only


async def test_owners_see_the_new_message_fields_and_agents_the_ones_for_them(
    runtime: Runtime, agent: AgentHandle
) -> None:
    stored = deliver(runtime, agent)
    async with api_client(runtime) as client:
        mine = (
            await client.get(f"/v1/messages/{stored.message_id}", headers=auth(agent.agent_key))
        ).json()
        boss = (
            await client.get(f"/v1/messages/{stored.message_id}", headers=auth(agent.owner_key))
        ).json()
    for body in (mine, boss):
        assert {"decision", "auth_results", "previous_folder", "visible_at"} <= body.keys()
        assert body["visible_at"] is not None and body["previous_folder"] is None
    assert mine["decision"] is None
