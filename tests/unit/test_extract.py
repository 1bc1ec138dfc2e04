"""What agents read: the new text of replies (plain and HTML, many clients and
languages), sanitised quote-free HTML, attachment text (PDF, DOCX, HTML, text) and the
budget every one of them respects, including on hostile and broken input."""

from __future__ import annotations

import io
import time
import zipfile
from pathlib import Path

import docx
import nh3
import pytest

from mailgate.domain import extract
from mailgate.domain.extract import (
    PDF_MAX_CONTENT_BYTES,
    PDF_MAX_PAGES,
    REASON_ENCRYPTED,
    REASON_EXPANDS_TOO_LARGE,
    REASON_NO_TEXT,
    REASON_PAGE_LIMIT,
    REASON_TOO_LARGE,
    REASON_UNREADABLE,
    REASON_UNSUPPORTED_TYPE,
    ZIP_MAX_EXPANDED_BYTES,
    AttachmentText,
    Extracted,
    attachment_text,
    html_to_text,
    pdf_content_limit,
    reply_html,
    reply_text,
)
from mailgate.domain.mime import parse_message
from mailgate.errors import ValidationFailed

BUDGET = 20_000
MB = 1024 * 1024

# -- builders (also used by the API tests) ------------------------------------------------


def make_pdf(pages: list[str], *, padding: int = 0) -> bytes:
    """A minimal valid PDF, one Helvetica ``Tj`` line per page, with a correct xref;
    ``padding`` bytes of drawing operators (no text) are added to each page."""

    def literal(text: str) -> str:
        return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    count = len(pages)
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(count))
    bodies = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{kids}] /Count {count} >>".encode(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    for i, text in enumerate(pages):
        content = f"BT /F1 12 Tf 72 720 Td ({literal(text)}) Tj ET".encode("latin-1")
        content += b"\n" + b"q Q " * (padding // 4)
        bodies.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            f"/Resources << /Font << /F1 3 0 R >> >> /Contents {5 + 2 * i} 0 R >>".encode()
        )
        bodies.append(b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(bodies, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(bodies) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(bodies) + 1,
        xref,
    )
    return bytes(out)


def make_docx(paragraphs: list[str], table: list[list[str]] | None = None) -> bytes:
    document = docx.Document()
    for paragraph in paragraphs:
        document.add_paragraph(paragraph)
    if table:
        grid = document.add_table(rows=len(table), cols=len(table[0]))
        for r, row in enumerate(table):
            for c, value in enumerate(row):
                grid.cell(r, c).text = value
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


PDF = "application/pdf"
DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"


def read(
    data: bytes,
    content_type: str,
    *,
    filename: str | None = None,
    max_chars: int = BUDGET,
    max_bytes: int = 10 * MB,
) -> AttachmentText:
    return attachment_text(
        data,
        content_type=content_type,
        filename=filename,
        max_chars=max_chars,
        max_bytes=max_bytes,
    )


def new_text(text: str | None, html: str | None = None, max_chars: int = BUDGET) -> str | None:
    return reply_text(text, html, max_chars=max_chars).text


# -- reply text: quote headers ----------------------------------------------------------


@pytest.mark.parametrize(
    ("client", "body", "expected"),
    [
        (
            "gmail",
            "Sounds good, see you then.\n\nOn Mon, Jan 1, 2024 at 10:00 AM John Doe "
            "<john@example.com> wrote:\n> Shall we meet at 3?\n>\n> John\n",
            "Sounds good, see you then.",
        ),
        (
            "gmail, attribution wrapped over two lines",
            "Sounds good.\n\nOn Mon, Jan 1, 2024 at 10:00 AM John Doe <john@example.com>\n"
            "wrote:\n> Shall we meet at 3?\n",
            "Sounds good.",
        ),
        (
            "outlook, original message separator",
            "Approved.\n\n-----Original Message-----\nFrom: A <a@x.com>\nSent: Monday\n"
            "To: B\nSubject: hi\n\nplease approve\n",
            "Approved.",
        ),
        (
            "outlook, header block under a rule",
            "Approved.\n\n________________________________\nFrom: A <a@x.com>\n"
            "Sent: Monday, January 1, 2024 10:00 AM\nTo: B <b@x.com>\nSubject: hi\n\n"
            "please approve\n",
            "Approved.",
        ),
        (
            "apple mail on iphone",
            "Yes, go ahead.\n\nSent from my iPhone\n\nOn Jan 1, 2024, at 10:00, John "
            "<j@x.com> wrote:\n\n> Can I ship it?\n",
            "Yes, go ahead.",
        ),
        (
            "thunderbird",
            "Done.\n\nOn 1/1/24 10:00, John wrote:\n> Is it done?\n",
            "Done.",
        ),
        (
            "german",
            "Ja, passt.\n\nAm 01.01.2024 um 10:00 schrieb Hans Müller <h@x.de>:\n> Passt das?\n",
            "Ja, passt.",
        ),
        (
            "french",
            "Oui.\n\nLe lun. 1 janv. 2024 à 10:00, Jean <j@x.fr> a écrit :\n> Question ?\n",
            "Oui.",
        ),
        (
            "italian",
            "Sì.\n\nIl giorno lun 1 gen 2024 alle ore 10:00 Mario <m@x.it> ha scritto:\n"
            "> Domanda?\n",
            "Sì.",
        ),
        (
            "spanish (the table's pattern wants two spaces: our attribution rule)",
            "Sí.\n\nEl lun, 1 ene 2024 a las 10:00, Juan (<j@x.es>) escribió:\n> ¿Pregunta?\n",
            "Sí.",
        ),
        (
            "dutch gmail (name after the verb: our attribution rule)",
            "Ja.\n\nOp ma 1 jan 2024 om 10:00 schreef Jan <j@x.nl>:\n> Vraag?\n",
            "Ja.",
        ),
        (
            "gmail forward",
            "FYI, see below.\n\n---------- Forwarded message ---------\nFrom: X <x@y.com>\n"
            "Date: Mon\nSubject: s\nTo: me\n\nthe forwarded content\n",
            "FYI, see below.",
        ),
        (
            "apple forward",
            "Have a look.\n\nBegin forwarded message:\n\nFrom: X <x@y.com>\nSubject: s\n\nbody\n",
            "Have a look.",
        ),
    ],
)
def test_the_new_text_of_a_reply_stops_at_the_quote_header(
    client: str, body: str, expected: str
) -> None:
    assert new_text(body) == expected, client


def test_a_trailing_block_of_quoted_lines_is_removed_without_any_header() -> None:
    assert new_text("Yes.\n\n> do you agree?\n> really?\n") == "Yes."


def test_a_quoted_line_whose_wrap_lost_its_marker_is_still_history() -> None:
    body = (
        "Yes.\n\nOn Mon, Jan 1, 2024 at 10:00 AM John <j@x.com> wrote:\n"
        "> a long line that\nwrapped here\n> and goes on\n"
    )
    assert new_text(body) == "Yes."


def test_inline_answers_between_quoted_lines_are_kept_with_their_questions() -> None:
    body = (
        "Answers inline.\n\nOn Mon, Jan 1, 2024 at 10:00 AM John <j@x.com> wrote:\n"
        "> Budget?\n\n5k.\n\n> Deadline?\n\nFriday.\n"
    )
    assert new_text(body) == body.strip()
    interleaved = "> question one?\nanswer one\n\n> question two?\nanswer two"
    assert new_text(interleaved) == interleaved


def test_a_message_that_is_only_quote_or_forward_is_returned_whole() -> None:
    bare_forward = (
        "---------- Forwarded message ---------\nFrom: X <x@y.com>\nDate: Mon\n"
        "Subject: s\nTo: me\n\nthe content\n"
    )
    assert new_text(bare_forward) == bare_forward.strip()
    assert new_text("> all\n> quoted\n") == "> all\n> quoted"


def test_a_bottom_posted_reply_under_its_attribution_is_kept() -> None:
    body = "On Mon, Jan 1, 2024 at 10:00 AM John <j@x.com> wrote:\n> Ready?\n\nYes, ready.\n"
    assert new_text(body) == body.strip()


# -- reply text: signatures ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("Here is the file.\n\n-- \nJohn Doe\nAcme Inc\n", "Here is the file."),
        ("Here is the file.\n\nBest regards,\nJohn Doe\nAcme Inc\n", "Here is the file."),
        ("Anbei die Datei.\n\nMit freundlichen Grüßen\nHans\n", "Anbei die Datei."),
        ("Hi Bob,\n\nLooks fine.\n\nThanks,\nJohn\n", "Hi Bob,\n\nLooks fine."),
        ("On my way.\n\nSent from my iPhone\n", "On my way."),
        (
            "Noted.\n\n" + "_" * 40 + "\nThis e-mail is confidential.\n",
            "Noted.",
        ),
    ],
)
def test_a_trailing_signature_is_removed(body: str, expected: str) -> None:
    assert new_text(body) == expected


