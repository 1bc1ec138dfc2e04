"""Outbound transports against real peers on loopback: the SMTP relay against the
fault-injecting sink (mailgate.testing.smtp_sink), SendGrid against the local Mail Send
API (mailgate.testing.sendgrid_api), capture against SQLite and PostgreSQL.

Relay replies map to the delivery contract (RFC 5321 §4.2.1: 4yz transient, 5yz
permanent):

============================  ==========================  ====================
fault                         error code                  reply_code
============================  ==========================  ====================
421 to MAIL                   delivery_deferred           421
450 to RCPT                   delivery_deferred           450
451 to DATA                   delivery_deferred           451
553 to MAIL                   delivery_rejected           553
550 to every RCPT             delivery_rejected           550
550 to DATA                   delivery_rejected           550
============================  ==========================  ====================
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from mailgate.config import Settings, load_settings
from mailgate.errors import DeliveryError, PermanentDeliveryError, TemporaryDeliveryError
from mailgate.runtime import Runtime
from mailgate.store.schema import captured
from mailgate.testing import build_message
from mailgate.testing.sendgrid_api import FakeSendGrid
from mailgate.testing.smtp_sink import Fault, SmtpSink
from mailgate.transports import (
    CaptureTransport,
    OutgoingMessage,
    SendGridTransport,
    SmtpRelayTransport,
    build_transport,
)
from tests.conftest import AgentHandle

SENDER = "agent@example.com"
API_KEY = "SG.test-key"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def outgoing(
    raw: bytes | None = None, recipients: tuple[str, ...] = ("bob@example.org",), **fields: Any
) -> OutgoingMessage:
    raw = raw or build_message(to=", ".join(recipients), sender=f"Agent <{SENDER}>")
    values: dict[str, Any] = {
        "outbound_id": "out_1",
        "workspace_id": "ws_1",
        "agent_id": "agt_1",
        "mail_from": SENDER,
        "recipients": recipients,
        "raw": raw,
        "rfc_message_id": "m1@example.com",
        "subject": "Hello",
        **fields,
    }
    return OutgoingMessage(**values)


# -- SMTP relay -----------------------------------------------------------------------


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as running:
        yield running


def relay_settings(tmp_path: Path, sink: SmtpSink, **changes: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path,
        "transport": "smtp",
        "relay_host": sink.host,
        "relay_port": sink.port,
        "relay_starttls": "off",
        "relay_timeout_seconds": 10.0,
        "delivery_workers": 1,
        "smtp_hostname": "gateway.test",
        **changes,
    }
    return load_settings(**values)


@pytest.fixture
async def relay(tmp_path: Path, sink: SmtpSink) -> AsyncIterator[SmtpRelayTransport]:
    transport = SmtpRelayTransport(relay_settings(tmp_path, sink))
    yield transport
    await transport.aclose()


@pytest.mark.anyio
async def test_the_relay_delivers_the_bytes_verbatim(
    relay: SmtpRelayTransport, sink: SmtpSink
) -> None:
    raw = build_message(to="bob@example.org", body="Line one.\n.leading dot\n\n")
    receipt = await relay.send(outgoing(raw, ("bob@example.org", "carol@example.org")))
    [got] = sink.wait_for(1)
    assert got.raw == raw
    assert (got.mail_from, got.rcpt_tos) == (SENDER, ("bob@example.org", "carol@example.org"))
    assert (receipt.transport, receipt.code, dict(receipt.refused)) == ("smtp", 250, {})


@pytest.mark.anyio
async def test_the_relay_speaks_starttls_and_auth(tmp_path: Path) -> None:
    with SmtpSink(require_starttls=True, credentials=("relay-user", "s3cret")) as sink:
        settings = relay_settings(
            tmp_path,
            sink,
            relay_starttls="require",
            relay_ca_file=sink.ca_file,
            relay_username="relay-user",
            relay_password="s3cret",
        )
        transport = SmtpRelayTransport(settings)
        try:
            receipt = await transport.send(outgoing())
        finally:
            await transport.aclose()
        assert receipt.code == 250
        assert len(sink.wait_for(1)) == 1


@pytest.mark.anyio
async def test_a_wrong_relay_password_is_temporary_and_sends_nothing(tmp_path: Path) -> None:
    """Configuration trouble is not the message's fault: it stays queued."""
    with SmtpSink(starttls=True, credentials=("relay-user", "s3cret")) as sink:
        settings = relay_settings(
            tmp_path,
            sink,
            relay_starttls="auto",
            relay_ca_file=sink.ca_file,
            relay_username="relay-user",
            relay_password="wrong",
        )
        transport = SmtpRelayTransport(settings)
        try:
            with pytest.raises(TemporaryDeliveryError) as failed:
                await transport.send(outgoing())
        finally:
            await transport.aclose()
        assert failed.value.reply_code == 535
        assert sink.messages == []


