"""Provider webhook payloads, in the shapes each provider documents, to raw bytes.

Fixtures follow the field tables of SendGrid Inbound Parse, Mailgun routes
(forward/store-notify) and Postmark's inbound webhook; every reconstructed message is
read back with the gateway's own MIME parser.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import pytest

from mailgate.domain.mime import parse_message
from mailgate.domain.providers import (
    FileField,
    InMemoryReplayGuard,
    check_basic_auth,
    check_bearer_token,
    check_path_secret,
    decode_form,
    parse_mailgun,
    parse_postmark,
    parse_raw,
    parse_sendgrid,
    verify_mailgun_signature,
)
from mailgate.domain.rules import AuthResults
from mailgate.errors import Unauthorized, ValidationFailed

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
PDF = b"%PDF-1.4\n" + b"\x00\xff binary \x01" * 100

RAW = (
    b"Received: from mail.example.org by mx.sendgrid.net\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"To: Support <support@agents.example.com>\r\n"
    b"Cc: bob@example.net\r\n"
    b"Subject: Raw hello\r\n"
    b"Message-ID: <raw-1@example.org>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Raw body\r\n"
)


# --------------------------------------------------------------------------- SendGrid


def sendgrid_parsed(**overrides: str) -> dict[str, str]:
    form = {
        "headers": (
            "Received: by mx0047p1mdw1.sendgrid.net with SMTP id 6WCVv7KAWn Wed, 27 Jul"
            " 2016 20:53:06 +0000 (UTC)\n"
            "DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.org;\n"
            " s=s1; h=from:to:subject; bh=abc=; b=def=\n"
            "From: Alice Example <alice@example.org>\n"
            "Date: Wed, 27 Jul 2016 13:53:05 -0700\n"
            "Message-ID: <CAN-sg-1@mail.example.org>\n"
            "Subject: Quarterly report\n"
            "To: Support <support@agents.example.com>\n"
            "Cc: carol@example.net\n"
            "MIME-Version: 1.0\n"
            'Content-Type: multipart/mixed; boundary="001a113df448cad2d00538a4f6aa"\n'
        ),
        "text": "Hi,\nthe report is attached.\n",
        "html": "<p>Hi,</p><p>the report is <b>attached</b>.</p>\n",
        "from": "Alice Example <alice@example.org>",
        "to": "Support <support@agents.example.com>",
        "cc": "carol@example.net",
        "subject": "Quarterly report",
        "envelope": json.dumps(
            {"to": ["support@agents.example.com"], "from": "bounces+alice@example.org"}
        ),
        "charsets": json.dumps(
            {"to": "UTF-8", "html": "UTF-8", "subject": "UTF-8", "from": "UTF-8", "text": "UTF-8"}
        ),
        "SPF": "pass",
        "dkim": "{@example.org : pass}",
        "sender_ip": "192.0.2.10",
        "spam_score": "0.1",
        "attachments": "1",
        "attachment-info": json.dumps(
            {
                "attachment1": {
                    "filename": "report.pdf",
                    "name": "report.pdf",
                    "type": "application/pdf",
                }
            }
        ),
    }
    form.update(overrides)
    return form


SENDGRID_FILES: dict[str, FileField] = {"attachment1": ("report.pdf", "application/pdf", PDF)}


def test_sendgrid_parsed_post_rebuilds_a_message_that_reads_back_the_same() -> None:
    delivery = parse_sendgrid(sendgrid_parsed(), SENDGRID_FILES)

    parsed = parse_message(delivery.raw)
    assert delivery.reconstructed is True
    assert delivery.provider == "sendgrid"
    assert parsed.subject == "Quarterly report"
    assert parsed.message_id == "CAN-sg-1@mail.example.org"
    assert parsed.text == "Hi,\nthe report is attached.\n"
    assert parsed.html is not None
    assert parsed.html.replace("\r\n", "\n") == "<p>Hi,</p><p>the report is <b>attached</b>.</p>\n"
    assert [(a.filename, a.content_type, a.data) for a in parsed.attachments] == [
        ("report.pdf", "application/pdf", PDF)
    ]
    assert parsed.defects == ()


def test_sendgrid_takes_recipients_and_sender_from_the_envelope() -> None:
    delivery = parse_sendgrid(sendgrid_parsed(), SENDGRID_FILES)

    assert delivery.recipients == ("support@agents.example.com",)
    assert delivery.mail_from == "bounces+alice@example.org"


def test_sendgrid_without_an_envelope_falls_back_to_to_and_cc() -> None:
    delivery = parse_sendgrid(sendgrid_parsed(envelope=""), SENDGRID_FILES)

    assert delivery.recipients == ("support@agents.example.com", "carol@example.net")
    assert delivery.mail_from == "alice@example.org"


def test_sendgrid_records_the_spf_and_dkim_verdicts_as_reported() -> None:
    delivery = parse_sendgrid(sendgrid_parsed(), SENDGRID_FILES)

    assert delivery.provider_verdicts == {
        "spf": "pass",
        "dkim": "{@example.org : pass}",
        "spam_score": "0.1",
    }
    assert delivery.provider_event_id is None


def test_sendgrid_reconstruction_is_byte_identical_for_a_retried_post() -> None:
    first = parse_sendgrid(sendgrid_parsed(), SENDGRID_FILES)
    second = parse_sendgrid(sendgrid_parsed(), dict(SENDGRID_FILES))

    assert first.raw == second.raw
    assert b"Date: Wed, 27 Jul 2016" in first.raw  # kept from the provider, not invented


def test_sendgrid_reconstruction_keeps_provider_headers_and_regenerates_the_structure() -> None:
    raw = parse_sendgrid(sendgrid_parsed(), SENDGRID_FILES).raw
    head = raw.split(b"\r\n\r\n", 1)[0]

    assert b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.org;\r\n s=s1;" in head
    assert b"001a113df448cad2d00538a4f6aa" not in raw
    assert head.count(b"MIME-Version:") == 1
    assert head.count(b"Content-Type: multipart/mixed") == 1


def test_sendgrid_different_content_gets_different_boundaries() -> None:
    one = parse_message(parse_sendgrid(sendgrid_parsed(), SENDGRID_FILES).raw)
    other_raw = parse_sendgrid(sendgrid_parsed(text="changed\n"), SENDGRID_FILES).raw
    first_raw = parse_sendgrid(sendgrid_parsed(), SENDGRID_FILES).raw

    assert one.text == "Hi,\nthe report is attached.\n"
    assert first_raw.split(b"boundary=", 1)[1][:50] != other_raw.split(b"boundary=", 1)[1][:50]


def test_sendgrid_inline_image_keeps_its_content_id() -> None:
    info = {"attachment1": {"filename": "logo.png", "type": "image/png", "content-id": "ii_k1"}}
    form = sendgrid_parsed(**{"attachment-info": json.dumps(info)})

    delivery = parse_sendgrid(form, {"attachment1": ("logo.png", "image/png", PNG)})

    (attachment,) = parse_message(delivery.raw).attachments
    assert (attachment.content_id, attachment.disposition, attachment.data) == (
        "ii_k1",
        "inline",
        PNG,
    )


def test_sendgrid_fields_in_a_declared_charset_are_decoded_with_it() -> None:
    form: dict[str, str | bytes] = {
        "from": "René <rene@example.fr>",
        "to": "support@agents.example.com",
        "subject": "Réunion",
        "text": "Café à midi\n".encode("iso-8859-1"),
        "charsets": json.dumps({"text": "iso-8859-1", "subject": "UTF-8"}),
        "envelope": json.dumps({"to": ["support@agents.example.com"], "from": "rene@example.fr"}),
    }

    parsed = parse_message(parse_sendgrid(form, {}).raw)

    assert parsed.text == "Café à midi\n"
    assert parsed.subject == "Réunion"
    assert parsed.from_[0].name == "René"


def test_sendgrid_raw_mode_stores_the_email_field_verbatim() -> None:
    form = {
        "email": RAW.decode(),
        "envelope": json.dumps({"to": ["support@agents.example.com"], "from": "alice@example.org"}),
        "SPF": "softfail",
        "dkim": "none",
        "charsets": json.dumps({"to": "UTF-8", "from": "UTF-8", "subject": "UTF-8"}),
    }

    delivery = parse_sendgrid(form, {})

    assert delivery.raw == RAW
    assert delivery.reconstructed is False
    assert delivery.recipients == ("support@agents.example.com",)
    assert delivery.provider_verdicts == {"spf": "softfail", "dkim": "none"}


@pytest.mark.parametrize("field", ["envelope", "charsets", "attachment-info"])
def test_sendgrid_json_fields_that_are_not_json_are_refused_by_name(field: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        parse_sendgrid(sendgrid_parsed(**{field: "{not json"}), SENDGRID_FILES)

    assert caught.value.code == "validation_failed"
    assert caught.value.extra["errors"] == [{"field": field, "message": "not JSON"}]


def test_sendgrid_envelope_of_the_wrong_shape_is_refused() -> None:
    with pytest.raises(ValidationFailed) as caught:
        parse_sendgrid(sendgrid_parsed(envelope=json.dumps({"to": [1, 2]})), SENDGRID_FILES)

    assert caught.value.extra["errors"][0]["field"] == "envelope"


def test_sendgrid_counted_attachment_that_was_not_posted_is_refused() -> None:
    with pytest.raises(ValidationFailed) as caught:
        parse_sendgrid(sendgrid_parsed(attachments="2"), SENDGRID_FILES)

    assert caught.value.extra["errors"][0]["field"] == "attachment2"


def test_sendgrid_header_values_cannot_inject_new_header_lines() -> None:
    headers = "From: a@example.org\nSubject: hi\n\nX-Injected: yes\n"
    form = {"headers": headers, "text": "x\n", "to": "support@agents.example.com"}

    raw = parse_sendgrid(form, {}).raw

    head = raw.split(b"\r\n\r\n", 1)[0]
    assert b"X-Injected: yes" in head  # a header again, not the start of the body
    assert parse_message(raw).text == "x\n"


def test_sendgrid_non_ascii_headers_are_encoded_even_when_unparseable() -> None:
    headers = (
        'From: "Zoë" <zoe@example.org>\n'
        "To: unlisted-recipients:; (no To-header on input) Ünïcode <<<\n"
        "Subject: Grüße\n"
    )
    form = {"headers": headers, "text": "hi\n"}

    first, second = parse_sendgrid(form, {}), parse_sendgrid(form, {})

    parsed = parse_message(first.raw)
    assert first.raw == second.raw
    assert first.raw.isascii()
    assert (parsed.subject, parsed.from_[0].name) == ("Grüße", "Zoë")
    assert first.recipients == ()  # nothing to route on: the route answers per provider


# --------------------------------------------------------------------------- Mailgun


def mailgun_parsed(**overrides: str) -> dict[str, str]:
    form = {
        "recipient": "support@agents.example.com",
        "sender": "bounce@example.org",
        "from": "Alice Example <alice@example.org>",
        "subject": "Invoice 42",
        "body-plain": "Please find the invoice attached.\n\n-- \nAlice\n",
        "stripped-text": "Please find the invoice attached.",
        "stripped-signature": "Alice",
        "body-html": "<html><body><p>Please find the invoice attached.</p></body></html>\n",
        "stripped-html": "<p>Please find the invoice attached.</p>",
        "attachment-count": "1",
        "timestamp": "1700000000",
        "token": "a8ce0edb2dd8301dee6c2405235584e45aa91d1e9f979f3de0",
        "signature": "ignored-here",
        "message-headers": json.dumps(
            [
                ["X-Mailgun-Incoming", "Yes"],
                ["X-Mailgun-Spf", "Pass"],
                ["X-Mailgun-Dkim-Check-Result", "Pass"],
                ["Received", "from mail.example.org by mxa.mailgun.org with ESMTP"],
                ["Mime-Version", "1.0"],
                ["Content-Type", 'multipart/mixed; boundary="0000000000001"'],
                ["Subject", "Invoice 42"],
                ["From", "Alice Example <alice@example.org>"],
                ["To", "Support <support@agents.example.com>, dave@example.net"],
                ["Message-Id", "<mg-1@mail.example.org>"],
                ["Date", "Tue, 14 Nov 2023 22:13:20 +0000"],
            ]
        ),
        "content-id-map": "{}",
    }
    form.update(overrides)
    return form


MAILGUN_FILES: dict[str, FileField] = {"attachment-1": ("invoice.pdf", "application/pdf", PDF)}


def test_mailgun_parsed_post_rebuilds_a_message_that_reads_back_the_same() -> None:
    delivery = parse_mailgun(mailgun_parsed(), MAILGUN_FILES)

    parsed = parse_message(delivery.raw)
    assert delivery.reconstructed is True
    assert parsed.subject == "Invoice 42"
    assert parsed.message_id == "mg-1@mail.example.org"
    assert parsed.text == "Please find the invoice attached.\n\n-- \nAlice\n"
    assert parsed.html is not None and "invoice attached" in parsed.html
    assert [(a.filename, a.content_type, a.data) for a in parsed.attachments] == [
        ("invoice.pdf", "application/pdf", PDF)
    ]


def test_mailgun_takes_the_envelope_and_token_and_verdicts() -> None:
    delivery = parse_mailgun(mailgun_parsed(), MAILGUN_FILES)

    assert delivery.recipients == ("support@agents.example.com",)
    assert delivery.mail_from == "bounce@example.org"
    assert delivery.provider_event_id == "a8ce0edb2dd8301dee6c2405235584e45aa91d1e9f979f3de0"
    assert delivery.provider_verdicts == {"spf": "Pass", "dkim": "Pass"}


def test_mailgun_without_a_recipient_falls_back_to_the_to_header() -> None:
    delivery = parse_mailgun(mailgun_parsed(recipient=""), MAILGUN_FILES)

    assert delivery.recipients == ("support@agents.example.com", "dave@example.net")


def test_mailgun_reconstruction_is_byte_identical_for_a_retried_post() -> None:
    assert (
        parse_mailgun(mailgun_parsed(), MAILGUN_FILES).raw
        == parse_mailgun(mailgun_parsed(), MAILGUN_FILES).raw
    )


def test_mailgun_content_id_map_marks_inline_images() -> None:
    form = mailgun_parsed(**{"content-id-map": json.dumps({"<logo@x>": "attachment-1"})})

    delivery = parse_mailgun(form, {"attachment-1": ("logo.png", "image/png", PNG)})

    (attachment,) = parse_message(delivery.raw).attachments
    assert (attachment.content_id, attachment.disposition) == ("logo@x", "inline")


def test_mailgun_mime_post_stores_body_mime_verbatim() -> None:
    form = {
        "recipient": "support@agents.example.com",
        "sender": "alice@example.org",
        "from": "Alice <alice@example.org>",
        "subject": "Raw hello",
        "body-mime": RAW.decode(),
        "timestamp": "1700000000",
        "token": "tok-mime",
        "signature": "x",
    }

    delivery = parse_mailgun(form, {})

    assert delivery.raw == RAW
    assert delivery.reconstructed is False
    assert delivery.provider_event_id == "tok-mime"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("message-headers", "{not json"),
        ("message-headers", json.dumps({"From": "x"})),
        ("content-id-map", "[1"),
        ("attachment-count", "many"),
    ],
)
def test_mailgun_malformed_fields_are_refused_by_name(field: str, value: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        parse_mailgun(mailgun_parsed(**{field: value}), MAILGUN_FILES)

    assert caught.value.extra["errors"][0]["field"] == field


def sign(key: str, timestamp: str, token: str) -> str:
    return hmac.new(key.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()


def test_a_correct_mailgun_signature_is_accepted() -> None:
    signature = sign("key-1", "1700000000", "tok")

    verify_mailgun_signature("key-1", "1700000000", "tok", signature, now=1700000010)


@pytest.mark.parametrize(
    ("key", "timestamp", "token", "reason"),
    [
        ("other-key", "1700000000", "tok", "bad_signature"),
        ("key-1", "1700000001", "tok", "bad_signature"),
        ("key-1", "1700000000", "", "missing_signature"),
    ],
)
def test_a_wrong_mailgun_signature_is_refused(
    key: str, timestamp: str, token: str, reason: str
) -> None:
    signature = sign("key-1", "1700000000", "tok")

    with pytest.raises(Unauthorized) as caught:
        verify_mailgun_signature(key, timestamp, token, signature, now=1700000000)

    assert caught.value.extra["reason"] == reason


@pytest.mark.parametrize("now", [1700000000 + 301, 1700000000 - 301])
def test_a_mailgun_timestamp_outside_the_window_is_refused(now: float) -> None:
    signature = sign("key-1", "1700000000", "tok")

    with pytest.raises(Unauthorized) as caught:
        verify_mailgun_signature("key-1", "1700000000", "tok", signature, now=now)

    assert caught.value.extra["reason"] == "stale_timestamp"


def test_a_replayed_mailgun_token_is_refused_while_remembered() -> None:
    guard = InMemoryReplayGuard()
    signature = sign("key-1", "1700000000", "tok")
    verify_mailgun_signature(
        "key-1", "1700000000", "tok", signature, now=1700000000, replay_guard=guard
    )

    with pytest.raises(Unauthorized) as caught:
        verify_mailgun_signature(
            "key-1", "1700000000", "tok", signature, now=1700000100, replay_guard=guard
        )

    assert caught.value.extra["reason"] == "replayed_token"


def test_a_forged_request_does_not_burn_the_token() -> None:
    guard = InMemoryReplayGuard()
    with pytest.raises(Unauthorized):
        verify_mailgun_signature(
            "key-1", "1700000000", "tok", "0" * 64, now=1700000000, replay_guard=guard
        )

    verify_mailgun_signature(
        "key-1",
        "1700000000",
        "tok",
        sign("key-1", "1700000000", "tok"),
        now=1700000000,
        replay_guard=guard,
    )


def test_the_in_memory_replay_guard_forgets_tokens_after_their_ttl() -> None:
    guard = InMemoryReplayGuard()

    assert guard.first_use("t", now=0, ttl=10) is True
    assert guard.first_use("t", now=5, ttl=10) is False
    assert guard.first_use("t", now=11, ttl=10) is True


# --------------------------------------------------------------------------- Postmark


def postmark_payload(**overrides: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "FromName": "Postmarkapp Support",
        "MessageStream": "inbound",
        "From": "support@postmarkapp.com",
        "FromFull": {
            "Email": "support@postmarkapp.com",
            "Name": "Postmarkapp Support",
            "MailboxHash": "",
        },
        "To": '"Firstname Lastname" <yourhash+SampleHash@inbound.postmarkapp.com>',
        "ToFull": [
            {
                "Email": "yourhash+SampleHash@inbound.postmarkapp.com",
                "Name": "Firstname Lastname",
                "MailboxHash": "SampleHash",
            }
        ],
        "Cc": '"First Cc" <firstcc@postmarkapp.com>',
        "CcFull": [{"Email": "firstcc@postmarkapp.com", "Name": "First Cc", "MailboxHash": ""}],
        "Bcc": "",
        "BccFull": [],
        "OriginalRecipient": "yourhash+SampleHash@inbound.postmarkapp.com",
        "Subject": "Test subject",
        "MessageID": "73e6d360-66eb-11e1-8e72-a8904824019b",
        "ReplyTo": "replyto@postmarkapp.com",
        "MailboxHash": "SampleHash",
        "Date": "Fri, 1 Aug 2014 16:45:32 -04:00",
        "TextBody": "This is a test text body.\n",
        "HtmlBody": "<html><body><p>This is a test html body.</p></body></html>\n",
        "StrippedTextReply": "This is the reply text",
        "Tag": "TestTag",
        "Headers": [
            {"Name": "X-Header-Test", "Value": ""},
            {"Name": "X-Spam-Status", "Value": "No"},
            {"Name": "X-Spam-Score", "Value": "-0.1"},
            {"Name": "X-Spam-Tests", "Value": "DKIM_SIGNED,DKIM_VALID,SPF_PASS"},
            {"Name": "Received-SPF", "Value": "Pass (sender SPF authorized) identity=mailfrom"},
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


def test_postmark_json_rebuilds_a_message_that_reads_back_the_same() -> None:
    delivery = parse_postmark(postmark_payload())

    parsed = parse_message(delivery.raw)
    assert delivery.reconstructed is True
    assert parsed.subject == "Test subject"
    assert parsed.message_id == "SampleID@mail.example.com"
    assert parsed.text == "This is a test text body.\n"
    assert parsed.html is not None and "test html body" in parsed.html
    assert [a.as_dict() for a in parsed.from_] == [
        {"name": "Postmarkapp Support", "address": "support@postmarkapp.com"}
    ]
    assert [a.address for a in parsed.cc] == ["firstcc@postmarkapp.com"]
    assert [(a.filename, a.content_type, a.content_id, a.data) for a in parsed.attachments] == [
        ("myimage.png", "image/png", "myimage.png@01CE7342.75E71F80", PNG),
        ("mypaper.doc", "application/msword", None, PDF),
    ]


def test_postmark_recipients_sender_id_and_verdicts() -> None:
    delivery = parse_postmark(postmark_payload(BccFull=[{"Email": "audit@example.com"}]))

    # No envelope: the original recipient first, then every address the headers name
    # (the route keeps only agents' addresses).
    assert delivery.recipients == (
        "yourhash+SampleHash@inbound.postmarkapp.com",
        "firstcc@postmarkapp.com",
        "audit@example.com",
    )
    assert delivery.mail_from == "bounces@postmarkapp.com"
    assert delivery.provider_event_id == "73e6d360-66eb-11e1-8e72-a8904824019b"
    assert delivery.provider_verdicts == {
        "spf": "Pass (sender SPF authorized) identity=mailfrom",
        "spam_status": "No",
        "spam_score": "-0.1",
        "spam_tests": "DKIM_SIGNED,DKIM_VALID,SPF_PASS",
    }


def test_postmark_without_original_recipient_uses_to_and_cc() -> None:
    delivery = parse_postmark(postmark_payload(OriginalRecipient=""))

    assert delivery.recipients == (
        "yourhash+SampleHash@inbound.postmarkapp.com",
        "firstcc@postmarkapp.com",
    )


def test_postmark_reconstruction_is_byte_identical_and_invents_no_message_id() -> None:
    headers = [h for h in postmark_payload()["Headers"] if h["Name"] != "Message-ID"]

    first = parse_postmark(postmark_payload(Headers=headers))
    second = parse_postmark(postmark_payload(Headers=headers))

    assert first.raw == second.raw
    assert parse_message(first.raw).message_id is None


def test_postmark_raw_email_is_stored_verbatim() -> None:
    delivery = parse_postmark(postmark_payload(RawEmail=RAW.decode()))

    assert delivery.raw == RAW
    assert delivery.reconstructed is False


def test_postmark_attachment_content_that_is_not_base64_is_refused_by_name() -> None:
    bad = [{"Name": "a.bin", "Content": "***", "ContentType": "application/octet-stream"}]

    with pytest.raises(ValidationFailed) as caught:
        parse_postmark(postmark_payload(Attachments=bad))

    assert caught.value.extra["errors"][0]["field"] == "Attachments[0].Content"


@pytest.mark.parametrize(
    ("field", "value"),
    [("Headers", {"Name": "x"}), ("ToFull", "someone"), ("FromFull", []), ("Subject", 3)],
)
def test_postmark_fields_of_the_wrong_type_are_refused_by_name(field: str, value: Any) -> None:
    with pytest.raises(ValidationFailed) as caught:
        parse_postmark(postmark_payload(**{field: value}))

    assert caught.value.extra["errors"][0]["field"] == field


# --------------------------------------------------------------------------- raw


def test_a_raw_post_uses_the_given_envelope() -> None:
    delivery = parse_raw(RAW, "bounce@example.org", ["Support@agents.example.com"])

    assert delivery.raw == RAW
    assert delivery.mail_from == "bounce@example.org"
    assert delivery.recipients == ("Support@agents.example.com",)
    assert delivery.provider == "raw"


def test_a_raw_post_without_an_envelope_falls_back_to_the_headers() -> None:
    delivery = parse_raw(RAW, None, [])

    assert delivery.mail_from == "alice@example.org"
    assert delivery.recipients == ("support@agents.example.com", "bob@example.net")


def test_a_raw_post_keeps_the_null_reverse_path() -> None:
    assert parse_raw(RAW, "", ["support@agents.example.com"]).mail_from == ""


def test_an_empty_raw_post_is_refused() -> None:
    with pytest.raises(ValidationFailed) as caught:
        parse_raw(b"\r\n", None, [])

    assert caught.value.extra["errors"][0]["field"] == "body"


# --------------------------------------------------------------------------- auth


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_basic_auth_with_the_right_credentials_passes() -> None:
    check_basic_auth(basic("postmark", "s3cret:with:colons"), "postmark", "s3cret:with:colons")


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "missing_credentials"),
        ("", "missing_credentials"),
        (basic("postmark", "wrong"), "bad_credentials"),
        (basic("other", "s3cret"), "bad_credentials"),
        ("Basic !!!not-base64", "bad_credentials"),
        ("Bearer s3cret", "bad_credentials"),
    ],
)
def test_basic_auth_that_is_missing_or_wrong_is_refused(header: str | None, reason: str) -> None:
    with pytest.raises(Unauthorized) as caught:
        check_basic_auth(header, "postmark", "s3cret")

    assert caught.value.code == "invalid_api_key"
    assert caught.value.extra["reason"] == reason


def test_basic_auth_with_an_empty_expected_password_never_passes() -> None:
    with pytest.raises(Unauthorized):
        check_basic_auth(basic("u", ""), "u", "")


def test_bearer_secret_is_checked() -> None:
    check_bearer_token("Bearer tok-123", "tok-123")
    with pytest.raises(Unauthorized) as caught:
        check_bearer_token("Bearer tok-124", "tok-123")

    assert caught.value.extra["reason"] == "bad_credentials"


def test_a_path_secret_is_checked() -> None:
    check_path_secret("sg-secret", "sg-secret")
    for given, expected in (("sg-secreT", "sg-secret"), ("", ""), ("caf\udce9", "sg-secret")):
        with pytest.raises(Unauthorized) as caught:
            check_path_secret(given, expected)

        assert caught.value.extra["reason"] == "bad_credentials"


# --------------------------------------------------------------------------- forms

FORM_TYPE = "multipart/form-data; boundary=xYzZY"


def form_part(name: str, data: bytes, *, filename: str | None = None, ctype: str = "") -> bytes:
    disposition = f'form-data; name="{name}"'
    if filename is not None:
        disposition += f'; filename="{filename}"'
    head = f"Content-Disposition: {disposition}\r\n"
    if ctype:
        head += f"Content-Type: {ctype}\r\n"
    return b"--xYzZY\r\n" + head.encode() + b"\r\n" + data + b"\r\n"


def test_multipart_fields_stay_the_bytes_that_were_posted() -> None:
    latin1 = "Résumé".encode("iso-8859-1")
    body = (
        b"preamble, ignored\r\n"
        + form_part("subject", latin1)
        + form_part("text", b"line one\r\n\r\nline three\r\n")
        + form_part("empty", b"")
        + form_part("attachment1", PDF, filename="report.pdf", ctype="application/pdf")
        + b"--xYzZY--\r\nepilogue, ignored"
    )

    form = decode_form(body, FORM_TYPE)

    assert form.fields == {
        "subject": latin1,
        "text": b"line one\r\n\r\nline three\r\n",
        "empty": b"",
    }
    assert form.files == {"attachment1": ("report.pdf", "application/pdf", PDF)}


def test_multipart_with_bare_lf_line_breaks_and_transport_padding_is_read() -> None:
    body = (
        b"--xYzZY  \n"
        b'Content-Disposition: form-data; name="to"\n\n'
        b"support@agents.example.com\n"
        b"--xYzZY--\n"
    )

    assert decode_form(body, FORM_TYPE).fields == {"to": b"support@agents.example.com"}


def test_multipart_file_names_are_decoded_and_an_empty_one_is_none() -> None:
    body = (
        b'--xYzZY\r\nContent-Disposition: form-data; name="a"; '
        b"filename*=UTF-8''r%C3%A9sum%C3%A9.pdf\r\n\r\nA\r\n"
        + form_part("b", b"B", filename="café.txt")
        + form_part("c", b"C", filename="")
        + b"--xYzZY--"
    )

    files = decode_form(body, FORM_TYPE).files

    assert files["a"] == ("résumé.pdf", None, b"A")
    assert files["b"][0] == "café.txt"  # raw UTF-8 in the quoted name, as browsers send
    assert files["c"] == (None, None, b"C")


def test_a_repeated_form_field_keeps_its_first_value() -> None:
    body = form_part("to", b"first") + form_part("to", b"second") + b"--xYzZY--"

    assert decode_form(body, FORM_TYPE).fields == {"to": b"first"}


@pytest.mark.parametrize(
    ("body", "content_type", "field"),
    [
        (form_part("to", b"x"), FORM_TYPE, "body"),  # no closing delimiter
        (b"--xYzZY\r\nContent-Disposition: form-data\r\n\r\nx\r\n--xYzZY--", FORM_TYPE, "body"),
        (b"--xYzZY\r\nno header block at all\r\n--xYzZY--", FORM_TYPE, "body"),
        (b"--xYzZYjunk\r\n\r\n--xYzZY--", FORM_TYPE, "body"),
        (b"nothing like a form", FORM_TYPE, "body"),
        (b"x", "multipart/form-data", "Content-Type"),
        (b"x", 'multipart/form-data; boundary="caf\u00e9"', "Content-Type"),
        (b"{}", "application/json", "Content-Type"),
        (b"x", None, "Content-Type"),
    ],
)
def test_a_body_that_is_not_a_form_is_refused_by_name(
    body: bytes, content_type: str | None, field: str
) -> None:
    with pytest.raises(ValidationFailed) as caught:
        decode_form(body, content_type)

    assert [e["field"] for e in caught.value.extra["errors"]] == [field]


def test_a_form_with_too_many_parts_is_refused() -> None:
    body = form_part("f", b"x") * 2201 + b"--xYzZY--"

    with pytest.raises(ValidationFailed):
        decode_form(body, FORM_TYPE)
    with pytest.raises(ValidationFailed):
        decode_form(b"&".join([b"f=x"] * 2201), "application/x-www-form-urlencoded")


def test_urlencoded_values_are_percent_decoded_to_bytes() -> None:
    body = b"subject=Caf%C3%A9+au+lait&body-mime=%E9%00%FF&blank=&flag&subject=second"

    form = decode_form(body, "application/x-www-form-urlencoded; charset=utf-8")

    assert form.fields == {
        "subject": "Café au lait".encode(),
        "body-mime": b"\xe9\x00\xff",
        "blank": b"",
        "flag": b"",
    }
    assert form.files == {}


# --------------------------------------------------------------------------- verdicts


def test_sendgrid_verdicts_become_auth_facts_per_signature() -> None:
    form = sendgrid_parsed(dkim="{@example.org : pass, @mailer.example : fail}")

    auth = parse_sendgrid(form, SENDGRID_FILES).auth

    assert auth == AuthResults(
        spf="pass", spf_domain="example.org", dkim="pass", dkim_domains=("example.org",)
    )


@pytest.mark.parametrize(
    ("spf", "dkim", "expected"),
    [
        ("softfail", "{@example.org : fail}", AuthResults(spf="softfail", dkim="fail")),
        ("pass-ish", "none", AuthResults()),  # not a result word: not believed
        ("", "", AuthResults()),
    ],
)
def test_sendgrid_verdicts_that_are_not_a_pass_name_no_domain(
    spf: str, dkim: str, expected: AuthResults
) -> None:
    assert parse_sendgrid(sendgrid_parsed(SPF=spf, dkim=dkim), SENDGRID_FILES).auth == expected


def test_an_spf_pass_for_a_null_sender_names_no_domain() -> None:
    form = sendgrid_parsed(envelope=json.dumps({"to": ["a@b.example"], "from": ""}))

    assert parse_sendgrid(form, SENDGRID_FILES).auth.spf_domain is None


def mailgun_headers(*extra: list[str]) -> str:
    return json.dumps(
        [
            *extra,
            ["From", "Alice Example <alice@example.org>"],
            ["To", "support@agents.example.com"],
            ["Message-Id", "<mg-2@mail.example.org>"],
        ]
    )


def test_mailgun_verdicts_tie_a_dkim_pass_to_the_only_signature() -> None:
    headers = mailgun_headers(
        ["X-Mailgun-Spf", "Pass"],
        ["X-Mailgun-Dkim-Check-Result", "Pass"],
        ["DKIM-Signature", "v=1; a=rsa-sha256; d=Example.ORG; s=s1;\r\n\tbh=x=; b=y="],
    )

    auth = parse_mailgun(mailgun_parsed(**{"message-headers": headers}), MAILGUN_FILES).auth

    assert auth == AuthResults(
        spf="pass", spf_domain="example.org", dkim="pass", dkim_domains=("example.org",)
    )


def test_mailgun_dkim_pass_with_two_signatures_names_no_domain() -> None:
    headers = mailgun_headers(
        ["X-Mailgun-Dkim-Check-Result", "Pass"],
        ["DKIM-Signature", "v=1; d=example.org; s=s1; b=y="],
        ["DKIM-Signature", "v=1; d=esp.example; s=s1; b=y="],
    )

    auth = parse_mailgun(mailgun_parsed(**{"message-headers": headers}), MAILGUN_FILES).auth

    assert (auth.dkim, auth.dkim_domains) == ("pass", ())


def test_a_verdict_header_present_twice_is_not_believed() -> None:
    """The sender may have planted one: neither copy counts (both are recorded)."""
    headers = mailgun_headers(
        ["X-Mailgun-Spf", "Fail"],
        ["X-Mailgun-Spf", "Pass"],
        ["X-Mailgun-Dkim-Check-Result", "Pass"],
        ["X-Mailgun-Dkim-Check-Result", "Pass"],
    )

    delivery = parse_mailgun(mailgun_parsed(**{"message-headers": headers}), MAILGUN_FILES)

    assert delivery.auth == AuthResults()
    assert delivery.provider_verdicts == {"spf": "Fail", "dkim": "Pass"}


def pm_headers(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"Name": n, "Value": v} for n, v in pairs]


def test_postmark_verdicts_read_received_spf_and_spamassassin_dkim_tests() -> None:
    headers = pm_headers(
        ("X-Spam-Tests", "DKIM_SIGNED,DKIM_VALID,DKIM_VALID_AU,SPF_PASS"),
        (
            "Received-SPF",
            "Pass (sender SPF authorized) identity=mailfrom; client-ip=209.85.160.180;"
            " helo=mail.example; envelope-from=bounce@Mail.Example.NET; receiver=x",
        ),
    )

    auth = parse_postmark(postmark_payload(Headers=headers)).auth

    assert auth == AuthResults(
        spf="pass",
        spf_domain="mail.example.net",
        dkim="pass",
        dkim_domains=("postmarkapp.com",),  # DKIM_VALID_AU: the From domain
    )


@pytest.mark.parametrize(
    ("tests", "signatures", "dkim", "domains"),
    [
        ("DKIM_SIGNED,DKIM_VALID", ["v=1; d=esp.example; b=x"], "pass", ("esp.example",)),
        ("DKIM_SIGNED,DKIM_VALID", [], "pass", ()),
        ("DKIM_SIGNED,DKIM_INVALID", ["v=1; d=esp.example; b=x"], "fail", ()),
        ("SPF_PASS", [], "none", ()),
    ],
)
def test_postmark_dkim_facts_name_a_domain_only_when_the_report_ties_one(
    tests: str, signatures: list[str], dkim: str, domains: tuple[str, ...]
) -> None:
    headers = pm_headers(("X-Spam-Tests", tests), *(("DKIM-Signature", s) for s in signatures))

    auth = parse_postmark(postmark_payload(Headers=headers)).auth

    assert (auth.dkim, auth.dkim_domains) == (dkim, domains)


def test_postmark_spf_without_an_envelope_from_uses_the_return_path() -> None:
    headers = pm_headers(
        ("Received-SPF", "SoftFail (domain transitioning) identity=mailfrom"),
        ("Received-SPF", "Pass (upstream hop)"),
        ("Return-Path", "<bounces@postmarkapp.com>"),
    )
    assert parse_postmark(postmark_payload(Headers=headers)).auth.spf == "none"  # twice

    auth = parse_postmark(postmark_payload(Headers=headers[1:])).auth

    assert (auth.spf, auth.spf_domain) == ("pass", "postmarkapp.com")


def test_raw_posts_carry_no_verdicts() -> None:
    assert parse_raw(RAW, "alice@example.org", []).auth == AuthResults()
