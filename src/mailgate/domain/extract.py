"""What an agent reads of a message, within a budget: the new text of a reply, its HTML
without the quoted history, and the text of its attachments.

An agent pays for every character it reads, so a reply that quotes a thirty-message
thread should cost what the new lines cost. Everything here is a pure function of the
bytes or strings it is given, never raises on what a stranger sent, and does bounded
work whatever the input: a budget of ``max_chars`` characters of output, and for the
steps that could be made slow or huge on purpose, a bound on the input examined.

Reply text (`reply_text`)
    Cuts the text at the first quote header, then a trailing signature:

    * **quote headers** come from ``mail-parser-reply``'s language tables ("On ...
      wrote:", "Am ... schrieb ...:", "Le ... a écrit :" and ten more languages,
      Outlook ``From:/Sent:/To:`` blocks, ``-----Original Message-----``). Its parser
      itself is not used: it strips every line's indentation, takes any line starting
      with ``- `` or ``Thanks,`` for the start of a signature (cutting lists and
      sentences), and its "wrote:" patterns backtrack quadratically on a long line
      (a 40,000-character line took a minute). So the patterns are applied here, line
      by line, only to short lines ending in a colon, under a work budget.
    * **our own rules** for what the tables miss: a trailing block of ``>`` lines (and
      the attribution line just above it when it holds a date or an address, which
      covers languages and clients the tables do not), forward separators
      (``---------- Forwarded message ---------``, ``Begin forwarded message:``).
      Quoted lines *between* new lines (an inline answer) are kept: they are the
      questions the new lines answer.
    * **signatures**: the RFC 3676 ``-- `` line always; otherwise a sign-off from the
      tables ("Best regards", "Mit freundlichen Grüßen"), a "Sent from my ..." line or a
      long rule of ``_``/``-`` only when what follows is short (a signature, not the rest
      of the message) and the sign-off line itself is not a sentence.

    If nothing would be left, the whole text is returned: a bare forward or a message
    that is all quote is better read whole than not at all.

Reply HTML (`reply_html`)
    Removes quoted blocks by the markers mail clients write (Gmail ``gmail_quote``,
    Apple and Thunderbird ``blockquote type=cite``, Outlook's ``divRplyFwdMsg`` and its
    ``border-top`` separator, after which everything is history, Yahoo, Proton) and
    signature blocks, then sanitises with ``nh3`` (remote images lose their ``src``:
    they are tracking pixels to an agent). Without ``nh3`` installed the result is the
    escaped text.

Attachments (`attachment_text`)
    PDF (pypdf, at most `PDF_MAX_PAGES` pages and `pdf_content_limit` bytes of page
    content: pypdf's cost follows the content, not the text it yields), DOCX
    (python-docx, refused when its zip members would expand past
    `ZIP_MAX_EXPANDED_BYTES`, or its XML past `ZIP_MAX_XML_BYTES`), HTML and
    ``text/*`` (decoded by the declared charset, else UTF-8, else windows-1252; only
    the prefix the budget can use is decoded). Other types are described by type
    only. A file that cannot be read yields ``text=None`` and a ``reason``; nothing
    raises, and reading stops as soon as the budget is full.
"""

from __future__ import annotations

import codecs
import contextlib
import html as html_lib
import io
import re
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Literal

from mailparser_reply.constants import (  # type: ignore[import-untyped]
    GENERIC_MAIL_SEPARATOR,
    MAIL_LANGUAGES,
)

from mailgate.errors import ValidationFailed

if TYPE_CHECKING:
    from pypdf import PageObject

_nh3: ModuleType | None
try:  # nh3 is optional: without it reply_html answers escaped text
    import nh3 as _nh3
except ImportError:  # pragma: no cover - exercised by monkeypatching _nh3 in tests
    _nh3 = None

__all__ = [
    "PDF_MAX_CONTENT_BYTES",
    "PDF_MAX_PAGES",
    "REASON_ENCRYPTED",
    "REASON_EXPANDS_TOO_LARGE",
    "REASON_NO_TEXT",
    "REASON_PAGE_LIMIT",
    "REASON_PARTLY_UNREADABLE",
    "REASON_TOO_LARGE",
    "REASON_UNREADABLE",
    "REASON_UNSUPPORTED_TYPE",
    "ZIP_MAX_EXPANDED_BYTES",
    "ZIP_MAX_XML_BYTES",
    "AttachmentText",
    "Extracted",
    "attachment_text",
    "html_to_text",
    "pdf_content_limit",
    "reply_html",
    "reply_text",
]

# -- results ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Extracted:
    """Text (or HTML) cut to a budget."""

    text: str | None
    """None when there was nothing to extract from (no body of that kind)."""
    truncated: bool
    """The budget cut the result: ``text`` is its first ``max_chars`` characters (HTML:
    at most that many, cut at a tag boundary and re-balanced)."""
    chars: int
    """Length of the whole extraction before the cut. When the input was too large to
    examine whole it is an estimate: the length of what was examined or of the source."""


