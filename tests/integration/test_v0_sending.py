"""AgentMail-dialect send, reply, reply-all and forward under /v0, through the real app
and the same policy gateway as /v1, on SQLite and PostgreSQL; then the real
``agentmail`` SDK against a running gateway (HTTP + SMTP + delivery worker)."""

from __future__ import annotations

import base64
import smtplib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
import pytest
from agentmail import AgentMail, AgentMailEnvironment
from agentmail.core.api_error import ApiError
from agentmail.messages.errors import MessageRejectedError
from sqlalchemy import select

from mailgate.api.v0.common import public_message_id
from mailgate.config import Settings
from mailgate.runtime import Runtime
from mailgate.store.schema import captured, events, messages, outbound
from mailgate.testing import build_message
from mailgate.testing.gateway import running_gateway
from tests.conftest import AgentHandle, make_agent
from tests.integration.api_support import api_client, auth, deliver, wait_until
from tests.integration.outbound_support import count_outbound, drain, set_tier

pytestmark = pytest.mark.anyio

MAIL = {"to": "alice@example.com", "subject": "Quarterly numbers", "text": "Here they are."}


def _inbox(agent: AgentHandle) -> str:
    return f"/v0/inboxes/{agent.address}"


async def _post(
    client: httpx.AsyncClient, key: str, path: str, body: Any, **headers: str
) -> httpx.Response:
    return await client.post(path, json=body, headers={**auth(key), **headers})


def _copy(runtime: Runtime, message_id: str) -> Any:
    with runtime.db.read() as conn:
        return conn.execute(select(messages).where(messages.c.id == message_id)).one()


def _outbound_rows(runtime: Runtime) -> list[Any]:
    with runtime.db.read() as conn:
        return list(conn.execute(select(outbound).where(outbound.c.agent_id.is_not(None))).all())


async def test_an_open_agent_sends_and_gets_agentmails_message_and_thread_ids(
    runtime: Runtime, agent: AgentHandle
) -> None:
    set_tier(runtime, agent.agent_id, "open")
    async with api_client(runtime) as client:
        r = await _post(client, agent.agent_key, f"{_inbox(agent)}/messages/send", MAIL)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"message_id", "thread_id"}
    [row] = _outbound_rows(runtime)
    assert row.state == "queued"
    assert body["message_id"] == f"<{row.rfc_message_id}>"
    assert body["message_id"] == public_message_id(row.rfc_message_id, row.message_id)
    assert body["thread_id"] == row.thread_id
    assert _copy(runtime, row.message_id).folder == "outbox"
    await drain(runtime)
    with runtime.db.read() as conn:
        [sent] = conn.execute(select(captured)).all()
    assert sent.recipients == ["alice@example.com"]


async def test_labels_given_on_send_are_kept_on_the_agents_copy(
    runtime: Runtime, agent: AgentHandle
) -> None:
    set_tier(runtime, agent.agent_id, "open")
    async with api_client(runtime) as client:
        r = await _post(
            client,
            agent.agent_key,
            f"{_inbox(agent)}/messages/send",
            {**MAIL, "labels": ["campaign", "q3"]},
        )
    assert r.status_code == 200, r.text
    [row] = _outbound_rows(runtime)
    assert _copy(runtime, row.message_id).labels == ["campaign", "q3"]


@pytest.mark.parametrize("label", ["trash", "sent", " ", "x" * 300])
async def test_a_label_the_message_cannot_carry_refuses_the_send_before_anything_is_sent(
    runtime: Runtime, agent: AgentHandle, label: str
) -> None:
    set_tier(runtime, agent.agent_id, "open")
    async with api_client(runtime) as client:
        r = await _post(
            client, agent.agent_key, f"{_inbox(agent)}/messages/send", {**MAIL, "labels": [label]}
        )
    assert r.status_code == 400, r.text
    assert [e["field"] for e in r.json()["errors"]] == ["labels"]
    assert _outbound_rows(runtime) == []