@pytest.mark.anyio
async def test_an_untrusted_relay_certificate_is_temporary(tmp_path: Path) -> None:
    with SmtpSink(require_starttls=True) as sink:
        transport = SmtpRelayTransport(relay_settings(tmp_path, sink, relay_starttls="require"))
        try:
            with pytest.raises(TemporaryDeliveryError) as failed:
                await transport.send(outgoing())
        finally:
            await transport.aclose()
        assert failed.value.code == "delivery_deferred"
        assert sink.messages == []


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("fault", "code", "reply_code"),
    [
        (Fault("mail", reply="421 4.3.2 Shutting down"), "delivery_deferred", 421),
        (Fault("rcpt", reply="450 4.2.1 Mailbox busy"), "delivery_deferred", 450),
        (Fault("data", reply="451 4.3.0 Local error"), "delivery_deferred", 451),
        (Fault("mail", reply="553 5.7.1 Sender rejected"), "delivery_rejected", 553),
        (Fault("rcpt", reply="550 5.1.1 No such user"), "delivery_rejected", 550),
        (Fault("data", reply="550 5.7.1 Content rejected"), "delivery_rejected", 550),
    ],
    ids=["421-mail", "450-rcpt", "451-data", "553-mail", "550-rcpt", "550-data"],
)
async def test_relay_replies_map_to_temporary_or_permanent(
    relay: SmtpRelayTransport, sink: SmtpSink, fault: Fault, code: str, reply_code: int
) -> None:
    sink.inject(fault)
    with pytest.raises(DeliveryError) as failed:
        await relay.send(outgoing())
    assert (failed.value.code, failed.value.reply_code) == (code, reply_code)
    assert isinstance(failed.value, TemporaryDeliveryError) == (code == "delivery_deferred")
    assert sink.messages == []


@pytest.mark.anyio
async def test_one_refused_recipient_of_two_is_a_success_naming_the_refused(
    relay: SmtpRelayTransport, sink: SmtpSink
) -> None:
    sink.inject(
        Fault("rcpt", reply="550 5.1.1 No such user", recipients=frozenset({"gone@example.org"}))
    )
    receipt = await relay.send(outgoing(recipients=("bob@example.org", "gone@example.org")))
    assert dict(receipt.refused) == {"gone@example.org": "550 5.1.1 No such user"}
    assert sink.wait_for(1)[0].rcpt_tos == ("bob@example.org",)


@pytest.mark.anyio
async def test_a_temporary_refusal_of_one_recipient_sends_no_data(
    relay: SmtpRelayTransport, sink: SmtpSink
) -> None:
    """The whole message waits: sending to the others now would duplicate on retry."""
    sink.inject(Fault("rcpt", reply="452 4.2.2 Over quota", recipients=frozenset({"c@x.org"})))
    with pytest.raises(TemporaryDeliveryError) as failed:
        await relay.send(outgoing(recipients=("b@x.org", "c@x.org")))
    assert failed.value.reply_code == 452
    await relay.send(outgoing(recipients=("b@x.org", "c@x.org")))
    assert [m.rcpt_tos for m in sink.wait_for(1)] == [("b@x.org", "c@x.org")]


