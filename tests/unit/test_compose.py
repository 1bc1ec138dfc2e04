"""Outbound composition: header injection refused in every field, strict addresses,
replies and forwards derived per RFC 5322, and built bytes that re-parse to what was
composed."""

from __future__ import annotations

import email
import json
import random
import re
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from email import policy as email_policy
from email.message import EmailMessage

import pytest

from mailgate.domain.compose import (
    AttachmentIn,
    Composed,
    Draft,
    Mailbox,
    Original,
    build,
    forward,
    mailbox_of,
    message_id_for,
    reply,
    validate,
)
from mailgate.domain.mime import parse_message
from mailgate.errors import HeaderInjection, ValidationFailed

AGENT = Mailbox("agent@example.org", "Support Agent")
DATE = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
PDF = AttachmentIn("report.pdf", "application/pdf", b"%PDF-1.7 binary \x00\xff")
LOGO = AttachmentIn("logo.png", "image/png", b"\x89PNG\r\n\x1a\n", content_id="logo@x", inline=True)
BASE = Draft(
    to=("Alice <alice@example.com>",),
    cc=("carol@example.com",),
    bcc=("bob@example.com",),
    reply_to=("desk@example.org",),
    subject="Quarterly report",
    text="See attached.\n",
    html="<p>See <img src='cid:logo@x'></p>\n",
    attachments=(PDF, LOGO),
    headers={"X-Ticket": "T-1"},
)


def fields(exc: ValidationFailed) -> list[str]:
    return [entry["field"] for entry in exc.extra["errors"]]


def built(c: Composed, message_id: str = "ob_1@example.org") -> bytes:
    return build(c, message_id=message_id, date=DATE)


