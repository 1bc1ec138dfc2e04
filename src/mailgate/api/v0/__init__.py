"""The AgentMail-compatible face: ``/v0`` routes over the same services as ``/v1``.

Each module is one part of AgentMail's REST surface, translated onto our model: an
inbox is an agent, a message is a message, a draft is an unsent outbound request, a
webhook is a feed consumer that pushes, a list entry is a contact, a suppression or a
recipient list entry. Paths AgentMail has and we do not serve answer ``501`` with the
operation named; anything else under ``/v0`` is AgentMail's ``404``.
"""

from __future__ import annotations

from typing import Final

from fastapi import APIRouter, Request

from mailgate.api.v0 import (
    drafts,
    inboxes,
    lists,
    messages,
    sending,
    threads,
    webhooks,
    websocket,
)
from mailgate.errors import NotFound, NotSupported

# AgentMail resources this gateway does not offer (first path segment after /v0, or
# after /v0/inboxes/{id}); they answer 501 naming the operation.
UNSUPPORTED_ROOTS = frozenset(
    {
        "accounts", "agent", "api-keys", "apps", "auth", "domains", "metrics",
        "organizations", "pods", "events",
    }
)  # fmt: skip
UNSUPPORTED_IN_INBOX = frozenset(
    {"accounts", "api-keys", "authorize", "calendar", "events", "files", "metrics"}
)
UNSUPPORTED_SUFFIXES = ("/search", "/batch-get", "/batch-update", "/agent-armor/feedback",
                        "/agent-armor/release", "/headers", "/polling")  # fmt: skip

router = APIRouter(prefix="/v0")
"""Only the catch-all below; it must come after every other ``/v0`` route."""


@router.api_route(
    "/{rest:path}",
    methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
    include_in_schema=False,
)
async def unknown_route(request: Request, rest: str) -> None:
    """Unknown /v0 paths: 501 for AgentMail operations we do not offer, else 404."""
    parts = [p for p in rest.split("/") if p]
    operation = f"{request.method} /v0/{rest}"
    if parts and parts[0] in UNSUPPORTED_ROOTS:
        raise NotSupported(f"{operation} is not supported by this gateway")
    if len(parts) >= 3 and parts[0] == "inboxes" and parts[2] in UNSUPPORTED_IN_INBOX:
        raise NotSupported(f"{operation} is not supported by this gateway")
    if any(("/" + rest).endswith(suffix) for suffix in UNSUPPORTED_SUFFIXES):
        raise NotSupported(f"{operation} is not supported by this gateway")
    raise NotFound(f"no route {operation}")


ROUTERS: Final = (
    websocket.router,  # the websocket at /v0 itself
    inboxes.router,
    messages.router,
    sending.router,
    threads.router,
    drafts.router,
    webhooks.router,
    lists.router,
    router,
)
"""Every ``/v0`` router, in matching order. Each carries the ``/v0`` prefix itself
(see :func:`mailgate.api.app.create_app` for why nothing is nested)."""
