"""The HTTP application: one FastAPI app over one :class:`~mailgate.runtime.Runtime`.

The app holds no state of its own beyond the runtime it is given (on ``app.state``), so
tests build it in process over a real database and any number of gateway processes
can serve the same store.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Final

from fastapi import APIRouter, FastAPI

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

ROUTERS: Final[tuple[APIRouter, ...]] = (
    v1.router,
    policy.router,
    mailbox.router,
    outbound.router,
    outbound_admin.router,
    captured.router,
    feedback.router,
    inbound.router,
    *v0.ROUTERS,
    v1.ops,
)
"""Every router, in matching order (first match wins; ``/v0``'s catch-all is last of
its face). None includes another."""


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
    # The routes are built once, at import, and shared by every app rather than
    # included: FastAPI >= 0.137 includes routers lazily and rebuilds each route's
    # dependency and response state per app on its first requests (~0.2 s for this
    # API), which every in-process test and every new app would pay again.
    for router in ROUTERS:
        app.router.routes.extend(router.routes)
    mcp_http.install(app, runtime)  # /mcp, its session manager in the app's lifespan
    return app