def head(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[0]


def tree(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email_policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


# ------------------------------------------------------------------ header injection

PAYLOADS = ["\r\n", "\n", "\r", "\x00", "\t", "\x0b", "\x1b", "\x7f", "\x85", "\u2028", "\u2029"]

Inject = Callable[[str], Draft]

INJECTIONS: list[tuple[str, Inject, str]] = [
    ("to", lambda p: replace(BASE, to=(f"a@example.com{p}Bcc: x@evil.test",)), "to[0]"),
    ("to, second", lambda p: replace(BASE, to=("a@example.com", f"b{p}@example.com")), "to[1]"),
    ("cc", lambda p: replace(BASE, cc=(f"Carol{p} <c@example.com>",)), "cc[0]"),
    ("bcc", lambda p: replace(BASE, bcc=(f"b@example.com{p}",)), "bcc[0]"),
    ("reply_to", lambda p: replace(BASE, reply_to=(f"r@example.com{p}X: y",)), "reply_to[0]"),
    ("subject", lambda p: replace(BASE, subject=f"hi{p}Bcc: x@evil.test"), "subject"),
    (
        "header name",
        lambda p: replace(BASE, headers={f"X-A{p}Bcc": "v"}),
        "headers[X-A{}Bcc].name",
    ),
    ("header value", lambda p: replace(BASE, headers={"X-A": f"v{p}Bcc: x"}), "headers[X-A]"),
    (
        "filename",
        lambda p: replace(BASE, attachments=(replace(PDF, filename=f"a{p}.pdf"),)),
        "attachments[0].filename",
    ),
    (
        "content type",
        lambda p: replace(BASE, attachments=(replace(PDF, content_type=f"text/plain{p}X: y"),)),
        "attachments[0].content_type",
    ),
    (
        "content id",
        lambda p: replace(BASE, attachments=(PDF, replace(LOGO, content_id=f"logo{p}@x"))),
        "attachments[1].content_id",
    ),
]


@pytest.mark.parametrize("payload", PAYLOADS, ids=[repr(p) for p in PAYLOADS])
@pytest.mark.parametrize(("where", "inject", "field"), INJECTIONS, ids=[i[0] for i in INJECTIONS])
def test_a_control_character_in_any_header_bound_field_is_refused_as_injection(
    where: str, inject: Inject, field: str, payload: str
) -> None:
    with pytest.raises(HeaderInjection) as caught:
        validate(inject(payload), sender=AGENT)
    escaped = payload.encode("unicode_escape").decode("ascii")
    assert caught.value.code == "header_injection"
    assert caught.value.status == 422
    assert fields(caught.value) == [field.replace("{}", escaped)]


def test_an_injection_report_names_every_offending_field() -> None:
    draft = replace(
        BASE,
        to=("ok@example.com", "x@example.com\r\nBcc: y@evil.test"),
        subject="a\nb",
        headers={"X-A": "1\r\n", "X-B": "fine"},
    )
    with pytest.raises(HeaderInjection) as caught:
        validate(draft, sender=AGENT)
    assert fields(caught.value) == ["to[1]", "subject", "headers[X-A]"]


def test_an_error_path_never_echoes_the_control_character() -> None:
    with pytest.raises(HeaderInjection) as caught:
        validate(replace(BASE, headers={"X-A\r\nBcc": "v"}), sender=AGENT)
    assert not re.search(r"[\r\n]", json.dumps(caught.value.extra))
    assert "\r" not in caught.value.extra["errors"][0]["field"]


def test_an_encoded_word_that_decodes_to_a_line_break_is_injection() -> None:
    entry = "=?utf-8?q?Evil=0D=0ABcc=3A_x=40evil=2Etest?= <a@example.com>"
    with pytest.raises(HeaderInjection) as caught:
        validate(replace(BASE, to=(entry,)), sender=AGENT)
    assert fields(caught.value) == ["to[0]"]


def test_percent_encoded_crlf_is_literal_text_and_kept_as_it_is() -> None:
    draft = replace(
        BASE,
        subject="a%0d%0aBcc: x@evil.test",
        headers={"X-Note": "v%0D%0AX-Evil: 1"},
        attachments=(replace(PDF, filename="a%0d%0a.pdf"),),
    )
    c = validate(draft, sender=AGENT)
    assert c.subject == "a%0d%0aBcc: x@evil.test"
    raw = built(c)
    parsed = parse_message(raw)
    assert parsed.subject == "a%0d%0aBcc: x@evil.test"
    assert parsed.attachments[0].filename == "a%0d%0a.pdf"
    assert b"\r\nX-Note: v%0D%0AX-Evil: 1\r\n" in head(raw)
    assert not re.search(rb"(?im)^(bcc|x-evil):", head(raw))


def test_build_refuses_a_control_character_in_a_composed_it_did_not_validate() -> None:
    c = validate(BASE, sender=AGENT)
    for bad in (
        replace(c, subject="x\r\nBcc: y@evil.test"),
        replace(c, to=(Mailbox("a@example.com", "A\nB"),)),
        replace(c, headers=(("X-A", "1\r\n2"),)),
        replace(c, references=("a@b\r\nX: y",)),
    ):
        with pytest.raises(HeaderInjection):
            built(bad)
    with pytest.raises(HeaderInjection):
        built(c, message_id="id@x\r\nBcc: y@evil.test")


# ------------------------------------------------------------------------ addresses

VALID_ADDRESSES = [
    ("a@example.com", Mailbox("a@example.com")),
    ("Alice <Alice@Example.COM>", Mailbox("Alice@example.com", "Alice")),
    ('"Doe, Jane" <jane@example.com>', Mailbox("jane@example.com", "Doe, Jane")),
    ("Jöhn   Dœ <john@bücher.example>", Mailbox("john@xn--bcher-kva.example", "Jöhn Dœ")),
    ("a@[192.0.2.1]", Mailbox("a@[192.0.2.1]")),
    ("a@[IPv6:2001:DB8:0::1]", Mailbox("a@[IPv6:2001:db8::1]")),
    ('"john doe"@example.com', Mailbox('"john doe"@example.com')),
    ("<a@example.com>", Mailbox("a@example.com")),
    ("=?utf-8?q?J=C3=B6?= <j@example.com>", Mailbox("j@example.com", "Jö")),
]


@pytest.mark.parametrize(("entry", "expected"), VALID_ADDRESSES)
def test_a_well_formed_entry_is_one_normalised_mailbox(entry: str, expected: Mailbox) -> None:
    c = validate(Draft(to=(entry,), text="x"), sender=AGENT)
    assert c.to == (expected,)


INVALID_ADDRESSES = [
    "",
    "   ",
    "alice",
    "alice@",
    "@example.com",
    "a@example.com, b@example.com",
    "team: a@example.com;",
    "John Q. Public <john@example.com>",
    "<@route.example:a@example.com>",
    "jöhn@example.com",
    "a@-example.com",
    "a@example..com",
    "a@example.com.",
    "a@192.0.2.1",
    "a@[300.1.1.1]",
    "a@[tag:whatever]",
    "Name <a@example.com> trailing",
    "a..b@example.com",
    "x" * 65 + "@example.com",
    "a@" + "x" * 999,
    "a@\ud800.example",
    '"=?utf-8?q?encoded_in_quotes?=" <a@example.com>',
]


@pytest.mark.parametrize("entry", INVALID_ADDRESSES)
def test_an_entry_that_is_not_exactly_one_strict_address_is_refused(entry: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        validate(Draft(to=("ok@example.com",), cc=(entry,), text="x"), sender=AGENT)
    assert caught.value.code == "validation_failed"
    assert fields(caught.value) == ["cc[0]"]


def test_a_message_needs_at_least_one_recipient() -> None:
    with pytest.raises(ValidationFailed) as caught:
        validate(Draft(reply_to=("r@example.com",), text="x"), sender=AGENT)
    assert fields(caught.value) == ["recipients"]


def test_more_recipients_than_allowed_are_refused() -> None:
    draft = Draft(to=("a@example.com", "b@example.com"), bcc=("c@example.com",), text="x")
    with pytest.raises(ValidationFailed) as caught:
        validate(draft, sender=AGENT, max_recipients=2)
    assert fields(caught.value) == ["recipients"]
    assert validate(draft, sender=AGENT, max_recipients=3).recipients


def test_envelope_recipients_are_to_cc_bcc_without_case_insensitive_duplicates() -> None:
    draft = Draft(
        to=("A@example.com", "b@example.com"),
        cc=("a@EXAMPLE.com",),
        bcc=("c@example.com", "B@example.com"),
        reply_to=("r@example.com",),
        text="x",
    )
    c = validate(draft, sender=AGENT)
    assert c.recipients == ("A@example.com", "b@example.com", "c@example.com")


# ----------------------------------------------------------------- other validation

INVALID_DRAFTS: list[tuple[str, Draft, list[str]]] = [
    ("no body", replace(BASE, text=None, html=None), ["text"]),
    ("long subject", replace(BASE, subject="s" * 999), ["subject"]),
    ("surrogate subject", replace(BASE, subject="\ud800"), ["subject"]),
    ("surrogate text", replace(BASE, text="a\udc80"), ["text"]),
    ("bcc header", replace(BASE, headers={"Bcc": "x@example.com"}), ["headers[Bcc].name"]),
    ("sender header", replace(BASE, headers={"Sender": "x@example.com"}), ["headers[Sender].name"]),
    (
        "content header",
        replace(BASE, headers={"Content-Type": "a/b"}),
        ["headers[Content-Type].name"],
    ),
    (
        "reserved x",
        replace(BASE, headers={"X-Mailgate-Outbound": "1"}),
        ["headers[X-Mailgate-Outbound].name"],
    ),
    (
        "not allowlisted",
        replace(BASE, headers={"List-Id": "<l.example>"}),
        ["headers[List-Id].name"],
    ),
    ("bare x", replace(BASE, headers={"X-": "1"}), ["headers[X-].name"]),
    ("space in name", replace(BASE, headers={"X Foo": "1"}), ["headers[X Foo].name"]),
    ("colon in name", replace(BASE, headers={"X-Foo:": "1"}), ["headers[X-Foo:].name"]),
    ("non-ascii name", replace(BASE, headers={"X-Naïve": "1"}), ["headers[X-Na\\xefve].name"]),
    ("twice", replace(BASE, headers={"X-A": "1", "x-a": "2"}), ["headers[x-a].name"]),
    ("long value", replace(BASE, headers={"X-A": "v" * 999}), ["headers[X-A]"]),
    (
        "non-ascii list-unsubscribe",
        replace(BASE, headers={"List-Unsubscribe": "<https://é.example/u>"}),
        ["headers[List-Unsubscribe]"],
    ),
    (
        "no filename",
        replace(BASE, attachments=(replace(PDF, filename=""),)),
        ["attachments[0].filename"],
    ),
    (
        "type only",
        replace(BASE, attachments=(replace(PDF, content_type="pdf"),)),
        ["attachments[0].content_type"],
    ),
    (
        "parameters",
        replace(BASE, attachments=(replace(PDF, content_type="text/plain; charset=utf-8"),)),
        ["attachments[0].content_type"],
    ),
    (
        "multipart",
        replace(BASE, attachments=(replace(PDF, content_type="multipart/mixed"),)),
        ["attachments[0].content_type"],
    ),
    (
        "message",
        replace(BASE, attachments=(replace(PDF, content_type="message/rfc822"),)),
        ["attachments[0].content_type"],
    ),
    (
        "content id with space",
        replace(BASE, attachments=(replace(LOGO, content_id="a b"),)),
        ["attachments[0].content_id"],
    ),
    (
        "duplicate content id",
        replace(BASE, attachments=(LOGO, replace(PDF, content_id="<LOGO@x>"))),
        ["attachments[1].content_id"],
    ),
]


@pytest.mark.parametrize(
    ("why", "draft", "expected"), INVALID_DRAFTS, ids=[d[0] for d in INVALID_DRAFTS]
)
def test_a_malformed_draft_is_refused_naming_the_field(
    why: str, draft: Draft, expected: list[str]
) -> None:
    with pytest.raises(ValidationFailed) as caught:
        validate(draft, sender=AGENT)
    assert caught.value.code == "validation_failed"
    assert fields(caught.value) == expected


def test_every_malformed_field_is_named_at_once() -> None:
    draft = Draft(
        to=("nobody",),
        subject="s" * 1000,
        headers={"Received": "x"},
        attachments=(replace(PDF, content_type="bad"),),
    )
    with pytest.raises(ValidationFailed) as caught:
        validate(draft, sender=AGENT)
    assert set(fields(caught.value)) == {
        "to[0]",
        "subject",
        "text",
        "headers[Received].name",
        "attachments[0].content_type",
    }


def test_extra_headers_get_canonical_case_and_content_types_lower_case() -> None:
    draft = replace(
        BASE,
        headers={"x-custom-ID": "1", "list-unsubscribe": "<mailto:u@example.org>"},
        attachments=(
            replace(PDF, content_type="Application/PDF"),
            replace(LOGO, content_id="<logo@x>"),
        ),
    )
    c = validate(draft, sender=AGENT)
    assert c.headers == (("X-Custom-Id", "1"), ("List-Unsubscribe", "<mailto:u@example.org>"))
    assert [a.content_type for a in c.attachments] == ["application/pdf", "image/png"]
    assert c.attachments[1].content_id == "logo@x"


def test_facts_summarise_without_bodies_and_are_json() -> None:
    c = validate(BASE, sender=AGENT)
    facts = c.as_facts()
    json.dumps(facts)
    assert facts["to"] == ["alice@example.com"]
    assert facts["bcc"] == ["bob@example.com"]
    assert facts["subject"] == "Quarterly report"
    assert facts["attachments"][0] == {
        "filename": "report.pdf",
        "content_type": "application/pdf",
        "size": len(PDF.data),
        "inline": False,
        "content_id": None,
    }
    assert facts["attachments_size"] == len(PDF.data) + len(LOGO.data)
    assert "See attached" not in json.dumps(facts)


# ---------------------------------------------------------------------------- build


def test_bcc_is_never_written() -> None:
    c = validate(BASE, sender=AGENT)
    raw = built(c)
    assert "bob@example.com" in c.recipients
    assert b"bob@example.com" not in raw
    assert not re.search(rb"(?im)^bcc:", raw)


def test_a_bcc_only_message_says_undisclosed_recipients() -> None:
    raw = built(validate(Draft(bcc=("b@example.com",), text="x"), sender=AGENT))
    assert b"\r\nTo: undisclosed-recipients:;\r\n" in head(raw)
    assert b"b@example.com" not in raw
    assert parse_message(raw).to == ()


def test_built_headers_are_complete_and_lines_end_in_crlf() -> None:
    c = validate(
        replace(BASE, headers={"X-Ticket": "T-1", "Organization": "Ëxample"}), sender=AGENT
    )
    raw = built(c, message_id=message_id_for("ob_01HX", "example.org"))
    names = [line.split(b":", 1)[0] for line in head(raw).split(b"\r\n") if line[:1] not in b" \t"]
    assert names[:10] == [
        b"From",
        b"To",
        b"Cc",
        b"Reply-To",
        b"Subject",
        b"Date",
        b"Message-ID",
        b"MIME-Version",
        b"Auto-Submitted",
        b"X-Ticket",
    ]
    assert b"\r\nMessage-ID: <ob_01HX@example.org>\r\n" in raw
    assert b"\r\nDate: Mon, 06 May 2024 07:08:09 +0000\r\n" in raw
    assert b"\r\nAuto-Submitted: auto-generated\r\n" in raw
    assert b"\n" not in raw.replace(b"\r\n", b"") and b"\r" not in raw.replace(b"\r\n", b"")
    assert max(len(line) for line in raw.split(b"\r\n")) <= 78
    assert raw.isascii()
    assert parse_message(raw).defects == ()


def test_a_date_keeps_its_offset_and_a_naive_date_is_refused() -> None:
    c = validate(Draft(to=("a@example.com",), text="x"), sender=AGENT)
    plus2 = DATE.astimezone(timezone(timedelta(hours=2)))
    assert b"\r\nDate: Mon, 06 May 2024 09:08:09 +0200\r\n" in build(
        c, message_id="i@x", date=plus2
    )
    with pytest.raises(ValueError):
        build(c, message_id="i@x", date=datetime(2024, 1, 1))


STRUCTURES: list[tuple[str, Draft, list[str]]] = [
    ("text", Draft(to=("a@example.com",), text="t"), ["text/plain"]),
    ("html", Draft(to=("a@example.com",), html="<b>h</b>"), ["text/html"]),
    (
        "both",
        Draft(to=("a@example.com",), text="t", html="<b>h</b>"),
        ["multipart/alternative", "text/plain", "text/html"],
    ),
    (
        "text and file",
        Draft(to=("a@example.com",), text="t", attachments=(PDF,)),
        ["multipart/mixed", "text/plain", "application/pdf"],
    ),
    (
        "html and inline image",
        Draft(to=("a@example.com",), html="<img src='cid:logo@x'>", attachments=(LOGO,)),
        ["multipart/related", "text/html", "image/png"],
    ),
    (
        "everything",
        BASE,
        [
            "multipart/mixed",
            "multipart/alternative",
            "text/plain",
            "multipart/related",
            "text/html",
            "image/png",
            "application/pdf",
        ],
    ),
    (
        "inline image without html stays in mixed",
        Draft(to=("a@example.com",), text="t", attachments=(LOGO,)),
        ["multipart/mixed", "text/plain", "image/png"],
    ),
]


@pytest.mark.parametrize(("why", "draft", "types"), STRUCTURES, ids=[s[0] for s in STRUCTURES])
def test_the_mime_structure_follows_the_content(why: str, draft: Draft, types: list[str]) -> None:
    msg = tree(built(validate(draft, sender=AGENT)))
    assert [part.get_content_type() for part in msg.walk()] == types
    assert msg["MIME-Version"] == "1.0"
    if "multipart/related" in types:
        related = next(p for p in msg.walk() if p.get_content_type() == "multipart/related")
        assert related.get_param("type") == "text/html"


ROUND_TRIPS: list[tuple[str, Draft]] = [
    ("ascii", BASE),
    (
        "non-ascii everywhere",
        Draft(
            to=("Jöhn Dœ <john@example.com>", "山田 太郎 <taro@example.jp>"),
            cc=('"Müller, Anna" <anna@example.de>',),
            reply_to=("Ünïcode Desk <desk@example.org>",),
            subject="Grüße aus Köln — 日本語の件名 " * 6,
            text="Grüße\r\nzweite Zeile\rdritte\n" + "ü" * 2000 + "\n",
            html="<p>日本語</p>\n",
            attachments=(
                AttachmentIn(
                    "Prüfbericht März 2024 (final).pdf", "application/pdf", bytes(range(256))
                ),
                AttachmentIn("ロゴ.png", "image/png", b"\x89PNG", content_id="logo@x", inline=True),
            ),
        ),
    ),
    (
        "literal encoded-word and specials",
        Draft(
            to=(
                '"Kim <kim@x>, Lee" <a@example.com>',
                '"Q. \\"Quote\\" Public" <q@example.com>',
            ),
            subject="=?utf-8?q?literal?= and under_scores, a=b?c",
            text="line\n.\n.leading dot\nFrom the start\n",
        ),
    ),
    (
        "long ascii",
        Draft(
            to=tuple(f"Person Number {i} <person.{i}@example.com>" for i in range(12)),
            subject=" ".join(["word"] * 150) + " " + "x" * 200,
            text="a" * 5000,
            headers={"List-Unsubscribe": "<https://example.org/u/" + "t" * 300 + ">"},
        ),
    ),
]


@pytest.mark.parametrize(("why", "draft"), ROUND_TRIPS, ids=[r[0] for r in ROUND_TRIPS])
def test_the_built_message_reparses_to_what_was_composed(why: str, draft: Draft) -> None:
    c = validate(draft, sender=mailbox_of("Agent@Example.org", "Agënt Ünit"))
    raw = built(c)
    parsed = parse_message(raw)

    def pairs(mailboxes: tuple[Mailbox, ...]) -> list[tuple[str, str]]:
        return [(m.name, m.address) for m in mailboxes]

    assert parsed.subject == c.subject.strip()
    assert [(a.name, a.address) for a in parsed.from_] == [("Agënt Ünit", "Agent@example.org")]
    assert [(a.name, a.address) for a in parsed.to] == pairs(c.to)
    assert [(a.name, a.address) for a in parsed.cc] == pairs(c.cc)
    assert [(a.name, a.address) for a in parsed.reply_to] == pairs(c.reply_to)
    if c.text is not None:
        lines = c.text.replace("\r\n", "\n").replace("\r", "\n")
        assert parsed.text == (lines if lines.endswith("\n") else lines + "\n")
    if c.html is not None:
        assert parsed.html == c.html
    got = {(a.filename, a.content_type, a.content_id, a.data) for a in parsed.attachments}
    assert got == {(a.filename, a.content_type, a.content_id, a.data) for a in c.attachments}
    for attachment in parsed.attachments:
        sent = next(a for a in c.attachments if a.filename == attachment.filename)
        assert attachment.disposition == ("inline" if sent.inline else "attachment")
    assert parsed.message_id == "ob_1@example.org"
    assert parsed.date == DATE
    assert parsed.defects == ()
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))


def test_random_names_and_subjects_survive_encoding_and_folding() -> None:
    alphabet = 'aZ09 .,;:"\\()<>@[]=?_-é日😀\u00a0\u200b'
    rng = random.Random(20240506)
    for _ in range(150):
        subject = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300))).strip()
        name = " ".join("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 90))).split())
        c = replace(
            validate(Draft(to=("a@example.com",), text="x"), sender=AGENT),
            subject=subject,
            to=(Mailbox("a@example.com", name),),
        )
        raw = built(c)
        parsed = parse_message(raw)
        assert parsed.subject == subject, raw
        assert [(a.name, a.address) for a in parsed.to] == [(name, "a@example.com")], raw
        assert max(len(line) for line in head(raw).split(b"\r\n")) <= 998


FORMATTED = [
    (Mailbox("a@example.com"), "a@example.com"),
    (Mailbox("a@example.com", "Bob Smith"), "Bob Smith <a@example.com>"),
    (Mailbox("a@example.com", "Smith, Bob"), '"Smith, Bob" <a@example.com>'),
    (Mailbox("a@example.com", 'Say "hi"'), '"Say \\"hi\\"" <a@example.com>'),
    (Mailbox("a@example.com", "Zoë"), "=?utf-8?q?Zo=C3=AB?= <a@example.com>"),
    (Mailbox("a@example.com", "=?x?="), "=?utf-8?q?=3D=3Fx=3F=3D?= <a@example.com>"),
]


@pytest.mark.parametrize(("mailbox", "expected"), FORMATTED)
def test_a_mailbox_formats_quoted_or_encoded_as_it_needs(mailbox: Mailbox, expected: str) -> None:
    assert mailbox.formatted() == expected


def test_mailbox_of_normalises_and_never_raises() -> None:
    assert mailbox_of(" <Agent@Bücher.EXAMPLE> ", "  Support   Desk ") == Mailbox(
        "Agent@xn--bcher-kva.example", "Support Desk"
    )
    for junk in ("", "no-at-sign", "a@", "a@-bad-.example", "<>", "a@\ud800"):
        assert isinstance(mailbox_of(junk), Mailbox)


def test_message_ids_are_the_outbound_id_at_the_domain() -> None:
    assert message_id_for("ob_01HX", "example.org") == "ob_01HX@example.org"


# ---------------------------------------------------------------------------- reply

ORIGINAL = Original(
    rfc_message_id="orig-3@mail.example.com",
    subject="Question about invoice",
    from_=(Mailbox("alice@example.com", "Alice"),),
    reply_to=(),
    to=(Mailbox("agent@example.org"), Mailbox("dave@example.com", "Dave")),
    cc=(Mailbox("ERIN@example.com"), Mailbox("Alice@Example.com"), Mailbox("alias@example.org")),
    references=("orig-1@mail.example.com", "orig-2@mail.example.com"),
)
OWN = ("Agent@Example.org", "alias@example.org")


def replied(original: Original = ORIGINAL, **kw: object) -> Composed:
    args: dict[str, object] = {"own_addresses": OWN, "text": "Thanks!", "html": None}
    args.update(kw)
    return reply(original, sender=AGENT, **args)  # type: ignore[arg-type]


def test_a_reply_goes_to_reply_to_when_the_original_has_one() -> None:
    original = replace(ORIGINAL, reply_to=(Mailbox("billing@example.com", "Billing"),))
    c = replied(original)
    assert c.to == (Mailbox("billing@example.com", "Billing"),)
    assert c.cc == ()


def test_a_reply_goes_to_from_without_reply_to() -> None:
    c = replied()
    assert c.to == (Mailbox("alice@example.com", "Alice"),)
    assert c.cc == ()
    assert c.auto_submitted == "auto-replied"


def test_reply_all_copies_the_others_minus_own_addresses_and_duplicates() -> None:
    c = replied(reply_all=True, cc=("Frank <frank@example.com>",), bcc=("audit@example.org",))
    assert [m.address for m in c.to] == ["alice@example.com"]
    assert [m.address for m in c.cc] == [
        "dave@example.com",
        "ERIN@example.com",
        "frank@example.com",
    ]
    assert [m.address for m in c.bcc] == ["audit@example.org"]


def test_reply_all_leaves_out_addresses_of_the_original_that_would_not_validate() -> None:
    original = replace(
        ORIGINAL,
        cc=(Mailbox("broken"), Mailbox("x@-bad.example"), Mailbox("ok@example.com", "O\tK\r\n")),
    )
    c = replied(original, reply_all=True)
    assert [(m.address, m.name) for m in c.cc] == [
        ("dave@example.com", "Dave"),
        ("ok@example.com", "O K"),
    ]


def test_a_reply_naming_its_recipients_goes_to_them_and_keeps_the_threading() -> None:
    c = replied(
        to=("Bob <bob@example.com>",),
        cc=("carol@example.com",),
        reply_to=("desk@example.org",),
    )
    assert [m.address for m in c.to] == ["bob@example.com"]  # not alice: replaced
    assert [m.address for m in c.cc] == ["carol@example.com"]
    assert [m.address for m in c.reply_to] == ["desk@example.org"]
    assert c.in_reply_to == "orig-3@mail.example.com"
    assert c.subject == "Re: Question about invoice"


def test_reply_all_with_named_recipients_still_copies_everyone_else_on_it_once() -> None:
    c = replied(reply_all=True, to=("dave@example.com",))
    assert [m.address for m in c.to] == ["dave@example.com"]
    # dave is To now, so not copied; the agent's own addresses never are.
    assert [m.address for m in c.cc] == ["ERIN@example.com", "Alice@example.com"]


def test_a_named_reply_recipient_is_checked_like_a_drafts() -> None:
    with pytest.raises(ValidationFailed) as caught:
        replied(to=("not an address",))
    assert fields(caught.value) == ["to[0]"]
    with pytest.raises(HeaderInjection):
        replied(reply_to=("x@example.com\r\nBcc: mallory@example.com",))


def test_replying_to_a_message_the_agent_sent_goes_to_its_recipients() -> None:
    sent = replace(
        ORIGINAL,
        from_=(Mailbox("agent@example.org"),),
        to=(Mailbox("zoe@example.com"),),
        cc=(Mailbox("yan@example.com"),),
    )
    assert [m.address for m in replied(sent).to] == ["zoe@example.com"]
    assert [m.address for m in replied(sent, reply_all=True).cc] == ["yan@example.com"]


def test_replying_with_nobody_left_to_reply_to_is_refused() -> None:
    own_only = replace(
        ORIGINAL, from_=(Mailbox("AGENT@example.org"),), to=(Mailbox("alias@example.org"),), cc=()
    )
    with pytest.raises(ValidationFailed) as caught:
        replied(own_only, reply_all=True)
    assert fields(caught.value) == ["recipients"]


SUBJECTS = [
    ("Question", "Re: Question"),
    ("Re: Question", "Re: Question"),
    ("RE: Question", "RE: Question"),
    ("re : Question", "re : Question"),
    ("Aw: Frage", "Aw: Frage"),
    ("SV: Fråga", "SV: Fråga"),
    ("Re[2]: Question", "Re[2]: Question"),
    ("Fwd: Question", "Re: Fwd: Question"),
    ("Refund", "Re: Refund"),
    ("", "Re:"),
    ("Folded\tsubject\r\n here", "Re: Folded subject here"),
]


@pytest.mark.parametrize(("subject", "expected"), SUBJECTS)
def test_a_reply_subject_gets_re_once(subject: str, expected: str) -> None:
    assert replied(replace(ORIGINAL, subject=subject)).subject == expected


def test_a_reply_references_the_thread_and_the_original() -> None:
    c = replied()
    assert c.in_reply_to == "orig-3@mail.example.com"
    assert c.references == (
        "orig-1@mail.example.com",
        "orig-2@mail.example.com",
        "orig-3@mail.example.com",
    )
    parsed = parse_message(built(c))
    assert parsed.in_reply_to == "orig-3@mail.example.com"
    assert parsed.references == c.references
    assert b"\r\nAuto-Submitted: auto-replied\r\n" in built(c)


def test_long_references_keep_the_first_and_the_last_twenty() -> None:
    refs = tuple(f"r{i}@example.com" for i in range(30))
    c = replied(replace(ORIGINAL, references=refs))
    assert c.references == ("r0@example.com", *refs[-19:], "orig-3@mail.example.com")
    assert len(c.references) == 21


def test_unwritable_ids_of_the_original_are_left_out() -> None:
    original = replace(
        ORIGINAL,
        rfc_message_id="bad id@example.com",
        references=("<ok@example.com>", "evil@x\r\nBcc: y", "ok@example.com", "ü@example.com"),
    )
    c = replied(original)
    assert c.in_reply_to is None
    assert c.references == ("ok@example.com",)


def test_a_reply_is_checked_like_a_draft() -> None:
    with pytest.raises(HeaderInjection) as caught:
        replied(cc=("x@example.com\r\nBcc: y@evil.test",), headers={"X-A": "1\n2"})
    assert fields(caught.value) == ["cc[0]", "headers[X-A]"]
    with pytest.raises(ValidationFailed) as invalid:
        replied(text=None, headers={"Bcc": "x@example.com"})
    assert set(fields(invalid.value)) == {"text", "headers[Bcc].name"}


# -------------------------------------------------------------------------- forward

ORIGINAL_RAW = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: agent@example.org\r\n"
    b"Subject: Question about invoice\r\n"
    b"Message-ID: <orig-3@mail.example.com>\r\n"
    b"\r\n"
    b"Invoice 42 looks wrong.\r\n"
)