@dataclass(frozen=True, slots=True)
class AttachmentText:
    """What an agent can read of one attachment."""

    text: str | None
    truncated: bool
    extracted: bool
    """True when the file was of a readable type and was read (``text`` may still be
    ``""`` for a PDF of scanned images)."""
    reason: str | None
    """Why there is no (or only partial) text: one of the ``REASON_*`` codes, else None."""
    content_type: str
    filename: str | None = None


REASON_TOO_LARGE = "too_large"
"""Larger than the byte limit: described by type, not read."""
REASON_UNSUPPORTED_TYPE = "unsupported_type"
"""A type with no text extractor (images, archives, ...)."""
REASON_UNREADABLE = "unreadable"
"""The file is corrupt or not what its type says."""
REASON_PARTLY_UNREADABLE = "partly_unreadable"
"""Some PDF pages could not be read; the text is that of the others."""
REASON_ENCRYPTED = "encrypted"
"""A PDF that needs a password."""
REASON_EXPANDS_TOO_LARGE = "expands_too_large"
"""A zip container (DOCX) whose members would expand past `ZIP_MAX_EXPANDED_BYTES`."""
REASON_PAGE_LIMIT = "page_limit"
"""Reading stopped at `PDF_MAX_PAGES` pages or `pdf_content_limit` bytes of page content
(the text is that of the pages before; none if the first page alone is over)."""
REASON_NO_TEXT = "no_text"
"""Read, but it holds no text (e.g. a scanned PDF)."""

PDF_MAX_PAGES = 100
"""Pages of one PDF read at most, whatever the budget: each costs parsing time."""
PDF_MAX_CONTENT_BYTES = 512 * 1024
"""Decoded page content (drawing operators) read at most per PDF, whatever the budget
(`pdf_content_limit` scales it down for small budgets). pypdf's text extraction costs
~2.5 us per byte of dense operators on this hardware (more under load), so this bounds
one PDF to about a second; a text page holds ~25 KB of content for ~2,000 characters,
so the default budget (20,000 characters) needs ~250 KB."""
ZIP_MAX_EXPANDED_BYTES = 64 * 1024 * 1024
"""Sum of the declared sizes of a DOCX's zip members beyond which it is not opened.
Python's zipfile stops at a member's declared size (and fails its CRC check if the data
would go on), so the declared sizes bound the memory python-docx can use."""
ZIP_MAX_XML_BYTES = 16 * 1024 * 1024
"""Of those, the XML parts (parsed into a tree, several times their size in memory)."""
ZIP_MAX_MEMBERS = 5000

_LOOKAHEAD = 16 * 1024
"""Characters examined past the budget when looking for a quote header or signature."""
_HTML_SCAN = 64 * 1024
"""HTML is examined up to 16 x the budget plus this (markup is mostly not text)."""


def _check_budget(max_chars: int) -> None:
    if max_chars < 1:
        raise ValidationFailed(
            "max_chars must be at least 1",
            errors=[{"field": "max_chars", "message": "must be at least 1"}],
        )


# -- html walking ----------------------------------------------------------------------


def _names(spaced: str) -> frozenset[str]:
    return frozenset(spaced.split())


_VOID = _names("area base br col embed hr img input link meta param source track wbr")
_SKIP_CONTENT = _names("script style head title template noscript object iframe svg")
_BLOCK = _names(
    """address article aside center dd details div dl dt fieldset figcaption figure
    footer form h1 h2 h3 h4 h5 h6 header hr li main nav ol p pre section summary table
    tbody thead tfoot tr ul blockquote caption"""
)
_PARAGRAPH = _names("p h1 h2 h3 h4 h5 h6 ul ol table blockquote pre dl hr")
_KEEP_ATTRS = _names(
    """href src alt title colspan rowspan start dir lang cite datetime width height
    align scope headers span"""
)
_QUOTE_CLASSES = frozenset(
    {
        "gmail_quote",
        "gmail_quote_container",
        "yahoo_quoted",
        "moz-cite-prefix",
        "protonmail_quote",
        "zmail_extra",
        "gmail_signature",
        "moz-signature",
    }
)
_END_IDS = frozenset({"divrplyfwdmsg", "appendonsend"})
_LINK_SCHEMES = ("http://", "https://", "mailto:")

_Kind = Literal["drop", "end"]


def _marker(tag: str, attrs: list[tuple[str, str | None]]) -> _Kind | None:
    """Is this element quoted history (``drop`` it) or the start of the history that
    runs to the end of the message (``end``)? Keyed on what clients write."""
    values = {name: value or "" for name, value in attrs}
    classes = set(values.get("class", "").lower().split())
    if classes & _QUOTE_CLASSES:
        return "drop"
    if values.get("data-smartmail", "").lower() == "gmail_signature":
        return "drop"
    if tag == "blockquote" and values.get("type", "").lower() == "cite":
        return "drop"
    element_id = values.get("id", "").lower()
    if element_id in _END_IDS or element_id.startswith("divrplyfwdmsg"):
        return "end"
    if tag == "hr" and element_id == "stopspelling":
        return "end"
    if element_id in ("signature", "x_signature"):
        return "drop"
    if tag == "div" and "style" in values:
        style = "".join(values["style"].lower().split())
        # Outlook desktop's separator above "From: ... Sent: ..." of the quoted mail.
        if "border-top:solid" in style and "padding:3.0pt0" in style:
            return "end"
    return None


