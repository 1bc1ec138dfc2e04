"""Lenient MIME parsing: raw message bytes in, one immutable `ParsedMessage` out.

The gateway stores every message verbatim before it parses anything, so parsing only
fills in fields for agents to read. That decides the shape of this module:

* `parse_message` never raises for any bytes. Every step that can fail on hostile or
  broken input is guarded, and a failure becomes a defect string instead of an
  exception; a half-parsed message is more useful than none.
* It parses with the stdlib ``compat32`` policy and decodes headers itself.
  ``policy.default`` is ~8x slower on a typical 4 KB message (its header registry
  re-parses Content-Type many times) and raises from header access on messages the
  corpus shows are real (``To: unlisted-recipients:; (...)``, CPython issue 83281).
* Size guards (`ParseLimits`) run before any expensive decoding: the corpus holds a
  136 KB ``To:`` header, a 210 KB encoded-word ``Subject:`` and a 3,043-part message.

Defect strings are sorted and unique so that the same bytes always give the same
result. The vocabulary:

``<StdlibDefectClass>``
    a defect the stdlib parser attached to a walked part, e.g.
    ``StartBoundaryNotFoundDefect``.
``header:<Name>:UndecodableBytesDefect``
    raw 8-bit header bytes that are not UTF-8 (decoded as windows-1252/latin-1).
``header:<Name>:InvalidHeaderDefect``
    an address header with entries that hold no address, or nothing parseable.
``header:<Name>:InvalidEncodedWordDefect``
    an RFC 2047 encoded-word whose payload could not be decoded (kept verbatim).
``BoundaryRecovered``, ``BinaryTextPart``
    a multipart re-split on the boundary its body really uses; a text part holding
    binary data (kept as an attachment instead of a body).
``HeaderTooLong:<Name>``, ``TooManyParts``
    a `ParseLimits` guard stopped decoding.
``InvalidDate``
    a ``Date:`` header is present but unparseable.
``UnknownCharset:<cs>``, ``CharsetDecodeError:<cs>``
    a charset Python does not know, or bytes that are invalid in the declared one.
``ParseError:<step>:<ExceptionClass>``
    a guarded step raised; the field it would have filled keeps its empty value.
"""

from __future__ import annotations

import binascii
import codecs
import html as html_lib
import inspect
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.feedparser import BufferedSubFile, BytesFeedParser  # type: ignore[attr-defined]
from email.message import Message
from email.policy import Policy, compat32
from email.utils import getaddresses, parsedate_to_datetime
from functools import lru_cache
from io import StringIO

__all__ = [
    "DEFAULT_LIMITS",
    "PREVIEW_CHARS",
    "Address",
    "ParseLimits",
    "ParsedAttachment",
    "ParsedMessage",
    "parse_message",
    "parse_msg_ids",
]

PREVIEW_CHARS = 200
"""Length of `ParsedMessage.preview`: enough for a list view, cheap to compute."""


@dataclass(frozen=True, slots=True)
class Address:
    """One mailbox from an address header (group names are dropped, members kept)."""

    name: str
    """Decoded display name, ``""`` if none."""
    address: str
    """The addr-spec as given (case preserved), ``""`` if nothing parseable was found."""

    def as_dict(self) -> dict[str, str]:
        """The JSON shape the API and event payloads use."""
        return {"name": self.name, "address": self.address}


@dataclass(frozen=True, slots=True)
class ParsedAttachment:
    """A non-body MIME leaf: a file, an inline image, an attached message, a DSN."""

    filename: str | None
    """Decoded (RFC 2231 and RFC 2047); not sanitised for use as a path."""
    content_type: str
    """Lower-case ``maintype/subtype``."""
    disposition: str | None
    """``"attachment"`` or ``"inline"`` (also inferred for a Content-ID part without
    a Content-Disposition, since that is how HTML bodies reference images), else None."""
    content_id: str | None
    """Content-ID without angle brackets."""
    data: bytes
    """Decoded payload; for ``message/*`` parts the re-serialised enclosed message."""


@dataclass(frozen=True, slots=True)
class ParseLimits:
    """Guards that bound the work one message can cost, whatever its bytes say."""

    max_header_bytes: int = 256 * 1024
    """A header value longer than this is not decoded (defect ``HeaderTooLong:<name>``)."""
    max_parts: int = 500
    """MIME parts walked; beyond that the walk stops (defect ``TooManyParts``)."""


DEFAULT_LIMITS = ParseLimits()
"""Shared default: `ParseLimits` is immutable, so one instance serves every call."""


@dataclass(frozen=True, slots=True)
class ParsedMessage:
    """What an agent reads about a message; the verbatim bytes are stored elsewhere."""

    message_id: str | None
    subject: str
    from_: tuple[Address, ...]
    to: tuple[Address, ...]
    cc: tuple[Address, ...]
    reply_to: tuple[Address, ...]
    date: datetime | None
    """Timezone-aware UTC; a ``-0000`` (unknown zone) date is taken as UTC."""
    in_reply_to: str | None
    references: tuple[str, ...]
    text: str | None
    """The text/plain body, CRLF normalised to LF."""
    html: str | None
    attachments: tuple[ParsedAttachment, ...]
    defects: tuple[str, ...]
    preview: str


