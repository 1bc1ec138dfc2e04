"""Provider webhooks through the real ASGI app, on SQLite and PostgreSQL: each
provider's documented payload shape is stored for the right agent, with its parsed
fields, attachments and the provider's verdicts in ``auth_results``.

The helpers at the top (a gateway with every endpoint enabled, the payload shapes,
readers for what was stored) are shared with ``test_webhooks_limits.py``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from mailgate.clock import FakeClock
from mailgate.config import load_settings
from mailgate.runtime import Runtime
from mailgate.store.schema import attachments, messages
from tests.conftest import AgentHandle, make_agent
from tests.integration.api_support import api_client, problem_code

pytestmark = pytest.mark.anyio

SG_USER = "sendgrid"
SG_SECRET = "sg-path-secret-0123456789abcdef"
MG_KEY = "mailgun-signing-key-0123456789abcdef"
PM_USER = "postmark"
PM_PASSWORD = "postmark-password-0123456789"
RAW_TOKEN = "raw-bearer-token-0123456789abcdef"
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

PDF = b"%PDF-1.4\n" + b"\x00\xff binary \x01\r\n" * 200
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8


@dataclass
class Gateway:
    runtime: Runtime
    clock: FakeClock
    support: AgentHandle
    """``support@agents.localhost``, in workspace ``acme``."""


def build_gateway(tmp_path: Path, database_url: str, **overrides: Any) -> Iterator[Gateway]:
    """A runtime with every webhook enabled (unless overridden) and one agent."""
    secrets: dict[str, Any] = {
        "inbound_sendgrid_secret": SG_SECRET,
        "inbound_mailgun_signing_key": MG_KEY,
        "inbound_postmark_password": PM_PASSWORD,
        "inbound_raw_token": RAW_TOKEN,
    }
    secrets.update(overrides)
    settings = load_settings(data_dir=tmp_path, database_url=database_url, **secrets)
    clock = FakeClock(NOW)
    runtime = Runtime.build(settings, clock=clock)
    try:
        yield Gateway(runtime, clock, make_agent(runtime, "support"))
    finally:
        runtime.close()


# --------------------------------------------------------------------------- reading back


def message_row(runtime: Runtime, message_id: str) -> Any:
    with runtime.db.read() as conn:
        return conn.execute(select(messages).where(messages.c.id == message_id)).one()


def attachment_rows(runtime: Runtime, message_id: str) -> list[Any]:
    with runtime.db.read() as conn:
        return list(
            conn.execute(
                select(attachments)
                .where(attachments.c.message_id == message_id)
                .order_by(attachments.c.position)
            )
        )


def message_count(runtime: Runtime) -> int:
    with runtime.db.read() as conn:
        return int(conn.execute(select(func.count()).select_from(messages)).scalar_one())


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- wire formats


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def multipart(
    fields: Mapping[str, str | bytes],
    files: Mapping[str, tuple[str, str, bytes]] | None = None,
    boundary: str = "xYzZY",
) -> tuple[bytes, dict[str, str]]:
    """A ``multipart/form-data`` body as SendGrid posts it (fields as raw bytes in
    their own charsets; ``xYzZY`` is the boundary of SendGrid's published samples)."""
    out = bytearray()
    for name, value in fields.items():
        data = value.encode("utf-8") if isinstance(value, str) else value
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        out += data + b"\r\n"
    for name, (filename, ctype, data) in (files or {}).items():
        out += (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            f"Content-Type: {ctype}\r\n\r\n"
        ).encode()
        out += data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def sendgrid_parsed(to: str, **overrides: str | bytes) -> dict[str, str | bytes]:
    """SendGrid Inbound Parse, default (parsed) mode, with a Latin-1 subject declared
    in ``charsets`` and one attachment described by ``attachment-info``."""
    form: dict[str, str | bytes] = {
        "headers": (
            "Received: by mx0047p1mdw1.sendgrid.net with SMTP id 6WCVv7KAWn Wed, 27 Jul"
            " 2016 20:53:06 +0000 (UTC)\n"
            "DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.org;\n"
            " s=s1; h=from:to:subject; bh=abc=; b=def=\n"
            "From: Alice Example <alice@example.org>\n"
            "Date: Wed, 27 Jul 2016 13:53:05 -0700\n"
            "Message-ID: <sg-parsed-1@mail.example.org>\n"
            "Subject: =?ISO-8859-1?Q?R=E9sum=E9?=\n"
            f"To: Support <{to}>\n"
            "Cc: carol@example.net\n"
            "MIME-Version: 1.0\n"
            'Content-Type: multipart/mixed; boundary="001a113df448cad2d00538a4f6aa"\n'
        ),
        "text": "Hi,\nmy résumé is attached.\n".encode("iso-8859-1"),
        "html": "<p>Hi,</p><p>my <b>résumé</b> is attached.</p>\n".encode("iso-8859-1"),
        "from": "Alice Example <alice@example.org>",
        "to": f"Support <{to}>",
        "cc": "carol@example.net",
        "subject": "Résumé".encode("iso-8859-1"),
        "envelope": json.dumps({"to": [to], "from": "bounces+alice@example.org"}),
        "charsets": json.dumps(
            {
                "to": "UTF-8",
                "cc": "UTF-8",
                "html": "iso-8859-1",
                "subject": "iso-8859-1",
                "from": "UTF-8",
                "text": "iso-8859-1",
            }
        ),
        "SPF": "pass",
        "dkim": "{@example.org : pass}",
        "sender_ip": "192.0.2.10",
        "spam_score": "0.1",
        "spam_report": "Spam detection software ... 0.1 points",
        "attachments": "1",
        "attachment-info": json.dumps(
            {"attachment1": {"filename": "cv.pdf", "name": "cv.pdf", "type": "application/pdf"}}
        ),
    }
    form.update(overrides)
    return form


SENDGRID_FILES = {"attachment1": ("cv.pdf", "application/pdf", PDF)}


def raw_message(to: str, *, subject: str = "Raw hello", message_id: str = "raw-1") -> bytes:
    return (
        "Received: from mail.example.org by mx.example.net\r\n"
        "From: Alice <alice@example.org>\r\n"
        f"To: Support <{to}>\r\n"
        f"Subject: {subject}\r\n"
        f"Message-ID: <{message_id}@example.org>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=iso-8859-1\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        "Caf\xe9 au lait, 8-bit Latin-1 body.\r\n"
    ).encode("iso-8859-1")


def mailgun_sign(
    form: dict[str, str | bytes], *, token: str = "a" * 50, at: datetime = NOW, key: str = MG_KEY
) -> dict[str, str | bytes]:
    """Add Mailgun's ``timestamp``/``token``/``signature`` (hex HMAC-SHA256 of
    timestamp + token under the webhook signing key)."""
    timestamp = str(int(at.timestamp()))
    digest = hmac.new(key.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()
    return {**form, "timestamp": timestamp, "token": token, "signature": digest}


def mailgun_parsed(to: str, **overrides: str) -> dict[str, str | bytes]:
    """A Mailgun route's ``forward()`` in parsed mode (fields per Mailgun's docs)."""
    form: dict[str, str | bytes] = {
        "domain": "agents.localhost",
        "recipient": to,
        "sender": "bounce@example.org",
        "from": "Alice Example <alice@example.org>",
        "subject": "Invoice 42",
        "body-plain": "Please find the invoice attached.\n\n-- \nAlice\n",
        "stripped-text": "Please find the invoice attached.",
        "stripped-signature": "Alice",
        "body-html": "<html><body><p>Please find the invoice attached.</p></body></html>\n",
        "stripped-html": "<p>Please find the invoice attached.</p>",
        "attachment-count": "1",
        "message-headers": json.dumps(
            [
                ["X-Mailgun-Incoming", "Yes"],
                ["X-Mailgun-Spf", "Pass"],
                ["X-Mailgun-Dkim-Check-Result", "Pass"],
                ["Received", "from mail.example.org by mxa.mailgun.org with ESMTP"],
                [
                    "Dkim-Signature",
                    "v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.org; s=s1; bh=x=; b=y=",
                ],
                ["Mime-Version", "1.0"],
                ["Content-Type", 'multipart/mixed; boundary="0000000000001"'],
                ["Subject", "Invoice 42"],
                ["From", "Alice Example <alice@example.org>"],
                ["To", f"Support <{to}>, dave@example.net"],
                ["Message-Id", "<mg-1@mail.example.org>"],
                ["Date", "Tue, 14 Nov 2023 22:13:20 +0000"],
            ]
        ),
        "content-id-map": "{}",
    }
    form.update(overrides)
    return form


def postmark_payload(to: str, **overrides: Any) -> dict[str, Any]:
    """Postmark's inbound webhook JSON, as its documentation's example, addressed to
    ``to`` (an inbound-domain-forwarding setup: OriginalRecipient is the agent)."""
    payload: dict[str, Any] = {
        "FromName": "Postmarkapp Support",
        "MessageStream": "inbound",
        "From": "support@postmarkapp.com",
        "FromFull": {
            "Email": "support@postmarkapp.com",
            "Name": "Postmarkapp Support",
            "MailboxHash": "",
        },
        "To": f'"Support" <{to}>',
        "ToFull": [{"Email": to, "Name": "Support", "MailboxHash": ""}],
        "Cc": '"First Cc" <firstcc@postmarkapp.com>',
        "CcFull": [{"Email": "firstcc@postmarkapp.com", "Name": "First Cc", "MailboxHash": ""}],
        "Bcc": "",
        "BccFull": [],
        "OriginalRecipient": to,
        "Subject": "Test subject",
        "MessageID": "73e6d360-66eb-11e1-8e72-a8904824019b",
        "ReplyTo": "replyto@postmarkapp.com",
        "MailboxHash": "",
        "Date": "Fri, 1 Aug 2014 16:45:32 -04:00",
        "TextBody": "This is a test text body.\n",
        "HtmlBody": "<html><body><p>This is a test html body.</p></body></html>\n",
        "StrippedTextReply": "This is the reply text",
        "Tag": "TestTag",
        "Headers": [
            {"Name": "X-Header-Test", "Value": ""},
            {"Name": "X-Spam-Status", "Value": "No"},
            {"Name": "X-Spam-Score", "Value": "-0.1"},
            {"Name": "X-Spam-Tests", "Value": "DKIM_SIGNED,DKIM_VALID,DKIM_VALID_AU,SPF_PASS"},
            {
                "Name": "Received-SPF",
                "Value": "Pass (sender SPF authorized) identity=mailfrom;"
                " client-ip=209.85.160.180; helo=mail-yk0-f180.google.com;"
                " envelope-from=bounces@postmarkapp.com; receiver=" + to,
            },
            {"Name": "MIME-Version", "Value": "1.0"},
            {"Name": "Message-ID", "Value": "<SampleID@mail.example.com>"},
            {"Name": "Return-Path", "Value": "<bounces@postmarkapp.com>"},
        ],
        "Attachments": [
            {
                "Name": "myimage.png",
                "Content": base64.b64encode(PNG).decode(),
                "ContentType": "image/png",
                "ContentLength": len(PNG),
                "ContentID": "myimage.png@01CE7342.75E71F80",
            },
            {
                "Name": "mypaper.doc",
                "Content": base64.b64encode(PDF).decode(),
                "ContentType": "application/msword",
                "ContentLength": len(PDF),
                "ContentID": "",
            },
        ],
    }
    payload.update(overrides)
    return payload


@pytest.fixture
def gateway(tmp_path: Path, database_url: str) -> Iterator[Gateway]:
    yield from build_gateway(tmp_path, database_url)


def stored_one(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    [stored] = response.json()["stored"]
    return dict(stored)


# --------------------------------------------------------------------------- SendGrid


async def test_a_sendgrid_parsed_post_is_stored_for_its_envelope_recipient(
    gateway: Gateway,
) -> None:
    agent = gateway.support
    body, headers = multipart(sendgrid_parsed(agent.address), SENDGRID_FILES)
    async with api_client(gateway.runtime) as client:
        response = await client.post(
            "/inbound/sendgrid", content=body, headers={**headers, **basic(SG_USER, SG_SECRET)}
        )

    stored = stored_one(response)
    assert (stored["agent_id"], stored["duplicate"]) == (agent.agent_id, False)
    row = message_row(gateway.runtime, stored["message_id"])
    assert row.thread_id == stored["thread_id"]
    assert row.subject == "Résumé"  # declared iso-8859-1 in `charsets`
    assert row.text_body == "Hi,\nmy résumé is attached.\n"
    assert "<b>résumé</b>" in row.html_body
    assert row.from_address == "alice@example.org"
    assert (row.mail_from, row.rcpt_to) == ("bounces+alice@example.org", agent.address)
    assert row.source == "webhook:sendgrid"
    assert row.rfc_message_id == "sg-parsed-1@mail.example.org"
    [attachment] = attachment_rows(gateway.runtime, row.id)
    assert (attachment.filename, attachment.content_type) == ("cv.pdf", "application/pdf")
    assert (attachment.size, attachment.sha256) == (len(PDF), sha(PDF))
    assert row.auth_results == {
        "spf": "pass",
        "spf_domain": "example.org",
        "dkim": "pass",
        "dkim_domains": ["example.org"],
        "dmarc": "none",
        "source": "sendgrid",
        "provider": {"spf": "pass", "dkim": "{@example.org : pass}", "spam_score": "0.1"},
    }


async def test_a_sendgrid_raw_mode_post_stores_the_email_field_byte_for_byte(
    gateway: Gateway,
) -> None:
    agent = gateway.support
    raw = raw_message(agent.address)  # 8-bit Latin-1: not valid UTF-8
    form = {
        "email": raw,
        "to": f"Support <{agent.address}>",
        "from": "Alice <alice@example.org>",
        "subject": "Raw hello",
        "envelope": json.dumps({"to": [agent.address], "from": "alice@example.org"}),
        "charsets": json.dumps({"to": "UTF-8", "from": "UTF-8", "subject": "UTF-8"}),
        "SPF": "softfail",
        "dkim": "none",
        "sender_ip": "192.0.2.10",
        "spam_score": "2.5",
    }
    body, headers = multipart(form)
    async with api_client(gateway.runtime) as client:
        response = await client.post(
            f"/inbound/sendgrid/{SG_SECRET}", content=body, headers=headers
        )

    row = message_row(gateway.runtime, stored_one(response)["message_id"])
    assert row.raw_sha256 == sha(raw)
    assert row.text_body == "Café au lait, 8-bit Latin-1 body.\n"
    assert row.auth_results["spf"] == "softfail"
    assert row.auth_results["spf_domain"] is None
    assert row.auth_results["dkim"] == "none"


async def test_a_raw_mode_email_field_larger_than_a_mebibyte_is_accepted(
    gateway: Gateway,
) -> None:
    agent = gateway.support
    big = b"x" * 76 + b"\r\n"
    raw = raw_message(agent.address) + big * (1_500_000 // len(big))
    body, headers = multipart({"email": raw, "envelope": json.dumps({"to": [agent.address]})})
    async with api_client(gateway.runtime) as client:
        response = await client.post(
            f"/inbound/sendgrid/{SG_SECRET}", content=body, headers=headers
        )

    assert message_row(gateway.runtime, stored_one(response)["message_id"]).raw_sha256 == sha(raw)


async def test_a_sendgrid_retry_is_acknowledged_as_a_duplicate(gateway: Gateway) -> None:
    body, headers = multipart(sendgrid_parsed(gateway.support.address), SENDGRID_FILES)
    async with api_client(gateway.runtime) as client:
        url = f"/inbound/sendgrid/{SG_SECRET}"
        first = stored_one(await client.post(url, content=body, headers=headers))
        again = stored_one(await client.post(url, content=body, headers=headers))

    assert (first["duplicate"], again["duplicate"]) == (False, True)
    assert again["message_id"] == first["message_id"]
    assert message_count(gateway.runtime) == 1


# --------------------------------------------------------------------------- Mailgun


async def test_a_mailgun_parsed_multipart_post_is_stored_with_its_attachment(
    gateway: Gateway,
) -> None:
    agent = gateway.support
    form = mailgun_sign(mailgun_parsed(agent.address))
    files = {"attachment-1": ("invoice.pdf", PDF, "application/pdf")}
    async with api_client(gateway.runtime) as client:
        # httpx encodes the form itself: a second multipart writer besides ours
        response = await client.post("/inbound/mailgun", data=form, files=files)

    stored = stored_one(response)
    assert stored["agent_id"] == agent.agent_id
    row = message_row(gateway.runtime, stored["message_id"])
    assert (row.subject, row.rfc_message_id) == ("Invoice 42", "mg-1@mail.example.org")
    assert row.text_body == "Please find the invoice attached.\n\n-- \nAlice\n"
    assert "invoice attached" in row.html_body
    assert (row.mail_from, row.source) == ("bounce@example.org", "webhook:mailgun")
    [attachment] = attachment_rows(gateway.runtime, row.id)
    assert (attachment.filename, attachment.sha256) == ("invoice.pdf", sha(PDF))
    assert row.auth_results == {
        "spf": "pass",
        "spf_domain": "example.org",
        "dkim": "pass",
        "dkim_domains": ["example.org"],  # Mailgun's pass, tied to the one signature
        "dmarc": "none",
        "source": "mailgun",
        "provider": {"spf": "Pass", "dkim": "Pass"},
    }


async def test_a_mailgun_urlencoded_post_without_attachments_is_stored(
    gateway: Gateway,
) -> None:
    form = mailgun_sign(mailgun_parsed(gateway.support.address, **{"attachment-count": "0"}))
    async with api_client(gateway.runtime) as client:
        response = await client.post("/inbound/mailgun", data=form)

    assert response.request.headers["content-type"] == "application/x-www-form-urlencoded"
    row = message_row(gateway.runtime, stored_one(response)["message_id"])
    assert row.subject == "Invoice 42"
    assert attachment_rows(gateway.runtime, row.id) == []


async def test_a_mailgun_mime_post_stores_body_mime_verbatim(gateway: Gateway) -> None:
    agent = gateway.support
    raw = raw_message(agent.address, message_id="mg-mime-1")
    form = mailgun_sign(
        {"recipient": agent.address, "sender": "alice@example.org", "body-mime": raw}
    )
    body, headers = multipart(form)
    async with api_client(gateway.runtime) as client:
        response = await client.post("/inbound/mailgun/mime", content=body, headers=headers)

    row = message_row(gateway.runtime, stored_one(response)["message_id"])
    assert row.raw_sha256 == sha(raw)
    assert (row.subject, row.mail_from) == ("Raw hello", "alice@example.org")
    assert row.auth_results["provider"] == {}  # no X-Mailgun-* verdict headers in it


async def test_a_genuine_mailgun_retry_is_acknowledged_as_a_duplicate(gateway: Gateway) -> None:
    form = mailgun_sign(mailgun_parsed(gateway.support.address, **{"attachment-count": "0"}))
    async with api_client(gateway.runtime) as client:
        first = stored_one(await client.post("/inbound/mailgun", data=form))
        gateway.clock.advance(60)  # a retry within the freshness window
        again = stored_one(await client.post("/inbound/mailgun", data=form))

    assert (first["duplicate"], again["duplicate"]) == (False, True)
    assert again["message_id"] == first["message_id"]
    assert message_count(gateway.runtime) == 1


# --------------------------------------------------------------------------- Postmark


async def test_a_postmark_post_is_stored_with_attachments_headers_and_verdicts(
    gateway: Gateway,
) -> None:
    agent = gateway.support
    async with api_client(gateway.runtime) as client:
        response = await client.post(
            "/inbound/postmark",
            json=postmark_payload(agent.address),
            headers=basic(PM_USER, PM_PASSWORD),
        )

    stored = stored_one(response)
    assert stored["agent_id"] == agent.agent_id
    row = message_row(gateway.runtime, stored["message_id"])
    assert (row.subject, row.rfc_message_id) == ("Test subject", "SampleID@mail.example.com")
    assert row.text_body == "This is a test text body.\n"
    assert (row.from_address, row.mail_from) == (
        "support@postmarkapp.com",
        "bounces@postmarkapp.com",
    )
    assert row.source == "webhook:postmark"
    assert [(a.filename, a.content_type, a.content_id, a.sha256) for a in
            attachment_rows(gateway.runtime, row.id)] == [
        ("myimage.png", "image/png", "myimage.png@01CE7342.75E71F80", sha(PNG)),
        ("mypaper.doc", "application/msword", None, sha(PDF)),
    ]  # fmt: skip
    assert row.auth_results == {
        "spf": "pass",
        "spf_domain": "postmarkapp.com",
        "dkim": "pass",
        "dkim_domains": ["postmarkapp.com"],  # DKIM_VALID_AU: the author's domain
        "dmarc": "none",
        "source": "postmark",
        "provider": {
            "spf": postmark_payload(agent.address)["Headers"][4]["Value"],
            "spam_status": "No",
            "spam_score": "-0.1",
            "spam_tests": "DKIM_SIGNED,DKIM_VALID,DKIM_VALID_AU,SPF_PASS",
        },
    }


async def test_a_postmark_post_with_raw_email_is_stored_verbatim(gateway: Gateway) -> None:
    agent = gateway.support
    raw = raw_message(agent.address).decode("iso-8859-1").encode("utf-8")  # JSON is UTF-8
    payload = postmark_payload(agent.address, RawEmail=raw.decode("utf-8"))
    async with api_client(gateway.runtime) as client:
        response = await client.post(
            "/inbound/postmark", json=payload, headers=basic(PM_USER, PM_PASSWORD)
        )

    assert message_row(gateway.runtime, stored_one(response)["message_id"]).raw_sha256 == sha(raw)


async def test_a_postmark_retry_of_one_message_id_is_a_duplicate(gateway: Gateway) -> None:
    payload = postmark_payload(gateway.support.address)
    auth = basic(PM_USER, PM_PASSWORD)
    async with api_client(gateway.runtime) as client:
        first = stored_one(await client.post("/inbound/postmark", json=payload, headers=auth))
        again = stored_one(await client.post("/inbound/postmark", json=payload, headers=auth))

    assert (first["duplicate"], again["duplicate"]) == (False, True)
    assert message_count(gateway.runtime) == 1


async def test_a_postmark_hash_address_post_reaches_the_agent_named_in_to(
    gateway: Gateway,
) -> None:
    """Mail forwarded to Postmark's own inbound address: OriginalRecipient is the hash
    address, and only the To header names the agent."""
    agent = gateway.support
    payload = postmark_payload(
        agent.address,
        OriginalRecipient="451d9b70cf9364d23ff6f9d51d870251569e@inbound.postmarkapp.com",
    )
    async with api_client(gateway.runtime) as client:
        response = await client.post(
            "/inbound/postmark", json=payload, headers=basic(PM_USER, PM_PASSWORD)
        )

    assert stored_one(response)["agent_id"] == agent.agent_id


# --------------------------------------------------------------------------- raw


async def test_a_raw_post_uses_its_envelope_headers(gateway: Gateway) -> None:
    runtime = gateway.runtime
    agent = gateway.support
    other = runtime.tenancy.create_agent(agent.workspace_id, "billing")
    # The headers name neither agent: what routes it is the envelope (a Bcc).
    raw = raw_message("someone@example.net")
    async with api_client(runtime) as client:
        response = await client.post(
            "/inbound/raw",
            content=raw,
            headers=[
                ("Authorization", f"Bearer {RAW_TOKEN}"),
                ("Content-Type", "message/rfc822"),
                ("X-Envelope-From", "<bounce@example.org>"),
                ("X-Envelope-To", f"{agent.address}, stranger@example.net"),
                ("X-Envelope-To", other.address),
            ],
        )

    assert response.status_code == 200, response.text
    stored = response.json()["stored"]
    assert {s["agent_id"] for s in stored} == {agent.agent_id, other.agent_id}
    row = message_row(runtime, stored[0]["message_id"])
    assert (row.mail_from, row.raw_sha256, row.source) == (
        "bounce@example.org",
        sha(raw),
        "webhook:raw",
    )
    assert row.auth_results == {
        "spf": "none",
        "spf_domain": None,
        "dkim": "none",
        "dkim_domains": [],
        "dmarc": "none",
        "source": "raw",
        "provider": {},
    }


async def test_a_raw_post_without_an_envelope_is_routed_by_its_headers(
    gateway: Gateway,
) -> None:
    raw = raw_message(gateway.support.address)
    async with api_client(gateway.runtime) as client:
        response = await client.post(
            "/inbound/raw",
            content=raw,
            headers={
                "Authorization": f"Bearer {RAW_TOKEN}",
                "Content-Type": "application/octet-stream",
            },
        )

    row = message_row(gateway.runtime, stored_one(response)["message_id"])
    assert (row.agent_id, row.mail_from) == (gateway.support.agent_id, "alice@example.org")


async def test_a_raw_post_keeps_the_null_sender_of_a_bounce(gateway: Gateway) -> None:
    raw = raw_message(gateway.support.address)
    async with api_client(gateway.runtime) as client:
        response = await client.post(
            "/inbound/raw",
            content=raw,
            headers={"Authorization": f"Bearer {RAW_TOKEN}", "X-Envelope-From": "<>"},
        )

    assert message_row(gateway.runtime, stored_one(response)["message_id"]).mail_from == ""


# --------------------------------------------------------------------------- shared


@pytest.mark.parametrize(
    ("endpoint", "status"),
    [("sendgrid", 403), ("mailgun", 406), ("postmark", 403), ("raw", 403)],
)
async def test_an_unknown_recipient_gets_the_status_that_stops_that_providers_retries(
    gateway: Gateway, endpoint: str, status: int
) -> None:
    nobody = "nobody@agents.localhost"
    request = signed_post(endpoint, nobody)
    async with api_client(gateway.runtime) as client:
        response = await client.post(f"/inbound/{endpoint}", **request)

    assert response.status_code == status
    assert problem_code(response) == "unknown_recipient"
    assert message_count(gateway.runtime) == 0


def signed_post(endpoint: str, to: str, *, token: str = "b" * 50) -> dict[str, Any]:
    """Keyword arguments of a valid ``client.post`` to ``/inbound/<endpoint>`` of one
    small message for ``to``."""
    if endpoint == "sendgrid":
        body, headers = multipart(sendgrid_parsed(to, attachments="0"))
        return {"content": body, "headers": {**headers, **basic(SG_USER, SG_SECRET)}}
    if endpoint == "mailgun":
        form = mailgun_sign(mailgun_parsed(to, **{"attachment-count": "0"}), token=token)
        return {"data": form}
    if endpoint == "postmark":
        return {
            "json": postmark_payload(to, Attachments=[]),
            "headers": basic(PM_USER, PM_PASSWORD),
        }
    return {
        "content": raw_message(to),
        "headers": {"Authorization": f"Bearer {RAW_TOKEN}", "X-Envelope-To": to},
    }
