"""``/mcp``: the agent's tools over MCP streamable HTTP, on the gateway's HTTP app.

Every request is authenticated at the door, before the MCP machinery sees it:
``Authorization: Bearer <agent key>`` or a ``401`` problem (``invalid_api_key``) for a
missing, malformed, unknown or revoked key, and for an owner key (the tools act as
one agent). The principal rides on the request's ASGI scope to the tools
(:func:`principal_from_request`), so a tool call is always answered as the key that
sent that very request.

The transport is **stateless with JSON responses**: no MCP session lives between
requests (no ``Mcp-Session-Id``, no server-held SSE stream). The tools are plain
request/response calls, so nothing is lost, and it keeps the gateway's property that
any node can answer any request: several ``mailgate serve`` processes behind a load
balancer need no sticky sessions, and a graceful shutdown is never held up by an
idle client's open stream.

DNS-rebinding protection (Host/Origin allowlists) is off: it guards unauthenticated
local servers, and a page in a browser cannot attach the agent key this endpoint
demands.

The SDK's session manager needs a running task group, so the endpoint has a lifespan
(:meth:`McpEndpoint.running`); :func:`install` routes ``/mcp`` and chains that
lifespan into the app's own, which ``uvicorn`` runs (``lifespan="on"`` in
:mod:`mailgate.server`). Without it (an in-process test client that skips lifespans)
``/mcp`` answers ``503 unavailable`` instead of failing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import FastAPI
from mcp.server.mcpserver import MCPServer
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from starlette.requests import Request
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from mailgate.api.errors import from_error
from mailgate.domain.keys import Principal
from mailgate.errors import MailgateError, ServiceUnavailable, Unauthorized
from mailgate.mcp.server import agent_principal, build_mcp_server
from mailgate.runtime import Runtime

PATH = "/mcp"
_PRINCIPAL = "mailgate.principal"
"""Scope key the door puts the authenticated principal under (clients cannot set
scope keys, so only our own check can)."""


def principal_from_request(request: Request | None) -> Principal:
    """The principal :class:`McpEndpoint` authenticated for this HTTP request.

    Raises:
        Unauthorized: the request did not come through the door (cannot happen when
            the endpoint is mounted by :func:`install`; refused rather than trusted).
    """
    principal = request.scope.get(_PRINCIPAL) if request is not None else None
    if not isinstance(principal, Principal):
        raise Unauthorized("an `Authorization: Bearer <agent key>` header is required")
    return principal


def bearer_token(scope: Scope) -> str | None:
    """The token of an ``Authorization: Bearer`` header, if there is one."""
    headers: list[tuple[bytes, bytes]] = scope.get("headers", [])
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


class McpEndpoint:
    """The ASGI app answering ``/mcp``: the bearer check, then the SDK's transport."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.server: MCPServer = build_mcp_server(runtime, principal_from_request)
        self._manager: StreamableHTTPSessionManager | None = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Serve MCP while the block runs (the app's lifespan).

        A session manager runs once, so each run makes a fresh one: the app may be
        started again (tests do) without building a new endpoint.
        """
        # streamable_http_app() is the SDK's public way to make the server's session
        # manager; the Starlette app it also returns is not used (we route ourselves).
        self.server.streamable_http_app(
            stateless_http=True,
            json_response=True,
            transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        )
        manager = self.server.session_manager
        async with manager.run():
            self._manager = manager
            try:
                yield
            finally:
                self._manager = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        manager = self._manager
        if manager is None:
            error: MailgateError = ServiceUnavailable(
                "the MCP endpoint is not running (the app's lifespan was not started)"
            )
            await from_error(error)(scope, receive, send)
            return
        try:
            principal = await anyio.to_thread.run_sync(
                agent_principal, self.runtime, bearer_token(scope)
            )
        except MailgateError as exc:
            await from_error(exc)(scope, receive, send)
            return
        await manager.handle_request({**scope, _PRINCIPAL: principal}, receive, send)


def install(app: FastAPI, runtime: Runtime, *, path: str = PATH) -> McpEndpoint:
    """Serve the MCP tools at ``path`` on ``app`` and run them with its lifespan.

    The endpoint's lifespan is chained around whatever lifespan ``app`` already has,
    so it composes with others installed before or after.
    """
    endpoint = McpEndpoint(runtime)
    app.router.routes.append(Route(path, endpoint=endpoint, include_in_schema=False))
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(started: Any) -> AsyncIterator[Any]:
        async with endpoint.running(), inner(started) as state:
            yield state

    app.router.lifespan_context = lifespan
    return endpoint


__all__ = ["PATH", "McpEndpoint", "bearer_token", "install", "principal_from_request"]