# --------------------------------------------------------------------------- helpers

# getaddresses() grew a `strict` flag in 3.11.10 whose default (True) collapses a
# header to [('', '')] on the first oddity; we want the old keep-what-you-can parse.
_GETADDRESSES_KW: dict[str, bool] = (
    {"strict": False} if "strict" in inspect.signature(getaddresses).parameters else {}
)

_ENCODED_WORD = re.compile(r"=\?([^?\s]{1,200})\?([QqBb])\?([^?\s]*)\?=")
_MSG_ID = re.compile(r"<([^<>]*)>")
_COMMENT = re.compile(r"\([^()]*\)")
_BARE_ID_SPLIT = re.compile(r"[\s,]+")
_PLACEHOLDER = re.compile("\ue000([0-9]{1,7})\ue001")
_ADDR_SCRAPE = re.compile(r"<([^<>\s]+@[^<>\s]+)>|([^\s<>,;:\"()]+@[^\s<>,;:\"()]+)")
_STRAY_BOUNDARY = re.compile(
    rb"^--(\S[^\r\n]{0,200}?)[ \t]*\r?\n(?=content-[a-z-]+[ \t]*:)", re.MULTILINE | re.IGNORECASE
)
# An addr-spec without quoting, comments, routes or domain literals.
_PLAIN_ADDR_SPEC = r"""[^<>"\s,()\\:;@\[\]]+@[^<>"\s,()\\:;@\[\]]+"""
_FAST_MAILBOX = re.compile(
    rf"""\s*(?:"([^"\\\r\n]*)"|([^"<>,@()\\:;\[\]]*?))\s*<({_PLAIN_ADDR_SPEC})>\s*(?:,|\Z)"""
    rf"""|\s*({_PLAIN_ADDR_SPEC})\s*(?:,|\Z)"""
)
_GROUP_ONLY = re.compile(r"\s*[^:<>\"@,]*:\s*;")
# Base64 text and line breaks, then at most two pad characters (see _transfer_decode).
_CLEAN_BASE64 = re.compile(r"[A-Za-z0-9+/\r\n]*+((?:=[\r\n]*+){0,2}+)")
# For _GroupingLineBuffer: 32+ lines of base64 characters from a line start, and
# up to 5 such lines (390 characters of 76-column base64: one 448-byte small object).
_LINE_RUN = re.compile(r"^(?:[A-Za-z0-9+/=]+\r?\n){32,}", re.MULTILINE)
_LINE_GROUP = re.compile(r"(?:[^\n]*\n){1,5}")
_GROUPING_MIN_LINES = 256
"""Fewer complete lines than this in one feed are left alone (all of a 4 KB message)."""
_FEED_CHUNK = 64 * 1024
"""Bytes per `BytesFeedParser.feed` call. Handing the parser a whole message at once
costs ~7.7x its size at the peak (a str copy, then a UCS-4 StringIO of that copy);
64 KiB at a time keeps that to a few small buffers."""
_HTML_NOISE = re.compile(
    r"<(script|style|head)\b.*?(?:</\1\s*>|\Z)|<!--.*?(?:-->|\Z)"
    r"|</?([a-zA-Z][a-zA-Z0-9]*)[^>]*(?:>|\Z)|<[!?][^>]*(?:>|\Z)",
    re.DOTALL | re.IGNORECASE,
)
_BLOCK_TAG = re.compile(
    r"(?:address|article|aside|blockquote|br|dd|div|dl|dt|footer|form|h[1-6]|header|hr|li"
    r"|main|nav|ol|p|pre|section|table|tbody|td|tfoot|th|thead|tr|ul)\Z",
    re.IGNORECASE,
)
# Python codecs that are not MIME charsets and would let a sender inject escapes.
_NOT_CHARSETS = frozenset({"unicode_escape", "raw_unicode_escape", "undefined", "idna", "punycode"})
_ADDRESS_HEADERS = ("From", "To", "Cc", "Reply-To")
_WANTED = frozenset(
    {"subject", "date", "message-id", "in-reply-to", "references"}
    | {name.lower() for name in _ADDRESS_HEADERS}
)


class _Context:
    """Per-call mutable state: the limits and the growing defect set."""

    __slots__ = ("defects", "limits")

    def __init__(self, limits: ParseLimits) -> None:
        self.limits = limits
        self.defects: set[str] = set()

    def fail(self, step: str, exc: BaseException) -> None:
        """Record that a guarded step raised, by class name only (stable, no message)."""
        self.defects.add(f"ParseError:{step}:{type(exc).__name__}")


def _label(value: str) -> str:
    """A sender-controlled token made safe to embed in a defect string."""
    return "".join(ch if ch.isascii() and ch.isprintable() else "?" for ch in value[:64])