@pytest.mark.parametrize(
    "body",
    [
        # A sentence that starts like a sign-off is content, not a signature.
        "Hi,\n\nThanks, I will check tomorrow and send the numbers.\n\nThe figures:\n"
        "- a: 1\n- b: 2",
        # Hyphen lists are content (the library's default takes them for signatures).
        "Items:\n- apples\n- pears\n\nok?",
        # A sign-off followed by a long text is not a signature either.
        "Hi,\n\nBest regards from the conference! Here is what happened:\n"
        + "\n".join(f"Point {i} of the report." for i in range(20)),
        # A single line that is a sign-off is the whole message.
        "Thanks,",
    ],
)
def test_content_that_looks_like_a_signature_is_kept(body: str) -> None:
    assert new_text(body) == body


def test_a_signed_reply_above_a_quote_loses_both() -> None:
    body = (
        "Sounds good.\n\nBest regards,\nJohn\n\nOn Mon, Jan 1, 2024 at 10:00 AM Ann "
        "<a@x.com> wrote:\n> Plan?\n"
    )
    assert new_text(body) == "Sounds good."


# -- reply text: plumbing -----------------------------------------------------------------


def test_text_without_any_quote_is_returned_unchanged_indentation_included() -> None:
    body = "Plain message\n    indented code()\n\n  - nested item\nend"
    assert new_text(body) == body
    assert new_text("\n\n" + body + "\n\n") == body


