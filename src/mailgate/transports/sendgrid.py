"""The SendGrid transport: the v3 Mail Send API (``POST /v3/mail/send``).

SendGrid takes JSON, not MIME, and builds the message itself, so the final bytes are
parsed back (stdlib ``policy.default``) into its fields: ``personalizations`` (``to``
and ``cc`` from the headers, every other envelope recipient as ``bcc``; each address
once, as the API requires), ``from``, ``reply_to``, ``subject``, ``content``
(``text/plain`` first, then ``text/html``), ``attachments`` (base64, with
``content_id`` and ``inline`` for related parts), the threading and list headers the
API lets a sender set, and ``custom_args.outbound_id`` so Event Webhook events map back
to the outbound request.

SendGrid signs with its own DKIM key (the domain authenticated in its console): our
``DKIM-Signature`` is not forwarded (``dkim-signature`` is one of the headers the API
reserves, and the body it covered is rebuilt anyway).

Statuses: ``202`` accepted (its ``X-Message-Id`` kept as the provider id); ``429`` and
``5xx`` temporary; any other ``4xx`` permanent (a bad key, a payload SendGrid will never
take); a failed or timed-out request temporary.
"""

from __future__ import annotations

import base64
import mimetypes
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default as default_policy
from email.utils import getaddresses
from typing import Any

import httpx

from mailgate.config import Settings
from mailgate.errors import PermanentDeliveryError, TemporaryDeliveryError
from mailgate.transports.base import OutgoingMessage, TransportReceipt

HTTP_TIMEOUT_SECONDS = 30.0

# Headers worth carrying that the API does not model as fields. The API refuses to
# override x-sg-id, x-sg-eid, received, dkim-signature, Content-Type,
# Content-Transfer-Encoding, To, From, Subject, Reply-To, CC and BCC.
FORWARDED_HEADERS = (
    "Message-ID",
    "In-Reply-To",
    "References",
    "Auto-Submitted",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "List-Id",
    "Precedence",
)


class SendGridTransport:
    """Sends through SendGrid's v3 API; see the module docstring."""

    name = "sendgrid"

    def __init__(self, settings: Settings, http: httpx.AsyncClient | None = None) -> None:
        key = settings.sendgrid_api_key
        self.api_key = key.get_secret_value() if key is not None else ""
        self.url = settings.sendgrid_api_url.rstrip("/") + "/v3/mail/send"
        self._own_http = http is None
        self.http = http or httpx.AsyncClient(timeout=HTTP_TIMEOUT_SECONDS)

    async def send(self, message: OutgoingMessage) -> TransportReceipt:
        """POST ``message`` as Mail Send JSON.

        Raises:
            TemporaryDeliveryError: 429, 5xx, or the request failed or timed out.
            PermanentDeliveryError: any other 4xx (or no API key configured).
        """
        if not self.api_key:
            raise PermanentDeliveryError("sendgrid_api_key is not set", stage="request")
        payload = mail_send_payload(message)
        try:
            response = await self.http.post(
                self.url, json=payload, headers={"Authorization": f"Bearer {self.api_key}"}
            )
        except httpx.HTTPError as exc:
            raise TemporaryDeliveryError(
                f"SendGrid request failed: {exc or type(exc).__name__}", stage="request"
            ) from exc
        status = response.status_code
        if status in (200, 202):
            return TransportReceipt(
                transport=self.name,
                code=status,
                detail=response.reason_phrase or "Accepted",
                provider_message_id=response.headers.get("X-Message-Id"),
            )
        detail = f"SendGrid answered {status}: {_error_text(response)}"
        if status == 429 or status >= 500:
            raise TemporaryDeliveryError(detail, reply_code=status, stage="request")
        raise PermanentDeliveryError(detail, reply_code=status, stage="request")

    async def aclose(self) -> None:
        if self._own_http:
            await self.http.aclose()