def _clean(value: str) -> str:
    """Make a decoded string storable: no NUL (PostgreSQL text rejects it), no lone
    surrogates (UTF-8 encoders reject them; utf-7 and friends can produce them)."""
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return value


@lru_cache(maxsize=256)
def _codec(charset: str) -> str | None:
    """Python codec name for a MIME charset label, None if unknown or not a text codec.

    Bounded cache: charset labels come from senders, so they must not grow memory.
    """
    try:
        name = codecs.lookup(charset).name
    except Exception:
        return None
    try:
        b"a".decode(name)
    except LookupError:  # a bytes-to-bytes codec such as base64 or zlib
        return None
    except Exception:  # a text codec that merely dislikes this byte
        pass
    return None if name.replace("-", "_") in _NOT_CHARSETS else name


def _guess(data: bytes) -> str:
    """Decode undeclared or mislabelled bytes: UTF-8 if valid, else windows-1252
    (what "latin-1" mail almost always is), else latin-1, which never fails."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _decode_bytes(ctx: _Context, data: bytes, charset: str | None) -> str:
    """Decode with the declared charset, falling back instead of failing.

    Without a declared charset (or with a plain ASCII label) the bytes are guessed
    silently: undeclared 8-bit mail is common and not worth a defect.
    """
    label = (charset or "").strip().lower()
    if not label or label in ("us-ascii", "ascii"):
        return data.decode("ascii") if data.isascii() else _guess(data)
    codec = _codec(label)
    if codec is None:
        ctx.defects.add(f"UnknownCharset:{_label(label)}")
        return _guess(data)
    if codec == "iso8859-1":
        # Browsers and mail clients read ISO-8859-1 as windows-1252 (WHATWG): the C1
        # range is never real text, but smart quotes in it are very common.
        codec = "cp1252"
    try:
        return data.decode(codec)
    except Exception:
        pass
    if codec == "cp1252":
        return data.decode("latin-1")
    ctx.defects.add(f"CharsetDecodeError:{_label(label)}")
    if codec == "utf-8":  # the usual mislabel: windows-1252 text declared as UTF-8
        return _guess(data)
    try:  # the other usual one: UTF-8 text declared as a legacy charset
        return data.decode("utf-8")
    except UnicodeDecodeError:
        # A few bad bytes in, say, GB2312 text: keep the rest readable.
        return data.decode(codec, "replace")


def _fix_8bit(value: str) -> tuple[str, bool]:
    """Turn compat32's surrogate-escaped raw header bytes into text.

    Returns the text and whether it was *not* valid UTF-8 (RFC 6532 allows UTF-8
    headers, so only other bytes are a defect).
    """
    if value.isascii():
        return value, False
    try:
        data = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace"), True
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return _guess(data), True


def _decode_word_payload(encoding: str, payload: str) -> bytes:
    """Bytes of one encoded-word; raises on undecodable base64."""
    raw = payload.encode("latin-1")
    if encoding in "Qq":
        return binascii.a2b_qp(raw, header=True)
    raw += b"=" * (-len(raw) % 4)  # Postel: senders often drop the padding
    return binascii.a2b_base64(raw)


def _decode_words(ctx: _Context, name: str, value: str) -> str:
    """Decode RFC 2047 encoded-words, leniently.

    Own implementation rather than `email.header.decode_header`, because that raises
    on bad base64 and on unknown charsets (via make_header) and round-trips the plain
    text through raw-unicode-escape. Adjacent words in one charset are joined as bytes
    before decoding, since senders split multi-byte characters across words, and
    whitespace between encoded-words is dropped as RFC 2047 section 6.2 requires.
    """
    if "=?" not in value:
        return value
    out: list[str] = []
    pending = bytearray()
    pending_cs: str | None = None
    pos = 0
    after_word = False

    def flush() -> None:
        nonlocal pending_cs
        if pending_cs is not None:
            out.append(_decode_bytes(ctx, bytes(pending), pending_cs))
            pending.clear()
            pending_cs = None

    for match in _ENCODED_WORD.finditer(value):
        gap = value[pos : match.start()]
        pos = match.end()
        if gap and not (after_word and gap.isspace()):
            flush()
            out.append(gap)
        charset = match.group(1).split("*", 1)[0].lower()  # RFC 2231 language suffix
        try:
            data = _decode_word_payload(match.group(2), match.group(3))
        except (binascii.Error, UnicodeEncodeError, ValueError):
            ctx.defects.add(f"header:{name}:InvalidEncodedWordDefect")
            flush()
            out.append(match.group(0))
            after_word = False
            continue
        if pending_cs != charset:
            flush()
            pending_cs = charset
        pending += data
        after_word = True
    flush()
    out.append(value[pos:])
    return "".join(out)


def _unfold(value: str) -> str:
    """RFC 5322 unfolding: drop the line breaks, keep the whitespace after them."""
    if "\n" in value or "\r" in value:
        value = value.replace("\r", "").replace("\n", "")
    return value


def parse_msg_ids(value: str) -> list[str]:
    """Message ids from an In-Reply-To, References or Message-ID value, in order.

    Tolerant of what real clients write: comments, quoted prose around the ids
    (``Your message of "..." <id>``), ids folded across lines, nested brackets, and
    bare ids without brackets (used only when no bracketed id exists, and then only
    tokens containing ``@`` so prose is not mistaken for ids). Duplicates are dropped
    keeping the first occurrence, which is what threading wants.
    """
    seen: dict[str, None] = {}
    stripped = _COMMENT.sub(" ", value)
    for match in _MSG_ID.finditer(stripped):
        ident = "".join(match.group(1).split())
        if ident:
            seen.setdefault(ident, None)
    if not seen:
        for token in _BARE_ID_SPLIT.split(stripped):
            token = token.strip("\"'<>;")
            if "@" in token:
                seen.setdefault(token, None)
    return list(seen)


# ------------------------------------------------------------------------- headers


class _Headers:
    """The few top-level headers we read, prepared once (guarded, 8-bit fixed, unfolded)."""

    __slots__ = ("_ctx", "_raw")

    def __init__(self, ctx: _Context, msg: Message) -> None:
        self._ctx = ctx
        self._raw: dict[str, list[str]] = {}
        for key, value in msg.raw_items():
            lname = key.strip().lower()
            if lname in _WANTED:
                self._raw.setdefault(lname, []).append(str(value))

    def _prepare(self, name: str, value: str) -> str | None:
        if len(value) > self._ctx.limits.max_header_bytes:
            self._ctx.defects.add(f"HeaderTooLong:{name}")
            return None
        value, undecodable = _fix_8bit(value)
        if undecodable:
            self._ctx.defects.add(f"header:{name}:UndecodableBytesDefect")
        return _unfold(value)

    def first(self, name: str) -> str | None:
        """The first occurrence (RFC 5322 allows one; later copies are usually junk)."""
        values = self._raw.get(name.lower())
        return self._prepare(name, values[0]) if values else None

    def joined(self, name: str) -> str | None:
        """All occurrences joined, so a message with two ``To:`` lines loses no one."""
        prepared = [p for v in self._raw.get(name.lower(), ()) if (p := self._prepare(name, v))]
        return ", ".join(prepared) if prepared else None


def _protect_words(value: str) -> tuple[str, list[str]]:
    """Swap each encoded-word for an opaque atom before address parsing.

    An encoded-word is one atom whatever it encodes, but the stdlib address parser
    sees the ``:`` and ``,`` inside it: the corpus has a ``To:`` of 3,000 words with
    times like ``10:08:28`` in them, which nests groups until RecursionError.
    """
    words: list[str] = []

    def swap(match: re.Match[str]) -> str:
        words.append(match.group(0))
        return f"\ue000{len(words) - 1}\ue001"

    return _ENCODED_WORD.sub(swap, value), words


def _restore_words(value: str, words: list[str]) -> str:
    def back(match: re.Match[str]) -> str:
        index = int(match.group(1))
        return words[index] if index < len(words) else match.group(0)

    return _PLACEHOLDER.sub(back, value) if words and "\ue000" in value else value


def _fast_addresses(value: str) -> list[tuple[str, str]] | None:
    """The common shapes (``a@b``, ``Name <a@b>``, ``"Last, First" <a@b>``) by regex.

    `getaddresses` walks the header one character at a time in Python and was about
    a third of the cost of parsing a typical message. Anything unusual (comments,
    groups, escapes, route addresses, missing ``@``) returns None and takes the full
    parser, so results match it; a corpus test checks that they do.
    """
    pairs: list[tuple[str, str]] = []
    pos, end = 0, len(value)
    while pos < end:
        match = _FAST_MAILBOX.match(value, pos)
        if match is None:
            return None
        quoted, plain, angle, bare = match.groups()
        if bare is not None:
            pairs.append(("", bare))
        else:
            pairs.append((quoted if quoted is not None else " ".join(plain.split()), angle))
        pos = match.end()
    return pairs


def _addresses(ctx: _Context, name: str, value: str | None) -> tuple[Address, ...]:
    """Parse an address list, then decode each display name.

    Parsing before decoding keeps an encoded comma (``=?utf-8?q?Doe=2C_J?=``) from
    splitting one mailbox into two. Group syntax is flattened to its members. If the
    stdlib parser fails (it recurses once per ``:``), bare addresses are scraped so
    that the recipients are not lost with the display names.
    """
    if value is None or not value.strip():
        return ()
    protected, words = _protect_words(value) if "=?" in value else (value, [])
    pairs = _fast_addresses(protected)
    if pairs is None:
        try:
            pairs = getaddresses([protected], **_GETADDRESSES_KW)
        except Exception as exc:
            ctx.fail(f"address:{name}", exc)
            pairs = [("", m.group(1) or m.group(2)) for m in _ADDR_SCRAPE.finditer(protected)]
    found: list[Address] = []
    invalid = False
    for display, addr in pairs:
        if words and "\ue000" in addr:  # a lone encoded phrase: a name, not an address
            display, addr = display or addr, ""
        if display:
            display = _decode_words(ctx, name, _restore_words(display, words))
            display = _clean(display.strip())
        addr = _clean(_restore_words(addr, words).strip())
        if not display and not addr:
            continue
        invalid = invalid or not addr
        found.append(Address(display, addr))
    if invalid or (not found and not _GROUP_ONLY.match(value)):
        ctx.defects.add(f"header:{name}:InvalidHeaderDefect")
    return tuple(found)


def _parse_date(ctx: _Context, value: str | None) -> datetime | None:
    """Date in UTC; an absent Date is not a defect (many generators omit it), a bad one is."""
    if value is None or not value.strip():
        return None
    try:
        parsed = parsedate_to_datetime(value.strip())
        if parsed.tzinfo is None:  # "-0000": zone unknown, RFC 5322 says treat as UTC
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)
    except Exception:
        ctx.defects.add("InvalidDate")
        return None


def _first_id(value: str | None) -> str | None:
    """First msg-id found in the value; None when it holds only prose."""
    ids = parse_msg_ids(value) if value else []
    return _clean(ids[0]) if ids else None


def _single_id(value: str | None) -> str | None:
    """First msg-id of a header, or the trimmed value when it has no usable id."""
    if value is None:
        return None
    ids = parse_msg_ids(value)
    if ids:
        return _clean(ids[0])
    bare = value.strip().strip("<>").strip()
    return _clean(bare) if bare else None


# ---------------------------------------------------------------------------- body


def _raw_header(part: Message, lname: str) -> str | None:
    """A part header read raw, bypassing compat32's Header-object wrapping of 8-bit."""
    for key, value in part.raw_items():
        if key.lower() == lname:
            return str(value)
    return None