class _Stop(Exception):
    """Raised from a handler to end the walk early (budget full, or history reached)."""


_MAX_DEPTH = 256
"""Elements nested deeper are ignored (their text is kept). Both html5ever (nh3) and
libxml2 do work proportional to the depth for each element, so hostile nesting would
make them quadratic."""
_ASCII_LETTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_TAG_NAME = re.compile(r"[a-zA-Z][^\t\n\f\r />]*")
# Possessive: on a tag left open at the end of the input it fails in one pass.
_TAG_REST = re.compile(r"""(?:[^>"']++|"[^"]*+"|'[^']*+')*+>""")
_ATTRIBUTE = re.compile(
    r"""([^\s"'>/=][^\s"'>/=]*)(?:\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'=<>`]+)))?"""
)
_RAW_TEXT = _names("script style title xmp iframe noembed noframes noscript textarea")


def _raw_end(name: str) -> re.Pattern[str]:
    return _RAW_ENDS.setdefault(name, re.compile(rf"</{name}[\s/>]", re.IGNORECASE))


_RAW_ENDS: dict[str, re.Pattern[str]] = {}


def _attributes(text: str) -> list[tuple[str, str | None]]:
    found: list[tuple[str, str | None]] = []
    for match in _ATTRIBUTE.finditer(text):
        name, double, single, bare = match.groups()
        value = double if double is not None else single if single is not None else bare
        found.append((name.lower(), None if value is None else html_lib.unescape(value)))
    return found