def test_crlf_line_ends_are_normalised() -> None:
    assert new_text("Yes.\r\n\r\nOn Mon, Jan 1, 2024, John <j@x.com> wrote:\r\n> q\r\n") == "Yes."


def test_the_html_body_is_used_when_there_is_no_text_body() -> None:
    html = (
        '<div dir="ltr">Sounds <b>good</b>.</div><div class="gmail_quote">'
        '<div class="gmail_attr">On Mon, John wrote:</div><blockquote>old</blockquote></div>'
    )
    assert new_text(None, html) == "Sounds good."
    assert new_text("   \n", html) == "Sounds good."


def test_a_message_without_body_has_no_text() -> None:
    assert reply_text(None, None, max_chars=10) == Extracted(None, False, 0)
    assert reply_text("", "", max_chars=10) == Extracted(None, False, 0)


def test_the_budget_cuts_exactly_at_max_chars() -> None:
    assert reply_text("a" * 100, None, max_chars=10) == Extracted("a" * 10, True, 100)
    assert reply_text("a" * 10, None, max_chars=10) == Extracted("a" * 10, False, 10)
    quoted = "b" * 50 + "\n\nOn Mon, Jan 1, 2024, John <j@x.com> wrote:\n" + "> x\n" * 50
    assert reply_text(quoted, None, max_chars=50) == Extracted("b" * 50, False, 50)
    assert reply_text(quoted, None, max_chars=49) == Extracted("b" * 49, True, 50)


def test_a_text_longer_than_the_window_is_cut_with_its_whole_length() -> None:
    line = "word " * 20
    body = (line + "\n") * 5000  # ~500 KB, no quote
    result = reply_text(body, None, max_chars=1000)
    # Lines lose trailing blanks (they cost budget and say nothing).
    assert result.truncated and result.text == ((line.rstrip() + "\n") * 20)[:1000]
    assert result.chars == len(body.strip())


