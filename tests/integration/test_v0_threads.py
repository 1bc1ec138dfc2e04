"""/v0 threads (per inbox and across inboxes) through the real app on both databases,
and with AgentMail's own SDK against a running gateway."""

from __future__ import annotations

import json
import smtplib
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from agentmail import AgentMail, AgentMailEnvironment
from agentmail.core.api_error import ApiError

from mailgate.config import Settings
from mailgate.runtime import Runtime
from mailgate.testing import build_message
from mailgate.testing.gateway import running_gateway
from tests.conftest import AgentHandle, make_agent
from tests.integration.api_support import api_client, auth, deliver

pytestmark = pytest.mark.anyio

WAIT = 20.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _conversation(runtime: Runtime, agent: AgentHandle) -> str:
    """A two-message thread (the reply carries a file) and one unrelated message."""
    first = deliver(runtime, agent, subject="Plan", message_id="<p1@example.com>")
    deliver(
        runtime,
        agent,
        subject="Re: Plan",
        message_id="<p2@example.com>",
        in_reply_to="<p1@example.com>",
        references=["<p1@example.com>"],
        sender="Bob <bob@example.com>",
        attachments=[("plan.txt", "text/plain", b"step 1")],
    )
    deliver(runtime, agent, subject="Other", message_id="<o@example.com>")
    return first.thread_id


async def test_threads_list_newest_activity_first_with_agentmail_fields(
    runtime: Runtime, agent: AgentHandle
) -> None:
    thread_id = _conversation(runtime, agent)
    async with api_client(runtime) as client:
        response = await client.get(
            f"/v0/inboxes/{agent.address}/threads", headers=auth(agent.agent_key)
        )
        org = await client.get("/v0/threads", headers=auth(agent.owner_key))
    body = response.json()
    assert body["count"] == 2
    plan = next(t for t in body["threads"] if t["thread_id"] == thread_id)
    assert plan["message_count"] == 2 and plan["inbox_id"] == agent.address
    assert plan["senders"] == ["Alice Example <alice@example.com>", "Bob <bob@example.com>"]
    assert plan["recipients"] == [agent.address]
    assert plan["labels"] == ["received", "unread"]
    assert plan["last_message_id"] == "<p2@example.com>"
    assert [a["filename"] for a in plan["attachments"]] == ["plan.txt"]
    assert plan["timestamp"].endswith("Z") and plan["received_timestamp"].endswith("Z")
    assert {t["thread_id"] for t in org.json()["threads"]} == {
        t["thread_id"] for t in body["threads"]
    }


async def test_thread_filters_and_page_tokens(runtime: Runtime, agent: AgentHandle) -> None:
    thread_id = _conversation(runtime, agent)
    async with api_client(runtime) as client:
        headers = auth(agent.agent_key)
        base = f"/v0/inboxes/{agent.address}/threads"
        by_sender = await client.get(
            base, params={"senders": json.dumps(["bob@"])}, headers=headers
        )
        first = await client.get(base, params={"limit": 1}, headers=headers)
        token = first.json()["next_page_token"]
        second = await client.get(base, params={"limit": 1, "page_token": token}, headers=headers)
        await client.patch(
            f"/v0/inboxes/{agent.address}/messages/<o@example.com>",
            json={"add_labels": ["done"]},
            headers=headers,
        )
        labelled = await client.get(base, params={"labels": json.dumps(["done"])}, headers=headers)
    assert [t["thread_id"] for t in by_sender.json()["threads"]] == [thread_id]
    assert first.json()["count"] == 1 and second.json()["next_page_token"] is None
    walked = {first.json()["threads"][0]["thread_id"], second.json()["threads"][0]["thread_id"]}
    assert len(walked) == 2
    assert [t["subject"] for t in labelled.json()["threads"]] == ["Other"]


async def test_a_thread_holds_its_messages_in_pages_newest_first_oldest_first_within(
    runtime: Runtime, agent: AgentHandle
) -> None:
    thread_id = _conversation(runtime, agent)
    async with api_client(runtime) as client:
        headers = auth(agent.agent_key)
        full = await client.get(f"/v0/inboxes/{agent.address}/threads/{thread_id}", headers=headers)
        page = await client.get(f"/v0/threads/{thread_id}", params={"limit": 1}, headers=headers)
        older = await client.get(
            f"/v0/threads/{thread_id}",
            params={"limit": 1, "page_token": page.json()["next_page_token"]},
            headers=headers,
        )
        attachment_id = full.json()["attachments"][0]["attachment_id"]
        by_inbox = await client.get(
            f"/v0/inboxes/{agent.address}/threads/{thread_id}/attachments/{attachment_id}",
            headers=headers,
        )
        by_org = await client.get(
            f"/v0/threads/{thread_id}/attachments/{attachment_id}", headers=headers
        )
        link = urlsplit(by_org.json()["download_url"])
        download = await client.get(f"{link.path}?{link.query}")
    assert [m["subject"] for m in full.json()["messages"]] == ["Plan", "Re: Plan"]
    assert full.json()["messages"][1]["in_reply_to"] == "<p1@example.com>"
    assert [m["subject"] for m in page.json()["messages"]] == ["Re: Plan"]
    assert [m["subject"] for m in older.json()["messages"]] == ["Plan"]
    assert older.json()["next_page_token"] is None
    assert by_inbox.status_code == 200 and by_inbox.json()["filename"] == "plan.txt"
    assert by_org.json()["attachment_id"] == attachment_id
    assert download.status_code == 200 and download.content == b"step 1"


