"""/v0 messages through the real app on both databases, and with AgentMail's own SDK
against a running gateway (mail arriving over real SMTP)."""

from __future__ import annotations

import json
import smtplib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from agentmail import AgentMail, AgentMailEnvironment
from agentmail.core.api_error import ApiError

from mailgate.clock import FakeClock
from mailgate.config import Settings
from mailgate.runtime import Runtime
from mailgate.services.links import LinkSigner
from mailgate.store.schema import attachments
from mailgate.testing import build_message
from mailgate.testing.gateway import running_gateway
from tests.conftest import AgentHandle, make_agent
from tests.integration.api_support import api_client, auth, deliver

pytestmark = pytest.mark.anyio

WAIT = 20.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


PDF = b"%PDF-1.4 not really a pdf \x00\x01\x02"


def _inbox(agent: AgentHandle) -> str:
    return f"/v0/inboxes/{agent.address}"


def _local(url: str) -> str:
    """The path and query of a link the gateway handed out (the app runs in process)."""
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


async def _list(client: httpx.AsyncClient, agent: AgentHandle, **params: Any) -> dict[str, Any]:
    response = await client.get(
        f"{_inbox(agent)}/messages", params=params, headers=auth(agent.agent_key)
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_a_listing_shows_received_unread_mail_newest_first_in_agentmail_shape(
    runtime: Runtime, agent: AgentHandle
) -> None:
    first = deliver(runtime, agent, subject="first", message_id="<one@example.com>")
    deliver(runtime, agent, subject="second", cc="Bob <bob@example.com>")
    async with api_client(runtime) as client:
        body = await _list(client, agent)
    assert body["count"] == 2 and body["limit"] == 10 and body["next_page_token"] is None
    newest, oldest = body["messages"]
    assert [newest["subject"], oldest["subject"]] == ["second", "first"]
    assert oldest["message_id"] == "<one@example.com>"
    assert oldest["thread_id"] == first.thread_id
    assert oldest["inbox_id"] == agent.address
    assert oldest["labels"] == ["received", "unread"]
    assert oldest["from"] == "Alice Example <alice@example.com>"
    assert oldest["to"] == [agent.address]
    assert newest["cc"] == ["Bob <bob@example.com>"]
    assert oldest["timestamp"].endswith("Z") and oldest["created_at"].endswith("Z")
    assert "text" not in oldest  # a MessageItem, not a Message


async def test_marking_read_and_custom_labels_are_filtered_in_sql(
    runtime: Runtime, agent: AgentHandle
) -> None:
    deliver(runtime, agent, subject="a", message_id="<a@example.com>")
    deliver(runtime, agent, subject="b", message_id="<b@example.com>")
    async with api_client(runtime) as client:
        patched = await client.patch(
            f"{_inbox(agent)}/messages/<a@example.com>",
            json={"remove_labels": ["unread"], "add_labels": "vip"},
            headers=auth(agent.agent_key),
        )
        assert patched.status_code == 200, patched.text
        assert patched.json() == {
            "message_id": "<a@example.com>",
            "labels": ["received", "vip"],
        }
        unread = await _list(client, agent, labels=json.dumps(["unread"]))
        vip = await _list(client, agent, labels=json.dumps(["vip", "received"]))
        read = await _list(client, agent, labels=json.dumps(["read"]))
        # "read" is unread's opposite: adding it marks the message read again.
        again = await client.patch(
            f"{_inbox(agent)}/messages/<b@example.com>",
            json={"add_labels": ["read"]},
            headers=auth(agent.agent_key),
        )
    assert [m["subject"] for m in unread["messages"]] == ["b"]
    assert [m["subject"] for m in vip["messages"]] == ["a"]
    assert [m["subject"] for m in read["messages"]] == ["a"]
    assert again.json()["labels"] == ["received"]


async def test_system_labels_cannot_be_set_and_nothing_is_written(
    runtime: Runtime, agent: AgentHandle
) -> None:
    deliver(runtime, agent, message_id="<s@example.com>")
    async with api_client(runtime) as client:
        for body in (
            {"add_labels": ["sent"]},
            {"remove_labels": ["received"]},
            {"remove_labels": "trash"},
            {"add_labels": [""]},
            {"add_labels": ["x"], "remove_labels": ["x"]},
        ):
            response = await client.patch(
                f"{_inbox(agent)}/messages/<s@example.com>",
                json=body,
                headers=auth(agent.agent_key),
            )
            assert response.status_code == 400, body
            assert response.json()["name"] == "ValidationError"
            assert response.json()["code"] == "validation_failed"
        got = await client.get(
            f"{_inbox(agent)}/messages/<s@example.com>", headers=auth(agent.agent_key)
        )
    assert got.json()["labels"] == ["received", "unread"]


async def test_page_tokens_walk_every_message_once_in_both_orders(
    runtime: Runtime, agent: AgentHandle
) -> None:
    for n in range(5):
        deliver(runtime, agent, subject=f"m{n}")
    async with api_client(runtime) as client:
        for ascending, expected in ((False, ["m4", "m3", "m2", "m1", "m0"]),
                                    (True, ["m0", "m1", "m2", "m3", "m4"])):  # fmt: skip
            seen: list[str] = []
            token: str | None = None
            while True:
                params: dict[str, Any] = {"limit": 2, "ascending": str(ascending).lower()}
                if token:
                    params["page_token"] = token
                page = await _list(client, agent, **params)
                seen += [m["subject"] for m in page["messages"]]
                token = page["next_page_token"]
                if token is None:
                    break
            assert seen == expected
        bad = await client.get(
            f"{_inbox(agent)}/messages",
            params={"page_token": "garbage"},
            headers=auth(agent.agent_key),
        )
    assert bad.status_code == 400 and bad.json()["code"] == "validation_failed"


async def test_before_after_and_substring_filters_narrow_the_listing(
    runtime: Runtime, agent: AgentHandle
) -> None:
    deliver(runtime, agent, subject="Invoice 42", sender="Billing <billing@vendor.example>")
    deliver(runtime, agent, subject="Lunch?", cc="carol@example.com")
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    async with api_client(runtime) as client:
        assert (await _list(client, agent, before=past))["count"] == 0
        assert (await _list(client, agent, after=future))["count"] == 0
        assert (await _list(client, agent, after=past, before=future))["count"] == 2
        by_from = await _list(client, agent, **{"from": json.dumps(["VENDOR.example"])})
        by_subject = await _list(client, agent, subject=json.dumps(["lunch"]))
        by_to = await _list(client, agent, to=json.dumps(["carol@"]))
    assert [m["subject"] for m in by_from["messages"]] == ["Invoice 42"]
    assert [m["subject"] for m in by_subject["messages"]] == ["Lunch?"]
    assert [m["subject"] for m in by_to["messages"]] == ["Lunch?"]


async def test_trashed_mail_is_listed_only_when_asked_for(
    runtime: Runtime, agent: AgentHandle
) -> None:
    stored = deliver(runtime, agent, subject="bin me")
    deliver(runtime, agent, subject="keep")
    async with api_client(runtime) as client:
        trashed = await client.post(
            f"/v1/messages/{stored.message_id}/trash", headers=auth(agent.agent_key)
        )
        assert trashed.status_code == 200, trashed.text
        default = await _list(client, agent)
        included = await _list(client, agent, include_trash="true")
        by_label = await _list(client, agent, labels=json.dumps(["trash"]))
    assert [m["subject"] for m in default["messages"]] == ["keep"]
    assert [m["subject"] for m in included["messages"]] == ["keep", "bin me"]
    assert by_label["messages"][0]["labels"] == ["received", "trash", "unread"]


async def test_a_message_id_that_cannot_travel_in_a_path_is_reached_by_its_alias(
    runtime: Runtime, agent: AgentHandle
) -> None:
    stored = deliver(runtime, agent, message_id="<a/b+c@example.com>")
    async with api_client(runtime) as client:
        listed = await _list(client, agent)
        alias = listed["messages"][0]["message_id"]
        got = await client.get(f"{_inbox(agent)}/messages/{alias}", headers=auth(agent.agent_key))
    assert alias == stored.message_id and alias.startswith("msg_")
    assert got.status_code == 200 and got.json()["message_id"] == alias


async def test_a_message_has_bodies_extracted_reply_and_attachments_that_download(
    runtime: Runtime, agent: AgentHandle
) -> None:
    body = "Yes, Thursday works.\n\nOn Mon, Bob wrote:\n> Can we meet?\n> Thanks\n"
    deliver(
        runtime,
        agent,
        message_id="<att@example.com>",
        body=body,
        attachments=[('quote"d/..\\name.pdf', "application/pdf", PDF)],
    )
    async with api_client(runtime) as client:
        got = await client.get(
            f"{_inbox(agent)}/messages/<att@example.com>", headers=auth(agent.agent_key)
        )
        message = got.json()
        [meta] = message["attachments"]
        url = f"{_inbox(agent)}/messages/<att@example.com>/attachments/{meta['attachment_id']}"
        attachment = (await client.get(url, headers=auth(agent.agent_key))).json()
        download = await client.get(_local(attachment["download_url"]))
        tampered = await client.get(_local(attachment["download_url"]).replace("=", "=x", 1))
        other_id = attachment["download_url"].replace(meta["attachment_id"], "att_nothere")
        swapped = await client.get(_local(other_id))
    assert message["text"] == body.replace("\n", "\r\n") or message["text"] == body
    assert (
        "Thursday" in message["extracted_text"] and "Can we meet" not in message["extracted_text"]
    )
    assert meta["content_type"] == "application/pdf" and meta["size"] == len(PDF)
    assert attachment["expires_at"].endswith("Z") and attachment["text_url"]
    assert download.status_code == 200 and download.content == PDF
    assert download.headers["content-type"] == "application/pdf"
    assert download.headers["x-content-type-options"] == "nosniff"
    disposition = download.headers["content-disposition"]
    assert disposition.startswith("attachment; ") and "/" not in disposition.split("filename*")[0]
    assert tampered.status_code == 404 and swapped.status_code == 404
    assert tampered.json()["name"] == "NotFoundError"


async def test_an_expired_link_is_refused(runtime: Runtime, agent: AgentHandle) -> None:
    stored = deliver(runtime, agent, attachments=[("a.bin", "application/octet-stream", b"x")])
    with runtime.db.read() as conn:
        attachment_id = (
            conn.execute(attachments.select().where(attachments.c.message_id == stored.message_id))
            .one()
            .id
        )
    yesterday = FakeClock(datetime.now(UTC) - timedelta(days=1))
    old = LinkSigner(runtime.settings, yesterday).sign(
        "attachment", attachment_id, f"/v0/attachments/{attachment_id}/download"
    )
    fresh = LinkSigner(runtime.settings).sign(
        "attachment", attachment_id, f"/v0/attachments/{attachment_id}/download"
    )
    async with api_client(runtime) as client:
        expired = await client.get(_local(old.url))
        valid = await client.get(_local(fresh.url))
    assert expired.status_code == 404 and expired.json()["code"] == "not_found"
    assert valid.status_code == 200 and valid.content == b"x"


async def test_raw_gives_a_link_to_the_bytes_as_received(
    runtime: Runtime, agent: AgentHandle
) -> None:
    raw = build_message(to=agent.address, message_id="<raw@example.com>", subject="raw")
    stored = deliver(runtime, agent, raw=raw)
    async with api_client(runtime) as client:
        got = await client.get(
            f"{_inbox(agent)}/messages/<raw@example.com>/raw", headers=auth(agent.agent_key)
        )
        link = got.json()
        fetched = await client.get(_local(link["download_url"]))
    stored_bytes = runtime.queries.get_raw(_owner(runtime, agent), stored.message_id)
    assert link["message_id"] == "<raw@example.com>" and link["size"] == len(stored_bytes)
    assert fetched.status_code == 200 and fetched.content == stored_bytes
    assert fetched.headers["content-type"] == "message/rfc822"


def _owner(runtime: Runtime, agent: AgentHandle) -> Any:
    return runtime.tenancy.authenticate(agent.owner_key)


async def test_other_agents_and_other_workspaces_get_404_on_every_message_route(
    runtime: Runtime, agent: AgentHandle
) -> None:
    deliver(
        runtime,
        agent,
        message_id="<mine@example.com>",
        attachments=[("a.txt", "text/plain", b"hi")],
    )
    sibling = runtime.tenancy.create_agent(agent.workspace_id, "sibling")
    stranger = make_agent(runtime, "stranger", workspace="other")
    async with api_client(runtime) as client:
        got = await client.get(
            f"{_inbox(agent)}/messages/<mine@example.com>", headers=auth(agent.agent_key)
        )
        attachment_id = got.json()["attachments"][0]["attachment_id"]
        base = f"{_inbox(agent)}/messages/<mine@example.com>"
        for key in (sibling.api_key, stranger.owner_key, stranger.agent_key):
            for method, path, body in (
                ("GET", f"{_inbox(agent)}/messages", None),
                ("GET", base, None),
                ("PATCH", base, {"add_labels": ["x"]}),
                ("GET", f"{base}/raw", None),
                ("GET", f"{base}/attachments/{attachment_id}", None),
            ):
                response = await client.request(method, path, json=body, headers=auth(key))
                assert response.status_code == 404, (method, path, response.text)
                assert response.json()["name"] == "NotFoundError"
        # The owner of the inbox's own workspace sees it.
        owned = await client.get(base, headers=auth(agent.owner_key))
    assert owned.status_code == 200
    assert owned.json()["labels"] == ["received", "unread"]


# -- AgentMail's own SDK against a running gateway ------------------------------------------


def _sdk(http_url: str, ws_url: str, key: str, http: httpx.Client) -> AgentMail:
    return AgentMail(
        api_key=key,
        environment=AgentMailEnvironment(http=http_url, websockets=ws_url),
        httpx_client=http,
    )


@pytest.mark.timeout(120)
def test_the_agentmail_sdk_lists_reads_labels_and_downloads_mail_sent_over_smtp(
    settings: Settings,
) -> None:
    with running_gateway(settings) as gw, httpx.Client(timeout=WAIT) as http:
        handle = make_agent(gw.runtime, "sdk bot", workspace="sdk")
        other = make_agent(gw.runtime, "other bot", workspace="elsewhere")
        first = build_message(to=handle.address, subject="hello 1", message_id="<s1@example.com>")
        second = build_message(
            to=handle.address,
            subject="hello 2",
            message_id="<dir/s2@example.com>",
            attachments=[("report.pdf", "application/pdf", PDF)],
        )
        with smtplib.SMTP(gw.smtp_host, gw.smtp_port, timeout=WAIT) as smtp:
            smtp.sendmail("alice@example.com", [handle.address], first)
            smtp.sendmail("alice@example.com", [handle.address], second)
        client = _sdk(gw.http_url, gw.ws_url, handle.agent_key, http)
        inbox = handle.address

        def arrived() -> bool:
            return bool(client.inboxes.messages.list(inbox).count == 2)

        _wait(arrived)
        listed = client.inboxes.messages.list(inbox, limit=1)
        assert listed.count == 1 and listed.next_page_token
        older = client.inboxes.messages.list(inbox, limit=1, page_token=listed.next_page_token)
        assert [listed.messages[0].subject, older.messages[0].subject] == ["hello 2", "hello 1"]
        ascending = client.inboxes.messages.list(inbox, ascending=True)
        assert [m.subject for m in ascending.messages] == ["hello 1", "hello 2"]
        cutoff = datetime.now(UTC) + timedelta(minutes=5)
        assert client.inboxes.messages.list(inbox, before=cutoff).count == 2
        assert client.inboxes.messages.list(inbox, after=cutoff).count == 0

        # The Message-ID holding "/" is shown (and reached) by its alias.
        alias = listed.messages[0].message_id
        assert alias.startswith("msg_")
        message = client.inboxes.messages.get(inbox, alias)
        assert message.subject == "hello 2" and message.from_ == "Alice Example <alice@example.com>"

        updated = client.inboxes.messages.update(
            inbox, "<s1@example.com>", remove_labels=["unread"]
        )
        assert "unread" not in updated.labels
        unread = client.inboxes.messages.list(inbox, labels=["unread"])
        assert [m.subject for m in unread.messages] == ["hello 2"]

        raw = client.inboxes.messages.get_raw(inbox, "<s1@example.com>")
        fetched_raw = http.get(raw.download_url, timeout=WAIT).content
        assert fetched_raw.endswith(first.split(b"\r\n\r\n", 1)[1])
        assert raw.size == len(fetched_raw)

        [meta] = message.attachments or []
        attachment = client.inboxes.messages.get_attachment(inbox, alias, meta.attachment_id)
        downloaded = http.get(attachment.download_url, timeout=WAIT)
        assert downloaded.status_code == 200 and downloaded.content == PDF
        forged = http.get(
            attachment.download_url.replace("signature=", "signature=A"), timeout=WAIT
        )
        assert forged.status_code == 404

        stranger = _sdk(gw.http_url, gw.ws_url, other.owner_key, http)
        calls: list[Callable[[], object]] = [
            lambda: stranger.inboxes.messages.list(inbox),
            lambda: stranger.inboxes.messages.get(inbox, "<s1@example.com>"),
            lambda: stranger.inboxes.messages.get_raw(inbox, "<s1@example.com>"),
            lambda: stranger.inboxes.messages.get_attachment(inbox, alias, meta.attachment_id),
        ]
        for call in calls:
            with pytest.raises(ApiError) as caught:
                call()
            assert caught.value.status_code == 404


def _wait(check: Any, timeout: float = WAIT) -> None:
    """Poll ``check`` until it holds (mail crosses SMTP and the group commit)."""
    import time

    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)
