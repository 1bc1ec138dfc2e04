"""Send, reply and forward through the real app and the policy gateway, delivered by
the capture transport (the embedded default) on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import select

from mailgate.clock import FakeClock
from mailgate.config import Settings
from mailgate.runtime import Runtime
from mailgate.store.schema import audit_log, captured, events, messages
from mailgate.testing import build_message
from tests.conftest import AgentHandle, make_agent
from tests.integration.api_support import ENVELOPE, api_client
from tests.integration.outbound_support import (
    count_outbound,
    drain,
    outbound_runtime,
    reply,
    send,
    set_tier,
)

pytestmark = pytest.mark.anyio

MAIL = {"to": ["alice@example.com"], "subject": "Quarterly numbers", "text": "Here they are."}


def _event_types(runtime: Runtime, agent_id: str | None = None) -> list[str]:
    query = select(events.c.type).order_by(events.c.seq)
    if agent_id is not None:
        query = query.where(events.c.agent_id == agent_id)
    with runtime.db.read() as conn:
        return list(conn.execute(query).scalars())


async def _inbound(runtime: Runtime, agent: AgentHandle, **headers: Any) -> str:
    """Deliver one inbound message to the agent; returns its message id."""
    raw = build_message(to=agent.address, sender="alice@example.com", **headers)
    stored = await asyncio.to_thread(
        runtime.ingest.ingest, raw, ENVELOPE, [runtime.tenancy.resolve_recipient(agent.address)]
    )
    return stored[0].message_id


async def test_a_send_without_an_idempotency_key_is_refused_with_400(
    runtime: Runtime, agent: AgentHandle
) -> None:
    async with api_client(runtime) as client:
        response = await client.post(
            "/v1/send", json=MAIL, headers={"Authorization": f"Bearer {agent.agent_key}"}
        )
    assert response.status_code == 400
    assert response.json()["code"] == "idempotency_key_required"
    assert count_outbound(runtime) == 0


async def test_a_reply_only_agent_cannot_start_a_new_thread(
    runtime: Runtime, agent: AgentHandle
) -> None:
    async with api_client(runtime) as client:
        response = await send(client, agent.agent_key, MAIL)
    assert response.status_code == 201
    body = response.json()
    assert body["status"] == "blocked"
    assert body["decision"]["action"] == "block"
    assert body["decision"]["codes"] == ["tier"]
    steps = {s["step"]: s["outcome"] for s in body["decision"]["steps"]}
    assert steps["key_scope"] == "pass" and steps["tier"] == "block"
    assert steps["content"] == "skipped"
    assert "outbound.blocked" in _event_types(runtime, agent.agent_id)
    assert await drain(runtime) == []


async def test_an_open_agent_sends_and_the_capture_transport_keeps_the_message(
    runtime: Runtime, agent: AgentHandle
) -> None:
    set_tier(runtime, agent.agent_id, "open")
    async with api_client(runtime) as client:
        response = await send(client, agent.agent_key, MAIL)
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["status"] == "queued" and body["decision"]["action"] == "allow"
        outcomes = await drain(runtime)
        assert [o.state for o in outcomes] == ["sent"]
        detail = (
            await client.get(
                f"/v1/outbound/{body['id']}",
                headers={"Authorization": f"Bearer {agent.agent_key}"},
            )
        ).json()
        thread = (
            await client.get(
                f"/v1/threads/{body['thread_id']}",
                headers={"Authorization": f"Bearer {agent.agent_key}"},
            )
        ).json()
    assert detail["status"] == "sent"
    assert [a["outcome"] for a in detail["attempts"]] == ["sent"]
    assert detail["recipients"] == [
        {
            "address": "alice@example.com",
            "kind": "to",
            "status": "sent",
            "detail": detail["recipients"][0]["detail"],
        }
    ]
    assert [m["folder"] for m in thread["messages"]] == ["sent"]
    with runtime.db.read() as conn:
        row = conn.execute(select(captured)).one()
    raw = runtime.blobs.get(row.raw_sha256)
    assert f"Message-ID: <{body['rfc_message_id']}>".encode() in raw
    assert b"Subject: Quarterly numbers" in raw
    assert "outbound.sent" in _event_types(runtime, agent.agent_id)


async def test_the_same_key_and_payload_return_the_first_response_and_send_once(
    runtime: Runtime, agent: AgentHandle
) -> None:
    set_tier(runtime, agent.agent_id, "open")
    async with api_client(runtime) as client:
        first = await send(client, agent.agent_key, MAIL, idem="k-1")
        again = await send(client, agent.agent_key, MAIL, idem="k-1")
        other = await send(client, agent.agent_key, {**MAIL, "subject": "Other"}, idem="k-1")
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused"
    assert count_outbound(runtime) == 1


async def test_keys_are_scoped_per_agent(runtime: Runtime, agent: AgentHandle) -> None:
    # A second agent of the same workspace: a workspace-wide key space would replay.
    other = runtime.tenancy.create_agent(agent.workspace_id, "second bot")
    for agent_id in (agent.agent_id, other.agent_id):
        set_tier(runtime, agent_id, "open")
    async with api_client(runtime) as client:
        a = await send(client, agent.agent_key, MAIL, idem="shared")
        b = await send(client, other.api_key, MAIL, idem="shared")
    assert a.status_code == b.status_code == 201
    assert a.json()["id"] != b.json()["id"]


async def test_a_suppressed_address_is_blocked_with_reason_suppressed(
    runtime: Runtime, agent: AgentHandle
) -> None:
    set_tier(runtime, agent.agent_id, "open")
    async with api_client(runtime) as client:
        added = await client.post(
            "/v1/suppressions",
            json={"address": "Alice@Example.com", "reason": "manual"},
            headers={"Authorization": f"Bearer {agent.owner_key}"},
        )
        assert added.status_code == 201, added.text
        response = await send(client, agent.agent_key, MAIL)
    body = response.json()
    assert body["status"] == "blocked"
    assert body["decision"]["codes"] == ["suppressed"]
    assert any("alice@example.com" in r for r in body["decision"]["reasons"])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("to", ["alice@example.com\r\nBcc: victim@example.net"]),
        ("cc", ["bob@example.com\nX-Evil: 1"]),
        ("bcc", ["carol@example.com\r"]),
        ("reply_to", ["r@example.com\r\nSubject: hijack"]),
        ("subject", "Hello\r\nBcc: victim@example.net"),
        ("subject", "Hello\nContent-Type: text/html"),
        ("headers", {"X-Tag": "a\r\nBcc: victim@example.net"}),
        ("headers", {"X-Tag\r\nBcc": "victim@example.net"}),
        (
            "attachments",
            [{"filename": "a.txt\r\nX-Evil: 1", "content_type": "text/plain", "content": "aGk="}],
        ),
        (
            "attachments",
            [{"filename": "a.txt", "content_type": "text/plain\r\nX-Evil: 1", "content": "aGk="}],
        ),
        (
            "attachments",
            [
                {
                    "filename": "a.png",
                    "content_type": "image/png",
                    "content": "aGk=",
                    "content_id": "x\r\ny",
                }
            ],
        ),
    ],
)
async def test_header_injection_in_any_field_is_422_and_nothing_is_queued(
    runtime: Runtime, agent: AgentHandle, field: str, value: Any
) -> None:
    set_tier(runtime, agent.agent_id, "open")
    async with api_client(runtime) as client:
        response = await send(client, agent.agent_key, {**MAIL, field: value}, idem="inject")
        retried = await send(client, agent.agent_key, MAIL, idem="inject")
    assert response.status_code == 422
    assert response.json()["code"] == "header_injection"
    # nothing was written, and the key was released for a corrected retry
    assert retried.status_code == 201 and retried.json()["status"] == "queued"
    assert count_outbound(runtime) == 1


async def test_a_reply_stays_in_the_thread_with_threading_headers(
    runtime: Runtime, agent: AgentHandle
) -> None:
    inbound_id = await _inbound(runtime, agent, subject="Invoice 42")
    async with api_client(runtime) as client:
        response = await reply(
            client, agent.agent_key, {"message_id": inbound_id, "text": "Thanks, paid."}
        )
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["status"] == "queued"  # reply_only admits replies to inbound threads
        await drain(runtime)
    with runtime.db.read() as conn:
        original = conn.execute(select(messages).where(messages.c.id == inbound_id)).one()
        copy = conn.execute(select(messages).where(messages.c.id == body["message_id"])).one()
    assert copy.thread_id == original.thread_id
    assert copy.subject == "Re: Invoice 42"
    assert copy.in_reply_to == original.rfc_message_id
    assert copy.folder == "sent" and copy.direction == "outbound"
    raw = runtime.blobs.get(copy.raw_sha256)
    assert b"Auto-Submitted: auto-replied" in raw


async def test_a_reply_may_add_recipients_only_as_far_as_the_agents_tier_allows(
    runtime: Runtime, agent: AgentHandle
) -> None:
    inbound_id = await _inbound(runtime, agent, subject="Invoice 43")
    ask = {"message_id": inbound_id, "text": "Copying billing.", "cc": ["billing@example.net"]}
    async with api_client(runtime) as client:
        refused = await reply(client, agent.agent_key, ask)
        set_tier(runtime, agent.agent_id, "open")
        sent = await reply(client, agent.agent_key, ask)
        await drain(runtime)

    assert refused.status_code == 201, refused.text
    assert refused.json()["status"] == "blocked"  # reply_only: only the correspondents
    assert "billing@example.net" in " ".join(refused.json()["decision"]["reasons"])
    assert sent.json()["status"] == "queued", sent.text
    with runtime.db.read() as conn:
        [row] = conn.execute(select(captured)).all()
    assert sorted(row.recipients) == ["alice@example.com", "billing@example.net"]


async def test_only_the_agent_owning_the_thread_may_reply(
    runtime: Runtime, agent: AgentHandle
) -> None:
    inbound_id = await _inbound(runtime, agent)
    other = make_agent(runtime, "intruder", workspace="acme2")
    async with api_client(runtime) as client:
        response = await reply(client, other.agent_key, {"message_id": inbound_id, "text": "hi"})
    assert response.status_code == 404
    assert count_outbound(runtime) == 0


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ({"Auto-Submitted": "auto-replied"}, "Auto-Submitted"),
        ({"Precedence": "bulk"}, "Precedence"),
        ({"List-Id": "<dev.lists.example.org>"}, "List-Id"),
    ],
)
async def test_a_reply_to_an_auto_reply_or_a_list_is_blocked_by_the_loop_guard(
    runtime: Runtime, agent: AgentHandle, headers: dict[str, str], why: str
) -> None:
    inbound_id = await _inbound(runtime, agent, extra_headers=headers)
    async with api_client(runtime) as client:
        response = await reply(client, agent.agent_key, {"message_id": inbound_id, "text": "ok"})
    body = response.json()
    assert body["status"] == "blocked", body
    assert body["decision"]["codes"] == ["loop_guard"]
    assert why in " ".join(body["decision"]["reasons"])


async def test_a_hold_notifies_owners_and_an_approval_executes_once(
    runtime: Runtime, agent: AgentHandle
) -> None:
    runtime.tenancy.set_owner_email(agent.workspace_id, "owner@example.org")
    set_tier(runtime, agent.agent_id, "open")
    owner = {"Authorization": f"Bearer {agent.owner_key}"}
    async with api_client(runtime) as client:
        rule = await client.post(
            "/v1/rules",
            json={
                "name": "approve external",
                "agent_id": agent.agent_id,
                "direction": "outbound",
                "action": "require_approval",
                "condition": {"field": "to", "match": "glob", "value": "*@example.com"},
            },
            headers=owner,
        )
        assert rule.status_code == 201, rule.text
        held = (await send(client, agent.agent_key, MAIL)).json()
        assert held["status"] == "pending_approval"
        assert held["decision"]["codes"] == ["require_approval"]
        await drain(runtime)  # delivers the owner notification only
        with runtime.db.read() as conn:
            notices = conn.execute(select(captured)).all()
        assert [n.recipients for n in notices] == [["owner@example.org"]]
        assert held["id"].encode() in runtime.blobs.get(notices[0].raw_sha256)

        async def approve() -> int:
            r = await client.post(
                f"/v1/outbound/{held['id']}/approve", json={"comment": "fine"}, headers=owner
            )
            return r.status_code

        codes = sorted(await asyncio.gather(*(approve() for _ in range(5))))
        assert codes == [200, 409, 409, 409, 409]
        await drain(runtime)
        detail = (await client.get(f"/v1/outbound/{held['id']}", headers=owner)).json()
    assert detail["status"] == "sent"
    assert [a["verdict"] for a in detail["approvals"]] == ["approved"]
    assert len(detail["attempts"]) == 1
    with runtime.db.read() as conn:
        sent = conn.execute(select(captured).where(captured.c.outbound_id == held["id"])).all()
        actions = list(
            conn.execute(
                select(audit_log.c.action).where(audit_log.c.target_id == held["id"])
            ).scalars()
        )
    assert len(sent) == 1
    assert actions == ["outbound.decided", "outbound.approved"]
    types = _event_types(runtime, agent.agent_id)
    assert types.count("outbound.pending_approval") == 1
    assert types.count("outbound.approved") == 1


async def test_a_rejected_request_is_never_sent_and_leaves_the_outbox(
    runtime: Runtime, agent: AgentHandle
) -> None:
    set_tier(runtime, agent.agent_id, "open")
    owner = {"Authorization": f"Bearer {agent.owner_key}"}
    async with api_client(runtime) as client:
        await client.post(
            "/v1/rules",
            json={
                "name": "hold all",
                "agent_id": agent.agent_id,
                "direction": "outbound",
                "action": "require_approval",
                "condition": {"field": "subject", "match": "contains", "value": "Quarterly"},
            },
            headers=owner,
        )
        held = (await send(client, agent.agent_key, MAIL)).json()
        agent_try = await client.post(
            f"/v1/outbound/{held['id']}/approve",
            headers={"Authorization": f"Bearer {agent.agent_key}"},
        )
        rejected = await client.post(
            f"/v1/outbound/{held['id']}/reject", json={"comment": "no"}, headers=owner
        )
        late = await client.post(f"/v1/outbound/{held['id']}/approve", headers=owner)
    assert agent_try.status_code == 403
    assert rejected.status_code == 200 and rejected.json()["status"] == "rejected"
    assert late.status_code == 409 and late.json()["code"] == "already_decided"
    assert await drain(runtime) == []
    with runtime.db.read() as conn:
        assert (
            conn.execute(select(messages).where(messages.c.id == held["message_id"])).first()
            is None
        )


async def test_held_requests_expire_after_the_approval_window(
    settings: Settings,
) -> None:
    clock = FakeClock()
    async with outbound_runtime(settings, clock=clock, approval_expiry_hours=1.0) as rt:
        handle = make_agent(rt)
        set_tier(rt, handle.agent_id, "open")
        async with api_client(rt) as client:
            await client.post(
                "/v1/rules",
                json={
                    "name": "hold all",
                    "direction": "outbound",
                    "action": "require_approval",
                    "condition": {"field": "subject", "match": "contains", "value": "Q"},
                },
                headers={"Authorization": f"Bearer {handle.owner_key}"},
            )
            held = (await send(client, handle.agent_key, MAIL)).json()
        assert rt.outbound.expire_pending() == 0
        clock.advance(3601)
        assert rt.outbound.expire_pending() == 1
        assert rt.outbound.get_as_system(held["id"])["status"] == "expired"


async def test_hourly_rate_limit_blocks_with_reason_rate_limited(
    settings: Settings,
) -> None:
    async with outbound_runtime(settings, rate_per_hour=2) as rt:
        handle = make_agent(rt)
        set_tier(rt, handle.agent_id, "open")
        async with api_client(rt) as client:
            results = [(await send(client, handle.agent_key, MAIL)).json() for _ in range(3)]
        assert [r["status"] for r in results] == ["queued", "queued", "blocked"]
        assert results[2]["decision"]["codes"] == ["rate_limited"]


async def test_idempotency_keys_are_kept_for_the_ttl_then_forgotten(settings: Settings) -> None:
    clock = FakeClock()
    async with outbound_runtime(settings, clock=clock, idempotency_ttl_hours=24.0) as rt:
        handle = make_agent(rt)
        set_tier(rt, handle.agent_id, "open")
        async with api_client(rt) as client:
            first = await send(client, handle.agent_key, MAIL, idem="daily")
            clock.advance(23 * 3600)
            assert rt.outbound.idempotency.purge_expired(clock.now()) == 0
            replay = await send(client, handle.agent_key, MAIL, idem="daily")
            clock.advance(2 * 3600)
            assert rt.outbound.idempotency.purge_expired(clock.now()) == 1
            fresh = await send(client, handle.agent_key, MAIL, idem="daily")
        assert replay.json()["id"] == first.json()["id"]
        assert fresh.json()["id"] != first.json()["id"]


async def test_the_outbound_log_pages_newest_first_with_its_cursor(
    runtime: Runtime, agent: AgentHandle
) -> None:
    async with api_client(runtime) as client:
        sent = [(await send(client, agent.agent_key, MAIL)).json()["id"] for _ in range(3)]
        headers = {"Authorization": f"Bearer {agent.agent_key}"}
        first = (await client.get("/v1/outbound", params={"limit": 2}, headers=headers)).json()
        rest = await client.get(
            "/v1/outbound", params={"limit": 2, "cursor": first["next_cursor"]}, headers=headers
        )
    assert [o["id"] for o in first["outbound"]] == sent[:0:-1]
    assert rest.status_code == 200, rest.text
    assert [o["id"] for o in rest.json()["outbound"]] == sent[:1]
    assert rest.json()["next_cursor"] is None