@pytest.mark.parametrize("budget", [0, -5])
def test_a_budget_below_one_is_refused(budget: int) -> None:
    for call in (
        lambda: reply_text("x", None, max_chars=budget),
        lambda: reply_html("<p>x</p>", max_chars=budget),
        lambda: read(b"x", "text/plain", max_chars=budget),
    ):
        with pytest.raises(ValidationFailed) as raised:
            call()
        assert raised.value.code == "validation_failed"


@pytest.mark.parametrize(
    "hostile",
    [
        "On " + "x " * 20_000 + "\n",  # the library's pattern takes a minute on this line
        ("On " + "a " * 95 + "wrote a:\n") * 400,  # many costly candidates
        ("From: x\nhello\n" * 5000),
        ("> " * 5000 + "\n") * 20,
        "-" * 200_000,
    ],
)
def test_hostile_text_costs_bounded_time(hostile: str) -> None:
    started = time.perf_counter()
    result = reply_text(hostile, None, max_chars=BUDGET)
    assert time.perf_counter() - started < 2.0
    assert result.text is not None and len(result.text) <= BUDGET


# -- html -------------------------------------------------------------------------------------


def test_html_to_text_keeps_structure_links_and_entities_and_drops_scripts() -> None:
    html = (
        "<html><head><title>t</title><style>p{color:red}</style></head><body>"
        '<p>Hello&nbsp;<a href="https://x.example/a">there</a> AT&T &amp; co</p>'
        "<ul><li>one<li>two</ul><table><tr><td>a</td><td>b</td></tr></table>"
        "<script>alert(1)</script>line<br>break<pre>  keep\n  this</pre></body></html>"
    )
    assert html_to_text(html) == (
        "Hello there (https://x.example/a) AT&T & co\n\n- one\n- two\n\na b\n\n"
        "line\nbreak\n\n  keep\n  this"
    )


def test_the_html_tokenizer_reads_what_browsers_read() -> None:
    html = (
        "<!DOCTYPE html><HTML><BODY><P CLASS=x>One <a title='a > b' href=https://x.example>"
        "two</a></P><!--[if mso]><p>outlook only</p><![endif]--><!-- <p>hidden</p> -->"
        "<script>document.write('</div><p>fake')</script><br/>three &lt;tag&gt; &copy"
        "<div/>four<?php echo 1 ?><![CDATA[cdata]]><p>five <b"
    )
    assert html_to_text(html) == "One two (https://x.example)\n\nthree <tag> \u00a9\nfour\n\nfive"


@pytest.mark.parametrize(
    "hostile",
    [
        "<!--" * 100_000,  # Python 3.11's HTMLParser: 25 s
        "<div>" * 100_000,  # html5ever (nh3): 28 s
        "<div>" * 40_000 + "</span>" * 30_000,  # libxml2: 3 s
        "<b><i></b></i>" * 40_000,
        "</" * 100_000,
        "&#" * 100_000,
        "<a " + "x=1 " * 100_000 + ">",
        '<a href="' + "x" * 500_000,
        "<span>a</span>" * 100_000,
        "<table><tr><td>" * 30_000,
    ],
)
def test_hostile_html_costs_bounded_time(hostile: str) -> None:
    started = time.perf_counter()
    text = reply_text(None, hostile, max_chars=BUDGET)
    html = reply_html(hostile, max_chars=BUDGET)
    attachment = read(hostile.encode(), "text/html")
    assert time.perf_counter() - started < 3.0
    for result in (text.text, html.text, attachment.text):
        assert result is None or len(result) <= BUDGET


