"""The mailgate Python SDK: typed sync and async clients for the native ``/v1`` API.

This package imports nothing else from ``mailgate`` (only httpx, anyio and pydantic),
so it can ship as a distribution of its own::

    from mailgate.client import Mailgate, idempotency_key

    with Mailgate("http://127.0.0.1:8025", "mg_...") as mg:
        for event in mg.events.pull(wait=10):
            message_id = event.payload["message_id"]
            mg.reply(
                message_id,
                text="Thanks, we are on it.",
                idempotency_key=idempotency_key("reply", event.event_id, message_id),
            )
            mg.events.ack(event)

What is exported here is the public surface; the underscore modules are not.
"""

from mailgate.client._async import AsyncMailgate
from mailgate.client._calls import DEFAULT_CONSUMER, idempotency_key
from mailgate.client._consumer import AsyncConsumer, AsyncStop, Consumer, ConsumerReport
from mailgate.client._errors import (
    AuthenticationError,
    BadRequestError,
    ConflictError,
    InternalServerError,
    MailgateAPIError,
    MailgateClientError,
    MailgateConnectionError,
    MailgateTimeoutError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
    ValidationError,
)
from mailgate.client._models import (
    AckResult,
    Address,
    Attachment,
    AttachmentText,
    Decision,
    DecisionStep,
    Envelope,
    Event,
    ExtendResult,
    FolderChange,
    Message,
    MessageDetail,
    NackResult,
    Outbound,
    OutboundResult,
    OutgoingAttachment,
    Page,
    Thread,
    ThreadDetail,
    Transition,
)
from mailgate.client._retry import RetryPolicy
from mailgate.client._sync import Mailgate
from mailgate.client._transport import __version__

__all__ = [
    "DEFAULT_CONSUMER",
    "AckResult",
    "Address",
    "AsyncConsumer",
    "AsyncMailgate",
    "AsyncStop",
    "Attachment",
    "AttachmentText",
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "Consumer",
    "ConsumerReport",
    "Decision",
    "DecisionStep",
    "Envelope",
    "Event",
    "ExtendResult",
    "FolderChange",
    "InternalServerError",
    "Mailgate",
    "MailgateAPIError",
    "MailgateClientError",
    "MailgateConnectionError",
    "MailgateTimeoutError",
    "Message",
    "MessageDetail",
    "NackResult",
    "NotFoundError",
    "Outbound",
    "OutboundResult",
    "OutgoingAttachment",
    "Page",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "RetryPolicy",
    "ServiceUnavailableError",
    "Thread",
    "ThreadDetail",
    "Transition",
    "ValidationError",
    "__version__",
    "idempotency_key",
]
