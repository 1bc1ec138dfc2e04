"""Unit tests for `mailgate.domain.mime`, built from small inline messages.

Each trap from docs/BASELINES ("Parser traps") has a case here; the corpus test
(`test_mime_corpus.py`) then checks the same behaviour on real mail.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from mailgate.domain.mime import (
    Address,
    ParsedAttachment,
    ParsedMessage,
    ParseLimits,
    parse_message,
    parse_msg_ids,
)


def msg(headers: str, body: str = "hello\n") -> bytes:
    """A message from header lines (one per line, folded lines start with a space)."""
    return (headers.strip("\n") + "\n\n" + body).encode()


def raw_msg(headers: bytes, body: bytes = b"hello\n") -> bytes:
    return headers.strip(b"\n") + b"\n\n" + body


# --------------------------------------------------------------------- subject


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("=?utf-8?q?Caf=C3=A9?=", "Café"),
        ("=?UTF-8?B?w7xiZXI=?=", "über"),
        ("=?utf-8?b?w7xiZXI?=", "über"),  # padding dropped by the sender
        ("Re: =?iso-8859-1?q?K=F6ln?= trip", "Re: Köln trip"),
        ("=?utf-8?q?a?= =?utf-8?q?b?=", "ab"),  # whitespace between words is dropped
        ("=?utf-8?q?a?=\n =?utf-8?q?b?=", "ab"),  # also when folded
        ("=?utf-8?q?=E2=82?= =?utf-8?q?=AC?=", "€"),  # one character split over words
        ("=?utf-8?q?hello_world?=", "hello world"),
        ("=?utf-8*en?q?lang_tag?=", "lang tag"),  # RFC 2231 language suffix
        ("=?iso-8859-1?q?caf=E9?= =?utf-8?q?_=E2=82=AC?=", "café €"),
        ("plain\n  folded", "plain  folded"),
        ("  padded  ", "padded"),
    ],
)
def test_encoded_word_subject_is_decoded(header: str, expected: str) -> None:
    parsed = parse_message(msg(f"Subject: {header}"))
    assert parsed.subject == expected
    assert parsed.defects == ()


def test_undecodable_encoded_word_is_kept_verbatim_with_a_defect() -> None:
    parsed = parse_message(msg("Subject: x =?utf-8?b?A?= y"))
    assert parsed.subject == "x =?utf-8?b?A?= y"
    assert parsed.defects == ("header:Subject:InvalidEncodedWordDefect",)


def test_subject_absent_is_empty_string() -> None:
    assert parse_message(msg("From: a@example.com")).subject == ""


def test_encoded_word_in_unknown_charset_falls_back_with_defect() -> None:
    parsed = parse_message(msg("Subject: =?x-klingon?q?caf=C3=A9?="))
    assert parsed.subject == "café"
    assert parsed.defects == ("UnknownCharset:x-klingon",)


@pytest.mark.parametrize(
    ("raw_subject", "expected", "defects"),
    [
        ("Jörg".encode(), "Jörg", ()),  # raw UTF-8 (RFC 6532) is fine
        ("Jörg".encode("latin-1"), "Jörg", ("header:Subject:UndecodableBytesDefect",)),
        (b"\x93quoted\x94", "\u201cquoted\u201d", ("header:Subject:UndecodableBytesDefect",)),
    ],
)
def test_raw_8bit_header_is_decoded(
    raw_subject: bytes, expected: str, defects: tuple[str, ...]
) -> None:
    parsed = parse_message(raw_msg(b"Subject: " + raw_subject))
    assert parsed.subject == expected
    assert parsed.defects == defects


# --------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("a@example.com", [("", "a@example.com")]),
        ("Ann <Ann@Example.COM>", [("Ann", "Ann@Example.COM")]),  # case kept
        (
            '"Doe, Jane" <jane@example.com>, b@example.com',
            [("Doe, Jane", "jane@example.com"), ("", "b@example.com")],
        ),
        ("=?utf-8?q?Doe=2C_J=C3=B6rg?= <j@example.com>", [("Doe, Jörg", "j@example.com")]),
        ('"=?utf-8?q?J=C3=B6rg?=" <j@example.com>', [("Jörg", "j@example.com")]),
        ("j@example.com (J Comment)", [("J Comment", "j@example.com")]),
        (
            "Team: a@example.com, B <b@example.com>;",
            [("", "a@example.com"), ("B", "b@example.com")],
        ),
        ("undisclosed-recipients:;", []),
        ("unlisted-recipients:; (no To-header on input)", []),
        (
            "  Spaced   Name  <s@example.com> ,z@example.com",
            [("Spaced Name", "s@example.com"), ("", "z@example.com")],
        ),
    ],
)
def test_address_header_is_parsed(header: str, expected: list[tuple[str, str]]) -> None:
    parsed = parse_message(msg(f"To: {header}"))
    assert [(a.name, a.address) for a in parsed.to] == expected
    assert parsed.defects == ()


def test_group_address_undisclosed_recipients_gives_no_addresses_and_no_defect() -> None:
    parsed = parse_message(msg("From: a@example.com\nTo: undisclosed-recipients:;"))
    assert parsed.to == ()
    assert parsed.from_ == (Address("", "a@example.com"),)
    assert parsed.defects == ()


def test_every_address_header_is_read() -> None:
    parsed = parse_message(
        msg("From: f@x.org\nTo: t@x.org\nCc: c@x.org, d@x.org\nReply-To: r@x.org\nTo: t2@x.org")
    )
    assert [a.address for a in parsed.from_] == ["f@x.org"]
    assert [a.address for a in parsed.to] == ["t@x.org", "t2@x.org"]  # both To: lines
    assert [a.address for a in parsed.cc] == ["c@x.org", "d@x.org"]
    assert [a.address for a in parsed.reply_to] == ["r@x.org"]


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("@@@", []),
        ('"Name only" <>', [("Name only", "")]),
    ],
)
def test_garbage_address_header_keeps_what_it_can_and_records_defect(
    header: str, expected: list[tuple[str, str]]
) -> None:
    parsed = parse_message(msg(f"To: {header}"))
    assert [(a.name, a.address) for a in parsed.to] == expected
    assert parsed.defects == ("header:To:InvalidHeaderDefect",)


def test_colon_heavy_encoded_phrase_does_not_lose_the_real_recipient() -> None:
    # The stdlib address parser recurses once per ':' (a 136 KB To: in the corpus).
    words = " ".join(["=?utf-8?q?at_10:08:28?="] * 2000)
    parsed = parse_message(msg(f"To: Real <real@example.com>, {words}"))
    assert parsed.to[0] == Address("Real", "real@example.com")
    assert not [d for d in parsed.defects if d.startswith("ParseError")]


def test_address_as_dict_has_name_and_address() -> None:
    assert Address("Ann", "ann@example.com").as_dict() == {
        "name": "Ann",
        "address": "ann@example.com",
    }


# --------------------------------------------------------------------- ids


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("<a@b> <c@d>", ["a@b", "c@d"]),
        ("<a@b>\n <c@d>\n <a@b>", ["a@b", "c@d"]),  # duplicates dropped, order kept
        ('Your message of "Mon, 1 Jan" <x@y>', ["x@y"]),
        ("<x@y> (Jane's message of <jane@y>)", ["x@y"]),  # comments ignored
        ("<<nested@y>>", ["nested@y"]),
        ("<folded@\n example.com>", ["folded@example.com"]),
        ("bare@id.example, other@id.example", ["bare@id.example", "other@id.example"]),
        ("<>", []),
        ("", []),
        ("just some prose", []),
    ],
)
def test_parse_msg_ids_extracts_ids_from_junk(value: str, expected: list[str]) -> None:
    assert parse_msg_ids(value) == expected


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Message-ID: <abc.123@example.com>", "abc.123@example.com"),
        ("Message-ID:   <abc@example.com>  ", "abc@example.com"),
        ("Message-Id: no-brackets@example.com", "no-brackets@example.com"),
        ("Message-ID: <>", None),
        ("Message-ID:", None),
        ("From: a@example.com", None),
    ],
)
def test_message_id_is_unbracketed_or_none(header: str, expected: str | None) -> None:
    assert parse_message(msg(header)).message_id == expected


def test_in_reply_to_and_references_are_extracted() -> None:
    parsed = parse_message(
        msg(
            "In-Reply-To: <prev@example.com> (Ann's message)\n"
            "References: <root@example.com>\n <mid@example.com>\n"
            "\t<prev@example.com> <root@example.com>"
        )
    )
    assert parsed.in_reply_to == "prev@example.com"
    assert parsed.references == ("root@example.com", "mid@example.com", "prev@example.com")


def test_in_reply_to_with_only_prose_is_none() -> None:
    parsed = parse_message(msg("In-Reply-To: your message of yesterday"))
    assert parsed.in_reply_to is None
    assert parsed.references == ()


# --------------------------------------------------------------------- date


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Tue, 3 Jun 2025 12:00:00 +0200", datetime(2025, 6, 3, 10, 0, tzinfo=UTC)),
        ("3 Jun 2025 12:00:00 -0000", datetime(2025, 6, 3, 12, 0, tzinfo=UTC)),  # zone unknown
        ("Tue, 3 Jun 2025 12:00:00 EST", datetime(2025, 6, 3, 17, 0, tzinfo=UTC)),
    ],
)
def test_date_is_timezone_aware_utc(header: str, expected: datetime) -> None:
    parsed = parse_message(msg(f"Date: {header}"))
    assert parsed.date == expected
    assert parsed.date is not None and parsed.date.utcoffset() is not None
    assert parsed.date.tzinfo == UTC
    assert parsed.defects == ()


@pytest.mark.parametrize("header", ["not a date", "Mon, 32 Jan 2020 25:61:00 +0000", "99999999999"])
def test_bad_date_is_none_with_defect(header: str) -> None:
    parsed = parse_message(msg(f"Date: {header}"))
    assert parsed.date is None
    assert parsed.defects == ("InvalidDate",)


def test_missing_date_is_none_without_defect() -> None:
    parsed = parse_message(msg("Subject: no date"))
    assert parsed.date is None
    assert parsed.defects == ()


# --------------------------------------------------------------------- bodies

ALTERNATIVE = msg(
    'Content-Type: multipart/alternative; boundary="b1"',
    "--b1\n"
    "Content-Type: text/plain; charset=utf-8\n"
    "Content-Transfer-Encoding: quoted-printable\n\n"
    "Caf=C3=A9 at  noon=\n, ok?\n"
    "--b1\n"
    "Content-Type: text/html; charset=utf-8\n\n"
    "<p>Caf&eacute; at noon</p>\n"
    "--b1--\n",
)


def test_multipart_alternative_gives_text_and_html() -> None:
    parsed = parse_message(ALTERNATIVE)
    assert parsed.text == "Café at  noon, ok?"  # the newline before a boundary is its own
    assert parsed.html == "<p>Caf&eacute; at noon</p>"
    assert parsed.attachments == ()
    assert parsed.preview == "Café at noon, ok?"


def test_crlf_line_endings_become_lf_in_text() -> None:
    parsed = parse_message(b"Subject: x\r\n\r\nline one\r\nline two\r\n")
    assert parsed.text == "line one\nline two\n"


def test_html_only_preview_strips_tags_styles_and_entities() -> None:
    parsed = parse_message(
        msg(
            "Content-Type: text/html",
            "<html><head><style>p {color: red}</style></head>"
            "<body><!-- hidden --><p>Hello&nbsp;<b>there</b>,</p>\n\n<p>a &lt; b</p></body></html>",
        )
    )
    assert parsed.text is None
    assert parsed.preview == "Hello there, a < b"


def test_preview_is_capped_at_200_characters() -> None:
    parsed = parse_message(msg("Subject: long", "word " * 500))
    assert len(parsed.preview) <= 200
    assert parsed.preview.startswith("word word")


def test_inline_image_with_content_id_is_an_inline_attachment() -> None:
    parsed = parse_message(
        msg(
            'Content-Type: multipart/related; boundary="r"',
            '--r\nContent-Type: text/html\n\n<img src="cid:logo@x">\n'
            "--r\nContent-Type: image/png\nContent-Transfer-Encoding: base64\n"
            "Content-ID: <logo@x>\nContent-Disposition: inline; filename=logo.png\n\niVBORw0KGgo=\n"
            "--r\nContent-Type: image/gif\nContent-Transfer-Encoding: base64\n"
            "Content-ID: <spacer@x>\n\nR0lGODlh\n"
            "--r--\n",
        )
    )
    assert parsed.html == '<img src="cid:logo@x">'
    assert parsed.attachments == (
        ParsedAttachment("logo.png", "image/png", "inline", "logo@x", b"\x89PNG\r\n\x1a\n"),
        # no Content-Disposition: a Content-ID means the HTML references it inline
        ParsedAttachment(None, "image/gif", "inline", "spacer@x", b"GIF89a"),
    )


@pytest.mark.parametrize(
    ("disposition", "expected"),
    [
        ("attachment; filename*=utf-8''%E2%82%AC%20rates.pdf", "€ rates.pdf"),
        ("attachment; filename*=iso-8859-1'fr'r%E9sum%E9.txt", "résumé.txt"),
        (
            "attachment;\n filename*0*=utf-8''caf%C3%A9;\n filename*1*=%20menu;\n filename*2=.txt",
            "café menu.txt",
        ),
        ('attachment; filename*0="long ";filename*1="name.txt"', "long name.txt"),
        ('attachment; filename="=?utf-8?q?r=C3=A9sum=C3=A9.pdf?="', "résumé.pdf"),
        ('attachment; filename="=?utf-8?b?w7xiZXIucGRm?="', "über.pdf"),
        ("attachment; filename*=x-unknown''abc.txt", "abc.txt"),
        ('attachment; filename="plain.txt"', "plain.txt"),
    ],
)
def test_rfc2231_filename_is_decoded(disposition: str, expected: str) -> None:
    parsed = parse_message(
        msg(f"Content-Type: application/octet-stream\nContent-Disposition: {disposition}", "data")
    )
    assert [a.filename for a in parsed.attachments] == [expected]


def test_filename_from_content_type_name_and_raw_utf8_is_decoded() -> None:
    parsed = parse_message(
        raw_msg('Content-Type: application/pdf; name="Résumé.pdf"'.encode(), b"%PDF")
    )
    assert parsed.attachments == (
        ParsedAttachment("Résumé.pdf", "application/pdf", None, None, b"%PDF"),
    )


def test_single_part_pdf_is_one_attachment_and_no_text() -> None:
    parsed = parse_message(
        msg("Content-Type: application/PDF\nContent-Transfer-Encoding: base64", "JVBERi0xLjQ=\n")
    )
    assert parsed.text is None and parsed.html is None
    assert parsed.attachments == (
        ParsedAttachment(None, "application/pdf", None, None, b"%PDF-1.4"),
    )
    assert parsed.preview == ""


def test_text_part_marked_as_attachment_is_not_the_body() -> None:
    parsed = parse_message(
        msg(
            'Content-Type: multipart/mixed; boundary="m"',
            "--m\nContent-Type: text/plain\nContent-Disposition: attachment\n\nnotes\n"
            "--m\nContent-Type: text/plain\n\nthe body\n"
            "--m\nContent-Type: text/plain\n\na footer\n"
            "--m--\n",
        )
    )
    assert parsed.text == "the body"
    # nothing is dropped: the attached note and the second inline text are attachments
    assert [(a.disposition, a.data) for a in parsed.attachments] == [
        ("attachment", b"notes"),
        (None, b"a footer"),
    ]


def test_attached_message_is_an_attachment_and_not_the_body() -> None:
    inner = "From: inner@example.com\nSubject: inner\n\ninner body\n"
    parsed = parse_message(
        msg(
            'Content-Type: multipart/mixed; boundary="m"',
            "--m\nContent-Type: text/plain\n\nouter body\n"
            f"--m\nContent-Type: message/rfc822\n\n{inner}--m--\n",
        )
    )
    assert parsed.text == "outer body"
    assert len(parsed.attachments) == 1
    attached = parsed.attachments[0]
    assert attached.content_type == "message/rfc822"
    assert parse_message(attached.data).text == "inner body"


def test_attached_broken_multipart_with_8bit_bytes_is_still_serialised() -> None:
    # BytesGenerator raises UnicodeEncodeError on this shape; the fallback must not.
    inner = b"Subject: inner\nContent-Type: multipart/mixed; boundary=zz\n\nno boundary \xff here\n"
    parsed = parse_message(
        b'Content-Type: multipart/mixed; boundary="m"\n\n'
        b"--m\nContent-Type: message/rfc822\n\n" + inner + b"--m--\n"
    )
    assert [a.content_type for a in parsed.attachments] == ["message/rfc822"]
    assert b"no boundary" in parsed.attachments[0].data
    assert not [d for d in parsed.defects if d.startswith("ParseError")]


def test_message_global_part_is_an_attachment() -> None:
    inner = "From: =?utf-8?q?J=C3=B6rg?= <j@example.com>\nSubject: hi\n\nbody\n"
    parsed = parse_message(
        msg(
            'Content-Type: multipart/mixed; boundary="m"',
            f"--m\nContent-Type: message/global\n\n{inner}--m--\n",
        )
    )
    assert [a.content_type for a in parsed.attachments] == ["message/global"]
    assert parsed.text is None


@pytest.mark.parametrize(
    ("content_type", "payload", "expected_text", "defects"),
    [
        ("text/plain; charset=x-unknown", "café".encode(), "café", ("UnknownCharset:x-unknown",)),
        (
            "text/plain; charset=x-unknown",
            "café".encode("latin-1"),
            "café",
            ("UnknownCharset:x-unknown",),
        ),
        (
            "text/plain; charset=unicode_escape",
            b"\\u0041",
            "\\u0041",
            ("UnknownCharset:unicode_escape",),
        ),
        ("text/plain; charset=base64", b"aGk=", "aGk=", ("UnknownCharset:base64",)),
        (
            "text/plain; charset=utf-8",
            "café".encode("cp1252"),
            "café",
            ("CharsetDecodeError:utf-8",),
        ),
        (
            "text/plain; charset=gb2312",
            "中文 ok".encode(),
            "中文 ok",
            ("CharsetDecodeError:gb2312",),
        ),
        ("text/plain; charset=iso-8859-1", b"\x93q\x94", "\u201cq\u201d", ()),  # read as cp1252
        ("text/plain", "naïve".encode(), "naïve", ()),  # undeclared 8-bit: guessed silently
        ("text/plain; charset=utf-7", b"+2D0-", "\ufffd\ufffd\ufffd", ()),  # lone surrogate cleaned
    ],
)
def test_body_charset_falls_back_instead_of_failing(
    content_type: str, payload: bytes, expected_text: str, defects: tuple[str, ...]
) -> None:
    parsed = parse_message(b"Content-Type: " + content_type.encode() + b"\n\n" + payload)
    assert parsed.text == expected_text
    assert parsed.defects == defects
    assert parsed.text is not None
    parsed.text.encode("utf-8")  # always storable


def test_missing_boundary_keeps_the_string_payload_as_text() -> None:
    parsed = parse_message(
        msg('Content-Type: multipart/alternative; boundary="never-used"', "Just some text.\n")
    )
    assert parsed.text == "Just some text.\n"
    assert "StartBoundaryNotFoundDefect" in parsed.defects


def test_blank_payload_of_a_boundaryless_multipart_gives_no_text() -> None:
    parsed = parse_message(msg('Content-Type: multipart/mixed; boundary="x"', "\n\n"))
    assert parsed.text is None and parsed.attachments == ()
    assert "StartBoundaryNotFoundDefect" in parsed.defects


def test_wrong_declared_boundary_is_recovered_from_the_body() -> None:
    parsed = parse_message(
        msg(
            'Content-Type: multipart/alternative; boundary="declared"',
            "--actual\nContent-Type: text/plain\n\nplain\n"
            "--actual\nContent-Type: text/html\n\n<b>html</b>\n--actual--\n",
        )
    )
    assert parsed.text == "plain"
    assert parsed.html == "<b>html</b>"
    assert {"BoundaryRecovered", "StartBoundaryNotFoundDefect"} <= set(parsed.defects)


def test_signature_dashes_are_not_mistaken_for_a_boundary() -> None:
    parsed = parse_message(
        msg('Content-Type: multipart/mixed; boundary="x"', "Hi\n--Ann\nSent from phone\n")
    )
    assert parsed.text == "Hi\n--Ann\nSent from phone\n"
    assert "BoundaryRecovered" not in parsed.defects


def test_binary_data_declared_as_text_becomes_an_attachment() -> None:
    blob = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 64
    parsed = parse_message(b"Subject: outlook\n\n" + blob)
    assert parsed.text is None
    assert [a.data for a in parsed.attachments] == [blob]
    assert parsed.defects == ("BinaryTextPart",)


def test_utf16_text_is_not_mistaken_for_binary() -> None:
    parsed = parse_message(
        b"Content-Type: text/plain; charset=utf-16\n\n" + "hello".encode("utf-16")
    )
    assert parsed.text == "hello"


# --------------------------------------------------------------------- limits


def test_header_longer_than_the_limit_is_not_decoded() -> None:
    limits = ParseLimits(max_header_bytes=100)
    long_subject = "=?utf-8?q?x?= " * 20
    parsed = parse_message(
        msg(f"Subject: {long_subject}\nTo: {'a@example.com, ' * 10}b@example.com"), limits
    )
    assert parsed.subject == ""
    assert parsed.to == ()
    assert parsed.defects == ("HeaderTooLong:Subject", "HeaderTooLong:To")


def test_more_parts_than_max_parts_stops_the_walk_with_a_defect() -> None:
    parts = "".join(f"--x\nContent-Type: application/octet-stream\n\npart {i}\n" for i in range(20))
    parsed = parse_message(
        msg('Content-Type: multipart/mixed; boundary="x"', parts + "--x--\n"),
        ParseLimits(max_parts=5),
    )
    assert "TooManyParts" in parsed.defects
    assert len(parsed.attachments) == 4  # the container counts as one of the five


def test_deep_nesting_is_refused_before_the_feed_parser_sees_it() -> None:
    depth = 600  # more boundary parameters than max_parts: parsed for headers only
    body = "".join(
        f'--b{i}\nContent-Type: multipart/mixed; boundary="b{i + 1}"\n\n' for i in range(depth)
    )
    body += f"--b{depth}\nContent-Type: text/plain\n\ndeep\n"
    parsed = parse_message(
        msg('Subject: deep\nContent-Type: multipart/mixed; boundary="b0"', body),
        ParseLimits(max_parts=500),
    )
    assert parsed.subject == "deep"
    assert parsed.text is None
    assert parsed.defects == ("TooManyParts",)


def test_nesting_past_the_recursion_limit_is_recorded_not_raised() -> None:
    # message/rfc822 nesting has no boundary to count; the feed parser recurses.
    nested = "Content-Type: message/rfc822\n\n" * 1500 + "Subject: core\n\ncore\n"
    parsed = parse_message(("Subject: outer\n" + nested).encode())
    assert parsed.subject == "outer"
    assert "ParseError:parse:RecursionError" in parsed.defects


# --------------------------------------------------------------------- never raises


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00" * 100,
        b"\r\n\r\n",
        b"\n",
        b":",
        b"Subject",
        b"From: <<<>>>\n\n",
        b"Content-Type: multipart/mixed; boundary=\n\n--\n--\n",
        b"Content-Type: multipart/mixed; boundary*0*=utf-8''a%ZZ\n\n--a\n\nx\n",
        b"Content-Type: text/plain; charset*=utf-8''%FF%FE\n\n\xff\xfe",
        b"Content-Type: message/rfc822\nContent-Transfer-Encoding: base64\n\n!!!!\n",
        b"Content-Type: text/plain\nContent-Transfer-Encoding: base64\n\n===a\n",
        b"Content-Type: text/plain\nContent-Transfer-Encoding: x-uuencode\n\nbegin 6 x\n!!\nend\n",
        b"Content-Type: message/delivery-status\n\nReporting-MTA: dns; x\n\nAction: failed\n",
        b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(range(256)) * 20,
    ],
)
def test_odd_inputs_never_raise(raw: bytes) -> None:
    assert isinstance(parse_message(raw), ParsedMessage)


def test_empty_bytes_give_an_empty_message() -> None:
    parsed = parse_message(b"")
    assert (parsed.message_id, parsed.subject, parsed.from_, parsed.date) == (None, "", (), None)
    assert parsed.attachments == () and parsed.defects == ()


@pytest.mark.parametrize("seed", range(20))
def test_random_bytes_never_raise(seed: int) -> None:
    rng = random.Random(seed)
    parsed = parse_message(rng.randbytes(rng.randrange(1, 6000)))
    assert isinstance(parsed, ParsedMessage)
    assert list(parsed.defects) == sorted(set(parsed.defects))


@pytest.mark.parametrize("seed", range(20))
def test_mutated_real_messages_never_raise(seed: int) -> None:
    rng = random.Random(seed)
    data = bytearray(ALTERNATIVE)
    for _ in range(rng.randrange(1, 30)):
        position = rng.randrange(len(data))
        choice = rng.random()
        if choice < 0.4:
            data[position] = rng.randrange(256)
        elif choice < 0.7:
            del data[position : position + rng.randrange(1, 20)]
        else:
            data[position:position] = rng.choice(
                [b"\n", b"--b1\n", b"=?", b"?=", b";", b'"', b"\x00", b"\xff"]
            )
    assert isinstance(parse_message(bytes(data)), ParsedMessage)


def test_bytearray_and_memoryview_are_accepted() -> None:
    raw = msg("Subject: hi")
    assert parse_message(bytearray(raw)).subject == "hi"  # type: ignore[arg-type]
    assert parse_message(memoryview(raw)).subject == "hi"  # type: ignore[arg-type]


def test_defects_are_sorted_and_unique() -> None:
    parsed = parse_message(
        raw_msg(
            b"Subject: \xe9\nTo: @@@\nTo: @@@\nDate: nope\n"
            b"Content-Type: multipart/mixed; boundary=q"
        )
    )
    assert list(parsed.defects) == sorted(set(parsed.defects))
    assert set(parsed.defects) >= {
        "InvalidDate",
        "header:To:InvalidHeaderDefect",
        "header:Subject:UndecodableBytesDefect",
    }


def test_parsed_message_is_immutable() -> None:
    parsed = parse_message(msg("Subject: x"))
    with pytest.raises(AttributeError):
        parsed.subject = "y"  # type: ignore[misc]