async def test_a_send_blocked_by_the_tier_is_a_403_message_rejected_error_with_the_step_code(
    runtime: Runtime, agent: AgentHandle
) -> None:
    async with api_client(runtime) as client:
        r = await _post(client, agent.agent_key, f"{_inbox(agent)}/messages/send", MAIL)
    assert r.status_code == 403
    body = r.json()
    assert body["name"] == "MessageRejectedError"
    assert body["code"] == "tier"
    assert body["message"]
    [row] = _outbound_rows(runtime)
    assert row.state == "blocked"  # recorded and audited like any decision
    assert await drain(runtime) == []


async def test_a_held_send_answers_the_ids_and_waits_for_approval(
    runtime: Runtime, agent: AgentHandle
) -> None:
    set_tier(runtime, agent.agent_id, "open")
    async with api_client(runtime) as client:
        await _approval_rule(client, agent)
        r = await _post(client, agent.agent_key, f"{_inbox(agent)}/messages/send", MAIL)
        assert r.status_code == 200, r.text
        [row] = _outbound_rows(runtime)
        assert row.state == "pending_approval"
        assert r.json() == {
            "message_id": public_message_id(row.rfc_message_id, row.message_id),
            "thread_id": row.thread_id,
        }
        approved = await _post(
            client, agent.owner_key, f"/v1/outbound/{row.id}/approve", {"comment": "ok"}
        )
        assert approved.status_code == 200, approved.text
    await drain(runtime)
    with runtime.db.read() as conn:
        recipients = [c.recipients for c in conn.execute(select(captured)).all()]
    assert ["alice@example.com"] in recipients


async def test_an_idempotency_key_replays_the_first_send_and_a_reuse_is_a_409_conflict(
    runtime: Runtime, agent: AgentHandle
) -> None:
    set_tier(runtime, agent.agent_id, "open")
    path = f"{_inbox(agent)}/messages/send"
    async with api_client(runtime) as client:
        first = await _post(client, agent.agent_key, path, MAIL, **{"Idempotency-Key": "k-1"})
        again = await _post(client, agent.agent_key, path, MAIL, **{"Idempotency-Key": "k-1"})
        other = await _post(
            client, agent.agent_key, path, {**MAIL, "text": "x"}, **{"Idempotency-Key": "k-1"}
        )
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert other.status_code == 409
    assert other.json()["name"] == "ConflictError"
    assert other.json()["code"] == "idempotency_key_reused"
    assert count_outbound(runtime, agent_id=agent.agent_id) == 1


async def test_sends_without_a_key_are_separate_messages(
    runtime: Runtime, agent: AgentHandle
) -> None:
    set_tier(runtime, agent.agent_id, "open")
    async with api_client(runtime) as client:
        for _ in range(2):
            r = await _post(client, agent.agent_key, f"{_inbox(agent)}/messages/send", MAIL)
            assert r.status_code == 200
    assert count_outbound(runtime, agent_id=agent.agent_id) == 2


async def test_a_reply_by_a_reply_only_agent_joins_the_thread(
    runtime: Runtime, agent: AgentHandle
) -> None:
    stored = deliver(runtime, agent, sender="alice@example.com", subject="Question")
    async with api_client(runtime) as client:
        r = await _post(
            client,
            agent.agent_key,
            f"{_inbox(agent)}/messages/{stored.message_id}/reply",
            {"text": "Answer."},
        )
    assert r.status_code == 200, r.text
    [row] = _outbound_rows(runtime)
    assert row.kind == "reply" and row.state == "queued"
    assert r.json()["thread_id"] == _copy(runtime, stored.message_id).thread_id
    assert row.recipients == ["alice@example.com"]


async def test_reply_all_addresses_everyone_on_the_message(
    runtime: Runtime, agent: AgentHandle
) -> None:
    stored = deliver(
        runtime,
        agent,
        sender="alice@example.com",
        cc="carol@example.com",
        subject="Team question",
    )
    async with api_client(runtime) as client:
        r = await _post(
            client,
            agent.agent_key,
            f"{_inbox(agent)}/messages/{stored.message_id}/reply-all",
            {"text": "Answer to all."},
        )
    assert r.status_code == 200, r.text
    [row] = _outbound_rows(runtime)
    assert sorted(row.recipients) == ["alice@example.com", "carol@example.com"]