async def test_other_agents_and_other_workspaces_get_404_on_every_thread_route(
    runtime: Runtime, agent: AgentHandle
) -> None:
    thread_id = _conversation(runtime, agent)
    sibling = runtime.tenancy.create_agent(agent.workspace_id, "sibling")
    stranger = make_agent(runtime, "stranger", workspace="other")
    async with api_client(runtime) as client:
        full = await client.get(f"/v0/threads/{thread_id}", headers=auth(agent.agent_key))
        attachment_id = full.json()["attachments"][0]["attachment_id"]
        inbox = f"/v0/inboxes/{agent.address}"
        for key in (sibling.api_key, stranger.owner_key, stranger.agent_key):
            for path in (
                f"{inbox}/threads",
                f"{inbox}/threads/{thread_id}",
                f"{inbox}/threads/{thread_id}/attachments/{attachment_id}",
                f"/v0/threads/{thread_id}",
                f"/v0/threads/{thread_id}/attachments/{attachment_id}",
            ):
                response = await client.get(path, headers=auth(key))
                assert response.status_code == 404, (path, response.text)
            listed = await client.get("/v0/threads", headers=auth(key))
            assert listed.json()["count"] == 0


@pytest.mark.timeout(120)
def test_the_agentmail_sdk_lists_and_reads_threads_of_mail_sent_over_smtp(
    settings: Settings,
) -> None:
    with running_gateway(settings) as gw, httpx.Client(timeout=WAIT) as http:
        handle = make_agent(gw.runtime, "sdk bot", workspace="sdk")
        other = make_agent(gw.runtime, "other", workspace="elsewhere")
        with smtplib.SMTP(gw.smtp_host, gw.smtp_port, timeout=WAIT) as smtp:
            smtp.sendmail(
                "alice@example.com",
                [handle.address],
                build_message(to=handle.address, subject="Kickoff", message_id="<k1@example.com>"),
            )
            smtp.sendmail(
                "alice@example.com",
                [handle.address],
                build_message(
                    to=handle.address,
                    subject="Re: Kickoff",
                    message_id="<k2@example.com>",
                    in_reply_to="<k1@example.com>",
                    attachments=[("notes.txt", "text/plain", b"agenda")],
                ),
            )
        env = AgentMailEnvironment(http=gw.http_url, websockets=gw.ws_url)
        client = AgentMail(api_key=handle.agent_key, environment=env, httpx_client=http)
        inbox = handle.address

        deadline = time.monotonic() + WAIT
        while client.inboxes.messages.list(inbox).count < 2:
            assert time.monotonic() < deadline, "mail did not arrive"
            time.sleep(0.02)

        threads = client.inboxes.threads.list(inbox)
        assert threads.count == 1 and threads.threads[0].message_count == 2
        thread_id = threads.threads[0].thread_id
        thread = client.inboxes.threads.get(inbox, thread_id)
        assert [m.subject for m in thread.messages] == ["Kickoff", "Re: Kickoff"]
        assert client.threads.get(thread_id).message_count == 2
        assert [t.thread_id for t in client.threads.list().threads] == [thread_id]
        [meta] = thread.attachments or []
        attachment = client.threads.get_attachment(thread_id, meta.attachment_id)
        assert http.get(attachment.download_url).content == b"agenda"
        same = client.inboxes.threads.get_attachment(inbox, thread_id, meta.attachment_id)
        assert http.get(same.download_url).content == b"agenda"

        stranger = AgentMail(api_key=other.owner_key, environment=env, httpx_client=http)
        calls: list[Any] = [
            lambda: stranger.inboxes.threads.list(inbox),
            lambda: stranger.inboxes.threads.get(inbox, thread_id),
            lambda: stranger.threads.get(thread_id),
            lambda: stranger.threads.get_attachment(thread_id, meta.attachment_id),
        ]
        for call in calls:
            with pytest.raises(ApiError) as caught:
                call()
            assert caught.value.status_code == 404
        assert stranger.threads.list().count == 0