@pytest.mark.anyio
@pytest.mark.parametrize("stage", ["mail", "rcpt", "data"])
async def test_a_dropped_connection_is_temporary(
    relay: SmtpRelayTransport, sink: SmtpSink, stage: Any
) -> None:
    sink.inject(Fault(stage, drop=True))
    with pytest.raises(TemporaryDeliveryError) as failed:
        await relay.send(outgoing())
    assert failed.value.reply_code is None
    assert sink.messages == []
    await relay.send(outgoing())  # a new session takes over
    assert len(sink.wait_for(1)) == 1


@pytest.mark.anyio
async def test_a_relay_that_is_down_is_temporary_until_it_is_back(
    relay: SmtpRelayTransport, sink: SmtpSink
) -> None:
    await relay.send(outgoing())
    sink.stop()
    with pytest.raises(TemporaryDeliveryError) as failed:
        await relay.send(outgoing())
    assert failed.value.extra["stage"] == "connect"
    sink.start()
    await relay.send(outgoing())
    assert len(sink.wait_for(2)) == 2


@pytest.mark.anyio
async def test_a_reply_slower_than_the_timeout_is_temporary(tmp_path: Path, sink: SmtpSink) -> None:
    """The relay kept the message but answered too late: the sender cannot know, so
    this is the one case where a retry may duplicate (RFC 5321 §4.5.4.1 as usual)."""
    transport = SmtpRelayTransport(relay_settings(tmp_path, sink, relay_timeout_seconds=0.3))
    sink.inject(Fault("data", delay=5.0))
    try:
        with pytest.raises(TemporaryDeliveryError):
            await transport.send(outgoing())
    finally:
        await transport.aclose()
    assert len(sink.wait_for(1)) == 1


@pytest.mark.anyio
async def test_sends_reuse_one_session(relay: SmtpRelayTransport, sink: SmtpSink) -> None:
    for _ in range(3):
        await relay.send(outgoing())
    messages = sink.wait_for(3)
    assert sink.sessions == 1
    assert len({m.connection for m in messages}) == 1
    assert relay.sessions_opened == 1


@pytest.mark.anyio
async def test_a_session_is_reused_after_a_refusal(
    relay: SmtpRelayTransport, sink: SmtpSink
) -> None:
    sink.inject(Fault("data", reply="550 5.7.1 Content rejected"))
    with pytest.raises(PermanentDeliveryError):
        await relay.send(outgoing())
    await relay.send(outgoing())
    assert relay.sessions_opened == 1
    assert len(sink.wait_for(1)) == 1


@pytest.mark.anyio
async def test_a_pooled_session_the_relay_closed_is_replaced(
    relay: SmtpRelayTransport, sink: SmtpSink
) -> None:
    await relay.send(outgoing())
    sink.stop()  # closes the pooled session from the relay's side
    sink.start()
    await relay.send(outgoing())
    assert len(sink.wait_for(2)) == 2
    assert relay.sessions_opened == 2


@pytest.mark.anyio
async def test_concurrent_sends_open_at_most_one_session_per_worker(
    tmp_path: Path, sink: SmtpSink
) -> None:
    transport = SmtpRelayTransport(relay_settings(tmp_path, sink, delivery_workers=2))
    try:
        await asyncio.gather(*(transport.send(outgoing()) for _ in range(8)))
    finally:
        await transport.aclose()
    assert len(sink.wait_for(8)) == 8
    assert transport.sessions_opened <= 2


# -- SendGrid -------------------------------------------------------------------------


@pytest.fixture
def sendgrid_api() -> Iterator[FakeSendGrid]:
    with FakeSendGrid(API_KEY) as api:
        yield api


def sendgrid_settings(tmp_path: Path, api: FakeSendGrid, key: str = API_KEY) -> Settings:
    return load_settings(
        data_dir=tmp_path, transport="sendgrid", sendgrid_api_url=api.base_url, sendgrid_api_key=key
    )


@pytest.fixture
async def sendgrid(tmp_path: Path, sendgrid_api: FakeSendGrid) -> AsyncIterator[SendGridTransport]:
    transport = SendGridTransport(sendgrid_settings(tmp_path, sendgrid_api))
    yield transport
    await transport.aclose()