@pytest.mark.parametrize(
    ("client", "html", "kept", "gone"),
    [
        (
            "gmail",
            '<div dir="ltr">Sounds <b>good</b>.<div class="gmail_signature">John, CEO</div>'
            '</div><div class="gmail_quote"><div class="gmail_attr">On Mon, Ann wrote:'
            '</div><blockquote class="gmail_quote">old history</blockquote></div>',
            "Sounds <b>good</b>.",
            ["old history", "John, CEO", "Ann wrote"],
        ),
        (
            "apple mail",
            '<div>Yes.</div><div><br><blockquote type="cite"><div>On Jan 1, Ann wrote:</div>'
            "<div>old history</div></blockquote></div>",
            "Yes.",
            ["old history", "Ann wrote"],
        ),
        (
            "thunderbird",
            '<p>Done.</p><div class="moz-signature">-- <br>Ann</div>'
            '<div class="moz-cite-prefix">On 1/1/24, Bo wrote:<br></div>'
            '<blockquote type="cite" cite="mid:x@y">old history</blockquote>',
            "<p>Done.</p>",
            ["old history", "Bo wrote", "Ann"],
        ),
        (
            "outlook web",
            '<div>Approved.</div><div id="appendonsend"></div><hr style="display:inline-block">'
            '<div id="divRplyFwdMsg"><b>From:</b> A</div><div>old history</div>',
            "<div>Approved.</div>",
            ["old history", "From:"],
        ),
        (
            "outlook desktop",
            '<div class="WordSection1"><p class="MsoNormal">Approved.<o:p></o:p></p>'
            '<div style="border:none;border-top:solid #E1E1E1 1.0pt;padding:3.0pt 0in 0in 0in">'
            "<p><b>From:</b> A</p></div><p>old history</p></div>",
            "<p>Approved.</p>",
            ["old history", "From:"],
        ),
    ],
)
def test_reply_html_drops_the_quoted_blocks_each_client_marks(
    client: str, html: str, kept: str, gone: list[str]
) -> None:
    result = reply_html(html, max_chars=BUDGET)
    assert result.text is not None and kept in result.text, client
    for text in gone:
        assert text not in result.text, (client, text)
    assert not result.truncated


def test_reply_html_is_sanitised() -> None:
    html = (
        '<p onclick="steal()">hi<img src="http://tracker.example/p.gif" alt="pixel">'
        '<img src="cid:logo@x" alt="logo"><script>alert(1)</script>'
        '<a href="javascript:alert(1)">bad</a> <a href="https://ok.example/">ok</a></p>'
        "<style>body{}</style><iframe src='https://evil.example'></iframe>"
    )
    result = reply_html(html, max_chars=BUDGET).text
    assert result is not None
    for banned in ("onclick", "tracker.example", "script", "alert", "javascript", "iframe"):
        assert banned not in result
    assert 'src="cid:logo@x"' in result
    assert 'href="https://ok.example/"' in result
    assert nh3.clean(result, url_schemes={"http", "https", "mailto", "cid"}) == result


def test_reply_html_within_budget_is_cut_at_a_tag_and_stays_well_formed() -> None:
    html = "<div>" + "".join(f"<p>paragraph <b>{i}</b> &amp; more</p>" for i in range(400))
    result = reply_html(html + "</div>", max_chars=500)
    assert result.truncated and result.text is not None
    assert 0 < len(result.text) <= 500
    assert result.text.endswith("</div>")
    assert result.chars > 500
    assert nh3.clean(result.text) == result.text


def test_reply_html_of_only_history_shows_the_whole_message() -> None:
    html = '<div class="gmail_quote">forwarded content</div>'
    assert reply_html(html, max_chars=BUDGET).text == "<div>forwarded content</div>"


def test_reply_html_without_html_is_none() -> None:
    assert reply_html(None, max_chars=10) == Extracted(None, False, 0)
    assert reply_html("  ", max_chars=10) == Extracted(None, False, 0)


