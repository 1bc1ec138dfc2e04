"""Outbound messages: validate what an agent asks to send, derive replies and forwards,
and build the RFC 5322 bytes.

Every value an agent gives us that ends up in a header field is a way to write *other*
header fields (``Subject: hi\\r\\nBcc: everyone@example.com``), so the rules are strict
and checked before anything else:

* **Header injection.** A value bound for a header (each address entry, the subject,
  every extra header name and value, attachment filename, content type and
  content id) may hold no C0 control character (TAB included), no DEL, no C1 control
  (U+0085 included) and no U+2028/U+2029. Violations raise `HeaderInjection` naming
  every offending field; the check runs again in `build` on whatever it is given, so
  a hand-made `Composed` cannot slip past it. Text such as ``%0d%0a`` is not an
  injection: it is kept literally.
* **Everything else** that is malformed raises `ValidationFailed`, again naming every
  offending field: ``to[0]``, ``subject``, ``text``, ``headers[X-Foo]`` (a bad value),
  ``headers[X-Foo].name`` (a bad or disallowed name), ``attachments[1].content_type``,
  ``recipients`` (none, or too many). Header names in field paths have control
  characters escaped, so an error never echoes one.

Addresses are parsed strictly (`email.headerregistry`): one mailbox per entry, no
group syntax, no obsolete syntax (``John Q. Public <j@x>`` must be quoted), a domain
that is a host name (internationalised names become their A-label) or an IPv4/IPv6
literal. Local parts must be ASCII: a UTF-8 local part needs SMTPUTF8, which the
gateway does not use. Display names, subjects and header values may be any Unicode;
`build` encodes them (RFC 2047, RFC 2231).

`build` writes the top-level header fields itself and lets `email.policy.SMTP` write
only the MIME body. Python 3.11's header folder loses the space between encoded-words
when it folds a long non-ASCII subject (``Hëllo Hëllo`` comes back ``HëlloHëllo``) and
RFC 2047-encodes any long ASCII value, which would break ``List-Unsubscribe`` URLs;
the writer here folds only at spaces, encodes only what is not ASCII, and is small
enough to read.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from email import policy as email_policy
from email.generator import BytesGenerator
from email.header import decode_header
from email.headerregistry import Address, AddressHeader, HeaderRegistry
from email.message import MIMEPart
from email.utils import format_datetime
from io import BytesIO
from types import MappingProxyType
from typing import Any

import idna

from mailgate.errors import HeaderInjection, ValidationFailed

__all__ = [
    "AttachmentIn",
    "Composed",
    "Draft",
    "Mailbox",
    "Original",
    "build",
    "forward",
    "mailbox_of",
    "message_id_for",
    "reply",
    "validate",
]

MAX_HEADER_CHARS = 998
"""RFC 5322 §2.1.1: a line holds at most 998 characters; a subject or extra header
value longer than that is refused rather than cut."""

_FOLD_AT = 78
"""RFC 5322 §2.1.1: lines SHOULD stay within 78 characters; folding aims for it."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
"""What may never reach a header: C0 (TAB too), DEL, C1 (NEL too), the Unicode line
and paragraph separators (some software treats them as line breaks)."""

_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[QqBb]\?[^?\s]*\?=")

_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]{1,76}")
"""RFC 5322 §3.6.8 ftext, short enough that ``Name: `` leaves room on a line."""

_TOKEN = r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+"
_CONTENT_TYPE = re.compile(rf"({_TOKEN})/({_TOKEN})")
"""RFC 2045 §5.1 type "/" subtype, both tokens; parameters are not accepted."""

_CONTENT_ID = re.compile(r"[\x21-\x3b\x3d\x3f-\x7e]{1,900}")
"""Printable ASCII without ``<``/``>``/space: what fits between the angle brackets."""

_MSG_ID = re.compile(r"[\x21-\x3b\x3d\x3f-\x7e]{1,900}")
"""A message id we are willing to write (no brackets, no space, ASCII)."""

_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_ATEXT_WORD = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+")

_REPLY_PREFIX = re.compile(
    r"^\s*(?:re|aw|sv|vs|antw|rif|odp)\s*(?:\[\d+\]|\(\d+\))?\s*:", re.IGNORECASE
)
"""Reply prefixes in common locales (the reply half of what `threads.normalize_subject`
strips): Re, AW (German), SV (Nordic), VS (Finnish), Antw (Dutch), RIF (Italian),
Odp (Polish), with an optional counter (``Re[2]:``)."""

_FORWARD_PREFIX = re.compile(r"^\s*(?:fwd?|wg|tr)\s*(?:\[\d+\]|\(\d+\))?\s*:", re.IGNORECASE)

_EXTRA_KNOWN = {
    name.lower(): name
    for name in (
        "List-Unsubscribe",
        "List-Unsubscribe-Post",
        "Keywords",
        "Comments",
        "Organization",
    )
}
_EXTRA_ASCII_ONLY = frozenset({"list-unsubscribe", "list-unsubscribe-post"})
"""Structured fields (RFC 2369/8058 URIs): an encoded-word would break them."""

_GATEWAY_HEADERS = frozenset(
    {
        "from",
        "sender",
        "to",
        "cc",
        "bcc",
        "reply-to",
        "subject",
        "date",
        "message-id",
        "in-reply-to",
        "references",
        "mime-version",
        "auto-submitted",
        "return-path",
        "received",
        "dkim-signature",
        "authentication-results",
    }
)
"""Fields the gateway writes (or a relay adds); an extra header may not repeat them."""

_EMPTY_HEADERS: Mapping[str, str] = MappingProxyType({})

_REGISTRY = HeaderRegistry()