def forwarded(raw: bytes = ORIGINAL_RAW, **kw: object) -> Composed:
    draft = Draft(to=("Finance <finance@example.com>",), text="FYI, see below.")
    return forward(replace(ORIGINAL, raw=raw), sender=AGENT, draft=replace(draft, **kw))  # type: ignore[arg-type]


def test_a_forward_attaches_the_original_as_message_rfc822() -> None:
    c = forwarded(attachments=(PDF,))
    raw = built(c)
    msg = tree(raw)
    assert [p.get_content_type() for p in msg.iter_parts()] == [
        "text/plain",
        "application/pdf",
        "message/rfc822",
    ]
    assert ORIGINAL_RAW in raw
    parsed = parse_message(raw)
    assert parsed.text == "FYI, see below.\n"
    enclosed = [a for a in parsed.attachments if a.content_type == "message/rfc822"]
    assert len(enclosed) == 1
    inner = parse_message(enclosed[0].data)
    assert inner.subject == "Question about invoice"
    assert inner.text == "Invoice 42 looks wrong.\n"


def test_a_forward_starts_a_new_conversation() -> None:
    c = forwarded()
    assert c.subject == "Fwd: Question about invoice"
    assert c.in_reply_to is None and c.references == ()
    assert c.to == (Mailbox("finance@example.com", "Finance"),)
    header = head(built(c))
    assert b"In-Reply-To" not in header and b"References" not in header