def _transfer_decode(part: Message) -> bytes | None:
    """The common large cases of ``part.get_payload(decode=True)``, without its copies.

    For base64 compat32 encodes the payload to bytes, splits it into lines, joins
    them and decodes: ~4.5x the payload at the peak. ``binascii`` takes an ASCII str
    as it is and (outside strict mode) skips CR and LF, so decoding the payload
    directly allocates only the result. That result is the stdlib's exactly when
    the stdlib's first, strict attempt succeeds without padding added: the text
    without line breaks is base64 characters then at most two ``=``, and its length
    is a multiple of 4. The regular expression checks the first; the second holds
    when the decode succeeds and its length fits the padding (a complete last
    group of 4 with p ``=`` decodes to 3 - p bytes; misplaced padding is skipped
    outside strict mode, which shows in the length). Anything else returns None and
    takes the stdlib path, which records the defects callers expect.
    Quoted-printable is ``binascii.a2b_qp`` in the stdlib too, after an ASCII
    encode we skip.
    """
    cte = str(part.get("content-transfer-encoding", "")).lower()
    if cte != "base64" and cte != "quoted-printable":
        return None
    if part.is_multipart():
        return None
    payload = part.get_payload()
    if not isinstance(payload, str) or not payload.isascii():
        return None
    if cte == "quoted-printable":
        return binascii.a2b_qp(payload)
    match = _CLEAN_BASE64.fullmatch(payload)
    if match is None:
        return None
    try:
        data = binascii.a2b_base64(payload)
    except binascii.Error:  # an incomplete last group: the stdlib pads it
        return None
    if (len(data) + match.group(1).count("=")) % 3:
        return None
    return data