def test_without_nh3_reply_html_is_escaped_text(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(extract, "_nh3", None)
    html = '<p>1 < 2 &amp; <b>bold</b></p><div class="gmail_quote">old</div>'
    assert reply_html(html, max_chars=BUDGET) == Extracted("1 &lt; 2 &amp; bold", False, 19)
    cut = reply_html("<p>" + "&amp;" * 50 + "</p>", max_chars=12)
    assert cut.text == "&amp;&amp;" and cut.truncated


# -- attachments -------------------------------------------------------------------------------


def test_pdf_text_is_extracted() -> None:
    found = read(make_pdf(["Invoice 42", "Total: 99 EUR"]), PDF, filename="invoice.pdf")
    assert found.extracted and not found.truncated and found.reason is None
    assert found.text is not None
    assert "Invoice 42" in found.text and "Total: 99 EUR" in found.text
    assert found.content_type == PDF and found.filename == "invoice.pdf"


def test_pdf_text_stops_at_the_budget() -> None:
    pages = [f"page {i} " + "x" * 300 for i in range(50)]
    found = read(make_pdf(pages), PDF, max_chars=700)
    assert found.truncated and found.text is not None and len(found.text) == 700
    assert found.text.startswith("page 0")


def test_pdf_pages_past_the_page_cap_are_not_read() -> None:
    found = read(make_pdf([f"p{i}" for i in range(PDF_MAX_PAGES + 5)]), PDF)
    assert found.truncated and found.reason == REASON_PAGE_LIMIT
    assert found.text is not None
    assert f"p{PDF_MAX_PAGES - 1}" in found.text and f"p{PDF_MAX_PAGES}" not in found.text


def test_a_pdf_with_heavy_pages_stops_at_the_content_limit_in_bounded_time() -> None:
    # ~150 KB of operators a page: the third page passes the content limit.
    data = make_pdf(["light", "second", "third", "fourth"], padding=150 * 1024)
    assert 2 * 150 * 1024 < pdf_content_limit(BUDGET) < 3 * 150 * 1024
    started = time.perf_counter()
    found = read(data, PDF)
    assert time.perf_counter() - started < 10
    assert (found.text, found.truncated, found.reason) == (
        "light\n\nsecond",
        True,
        REASON_PAGE_LIMIT,
    )
    # A small budget reads less content: the first heavy page is already too much.
    assert pdf_content_limit(100) < 150 * 1024 <= PDF_MAX_CONTENT_BYTES
    small = read(data, PDF, max_chars=100)
    assert (small.text, small.truncated, small.reason) == ("", True, REASON_PAGE_LIMIT)


@pytest.mark.parametrize(
    "damaged",
    [
        b"%PDF-1.4\n\x00\x01 this is not a pdf at all",
        b"",
        make_pdf(["half"])[:60],
        b"GIF89a pretending",
    ],
)
def test_a_broken_pdf_yields_no_text_with_a_reason(damaged: bytes) -> None:
    found = read(damaged, PDF)
    assert found.text in (None, "")
    assert found.reason in (REASON_UNREADABLE, REASON_NO_TEXT)
    assert found.truncated is False


def test_an_encrypted_pdf_is_reported_as_such() -> None:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(make_pdf(["secret"]))))
    writer.encrypt(user_password="pw", algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    found = read(out.getvalue(), PDF)
    assert found == AttachmentText(None, False, False, REASON_ENCRYPTED, PDF, None)


def test_docx_paragraphs_and_tables_are_extracted_in_order() -> None:
    data = make_docx(["Quarterly report", "Revenue grew."], table=[["Q1", "10"], ["Q2", "12"]])
    found = read(data, DOCX, filename="report.docx")
    assert found == AttachmentText(
        "Quarterly report\nRevenue grew.\nQ1\t10\nQ2\t12", False, True, None, DOCX, "report.docx"
    )


def test_docx_text_stops_at_the_budget() -> None:
    data = make_docx([f"paragraph {i} " + "y" * 100 for i in range(300)])
    found = read(data, DOCX, max_chars=1000)
    assert found.truncated and found.text is not None and len(found.text) == 1000


def test_a_zip_bomb_docx_is_refused_by_its_expanded_size() -> None:
    buffer = io.BytesIO(make_docx(["innocent"]))
    with (
        zipfile.ZipFile(buffer, "a", compression=zipfile.ZIP_DEFLATED) as archive,
        archive.open("word/media/bomb.bin", "w", force_zip64=True) as member,
    ):
        chunk = b"\0" * MB
        for _ in range(ZIP_MAX_EXPANDED_BYTES // MB + 1):
            member.write(chunk)
    data = buffer.getvalue()
    assert len(data) < 2 * MB  # small on the wire, 64 MiB+ inflated
    found = read(data, DOCX)
    assert found == AttachmentText(None, False, False, REASON_EXPANDS_TOO_LARGE, DOCX, None)


def test_a_corrupt_docx_yields_no_text_with_a_reason() -> None:
    assert read(b"PK\x03\x04 broken zip", DOCX).reason == REASON_UNREADABLE
    not_word = io.BytesIO()
    with zipfile.ZipFile(not_word, "w") as archive:
        archive.writestr("hello.txt", "not a word document")
    found = read(not_word.getvalue(), DOCX)
    assert (found.text, found.extracted, found.reason) == (None, False, REASON_UNREADABLE)


def test_html_attachment_is_read_as_text() -> None:
    data = b"<html><body><h1>Report</h1><p>Total: 5</p><script>x()</script></body></html>"
    found = read(data, "text/html", filename="r.html")
    assert (found.text, found.extracted, found.truncated) == ("Report\n\nTotal: 5", True, False)
    sniffed = b'<meta charset="windows-1252"><p>caf\xe9</p>'
    assert read(sniffed, "text/html").text == "café"


def test_text_attachments_are_decoded_by_their_charset() -> None:
    latin = "Grüße aus Köln, café".encode("latin-1")
    assert read(latin, "text/plain; charset=iso-8859-1").text == "Grüße aus Köln, café"
    assert read(latin, "text/plain").text == "Grüße aus Köln, café"  # not UTF-8: cp1252
    assert read("naïve ✓".encode(), "text/csv").text == "naïve ✓"
    assert read("bom ✓".encode("utf-16"), "text/plain").text == "bom ✓"
    assert read("bom".encode("utf-8-sig"), "text/plain").text == "bom"
    assert read(b"a\r\nb\x00c", "text/plain").text == "a\nbc"


def test_text_attachments_stop_at_the_budget_without_decoding_the_rest() -> None:
    data = ("é" * 10 + "\n").encode() * 100_000  # 2 MB
    found = read(data, "text/plain", max_chars=25)
    assert found.text == ("é" * 10 + "\n") * 2 + "ééé" and found.truncated


def test_a_generic_type_is_refined_by_the_file_extension() -> None:
    found = read(make_pdf(["by name"]), "application/octet-stream", filename="scan.PDF")
    assert found.text == "by name"
    assert read(b"plain", "application/octet-stream", filename="notes.txt").text == "plain"
    unknown = read(b"\x89PNG", "application/octet-stream", filename="x.bin")
    assert unknown.reason == REASON_UNSUPPORTED_TYPE


def test_an_image_is_described_by_type_only() -> None:
    found = read(b"\x89PNG\r\n\x1a\nrest", "image/png", filename="photo.png")
    assert found == AttachmentText(
        None, False, False, REASON_UNSUPPORTED_TYPE, "image/png", "photo.png"
    )


def test_an_attachment_over_the_byte_limit_is_not_read() -> None:
    found = read(b"x" * 101, "text/plain", max_bytes=100)
    assert found == AttachmentText(None, False, False, REASON_TOO_LARGE, "text/plain", None)
    assert read(b"x" * 100, "text/plain", max_bytes=100).text == "x" * 100


def test_a_pdf_with_no_text_is_read_but_empty() -> None:
    found = read(make_pdf([""]), PDF)
    assert (found.text, found.extracted, found.reason) == ("", True, REASON_NO_TEXT)


# -- the shared corpus -------------------------------------------------------------------------

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus"
FILES = (
    sorted(p for p in CORPUS.rglob("*") if p.is_file() and p.name != "SOURCES.md")
    if CORPUS.is_dir()
    else []
)


@pytest.mark.skipif(not FILES, reason=f"MIME corpus not found at {CORPUS}")
def test_every_corpus_message_extracts_within_its_budget() -> None:
    with_text = 0
    for path in FILES:
        parsed = parse_message(path.read_bytes())
        for budget in (200, BUDGET):
            text = reply_text(parsed.text, parsed.html, max_chars=budget)
            html = reply_html(parsed.html, max_chars=budget)
            for result in (text, html):
                assert result.text is None or len(result.text) <= budget, path
                assert result.chars >= 0
            if text.text:
                with_text += budget == BUDGET
                assert "\x00" not in text.text
            for attachment in parsed.attachments:
                found = attachment_text(
                    attachment.data,
                    content_type=attachment.content_type,
                    filename=attachment.filename,
                    max_chars=budget,
                    max_bytes=10 * MB,
                )
                assert found.text is None or len(found.text) <= budget, path
                assert found.extracted or found.reason is not None
    assert with_text > 250  # nearly every message has a body to read
