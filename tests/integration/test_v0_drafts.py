"""AgentMail-dialect drafts under /v0: create (client_id idempotent), list, get, edit,
delete and send through the policy gateway, at most once; through the real app on
SQLite and PostgreSQL, then with the real ``agentmail`` SDK against a running gateway."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
import pytest
from agentmail import AgentMail, AgentMailEnvironment
from agentmail.core.api_error import ApiError
from sqlalchemy import func, select

from mailgate.api.v0.common import public_message_id
from mailgate.config import Settings
from mailgate.runtime import Runtime
from mailgate.store.schema import captured, drafts, events, messages, outbound
from mailgate.testing.gateway import running_gateway
from tests.conftest import AgentHandle, make_agent
from tests.integration.api_support import api_client, auth, deliver, wait_until
from tests.integration.outbound_support import count_outbound, drain, set_tier

pytestmark = pytest.mark.anyio

DRAFT = {"to": ["alice@example.com"], "subject": "Quarterly numbers", "text": "Here they are."}


def _drafts(agent: AgentHandle) -> str:
    return f"/v0/inboxes/{agent.address}/drafts"


def _count_drafts(runtime: Runtime) -> int:
    with runtime.db.read() as conn:
        return int(conn.execute(select(func.count()).select_from(drafts)).scalar_one())


def _outbound_rows(runtime: Runtime) -> list[Any]:
    with runtime.db.read() as conn:
        return list(conn.execute(select(outbound).where(outbound.c.agent_id.is_not(None))).all())


def _captured(runtime: Runtime) -> list[list[str]]:
    with runtime.db.read() as conn:
        return [list(c.recipients) for c in conn.execute(select(captured)).all()]


async def _create(client: httpx.AsyncClient, agent: AgentHandle, body: Any) -> dict[str, Any]:
    r = await client.post(_drafts(agent), json=body, headers=auth(agent.agent_key))
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


async def test_a_draft_is_created_read_edited_listed_and_deleted(
    runtime: Runtime, agent: AgentHandle
) -> None:
    headers = auth(agent.agent_key)
    async with api_client(runtime) as client:
        created = await _create(client, agent, {**DRAFT, "labels": ["q3"]})
        draft_id = created["draft_id"]
        assert created["inbox_id"] == agent.address
        assert created["to"] == ["alice@example.com"] and created["labels"] == ["q3"]
        assert created["preview"] == "Here they are." and created["send_status"] is None
        assert {"created_at", "updated_at", "client_id", "text", "html"} <= created.keys()

        edited = await client.patch(
            f"{_drafts(agent)}/{draft_id}",
            json={"subject": "Numbers, revised", "cc": "bob@example.com", "add_labels": ["vip"]},
            headers=headers,
        )
        assert edited.status_code == 200, edited.text
        assert edited.json()["subject"] == "Numbers, revised"
        assert edited.json()["cc"] == ["bob@example.com"]
        assert edited.json()["text"] == "Here they are."  # omitted: kept
        assert edited.json()["labels"] == ["q3", "vip"]

        cleared = await client.patch(
            f"{_drafts(agent)}/{draft_id}", json={"text": None}, headers=headers
        )
        assert cleared.json()["text"] is None

        second = await _create(client, agent, {**DRAFT, "subject": "Other"})
        listed = (await client.get(_drafts(agent), headers=headers)).json()
        # Newest edit first, as AgentMail orders them.
        assert [d["draft_id"] for d in listed["drafts"]] == [second["draft_id"], draft_id]
        assert listed["count"] == 2
        assert "text" not in listed["drafts"][0]  # DraftItem, not Draft
        vip = (
            await client.get(_drafts(agent), params={"labels": '["vip"]'}, headers=headers)
        ).json()
        assert [d["draft_id"] for d in vip["drafts"]] == [draft_id]

        page = (await client.get(_drafts(agent), params={"limit": 1}, headers=headers)).json()
        rest = (
            await client.get(
                _drafts(agent),
                params={"limit": 1, "page_token": page["next_page_token"]},
                headers=headers,
            )
        ).json()
        assert [d["draft_id"] for d in page["drafts"] + rest["drafts"]] == [
            second["draft_id"],
            draft_id,
        ]
        assert "next_page_token" not in rest

        org = (await client.get("/v0/drafts", headers=auth(agent.owner_key))).json()
        assert org["count"] == 2
        one = await client.get(f"/v0/drafts/{draft_id}", headers=headers)
        assert one.json()["draft_id"] == draft_id

        gone = await client.delete(f"{_drafts(agent)}/{draft_id}", headers=headers)
        assert gone.status_code == 204
        missing = await client.get(f"{_drafts(agent)}/{draft_id}", headers=headers)
    assert missing.status_code == 404
    assert missing.json()["name"] == "NotFoundError"
    assert _count_drafts(runtime) == 1


async def test_the_same_client_id_returns_the_existing_draft(
    runtime: Runtime, agent: AgentHandle
) -> None:
    async with api_client(runtime) as client:
        answers = await asyncio.gather(
            *(_create(client, agent, {**DRAFT, "client_id": "c-1"}) for _ in range(4))
        )
    assert len({a["draft_id"] for a in answers}) == 1
    assert answers[0]["client_id"] == "c-1"
    assert _count_drafts(runtime) == 1


async def test_a_sent_draft_is_gone_and_sending_it_again_replays_without_sending_twice(
    runtime: Runtime, agent: AgentHandle
) -> None:
    set_tier(runtime, agent.agent_id, "open")
    headers = auth(agent.agent_key)
    async with api_client(runtime) as client:
        draft = await _create(client, agent, DRAFT)
        path = f"{_drafts(agent)}/{draft['draft_id']}/send"
        first = await client.post(path, json={"add_labels": ["sent-from-draft"]}, headers=headers)
        again = await client.post(path, json={}, headers=headers)
        read = await client.get(f"{_drafts(agent)}/{draft['draft_id']}", headers=headers)
    assert first.status_code == 200, first.text
    [row] = _outbound_rows(runtime)
    assert first.json() == {
        "message_id": public_message_id(row.rfc_message_id, row.message_id),
        "thread_id": row.thread_id,
    }
    assert again.status_code == 200 and again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert read.status_code == 404
    assert _count_drafts(runtime) == 0
    with runtime.db.read() as conn:
        labels = conn.execute(
            select(messages.c.labels).where(messages.c.id == row.message_id)
        ).scalar_one()
    assert labels == ["sent-from-draft"]
    await drain(runtime)
    assert _captured(runtime) == [["alice@example.com"]]


async def test_concurrent_sends_of_one_draft_send_it_once(
    runtime: Runtime, agent: AgentHandle
) -> None:
    set_tier(runtime, agent.agent_id, "open")
    async with api_client(runtime) as client:
        draft = await _create(client, agent, DRAFT)
        path = f"{_drafts(agent)}/{draft['draft_id']}/send"
        answers = await asyncio.gather(
            *(client.post(path, json={}, headers=auth(agent.agent_key)) for _ in range(6))
        )
    statuses = [a.status_code for a in answers]
    assert 200 in statuses and set(statuses) <= {200, 409}, [a.text for a in answers]
    assert len({a.json()["message_id"] for a in answers if a.status_code == 200}) == 1
    assert count_outbound(runtime, agent_id=agent.agent_id) == 1
    assert _count_drafts(runtime) == 0


async def test_a_draft_that_is_not_a_sendable_message_is_kept_as_failed_and_can_be_fixed(
    runtime: Runtime, agent: AgentHandle
) -> None:
    set_tier(runtime, agent.agent_id, "open")
    headers = auth(agent.agent_key)
    async with api_client(runtime) as client:
        draft = await _create(client, agent, {**DRAFT, "to": ["not an address"]})
        base = f"{_drafts(agent)}/{draft['draft_id']}"
        refused = await client.post(f"{base}/send", json={}, headers=headers)
        kept = (await client.get(base, headers=headers)).json()
        await client.patch(base, json={"to": ["alice@example.com"]}, headers=headers)
        sent = await client.post(f"{base}/send", json={}, headers=headers)
    assert refused.status_code == 400
    assert refused.json()["errors"][0]["field"].startswith("to")
    assert kept["send_status"] == "failed"
    assert sent.status_code == 200, sent.text
    assert count_outbound(runtime, agent_id=agent.agent_id) == 1


async def test_a_reply_draft_derives_its_recipients_and_is_sent_as_a_reply_all(
    runtime: Runtime, agent: AgentHandle
) -> None:
    stored = deliver(
        runtime, agent, sender="alice@example.com", cc="carol@example.com", subject="Plans"
    )
    headers = auth(agent.agent_key)
    async with api_client(runtime) as client:
        plain = await _create(client, agent, {"in_reply_to": stored.message_id, "text": "ok"})
        everyone = await _create(
            client, agent, {"in_reply_to": stored.message_id, "reply_all": True, "text": "ok"}
        )
        assert plain["to"] == ["alice@example.com"] and plain["cc"] == []
        assert everyone["cc"] == ["carol@example.com"]
        with runtime.db.read() as conn:
            rfc = conn.execute(
                select(messages.c.rfc_message_id).where(messages.c.id == stored.message_id)
            ).scalar_one()
        assert everyone["in_reply_to"] == public_message_id(rfc, stored.message_id)
        sent = await client.post(
            f"{_drafts(agent)}/{everyone['draft_id']}/send", json={}, headers=headers
        )
    assert sent.status_code == 200, sent.text
    [row] = _outbound_rows(runtime)
    assert row.kind == "reply"
    assert sorted(row.recipients) == ["alice@example.com", "carol@example.com"]


async def test_a_reply_draft_sends_to_what_it_shows_after_an_edit_within_the_tier(
    runtime: Runtime, agent: AgentHandle
) -> None:
    stored = deliver(
        runtime, agent, sender="alice@example.com", cc="carol@example.com", subject="Plans"
    )
    headers = auth(agent.agent_key)
    async with api_client(runtime) as client:
        draft = await _create(
            client,
            agent,
            {"in_reply_to": stored.message_id, "text": "ok", "cc": ["carol@example.com"]},
        )
        assert draft["to"] == ["alice@example.com"] and draft["cc"] == ["carol@example.com"]
        path = f"{_drafts(agent)}/{draft['draft_id']}"
        # A reply_only agent may narrow a reply to a correspondent...
        narrowed = await client.patch(
            path, json={"to": ["carol@example.com"], "cc": []}, headers=headers
        )
        assert narrowed.status_code == 200, narrowed.text
        sent = await client.post(f"{path}/send", json={}, headers=headers)
        assert sent.status_code == 200, sent.text
        # ...but not widen one to a stranger: its tier blocks the send.
        other = await _create(
            client,
            agent,
            {"in_reply_to": stored.message_id, "text": "ok", "bcc": ["eve@example.net"]},
        )
        blocked = await client.post(
            f"{_drafts(agent)}/{other['draft_id']}/send", json={}, headers=headers
        )
    assert blocked.status_code == 403 and blocked.json()["code"] == "tier", blocked.text
    queued = [r for r in _outbound_rows(runtime) if r.state != "blocked"]
    assert [sorted(r.recipients) for r in queued] == [["carol@example.com"]]


async def test_a_forward_draft_is_sent_as_a_forward(runtime: Runtime, agent: AgentHandle) -> None:
    set_tier(runtime, agent.agent_id, "open")
    stored = deliver(runtime, agent, sender="alice@example.com", subject="Invoice")
    async with api_client(runtime) as client:
        draft = await _create(
            client, agent, {"forward_of": stored.message_id, "to": ["bob@example.com"]}
        )
        sent = await client.post(
            f"{_drafts(agent)}/{draft['draft_id']}/send", json={}, headers=auth(agent.agent_key)
        )
    assert sent.status_code == 200, sent.text
    [row] = _outbound_rows(runtime)
    assert (row.kind, row.recipients, row.subject) == (
        "forward",
        ["bob@example.com"],
        "Fwd: Invoice",
    )


async def test_draft_attachments_are_kept_as_blobs_removable_and_sent(
    runtime: Runtime, agent: AgentHandle
) -> None:
    set_tier(runtime, agent.agent_id, "open")
    headers = auth(agent.agent_key)
    files = [
        {"filename": "a.txt", "content": base64.b64encode(b"first file").decode()},
        {"filename": "b.txt", "content": base64.b64encode(b"second file").decode()},
    ]
    async with api_client(runtime) as client:
        draft = await _create(client, agent, {**DRAFT, "attachments": files})
        a, _ = draft["attachments"]
        assert (a["filename"], a["size"], a["content_type"]) == ("a.txt", 10, "text/plain")
        edited = await client.patch(
            f"{_drafts(agent)}/{draft['draft_id']}",
            json={"remove_attachments": [a["attachment_id"]]},
            headers=headers,
        )
        assert [x["filename"] for x in edited.json()["attachments"]] == ["b.txt"]
        sent = await client.post(
            f"{_drafts(agent)}/{draft['draft_id']}/send", json={}, headers=headers
        )
    assert sent.status_code == 200, sent.text
    [row] = _outbound_rows(runtime)
    raw = runtime.blobs.get(row.raw_sha256)
    assert base64.b64encode(b"second file") in raw
    assert base64.b64encode(b"first file") not in raw


async def test_a_draft_attachment_is_downloaded_through_its_signed_link_while_the_draft_lives(
    runtime: Runtime, agent: AgentHandle
) -> None:
    headers = auth(agent.agent_key)
    files = [{"filename": "plan.pdf", "content_type": "application/pdf",
              "content": base64.b64encode(b"%PDF-1.4 plan").decode()}]  # fmt: skip
    other = make_agent(runtime, "other", workspace="acme")
    async with api_client(runtime) as client:
        draft = await _create(client, agent, {**DRAFT, "attachments": files})
        [listed] = draft["attachments"]
        path = f"{draft['draft_id']}/attachments/{listed['attachment_id']}"
        in_inbox = await client.get(f"{_drafts(agent)}/{path}", headers=headers)
        anywhere = await client.get(f"/v0/drafts/{path}", headers=headers)
        stranger = await client.get(f"/v0/drafts/{path}", headers=auth(other.agent_key))
        meta = in_inbox.json()
        link = httpx.URL(meta["download_url"])
        local = f"{link.path}?{link.query.decode()}"
        fetched = await client.get(local)  # no key: the signature is the credential
        forged = await client.get(local.replace("signature=", "signature=x"))
        await client.delete(f"{_drafts(agent)}/{draft['draft_id']}", headers=headers)
        after_delete = await client.get(local)

    assert in_inbox.status_code == 200, in_inbox.text
    assert anywhere.json()["download_url"].split("?")[0] == meta["download_url"].split("?")[0]
    assert (meta["filename"], meta["size"], meta["content_type"]) == (
        "plan.pdf",
        13,
        "application/pdf",
    )
    assert meta["expires_at"] and link.path.endswith(f"{path}/download")
    assert stranger.status_code == 404
    assert fetched.status_code == 200 and fetched.content == b"%PDF-1.4 plan"
    assert fetched.headers["content-type"] == "application/pdf"
    assert fetched.headers["x-content-type-options"] == "nosniff"
    assert forged.status_code == 404 and after_delete.status_code == 404


async def test_a_blocked_draft_send_is_a_403_message_rejected_error(
    runtime: Runtime, agent: AgentHandle
) -> None:
    async with api_client(runtime) as client:
        draft = await _create(client, agent, DRAFT)
        r = await client.post(
            f"{_drafts(agent)}/{draft['draft_id']}/send", json={}, headers=auth(agent.agent_key)
        )
    assert r.status_code == 403
    assert (r.json()["name"], r.json()["code"]) == ("MessageRejectedError", "tier")


async def test_bad_draft_input_is_refused_with_a_clear_code_and_writes_nothing(
    runtime: Runtime, agent: AgentHandle
) -> None:
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({**DRAFT, "subject": "hi\nBcc: all@example.com"}, 400, "header_injection"),
        ({**DRAFT, "attachments": [{"filename": "x", "content": "%%%"}]}, 400, "validation_failed"),
        ({**DRAFT, "attachments": [{"url": "http://10.0.0.1/secret"}]}, 400, "validation_failed"),
        ({**DRAFT, "send_at": "2030-01-01T00:00:00Z"}, 501, "not_implemented"),
        ({**DRAFT, "in_reply_to": "msg_nope"}, 404, "not_found"),
    ]
    async with api_client(runtime) as client:
        for body, status, code in cases:
            r = await client.post(_drafts(agent), json=body, headers=auth(agent.agent_key))
            assert (r.status_code, r.json()["code"]) == (status, code), r.text
    assert _count_drafts(runtime) == 0


async def test_drafts_are_invisible_to_other_agents_and_other_workspaces(
    runtime: Runtime, agent: AgentHandle
) -> None:
    other = runtime.tenancy.create_agent(agent.workspace_id, "other bot")
    stranger = make_agent(runtime, "stranger bot", workspace="elsewhere")
    async with api_client(runtime) as client:
        draft = await _create(client, agent, DRAFT)
        base = f"{_drafts(agent)}/{draft['draft_id']}"
        for key in (other.api_key, stranger.agent_key, stranger.owner_key):
            answers = [
                await client.get(base, headers=auth(key)),
                await client.patch(base, json={"subject": "x"}, headers=auth(key)),
                await client.post(f"{base}/send", json={}, headers=auth(key)),
                await client.delete(base, headers=auth(key)),
                await client.get(f"/v0/drafts/{draft['draft_id']}", headers=auth(key)),
            ]
            assert [a.status_code for a in answers] == [404] * 5
            listed = (await client.get("/v0/drafts", headers=auth(key))).json()
            assert listed["drafts"] == []
        # An agent's own inbox path does not reach another agent's draft either.
        own = await client.get(
            f"/v0/inboxes/{other.address}/drafts/{draft['draft_id']}", headers=auth(other.api_key)
        )
    assert own.status_code == 404
    assert _count_drafts(runtime) == 1
    assert _outbound_rows(runtime) == []


# ------------------------------------------------------------------- the real SDK


@contextmanager
def sdk(gw: Any, key: str) -> Iterator[AgentMail]:
    with httpx.Client(timeout=30) as http:
        yield AgentMail(
            api_key=key,
            environment=AgentMailEnvironment(http=gw.http_url, websockets=gw.ws_url),
            httpx_client=http,
        )


def _events(runtime: Runtime) -> list[str]:
    with runtime.db.read() as conn:
        return list(conn.execute(select(events.c.type)).scalars())


@pytest.mark.timeout(120)
async def test_the_agentmail_sdk_drafts_a_message_the_owner_approves_and_it_is_sent_once(
    settings: Settings,
) -> None:
    with ExitStack() as stack:
        gw = stack.enter_context(running_gateway(settings))
        runtime = gw.runtime
        agent = make_agent(runtime, workspace="sdk")
        set_tier(runtime, agent.agent_id, "open")
        client = stack.enter_context(sdk(gw, agent.agent_key))
        http = stack.enter_context(httpx.Client(base_url=gw.http_url, timeout=30))
        rule = http.post(
            "/v1/rules",
            json={
                "name": "approve external",
                "agent_id": agent.agent_id,
                "direction": "outbound",
                "action": "require_approval",
                "condition": {"field": "to", "match": "glob", "value": "*@example.com"},
            },
            headers=auth(agent.owner_key),
        )
        assert rule.status_code == 201, rule.text

        draft = client.inboxes.drafts.create(
            agent.address, to=["alice@example.com"], subject="Hello", text="Draft", client_id="d1"
        )
        same = client.inboxes.drafts.create(agent.address, to=["x@example.com"], client_id="d1")
        assert same.draft_id == draft.draft_id
        updated = client.inboxes.drafts.update(
            agent.address, draft.draft_id, text="Final words", add_labels=["ready"]
        )
        assert updated.text == "Final words" and updated.labels == ["ready"]
        listed = client.inboxes.drafts.list(agent.address)
        assert [d.draft_id for d in listed.drafts] == [draft.draft_id]
        assert client.drafts.get(draft.draft_id).subject == "Hello"

        sent = client.inboxes.drafts.send(agent.address, draft.draft_id)
        again = client.inboxes.drafts.send(agent.address, draft.draft_id)
        assert again.message_id == sent.message_id
        [held] = _outbound_rows(runtime)
        assert held.state == "pending_approval"
        assert sent.message_id == public_message_id(held.rfc_message_id, held.message_id)
        with pytest.raises(ApiError) as gone:
            client.inboxes.drafts.get(agent.address, draft.draft_id)
        assert gone.value.status_code == 404

        approved = http.post(f"/v1/outbound/{held.id}/approve", headers=auth(agent.owner_key))
        assert approved.status_code == 200, approved.text
        await wait_until(lambda: ["alice@example.com"] in _captured(runtime))
        await wait_until(lambda: "outbound.sent" in _events(runtime))
        assert count_outbound(runtime, agent_id=agent.agent_id) == 1

        stranger = make_agent(runtime, "stranger bot", workspace="other")
        other = stack.enter_context(sdk(gw, stranger.agent_key))
        mine = client.inboxes.drafts.create(
            agent.address,
            to=["bob@example.com"],
            attachments=[{"filename": "n.txt", "content": base64.b64encode(b"notes").decode()}],
        )
        with pytest.raises(ApiError) as hidden:
            other.drafts.get(mine.draft_id)
        assert hidden.value.status_code == 404
        [kept] = mine.attachments or []
        meta = client.inboxes.drafts.get_attachment(
            agent.address, mine.draft_id, kept.attachment_id
        )
        assert (meta.filename, meta.size) == ("n.txt", 5)
        assert http.get(meta.download_url).content == b"notes"