async def test_a_reply_only_agent_naming_a_new_recipient_is_rejected_by_its_tier(
    runtime: Runtime, agent: AgentHandle
) -> None:
    stored = deliver(runtime, agent, sender="alice@example.com")
    async with api_client(runtime) as client:
        r = await _post(
            client,
            agent.agent_key,
            f"{_inbox(agent)}/messages/{stored.message_id}/reply",
            {"text": "x", "cc": "mallory@example.com"},
        )
    assert r.status_code == 403, r.text
    assert r.json()["name"] == "MessageRejectedError" and r.json()["code"] == "tier"
    assert "mallory@example.com" in r.json()["message"]
    assert [row.state for row in _outbound_rows(runtime)] == ["blocked"]


async def test_a_reply_goes_to_the_recipients_it_names_when_the_tier_allows(
    runtime: Runtime, agent: AgentHandle
) -> None:
    set_tier(runtime, agent.agent_id, "open")
    stored = deliver(runtime, agent, sender="alice@example.com", subject="Invoice")
    async with api_client(runtime) as client:
        r = await _post(
            client,
            agent.agent_key,
            f"{_inbox(agent)}/messages/{stored.message_id}/reply",
            {
                "text": "Looping in billing.",
                "to": ["Bob <bob@example.com>"],
                "cc": "carol@example.com",
                "bcc": ["dave@example.com"],
                "reply_to": "desk@example.org",
            },
        )
    assert r.status_code == 200, r.text
    [row] = _outbound_rows(runtime)
    assert row.state == "queued" and row.kind == "reply"
    assert sorted(row.recipients) == ["bob@example.com", "carol@example.com", "dave@example.com"]
    copy = _copy(runtime, row.message_id)
    head = runtime.blobs.get(copy.raw_sha256).split(b"\r\n\r\n", 1)[0]
    assert b"To: Bob <bob@example.com>" in head and b"Cc: carol@example.com" in head
    assert b"Reply-To: desk@example.org" in head and b"Bcc" not in head
    assert b"Subject: Re: Invoice" in head
    assert copy.thread_id == _copy(runtime, stored.message_id).thread_id


async def test_a_forward_attaches_the_message_for_new_recipients(
    runtime: Runtime, agent: AgentHandle
) -> None:
    set_tier(runtime, agent.agent_id, "open")
    stored = deliver(runtime, agent, sender="alice@example.com", subject="Invoice")
    async with api_client(runtime) as client:
        r = await _post(
            client,
            agent.agent_key,
            f"{_inbox(agent)}/messages/{stored.message_id}/forward",
            {"to": ["bob@example.com"], "text": "FYI"},
        )
    assert r.status_code == 200, r.text
    [row] = _outbound_rows(runtime)
    assert row.kind == "forward" and row.recipients == ["bob@example.com"]
    assert row.subject == "Fwd: Invoice"


async def test_base64_attachments_are_sent_and_bad_base64_is_a_400_naming_the_field(
    runtime: Runtime, agent: AgentHandle
) -> None:
    set_tier(runtime, agent.agent_id, "open")
    path = f"{_inbox(agent)}/messages/send"
    good = {"filename": "notes.txt", "content": base64.b64encode(b"hello").decode()}
    async with api_client(runtime) as client:
        bad = await _post(
            client,
            agent.agent_key,
            path,
            {**MAIL, "attachments": [good, {"filename": "x.bin", "content": "@@not base64@@"}]},
        )
        ok = await _post(client, agent.agent_key, path, {**MAIL, "attachments": [good]})
    assert bad.status_code == 400
    assert bad.json()["name"] == "ValidationError"
    assert [e["field"] for e in bad.json()["errors"]] == ["attachments[1].content"]
    assert ok.status_code == 200, ok.text
    [row] = _outbound_rows(runtime)
    assert b"aGVsbG8=" in runtime.blobs.get(row.raw_sha256)