def rich_message() -> bytes:
    return build_message(
        to="Bob Example <bob@example.org>",
        cc="carol@example.org",
        sender=f"Support Agent <{SENDER}>",
        subject="Your report",
        body="Plain text.\n",
        html="<p>HTML text.</p>",
        in_reply_to="parent@example.org",
        references=["root@example.org", "parent@example.org"],
        message_id="m1@example.com",
        attachments=[("report.pdf", "application/pdf", b"%PDF-1.4 fake")],
    )


@pytest.mark.anyio
async def test_sendgrid_accepts_with_202_and_a_provider_message_id(
    sendgrid: SendGridTransport, sendgrid_api: FakeSendGrid
) -> None:
    receipt = await sendgrid.send(outgoing())
    [request] = sendgrid_api.requests
    assert (receipt.transport, receipt.code) == ("sendgrid", 202)
    assert receipt.provider_message_id == request.message_id
    assert request.headers["Authorization"] == f"Bearer {API_KEY}"


@pytest.mark.anyio
async def test_the_mail_send_json_carries_every_part_of_the_message(
    sendgrid: SendGridTransport, sendgrid_api: FakeSendGrid
) -> None:
    recipients = ("bob@example.org", "carol@example.org", "dave@example.org")
    await sendgrid.send(outgoing(rich_message(), recipients, subject="Your report"))
    body = sendgrid_api.requests[0].body
    assert body["personalizations"] == [
        {
            "to": [{"email": "bob@example.org", "name": "Bob Example"}],
            "cc": [{"email": "carol@example.org"}],
            "bcc": [{"email": "dave@example.org"}],  # envelope only: a blind copy
        }
    ]
    assert body["from"] == {"email": SENDER, "name": "Support Agent"}
    assert body["subject"] == "Your report"
    assert body["content"] == [
        {"type": "text/plain", "value": "Plain text.\n"},
        {"type": "text/html", "value": "<p>HTML text.</p>\n"},
    ]
    [attachment] = body["attachments"]
    assert base64.b64decode(attachment["content"]) == b"%PDF-1.4 fake"
    assert {k: v for k, v in attachment.items() if k != "content"} == {
        "filename": "report.pdf",
        "type": "application/pdf",
        "disposition": "attachment",
    }
    assert body["custom_args"] == {"outbound_id": "out_1"}
    assert body["headers"] == {
        "Message-ID": "<m1@example.com>",
        "In-Reply-To": "<parent@example.org>",
        "References": "<root@example.org> <parent@example.org>",
    }


@pytest.mark.anyio
async def test_recipients_dropped_from_the_envelope_are_not_sent_to(
    sendgrid: SendGridTransport, sendgrid_api: FakeSendGrid
) -> None:
    """A suppressed To recipient stays out; Cc takes the required ``to`` place."""
    await sendgrid.send(outgoing(rich_message(), ("carol@example.org",)))
    assert sendgrid_api.requests[0].body["personalizations"] == [
        {"to": [{"email": "carol@example.org"}]}
    ]


@pytest.mark.anyio
async def test_blind_copies_only_go_one_per_envelope(
    sendgrid: SendGridTransport, sendgrid_api: FakeSendGrid
) -> None:
    raw = build_message(to="undisclosed-recipients:;", sender=SENDER)
    await sendgrid.send(outgoing(raw, ("b@example.org", "c@example.org")))
    assert sendgrid_api.requests[0].body["personalizations"] == [
        {"to": [{"email": "b@example.org"}]},
        {"to": [{"email": "c@example.org"}]},
    ]


@pytest.mark.anyio
async def test_a_request_sendgrid_refuses_is_permanent(
    sendgrid: SendGridTransport, sendgrid_api: FakeSendGrid
) -> None:
    with pytest.raises(PermanentDeliveryError) as failed:
        await sendgrid.send(outgoing(recipients=("not an address",)))
    assert failed.value.reply_code == 400
    assert sendgrid_api.requests == []


