"""Standard Webhooks signatures (https://www.standardwebhooks.com), as Svix makes them.

AgentMail signs its webhooks with Svix, and receivers written for it verify with the
``svix`` package (or any Standard Webhooks library). We sign the same way, so such a
receiver works unchanged:

* the secret reads ``whsec_<base64 key>``; the key is the decoded bytes;
* the signed content is ``"{id}.{timestamp}.{body}"`` (``id`` is the event id, so a
  receiver dedupes retries by the ``webhook-id`` header; ``timestamp`` is Unix seconds);
* the signature is ``v1,<base64 HMAC-SHA256(key, content)>``; several may be sent,
  space separated (key rotation), and one match is enough;
* the three values travel as ``webhook-id``/``webhook-timestamp``/``webhook-signature``
  and again under Svix's ``svix-*`` names, because older Svix verifiers read only those.

Pure: no clock of its own (callers pass ``now``), no I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Mapping

__all__ = [
    "SECRET_PREFIX",
    "TOLERANCE_SECONDS",
    "WebhookVerificationError",
    "new_secret",
    "sign",
    "signature_headers",
    "verify",
]

SECRET_PREFIX = "whsec_"
TOLERANCE_SECONDS = 5 * 60
"""How far a timestamp may be from now, either way: the spec's (and Svix's) default
window, which bounds how long a captured delivery can be replayed."""

_KEY_BYTES = 24  # what Svix mints: 192-bit keys


class WebhookVerificationError(ValueError):
    """A delivery that is not signed by the holder of the secret (or is too old)."""


def new_secret() -> str:
    """A fresh signing secret in the ``whsec_`` format."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(_KEY_BYTES)).decode()


def _key(secret: str) -> bytes:
    """The HMAC key a secret carries.

    Raises:
        ValueError: not ``whsec_`` followed by base64.
    """
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError("a webhook secret starts with whsec_")
    try:
        return base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except binascii.Error:
        raise ValueError("a webhook secret is whsec_ followed by base64") from None


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``v1,<base64>`` signature of one delivery.

    Raises:
        ValueError: the secret is malformed.
    """
    content = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key(secret), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_headers(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """Every header a receiver needs, under both the Standard Webhooks and Svix names.

    Raises:
        ValueError: the secret is malformed.
    """
    signature = sign(secret, msg_id, timestamp, body)
    values = {"id": msg_id, "timestamp": str(timestamp), "signature": signature}
    headers: dict[str, str] = {}
    for prefix in ("webhook-", "svix-"):
        headers.update({prefix + name: value for name, value in values.items()})
    return headers


def verify(
    secret: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    now: float,
    tolerance: float = TOLERANCE_SECONDS,
) -> str:
    """Check a delivery; returns its id (the event id, to dedupe on).

    ``headers`` may use either naming and any case. ``now`` is Unix seconds.

    Raises:
        WebhookVerificationError: headers missing, timestamp outside ``tolerance``,
            or no signature that matches.
        ValueError: the secret is malformed.
    """
    lowered = {k.lower(): v for k, v in headers.items()}

    def header(name: str) -> str:
        value = lowered.get("webhook-" + name) or lowered.get("svix-" + name)
        if not value:
            raise WebhookVerificationError(f"missing webhook-{name} header")
        return value

    msg_id, raw_timestamp, signatures = header("id"), header("timestamp"), header("signature")
    try:
        timestamp = int(raw_timestamp)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not an integer") from None
    if abs(now - timestamp) > tolerance:
        raise WebhookVerificationError("webhook-timestamp is outside the tolerance")
    expected = sign(secret, msg_id, timestamp, body).encode()
    for candidate in signatures.split():
        if candidate.startswith("v1,") and hmac.compare_digest(candidate.encode(), expected):
            return msg_id
    raise WebhookVerificationError("no matching signature")