async def test_a_url_attachment_is_refused_because_the_gateway_never_fetches_urls(
    runtime: Runtime, agent: AgentHandle
) -> None:
    set_tier(runtime, agent.agent_id, "open")
    async with api_client(runtime) as client:
        r = await _post(
            client,
            agent.agent_key,
            f"{_inbox(agent)}/messages/send",
            {**MAIL, "attachments": [{"filename": "a.pdf", "url": "http://169.254.169.254/"}]},
        )
    assert r.status_code == 400
    assert [e["field"] for e in r.json()["errors"]] == ["attachments[0].url"]
    assert _outbound_rows(runtime) == []


async def test_an_attachment_over_the_limit_is_a_413_and_a_larger_body_is_refused_unread(
    settings: Settings,
) -> None:
    small = Runtime.build(settings.model_copy(update={"v0_max_attachment_bytes": 1000}))
    try:
        agent = make_agent(small, "tiny bot", workspace="tiny")
        set_tier(small, agent.agent_id, "open")
        path = f"{_inbox(agent)}/messages/send"
        big = {"filename": "big.bin", "content": base64.b64encode(b"x" * 1001).decode()}
        async with api_client(small) as client:
            attachment = await _post(client, agent.agent_key, path, {**MAIL, "attachments": [big]})
            body = await client.post(
                path,
                content=b'{"text": "' + b"x" * (2 * 1024 * 1024) + b'"}',
                headers={**auth(agent.agent_key), "Content-Type": "application/json"},
            )
        assert attachment.status_code == 413
        assert attachment.json()["code"] == "message_too_large"
        assert body.status_code == 413
        assert body.json()["code"] == "payload_too_large"
        assert _outbound_rows(small) == []
    finally:
        small.close()


async def test_header_injection_is_a_400_with_code_header_injection(
    runtime: Runtime, agent: AgentHandle
) -> None:
    set_tier(runtime, agent.agent_id, "open")
    async with api_client(runtime) as client:
        r = await _post(
            client,
            agent.agent_key,
            f"{_inbox(agent)}/messages/send",
            {**MAIL, "subject": "hi\r\nBcc: everyone@example.com"},
        )
    assert r.status_code == 400
    assert r.json()["code"] == "header_injection"
    assert _outbound_rows(runtime) == []


async def test_another_agent_cannot_send_from_or_reply_in_an_inbox_it_does_not_own(
    runtime: Runtime, agent: AgentHandle
) -> None:
    stored = deliver(runtime, agent, sender="alice@example.com")
    other = runtime.tenancy.create_agent(agent.workspace_id, "other bot")
    stranger = make_agent(runtime, "stranger bot", workspace="elsewhere")
    async with api_client(runtime) as client:
        for key in (other.api_key, stranger.agent_key, stranger.owner_key):
            send = await _post(client, key, f"{_inbox(agent)}/messages/send", MAIL)
            reply = await _post(
                client, key, f"{_inbox(agent)}/messages/{stored.message_id}/reply", {"text": "x"}
            )
            assert (send.status_code, reply.status_code) == (404, 404)
            assert reply.json()["name"] == "NotFoundError"
        # The other agent's own inbox does not hold agent's message either.
        own = await _post(
            client,
            other.api_key,
            f"/v0/inboxes/{other.address}/messages/{stored.message_id}/reply",
            {"text": "x"},
        )
    assert own.status_code == 404
    assert _outbound_rows(runtime) == []


async def _approval_rule(client: httpx.AsyncClient, agent: AgentHandle) -> None:
    rule = await _post(
        client,
        agent.owner_key,
        "/v1/rules",
        {
            "name": "approve external",
            "agent_id": agent.agent_id,
            "direction": "outbound",
            "action": "require_approval",
            "condition": {"field": "to", "match": "glob", "value": "*@example.com"},
        },
    )
    assert rule.status_code == 201, rule.text


# ------------------------------------------------------------------- the real SDK


