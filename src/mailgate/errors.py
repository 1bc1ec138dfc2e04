"""One exception tree for the whole gateway.

Every error a caller may need to tell apart carries a stable ``code`` (what the HTTP
problem documents and the SMTP replies are keyed on), the HTTP ``status`` an edge
should answer with, and whether retrying the same request can help (``retryable``).
Callers branch on the class or ``code``, never on message text::

    MailgateError
    ├── BadRequest                  400  bad_request
    │   └── ValidationFailed        422  validation_failed
    ├── Unauthorized                401  invalid_api_key
    │   └── InvalidSignature        401  invalid_signature       (webhook auth)
    ├── Forbidden                   403  missing_scope
    ├── NotFound                    404  not_found
    │   ├── UnknownRecipient        404  unknown_recipient       (webhooks pick a status)
    │   └── InboundDisabled         404  inbound_disabled        (webhook secret unset)
    ├── Conflict                    409  conflict
    │   └── InvalidTransition       409  invalid_folder_transition
    ├── PayloadTooLarge             413  message_too_large
    │   └── RequestTooLarge         413  payload_too_large       (request body, unread)
    ├── ConfigError                 500  invalid_config          (start-up only)
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


class DatabaseNotMigrated(MailgateError):
    code = "database_not_migrated"
    status = 503
    title = "Database not migrated"


class ServiceUnavailable(MailgateError):
    code = "unavailable"
    status = 503
    retryable = True
    title = "Service unavailable"