_BODY_POLICY = email_policy.SMTP.clone(cte_type="7bit", refold_source="none")
"""CRLF, and 7-bit bodies (quoted-printable or base64 for non-ASCII text) so the
message needs no 8BITMIME. ``refold_source="none"`` keeps a ``Content-ID`` set with
``set_raw`` as written instead of RFC 2047-encoding it when it is long."""

_INJECTION_MESSAGE = "contains a control character (CR, LF, NUL, TAB, ...); refused"

_Q_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/")
"""RFC 2047 §5(3): the characters a Q encoded-word may carry as they are anywhere,
phrases included."""

_EW_OVERHEAD = len("=?utf-8?q??=")
_EW_PAYLOAD = 75 - _EW_OVERHEAD
"""RFC 2047 §2: an encoded-word is at most 75 characters."""

_REFERENCES_KEEP_LAST = 20


# ----------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class Mailbox:
    """One address: what `validate` parsed from an entry, or what `mailbox_of` made."""

    address: str
    """The addr-spec: local part as given (quoted if it must be), domain lower-cased
    and as an A-label (``xn--``) when internationalised."""
    name: str = ""
    """Display name, any Unicode, whitespace collapsed."""

    def formatted(self) -> str:
        """The RFC 5322 ``name-addr`` (or bare addr-spec without a name), on one line:
        the name quoted when it needs it, RFC 2047-encoded when it is not ASCII."""
        return " ".join(_mailbox_pieces(self))


@dataclass(frozen=True, slots=True)
class AttachmentIn:
    """A file to send; ``inline`` with a ``content_id`` is an image the HTML shows."""

    filename: str
    content_type: str
    """``type/subtype`` (validated, lower-cased by `validate`)."""
    data: bytes
    content_id: str | None = None
    """Without angle brackets; the HTML refers to it as ``cid:<content_id>``."""
    inline: bool = False


@dataclass(frozen=True, slots=True)
class Draft:
    """A message as the API hands it over (JSON decoded, attachments base64 decoded)."""

    to: tuple[str, ...] = ()
    cc: tuple[str, ...] = ()
    bcc: tuple[str, ...] = ()
    reply_to: tuple[str, ...] = ()
    subject: str = ""
    text: str | None = None
    html: str | None = None
    attachments: tuple[AttachmentIn, ...] = ()
    headers: Mapping[str, str] = field(default_factory=dict)
    """Extra header fields, allowlisted: ``X-*`` (not ``X-Mailgate-*``),
    ``List-Unsubscribe``, ``List-Unsubscribe-Post``, ``Keywords``, ``Comments``,
    ``Organization``."""


@dataclass(frozen=True, slots=True)
class Composed:
    """A validated message, ready for policy checks and `build`."""

    sender: Mailbox
    to: tuple[Mailbox, ...]
    cc: tuple[Mailbox, ...]
    bcc: tuple[Mailbox, ...]
    reply_to: tuple[Mailbox, ...]
    subject: str
    text: str | None
    html: str | None
    attachments: tuple[AttachmentIn, ...]
    headers: tuple[tuple[str, str], ...]
    """Extra header fields, names in canonical case, in the order given."""
    in_reply_to: str | None = None
    """Message-ID of the message replied to, without angle brackets."""
    references: tuple[str, ...] = ()
    """Without angle brackets, oldest first."""
    auto_submitted: str = "auto-generated"
    """RFC 3834 ``Auto-Submitted``: agents are not humans, so their mail says so and
    well-behaved auto-responders do not answer it; replies say ``auto-replied``."""
    forwarded: bytes | None = None
    """An original message's raw bytes, attached as ``message/rfc822``."""

    @property
    def recipients(self) -> tuple[str, ...]:
        """The envelope: to, cc and bcc addresses, first spelling of each kept, without
        case-insensitive duplicates, in order."""
        seen: dict[str, str] = {}
        for mailbox in (*self.to, *self.cc, *self.bcc):
            seen.setdefault(mailbox.address.lower(), mailbox.address)
        return tuple(seen.values())

    def as_facts(self) -> dict[str, Any]:
        """A JSON-ready summary for the audit log and outbound rules: who, what about,
        and which files; never the bodies or attachment contents."""
        return {
            "from": self.sender.address,
            "to": [m.address for m in self.to],
            "cc": [m.address for m in self.cc],
            "bcc": [m.address for m in self.bcc],
            "reply_to": [m.address for m in self.reply_to],
            "recipients": list(self.recipients),
            "subject": self.subject,
            "has_text": self.text is not None,
            "has_html": self.html is not None,
            "attachments": [
                {
                    "filename": a.filename,
                    "content_type": a.content_type,
                    "size": len(a.data),
                    "inline": a.inline,
                    "content_id": a.content_id,
                }
                for a in self.attachments
            ],
            "attachments_size": sum(len(a.data) for a in self.attachments),
            "headers": [name for name, _ in self.headers],
            "in_reply_to": self.in_reply_to,
            "references": len(self.references),
            "auto_submitted": self.auto_submitted,
            "forwarded_size": None if self.forwarded is None else len(self.forwarded),
        }


@dataclass(frozen=True, slots=True)
class Original:
    """What a reply or forward needs from a stored message."""

    rfc_message_id: str
    """Without angle brackets."""
    subject: str
    from_: tuple[Mailbox, ...]
    reply_to: tuple[Mailbox, ...]
    to: tuple[Mailbox, ...]
    cc: tuple[Mailbox, ...]
    references: tuple[str, ...]
    """Without angle brackets, oldest first."""
    raw: bytes | None = None
    """The stored bytes; `forward` needs them."""


# ------------------------------------------------------------------------ problems


class _Bad(Exception):
    """One field's problem, turned into an ``errors`` entry by the caller."""