def _payload_bytes(ctx: _Context, part: Message) -> bytes:
    """Transfer-decoded payload of a leaf part (base64/QP/uuencode handled by stdlib)."""
    try:
        fast = _transfer_decode(part)
        if fast is not None:
            return fast
        data = part.get_payload(decode=True)
    except Exception as exc:
        ctx.fail("get_payload", exc)
        return b""
    return data if isinstance(data, bytes) else b""


def _recover_parts(ctx: _Context, data: bytes) -> list[Message]:
    """Re-split a multipart whose declared boundary never occurs, using the
    boundary its body actually uses (a ``--token`` line followed by a Content-*
    header, so a ``--`` signature line in plain text is not mistaken for one)."""
    match = _STRAY_BOUNDARY.search(data)
    if match is None or b'"' in match.group(1) or b"\\" in match.group(1):
        return []
    try:
        head = b'Content-Type: multipart/mixed; boundary="' + match.group(1) + b'"\n\n'
        wrapper = _feed_parse(head + data)
    except Exception as exc:
        ctx.fail("recover_boundary", exc)
        return []
    children = wrapper.get_payload()
    if not isinstance(children, list) or not children:
        return []
    ctx.defects.add("BoundaryRecovered")
    return [child for child in children if isinstance(child, Message)]


def _body_text(ctx: _Context, part: Message, data: bytes) -> str | None:
    """A text leaf decoded with charset fallback and LF line endings, or None when
    it is really binary: an Outlook .msg file sent as a message reads as a
    text/plain body. Over 1% NUL characters is never text (checked after decoding,
    so UTF-16 text passes), and NUL cannot be stored in a PostgreSQL text column."""
    try:
        charset = part.get_content_charset()
    except Exception as exc:
        ctx.fail("charset", exc)
        charset = None
    text = _decode_bytes(ctx, data, charset)
    if text.count("\x00") * 100 > len(text):
        ctx.defects.add("BinaryTextPart")
        return None
    return _clean(text.replace("\r\n", "\n"))


