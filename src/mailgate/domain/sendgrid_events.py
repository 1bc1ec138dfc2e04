"""SendGrid's Event Webhook as values: the signature check and the events it posts.

Signed Event Webhook (twilio.com/docs/sendgrid, "Getting Started with the Event
Webhook Security Features"): SendGrid signs ``timestamp + raw body`` with ECDSA
P-256 / SHA-256 and sends the DER signature base64-encoded in
``X-Twilio-Email-Event-Webhook-Signature``, the timestamp (Unix seconds) in
``X-Twilio-Email-Event-Webhook-Timestamp``. The verification key is shown in the
SendGrid console as base64 DER (SubjectPublicKeyInfo); PEM is accepted too. The
signature covers the body's exact bytes, so it is checked before anything is decoded,
and a timestamp outside ``max_age`` of now is refused (a captured post cannot be
replayed later; replays inside the window are answered once, by ``sg_event_id``).

The body is a JSON array of events (twilio.com/docs/sendgrid, "Event Webhook
Reference"): ``event``, ``email``, ``timestamp``, ``sg_event_id``, ``sg_message_id``
(``<X-Message-Id>.<filter...>``; absent for asynchronous bounces), ``reason``,
``status``, ``type`` (``bounce`` or ``blocked`` for bounce events), and each of the
sender's ``custom_args`` as a top-level key. We send ``outbound_id`` as a custom arg, so
events find their outbound request even when ``sg_message_id`` is missing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal, TypeAlias

from cryptography.exceptions import InvalidSignature as _BadEcdsa
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mailgate.errors import BadRequest, InvalidSignature

__all__ = [
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "EventKind",
    "SendGridEvent",
    "load_public_key",
    "parse_events",
    "verify_signature",
]

SIGNATURE_HEADER: Final = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER: Final = "X-Twilio-Email-Event-Webhook-Timestamp"
MAX_EVENT_ID: Final = 200
"""``webhook_receipts.event_id`` holds this much."""

EventKind: TypeAlias = Literal[
    "delivered",
    "bounced",
    "blocked",
    "dropped",
    "complained",
    "unsubscribed",
    "deferred",
    "ignored",
]
"""What an event means for us. ``blocked`` is a bounce event of ``type: blocked``: the
receiving server refused *this message* (content, reputation), not the address, so it
fails the message without suppressing the address. ``ignored``: ``processed``,
``open``, ``click``, ``group_resubscribe`` and anything unknown."""

_KINDS: Final[Mapping[str, EventKind]] = {
    "delivered": "delivered",
    "bounce": "bounced",
    "dropped": "dropped",
    "spamreport": "complained",
    "spam_report": "complained",
    "unsubscribe": "unsubscribed",
    "group_unsubscribe": "unsubscribed",
    "deferred": "deferred",
}
_RECIPIENT_STATUS: Final[Mapping[EventKind, str]] = {
    "delivered": "delivered",
    "bounced": "bounced",
    "blocked": "failed",
    "dropped": "dropped",
    "complained": "complained",
    "unsubscribed": "unsubscribed",
    "deferred": "deferred",
}
_DROP_SUPPRESSIONS: Final = (
    # SendGrid's drop reasons (Event Webhook Reference, "dropped"), most specific
    # first. A drop for "Invalid SMTPAPI header" or "Spam Content" is about the
    # message; only reasons about the address suppress it.
    ("invalid smtpapi", None),
    ("bounced address", "dropped"),
    ("invalid", "dropped"),
    ("unsubscribed address", "unsubscribe"),
    ("spam reporting address", "complaint"),
)


def load_public_key(text: str) -> ec.EllipticCurvePublicKey:
    """The verification key as SendGrid shows it (base64 DER), or PEM.

    Raises:
        ValueError: not a P-256 public key in either form.
    """
    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.encode())
        else:
            key = serialization.load_der_public_key(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError, TypeError) as exc:
        raise ValueError(f"not a public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ValueError("the Event Webhook key must be an ECDSA P-256 public key")
    return key


def verify_signature(
    key: ec.EllipticCurvePublicKey,
    body: bytes,
    signature: str | None,
    timestamp: str | None,
    *,
    now: datetime,
    max_age_seconds: float,
) -> None:
    """Check a post's signature and its timestamp's age.

    Raises:
        InvalidSignature: ``reason`` is ``missing_signature``, ``missing_timestamp``,
            ``bad_timestamp`` (not Unix seconds), ``stale_timestamp`` (further than
            ``max_age_seconds`` from ``now``, either way) or ``bad_signature``.
    """
    if not signature:
        raise InvalidSignature(f"{SIGNATURE_HEADER} is missing", reason="missing_signature")
    if not timestamp:
        raise InvalidSignature(f"{TIMESTAMP_HEADER} is missing", reason="missing_timestamp")
    stamp = timestamp.strip()
    if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12):
        raise InvalidSignature(f"{TIMESTAMP_HEADER} is not Unix seconds", reason="bad_timestamp")
    age = now.timestamp() - int(stamp)
    if abs(age) > max_age_seconds:
        raise InvalidSignature(
            f"the signed timestamp is {age:.0f}s from now (limit {max_age_seconds:.0f}s)",
            reason="stale_timestamp",
        )
    try:
        der = base64.b64decode(signature.strip(), validate=True)
        key.verify(der, stamp.encode("ascii") + body, ec.ECDSA(hashes.SHA256()))
    except (binascii.Error, ValueError, _BadEcdsa):
        raise InvalidSignature(
            "the Event Webhook signature does not match the body", reason="bad_signature"
        ) from None


@dataclass(frozen=True, slots=True)
class SendGridEvent:
    """One event of a post, reduced to what feedback acts on."""

    kind: EventKind
    event: str
    """SendGrid's own event name."""
    email: str
    """The recipient, lower-cased."""
    event_id: str
    """``sg_event_id``; for an event without one, ``sha256:`` of its canonical JSON,
    so its retries still deduplicate."""
    sg_message_id: str | None
    outbound_id: str | None
    """Our ``outbound_id`` custom arg, when the send carried it."""
    occurred_at: datetime | None
    reason: str
    """``reason`` (bounces, drops), else ``response`` (deferrals, deliveries)."""
    status: str | None
    """The enhanced status code SendGrid reports for bounces, e.g. ``5.1.1``."""

    @property
    def provider_message_id(self) -> str | None:
        """The ``X-Message-Id`` of the send: ``sg_message_id`` up to its first dot."""
        if not self.sg_message_id:
            return None
        return self.sg_message_id.split(".", 1)[0] or None

    @property
    def recipient_status(self) -> str | None:
        """The ``outbound_recipients.status`` this event reports (None: ignored)."""
        return _RECIPIENT_STATUS.get(self.kind)

    @property
    def suppression(self) -> str | None:
        """The suppression reason this event warrants, if any: ``hard_bounce`` for a
        bounce, ``complaint`` for a spam report, ``unsubscribe``, and ``dropped`` (or
        the reason SendGrid already suppressed the address for) for a drop."""
        if self.kind == "bounced":
            return "hard_bounce"
        if self.kind == "complained":
            return "complaint"
        if self.kind == "unsubscribed":
            return "unsubscribe"
        if self.kind == "dropped":
            reason = self.reason.lower()
            for needle, suppression in _DROP_SUPPRESSIONS:
                if needle in reason:
                    return suppression
        return None


