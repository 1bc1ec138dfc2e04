"""Bearer authentication as FastAPI dependencies.

The dependencies are plain ``def`` functions: FastAPI runs them in its threadpool, so
the key lookup (a synchronous database read) never blocks the event loop, including
for ``async`` routes such as the long-poll. Scope checks are not made here but by the
services, so every face of the gateway enforces the same rules.
"""

from __future__ import annotations

from typing import Annotated, cast

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from mailgate.domain.keys import Principal
from mailgate.errors import Unauthorized
from mailgate.runtime import Runtime

# auto_error=False: a missing or non-Bearer header must answer our 401 problem, not
# FastAPI's 403. The scheme also documents bearer auth in /openapi.json.
_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="apiKey",
    description="An owner or agent API key: `Authorization: Bearer mg_...`.",
)


def get_runtime(request: Request) -> Runtime:
    """The runtime :func:`mailgate.api.app.create_app` attached to the app."""
    return cast(Runtime, request.app.state.runtime)


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def current_principal(
    runtime: RuntimeDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """Who is calling.

    Raises:
        Unauthorized: no bearer token, or one that is malformed, unknown or revoked.
    """
    if credentials is None:
        raise Unauthorized("an `Authorization: Bearer <API key>` header is required")
    return runtime.tenancy.authenticate(credentials.credentials)


PrincipalDep = Annotated[Principal, Depends(current_principal)]