def _children(ctx: _Context, part: Message) -> list[Message]:
    """Sub-parts of a container (compat32 stores them as the payload list)."""
    try:
        payload = part.get_payload()
    except Exception as exc:
        ctx.fail("get_payload", exc)
        return []
    if not isinstance(payload, list):
        return []
    return [sub for sub in payload if isinstance(sub, Message)]


def _message_bytes(ctx: _Context, part: Message, policy: Policy) -> bytes:
    """Bytes of a ``message/*`` part's enclosed message(s).

    compat32 parses every ``message/*`` payload into Message objects (a list of
    header blocks for delivery-status), so the original bytes are gone and the
    enclosed message is re-serialised; serialisation recurses and can fail on
    pathological nesting, hence the guard.
    """
    if not part.is_multipart():  # e.g. a message/* part left unparsed
        return _payload_bytes(ctx, part)
    chunks: list[bytes] = []
    for sub in _children(ctx, part):
        try:
            chunks.append(sub.as_bytes(policy=policy))
        except Exception:
            # BytesGenerator cannot write a broken multipart holding 8-bit bytes
            # (its payload comes back with U+FFFD); the str generator can.
            try:
                chunks.append(sub.as_string(policy=policy).encode("utf-8", "surrogateescape"))
            except Exception as exc:
                ctx.fail("message_bytes", exc)
    return b"".join(chunks)


def _filename(ctx: _Context, part: Message) -> str | None:
    """Filename from Content-Disposition or Content-Type ``name``, fully decoded.

    `Message.get_filename` handles RFC 2231 (charset, continuations); some clients
    instead put RFC 2047 encoded-words in the quoted value, which it leaves alone.
    """
    params = [
        (key, str(value))
        for key, value in part.raw_items()
        if key.lower() in ("content-type", "content-disposition")
    ]
    # Most parts (every body part) carry no name at all; skip the param parsing.
    if not any("name" in value.lower() for _, value in params):
        return None
    try:
        if not all(value.isascii() for _, value in params):
            # Raw 8-bit in the header: compat32 would turn it into U+FFFD before
            # get_filename sees it, so read the params from a decoded copy instead.
            shadow = Message()
            for key, value in params:
                shadow[key] = _fix_8bit(value)[0]
            part = shadow
        name = part.get_filename()
    except Exception as exc:
        ctx.fail("filename", exc)
        return None
    if name is None:
        return None
    name, _ = _fix_8bit(_unfold(name))
    name = _clean(_decode_words(ctx, "Content-Disposition", name).strip())
    return name or None


def _content_id(part: Message) -> str | None:
    value = _raw_header(part, "content-id")
    if value is None:
        return None
    value, _ = _fix_8bit(_unfold(value))
    value = value.strip().strip("<>").strip()
    return _clean(value) if value else None


class _Body:
    """Accumulates body and attachments during the walk."""

    __slots__ = ("attachments", "html", "text")

    def __init__(self) -> None:
        self.text: str | None = None
        self.html: str | None = None
        self.attachments: list[ParsedAttachment] = []


def _walk(ctx: _Context, root: Message, body: _Body, raw: bytes) -> None:
    """Visit parts depth-first with an explicit stack (no recursion limit to hit),
    without descending into enclosed messages, at most ``max_parts`` of them."""
    stack = [root]
    walked = 0
    policy: Policy | None = None
    while stack:
        part = stack.pop()
        walked += 1
        if walked > ctx.limits.max_parts:
            ctx.defects.add("TooManyParts")
            return
        ctx.defects.update(type(defect).__name__ for defect in part.defects)
        try:
            ctype = part.get_content_type()
        except Exception as exc:
            ctx.fail("content_type", exc)
            ctype = "application/octet-stream"
        maintype = ctype.partition("/")[0]

        if maintype == "message":
            if policy is None:  # re-serialise with the line endings the message came in
                policy = compat32.clone(linesep="\r\n" if b"\r\n" in raw else "\n")
            _add_attachment(ctx, part, ctype, body, _message_bytes(ctx, part, policy))
        elif part.is_multipart():
            children = _children(ctx, part)
            stack.extend(reversed(children))
        elif maintype == "multipart":
            # Boundary never found: compat32 keeps the body as one string. Often the
            # sender just declared the wrong boundary, so try the one the body uses;
            # otherwise the string is blank or the only text the sender wrote.
            data = _payload_bytes(ctx, part)
            recovered = _recover_parts(ctx, data)
            if recovered:
                stack.extend(reversed(recovered))
            elif body.text is None and data.strip():
                body.text = _body_text(ctx, part, data)
        else:
            _add_leaf(ctx, part, ctype, body)
        ctx.defects.update(type(defect).__name__ for defect in part.defects)