def mail_send_payload(message: OutgoingMessage) -> dict[str, Any]:
    """The Mail Send JSON for ``message`` (the bytes parsed back into fields)."""
    msg = BytesParser(policy=default_policy).parsebytes(message.raw)
    assert isinstance(msg, EmailMessage)
    envelope = {r.lower(): r for r in message.recipients}
    seen: set[str] = set()

    def take(header: str) -> list[dict[str, str]]:
        found = []
        for entry in _addresses(msg, header):
            key = entry["email"].lower()
            if key in envelope and key not in seen:
                seen.add(key)
                found.append(entry)
        return found

    to, cc = take("To"), take("Cc")
    bcc = []
    for key, address in envelope.items():
        if key not in seen:
            seen.add(key)
            bcc.append({"email": address})
    personalizations: list[dict[str, Any]]
    if to:
        personalizations = [_personalization(to, cc, bcc)]
    elif cc:  # every To recipient was dropped (suppressed): the API needs a "to"
        personalizations = [_personalization(cc, [], bcc)]
    else:  # blind copies only: one envelope each, so none sees another
        personalizations = [_personalization([entry], [], []) for entry in bcc]

    senders = _addresses(msg, "From")
    sender = senders[0] if senders else {"email": message.mail_from}
    payload: dict[str, Any] = {
        "personalizations": personalizations,
        "from": sender,
        "subject": message.subject or str(msg.get("Subject", "")) or "(no subject)",
        "content": _content(msg),
        "custom_args": {"outbound_id": message.outbound_id},
    }
    reply_to = _addresses(msg, "Reply-To")
    if len(reply_to) == 1:
        payload["reply_to"] = reply_to[0]
    elif reply_to:
        payload["reply_to_list"] = reply_to
    attachments = _attachments(msg)
    if attachments:
        payload["attachments"] = attachments
    headers = {}
    for name in FORWARDED_HEADERS:
        value = msg.get(name)
        if value is not None:
            headers[name] = " ".join(str(value).split())
    if headers:
        payload["headers"] = headers
    return payload


def _personalization(
    to: list[dict[str, str]], cc: list[dict[str, str]], bcc: list[dict[str, str]]
) -> dict[str, Any]:
    block: dict[str, Any] = {"to": to}
    if cc:
        block["cc"] = cc
    if bcc:
        block["bcc"] = bcc
    return block


def _addresses(msg: EmailMessage, header: str) -> list[dict[str, str]]:
    """``{"email", "name"?}`` for each address in every ``header`` field."""
    found: list[dict[str, str]] = []
    for value in msg.get_all(header, []):
        addresses = getattr(value, "addresses", None)
        if addresses is not None:
            pairs = [(a.display_name, a.addr_spec) for a in addresses if isinstance(a, Address)]
        else:
            pairs = getaddresses([str(value)])
        for name, email in pairs:
            if email:
                found.append({"email": email, "name": name} if name else {"email": email})
    return found


def _content(msg: EmailMessage) -> list[dict[str, str]]:
    """``text/plain`` first, then ``text/html`` (the order the API requires)."""
    content: list[dict[str, str]] = []
    for subtype in ("plain", "html"):
        part = msg.get_body(preferencelist=(subtype,))
        if part is None:
            continue
        value = part.get_content()
        if isinstance(value, str) and value:  # JSON text: SendGrid writes the CRLFs
            content.append({"type": f"text/{subtype}", "value": value.replace("\r\n", "\n")})
    return content or [{"type": "text/plain", "value": " "}]


def _attachments(msg: EmailMessage) -> list[dict[str, str]]:
    bodies = {id(msg.get_body(preferencelist=(s,))) for s in ("plain", "html")}
    found: list[dict[str, str]] = []
    for part in msg.walk():
        if part.is_multipart() or id(part) in bodies or part is msg:
            continue
        assert isinstance(part, EmailMessage)
        data = part.get_payload(decode=True)
        if not isinstance(data, bytes):
            continue
        content_type = part.get_content_type()
        content_id = (part.get("Content-ID") or "").strip().strip("<>")
        filename = part.get_filename() or (
            f"attachment-{len(found) + 1}{mimetypes.guess_extension(content_type) or '.bin'}"
        )
        inline = part.get_content_disposition() == "inline" or (
            bool(content_id) and part.get_content_disposition() is None
        )
        entry = {
            "content": base64.b64encode(data).decode("ascii"),
            "type": content_type,
            "filename": filename,
            "disposition": "inline" if inline else "attachment",
        }
        if content_id:
            entry["content_id"] = content_id
        found.append(entry)
    return found


def _error_text(response: httpx.Response) -> str:
    """SendGrid's ``{"errors": [{"message", "field"}]}`` as one line."""
    try:
        errors = response.json().get("errors") or []
        parts = [
            f"{e.get('message')} ({e['field']})" if e.get("field") else str(e.get("message"))
            for e in errors
            if isinstance(e, dict)
        ]
    except (ValueError, AttributeError):
        parts = []
    return "; ".join(parts) or response.text[:200] or response.reason_phrase