class _Problems:
    """Collects every problem so one response names every field at fault."""

    __slots__ = ("injections", "invalid")

    def __init__(self) -> None:
        self.injections: list[dict[str, str]] = []
        self.invalid: list[dict[str, str]] = []

    def scan(self, path: str, value: str) -> bool:
        """Record a header injection in ``value``; True when it is clean."""
        if _CONTROL.search(value):
            self.injection(path)
            return False
        return True

    def injection(self, path: str) -> None:
        self.injections.append({"field": path, "message": _INJECTION_MESSAGE})

    def bad(self, path: str, message: str) -> None:
        self.invalid.append({"field": path, "message": message})

    def raise_injections(self) -> None:
        if self.injections:
            fields = ", ".join(e["field"] for e in self.injections)
            raise HeaderInjection(
                f"header field values hold control characters: {fields}",
                errors=list(self.injections),
            )

    def raise_invalid(self) -> None:
        if self.invalid:
            fields = ", ".join(e["field"] for e in self.invalid)
            raise ValidationFailed(f"invalid message: {fields}", errors=list(self.invalid))


def _escape(name: str) -> str:
    """A header name made safe to echo in a field path."""
    return name.encode("unicode_escape").decode("ascii")


def _is_unicode(value: str) -> bool:
    """False for lone surrogates (JSON can carry ``\\ud800``; UTF-8 cannot)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _sanitise(value: str) -> str:
    """Text from a stored message (a third party's), made fit for our headers: control
    characters become spaces. A folded subject often unfolds with a TAB in it, and
    refusing the agent's reply over the sender's formatting would help nobody."""
    return " ".join(_CONTROL.sub(" ", value).split())


# ----------------------------------------------------------------------- addresses


def _domain(domain: str) -> str:
    """The domain in the form we send to: host name lower-cased (A-label when
    internationalised, IDNA 2008 with UTS 46 mapping) or a canonical IP literal.

    Raises:
        _Bad: not a host name or IPv4/IPv6 literal.
    """
    if domain.startswith("[") and domain.endswith("]"):
        inner = domain[1:-1]
        try:
            if inner[:5].lower() == "ipv6:":
                return f"[IPv6:{ipaddress.IPv6Address(inner[5:]).compressed}]"
            return f"[{ipaddress.IPv4Address(inner)}]"
        except ValueError:
            raise _Bad("the address literal is not an IPv4 or IPv6 address") from None
    if not domain.isascii():
        try:
            domain = idna.encode(domain, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError):
            raise _Bad("the domain is not a valid internationalised domain name") from None
    domain = domain.lower()
    labels = domain.split(".")
    if (
        len(domain) > 253
        or not all(_LABEL.fullmatch(label) for label in labels)
        or labels[-1].isdigit()
    ):
        raise _Bad("the domain is not a valid host name")
    return domain


def _parse_entry(entry: str) -> Mailbox:
    """One address entry, strictly: ``a@b`` or ``Name <a@b>``.

    Raises:
        _Bad: empty, several addresses, a group, obsolete syntax, no domain, a
            non-ASCII local part, an unusable domain, too long.
    """
    if not entry.strip():
        raise _Bad("empty address")
    if len(entry) > MAX_HEADER_CHARS:
        raise _Bad("address entry too long")
    try:
        header = _REGISTRY("to", entry)
    except Exception:  # the stdlib parser raises IndexError and friends on junk
        raise _Bad("not a valid address") from None
    if not isinstance(header, AddressHeader):  # pragma: no cover - the registry's contract
        raise _Bad("not a valid address")
    defects = {type(defect).__name__ for defect in header.defects}
    if "NonASCIILocalPartDefect" in defects:
        raise _Bad("the local part must be ASCII (SMTPUTF8 is not supported)")
    if "ObsoleteHeaderDefect" in defects:
        raise _Bad("obsolete address syntax (quote a display name holding '.' or ',')")
    if defects:
        raise _Bad("not a valid address")
    groups = header.groups
    if len(groups) != 1 or len(groups[0].addresses) != 1:
        raise _Bad("each entry must hold exactly one address")
    if groups[0].display_name is not None:
        raise _Bad("group syntax is not accepted")
    parsed = groups[0].addresses[0]
    if not parsed.username or not parsed.domain:
        raise _Bad("the address needs a local part and a domain")
    if len(parsed.username) > 64:
        raise _Bad("the local part is longer than 64 characters")
    addr_spec = Address(username=parsed.username, domain=_domain(parsed.domain)).addr_spec
    if len(addr_spec) > 254:
        raise _Bad("the address is longer than 254 characters")
    return Mailbox(addr_spec, " ".join(parsed.display_name.split()))


def mailbox_of(address: str, name: str = "") -> Mailbox:
    """A `Mailbox` for an address we already hold (the agent's own, a stored
    message's), normalised the way `validate` normalises: surrounding ``<>`` and
    spaces dropped, domain lower-cased and as an A-label, name whitespace collapsed.

    Lenient on purpose: never raises. A stored message's addresses are a third
    party's and may be junk; `reply` checks the ones it uses and leaves out those
    that fail, `validate` checks the sender.
    """
    addr = address.strip()
    if addr.startswith("<") and addr.endswith(">"):
        addr = addr[1:-1].strip()
    local, at, domain = addr.rpartition("@")
    if at:
        try:
            domain = _domain(domain)
        except _Bad:
            domain = domain.lower()
        addr = f"{local}@{domain}"
    return Mailbox(addr, " ".join(name.split()))


def _checked(mailbox: Mailbox) -> Mailbox | None:
    """A stored message's mailbox if it would pass `validate`, name sanitised."""
    if _CONTROL.search(mailbox.address) or not _is_unicode(mailbox.address):
        return None
    try:
        parsed = _parse_entry(mailbox.address)
    except _Bad:
        return None
    name = _sanitise(mailbox.name)
    return Mailbox(parsed.address, name if _is_unicode(name) else "")


def _key(address: str) -> str:
    """How recipients are compared: case-insensitively, domains normalised."""
    return mailbox_of(address).address.lower()


# ----------------------------------------------------------------------- validation


def _scan_entries(problems: _Problems, label: str, entries: Sequence[str]) -> None:
    for index, entry in enumerate(entries):
        problems.scan(f"{label}[{index}]", entry)


def _scan_common(
    problems: _Problems,
    subject: str,
    headers: Mapping[str, str],
    attachments: Sequence[AttachmentIn],
) -> None:
    """The injection scan over everything but the address entries."""
    problems.scan("subject", subject)
    for name, value in headers.items():
        path = f"headers[{_escape(name)}]"
        problems.scan(f"{path}.name", name)
        problems.scan(path, value)
    for index, attachment in enumerate(attachments):
        path = f"attachments[{index}]"
        problems.scan(f"{path}.filename", attachment.filename)
        problems.scan(f"{path}.content_type", attachment.content_type)
        if attachment.content_id is not None:
            problems.scan(f"{path}.content_id", attachment.content_id)


def _hides_control(entry: str) -> bool:
    """Whether an RFC 2047 encoded-word in ``entry`` decodes to a control character:
    the parser decodes display names, so ``=?utf-8?q?a=0D=0Ab?=`` is a line break
    by another name."""
    for word in _ENCODED_WORD.findall(entry):
        try:
            for data, charset in decode_header(word):
                text = data if isinstance(data, str) else data.decode(charset or "ascii", "replace")
                if _CONTROL.search(text):
                    return True
        except Exception:  # undecodable: the parser will refuse or keep it literally
            continue
    return False


def _parse_entries(problems: _Problems, label: str, entries: Sequence[str]) -> list[Mailbox]:
    out: list[Mailbox] = []
    for index, entry in enumerate(entries):
        path = f"{label}[{index}]"
        if not _is_unicode(entry):
            problems.bad(path, "not valid Unicode")
            continue
        if "=?" in entry and _hides_control(entry):
            problems.injection(path)
            continue
        try:
            mailbox = _parse_entry(entry)
        except _Bad as exc:
            problems.bad(path, str(exc))
            continue
        # An encoded-word in the entry decodes before we see the name: re-check it.
        if problems.scan(path, mailbox.name):
            out.append(mailbox)
    return out


def _check_subject(problems: _Problems, subject: str) -> None:
    if not _is_unicode(subject):
        problems.bad("subject", "not valid Unicode")
    elif len(subject) > MAX_HEADER_CHARS:
        problems.bad("subject", f"longer than {MAX_HEADER_CHARS} characters")


def _check_bodies(problems: _Problems, text: str | None, html: str | None, required: bool) -> None:
    if required and text is None and html is None:
        problems.bad("text", "a message needs a text or an html body")
    for label, body in (("text", text), ("html", html)):
        if body is not None and not _is_unicode(body):
            problems.bad(label, "not valid Unicode")


def _canonical_name(name: str) -> str:
    """``x-foo-bar`` -> ``X-Foo-Bar`` (as Go's textproto does); registered names keep
    their registered spelling. Field names are case-insensitive, so this only makes
    the message and the audit log consistent."""
    known = _EXTRA_KNOWN.get(name.lower())
    if known is not None:
        return known
    return "-".join(part[:1].upper() + part[1:].lower() for part in name.split("-"))


def _check_headers(problems: _Problems, headers: Mapping[str, str]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name, value in headers.items():
        path = f"headers[{_escape(name)}]"
        lname = name.lower()
        if not _FIELD_NAME.fullmatch(name):
            problems.bad(f"{path}.name", "not a valid header field name")
            continue
        if lname in _GATEWAY_HEADERS or lname.startswith("content-"):
            problems.bad(f"{path}.name", "set by the gateway")
            continue
        if lname.startswith("x-mailgate") or not (
            lname in _EXTRA_KNOWN or (lname.startswith("x-") and len(lname) > 2)
        ):
            problems.bad(
                f"{path}.name",
                "not allowed (X-* except X-Mailgate-*, List-Unsubscribe, "
                "List-Unsubscribe-Post, Keywords, Comments, Organization)",
            )
            continue
        if lname in seen:
            problems.bad(f"{path}.name", "given twice")
            continue
        seen.add(lname)
        if not _is_unicode(value):
            problems.bad(path, "not valid Unicode")
        elif len(value) > MAX_HEADER_CHARS:
            problems.bad(path, f"longer than {MAX_HEADER_CHARS} characters")
        elif lname in _EXTRA_ASCII_ONLY and not value.isascii():
            problems.bad(path, "must be ASCII (a structured field)")
        else:
            out.append((_canonical_name(name), value))
    return out


def _check_attachments(
    problems: _Problems, attachments: Sequence[AttachmentIn]
) -> list[AttachmentIn]:
    out: list[AttachmentIn] = []
    content_ids: set[str] = set()
    for index, attachment in enumerate(attachments):
        path = f"attachments[{index}]"
        ok = True
        if not attachment.filename.strip():
            problems.bad(f"{path}.filename", "a filename is required")
            ok = False
        elif not _is_unicode(attachment.filename) or len(attachment.filename) > 255:
            problems.bad(f"{path}.filename", "not valid Unicode or longer than 255 characters")
            ok = False
        match = _CONTENT_TYPE.fullmatch(attachment.content_type.strip())
        if match is None:
            problems.bad(f"{path}.content_type", "must be type/subtype, without parameters")
            ok = False
        elif match.group(1).lower() in ("multipart", "message"):
            problems.bad(
                f"{path}.content_type", "multipart/* and message/* are containers, not files"
            )
            ok = False
        content_id = attachment.content_id
        if content_id is not None:
            content_id = content_id.strip()
            if content_id.startswith("<") and content_id.endswith(">"):
                content_id = content_id[1:-1]
            if not _CONTENT_ID.fullmatch(content_id):
                problems.bad(f"{path}.content_id", "must be printable ASCII without <, > or space")
                ok = False
            elif content_id.lower() in content_ids:
                problems.bad(f"{path}.content_id", "used by another attachment")
                ok = False
            else:
                content_ids.add(content_id.lower())
        if ok and match is not None:
            out.append(
                replace(
                    attachment,
                    content_type=f"{match.group(1)}/{match.group(2)}".lower(),
                    content_id=content_id,
                )
            )
    return out


def _check_sender(problems: _Problems, sender: Mailbox) -> Mailbox:
    """The agent's own address comes from our database, so a bad one is a bug or a
    corrupted row; it is still checked, because it becomes the From field."""
    checked = _checked(sender)
    if checked is None:
        problems.bad("from", "the sender address is not valid")
        return sender
    return checked


def _check_count(problems: _Problems, entries: int, max_recipients: int) -> None:
    if entries == 0:
        problems.bad("recipients", "at least one recipient (to, cc or bcc) is required")
    elif entries > max_recipients:
        problems.bad("recipients", f"more than {max_recipients} recipients")


def _compose(
    *,
    sender: Mailbox,
    to_entries: Sequence[str],
    cc_entries: Sequence[str],
    bcc_entries: Sequence[str],
    reply_to_entries: Sequence[str],
    derived_to: Sequence[Mailbox],
    derived_cc: Sequence[Mailbox],
    subject: str,
    text: str | None,
    html: str | None,
    attachments: Sequence[AttachmentIn],
    headers: Mapping[str, str],
    max_recipients: int,
    require_body: bool,
) -> Composed:
    """The checks every path shares: injection first (raised alone, so the answer is
    unambiguous), then everything else at once."""
    problems = _Problems()
    problems.scan("from", sender.address)
    problems.scan("from", sender.name)
    for label, entries in (
        ("to", to_entries),
        ("cc", cc_entries),
        ("bcc", bcc_entries),
        ("reply_to", reply_to_entries),
    ):
        _scan_entries(problems, label, entries)
    _scan_common(problems, subject, headers, attachments)
    problems.raise_injections()

    to = [*derived_to, *_parse_entries(problems, "to", to_entries)]
    cc_given = _parse_entries(problems, "cc", cc_entries)
    bcc = _parse_entries(problems, "bcc", bcc_entries)
    reply_to = _parse_entries(problems, "reply_to", reply_to_entries)
    problems.raise_injections()  # an encoded-word name decoded to a control character

    # Derived Cc (reply-all) never repeats To; the agent's own Cc entries are kept.
    taken = {m.address.lower() for m in to}
    cc: list[Mailbox] = []
    for mailbox in derived_cc:
        if mailbox.address.lower() not in taken:
            taken.add(mailbox.address.lower())
            cc.append(mailbox)
    cc.extend(cc_given)

    checked_sender = _check_sender(problems, sender)
    _check_subject(problems, subject)
    _check_bodies(problems, text, html, require_body)
    extra = _check_headers(problems, headers)
    files = _check_attachments(problems, attachments)
    count = len(derived_to) + len(cc) - len(cc_given)
    count += len(to_entries) + len(cc_entries) + len(bcc_entries)
    _check_count(problems, count, max_recipients)
    problems.raise_invalid()
    return Composed(
        sender=checked_sender,
        to=tuple(to),
        cc=tuple(cc),
        bcc=tuple(bcc),
        reply_to=tuple(reply_to),
        subject=subject,
        text=text,
        html=html,
        attachments=tuple(files),
        headers=tuple(extra),
    )


def validate(draft: Draft, *, sender: Mailbox, max_recipients: int = 100) -> Composed:
    """Check a draft and turn it into a `Composed` message from ``sender``.

    Recipients are counted per entry across to, cc and bcc (duplicates are sent once
    but still count); reply_to is not a recipient.

    Raises:
        HeaderInjection: a header-bound value holds a control character;
            ``extra['errors']`` names each field.
        ValidationFailed: anything else malformed (see the module docstring);
            ``extra['errors']`` names each field.
    """
    return _compose(
        sender=sender,
        to_entries=draft.to,
        cc_entries=draft.cc,
        bcc_entries=draft.bcc,
        reply_to_entries=draft.reply_to,
        derived_to=(),
        derived_cc=(),
        subject=draft.subject,
        text=draft.text,
        html=draft.html,
        attachments=draft.attachments,
        headers=draft.headers,
        max_recipients=max_recipients,
        require_body=True,
    )


# ------------------------------------------------------------------ reply, forward


def _derived_subject(prefix: str, already: re.Pattern[str], subject: str) -> str:
    """``prefix`` + the original subject (sanitised, cut to fit a line), unless the
    subject already starts with such a prefix; the original text is kept as it is."""
    subject = _sanitise(subject)
    if already.match(subject):
        return subject[:MAX_HEADER_CHARS]
    return f"{prefix} {subject}".rstrip()[:MAX_HEADER_CHARS]


def _clean_ids(ids: Iterable[str]) -> list[str]:
    """Ids fit to write, duplicates dropped: a stored message's ids are a third
    party's, so one we cannot write safely is left out rather than failing the reply."""
    seen: dict[str, None] = {}
    for ident in ids:
        ident = ident.strip().strip("<>")
        if _MSG_ID.fullmatch(ident):
            seen.setdefault(ident, None)
    return list(seen)


def _trim_references(ids: list[str]) -> tuple[str, ...]:
    """RFC 5322 §3.6.4 references, bounded: the thread's first id and the last 20
    (the root keeps threading alive in clients that thread by root, the tail keeps it
    for everyone else; a thread of hundreds would otherwise grow every reply)."""
    if len(ids) > _REFERENCES_KEEP_LAST + 1:
        ids = [ids[0], *ids[-_REFERENCES_KEEP_LAST:]]
    return tuple(ids)


def reply(
    original: Original,
    *,
    sender: Mailbox,
    own_addresses: Collection[str],
    text: str | None,
    html: str | None,
    reply_all: bool = False,
    attachments: Sequence[AttachmentIn] = (),
    headers: Mapping[str, str] = _EMPTY_HEADERS,
    to: Sequence[str] = (),
    cc: Sequence[str] = (),
    bcc: Sequence[str] = (),
    reply_to: Sequence[str] = (),
    max_recipients: int = 100,
) -> Composed:
    """A reply to ``original`` from ``sender``.

    To is the original's Reply-To if it has one, else its From (RFC 5322 §3.6.2),
    without the agent's own addresses (``own_addresses`` and the sender). Replying
    to a message the agent sent itself goes to that message's To, as mail clients
    do, so a follow-up in the agent's own thread reaches the other side.
    ``reply_all`` adds the original To and Cc to Cc, without the agent's own
    addresses and without anyone already addressed (case-insensitive). ``to``, when
    given, replaces the derived To; ``cc`` and ``bcc`` are the agent's additions and
    ``reply_to`` its Reply-To, all checked like `validate`'s entries. Addresses taken
    from the original that would not pass `validate` are left out.

    Subject: ``Re: `` + the original's (control characters turned into spaces)
    unless it already starts with a reply prefix. In-Reply-To is the original's id,
    References its References plus its id (RFC 5322 §3.6.4), bounded by
    `_trim_references`.

    Raises:
        HeaderInjection, ValidationFailed: as `validate`; ValidationFailed (field
            ``recipients``) also when nobody is left to reply to.
    """
    own = {_key(address) for address in own_addresses} | {_key(sender.address)}

    def usable(mailboxes: Iterable[Mailbox]) -> list[Mailbox]:
        out: list[Mailbox] = []
        for mailbox in mailboxes:
            checked = _checked(mailbox)
            if checked is None or checked.address.lower() in own:
                continue
            if checked.address.lower() not in {m.address.lower() for m in out}:
                out.append(checked)
        return out

    to_entries = to
    targets = original.reply_to or original.from_
    derived_to = usable(targets)
    from_us = bool(targets) and all(_key(m.address) in own for m in targets)
    derived_cc: list[Mailbox] = []
    if not derived_to and from_us:
        derived_to = usable(original.to)
        if reply_all:
            derived_cc = usable(original.cc)
    elif reply_all:
        derived_cc = usable((*original.to, *original.cc))

    if to_entries:
        derived_to = []
    references = _clean_ids((*original.references, original.rfc_message_id))
    in_reply_to = _clean_ids((original.rfc_message_id,))
    composed = _compose(
        sender=sender,
        to_entries=to_entries,
        cc_entries=cc,
        bcc_entries=bcc,
        reply_to_entries=reply_to,
        derived_to=derived_to,
        derived_cc=derived_cc,
        subject=_derived_subject("Re:", _REPLY_PREFIX, original.subject),
        text=text,
        html=html,
        attachments=attachments,
        headers=headers,
        max_recipients=max_recipients,
        require_body=True,
    )
    return replace(
        composed,
        in_reply_to=in_reply_to[0] if in_reply_to else None,
        references=_trim_references(references),
        auto_submitted="auto-replied",
    )


def forward(
    original: Original, *, sender: Mailbox, draft: Draft, max_recipients: int = 100
) -> Composed:
    """``original`` forwarded whole (its raw bytes as a ``message/rfc822`` part) to
    the draft's recipients, with the draft's text or html as the covering note (a
    forward without one is fine: the attached message is the content).

    Subject: the draft's if given, else ``Fwd: `` + the original's. In-Reply-To and
    References are *not* set: a forward starts a new conversation with people who
    never saw the thread, and referencing ids they do not hold would only let their
    clients (and our own threading, for the copy the agent keeps) fold it into an
    unrelated thread. The original's own headers travel inside the attachment.

    Raises:
        HeaderInjection, ValidationFailed: as `validate`.
        ValueError: ``original.raw`` is None (the caller must load the stored bytes).
    """
    if original.raw is None:
        raise ValueError("forward needs the original's raw bytes")
    subject = draft.subject or _derived_subject("Fwd:", _FORWARD_PREFIX, original.subject)
    composed = _compose(
        sender=sender,
        to_entries=draft.to,
        cc_entries=draft.cc,
        bcc_entries=draft.bcc,
        reply_to_entries=draft.reply_to,
        derived_to=(),
        derived_cc=(),
        subject=subject,
        text=draft.text,
        html=draft.html,
        attachments=draft.attachments,
        headers=draft.headers,
        max_recipients=max_recipients,
        require_body=False,
    )
    return replace(composed, forwarded=original.raw)


def message_id_for(outbound_id: str, domain: str) -> str:
    """The Message-ID (without ``<>``) for an outbound request: its public id, which
    is unique, at the sending domain, which makes it globally unique."""
    return f"{outbound_id}@{domain}"


# -------------------------------------------------------------------------- headers


def _encoded_words(text: str, first: int = 75) -> list[str]:
    """``text`` as RFC 2047 UTF-8 encoded-words of at most 75 characters (the first at
    most ``first``, to fit after the field name), never splitting a character; Q
    for mostly-Latin text (readable), B when most of it is not ASCII (shorter).
    Whitespace between encoded-words is ignored on decoding, so the words may be
    folded anywhere and the text comes back exactly."""
    chars = [ch.encode("utf-8") for ch in text]
    use_b = sum(1 for c in chars if len(c) > 1) * 3 > len(chars)

    def encoded_size(data: bytes) -> int:
        if use_b:
            return 4 * -(-len(data) // 3)
        return sum(1 if b in _Q_SAFE or b == 0x20 else 3 for b in data)

    words: list[str] = []
    chunk = b""
    budget = max(min(first, 75) - _EW_OVERHEAD, 12)  # 12: room for any one character
    for char in chars:
        if chunk and encoded_size(chunk + char) > budget:
            words.append(_encode_word(chunk, use_b))
            chunk = b""
            budget = _EW_PAYLOAD
        chunk += char
    if chunk or not words:
        words.append(_encode_word(chunk, use_b))
    return words


def _encode_word(data: bytes, use_b: bool) -> str:
    if use_b:
        return f"=?utf-8?b?{base64.b64encode(data).decode('ascii')}?="
    payload = "".join(chr(b) if b in _Q_SAFE else "_" if b == 0x20 else f"={b:02X}" for b in data)
    return f"=?utf-8?q?{payload}?="


def _unstructured_pieces(name: str, value: str) -> list[str]:
    """Pieces of an unstructured value, joined by single spaces: the value split at
    its spaces when it is ASCII (so unfolding restores it exactly), else encoded.
    ASCII that holds ``=?`` is encoded too, or a reader would decode it; so is a
    word too long for any line."""
    if value.isascii() and "=?" not in value:
        pieces = value.split(" ")
        if len(pieces[0]) + len(name) + 2 <= MAX_HEADER_CHARS and all(
            len(piece) < MAX_HEADER_CHARS for piece in pieces[1:]
        ):
            return pieces
    return _encoded_words(value, first=_FOLD_AT - len(name) - 2)


def _name_pieces(name: str, first: int = 75) -> list[str]:
    """A display name as phrase pieces: atoms as they are, anything else ASCII as one
    quoted-string (never folded inside), non-ASCII (or ``=?``) as encoded-words."""
    if not name:
        return []
    if name.isascii() and "=?" not in name:
        words = name.split(" ")
        if all(_ATEXT_WORD.fullmatch(word) for word in words):
            return words
        quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if len(quoted) <= 900:
            return [quoted]
    return _encoded_words(name, first)


def _mailbox_pieces(mailbox: Mailbox, first: int = 75) -> list[str]:
    name = _name_pieces(mailbox.name, first)
    return [*name, f"<{mailbox.address}>"] if name else [mailbox.address]


def _address_pieces(field: str, mailboxes: Sequence[Mailbox]) -> list[str]:
    pieces: list[str] = []
    for index, mailbox in enumerate(mailboxes):
        own = _mailbox_pieces(mailbox, _FOLD_AT - len(field) - 2 if index == 0 else 75)
        if index < len(mailboxes) - 1:
            own[-1] += ","
        pieces.extend(own)
    return pieces


def _fold(name: str, pieces: Sequence[str]) -> str:
    """``Name: piece piece ...`` folded before a piece when the line would pass 78
    characters (RFC 5322 §2.2.3: the fold's CRLF goes before existing whitespace).
    Never before an empty piece, which would leave a whitespace-only line."""
    lines: list[str] = []
    line = f"{name}:"
    for index, piece in enumerate(pieces):
        if index and piece and len(line) + 1 + len(piece) > _FOLD_AT:
            lines.append(line)
            line = f" {piece}"
        else:
            line = f"{line} {piece}"
    lines.append(line)
    return "\r\n".join(lines) + "\r\n"


def _ids(ids: Iterable[str]) -> list[str]:
    return [f"<{ident}>" for ident in ids]


def _recheck(c: Composed, message_id: str) -> None:
    """`build` may be handed a `Composed` that never went through `validate`
    (rebuilt from storage, made in a test): refuse control characters again, since
    here they would become header fields."""
    problems = _Problems()
    for label, mailboxes in (
        ("from", (c.sender,)),
        ("to", c.to),
        ("cc", c.cc),
        ("reply_to", c.reply_to),
    ):
        for index, mailbox in enumerate(mailboxes):
            path = f"{label}[{index}]"
            clean = problems.scan(path, mailbox.address) and problems.scan(path, mailbox.name)
            if clean and not (mailbox.address.isascii() and _is_unicode(mailbox.name)):
                problems.bad(path, "not an ASCII addr-spec with a Unicode name")
    _scan_common(problems, c.subject, dict(c.headers), c.attachments)
    problems.scan("auto_submitted", c.auto_submitted)
    ids = [("message_id", message_id), *(("references", ident) for ident in c.references)]
    if c.in_reply_to is not None:
        ids.append(("in_reply_to", c.in_reply_to))
    for path, ident in ids:
        if problems.scan(path, ident) and not _MSG_ID.fullmatch(ident):
            problems.bad(path, "not a message id we can write")
    problems.raise_injections()
    problems.raise_invalid()


# ----------------------------------------------------------------------------- body


class _Generator(BytesGenerator):
    """Writes a ``message/rfc822`` part's raw payload byte for byte.

    The stdlib keeps raw 8-bit bytes as surrogate escapes in a str payload, and its
    `BytesGenerator` turns every other part back with ``surrogateescape`` but encodes
    a message part's string payload as plain ASCII (and fails). Parsing the
    original into a Message instead would re-serialise it and change its bytes.
    """

    def _encode(self, s: str) -> bytes:
        return s.encode("ascii", "surrogateescape")


def _text_part(body: str, subtype: str) -> MIMEPart:
    part = MIMEPart(policy=_BODY_POLICY)
    part.set_content(body, subtype=subtype)
    return part


def _container(subtype: str, children: Sequence[MIMEPart], params: str = "") -> MIMEPart:
    part = MIMEPart(policy=_BODY_POLICY)
    part["Content-Type"] = f"multipart/{subtype}{params}"
    for child in children:
        part.attach(child)
    return part


def _attachment_part(attachment: AttachmentIn, disposition: str) -> MIMEPart:
    maintype, _, subtype = attachment.content_type.partition("/")
    part = MIMEPart(policy=_BODY_POLICY)
    part.set_content(
        attachment.data, maintype, subtype, disposition=disposition, filename=attachment.filename
    )
    if attachment.content_id is not None:
        part.set_raw("Content-ID", f"<{attachment.content_id}>")
    return part


_LINE_END = re.compile(rb"\r\n|\r|\n")


def _forwarded_part(raw: bytes) -> MIMEPart:
    """The original, line endings made CRLF, otherwise byte for byte. RFC 2046 §5.2.1
    allows only 7bit/8bit/binary here, so an original with 8-bit bytes (or lines
    past 998) is declared ``8bit``: the transport must then offer 8BITMIME."""
    data = _LINE_END.sub(b"\r\n", raw)
    seven_bit = data.isascii() and all(
        len(line) <= MAX_HEADER_CHARS for line in data.split(b"\r\n")
    )
    part = MIMEPart(policy=_BODY_POLICY)
    part["Content-Type"] = "message/rfc822"
    part["Content-Disposition"] = 'attachment; filename="forwarded.eml"'
    part["Content-Transfer-Encoding"] = "7bit" if seven_bit else "8bit"
    part.set_payload(data.decode("ascii", "surrogateescape"))
    return part


def _body(c: Composed) -> MIMEPart:
    """The MIME tree: text, html or multipart/alternative of both; multipart/related
    around the html when inline attachments with a content id go with it; and
    multipart/mixed around that when there are other attachments or a forward."""
    related = [
        a for a in c.attachments if c.html is not None and a.inline and a.content_id is not None
    ]
    others = [a for a in c.attachments if a not in related]

    html_node: MIMEPart | None = None
    if c.html is not None:
        html_node = _text_part(c.html, "html")
        if related:
            html_node = _container(
                "related",
                [html_node, *(_attachment_part(a, "inline") for a in related)],
                '; type="text/html"',
            )
    text_node = _text_part(c.text, "plain") if c.text is not None else None
    body: MIMEPart | None
    if text_node is not None and html_node is not None:
        body = _container("alternative", [text_node, html_node])
    else:
        body = text_node or html_node

    mixed = [_attachment_part(a, "inline" if a.inline else "attachment") for a in others]
    if c.forwarded is not None:
        mixed.append(_forwarded_part(c.forwarded))
    if not mixed:
        if body is None:  # validate() requires a body or a forward
            raise ValueError("nothing to build: no body, attachment or forwarded message")
        return body
    return _container("mixed", [body, *mixed] if body is not None else mixed)


def build(c: Composed, *, message_id: str, date: datetime) -> bytes:
    """The message as RFC 5322 bytes with CRLF line endings, ready for a transport.

    Header fields: From, To, Cc, Reply-To, Subject, Date, Message-ID, In-Reply-To,
    References, MIME-Version, Auto-Submitted, then the extra headers. Bcc is never
    written: the envelope (`Composed.recipients`) carries it. Bodies are 7-bit
    (quoted-printable or base64 where needed); a text body is lines, so its line
    breaks become CRLF and a missing final line break is added (re-parsed, it reads
    with LF line ends and a final LF). Output is 7-bit unless a forwarded original
    holds 8-bit bytes.

    Raises:
        HeaderInjection, ValidationFailed: ``c`` holds a value that cannot be a
            header (only possible for a `Composed` not made by this module).
        ValueError: ``date`` is naive.
    """
    if date.tzinfo is None or date.utcoffset() is None:
        raise ValueError("date must be timezone-aware")
    _recheck(c, message_id)
    head = [_fold("From", _address_pieces("From", (c.sender,)))]
    head.append(
        _fold("To", _address_pieces("To", c.to)) if c.to else "To: undisclosed-recipients:;\r\n"
    )
    if c.cc:
        head.append(_fold("Cc", _address_pieces("Cc", c.cc)))
    if c.reply_to:
        head.append(_fold("Reply-To", _address_pieces("Reply-To", c.reply_to)))
    head.append(_fold("Subject", _unstructured_pieces("Subject", c.subject)))
    head.append(_fold("Date", [format_datetime(date)]))
    head.append(_fold("Message-ID", _ids((message_id,))))
    if c.in_reply_to:
        head.append(_fold("In-Reply-To", _ids((c.in_reply_to,))))
    if c.references:
        head.append(_fold("References", _ids(c.references)))
    head.append("MIME-Version: 1.0\r\n")
    if c.auto_submitted:  # empty: the operator turned RFC 3834 marking off
        head.append(_fold("Auto-Submitted", [c.auto_submitted]))
    for name, value in c.headers:
        head.append(_fold(name, _unstructured_pieces(name, value)))
    out = BytesIO()
    out.write("".join(head).encode("ascii"))
    _Generator(out, mangle_from_=False, policy=_BODY_POLICY).flatten(_body(c))
    return out.getvalue()
