"""The HTTP application: one FastAPI app over one :class:`~mailgate.runtime.Runtime`.

The app holds no state of its own beyond the runtime it is given (on ``app.state``), so
tests build it in process over a real database and any number of gateway processes
can serve the same store.
"""

from __future__ import annotations

from importlib.metadata import version

from fastapi import FastAPI

from mailgate.api import (
    captured,
    errors,
    feedback,
    inbound,
    mailbox,
    outbound,
    outbound_admin,
    policy,
    v0,
    v1,
)
from mailgate.mcp import http as mcp_http
from mailgate.runtime import Runtime


def create_app(runtime: Runtime) -> FastAPI:
    """The app serving the native API (``/v1``), the AgentMail-compatible face
    (``/v0`` and its websocket), MCP (``/mcp``) and the health probes."""
    app = FastAPI(
        title="mailgate",
        version=version("mailgate"),
        description="Self-hostable email gateway for AI agents. Errors are "
        "`application/problem+json` with a stable `code`.",
    )
    app.state.runtime = runtime
    errors.install(app)
    app.include_router(v1.router)
    app.include_router(policy.router)
    app.include_router(mailbox.router)
    app.include_router(outbound.router)
    app.include_router(outbound_admin.router)
    app.include_router(captured.router)
    app.include_router(feedback.router)
    app.include_router(inbound.router)
    app.include_router(v0.ws_router)
    app.include_router(v0.router)
    app.include_router(v1.ops)
    mcp_http.install(app, runtime)  # /mcp, its session manager in the app's lifespan
    return app
