"""Provider inbound webhooks: a provider's POST in, one `InboundDelivery` out.

Each provider hands us a message in its own wire format; the gateway stores raw
RFC 5322 bytes, so every format is turned back into bytes here, with no I/O, so the
routes stay thin and the service ingests a webhook exactly like an SMTP delivery.

Wire formats, as the providers document them (only the formats were taken):

* SendGrid Inbound Parse —
  https://www.twilio.com/docs/sendgrid/for-developers/parsing-email/inbound-email
  (formerly https://sendgrid.com/docs/API_Reference/Webhooks/parse.html): a multipart
  form with ``headers`` (the raw header block), ``text``, ``html``, ``from``, ``to``,
  ``cc``, ``subject``, ``envelope`` (JSON ``{"to": [...], "from": "..."}``),
  ``charsets`` (JSON: field name → charset), ``SPF``, ``dkim``, ``spam_score``,
  ``attachments`` (a count), ``attachment-info`` (JSON keyed ``attachmentN`` with
  ``filename``/``name``, ``type``, ``content-id``) and files ``attachment1``…; with
  "POST the raw, full MIME message" on, ``email`` holds the message instead.
  SendGrid documents no per-message id, so ``provider_event_id`` stays None: nothing
  is derived, dedup relies on the raw hash.
* Mailgun routes —
  https://documentation.mailgun.com/docs/mailgun/user-manual/receive-forward-store/receive-http
  and .../store-retreive: ``recipient`` and ``sender`` (the SMTP envelope), ``from``,
  ``subject``, ``body-plain``, ``stripped-text``, ``body-html``, ``message-headers``
  (JSON list of ``[name, value]``, order kept), ``attachment-count``, files
  ``attachment-1``…, ``content-id-map`` (JSON ``{"<cid>": "attachment-1"}``), and
  ``timestamp``/``token``/``signature``; a forward URL ending in ``mime`` receives
  ``body-mime`` (the message as is) instead of the parsed fields. Signatures:
  https://documentation.mailgun.com/docs/mailgun/user-manual/webhooks/securing-webhooks
  (hex HMAC-SHA256 of ``timestamp + token`` under the webhook signing key). Mailgun's
  SPF/DKIM verdicts are not form fields; they travel as the ``X-Mailgun-Spf`` and
  ``X-Mailgun-Dkim-Check-Result`` headers it adds, and are read from there.
* Postmark inbound —
  https://postmarkapp.com/developer/webhooks/inbound-webhook and
  https://postmarkapp.com/developer/user-guide/inbound/parse-an-email: JSON with
  ``FromFull{Email,Name}``, ``ToFull``/``CcFull``/``BccFull`` lists, ``OriginalRecipient``,
  ``ReplyTo``, ``Subject``, ``MessageID`` (Postmark's id, not the RFC Message-ID, which
  is in ``Headers`` when the sender set one), ``Date``, ``TextBody``, ``HtmlBody``,
  ``Headers[{Name,Value}]``, ``Attachments[{Name,Content,ContentType,ContentLength,
  ContentID}]`` (Content is base64) and ``RawEmail`` when the server has "include raw
  email content" on. Postmark's verdicts are headers (``Received-SPF``, ``X-Spam-*``).

Reconstruction (parsed modes) is deterministic on purpose: a provider retry must give
byte-identical output so the ingest dedup (Message-ID + raw SHA-256) collapses it.
So MIME boundaries derive from a hash of the content, and no ``Date`` or
``Message-ID`` is invented (the ingest service derives an id from the bytes). The
provider's header block is kept verbatim except ``Content-*``/``MIME-Version``, which
describe a body structure that no longer exists and are regenerated for the one built.
A provider header with an unusable name is dropped, and continuation lines are forced
to start with whitespace so a header value can never end the header block early.

Provider verdicts are kept twice: verbatim in ``provider_verdicts`` (recorded), and
read into rules' `AuthResults` (``auth``) conservatively, since they decide whether a
known contact may skip the rules: only RFC 8601 result words count, a verdict header
present twice counts as absent, and a DKIM pass names a domain only when the report
ties it to one (SendGrid's per-signature ``dkim`` field, SpamAssassin's
``DKIM_VALID_AU``, or a message with a single signature).

Form bodies are decoded here too (`decode_form`), into bytes, so the parsers above
decide on charsets and raw fields stay byte-exact.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.header import Header
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser, HeaderParser
from email.policy import SMTP, compat32
from email.utils import collapse_rfc2231_value, formataddr, getaddresses
from typing import Any, Protocol
from urllib.parse import unquote_to_bytes

from mailgate.domain.rules import AuthResults
from mailgate.errors import Unauthorized, ValidationFailed

__all__ = [
    "FileField",
    "FormData",
    "InMemoryReplayGuard",
    "InboundDelivery",
    "ReplayGuard",
    "check_basic_auth",
    "check_bearer_token",
    "check_path_secret",
    "decode_form",
    "parse_mailgun",
    "parse_postmark",
    "parse_raw",
    "parse_sendgrid",
    "verify_mailgun_signature",
]

FileField = tuple[str | None, str | None, bytes]
"""An uploaded form file as the route hands it over: ``(filename, content_type, data)``."""

FormValue = str | bytes
"""A form field: ``str`` when the edge decoded it, ``bytes`` when it left that to us
(SendGrid fields arrive in the charsets its ``charsets`` field names)."""

# Headers kept verbatim: refolding would change bytes a DKIM signature may cover.
_POLICY = SMTP.clone(refold_source="none")
_HEADER_NAME = re.compile(r"[!-9;-~]+\Z")  # RFC 5322 ftext: printable ASCII except ':'
_HEADER_LINE = re.compile(r"([!-9;-~]+)[ \t]*:[ \t]*(.*)\Z", re.DOTALL)
_MIME_TYPE = re.compile(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SENDGRID_FILE = re.compile(r"attachment(\d+)\Z")
_MAILGUN_FILE = re.compile(r"attachment-(\d+)\Z")
_REGENERATED = frozenset({"mime-version"})
_MAX_ATTACHMENTS = 1000


@dataclass(frozen=True, slots=True)
class InboundDelivery:
    """One message a provider delivered, ready for `IngestService.ingest`."""

    raw: bytes
    """RFC 5322 bytes: verbatim in raw modes, rebuilt (deterministically) otherwise."""
    mail_from: str
    """The envelope sender as the provider saw it, else the From address; may be ``""``
    (a bounce's null reverse-path)."""
    recipients: tuple[str, ...]
    """Envelope recipients when the provider gives them, else the To/Cc addresses;
    the service resolves the target agents from these."""
    provider: str
    """``"sendgrid"``, ``"mailgun"``, ``"postmark"`` or ``"raw"``."""
    provider_event_id: str | None
    """Mailgun ``token``, Postmark ``MessageID``; None where the provider has none."""
    provider_verdicts: dict[str, str] = field(default_factory=dict)
    """Authentication/spam verdicts exactly as the provider reported them (e.g.
    ``{"spf": "pass", "dkim": "{@example.com : pass}"}``); recorded, never trusted
    over our own checks."""
    reconstructed: bool = False
    """True when ``raw`` was rebuilt from parsed fields rather than posted verbatim."""
    auth: AuthResults = field(default_factory=AuthResults)
    """The provider's verdicts as rules see them, read conservatively: a verdict that
    is missing, not an RFC 8601 result word, or stated twice (a sender may have
    planted one) is ``none``; a DKIM pass names a domain only when the provider's
    report ties it to one; DMARC is ``none`` (no provider here reports it)."""


# --------------------------------------------------------------------------- errors


def _invalid(field_name: str, message: str) -> ValidationFailed:
    return ValidationFailed(
        f"invalid {field_name}: {message}",
        errors=[{"field": field_name, "message": message}],
    )


# --------------------------------------------------------------------------- helpers


def _text(form: Mapping[str, FormValue], name: str, charset: str = "utf-8") -> str | None:
    """A form field as text; bytes are decoded in the charset the provider declared.

    An unknown or wrong charset degrades to UTF-8 with replacement: a webhook refused
    with 4xx is retried for days, and a garbled character beats a lost message.
    """
    value = form.get(name)
    if value is None or isinstance(value, str):
        return value
    try:
        return value.decode(charset)
    except (LookupError, UnicodeDecodeError):
        return value.decode("utf-8", "replace")


def _json_field(form: Mapping[str, FormValue], name: str, default: Any) -> Any:
    """A JSON-valued form field; ``default`` when absent or blank."""
    raw = _text(form, name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return json.loads(raw)
    except ValueError:
        raise _invalid(name, "not JSON") from None


def _as_bytes(value: FormValue) -> bytes:
    # A decoded str is re-encoded as UTF-8: the edge decoded it from UTF-8 (Mailgun
    # and SendGrid post UTF-8 unless told otherwise), so this restores the bytes.
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


def _unique(addresses: Iterable[str]) -> tuple[str, ...]:
    """Trimmed, non-empty, first occurrence kept (compared case-insensitively)."""
    seen: dict[str, str] = {}
    for address in addresses:
        cleaned = address.strip().strip("<>").strip()
        if cleaned and "@" in cleaned and cleaned.casefold() not in seen:
            seen[cleaned.casefold()] = cleaned
    return tuple(seen.values())


def _addresses(*header_values: str | None) -> list[str]:
    values = [v for v in header_values if v]
    return [addr for _, addr in getaddresses(values)] if values else []


def _first_address(value: str | None) -> str:
    found = _unique(_addresses(value))
    return found[0] if found else ""


def _split_list(value: str | None) -> list[str]:
    return [part for part in re.split(r"[,;]", value or "") if part.strip()]


def _header_block(block: str) -> list[tuple[str, str]]:
    """Split a raw header block (SendGrid's ``headers``) into ``(name, value)`` pairs.

    Continuation lines stay in the value (re-emitted verbatim). A line that is neither
    a header nor a continuation is dropped: lenient, like the MIME parser.
    """
    pairs: list[tuple[str, str]] = []
    for line in block.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        if line[0] in " \t":
            if pairs:
                name, value = pairs[-1]
                pairs[-1] = (name, f"{value}\n{line}")
            continue
        match = _HEADER_LINE.match(line)
        if match:
            pairs.append((match.group(1), match.group(2)))
    return pairs


def _header(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    wanted = name.lower()
    return next((v for n, v in headers if n.lower() == wanted), None)


def _raw_headers(raw: bytes) -> list[tuple[str, str]]:
    """Header fields of a raw message (for fallbacks and verdicts only; never raises)."""
    try:
        parsed = BytesHeaderParser(policy=compat32).parsebytes(raw)
    except Exception:  # hostile bytes: fall back to nothing rather than failing
        return []
    return [(str(n), str(v)) for n, v in parsed.items()]


def _content_type(value: str | None) -> str:
    """A safe ``maintype/subtype``; message/* and multipart/* become octet-stream, since
    an attachment we base64-encode may not claim a structured type (RFC 2046 §5)."""
    ctype = (value or "").split(";", 1)[0].strip().lower()
    if not _MIME_TYPE.match(ctype) or ctype.startswith(("message/", "multipart/")):
        return "application/octet-stream"
    return ctype


def _clean(value: str | None) -> str | None:
    return _CONTROL.sub("", value).strip() or None if value else None


@dataclass(frozen=True, slots=True)
class _Attachment:
    filename: str | None
    content_type: str
    content_id: str | None
    inline: bool
    data: bytes


def _add_header(msg: EmailMessage, name: str, value: str) -> None:
    """Append one provider header, verbatim when it is ASCII.

    Non-ASCII values (providers hand them over decoded) are encoded per RFC 2047 by the
    header registry; a value it cannot parse falls back to one unstructured encoded-word
    run rather than failing the delivery.
    """
    lines = [line for line in value.replace("\r\n", "\n").split("\n") if line.strip()]
    if not lines:
        lines = [""]
    # A continuation must start with whitespace, or it would begin a new header.
    value = "\r\n".join(
        [lines[0].strip()] + [ln if ln[0] in " \t" else f" {ln}" for ln in lines[1:]]
    )
    if value.isascii():
        msg.set_raw(name, value)
        return
    unfolded = re.sub(r"\r\n[ \t]+", " ", value)
    try:
        parsed = _POLICY.header_factory(name, unfolded)
        parsed.fold(policy=_POLICY)  # surfaces encoding errors now, not at generation
        msg.set_raw(name, parsed)  # a header object: folded at generation
    except Exception:  # the registry raises assorted errors on odd values
        msg.set_raw(name, Header(unfolded, "utf-8", header_name=name).encode(linesep="\r\n"))


def _build(
    headers: Sequence[tuple[str, str]],
    text: str | None,
    html: str | None,
    attachments: Sequence[_Attachment],
) -> bytes:
    """Rebuild RFC 5322 bytes from parsed parts; same input, same bytes."""
    digest = hashlib.sha256()
    for part in (
        *(f"{n}:{v}" for n, v in headers),
        text or "",
        html or "",
        *(f"{a.filename}|{a.content_type}|{a.content_id}|{a.inline}" for a in attachments),
    ):
        digest.update(len(part).to_bytes(8, "big") + part.encode("utf-8", "surrogatepass"))
    for attachment in attachments:
        digest.update(hashlib.sha256(attachment.data).digest())

    msg = EmailMessage(policy=_POLICY)
    for name, value in headers:
        lowered = name.lower()
        if not _HEADER_NAME.match(name) or lowered.startswith("content-"):
            continue
        if lowered in _REGENERATED:
            continue
        _add_header(msg, name, value)

    if text is None and html is None:
        msg.set_content("")
    elif html is None:
        msg.set_content(text or "")
    elif text is None:
        msg.set_content(html, subtype="html")
    else:
        msg.set_content(text)
        msg.add_alternative(html, subtype="html")
    for a in attachments:
        maintype, subtype = a.content_type.split("/", 1)
        cid = None
        if a.content_id:
            cid = a.content_id if a.content_id.startswith("<") else f"<{a.content_id}>"
        msg.add_attachment(
            a.data,
            maintype=maintype,
            subtype=subtype,
            filename=a.filename,
            cid=cid,
            disposition="inline" if a.inline else "attachment",
        )
    token = digest.hexdigest()[:32]
    for index, node in enumerate(msg.walk()):
        if index:  # set_content stamps every part; only the top level needs it
            del node["MIME-Version"]
        if node.is_multipart():
            node.set_boundary(f"=_mg_{token}_{index}")
    return msg.as_bytes(policy=_POLICY)


def _require_some(raw: bytes, field_name: str) -> bytes:
    if not raw.strip():
        raise _invalid(field_name, "empty message")
    return raw


# --------------------------------------------------------------------------- forms


@dataclass(frozen=True, slots=True)
class FormData:
    """A decoded form: fields as the bytes that were posted, files by field name.

    Values stay bytes on purpose: SendGrid posts each field in the charset its
    ``charsets`` field names, and a raw ``email``/``body-mime`` field must reach the
    store byte for byte, so decoding is left to the provider's parser. A repeated
    field name keeps its first value.
    """

    fields: dict[str, bytes]
    files: dict[str, FileField]


_MAX_FORM_PARTS = 2 * _MAX_ATTACHMENTS + 200


def decode_form(body: bytes, content_type: str | None) -> FormData:
    """Decode a buffered ``multipart/form-data`` or urlencoded request body.

    Our own decoder rather than Starlette's: that one decodes every non-file field as
    text (falling back to Latin-1) and caps each at 1 MiB, which would both alter a
    raw message and refuse SendGrid's raw mode. The body arrives already capped by the
    edge, so one pass of ``bytes.find`` over it is all the parsing there is.

    Raises:
        ValidationFailed: naming ``Content-Type`` (not a form, no usable boundary) or
            ``body`` (no boundary found, unterminated, a part without a name, more
            than the allowed number of parts).
    """
    header = Message()
    header["Content-Type"] = content_type or ""
    ctype = header.get_content_type() if content_type else ""
    if ctype == "multipart/form-data":
        boundary = header.get_param("boundary")
        text = collapse_rfc2231_value(boundary) if boundary else ""
        if not text or len(text) > 200 or not text.isascii():
            raise _invalid("Content-Type", "multipart boundary missing or unusable")
        return _decode_multipart(body, text.encode("ascii"))
    if ctype == "application/x-www-form-urlencoded":
        return FormData(_decode_urlencoded(body), {})
    raise _invalid(
        "Content-Type", "must be multipart/form-data or application/x-www-form-urlencoded"
    )


def _decode_urlencoded(body: bytes) -> dict[str, bytes]:
    fields: dict[str, bytes] = {}
    count = 0
    for pair in body.split(b"&"):
        if not pair:
            continue
        count += 1
        if count > _MAX_FORM_PARTS:
            raise _invalid("body", f"more than {_MAX_FORM_PARTS} form fields")
        name, _, value = pair.partition(b"=")
        key = unquote_to_bytes(name.replace(b"+", b" ")).decode("utf-8", "replace")
        fields.setdefault(key, unquote_to_bytes(value.replace(b"+", b" ")))
    return fields


def _decode_multipart(body: bytes, boundary: bytes) -> FormData:
    """RFC 7578 over RFC 2046 §5.1.1: parts between ``--boundary`` lines; the line
    break before a delimiter belongs to it. Bare LF line breaks are accepted too."""
    delimiter = b"--" + boundary
    if body.startswith(delimiter):
        pos = len(delimiter)
    else:  # skip the preamble
        found = body.find(b"\n" + delimiter)
        if found < 0:
            raise _invalid("body", "the multipart boundary does not occur in the body")
        pos = found + 1 + len(delimiter)
    fields: dict[str, bytes] = {}
    files: dict[str, FileField] = {}
    count = 0
    while not body.startswith(b"--", pos):  # "--boundary--" closes the body
        eol = body.find(b"\n", pos)
        if eol < 0:
            raise _invalid("body", "the multipart body is not terminated")
        if body[pos:eol].strip(b" \t\r"):  # only transport padding may follow a delimiter
            raise _invalid("body", "malformed multipart boundary line")
        start = eol + 1
        end = body.find(b"\n" + delimiter, start)
        if end < 0:
            raise _invalid("body", "the multipart body is not terminated")
        stop = end - 1 if end > start and body[end - 1] == 0x0D else end
        count += 1
        if count > _MAX_FORM_PARTS:
            raise _invalid("body", f"more than {_MAX_FORM_PARTS} form parts")
        _add_form_part(body, start, stop, fields, files)
        pos = end + 1 + len(delimiter)
    return FormData(fields, files)


def _add_form_part(
    body: bytes, start: int, stop: int, fields: dict[str, bytes], files: dict[str, FileField]
) -> None:
    ends = [
        (at, len(sep)) for sep in (b"\r\n\r\n", b"\n\n") if (at := body.find(sep, start, stop)) >= 0
    ]
    if not ends:
        raise _invalid("body", "a form part has no header block")
    head_end, sep_len = min(ends)
    # Decoded as Latin-1 so 8-bit bytes survive as text (compat32 would turn them into
    # a Header object whose str() replaces them); _param recovers the UTF-8.
    block = body[start:head_end].decode("latin-1")
    head = HeaderParser(policy=compat32).parsestr(block + "\r\n\r\n")
    name = _param(head, "name")
    if not name:
        raise _invalid("body", "a form part has no name in its Content-Disposition")
    data = body[head_end + sep_len : stop]
    filename = _param(head, "filename")
    if filename is None:
        fields.setdefault(name, data)
    elif name not in files:
        ctype = head.get_content_type() if head.get("Content-Type") else None
        files[name] = (filename or None, ctype, data)


def _param(head: Message, name: str) -> str | None:
    """A Content-Disposition parameter as text (RFC 2231 or raw UTF-8), None if absent."""
    value = head.get_param(name, None, header="content-disposition")
    if value is None:
        return None
    if isinstance(value, tuple):
        return collapse_rfc2231_value(value)
    # The header block was read as Latin-1; its 8-bit bytes are UTF-8 in practice
    # (what browsers and providers put in a quoted name).
    return value.encode("latin-1").decode("utf-8", "replace")


# --------------------------------------------------------------------------- verdicts

_RESULT_WORDS = frozenset(
    {"pass", "fail", "softfail", "neutral", "none", "temperror", "permerror", "policy"}
)
_FIRST_WORD = re.compile(r"\s*([A-Za-z]+)(?=$|[\s(;,])")
_DKIM_D_TAG = re.compile(r"(?:^|;)\s*d\s*=\s*([^;\s]+)")


def _result_word(value: str | None) -> str:
    """The RFC 8601 result a provider's verdict starts with (``"Pass (...)"`` →
    ``pass``, ``"SoftFail"`` → ``softfail``); ``none`` for anything else."""
    match = _FIRST_WORD.match(value or "")
    word = match.group(1).lower() if match else ""
    return word if word in _RESULT_WORDS else "none"


def _domain_of(address: str | None) -> str | None:
    local, at, domain = (address or "").strip().strip("<>").rpartition("@")
    domain = domain.strip().rstrip(".").lower()
    return domain if at and local and domain else None


def _only(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    """A header's value when it occurs exactly once; a second copy may be the
    sender's own forgery, and then neither is believed."""
    wanted = name.lower()
    values = [v for n, v in headers if n.lower() == wanted]
    return values[0] if len(values) == 1 else None


def _signature_domains(headers: Sequence[tuple[str, str]]) -> set[str]:
    domains = set()
    for name, value in headers:
        if name.lower() == "dkim-signature":
            match = _DKIM_D_TAG.search(re.sub(r"\s+", " ", value))
            if match:
                domains.add(match.group(1).strip().rstrip(".").lower())
    return domains


def _spf_facts(verdict: str | None, mail_from: str | None) -> tuple[str, str | None]:
    """An SPF result and, on pass, the MAIL FROM domain it authenticated (a null
    sender's pass was for the HELO name, which providers do not give: no domain)."""
    result = _result_word(verdict)
    return result, _domain_of(mail_from) if result == "pass" else None


_SENDGRID_DKIM = re.compile(r"@([^\s:,{}]+)\s*:\s*([A-Za-z]+)")


def _sendgrid_auth(spf: str | None, dkim: str | None, mail_from: str) -> AuthResults:
    """SendGrid's ``SPF`` field is a bare result; ``dkim`` reads
    ``{@example.com : pass, @other.example : fail}``, one entry per signature."""
    spf_result, spf_domain = _spf_facts(spf, mail_from)
    checks = [
        (d.rstrip(".").lower(), _result_word(r)) for d, r in _SENDGRID_DKIM.findall(dkim or "")
    ]
    passed = tuple(dict.fromkeys(d for d, r in checks if r == "pass"))
    dkim_result = "pass" if passed else checks[0][1] if checks else _result_word(dkim)
    return AuthResults(spf=spf_result, spf_domain=spf_domain, dkim=dkim_result, dkim_domains=passed)


def _single_signature_domain(
    headers: Sequence[tuple[str, str]], dkim_result: str
) -> tuple[str, ...]:
    """A provider that says only "DKIM passed" has vouched for a domain only when the
    message carries exactly one signature."""
    domains = _signature_domains(headers)
    return tuple(domains) if dkim_result == "pass" and len(domains) == 1 else ()


def _mailgun_auth(headers: Sequence[tuple[str, str]], mail_from: str) -> AuthResults:
    spf_result, spf_domain = _spf_facts(_only(headers, "X-Mailgun-Spf"), mail_from)
    dkim_result = _result_word(_only(headers, "X-Mailgun-Dkim-Check-Result"))
    return AuthResults(
        spf=spf_result,
        spf_domain=spf_domain,
        dkim=dkim_result,
        dkim_domains=_single_signature_domain(headers, dkim_result),
    )


_ENVELOPE_FROM = re.compile(r"envelope-from=\"?<?([^;\s\">]*)", re.IGNORECASE)


def _postmark_auth(
    headers: Sequence[tuple[str, str]], mail_from: str, author: str | None
) -> AuthResults:
    """Postmark reports SPF as a ``Received-SPF`` header and DKIM only through
    SpamAssassin's ``X-Spam-Tests``: ``DKIM_VALID`` (some signature verified),
    ``DKIM_VALID_AU`` (one from the author's domain), ``DKIM_INVALID``."""
    received_spf = _only(headers, "Received-SPF")
    envelope = _ENVELOPE_FROM.search(received_spf or "")
    spf_result, spf_domain = _spf_facts(
        received_spf, envelope.group(1) if envelope and envelope.group(1) else mail_from
    )
    tests = {t.upper() for t in re.split(r"[\s,]+", _only(headers, "X-Spam-Tests") or "") if t}
    domains: tuple[str, ...] = ()
    if "DKIM_VALID" in tests or "DKIM_VALID_AU" in tests:
        dkim_result = "pass"
        author_domain = _domain_of(author)
        if "DKIM_VALID_AU" in tests and author_domain:
            domains = (author_domain,)
        else:
            domains = _single_signature_domain(headers, dkim_result)
    elif "DKIM_INVALID" in tests:
        dkim_result = "fail"
    else:
        dkim_result = "none"
    return AuthResults(
        spf=spf_result, spf_domain=spf_domain, dkim=dkim_result, dkim_domains=domains
    )


# --------------------------------------------------------------------------- SendGrid


def parse_sendgrid(
    form: Mapping[str, FormValue], files: Mapping[str, FileField]
) -> InboundDelivery:
    """SendGrid Inbound Parse, parsed or raw (``email``) mode.

    Raises:
        ValidationFailed: ``envelope``/``charsets``/``attachment-info`` not JSON or
            not the documented shape, ``attachments`` not a count, a counted file
            missing, or neither body nor headers nor ``email`` present.
    """
    charsets = _json_field(form, "charsets", {})
    if not isinstance(charsets, dict) or not all(isinstance(v, str) for v in charsets.values()):
        raise _invalid("charsets", "must be a JSON object of field → charset")

    def text(name: str) -> str | None:
        return _text(form, name, charsets.get(name, "utf-8"))

    envelope = _json_field(form, "envelope", {})
    if not isinstance(envelope, dict):
        raise _invalid("envelope", "must be a JSON object")
    env_to = envelope.get("to") or []
    if isinstance(env_to, str):
        env_to = [env_to]
    if not isinstance(env_to, list) or not all(isinstance(v, str) for v in env_to):
        raise _invalid("envelope", "'to' must be a list of addresses")
    env_from = envelope.get("from")
    if env_from is not None and not isinstance(env_from, str):
        raise _invalid("envelope", "'from' must be a string")

    verdicts = {
        key: value
        for key, name in (("spf", "SPF"), ("dkim", "dkim"), ("spam_score", "spam_score"))
        if (value := text(name))
    }

    email_field = form.get("email")
    if email_field:
        raw = _require_some(_as_bytes(email_field), "email")
        headers = _raw_headers(raw)
        reconstructed = False
    else:
        headers = _header_block(text("headers") or "")
        for name in ("From", "To", "Cc", "Subject"):
            value = _clean(text(name.lower()))
            if value and _header(headers, name) is None:
                headers.append((name, value))
        body_text, body_html = text("text"), text("html")
        attachments = _sendgrid_attachments(form, files)
        if not headers and body_text is None and body_html is None and not attachments:
            raise _invalid("email", "neither a raw message nor parsed fields were posted")
        raw = _build(headers, body_text, body_html, attachments)
        reconstructed = True

    recipients = _unique(env_to) or _unique(
        _addresses(_header(headers, "To"), _header(headers, "Cc"))
    )
    mail_from = env_from.strip() if env_from is not None else ""
    if env_from is None:
        mail_from = _first_address(_header(headers, "From"))
    return InboundDelivery(
        raw=raw,
        mail_from=mail_from,
        recipients=recipients,
        provider="sendgrid",
        provider_event_id=None,  # SendGrid documents no per-message id
        provider_verdicts=verdicts,
        reconstructed=reconstructed,
        auth=_sendgrid_auth(text("SPF"), text("dkim"), mail_from),
    )


def _count(form: Mapping[str, FormValue], name: str) -> int | None:
    value = _text(form, name)
    if value is None or value.strip() == "":
        return None
    if not value.strip().isdigit() or int(value) > _MAX_ATTACHMENTS:
        raise _invalid(name, f"must be a count from 0 to {_MAX_ATTACHMENTS}")
    return int(value)


def _numbered(
    files: Mapping[str, FileField], pattern: re.Pattern[str], count: int | None, fmt: str
) -> list[tuple[str, FileField]]:
    """The numbered attachment files in order; with a declared count, all must exist."""
    if count is None:
        numbers = sorted(int(m.group(1)) for k in files if (m := pattern.match(k)))
        return [(fmt.format(n), files[fmt.format(n)]) for n in numbers]
    found: list[tuple[str, FileField]] = []
    for n in range(1, count + 1):
        key = fmt.format(n)
        if key not in files:
            raise _invalid(key, "declared in the attachment count but not posted")
        found.append((key, files[key]))
    return found


def _sendgrid_attachments(
    form: Mapping[str, FormValue], files: Mapping[str, FileField]
) -> list[_Attachment]:
    info = _json_field(form, "attachment-info", {})
    if not isinstance(info, dict) or not all(isinstance(v, dict) for v in info.values()):
        raise _invalid("attachment-info", "must be a JSON object of objects")
    result: list[_Attachment] = []
    for key, (filename, ctype, data) in _numbered(
        files, _SENDGRID_FILE, _count(form, "attachments"), "attachment{}"
    ):
        meta = info.get(key, {})
        cid = _clean(str(meta["content-id"])) if meta.get("content-id") else None
        result.append(
            _Attachment(
                filename=_clean(meta.get("filename") or meta.get("name") or filename),
                content_type=_content_type(meta.get("type") or ctype),
                content_id=cid,
                inline=cid is not None,
                data=data,
            )
        )
    return result


# --------------------------------------------------------------------------- Mailgun


def parse_mailgun(form: Mapping[str, FormValue], files: Mapping[str, FileField]) -> InboundDelivery:
    """A Mailgun route POST: parsed fields, or ``body-mime`` for URLs ending in ``mime``.

    The signature is not checked here (see `verify_mailgun_signature`), so a route
    must verify before calling this.

    Raises:
        ValidationFailed: ``message-headers``/``content-id-map`` malformed,
            ``attachment-count`` not a count or a counted file missing.
    """
    verdict_names = (("spf", "x-mailgun-spf"), ("dkim", "x-mailgun-dkim-check-result"))
    body_mime = form.get("body-mime")
    if body_mime:
        raw = _require_some(_as_bytes(body_mime), "body-mime")
        headers = _raw_headers(raw)
        reconstructed = False
    else:
        decoded = _json_field(form, "message-headers", [])
        if not isinstance(decoded, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(s, str) for s in p)
            for p in decoded
        ):
            raise _invalid("message-headers", "must be a JSON list of [name, value] pairs")
        headers = [(n, v) for n, v in decoded]
        for name in ("From", "To", "Subject"):
            value = _clean(_text(form, name.lower()) or _text(form, name))
            if value and _header(headers, name) is None:
                headers.append((name, value))
        cid_map = _json_field(form, "content-id-map", {})
        if not isinstance(cid_map, dict) or not all(isinstance(v, str) for v in cid_map.values()):
            raise _invalid("content-id-map", "must be a JSON object of content-id → field")
        cids = {v: k for k, v in cid_map.items()}
        attachments = [
            _Attachment(
                filename=_clean(filename),
                content_type=_content_type(ctype),
                content_id=_clean(cids.get(key)),
                inline=key in cids,
                data=data,
            )
            for key, (filename, ctype, data) in _numbered(
                files, _MAILGUN_FILE, _count(form, "attachment-count"), "attachment-{}"
            )
        ]
        raw = _build(headers, _text(form, "body-plain"), _text(form, "body-html"), attachments)
        reconstructed = True

    verdicts = {
        key: value for key, name in verdict_names if (value := _header(headers, name)) is not None
    }
    recipients = _unique(_split_list(_text(form, "recipient"))) or _unique(
        _addresses(_header(headers, "To"), _header(headers, "Cc"))
    )
    sender = _text(form, "sender")
    if sender is None:
        sender = _first_address(_header(headers, "From"))
    return InboundDelivery(
        raw=raw,
        mail_from=sender.strip(),
        recipients=recipients,
        provider="mailgun",
        provider_event_id=_text(form, "token") or None,
        provider_verdicts=verdicts,
        reconstructed=reconstructed,
        auth=_mailgun_auth(headers, sender.strip()),
    )


class ReplayGuard(Protocol):
    """Remembers webhook tokens already accepted, so a captured request cannot be
    replayed within the freshness window. Production backs this with the database
    (a unique row per token, expired by the retention worker) so it holds across
    processes and restarts; `InMemoryReplayGuard` is the fake for tests."""

    def first_use(self, token: str, *, now: float, ttl: float) -> bool:
        """Record ``token``; True if it was not already recorded within ``ttl``."""
        ...


class InMemoryReplayGuard:
    """A single-process `ReplayGuard`: a dict of token → expiry, pruned on use."""

    def __init__(self) -> None:
        self._expiry: dict[str, float] = {}

    def first_use(self, token: str, *, now: float, ttl: float) -> bool:
        """See `ReplayGuard.first_use`."""
        self._expiry = {t: exp for t, exp in self._expiry.items() if exp > now}
        if token in self._expiry:
            return False
        self._expiry[token] = now + ttl
        return True


def verify_mailgun_signature(
    signing_key: str,
    timestamp: str,
    token: str,
    signature: str,
    *,
    now: float,
    max_age: float = 300,
    replay_guard: ReplayGuard | None = None,
) -> None:
    """Check a Mailgun signature: hex HMAC-SHA256(signing key, timestamp + token).

    The signature is checked first, so forged requests cannot fill the replay guard;
    then freshness (either direction: a timestamp from the future is as suspect as an
    old one); then the token, remembered for twice ``max_age`` so it outlives every
    timestamp that could still pass.

    Raises:
        Unauthorized: with ``extra["reason"]`` one of ``missing_signature``,
            ``bad_signature``, ``stale_timestamp``, ``replayed_token``.
    """
    if not (signing_key and timestamp and token and signature):
        raise Unauthorized("webhook signature missing", reason="missing_signature")
    expected = hmac.new(
        signing_key.encode(), (timestamp + token).encode(), hashlib.sha256
    ).hexdigest()
    if not hmac.compare_digest(expected, signature.strip().lower()):
        raise Unauthorized("webhook signature does not match", reason="bad_signature")
    current = now
    try:
        sent = float(timestamp)
    except ValueError:
        raise Unauthorized("webhook timestamp is not a number", reason="stale_timestamp") from None
    if abs(current - sent) > max_age:
        raise Unauthorized("webhook timestamp outside the allowed window", reason="stale_timestamp")
    if replay_guard is not None and not replay_guard.first_use(token, now=current, ttl=2 * max_age):
        raise Unauthorized("webhook token already used", reason="replayed_token")


# --------------------------------------------------------------------------- Postmark


def _pm_str(payload: Mapping[str, Any], key: str) -> str | None:
    value = payload.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _invalid(key, "must be a string")
    return value


def _pm_people(payload: Mapping[str, Any], key: str) -> list[tuple[str, str]]:
    value = payload.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(
        isinstance(p, dict) and isinstance(p.get("Email", ""), str) for p in value
    ):
        raise _invalid(key, "must be a list of {Email, Name} objects")
    return [(str(p.get("Name") or ""), str(p.get("Email") or "")) for p in value]


def _pm_header_value(people: list[tuple[str, str]], fallback: str | None) -> str | None:
    mailboxes = [formataddr(p) for p in people if p[1]]
    return ", ".join(mailboxes) if mailboxes else _clean(fallback)


def parse_postmark(payload: Mapping[str, Any]) -> InboundDelivery:
    """Postmark's inbound JSON; ``RawEmail`` is used verbatim when present.

    Postmark gives no SMTP envelope: recipients are ``OriginalRecipient`` (the address
    it accepted the mail for) followed by every ``ToFull``/``CcFull``/``BccFull``
    address, since mail forwarded to Postmark's own inbound address names the real
    recipient only in its headers (the route keeps those that are agents); the
    sender is ``Return-Path`` from ``Headers``, else ``FromFull.Email``.

    Raises:
        ValidationFailed: a field of the wrong JSON type, or attachment content that
            is not base64 (the field is named, e.g. ``Attachments[0].Content``).
    """
    if not isinstance(payload, Mapping):
        raise _invalid("body", "must be a JSON object")
    raw_headers = payload.get("Headers")
    if raw_headers is None:
        raw_headers = []
    if not isinstance(raw_headers, list) or not all(
        isinstance(h, dict) and isinstance(h.get("Name"), str) and isinstance(h.get("Value"), str)
        for h in raw_headers
    ):
        raise _invalid("Headers", "must be a list of {Name, Value} objects")
    provided = [(str(h["Name"]), str(h["Value"])) for h in raw_headers]
    from_full = payload.get("FromFull")
    if from_full is None:
        from_full = {}
    if not isinstance(from_full, dict):
        raise _invalid("FromFull", "must be an object")
    to, cc = _pm_people(payload, "ToFull"), _pm_people(payload, "CcFull")
    bcc = _pm_people(payload, "BccFull")

    raw_email = _pm_str(payload, "RawEmail")
    if raw_email:
        raw = _require_some(raw_email.encode("utf-8", "surrogateescape"), "RawEmail")
        reconstructed = False
    else:
        # Postmark lifts the address headers out of Headers into their own fields.
        lifted = {
            "From": _pm_header_value(
                [(str(from_full.get("Name") or ""), str(from_full.get("Email") or ""))],
                _pm_str(payload, "From"),
            ),
            "To": _pm_header_value(to, _pm_str(payload, "To")),
            "Cc": _pm_header_value(cc, _pm_str(payload, "Cc")),
            "Reply-To": _clean(_pm_str(payload, "ReplyTo")),
            "Subject": _clean(_pm_str(payload, "Subject")),
            "Date": _clean(_pm_str(payload, "Date")),
        }
        headers = [(n, v) for n, v in lifted.items() if v]
        headers += [(n, v) for n, v in provided if n.lower() not in {k.lower() for k in lifted}]
        raw = _build(
            headers,
            _pm_str(payload, "TextBody") or None,
            _pm_str(payload, "HtmlBody") or None,
            _pm_attachments(payload),
        )
        reconstructed = True

    verdicts = {
        key: value
        for key, name in (
            ("spf", "Received-SPF"),
            ("spam_status", "X-Spam-Status"),
            ("spam_score", "X-Spam-Score"),
            ("spam_tests", "X-Spam-Tests"),
        )
        if (value := _header(provided, name)) is not None
    }
    original = _pm_str(payload, "OriginalRecipient")
    recipients = _unique([original or "", *(a for _, a in (*to, *cc, *bcc))])
    if not recipients:
        recipients = _unique(_addresses(_pm_str(payload, "To"), _pm_str(payload, "Cc")))
    return_path = _header(provided, "Return-Path")
    mail_from = (
        return_path.strip().strip("<>").strip()
        if return_path is not None
        else str(from_full.get("Email") or "") or _first_address(_pm_str(payload, "From"))
    )
    return InboundDelivery(
        raw=raw,
        mail_from=mail_from,
        recipients=recipients,
        provider="postmark",
        provider_event_id=_pm_str(payload, "MessageID") or None,
        provider_verdicts=verdicts,
        reconstructed=reconstructed,
        auth=_postmark_auth(provided, mail_from, str(from_full.get("Email") or "") or None),
    )


def _pm_attachments(payload: Mapping[str, Any]) -> list[_Attachment]:
    items = payload.get("Attachments")
    if items is None:
        items = []
    if not isinstance(items, list):
        raise _invalid("Attachments", "must be a list")
    result: list[_Attachment] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("Content", ""), str):
            raise _invalid(f"Attachments[{i}]", "must be an object with base64 Content")
        try:
            data = base64.b64decode(item.get("Content") or "", validate=True)
        except (binascii.Error, ValueError):
            raise _invalid(f"Attachments[{i}].Content", "not base64") from None
        cid = _clean(str(item.get("ContentID") or ""))
        result.append(
            _Attachment(
                filename=_clean(str(item.get("Name") or "")),
                content_type=_content_type(str(item.get("ContentType") or "")),
                content_id=cid,
                inline=cid is not None,
                data=data,
            )
        )
    return result


# --------------------------------------------------------------------------- raw


def parse_raw(body: bytes, mail_from: str | None, recipients: Sequence[str]) -> InboundDelivery:
    """A raw ``message/rfc822`` POST; the envelope comes from the request headers.

    Without envelope recipients the message's To/Cc are used, and without a sender
    its From address (``""`` is kept: it is the null reverse-path of a bounce).

    Raises:
        ValidationFailed: an empty body.
    """
    raw = _require_some(body, "body")
    headers: list[tuple[str, str]] | None = None
    envelope_to = _unique(recipients)
    if not envelope_to or mail_from is None:
        headers = _raw_headers(raw)
    if not envelope_to and headers is not None:
        envelope_to = _unique(_addresses(_header(headers, "To"), _header(headers, "Cc")))
    sender = mail_from
    if sender is None:
        sender = _first_address(_header(headers or [], "From"))
    return InboundDelivery(
        raw=raw,
        mail_from=sender.strip(),
        recipients=envelope_to,
        provider="raw",
        provider_event_id=None,
        reconstructed=False,
    )


# --------------------------------------------------------------------------- auth


def check_basic_auth(header_value: str | None, expected_user: str, expected_password: str) -> None:
    """Check an ``Authorization: Basic`` header in constant time.

    Both halves are always compared (no early exit on the user) so timing does not
    reveal which one was wrong. An empty expected password never matches: a
    misconfigured endpoint stays closed.

    Raises:
        Unauthorized: ``extra["reason"]`` is ``missing_credentials`` or
            ``bad_credentials``.
    """
    if not header_value:
        raise Unauthorized("credentials required", reason="missing_credentials")
    scheme, _, encoded = header_value.strip().partition(" ")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        decoded = None
    if scheme.lower() != "basic" or decoded is None or ":" not in decoded:
        raise Unauthorized("malformed basic credentials", reason="bad_credentials")
    user, _, password = decoded.partition(":")
    user_ok = hmac.compare_digest(user.encode(), expected_user.encode())
    password_ok = hmac.compare_digest(password.encode(), expected_password.encode())
    if not (user_ok & password_ok) or not expected_password:
        raise Unauthorized("wrong credentials", reason="bad_credentials")


def check_bearer_token(header_value: str | None, expected: str) -> None:
    """Check an ``Authorization: Bearer`` secret (``/inbound/raw``) in constant time.

    Raises:
        Unauthorized: ``extra["reason"]`` is ``missing_credentials`` or
            ``bad_credentials``.
    """
    if not header_value:
        raise Unauthorized("credentials required", reason="missing_credentials")
    scheme, _, token = header_value.strip().partition(" ")
    ok = hmac.compare_digest(token.strip().encode(), expected.encode())
    if scheme.lower() != "bearer" or not ok or not expected:
        raise Unauthorized("wrong credentials", reason="bad_credentials")


def check_path_secret(given: str, expected: str) -> None:
    """Check a secret given as a URL path segment (``/inbound/sendgrid/<secret>``) in
    constant time; for providers whose only credential is the URL they are given.

    Raises:
        Unauthorized: ``extra["reason"]`` is ``bad_credentials``.
    """
    ok = hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode())
    if not ok or not expected:
        raise Unauthorized("wrong credentials", reason="bad_credentials")