def _disposition(ctx: _Context, part: Message) -> str | None:
    try:
        return part.get_content_disposition()
    except Exception as exc:
        ctx.fail("disposition", exc)
        return None


def _add_leaf(ctx: _Context, part: Message, ctype: str, body: _Body) -> None:
    """Route a leaf: the first inline text/plain and text/html are the bodies, every
    other leaf is an attachment, so nothing the sender sent is silently dropped."""
    disposition = _disposition(ctx, part)
    filename = _filename(ctx, part)
    data = _payload_bytes(ctx, part)
    if disposition != "attachment" and filename is None:
        if ctype == "text/plain" and body.text is None:
            body.text = _body_text(ctx, part, data)
            if body.text is not None:
                return
        elif ctype == "text/html" and body.html is None:
            body.html = _body_text(ctx, part, data)
            if body.html is not None:
                return
    _add_attachment(ctx, part, ctype, body, data, disposition, filename)


def _add_attachment(
    ctx: _Context,
    part: Message,
    ctype: str,
    body: _Body,
    data: bytes,
    disposition: str | None = None,
    filename: str | None = None,
) -> None:
    if disposition is None:
        disposition = _disposition(ctx, part)
    if filename is None:
        filename = _filename(ctx, part)
    content_id = _content_id(part)
    if disposition not in ("attachment", "inline"):
        disposition = "inline" if content_id is not None and disposition is None else None
    body.attachments.append(ParsedAttachment(filename, ctype, disposition, content_id, data))


# ------------------------------------------------------------------------- preview


def _html_gap(match: re.Match[str]) -> str:
    """Block-level tags separate words; inline ones (``<b>``) must not add a space."""
    name = match.group(2)
    return " " if name is None or _BLOCK_TAG.match(name) else ""


def _html_to_text(fragment: str) -> str:
    return html_lib.unescape(_HTML_NOISE.sub(_html_gap, fragment))


def _preview(text: str | None, html: str | None) -> str:
    """First `PREVIEW_CHARS` visible characters, whitespace collapsed.

    Works on growing prefixes so a megabyte of HTML costs a few KB of regex work in
    the usual case; a truncated tag or style block at the cut is removed by the
    pattern's end-of-input alternatives.
    """
    is_html = False
    source = text
    if source is None or source.isspace() or not source:
        source, is_html = html, True
    if not source:
        return ""
    collapsed = ""
    for size in (4 * PREVIEW_CHARS, 65536, len(source)):
        chunk = source[:size]
        if is_html:
            chunk = _html_to_text(chunk)
        collapsed = " ".join(chunk.split())
        if len(collapsed) >= PREVIEW_CHARS or size >= len(source):
            break
    return collapsed[:PREVIEW_CHARS].rstrip()


# ---------------------------------------------------------------------------- main


class _GroupingLineBuffer(BufferedSubFile):  # type: ignore[misc]
    """The feed parser's line buffer, handing on base64 bodies 5 lines at a time.

    The parser keeps each line of a body as its own str until the part ends and then
    joins them: a 78-byte base64 line costs 136 bytes (a 128-byte str and a list
    slot), so a large attachment stands at 1.75x its size before the join adds one
    more copy. Five lines in one str cost 456 bytes, 1.17x. Groups stay under
    512 bytes on purpose: the interpreter's small-object allocator hands its memory
    back to the system once a part is done, while the C heap, where larger strings
    go, keeps it (measured: 64 KiB groups lowered the traced peak further but raised
    the peak RSS).

    The parser cannot tell the difference. Every test it makes on a line is anchored
    at the line's start (a boundary, a blank line, the header pattern, which needs a
    ``:``) or at its end (the line break before a boundary, which it drops), and it
    only ever joins lines with ``""``. A group of non-empty lines of
    ``[A-Za-z0-9+/=]`` answers each test as its first or last line would, and joins
    to the same text. Between runs the lines are split again the way
    `BufferedSubFile.push` splits them (``StringIO`` with ``newline=""``); runs start
    at a line start and end after a line feed, so what lies between is whole lines.

    Relies on two stdlib internals, ``FeedParser._input`` and
    ``BufferedSubFile.pushlines`` (the same in 3.11 to 3.13);
    ``tests/integration/test_memory.py`` checks on the corpus that the trees match
    ``message_from_bytes``.
    """

    def pushlines(self, lines: list[str]) -> None:
        if len(lines) < _GROUPING_MIN_LINES:
            super().pushlines(lines)
            return
        text = "".join(lines)
        out: list[str] = []
        pos = 0
        for run in _LINE_RUN.finditer(text):
            if run.start() > pos:
                out += StringIO(text[pos : run.start()], newline="").readlines()
            out += _LINE_GROUP.findall(text, run.start(), run.end())
            pos = run.end()
        if not out:
            super().pushlines(lines)
            return
        if pos < len(text):
            out += StringIO(text[pos:], newline="").readlines()
        super().pushlines(out)


