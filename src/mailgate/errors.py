"""One exception tree for the whole gateway.

Every error a caller may need to tell apart carries a stable ``code`` (what the HTTP
problem documents and the SMTP replies are keyed on), the HTTP ``status`` an edge
should answer with, and whether retrying the same request can help (``retryable``).
Callers branch on the class or ``code``, never on message text::

    MailgateError
    ├── BadRequest                  400  bad_request
    │   ├── IdempotencyKeyMissing   400  idempotency_key_required
    │   ├── IdempotencyKeyReused    422  idempotency_key_reused  (same key, other payload)
    │   └── ValidationFailed        422  validation_failed
    │       └── HeaderInjection     422  header_injection        (CR/LF in a header field)
    ├── Unauthorized                401  invalid_api_key
    │   └── InvalidSignature        401  invalid_signature       (webhook auth)
    ├── Forbidden                   403  missing_scope
    ├── NotFound                    404  not_found
    │   ├── UnknownRecipient        404  unknown_recipient       (webhooks pick a status)
    │   └── InboundDisabled         404  inbound_disabled        (webhook secret unset)
    ├── Conflict                    409  conflict
    │   ├── InvalidTransition       409  invalid_folder_transition
    │   ├── IdempotencyInFlight     409  idempotency_in_flight   (retryable)
    │   └── AlreadyDecided          409  already_decided         (approval lost the race)
    ├── PayloadTooLarge             413  message_too_large
    │   └── RequestTooLarge         413  payload_too_large       (request body, unread)
    ├── ConfigError                 500  invalid_config          (start-up only)
    ├── DeliveryError               502  delivery_failed         (transports; recorded)
    │   ├── TemporaryDeliveryError  502  delivery_deferred       (retryable: 4xx, network)
    │   └── PermanentDeliveryError  502  delivery_rejected       (5xx: bounce)
    ├── DatabaseNotMigrated         503  database_not_migrated   (start-up only)
    └── ServiceUnavailable          503  unavailable             (retryable)
"""

from __future__ import annotations

from typing import Any, ClassVar


class MailgateError(Exception):
    """Base of every error the gateway raises on purpose."""

    code: ClassVar[str] = "internal_error"
    status: ClassVar[int] = 500
    retryable: ClassVar[bool] = False
    title: ClassVar[str] = "Internal error"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class BadRequest(MailgateError):
    code = "bad_request"
    status = 400
    title = "Bad request"


class ValidationFailed(BadRequest):
    """A request field is malformed; ``extra['errors']`` names each field."""

    code = "validation_failed"
    status = 422
    title = "Validation failed"


class IdempotencyKeyMissing(BadRequest):
    """Send, reply and forward need an ``Idempotency-Key`` header: without one a
    client's retry after a timeout could send the mail twice."""

    code = "idempotency_key_required"


class IdempotencyKeyReused(BadRequest):
    """The key was first used with a different request body (or endpoint)."""

    code = "idempotency_key_reused"
    status = 422
    title = "Idempotency key reused"


class HeaderInjection(ValidationFailed):
    """A value that ends up in a header field holds CR, LF or another control
    character; ``extra['errors']`` names the field."""

    code = "header_injection"
    title = "Header injection refused"


class Unauthorized(MailgateError):
    """No key, an unknown key, or a revoked key."""

    code = "invalid_api_key"
    status = 401
    title = "Unauthorized"


class InvalidSignature(Unauthorized):
    """A provider webhook's credentials, signature, timestamp or token do not hold;
    ``extra['reason']`` says which (``bad_signature``, ``replayed_token``, ...)."""

    code = "invalid_signature"


class Forbidden(MailgateError):
    """The key is valid but lacks the scope (or role) the operation needs."""

    code = "missing_scope"
    status = 403
    title = "Forbidden"


class NotFound(MailgateError):
    """The object does not exist *or is not visible to the caller* (no existence leak)."""

    code = "not_found"
    status = 404
    title = "Not found"


class UnknownRecipient(NotFound):
    """None of a delivery's recipients is an agent address. Webhook edges answer with
    the status that makes their provider stop retrying (Mailgun 406, Postmark 403)."""

    code = "unknown_recipient"
    title = "Unknown recipient"


class InboundDisabled(NotFound):
    """The webhook endpoint's secret is not configured, so the endpoint is off."""

    code = "inbound_disabled"
    title = "Inbound endpoint disabled"


class Conflict(MailgateError):
    code = "conflict"
    status = 409
    title = "Conflict"


class InvalidTransition(Conflict):
    """The message is not in a folder the operation applies to (e.g. restoring mail
    that is not in the trash, or a second release that lost the race)."""

    code = "invalid_folder_transition"
    title = "Invalid folder transition"


class IdempotencyInFlight(Conflict):
    """The first request with this key is still running; retry later for its result."""

    code = "idempotency_in_flight"
    retryable = True
    title = "Request with this idempotency key in progress"


class AlreadyDecided(Conflict):
    """The held request was already approved, rejected or expired (possibly by
    another owner a moment ago); ``extra['state']`` says what it is now."""

    code = "already_decided"
    title = "Already decided"


class PayloadTooLarge(MailgateError):
    code = "message_too_large"
    status = 413
    title = "Message too large"


class RequestTooLarge(PayloadTooLarge):
    """A request body passed its limit and was refused before being read whole. A
    message built from an accepted body but over ``max_message_size`` is the parent's
    ``message_too_large``."""

    code = "payload_too_large"
    title = "Payload too large"


class ConfigError(MailgateError):
    code = "invalid_config"
    title = "Invalid configuration"


class DeliveryError(MailgateError):
    """A transport could not hand a message on. Raised by transports, caught and
    recorded by the delivery worker; ``code``/``detail`` hold the remote reply."""

    code = "delivery_failed"
    status = 502
    title = "Delivery failed"

    def __init__(self, detail: str, *, reply_code: int | None = None, **extra: Any) -> None:
        super().__init__(detail, **extra)
        self.reply_code = reply_code


class TemporaryDeliveryError(DeliveryError):
    """A 4xx reply, a dropped connection or a timeout: try again later."""

    code = "delivery_deferred"
    retryable = True


class PermanentDeliveryError(DeliveryError):
    """A 5xx reply: the message bounces and is not retried."""

    code = "delivery_rejected"


class DatabaseNotMigrated(MailgateError):
    code = "database_not_migrated"
    status = 503
    title = "Database not migrated"


class ServiceUnavailable(MailgateError):
    code = "unavailable"
    status = 503
    retryable = True
    title = "Service unavailable"


class NotSupported(MailgateError):
    """A known operation of a compatible API (AgentMail's /v0) that this gateway does
    not offer; the detail names the operation so a client's log says what to avoid."""

    code = "not_implemented"
    status = 501
    title = "Not implemented"