class _Walker:
    """One pass over HTML producing either text or filtered HTML.

    The tokenizer is our own and linear in the input: the stdlib's ``HTMLParser``
    (Python 3.11) is quadratic on unclosed comments (``"<!--" * 100_000`` took 25 s)
    and html5ever on deep nesting (100,000 ``<div>`` took 28 s). Constructs are found
    with ``str.find`` and possessive patterns; a tag, comment or raw-text element left
    open at the end of the input ends the walk, as it ends a browser's.

    There is no tree: a stack of open element names tells where a dropped (quoted)
    element ends. An end tag closes the innermost open element of its name and all
    opened inside it (how browsers recover from unclosed ``<p>`` and ``<li>``); an end
    tag with no open element of its name is ignored in constant time.
    """

    def __init__(self, *, as_html: bool, drop_quotes: bool, out_limit: int) -> None:
        self.as_html = as_html
        self.drop_quotes = drop_quotes
        self.out_limit = out_limit
        self.stack: list[str] = []
        self.open: dict[str, int] = {}
        self.hidden: int | None = None  # stack depth of the dropped/skipped element
        self.pieces: list[str] = []
        self.size = 0
        self.budget_hit = False
        self.reached_history = False
        self.dropped = False
        # text mode
        self.pending = 0  # newlines owed before the next text
        self.space = False
        self.line_start = True
        self.prefix = ""
        self.pre = 0
        self.link: tuple[str, int] | None = None

    # -- output --------------------------------------------------------------------
    def _put(self, value: str) -> None:
        room = self.out_limit - self.size
        if len(value) >= room:
            self.pieces.append(value[:room])
            self.size = self.out_limit
            self.budget_hit = True
            raise _Stop
        self.pieces.append(value)
        self.size += len(value)
        self.line_start = value.endswith("\n")

    def _flush(self) -> None:
        if self.pending and self.size:
            self._put("\n" * self.pending)
            self.space = False
        self.pending = 0
        if self.prefix:
            prefix, self.prefix = self.prefix, ""
            self._put(prefix)

    def _block(self, tag: str) -> None:
        self.pending = max(self.pending, 2 if tag in _PARAGRAPH else 1)

    # -- tokens ------------------------------------------------------------------------
    def _push(self, tag: str) -> None:
        self.stack.append(tag)
        self.open[tag] = self.open.get(tag, 0) + 1

    def _tokens(self, source: str) -> None:
        """Call the handlers for ``source``, left to right."""
        pos, end, find = 0, len(source), source.find
        while pos < end:
            lt = find("<", pos)
            if lt < 0:
                self.handle_data(html_lib.unescape(source[pos:]))
                return
            if lt > pos:
                self.handle_data(html_lib.unescape(source[pos:lt]))
            following = source[lt + 1 : lt + 2]
            if following in _ASCII_LETTERS:
                name = _TAG_NAME.match(source, lt + 1)
                assert name is not None
                rest = _TAG_REST.match(source, name.end())
                if rest is None:
                    return  # a tag open at the end of the input: dropped, as browsers do
                tag = name.group().lower()
                inside = source[name.end() : rest.end() - 1]
                pos = rest.end()
                self.handle_starttag(tag, _attributes(inside))
                if inside.endswith("/") and tag not in _VOID:
                    self.handle_endtag(tag)
                elif tag in _RAW_TEXT:
                    close = _raw_end(tag).search(source, pos)
                    self.handle_data(source[pos : end if close is None else close.start()])
                    if close is None:
                        return
                    pos = close.start()
            elif source.startswith("<!--", lt):
                close_at = find("-->", lt + 4)
                if close_at < 0:
                    return
                pos = close_at + 3
            elif following in ("/", "!", "?"):
                gt = find(">", lt + 2)
                if gt < 0:
                    return
                if following == "/" and source[lt + 2 : lt + 3] in _ASCII_LETTERS:
                    name = _TAG_NAME.match(source, lt + 2)
                    assert name is not None
                    self.handle_endtag(name.group().lower())
                pos = gt + 1
            else:
                self.handle_data("<")
                pos = lt + 1

    # -- handlers ----------------------------------------------------------------------
    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if len(self.stack) >= _MAX_DEPTH and tag not in _VOID:
            return
        if self.hidden is not None:
            if tag not in _VOID:
                self._push(tag)
            return
        kind = _marker(tag, attrs) if self.drop_quotes else None
        if kind == "end":
            self.reached_history = True
            self.dropped = True
            raise _Stop
        if tag not in _VOID:
            self._push(tag)
        if kind == "drop" or tag in _SKIP_CONTENT:
            if tag not in _VOID:
                self.hidden = len(self.stack)
                self.dropped = self.dropped or kind == "drop"
            return
        if self.as_html:
            self._html_start(tag, attrs)
        else:
            self._text_start(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if not self.open.get(tag):
            return  # a stray end tag: nothing of that name is open
        while True:
            closed = self.stack.pop()
            self.open[closed] -= 1
            if closed == tag:
                break
        if self.hidden is not None:
            if len(self.stack) < self.hidden:
                self.hidden = None
            return
        if self.as_html:
            self._put(f"</{tag}>")
        else:
            self._text_end(tag)

    def handle_data(self, data: str) -> None:
        if self.hidden is not None:
            return
        if self.as_html:
            self._put(html_lib.escape(data, quote=False))
        else:
            self._text(data)

    # -- html mode -------------------------------------------------------------------
    def _html_start(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        kept = "".join(
            f' {name}="{html_lib.escape(value or "")}"'
            for name, value in attrs
            if name in _KEEP_ATTRS
        )
        self._put(f"<{tag}{kept}>")

    # -- text mode -------------------------------------------------------------------
    def _text_start(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "br":
            self._flush()
            self._put("\n")
            self.space = False
        elif tag in _BLOCK:
            self._block(tag)
            if tag == "li":
                self.prefix = "- "
            elif tag == "pre":
                self.pre += 1
        elif tag in ("td", "th"):
            self.space = True
        elif tag == "a":
            href = dict(attrs).get("href") or ""
            if href.lower().startswith(_LINK_SCHEMES) and len(href) <= 2048:
                self.link = (href, len(self.pieces))

    def _text_end(self, tag: str) -> None:
        if tag in _BLOCK:
            self._block(tag)
            if tag == "pre" and self.pre:
                self.pre -= 1
        elif tag == "a" and self.link is not None:
            href, start = self.link
            self.link = None
            shown = "".join(self.pieces[start:])
            target = href[7:] if href.lower().startswith("mailto:") else href
            if shown.strip() and target not in shown:
                self._put(f" ({target})")

    def _text(self, data: str) -> None:
        if self.pre:
            if data:
                self._flush()
                self._put(data)
            return
        words = data.split()
        if not words:
            self.space = self.space or bool(data)
            return
        if data[0].isspace():
            self.space = True
        self._flush()
        if self.space and not self.line_start:
            self._put(" ")
        self._put(" ".join(words))
        self.space = data[-1].isspace()

    # -- running -----------------------------------------------------------------------
    def run(self, source: str, scan_limit: int) -> tuple[str, bool]:
        """Walk ``source`` (at most ``scan_limit`` characters of it); return the output
        and whether it was cut (budget full, or more input left unexamined while new
        content was being read)."""
        examined = source[:scan_limit]
        with contextlib.suppress(_Stop):
            self._tokens(examined)
        cut = self.budget_hit or (
            len(source) > len(examined) and not self.reached_history and self.hidden is None
        )
        return "".join(self.pieces), cut


def _tidy_text(text: str) -> str:
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _html_text(html: str, *, drop_quotes: bool, out_limit: int) -> tuple[str, bool, bool]:
    """Text of ``html``: (text, cut, quotes_dropped)."""
    walker = _Walker(as_html=False, drop_quotes=drop_quotes, out_limit=out_limit)
    text, cut = walker.run(html, 16 * out_limit + _HTML_SCAN)
    return _tidy_text(text), cut, walker.dropped


def html_to_text(html: str) -> str:
    """Readable text of an HTML document: block elements become line breaks, list
    items ``- ``, links keep their target as ``text (url)``; scripts, styles and the
    head are dropped. Nothing is removed as quoted history (see `reply_text`)."""
    return _html_text(html, drop_quotes=False, out_limit=2 * len(html) + 16)[0]


# -- reply text --------------------------------------------------------------------------

_LINE_CAP = 200
"""Lines are compared against the header patterns cut to this length: no attribution
line is longer, and the patterns' cost grows with the square of a line's length."""
_HEADER_WORK = 1_000_000
"""Budget (sum of squared candidate lengths) for the "wrote:" patterns in one call,
about 50 ms on a hostile text; past it only our own linear rules run."""
_SIG_MAX_LINES = 12
_SIG_MAX_CHARS = 1000


def _language_patterns(key: str) -> list[str]:
    found: list[str] = []
    for table in MAIL_LANGUAGES.values():
        value = table.get(key)
        if isinstance(value, list):
            found.extend(str(v) for v in value if v)
        elif value:
            found.append(str(value))
    return found


_WROTE = re.compile("|".join(_language_patterns("wrote_header")), re.IGNORECASE | re.MULTILINE)
_FROM_BLOCK = re.compile(
    "|".join([*_language_patterns("from_header"), f"({GENERIC_MAIL_SEPARATOR})"]),
    re.IGNORECASE | re.MULTILINE,
)
# Sign-offs must start with a word ("/\w+", Swedish initials, would take any path).
_SIGN_OFF = re.compile(
    r"^(?:> ?)*(?:"
    + "|".join(p for p in _language_patterns("signatures") if p[0].isalpha() or p[0] == "(")
    + r")(?![^\W\d_])",
    re.IGNORECASE,
)
_SENT_FROM = re.compile(
    r"^(?:> ?)*(?:" + "|".join(_language_patterns("sent_from")) + r")", re.IGNORECASE
)
_FORWARD = re.compile(
    r"^(?:-{2,}\s*(?:forwarded message|original message|weitergeleitete nachricht|"
    r"ursprüngliche nachricht|message transféré|message d'origine|mensaje reenviado|"
    r"mensaje original|messaggio inoltrato|messaggio originale|doorgestuurd bericht|"
    r"oorspronkelijk bericht)\s*-{2,}|begin forwarded message:)$",
    re.IGNORECASE,
)
_KEY_LINE = re.compile(r"^(?:> ?)*[* ]*(?:[-\[]|[^\W\d_][^:\uff1a]{0,30}[:\uff1a])")
_BLOCK_TRIES = 500
"""Header-block patterns tried per call (each at one line)."""
_RULE = re.compile(r"^[_-]{30,}$")
_ATTRIBUTION_HINT = re.compile(r"[@\d]")
_SENTENCE_END = re.compile(r"[.?!]")


def _quoted(line: str) -> bool:
    return line.startswith(">")


def _header_line(norm: list[str]) -> tuple[int, bool]:
    """Where the first quote header starts (``len(norm)`` if none) and whether it is
    an attribution ("... wrote:"), whose quote is ``>``-prefixed.

    The tables' patterns are tried only where they can match: the header-block ones
    at lines that look like ``Key:`` (or a ``-----`` separator), the attribution ones
    at lines ending in a colon, each under a budget. Searched over the whole text the
    thirteen header-block patterns cost ~30 us a character on hostile input.
    """
    joined = "\n".join(norm)
    offset = 0
    wrote_work = 0
    block_tries = 0
    for index, line in enumerate(norm):
        position, offset = offset, offset + len(line) + 1
        if not line:
            continue
        if _FORWARD.match(line):
            return index, False
        if _KEY_LINE.match(line) and block_tries < _BLOCK_TRIES:
            block_tries += 1
            # From the newline before the line, so "> From:" (quoted) matches too.
            if _FROM_BLOCK.match(joined, max(position - 1, 0)):
                return index, False
        if not line.endswith((":", "\uff1a")) or wrote_work > _HEADER_WORK:
            continue
        candidates = [(index, line)]
        if index and norm[index - 1]:
            candidates.append((index - 1, f"{norm[index - 1]}\n{line}"))
        for start, text in candidates:
            wrote_work += len(text) ** 2
            if wrote_work <= _HEADER_WORK and _WROTE.match(text):
                return start, True
    return len(norm), False


def _answers_inline(norm: list[str], header: int) -> bool:
    """After an attribution, does the writer answer between the quoted lines? Then the
    "history" is the question being answered and stays. An unquoted line counts only
    after a blank line, so a quoted line whose wrap lost its ``>`` does not."""
    seen_quote = False
    for index in range(header + 1, len(norm)):
        line = norm[index]
        if not line:
            continue
        if _quoted(line):
            seen_quote = True
        elif seen_quote and not norm[index - 1] and line not in ("--", "__"):
            return True
    return False


def _trailing_quote(norm: list[str], end: int) -> int:
    """Cut before a block of ``>`` lines that runs to ``end`` (and its attribution)."""
    last = end - 1
    while last >= 0 and (not norm[last] or _quoted(norm[last])):
        last -= 1
    if not any(_quoted(line) for line in norm[last + 1 : end]):
        return end
    cut = last + 1
    line = norm[last] if last >= 0 else ""
    if line.endswith((":", "\uff1a")) and _ATTRIBUTION_HINT.search(line):
        cut = last
        above = norm[last - 1] if last >= 1 else ""
        # A wrapped attribution ("On ... <addr>" / "wrote:") is two short lines.
        if (
            above
            and not _quoted(above)
            and len(above) + len(line) < _LINE_CAP
            and not _SENTENCE_END.search(above[-1:])
        ):
            cut = last - 1
    return cut


def _signature_line(norm: list[str], raw: list[str], end: int) -> int:
    """Index of the line where a trailing signature starts, else ``end``."""
    first = next((i for i in range(end) if norm[i]), end)
    # Where a short tail (at most _SIG_MAX_LINES lines, _SIG_MAX_CHARS) can start.
    short_from, lines, chars = end, 0, 0
    for index in range(end - 1, first, -1):
        if norm[index]:
            lines, chars = lines + 1, chars + len(norm[index])
            if lines > _SIG_MAX_LINES or chars > _SIG_MAX_CHARS:
                break
        short_from = index
    for index in range(first + 1, end):
        line = norm[index]
        if not line:
            continue
        if raw[index] in ("-- ", "--"):
            return index
        if index < short_from:
            continue
        if line == "__" or _RULE.match(line):
            return index
        if len(line) <= 80 and _SENT_FROM.match(line):
            return index
        sign_off = _SIGN_OFF.match(line)
        if sign_off is not None:
            rest = line[sign_off.end() :]
            if len(rest.split()) <= 3 and not _SENTENCE_END.search(rest):
                return index
    return end


def _new_lines(source: str) -> tuple[str, bool]:
    """The new text of ``source`` and whether anything was cut off its end."""
    raw = source.split("\n")
    norm = [line.strip()[:_LINE_CAP] for line in raw]
    end, attribution = _header_line(norm)
    if attribution and _answers_inline(norm, end):
        end = len(norm)
    end = _trailing_quote(norm, end)
    end = _signature_line(norm, raw, end)
    kept = raw[:end]
    while kept and not kept[-1].strip():
        kept.pop()
    first = 0
    while first < len(kept) and not kept[first].strip():
        first += 1
    return "\n".join(line.rstrip() for line in kept[first:]), end < len(raw)


def reply_text(text: str | None, html: str | None, *, max_chars: int) -> Extracted:
    """The new text of a message: quoted history and a trailing signature removed.

    Uses the text body; when there is none (or it is blank) the HTML body, with its
    quoted blocks dropped by their markup first. ``text`` is None only when the
    message has neither body. Lines keep their indentation but lose trailing blanks;
    blank lines at the start and end are dropped. Costs ~90 us for a 4 KB reply.

    Raises:
        ValidationFailed: ``max_chars`` is below 1.
    """
    _check_budget(max_chars)
    window = max_chars + _LOOKAHEAD
    source: str | None = text if text is not None and text.strip() else None
    incomplete = False
    if source is None and html:
        source, incomplete, dropped = _html_text(html, drop_quotes=True, out_limit=window)
        if not source and dropped:  # nothing but history: read it whole
            source, incomplete, _ = _html_text(html, drop_quotes=False, out_limit=window)
    if not source:
        return Extracted(None, False, 0)
    source = source.replace("\r\n", "\n").replace("\r", "\n")
    examined = source[:window]
    incomplete = incomplete or len(source) > window
    new, cut = _new_lines(examined)
    if not new:
        new, cut = examined.strip(), False
    if incomplete and not cut:
        # No quote or signature in what was examined: the text goes on past it.
        return Extracted(new[:max_chars], True, max(len(source.strip()), len(new)))
    return Extracted(new[:max_chars], len(new) > max_chars, len(new))


# -- reply html ----------------------------------------------------------------------------


def _img_src_filter(tag: str, attribute: str, value: str) -> str | None:
    """Only inline (``cid:``) images keep a source: a remote one is a read receipt."""
    if tag == "img" and attribute == "src" and not value.lower().startswith("cid:"):
        return None
    return value


def _sanitise(fragment: str) -> str:
    assert _nh3 is not None
    cleaned: str = _nh3.clean(
        fragment,
        url_schemes={"http", "https", "mailto", "cid"},
        attribute_filter=_img_src_filter,
    )
    return cleaned.strip()


def _fit_html(cleaned: str, max_chars: int) -> str:
    """``cleaned`` cut to at most ``max_chars``, never inside a tag or an entity, with
    the elements left open closed again (by sanitising the cut once more)."""
    limit = max_chars
    for _ in range(8):
        piece = cleaned[:limit]
        if piece.rfind("<") > piece.rfind(">"):
            piece = piece[: piece.rfind("<")]
        amp = piece.rfind("&")
        if amp > piece.rfind(";") and amp >= len(piece) - 12:
            piece = piece[:amp]
        fitted = _sanitise(piece)
        if len(fitted) <= max_chars:
            return fitted
        limit -= len(fitted) - max_chars + 16
        if limit <= 0:
            break
    return ""


def reply_html(html: str | None, *, max_chars: int) -> Extracted:
    """The HTML body without its quoted history and signature blocks, sanitised.

    The result is safe to render (scripts, styles, event handlers and remote images
    are gone) and at most ``max_chars`` long. Without ``nh3`` installed it is the
    HTML-escaped text instead.

    Raises:
        ValidationFailed: ``max_chars`` is below 1.
    """
    _check_budget(max_chars)
    if not html or not html.strip():
        return Extracted(None, False, 0)
    scan = 16 * max_chars + _HTML_SCAN
    if _nh3 is None:
        text, cut, _ = _html_text(html, drop_quotes=True, out_limit=max_chars + 1)
        if not text:
            text, cut, _ = _html_text(html, drop_quotes=False, out_limit=max_chars + 1)
        escaped = html_lib.escape(text, quote=False)
        if len(escaped) <= max_chars and not cut:
            return Extracted(escaped, False, len(escaped))
        piece = escaped[:max_chars]
        amp = piece.rfind("&")
        if amp > piece.rfind(";"):
            piece = piece[:amp]
        return Extracted(piece, True, max(len(escaped), max_chars + 1))
    out_limit = 4 * max_chars + 4096
    walker = _Walker(as_html=True, drop_quotes=True, out_limit=out_limit)
    filtered, cut = walker.run(html, scan)
    cleaned = _sanitise(filtered)
    if walker.dropped and not _visible(cleaned):
        # Nothing but history: show the message whole rather than nothing.
        walker = _Walker(as_html=True, drop_quotes=False, out_limit=out_limit)
        filtered, cut = walker.run(html, scan)
        cleaned = _sanitise(filtered)
    if len(cleaned) <= max_chars and not cut:
        return Extracted(cleaned, False, len(cleaned))
    return Extracted(_fit_html(cleaned, max_chars), True, max(len(cleaned), max_chars + 1))


def _visible(fragment: str) -> bool:
    return bool(re.sub(r"<[^>]*>|&nbsp;|\s", "", fragment))


# -- attachments ------------------------------------------------------------------------

_PDF_TYPES = frozenset({"application/pdf", "application/x-pdf", "application/acrobat"})
_DOCX_TYPES = frozenset({"application/vnd.openxmlformats-officedocument.wordprocessingml.document"})
_HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})
_TEXT_APPLICATION = frozenset(
    {"application/json", "application/xml", "application/x-yaml", "application/yaml"}
)
_GENERIC_TYPES = frozenset(
    {"", "application/octet-stream", "binary/octet-stream", "application/x-download"}
)
_FileKind = Literal["pdf", "docx", "html", "text"]
_BY_EXTENSION: dict[str, _FileKind] = {
    "pdf": "pdf",
    "docx": "docx",
    "htm": "html",
    "html": "html",
    "txt": "text",
    "text": "text",
    "csv": "text",
    "md": "text",
    "log": "text",
    "json": "text",
    "xml": "text",
}


def _split_type(content_type: str) -> tuple[str, dict[str, str]]:
    mime, _, rest = content_type.partition(";")
    params: dict[str, str] = {}
    for item in rest.split(";"):
        name, sep, value = item.partition("=")
        if sep:
            params[name.strip().lower()] = value.strip().strip('"').strip()
    return mime.strip().lower(), params


def _kind(mime: str, filename: str | None) -> _FileKind | None:
    if mime in _PDF_TYPES:
        return "pdf"
    if mime in _DOCX_TYPES:
        return "docx"
    if mime in _HTML_TYPES:
        return "html"
    if mime.startswith("text/") or mime in _TEXT_APPLICATION:
        return "text"
    if mime.endswith(("+json", "+xml")):
        return "text"
    if mime in _GENERIC_TYPES and filename and "." in filename:
        return _BY_EXTENSION.get(filename.rsplit(".", 1)[1].lower())
    return None


_CONTROL = dict.fromkeys([*range(0, 9), 11, 12, *range(14, 32), 127])
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?([A-Za-z0-9_:.-]{1,40})""", re.I)


def _codec(name: str | None) -> str | None:
    if not name:
        return None
    try:
        return codecs.lookup(name.strip()).name
    except LookupError:
        return None


def _decode(data: bytes, charset: str | None, max_chars: int, *, sniff_html: bool) -> str:
    """Decode at most what ``max_chars`` characters can take (4 bytes each, plus a
    margin), so a 10 MB text file costs what its first page costs."""
    limit = 4 * max_chars + 16
    prefix, whole = data[:limit], len(data) <= limit
    codec = _codec(charset)
    if codec is None and prefix.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        codec = "utf-16"
    if codec is None and prefix.startswith(codecs.BOM_UTF8):
        codec = "utf-8-sig"
    if codec is None:
        try:
            codecs.getincrementaldecoder("utf-8")("strict").decode(prefix, final=whole)
            codec = "utf-8"
        except UnicodeDecodeError:
            codec = None
    if codec is None and sniff_html:
        meta = _META_CHARSET.search(prefix[:4096])
        codec = _codec(meta.group(1).decode("ascii")) if meta else None
    decoder = codecs.getincrementaldecoder(codec or "cp1252")("replace")
    text: str = decoder.decode(prefix, final=whole)
    return text.replace("\r\n", "\n").replace("\r", "\n").translate(_CONTROL)


def pdf_content_limit(max_chars: int) -> int:
    """Page content bytes read for a budget of ``max_chars``: 64 KiB plus 16 bytes a
    character, at most `PDF_MAX_CONTENT_BYTES` (a small budget never pays for pages
    it cannot use)."""
    return min(PDF_MAX_CONTENT_BYTES, 64 * 1024 + 16 * max_chars)


def _page_content_size(page: PageObject) -> int:
    contents = page.get_contents()
    return 0 if contents is None else len(contents.get_data())


def _pdf_text(data: bytes, max_chars: int) -> tuple[str | None, bool, str | None]:
    from pypdf import PdfReader

    reader = PdfReader(io.BytesIO(data), strict=False)
    if reader.is_encrypted:
        try:
            if not reader.decrypt(""):
                return None, False, REASON_ENCRYPTED
        except Exception:
            return None, False, REASON_ENCRYPTED
    pieces: list[str] = []
    size, content, failed = 0, 0, 0
    truncated, reason = False, None
    pages = reader.pages
    count = len(pages)
    content_limit = pdf_content_limit(max_chars)
    for number in range(count):
        if number == PDF_MAX_PAGES:
            truncated, reason = True, REASON_PAGE_LIMIT
            break
        try:
            page = pages[number]
            content += _page_content_size(page)
            if content > content_limit:
                truncated, reason = True, REASON_PAGE_LIMIT
                break
            page_text = (page.extract_text() or "").strip()
        except Exception:
            failed += 1
            continue
        pieces.append(page_text)
        size += len(page_text) + 2
        if size > max_chars:
            truncated = True
            break
    text = "\n\n".join(p for p in pieces if p).translate(_CONTROL)
    if failed and not text:
        return None, False, REASON_UNREADABLE
    if failed:
        reason = reason or REASON_PARTLY_UNREADABLE
    return text, truncated, reason


def _docx_blocks(data: bytes) -> Iterator[str]:
    from docx import Document
    from docx.table import Table

    document = Document(io.BytesIO(data))
    for block in document.iter_inner_content():
        if isinstance(block, Table):
            for row in block.rows:
                cells: list[str] = []
                for cell in row.cells:
                    value = cell.text.strip()
                    if not cells or cells[-1] != value:
                        cells.append(value)
                yield "\t".join(cells)
        else:
            yield block.text


def _docx_text(data: bytes, max_chars: int) -> tuple[str | None, bool, str | None]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        members = archive.infolist()
        xml = sum(m.file_size for m in members if m.filename.endswith((".xml", ".rels")))
        if (
            len(members) > ZIP_MAX_MEMBERS
            or sum(m.file_size for m in members) > ZIP_MAX_EXPANDED_BYTES
            or xml > ZIP_MAX_XML_BYTES
        ):
            return None, False, REASON_EXPANDS_TOO_LARGE
    pieces: list[str] = []
    size, truncated = 0, False
    for block in _docx_blocks(data):
        pieces.append(block)
        size += len(block) + 1
        if size > max_chars:
            truncated = True
            break
    return "\n".join(pieces).strip().translate(_CONTROL), truncated, None


def attachment_text(
    data: bytes, *, content_type: str, filename: str | None, max_chars: int, max_bytes: int
) -> AttachmentText:
    """The text of an attachment, or why there is none.

    ``content_type`` may carry parameters (``text/plain; charset=iso-8859-1``); a
    generic one (``application/octet-stream``) is refined by the file name's extension.

    Raises:
        ValidationFailed: ``max_chars`` is below 1.
    """
    _check_budget(max_chars)
    mime, params = _split_type(content_type)
    kind = _kind(mime, filename)

    def result(
        text: str | None, truncated: bool, extracted: bool, reason: str | None
    ) -> AttachmentText:
        return AttachmentText(text, truncated, extracted, reason, mime or content_type, filename)

    if kind is None:
        return result(None, False, False, REASON_UNSUPPORTED_TYPE)
    if len(data) > max_bytes:
        return result(None, False, False, REASON_TOO_LARGE)
    readers: dict[_FileKind, Callable[[bytes, int], tuple[str | None, bool, str | None]]] = {
        "pdf": _pdf_text,
        "docx": _docx_text,
        "html": lambda raw, budget: _html_attachment(raw, params.get("charset"), budget),
        "text": lambda raw, budget: _plain_attachment(raw, params.get("charset"), budget),
    }
    try:
        text, truncated, reason = readers[kind](data, max_chars)
    except Exception:  # a stranger's file: any failure of the parser is "unreadable"
        return result(None, False, False, REASON_UNREADABLE)
    if text is None:
        return result(None, False, False, reason)
    if len(text) > max_chars:
        text, truncated = text[:max_chars], True
    if not text and reason is None:
        reason = REASON_NO_TEXT
    return result(text, truncated, True, reason)


def _html_attachment(
    data: bytes, charset: str | None, max_chars: int
) -> tuple[str | None, bool, str | None]:
    source = _decode(data, charset, 16 * max_chars + _HTML_SCAN, sniff_html=True)
    text, cut, _ = _html_text(source, drop_quotes=False, out_limit=max_chars + 1)
    return text, cut or len(text) > max_chars, None


def _plain_attachment(
    data: bytes, charset: str | None, max_chars: int
) -> tuple[str | None, bool, str | None]:
    text = _decode(data, charset, max_chars + 1, sniff_html=False)
    return text.strip("\n"), len(text) > max_chars, None