def _feed_parse(raw: bytes, *, headersonly: bool = False) -> Message:
    """``message_from_bytes(raw, policy=compat32)`` in `_FEED_CHUNK` pieces.

    The same parser the stdlib's ``BytesParser`` drives (it feeds 8 KiB of an
    in-memory copy at a time), so the tree is the same; only the copies are gone.
    """
    parser = BytesFeedParser(policy=compat32)
    # Only where the internals are the ones the grouping buffer was verified against;
    # elsewhere the stock buffer parses identically, with ~15% more memory.
    if type(getattr(parser, "_input", None)) is BufferedSubFile:
        parser._input = _GroupingLineBuffer()  # type: ignore[attr-defined]
    if headersonly:
        parser._set_headersonly()  # type: ignore[attr-defined]  # as email.parser does
    for start in range(0, len(raw), _FEED_CHUNK):
        parser.feed(raw[start : start + _FEED_CHUNK])
    return parser.close()


def _parse_tree(ctx: _Context, raw: bytes) -> tuple[Message, bool]:
    """The MIME tree, and whether its body was parsed.

    The feed parser checks every line against every open boundary, so nesting costs
    depth x lines (1,200 levels took 0.5 s) and deep enough nesting ends in
    RecursionError. More ``boundary=`` parameters than ``max_parts`` can only mean
    parts we would not walk anyway, so such a message is parsed for headers only.
    """
    boundaries = raw.count(b"oundary=") + raw.count(b"OUNDARY=")
    if boundaries > ctx.limits.max_parts:
        ctx.defects.add("TooManyParts")
    else:
        try:
            return _feed_parse(raw), True
        except Exception as exc:
            ctx.fail("parse", exc)
    try:
        return _feed_parse(raw, headersonly=True), False
    except Exception as exc:
        ctx.fail("parse_headers", exc)
    return Message(policy=compat32), False


def _parse(ctx: _Context, raw: bytes) -> ParsedMessage:
    msg, complete = _parse_tree(ctx, raw)
    headers = _Headers(ctx, msg)

    subject = headers.first("Subject")
    subject = _clean(_decode_words(ctx, "Subject", subject).strip()) if subject else ""
    from_, to, cc, reply_to = (
        _addresses(ctx, name, headers.joined(name)) for name in _ADDRESS_HEADERS
    )
    references = headers.first("References")
    in_reply_to = headers.first("In-Reply-To")

    body = _Body()
    try:
        if complete:  # a headers-only body is unparsed MIME, not text to show
            _walk(ctx, msg, body, raw)
    except Exception as exc:
        ctx.fail("walk", exc)
    try:
        preview = _preview(body.text, body.html)
    except Exception as exc:
        ctx.fail("preview", exc)
        preview = ""

    return ParsedMessage(
        message_id=_single_id(headers.first("Message-ID")),
        subject=subject,
        from_=from_,
        to=to,
        cc=cc,
        reply_to=reply_to,
        date=_parse_date(ctx, headers.first("Date")),
        in_reply_to=_first_id(in_reply_to),
        references=tuple(_clean(i) for i in parse_msg_ids(references)) if references else (),
        text=body.text,
        html=body.html,
        attachments=tuple(body.attachments),
        defects=tuple(sorted(ctx.defects)),
        preview=preview,
    )


def header_fields(raw: bytes, limits: ParseLimits = DEFAULT_LIMITS) -> tuple[tuple[str, str], ...]:
    """Every top-level header field as ``(name, decoded value)``, in message order.

    For rules that test arbitrary headers (``header:List-Id``), so it is computed only
    when a rule set needs it. Decoded like the fields `parse_message` reads (8-bit
    fixed, unfolded, encoded-words decoded); a field over ``max_header_bytes`` is
    left out rather than decoded. Never raises.
    """
    ctx = _Context(limits)
    try:
        msg = _feed_parse(raw, headersonly=True)
    except Exception:  # a message we cannot read has no headers to test
        return ()
    out: list[tuple[str, str]] = []
    for key, value in msg.raw_items():
        text = str(value)
        if len(text) > limits.max_header_bytes:
            continue
        fixed, _ = _fix_8bit(text)
        out.append((key.strip(), _clean(_decode_words(ctx, key, _unfold(fixed)))))
    return tuple(out)


def parse_message(raw: bytes, limits: ParseLimits = DEFAULT_LIMITS) -> ParsedMessage:
    """Parse raw RFC 5322 bytes into a `ParsedMessage`.

    Never raises for any bytes input: problems become entries in ``defects`` and the
    affected fields keep empty values. ``bytearray`` and ``memoryview`` are accepted too.
    """
    ctx = _Context(limits)
    try:
        return _parse(ctx, raw if isinstance(raw, bytes) else bytes(raw))
    except Exception as exc:  # last line of defence; each step is guarded already
        ctx.fail("parse_message", exc)
        return ParsedMessage(
            message_id=None,
            subject="",
            from_=(),
            to=(),
            cc=(),
            reply_to=(),
            date=None,
            in_reply_to=None,
            references=(),
            text=None,
            html=None,
            attachments=(),
            defects=tuple(sorted(ctx.defects)),
            preview="",
        )
