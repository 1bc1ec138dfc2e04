"""The client's exception tree, built from the gateway's problem responses.

The SDK stands alone (it may ship as its own distribution), so it keeps its own tree
instead of importing the server's; the stable ``code`` is the bridge between the two::

    MailgateClientError
    ├── MailgateConnectionError        the request did not complete (network, timeout)
    │   └── MailgateTimeoutError
    └── MailgateAPIError               the gateway answered with an error status
        ├── BadRequestError            400  (idempotency_key_required, bad_request)
        ├── AuthenticationError        401  (invalid_api_key)
        ├── PermissionDeniedError      403  (missing_scope)
        ├── NotFoundError              404  (not_found)
        ├── ConflictError              409  (idempotency_in_flight, already_decided, ...)
        ├── PayloadTooLargeError       413
        ├── ValidationError            422  (validation_failed, idempotency_key_reused, ...)
        ├── RateLimitError             429
        └── InternalServerError        5xx
            └── ServiceUnavailableError 503

Callers branch on the class or on ``code``, never on ``detail``.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

__all__ = [
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "InternalServerError",
    "MailgateAPIError",
    "MailgateClientError",
    "MailgateConnectionError",
    "MailgateTimeoutError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServiceUnavailableError",
    "ValidationError",
]


class MailgateClientError(Exception):
    """Base of everything the SDK raises on purpose (also for a missing configuration)."""


class MailgateConnectionError(MailgateClientError):
    """No answer came back (refused connection, reset, DNS, TLS), after any retries.

    For a send with an idempotency key it is safe to call again with the *same* key:
    the gateway returns the first answer if the first attempt did get through.
    """


class MailgateTimeoutError(MailgateConnectionError):
    """The gateway did not answer within the timeout."""


class MailgateAPIError(MailgateClientError):
    """The gateway answered with an error status (an RFC 9457 problem).

    Attributes:
        status: the HTTP status.
        code: the stable machine-readable code (``not_found``, ``idempotency_key_reused``).
        detail: a human-readable explanation; for logs, not for branching.
        body: the whole problem body (extension members such as ``errors`` included).
        retryable: the gateway said a retry of the same request can succeed.
        retry_after: seconds the gateway asked to wait (``Retry-After``), if it did.
    """

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        body: dict[str, Any] | None = None,
        *,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.body: dict[str, Any] = body or {}
        self.retryable = bool(self.body.get("retryable", False))
        self.retry_after = retry_after

    @property
    def errors(self) -> list[dict[str, Any]]:
        """The fields a ``422`` (or ``400``) named, as ``[{"field", "message"}]``."""
        errors = self.body.get("errors")
        return list(errors) if isinstance(errors, list) else []


class BadRequestError(MailgateAPIError):
    pass


class AuthenticationError(MailgateAPIError):
    pass


class PermissionDeniedError(MailgateAPIError):
    pass


class NotFoundError(MailgateAPIError):
    pass


class ConflictError(MailgateAPIError):
    pass


class PayloadTooLargeError(MailgateAPIError):
    pass


class ValidationError(MailgateAPIError):
    pass


class RateLimitError(MailgateAPIError):
    pass


class InternalServerError(MailgateAPIError):
    pass


class ServiceUnavailableError(InternalServerError):
    pass


_BY_STATUS: dict[int, type[MailgateAPIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: ValidationError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def error_from_response(
    response: httpx.Response, *, retry_after: float | None = None
) -> MailgateAPIError:
    """The error for a non-2xx answer, from its problem body when it has one.

    A body that is not a problem (a proxy's HTML page) still gives an error of the
    right class, with ``code`` ``http_<status>`` and the start of the body as detail.
    """
    status = response.status_code
    body: dict[str, Any] = {}
    try:
        parsed = json.loads(response.content) if response.content else None
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        body = parsed
    code = body.get("code")
    detail = body.get("detail")
    if not isinstance(code, str) or not code:
        code = f"http_{status}"
    if not isinstance(detail, str):
        detail = response.text[:200].strip() or response.reason_phrase or "error"
    cls = _BY_STATUS.get(status)
    if cls is None:
        cls = InternalServerError if status >= 500 else MailgateAPIError
    return cls(status, code, detail, body, retry_after=retry_after)
