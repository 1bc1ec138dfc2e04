"""Every error the HTTP API answers is an RFC 9457 problem (``application/problem+json``).

A problem carries the standard members (``type``, ``title``, ``status``, ``detail``) plus
the stable ``code`` clients branch on, so a client never parses ``detail``. The four
sources of errors all end here:

* :class:`~mailgate.errors.MailgateError`: the class says code, status and title; the
  instance's ``extra`` becomes extension members (``errors``, ``scope``, ...);
* A body that is not JSON: ``400 bad_request`` naming ``body``.
* FastAPI's request validation: ``422 validation_failed`` with ``errors`` naming each
  field, the same shape services use for their own :class:`ValidationFailed`;
* Starlette's HTTP errors (unknown route, wrong method): ``not_found``, ...;
* anything unexpected: ``500 internal_error`` with a reference id that is also logged,
  and nothing about the failure itself (tracebacks and SQL stay in the log).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from mailgate.errors import BadRequest, MailgateError, Unauthorized
from mailgate.ids import new_id

PROBLEM_JSON = "application/problem+json"
TYPE_PREFIX = "urn:mailgate:problem:"

_log = logging.getLogger(__name__)

# Members a problem always has; an error's ``extra`` may never overwrite them.
_RESERVED = frozenset({"type", "title", "status", "detail", "code", "instance"})

# Statuses Starlette raises on its own, with the code clients see for each.
_HTTP_CODES: Mapping[int, tuple[str, str]] = {
    400: ("bad_request", "Bad request"),
    401: ("invalid_api_key", "Unauthorized"),
    403: ("missing_scope", "Forbidden"),
    404: ("not_found", "Not found"),
    405: ("method_not_allowed", "Method not allowed"),
    406: ("not_acceptable", "Not acceptable"),
    413: ("payload_too_large", "Payload too large"),
    415: ("unsupported_media_type", "Unsupported media type"),
}


class Problem(BaseModel):
    """The documented shape of every error body (extension members vary by ``code``)."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    code: str


PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {
        "model": Problem,
        "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        "description": title,
    }
    for status, title in (
        (401, "Missing, unknown or revoked API key (`invalid_api_key`)"),
        (403, "The key lacks a scope (`missing_scope`)"),
        (404, "No such object visible to this key (`not_found`)"),
        (422, "A field is malformed (`validation_failed`, `errors` names it)"),
    )
}
"""OpenAPI ``responses`` shared by every authenticated route."""


def problem(
    status: int,
    code: str,
    title: str,
    detail: str,
    *,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """A problem+json response; ``extra`` becomes extension members."""
    body: dict[str, Any] = {
        key: value for key, value in extra.items() if key not in _RESERVED and value is not None
    }
    body.update(type=TYPE_PREFIX + code, title=title, status=status, detail=detail, code=code)
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


def from_error(exc: MailgateError) -> JSONResponse:
    """The problem for one of our own errors, entirely from its class and instance."""
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
    return problem(
        exc.status,
        exc.code,
        exc.title,
        exc.detail,
        headers=headers,
        retryable=exc.retryable or None,
        **exc.extra,
    )


def field_errors(errors: Sequence[Any]) -> list[dict[str, str]]:
    """Pydantic's error list as ``[{"field", "message"}]``.

    The location's first element says where the value came from (``query``, ``body``,
    ``path``, ``header``); the rest is the field path, dotted (``event_ids.3``). A
    missing or undecodable body has no field path, so it is named ``body``.
    """
    out: list[dict[str, str]] = []
    for error in errors:
        loc = [str(part) for part in error.get("loc", ())]
        field = ".".join(loc[1:]) or (loc[0] if loc else "request")
        out.append({"field": field, "message": str(error.get("msg", "invalid"))})
    return out


def _malformed_json(exc: RequestValidationError) -> BadRequest | None:
    """A body that is not JSON at all is a bad request (400), not a field that failed
    validation (422): the client sent bytes we cannot read, so no field is named but
    ``body``."""
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            reason = (error.get("ctx") or {}).get("error", "not JSON")
            position = error.get("loc", ("body", None))[-1]
            message = f"{reason} (at character {position})"
            return BadRequest(
                f"the body is not valid JSON: {message}",
                errors=[{"field": "body", "message": message}],
            )
    return None


def install(app: FastAPI) -> None:
    """Register the handlers that turn every failure into a problem response (or, on
    the AgentMail face under ``/v0``, into AgentMail's ``{name, message}`` body with
    our stable ``code`` alongside: see :mod:`mailgate.api.v0.errors`)."""

    def respond(
        request: Request,
        status: int,
        code: str,
        title: str,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> JSONResponse:
        if is_v0(request):
            from mailgate.api.v0.errors import agentmail_error

            return agentmail_error(status, code, detail, headers=headers, **extra)
        return problem(status, code, title, detail, headers=headers, **extra)

    def respond_to(request: Request, exc: MailgateError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
        return respond(
            request,
            exc.status,
            exc.code,
            exc.title,
            exc.detail,
            headers=headers,
            retryable=exc.retryable or None,
            **exc.extra,
        )

    async def on_mailgate_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, MailgateError)
        return respond_to(request, exc)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        malformed = _malformed_json(exc)
        if malformed is not None:
            return respond_to(request, malformed)
        errors = field_errors(exc.errors())
        fields = ", ".join(dict.fromkeys(e["field"] for e in errors))
        return respond(
            request,
            422,
            "validation_failed",
            "Validation failed",
            f"invalid: {fields}",
            errors=errors,
        )

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code, title = _HTTP_CODES.get(exc.status_code, ("http_error", "HTTP error"))
        detail = exc.detail if isinstance(exc.detail, str) else title
        return respond(request, exc.status_code, code, title, detail, headers=exc.headers)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after this response is sent, so the server logs it too;
        # the reference lets an operator find this one among them.
        reference = new_id("err")
        _log.error("unhandled error %s", reference, exc_info=exc)
        return respond(
            request,
            500,
            "internal_error",
            "Internal error",
            f"unexpected server error (reference {reference})",
            reference=reference,
        )

    app.add_exception_handler(MailgateError, on_mailgate_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)


def is_v0(request: Request) -> bool:
    """Whether the request is on the AgentMail-compatible face."""
    path = request.url.path
    return path == "/v0" or path.startswith("/v0/")