def test_a_forward_subject_is_the_drafts_when_given_and_fwd_is_not_doubled() -> None:
    assert forwarded(subject="Please check").subject == "Please check"
    original = replace(ORIGINAL, subject="Fwd: Question", raw=ORIGINAL_RAW)
    c = forward(original, sender=AGENT, draft=Draft(to=("f@example.com",), text="x"))
    assert c.subject == "Fwd: Question"


def test_a_forward_may_carry_no_note_of_its_own() -> None:
    c = forwarded(text=None)
    msg = tree(built(c))
    assert [p.get_content_type() for p in msg.walk()][:2] == ["multipart/mixed", "message/rfc822"]


def test_an_8bit_original_with_lf_endings_is_forwarded_byte_for_byte_as_8bit() -> None:
    original = (
        b"From: a@example.com\nSubject: caf\xe9\n"
        b"Content-Type: text/plain; charset=latin-1\n\ncaf\xe9\n"
    )
    raw = built(forwarded(original))
    assert original.replace(b"\n", b"\r\n") in raw
    assert b"Content-Type: message/rfc822\r\nContent-Disposition: attachment" in raw
    assert b"Content-Transfer-Encoding: 8bit\r\n" in raw
    inner = parse_message(next(a for a in parse_message(raw).attachments).data)
    assert inner.subject == "café"


def test_a_forward_is_checked_like_a_draft_and_needs_the_raw() -> None:
    with pytest.raises(HeaderInjection) as caught:
        forwarded(to=("a@example.com\nBcc: x@evil.test",))
    assert fields(caught.value) == ["to[0]"]
    with pytest.raises(ValidationFailed) as invalid:
        forwarded(to=())
    assert fields(invalid.value) == ["recipients"]
    with pytest.raises(ValueError):
        forward(ORIGINAL, sender=AGENT, draft=Draft(to=("a@example.com",)))
