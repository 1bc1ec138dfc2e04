"""Provider webhooks: an HTTP POST in, a durably stored message out.

Each ``receive_*`` function is one provider's whole edge, in the order that spends
the least on a request that will be refused:

1. the endpoint is enabled (its secret is set), else ``404 inbound_disabled``;
2. credentials carried in headers or the path (SendGrid, Postmark, raw) are checked
   before a byte of the body is read; Mailgun signs fields *inside* the form, so its
   body is read and decoded first and the signature checked before the message is
   built;
3. the body is read against ``effective_inbound_max_body``: a ``Content-Length`` over
   it is refused at once, and a body of unknown length is counted as it streams and
   refused the moment it passes the limit (``413 payload_too_large``), so a huge post
   is never held whole;
4. the provider's payload becomes raw RFC 5322 bytes
   (:mod:`mailgate.domain.providers`), off the event loop when large; a malformed
   form or JSON is ``400`` naming the field; a built message over
   ``max_message_size`` is ``413 message_too_large``;
5. the recipients are narrowed to agent addresses (none → `UnknownRecipient`, whose
   status each route picks so that provider stops retrying);
6. :meth:`IngestService.ingest_async` stores it and returns only after the commit, so
   the ``200`` a route answers means durable. Provider retries are answered from the
   ingest's receipts (Mailgun ``token``, strict: the same token with another body is
   a replay; Postmark ``MessageID``) or its Message-ID + raw-hash dedup (SendGrid and
   raw have no event id).

The provider's SPF/DKIM verdicts travel with the message as
:class:`~mailgate.services.ingest.SenderAuth` (their claims, recorded with the
verbatim values, and no ``Authentication-Results`` header of ours).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import TypeVar

import anyio.to_thread
from pydantic import SecretStr
from starlette.requests import Request

from mailgate.domain import providers
from mailgate.domain.providers import InboundDelivery
from mailgate.errors import (
    BadRequest,
    InboundDisabled,
    InvalidSignature,
    PayloadTooLarge,
    RequestTooLarge,
    Unauthorized,
    UnknownRecipient,
    ValidationFailed,
)
from mailgate.runtime import Runtime
from mailgate.services.ingest import Envelope, Receipt, SenderAuth, Stored
from mailgate.services.tenancy import Recipient, TenancyService

__all__ = [
    "InboundDisabled",
    "RequestTooLarge",
    "read_body",
    "receive_mailgun",
    "receive_postmark",
    "receive_raw",
    "receive_sendgrid",
]

T = TypeVar("T")

LOOP_DECODE_MAX = 32 * 1024
"""Bodies up to this size are decoded on the event loop (cheaper than a thread hop)."""
MAX_RECIPIENTS = 100
"""Candidate addresses looked up per delivery; more is a mail bomb, not a message."""
MAX_ENVELOPE_FROM = 998
"""Longest envelope sender stored (the ``messages.mail_from`` column holds 1000)."""
MAX_EVENT_ID = 200
"""Longest provider event id kept as a receipt (``webhook_receipts.event_id``)."""
RAW_CONTENT_TYPES = frozenset({"message/rfc822", "application/octet-stream"})


# --------------------------------------------------------------------------- body


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused as soon as it is known to exceed ``limit`` bytes.

    A declared ``Content-Length`` over the limit is refused before anything is read;
    otherwise (chunked, or a client that sends more than it declared) bytes are
    counted as they arrive and reading stops at the first chunk past the limit.

    Raises:
        RequestTooLarge: the body is, or is declared to be, over ``limit``.
        BadRequest: ``Content-Length`` is not a number.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.strip().isascii() and declared.strip().isdigit()):
            raise _field_error("Content-Length", "must be a number of bytes")
        if int(declared) > limit:
            raise _too_large(limit)
    received = bytearray()
    async for chunk in request.stream():
        if len(received) + len(chunk) > limit:
            raise _too_large(limit)
        received += chunk
    return bytes(received)


def _too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(f"the request body is over {limit} bytes", limit=limit)


def _field_error(field: str, message: str) -> BadRequest:
    return BadRequest(f"invalid {field}: {message}", errors=[{"field": field, "message": message}])


async def _off_loop(work: Callable[[], T], size: int) -> T:
    """Run a decode on the loop when small, in a thread when not. A payload the domain
    finds malformed becomes ``400`` with the same ``errors`` naming the field: for a
    webhook the whole post is unusable, not one field of an API call (``422``)."""
    try:
        if size <= LOOP_DECODE_MAX:
            return work()
        return await anyio.to_thread.run_sync(work)
    except ValidationFailed as exc:
        raise BadRequest(exc.detail, **exc.extra) from None


# --------------------------------------------------------------------------- auth


def _enabled(secret: SecretStr | None, endpoint: str) -> str:
    value = secret.get_secret_value() if secret is not None else ""
    if not value:
        raise InboundDisabled(
            f"POST /inbound/{endpoint} is disabled: its secret is not configured",
            endpoint=endpoint,
        )
    return value


def _authenticate(check: Callable[[], None]) -> None:
    """Run a credential check; its refusal is the webhook ``invalid_signature`` (401)
    with the domain's ``reason`` kept."""
    try:
        check()
    except Unauthorized as exc:
        raise InvalidSignature(exc.detail, **exc.extra) from None


