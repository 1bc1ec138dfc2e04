"""Errors on the AgentMail face, in AgentMail's shape.

AgentMail's SDK reads ``{name, message}`` (plus optional ``code``, ``fix``, ``docs``)
and picks its exception class by status. We keep our stable ``code`` in its ``code``
member, so a client can still branch on it. Validation failures are ``400`` with
``errors`` there, as AgentMail answers them (its SDK raises ``ValidationError`` only
for 400); everything else keeps the status the native API uses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi.responses import JSONResponse

_NAMES: Mapping[int, str] = {
    400: "ValidationError",
    401: "UnauthorizedError",
    403: "ForbiddenError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    409: "AlreadyExistsError",
    413: "PayloadTooLargeError",
    429: "RateLimitError",
    500: "InternalServerError",
    501: "NotImplementedError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
}

# Our codes whose AgentMail name is more specific than the status's.
_NAMED_CODES: Mapping[str, str] = {
    "idempotency_in_flight": "ConflictError",
    "invalid_folder_transition": "ConflictError",
    "already_decided": "ConflictError",
    "message_rejected": "MessageRejectedError",
}


def agentmail_error(
    status: int,
    code: str,
    detail: str,
    *,
    headers: Mapping[str, str] | None = None,
    name: str | None = None,
    **extra: Any,
) -> JSONResponse:
    """An AgentMail error body: ``{name, message, code}`` plus ``errors`` when fields
    failed validation."""
    if status == 422:
        status = 400
    body: dict[str, Any] = {
        "name": name or _NAMED_CODES.get(code) or _NAMES.get(status, "Error"),
        "message": detail,
        "code": code,
    }
    if extra.get("errors") is not None:
        body["errors"] = extra["errors"]
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))
