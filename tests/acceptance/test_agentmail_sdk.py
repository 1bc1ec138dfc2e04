"""The AgentMail-compatible face, proven with AgentMail's own, unmodified clients.

An agent written for AgentMail switches to mailgate by changing its environment's URLs
and nothing else. These tests run the pinned ``agentmail`` SDK and ``agentmail-toolkit``
against a real gateway (``mailgate serve`` in a thread: HTTP, websocket, SMTP and the
workers) on loopback, with mail arriving over real SMTP, a webhook receiver verifying
signatures with the ``svix`` package, and an owner approving held mail.
"""

from __future__ import annotations

import json
import queue
import smtplib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from agentmail import AgentMail, AgentMailEnvironment
from agentmail.inboxes import CreateInboxRequest
from agentmail.websockets.types import Subscribe
from agentmail_toolkit import AgentMailToolkit
from svix.webhooks import Webhook as SvixWebhook

from mailgate.config import Settings
from mailgate.testing import build_message
from mailgate.testing.gateway import RunningGateway, running_gateway

pytestmark = [
    pytest.mark.timeout(120),
    # agentmail 2.0.18 imports names websockets 16 deprecates; under -W error it would not load.
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

WAIT = 20.0  # seconds any single expected arrival may take on a loaded CI machine


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes


class Receiver:
    """A webhook endpoint on loopback that records every POST it is sent."""

    def __init__(self) -> None:
        self.deliveries: queue.Queue[Delivery] = queue.Queue()
        received = self.deliveries

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                received.put(Delivery(dict(self.headers.items()), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/agentmail"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def next_event(self, event_type: str) -> tuple[Delivery, dict[str, Any]]:
        """The next delivery of ``event_type`` (others are skipped)."""
        while True:
            delivery = self.deliveries.get(timeout=WAIT)
            payload = json.loads(delivery.body)
            if payload.get("event_type") == event_type:
                return delivery, payload


class Frames:
    """Websocket frames read by a background thread (the SDK's recv() has no timeout)."""

    def __init__(self, socket: Any) -> None:
        self.items: queue.Queue[Any] = queue.Queue()
        self.thread = threading.Thread(target=self._read, args=(socket,), daemon=True)
        self.thread.start()

    def _read(self, socket: Any) -> None:
        try:
            for frame in socket:
                self.items.put(frame)
        except Exception as exc:  # the connection closing ends the reader
            self.items.put(exc)

    def next(self, kind: str, event_type: str | None = None) -> Any:
        while True:
            frame = self.items.get(timeout=WAIT)
            assert not isinstance(frame, Exception), frame
            if getattr(frame, "type", None) != kind:
                continue
            if event_type is None or getattr(frame, "event_type", None) == event_type:
                return frame


@pytest.fixture
def gateway(settings: Settings) -> Iterator[RunningGateway]:
    """The real gateway over the test's (migrated) database, on both backends."""
    tuned = settings.model_copy(
        update={"webhook_allow_private_targets": True, "webhook_retry_base_seconds": 0.2}
    )
    with running_gateway(tuned) as gw:
        yield gw


_OPEN: list[httpx.Client] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


def _client(gw: RunningGateway, key: str) -> AgentMail:
    """The SDK as an agent would build it, but for the URLs (and a client we close)."""
    http = httpx.Client(timeout=WAIT)
    _OPEN.append(http)
    return AgentMail(
        api_key=key,
        environment=AgentMailEnvironment(http=gw.http_url, websockets=gw.ws_url),
        httpx_client=http,
    )


def _smtp(gw: RunningGateway, raw: bytes, rcpt: str, sender: str = "alice@example.com") -> None:
    with smtplib.SMTP(gw.smtp_host, gw.smtp_port, timeout=WAIT) as client:
        client.sendmail(sender, [rcpt], raw)


def test_an_agentmail_agent_works_against_mailgate_by_changing_only_its_urls(
    gateway: RunningGateway,
) -> None:
    gw = gateway
    workspace = gw.runtime.tenancy.create_workspace("acme", owner_email="boss@acme.example")
    owner = _client(gw, workspace.owner_api_key)

    # An inbox, created idempotently by client_id.
    inbox = owner.inboxes.create(
        request=CreateInboxRequest(username="support", display_name="Support", client_id="inbox-1")
    )
    again = owner.inboxes.create(
        request=CreateInboxRequest(username="support", client_id="inbox-1")
    )
    assert again.inbox_id == inbox.inbox_id == inbox.email
    assert inbox.email.startswith("support@")
    agent_id = gw.runtime.tenancy.resolve_recipient(inbox.email).agent_id  # type: ignore[union-attr]
    agent = _client(
        gw, gw.runtime.tenancy.create_key(workspace.workspace_id, agent_id=agent_id).api_key
    )

    with Receiver() as receiver, agent.websockets.connect() as socket:
        frames = Frames(socket)
        socket.send_subscribe(Subscribe(event_types=["message.received", "message.sent"]))
        subscribed = frames.next("subscribed")
        assert subscribed.event_types == ["message.received", "message.sent"]
        hook = agent.webhooks.create(
            url=receiver.url, event_types=["message.received"], client_id="hook-1"
        )

        # Mail arrives over SMTP, with an attachment.
        report = b"%PDF-1.4 quarterly numbers"
        raw = build_message(
            to=inbox.email,
            subject="Quarterly report",
            body="Please find the report attached.\n",
            attachments=[("report.pdf", "application/pdf", report)],
        )
        _smtp(gw, raw, inbox.email)

        # The websocket pushes it ...
        event = frames.next("event", "message.received")
        assert event.message.subject == "Quarterly report"
        assert event.thread.thread_id == event.message.thread_id

        # ... and so does the webhook, signed so that svix's own verifier accepts it.
        delivery, payload = receiver.next_event("message.received")
        SvixWebhook(hook.secret).verify(delivery.body, delivery.headers)
        assert payload["event_id"] == event.event_id
        assert payload["message"]["message_id"] == event.message.message_id

        # Threads, message, labels.
        threads = agent.inboxes.threads.list(inbox.inbox_id)
        assert threads.count == 1 and threads.threads[0].subject == "Quarterly report"
        thread = agent.inboxes.threads.get(inbox.inbox_id, threads.threads[0].thread_id)
        [message] = thread.messages
        assert {"received", "unread"} <= set(message.labels)
        fetched = agent.inboxes.messages.get(inbox.inbox_id, message.message_id)
        assert fetched.text is not None and "report attached" in fetched.text
        assert fetched.extracted_text is not None and "report attached" in fetched.extracted_text

        # Mark read through labels; the unread filter no longer finds it.
        agent.inboxes.messages.update(inbox.inbox_id, message.message_id, remove_labels=["unread"])
        assert agent.inboxes.messages.list(inbox.inbox_id, labels=["unread"]).count == 0
        assert agent.inboxes.messages.list(inbox.inbox_id, labels=["received"]).count == 1

        # Download the attachment through its signed, time-limited link.
        [attachment] = fetched.attachments or []
        meta = agent.inboxes.messages.get_attachment(
            inbox.inbox_id, message.message_id, attachment.attachment_id
        )
        assert meta.filename == "report.pdf" and meta.size == len(report)
        assert httpx.get(meta.download_url, timeout=WAIT).content == report

        # Reply in the thread (replies are allowed at the default tier).
        sent = agent.inboxes.messages.reply(
            inbox.inbox_id, message.message_id, text="Thanks, received."
        )
        assert sent.thread_id == message.thread_id
        assert frames.next("event", "message.sent").send.message_id == sent.message_id


def test_a_draft_held_by_policy_is_sent_after_an_owner_approves_it(
    gateway: RunningGateway,
) -> None:
    gw = gateway
    workspace = gw.runtime.tenancy.create_workspace("acme", owner_email="boss@acme.example")
    owner = _client(gw, workspace.owner_api_key)
    inbox = owner.inboxes.create(request=CreateInboxRequest(username="sales", client_id="sales"))
    agent_id = gw.runtime.tenancy.resolve_recipient(inbox.email).agent_id  # type: ignore[union-attr]
    agent = _client(
        gw, gw.runtime.tenancy.create_key(workspace.workspace_id, agent_id=agent_id).api_key
    )
    native = httpx.Client(
        base_url=gw.http_url,
        headers={"Authorization": f"Bearer {workspace.owner_api_key}"},
        timeout=WAIT,
    )
    _OPEN.append(native)
    # New mail may go out, but anything to example.com waits for a human.
    assert native.put(f"/v1/agents/{agent_id}/tier", json={"tier": "open"}).status_code == 200
    rule = {
        "name": "external mail needs approval",
        "agent_id": agent_id,
        "direction": "outbound",
        "action": "require_approval",
        "condition": {"field": "to", "match": "glob", "value": "*@example.com"},
    }
    assert native.post("/v1/rules", json=rule).status_code == 201

    with agent.websockets.connect() as socket:
        frames = Frames(socket)
        socket.send_subscribe(Subscribe(event_types=["message.sent"]))
        frames.next("subscribed")

        draft = agent.inboxes.drafts.create(
            inbox.inbox_id,
            to=["carol@example.com"],
            subject="Quote",
            text="Our offer is attached.",
            client_id="quote-1",
        )
        assert agent.inboxes.drafts.get(inbox.inbox_id, draft.draft_id).subject == "Quote"
        sent = agent.inboxes.drafts.send(inbox.inbox_id, draft.draft_id)

        # Held: nothing has left; the owner's queue has it.
        pending = native.get("/v1/outbound", params={"status": "pending_approval"})
        [held] = pending.json()["outbound"]
        captured = {"agent_id": agent_id}
        assert native.get("/v1/captured", params=captured).json()["captured"] == []

        approved = native.post(f"/v1/outbound/{held['id']}/approve", json={"comment": "ok"})
        assert approved.status_code == 200, approved.text

        event = frames.next("event", "message.sent")
        assert event.send.message_id == sent.message_id
        assert event.send.recipients == ["carol@example.com"]
        [out] = native.get("/v1/captured", params=captured).json()["captured"]
        assert out["subject"] == "Quote"


def test_agentmail_toolkit_tools_read_and_reply_through_mailgate(gateway: RunningGateway) -> None:
    gw = gateway
    workspace = gw.runtime.tenancy.create_workspace("acme")
    owner = _client(gw, workspace.owner_api_key)
    inbox = owner.inboxes.create(request=CreateInboxRequest(username="helpdesk"))
    _smtp(gw, build_message(to=inbox.email, subject="Printer on fire"), inbox.email)

    # SMTP's 250 came after the commit, so the mail is there now.
    tools = {tool.name: tool for tool in AgentMailToolkit(owner).get_tools()}
    listed = tools["list_threads"].func(inbox_id=inbox.inbox_id)
    assert listed.count == 1
    thread = tools["get_thread"].func(
        inbox_id=inbox.inbox_id, thread_id=listed.threads[0].thread_id
    )
    message_id = thread.messages[0].message_id
    reply = tools["reply_to_message"].func(
        inbox_id=inbox.inbox_id, message_id=message_id, text="Calling the fire brigade."
    )
    assert reply.thread_id == thread.thread_id
    inboxes = tools["list_inboxes"].func()
    assert [i.inbox_id for i in inboxes.inboxes] == [inbox.inbox_id]