# --------------------------------------------------------------------------- providers


async def receive_sendgrid(
    runtime: Runtime, request: Request, path_secret: str | None = None
) -> list[Stored]:
    """SendGrid Inbound Parse (parsed or raw mode); the secret is the last path
    segment, or the basic-auth password with user ``inbound_sendgrid_user``.

    Raises:
        InboundDisabled, InvalidSignature, RequestTooLarge, BadRequest,
        PayloadTooLarge, UnknownRecipient: see the module docstring.
    """
    settings = runtime.settings
    secret = _enabled(settings.inbound_sendgrid_secret, "sendgrid")
    if path_secret is not None:
        _authenticate(lambda: providers.check_path_secret(path_secret, secret))
    else:
        header = request.headers.get("authorization")
        user = settings.inbound_sendgrid_user
        _authenticate(lambda: providers.check_basic_auth(header, user, secret))
    body = await read_body(request, settings.effective_inbound_max_body)
    content_type = request.headers.get("content-type")

    def parse() -> InboundDelivery:
        form = providers.decode_form(body, content_type)
        return providers.parse_sendgrid(form.fields, form.files)

    delivery = await _off_loop(parse, len(body))
    return await _ingest(runtime, request, delivery, None, sender_field="envelope")


async def receive_mailgun(runtime: Runtime, request: Request) -> list[Stored]:
    """A Mailgun route's ``forward()`` (parsed, or ``body-mime`` for URLs ending in
    ``mime``), its ``timestamp``/``token``/``signature`` verified with the signing key
    and ``inbound_mailgun_max_age_seconds``; the token becomes a strict receipt.

    Raises:
        InboundDisabled, InvalidSignature, RequestTooLarge, BadRequest,
        PayloadTooLarge, UnknownRecipient: see the module docstring.
    """
    settings = runtime.settings
    key = _enabled(settings.inbound_mailgun_signing_key, "mailgun")
    body = await read_body(request, settings.effective_inbound_max_body)
    content_type = request.headers.get("content-type")
    form = await _off_loop(lambda: providers.decode_form(body, content_type), len(body))

    def field(name: str) -> str:
        return form.fields.get(name, b"").decode("utf-8", "replace")

    timestamp, token, signature = field("timestamp"), field("token"), field("signature")
    now = runtime.clock.now().timestamp()
    max_age = settings.inbound_mailgun_max_age_seconds
    _authenticate(
        lambda: providers.verify_mailgun_signature(
            key, timestamp, token, signature, now=now, max_age=max_age
        )
    )
    delivery = await _off_loop(lambda: providers.parse_mailgun(form.fields, form.files), len(body))
    receipt = _receipt(delivery, "token", strict=True)
    return await _ingest(runtime, request, delivery, receipt, sender_field="sender")


async def receive_postmark(runtime: Runtime, request: Request) -> list[Stored]:
    """Postmark's inbound JSON, basic auth (``inbound_postmark_user`` /
    ``inbound_postmark_password``); ``MessageID`` becomes a receipt.

    Raises:
        InboundDisabled, InvalidSignature, RequestTooLarge, BadRequest,
        PayloadTooLarge, UnknownRecipient: see the module docstring.
    """
    settings = runtime.settings
    password = _enabled(settings.inbound_postmark_password, "postmark")
    header = request.headers.get("authorization")
    user = settings.inbound_postmark_user
    _authenticate(lambda: providers.check_basic_auth(header, user, password))
    body = await read_body(request, settings.effective_inbound_max_body)

    def parse() -> InboundDelivery:
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise _field_error("body", f"not JSON ({type(exc).__name__})") from None
        return providers.parse_postmark(payload)

    delivery = await _off_loop(parse, len(body))
    receipt = _receipt(delivery, "MessageID", strict=False)
    return await _ingest(runtime, request, delivery, receipt, sender_field="Return-Path")


