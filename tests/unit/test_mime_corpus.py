"""`parse_message` over the shared corpus of ~350 real MIME messages.

The corpus (``shared/corpus`` beside the repository, described file by file in its
SOURCES.md) is where the stdlib's traps were found; these tests make sure none of them
reaches a caller. Run with ``-s`` to see which defects the corpus carries.
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime
from email import message_from_bytes
from email.policy import compat32
from email.utils import getaddresses
from pathlib import Path

import pytest

from mailgate.domain import mime
from mailgate.domain.mime import (
    Address,
    ParsedAttachment,
    ParsedMessage,
    ParseLimits,
    parse_message,
)

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus"
FILES = (
    sorted(p for p in CORPUS.rglob("*") if p.is_file() and p.name != "SOURCES.md")
    if CORPUS.is_dir()
    else []
)

pytestmark = pytest.mark.skipif(
    not FILES, reason=f"MIME corpus not found at {CORPUS} (it lives in shared/, beside the repo)"
)


def corpus_id(path: Path) -> str:
    return path.relative_to(CORPUS).as_posix()


def corpus_file(name: str) -> bytes:
    return (CORPUS / name).read_bytes()


def assert_storable(value: str) -> None:
    """Every string must survive UTF-8 encoding and a PostgreSQL text column."""
    value.encode("utf-8")
    assert "\x00" not in value


def assert_well_typed(parsed: ParsedMessage) -> None:
    assert isinstance(parsed, ParsedMessage)
    assert parsed.message_id is None or (isinstance(parsed.message_id, str) and parsed.message_id)
    assert isinstance(parsed.subject, str)
    assert_storable(parsed.subject)
    for field in (parsed.from_, parsed.to, parsed.cc, parsed.reply_to):
        assert isinstance(field, tuple)
        for address in field:
            assert isinstance(address, Address)
            assert isinstance(address.name, str) and isinstance(address.address, str)
            assert address.name or address.address
            assert_storable(address.name)
            assert_storable(address.address)
    if parsed.date is not None:
        assert isinstance(parsed.date, datetime)
        assert parsed.date.tzinfo == UTC
    assert parsed.in_reply_to is None or isinstance(parsed.in_reply_to, str)
    assert isinstance(parsed.references, tuple)
    assert all(isinstance(ref, str) and ref for ref in parsed.references)
    assert len(set(parsed.references)) == len(parsed.references)
    for body in (parsed.text, parsed.html):
        assert body is None or isinstance(body, str)
        if body is not None:
            assert_storable(body)
            assert "\r\n" not in body
    assert isinstance(parsed.attachments, tuple)
    for attachment in parsed.attachments:
        assert isinstance(attachment, ParsedAttachment)
        assert isinstance(attachment.data, bytes)
        assert attachment.content_type == attachment.content_type.lower()
        assert "/" in attachment.content_type
        assert attachment.disposition in (None, "attachment", "inline")
        if attachment.filename is not None:
            assert_storable(attachment.filename)
    assert isinstance(parsed.defects, tuple)
    assert list(parsed.defects) == sorted(set(parsed.defects))
    assert isinstance(parsed.preview, str) and len(parsed.preview) <= mime.PREVIEW_CHARS
    assert_storable(parsed.preview)


@pytest.mark.parametrize("path", FILES, ids=corpus_id)
def test_corpus_message_parses_into_well_typed_fields(path: Path) -> None:
    assert_well_typed(parse_message(path.read_bytes()))


@pytest.mark.parametrize("path", FILES, ids=corpus_id)
def test_corpus_message_parses_under_tight_limits(path: Path) -> None:
    parsed = parse_message(path.read_bytes(), ParseLimits(max_header_bytes=1024, max_parts=3))
    assert_well_typed(parsed)


def test_whole_corpus_parses_in_reasonable_time() -> None:
    # About 0.5 s on the reference machine; the bound leaves room for slow CI only.
    started = time.perf_counter()
    for path in FILES:
        parse_message(path.read_bytes())
    assert time.perf_counter() - started < 15.0


def test_corpus_defect_summary_names_the_known_malformed_messages() -> None:
    per_file = {corpus_id(path): parse_message(path.read_bytes()).defects for path in FILES}
    counts = Counter(defect for defects in per_file.values() for defect in defects)
    with_defects = sum(1 for defects in per_file.values() if defects)
    print(f"\n{len(per_file)} corpus messages, {with_defects} with defects:")
    for defect, count in counts.most_common():
        print(f"  {count:4d}  {defect}")

    assert 0 < with_defects < len(per_file)
    assert "StartBoundaryNotFoundDefect" in per_file["spamscope-mail-parser/mail_malformed_1"]
    assert "BinaryTextPart" in per_file["spamscope-mail-parser/mail_outlook_1"]
    assert (
        "UnknownCharset:invalid-charset"
        in per_file["zbateson-mail-mime-parser/emails__invalid-charset.txt"]
    )
    assert "InvalidDate" in per_file["mikel-mail/error_emails__bad_date_header.eml"]
    # Every corpus trap is handled by a planned fallback, never by the catch-all guards.
    assert not [d for d in counts if d.startswith("ParseError:")]


@pytest.mark.parametrize(
    ("name", "check"),
    [
        # boundary never found: the body is kept, the defect recorded
        (
            "spamscope-mail-parser/mail_malformed_1",
            lambda m: m.text is not None and m.html is not None,
        ),
        # declared boundary differs from the one used: recovered into real parts
        (
            "spamscope-mail-parser/mail_malformed_3",
            lambda m: m.html is not None and "<table" in m.html,
        ),
        # Outlook .msg (OLE2 binary): no garbage text body, the bytes kept as an attachment
        (
            "spamscope-mail-parser/mail_outlook_1",
            lambda m: (
                m.text is None
                and len(m.attachments) == 1
                and m.attachments[0].data[:4] == b"\xd0\xcf\x11\xe0"
            ),
        ),
        # 'To: unlisted-recipients:; (...)' raises AttributeError under policy.default
        ("jstedfast-mimekit/messages__delivery-status.txt", lambda m: m.to == () and m.from_ != ()),
        # message/global comes back as bytes under policy.default
        (
            "mailgun-flanker/enclosed-global.eml",
            lambda m: (
                [a.content_type for a in m.attachments] == ["message/global"]
                and m.text == "Hello\n"
            ),
        ),
        # 136 KB To: of 3,000 encoded-words with ':' in them (stdlib parser recursion)
        (
            "jstedfast-mimekit/messages__stack-overflow.txt",
            lambda m: m.to[0] == Address("test", "test@test.com"),
        ),
        # 210 KB encoded-word Subject: decoded in full under the default 256 KB limit
        ("mailgun-flanker/long-header.eml", lambda m: len(m.subject) > 100_000),
        # unknown body charset: decoded by fallback
        (
            "zbateson-mail-mime-parser/emails__invalid-charset.txt",
            lambda m: m.text and "Tortoise" in m.text,
        ),
        # GB2312 declared, UTF-8 sent
        ("spamscope-mail-parser/mail_test_12", lambda m: m.subject == "代开各地增值税发票"),
        # UTF-16 bodies are text, not binary
        (
            "apache-spamassassin/spam__utf16.eml",
            lambda m: m.text and "Dear potencial partner" in m.text,
        ),
        # encoded display names containing commas stay one mailbox
        (
            "spamscope-mail-parser/mail_test_18",
            lambda m: m.from_ == (Address("LastßlName, FirstName", "comma.name@example.com"),),
        ),
        # 3 MB, 3,043 parts: the enclosed message is one attachment, not walked
        (
            "mailgun-flanker/enclosed-endless.eml",
            lambda m: [a.content_type for a in m.attachments] == ["message/rfc822"],
        ),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_corpus_trap_is_handled(name: str, check: object) -> None:
    assert callable(check)
    assert check(parse_message(corpus_file(name)))


def test_long_headers_in_the_corpus_are_guarded_by_the_limit() -> None:
    limits = ParseLimits(max_header_bytes=64 * 1024)
    subject = parse_message(corpus_file("mailgun-flanker/long-header.eml"), limits)
    to = parse_message(corpus_file("jstedfast-mimekit/messages__stack-overflow.txt"), limits)
    assert subject.subject == "" and "HeaderTooLong:Subject" in subject.defects
    assert to.to == () and "HeaderTooLong:To" in to.defects


def test_fast_address_path_agrees_with_getaddresses_on_the_corpus() -> None:
    # parse_message skips the stdlib address parser for common shapes (it was a third
    # of the cost of a typical message); this pins that the shortcut changes no result.
    checked = 0
    for path in FILES:
        message = message_from_bytes(path.read_bytes(), policy=compat32)
        for key, raw in message.raw_items():
            if key.lower() not in ("from", "to", "cc", "reply-to", "sender", "bcc"):
                continue
            value = mime._unfold(mime._fix_8bit(str(raw))[0])
            if len(value) > 50_000:
                continue  # the stack-overflow To: recurses in getaddresses itself
            protected, _ = mime._protect_words(value)
            fast = mime._fast_addresses(protected)
            if fast is not None:
                checked += 1
                assert fast == getaddresses([protected], **mime._GETADDRESSES_KW), (
                    corpus_id(path),
                    value,
                )
    assert checked > 500