@pytest.mark.anyio
@pytest.mark.parametrize("status", [429, 500, 503])
async def test_rate_limits_and_server_errors_are_temporary(
    sendgrid: SendGridTransport, sendgrid_api: FakeSendGrid, status: int
) -> None:
    sendgrid_api.fail_next(1, status)
    with pytest.raises(TemporaryDeliveryError) as failed:
        await sendgrid.send(outgoing())
    assert failed.value.reply_code == status
    receipt = await sendgrid.send(outgoing())
    assert receipt.code == 202
    assert sendgrid_api.attempts == 2


@pytest.mark.anyio
async def test_a_bad_api_key_is_permanent(tmp_path: Path, sendgrid_api: FakeSendGrid) -> None:
    transport = SendGridTransport(sendgrid_settings(tmp_path, sendgrid_api, key="SG.wrong"))
    try:
        with pytest.raises(PermanentDeliveryError) as failed:
            await transport.send(outgoing())
    finally:
        await transport.aclose()
    assert failed.value.reply_code == 401


@pytest.mark.anyio
async def test_an_unreachable_api_is_temporary(tmp_path: Path) -> None:
    api = FakeSendGrid(API_KEY)
    settings = sendgrid_settings(tmp_path, api)
    api.stop()  # never started: the port is closed
    transport = SendGridTransport(settings)
    try:
        with pytest.raises(TemporaryDeliveryError):
            await transport.send(outgoing())
    finally:
        await transport.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"personalizations": []}, "personalizations"),
        ({"from": {}}, "from"),
        ({"subject": ""}, "subject"),
        ({"content": []}, "content"),
        (
            {
                "content": [
                    {"type": "text/html", "value": "x"},
                    {"type": "text/plain", "value": "y"},
                ]
            },
            "content",
        ),
        ({"headers": {"DKIM-Signature": "v=1"}}, "headers"),
    ],
    ids=["no-personalization", "no-from", "no-subject", "no-content", "html-first", "reserved"],
)
async def test_the_fake_api_refuses_what_sendgrid_documents_as_invalid(
    sendgrid_api: FakeSendGrid, change: dict[str, Any], field: str
) -> None:
    body = {
        "personalizations": [{"to": [{"email": "b@example.org"}]}],
        "from": {"email": SENDER},
        "subject": "Hi",
        "content": [{"type": "text/plain", "value": "Hello"}],
        **change,
    }
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{sendgrid_api.base_url}/v3/mail/send",
            json=body,
            headers={"Authorization": f"Bearer {API_KEY}"},
        )
    assert response.status_code == 400
    assert field in {e["field"] for e in response.json()["errors"]}


# -- capture and the factory ----------------------------------------------------------


@pytest.mark.anyio
async def test_capture_stores_one_row_naming_the_stored_bytes(
    runtime: Runtime, agent: AgentHandle
) -> None:
    raw = build_message(to="bob@example.org", sender=SENDER)
    sha = runtime.blobs.put(raw)
    message = outgoing(raw, workspace_id=agent.workspace_id, agent_id=agent.agent_id)
    receipt = await CaptureTransport(runtime.db, runtime.clock).send(message)
    with runtime.db.read() as conn:
        row = conn.execute(select(captured)).one()
    assert (receipt.code, receipt.provider_message_id) == (250, row.id)
    assert (
        (row.raw_sha256, row.raw_size)
        == (sha, len(raw))
        == (hashlib.sha256(raw).hexdigest(), len(raw))
    )
    assert (row.outbound_id, row.agent_id, row.mail_from, row.recipients) == (
        "out_1",
        agent.agent_id,
        SENDER,
        ["bob@example.org"],
    )


def test_the_factory_picks_the_configured_transport(tmp_path: Path, runtime: Runtime) -> None:
    def build(**changes: Any) -> str:
        settings = load_settings(data_dir=tmp_path, **changes)
        return build_transport(settings, runtime.db, runtime.blobs, runtime.clock).name

    assert [build(), build(transport="smtp"), build(transport="sendgrid")] == [
        "capture",
        "smtp",
        "sendgrid",
    ]