async def receive_raw(runtime: Runtime, request: Request) -> list[Stored]:
    """A raw ``message/rfc822`` body (``application/octet-stream`` accepted), bearer
    ``inbound_raw_token``. The envelope comes from ``X-Envelope-From`` (empty or
    ``<>``: the null sender) and ``X-Envelope-To`` (comma-separated, repeatable);
    without them, the message's From and To/Cc.

    Raises:
        InboundDisabled, InvalidSignature, RequestTooLarge, BadRequest,
        PayloadTooLarge, UnknownRecipient: see the module docstring.
    """
    settings = runtime.settings
    token = _enabled(settings.inbound_raw_token, "raw")
    header = request.headers.get("authorization")
    _authenticate(lambda: providers.check_bearer_token(header, token))
    content_type = request.headers.get("content-type")
    if content_type is not None:
        media = content_type.split(";", 1)[0].strip().lower()
        if media and media not in RAW_CONTENT_TYPES:
            raise _field_error("Content-Type", "must be message/rfc822 or application/octet-stream")
    mail_from = request.headers.get("x-envelope-from")
    if mail_from is not None:
        mail_from = _header_text(mail_from).strip().removeprefix("<").removesuffix(">").strip()
    recipients = [
        address
        for value in request.headers.getlist("x-envelope-to")
        for address in _header_text(value).split(",")
        if address.strip()
    ]
    body = await read_body(request, settings.effective_inbound_max_body)
    delivery = await _off_loop(lambda: providers.parse_raw(body, mail_from, recipients), len(body))
    return await _ingest(runtime, request, delivery, None, sender_field="X-Envelope-From")


def _header_text(value: str) -> str:
    """An HTTP header as text: ASGI hands over Latin-1; an SMTPUTF8 address is UTF-8."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value


# --------------------------------------------------------------------------- ingest


def _receipt(delivery: InboundDelivery, field: str, *, strict: bool) -> Receipt | None:
    event_id = delivery.provider_event_id
    if event_id is None:
        return None
    if len(event_id) > MAX_EVENT_ID:
        raise _field_error(field, f"longer than {MAX_EVENT_ID} characters")
    return Receipt(delivery.provider, event_id, strict=strict)


def _resolve(tenancy: TenancyService, addresses: Sequence[str]) -> list[Recipient]:
    return [r for a in addresses if (r := tenancy.resolve_recipient(a)) is not None]


async def _ingest(
    runtime: Runtime,
    request: Request,
    delivery: InboundDelivery,
    receipt: Receipt | None,
    *,
    sender_field: str,
) -> list[Stored]:
    """Size check, recipients, sender auth record, then the durable ingest.

    Raises:
        PayloadTooLarge: the built message is over ``max_message_size``.
        BadRequest: the envelope sender is longer than a stored one may be.
        UnknownRecipient: no candidate address belongs to an agent.
        InvalidSignature: a strict receipt's token came back with another body.
    """
    limit = runtime.settings.max_message_size
    if len(delivery.raw) > limit:
        raise PayloadTooLarge(
            f"the message is {len(delivery.raw)} bytes; the limit is {limit}", limit=limit
        )
    if len(delivery.mail_from) > MAX_ENVELOPE_FROM:
        raise _field_error(sender_field, f"envelope sender longer than {MAX_ENVELOPE_FROM}")
    candidates = delivery.recipients[:MAX_RECIPIENTS]
    # Lookups may hit the database: a thread, unless every answer is cached.
    cached = [runtime.tenancy.cached_recipient(a) for a in candidates]
    if candidates and all(r is not None for r in cached):
        found = [r for r in cached if r is not None]
    else:
        found = await anyio.to_thread.run_sync(_resolve, runtime.tenancy, candidates)
    if not found:
        raise UnknownRecipient(
            "no recipient of this delivery is an agent address",
            recipients=list(candidates),
        )
    facts = delivery.auth
    envelope = Envelope(
        mail_from=delivery.mail_from,
        client_address=request.client.host if request.client else None,
        source=f"webhook:{delivery.provider}",
        auth=SenderAuth(
            facts=facts,
            record={
                **facts.as_dict(),
                "source": delivery.provider,
                "provider": dict(delivery.provider_verdicts),
            },
        ),
        receipt=receipt,
    )
    return await runtime.ingest.ingest_async(delivery.raw, envelope, found)
