"""The transport port: how a finished message leaves the gateway.

A transport receives the final bytes (built, policy-checked and DKIM-signed by the
delivery service) and hands them on once. It never retries by itself: the delivery
worker owns retries, backoff and the record of every attempt, so a transport only has
to say *how* an attempt ended. Success is a :class:`TransportReceipt`; failure is
:class:`~mailgate.errors.TemporaryDeliveryError` (a 4xx reply, a refused, dropped or
timed-out connection: try again later) or
:class:`~mailgate.errors.PermanentDeliveryError` (a 5xx reply for the message or for
every recipient: bounce), each with the remote ``reply_code``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """One message ready to leave, exactly as it will be sent."""

    outbound_id: str
    workspace_id: str
    agent_id: str | None
    mail_from: str
    """Envelope sender (``MAIL FROM``), where bounces go."""
    recipients: tuple[str, ...]
    """Envelope recipients (To, Cc and Bcc together; suppressed ones already removed)."""
    raw: bytes
    """The final message: CRLF line endings, already DKIM-signed; sent verbatim."""
    rfc_message_id: str
    """The ``Message-ID`` without angle brackets."""
    subject: str


@dataclass(frozen=True, slots=True)
class TransportReceipt:
    """How the remote side acknowledged a message it accepted."""

    transport: str
    """``capture``, ``smtp`` or ``sendgrid``."""
    code: int | None
    """The accepting reply: 250 for SMTP, 202 for SendGrid."""
    detail: str
    """The remote reply text (a relay's queue id, for instance)."""
    provider_message_id: str | None = None
    """The provider's id for the message (SendGrid's ``X-Message-Id``), to match its
    event webhooks later."""
    refused: Mapping[str, str] = field(default_factory=dict)
    """Recipients refused permanently while others were accepted: address -> reply
    (``"550 5.1.1 no such user"``). They bounce; the rest were delivered."""


class Transport(Protocol):
    """Sends one message per call; safe to call concurrently from one event loop."""

    name: str

    async def send(self, message: OutgoingMessage) -> TransportReceipt:
        """Hand ``message`` on once.

        Raises:
            TemporaryDeliveryError: a 4xx reply, or the connection failed, dropped or
                timed out; retrying later can help.
            PermanentDeliveryError: a 5xx reply for the message or for every recipient.
        """
        ...

    async def aclose(self) -> None:
        """Release connections; the transport is not used afterwards."""
        ...