@contextmanager
def sdk(gw: Any, key: str) -> Iterator[AgentMail]:
    """AgentMail's client, unmodified, pointed at the gateway (its connections closed
    on exit)."""
    with httpx.Client(timeout=30) as http:
        yield AgentMail(
            api_key=key,
            environment=AgentMailEnvironment(http=gw.http_url, websockets=gw.ws_url),
            httpx_client=http,
        )


def _smtp_deliver(gw: Any, agent: AgentHandle, **headers: Any) -> None:
    raw = build_message(to=agent.address, **headers)
    with smtplib.SMTP(gw.smtp_host, gw.smtp_port, timeout=10) as smtp:
        smtp.sendmail(headers.get("sender", "alice@example.com"), [agent.address], raw)


def _newest_inbound(runtime: Runtime, agent: AgentHandle) -> str:
    with runtime.db.read() as conn:
        return str(
            conn.execute(
                select(messages.c.id)
                .where(messages.c.agent_id == agent.agent_id, messages.c.direction == "inbound")
                .order_by(messages.c.seq.desc())
                .limit(1)
            ).scalar_one()
        )


def _has_inbound(runtime: Runtime, agent: AgentHandle, count: int) -> bool:
    with runtime.db.read() as conn:
        rows = conn.execute(
            select(messages.c.id).where(
                messages.c.agent_id == agent.agent_id, messages.c.direction == "inbound"
            )
        ).all()
    return len(rows) >= count


def _captured_to(runtime: Runtime, address: str) -> bool:
    with runtime.db.read() as conn:
        return any(address in c.recipients for c in conn.execute(select(captured)).all())


@pytest.mark.timeout(120)
async def test_the_agentmail_sdk_replies_forwards_and_sees_a_blocked_send_rejected(
    settings: Settings,
) -> None:
    with ExitStack() as stack:
        gw = stack.enter_context(running_gateway(settings))
        agent = make_agent(gw.runtime, workspace="sdk")
        client = stack.enter_context(sdk(gw, agent.agent_key))
        _smtp_deliver(
            gw, agent, sender="alice@example.com", cc="carol@example.com", subject="Hi there"
        )
        await wait_until(lambda: _has_inbound(gw.runtime, agent, 1))
        original = _newest_inbound(gw.runtime, agent)
        row = _copy(gw.runtime, original)
        public = public_message_id(row.rfc_message_id, original)  # "<...>", as AgentMail
        assert public.startswith("<")

        sent = client.inboxes.messages.reply(agent.address, public, text="Thanks!")
        assert sent.thread_id == _copy(gw.runtime, original).thread_id
        await wait_until(lambda: _captured_to(gw.runtime, "alice@example.com"))

        everyone = client.inboxes.messages.reply_all(agent.address, original, text="All!")
        assert everyone.thread_id == sent.thread_id
        await wait_until(lambda: _captured_to(gw.runtime, "carol@example.com"))

        with pytest.raises(MessageRejectedError) as rejected:
            client.inboxes.messages.send(agent.address, to="dave@example.com", text="hello")
        assert rejected.value.status_code == 403
        assert rejected.value.body.code == "tier"

        set_tier(gw.runtime, agent.agent_id, "open")
        fwd = client.inboxes.messages.forward(
            agent.address, original, to="erin@example.com", text="see below"
        )
        assert fwd.thread_id != sent.thread_id
        await wait_until(lambda: _captured_to(gw.runtime, "erin@example.com"))

        other = make_agent(gw.runtime, "stranger bot", workspace="other")
        stranger = stack.enter_context(sdk(gw, other.agent_key))
        with pytest.raises(ApiError) as hidden:
            stranger.inboxes.messages.reply(agent.address, original, text="x")
        assert hidden.value.status_code == 404
        await wait_until(lambda: _events(gw.runtime).count("outbound.sent") == 3)


def _events(runtime: Runtime) -> list[str]:
    with runtime.db.read() as conn:
        return list(conn.execute(select(events.c.type)).scalars())