def parse_events(body: bytes) -> list[SendGridEvent]:
    """The events of a post, in order. Elements that are not events (no ``event`` or
    no ``email``) come back as ``ignored`` rather than failing the whole post, which
    SendGrid would retry for days.

    Raises:
        BadRequest: the body is not a JSON array (``errors`` names ``body``).
    """
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _bad_body(f"not JSON: {exc}") from None
    if not isinstance(data, list):
        raise _bad_body("must be a JSON array of events")
    return [_event(item) for item in data]


def _bad_body(message: str) -> BadRequest:
    return BadRequest(
        f"invalid Event Webhook body: {message}", errors=[{"field": "body", "message": message}]
    )


def _event(item: Any) -> SendGridEvent:
    if not isinstance(item, dict):
        item = {"value": item}
    name = _text(item.get("event")).lower()
    email = _text(item.get("email")).strip().lower()
    kind: EventKind = _KINDS.get(name, "ignored") if email else "ignored"
    if kind == "bounced" and _text(item.get("type")).lower() == "blocked":
        kind = "blocked"
    event_id = _text(item.get("sg_event_id"))[:MAX_EVENT_ID]
    if not event_id:
        canonical = json.dumps(item, sort_keys=True, separators=(",", ":"), default=str)
        event_id = "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()
    return SendGridEvent(
        kind=kind,
        event=name,
        email=email,
        event_id=event_id,
        sg_message_id=_text(item.get("sg_message_id")) or None,
        outbound_id=_custom_arg(item, "outbound_id"),
        occurred_at=_time(item.get("timestamp")),
        reason=(_text(item.get("reason")) or _text(item.get("response")))[:1000],
        status=_text(item.get("status")) or None,
    )


def _custom_arg(item: Mapping[str, Any], name: str) -> str | None:
    """A custom arg: top-level in v3 events; under ``unique_args``/``custom_args`` in
    some older or relayed payloads."""
    for holder in (item, item.get("custom_args"), item.get("unique_args")):
        if isinstance(holder, Mapping):
            value = _text(holder.get(name))
            if value:
                return value[:40]
    return None


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return ""


def _time(value: Any) -> datetime | None:
    try:
        seconds = float(value)
        return datetime.fromtimestamp(seconds, tz=UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return None
