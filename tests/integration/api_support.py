"""Helpers for driving the real ASGI app in process over a real database."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import fastapi.routing
import httpx
from fastapi import FastAPI

from mailgate.api.app import create_app
from mailgate.runtime import Runtime
from mailgate.services.ingest import Envelope, Stored
from mailgate.testing import build_message
from tests.conftest import AgentHandle

ENVELOPE = Envelope(mail_from="bounce@example.com", client_address="192.0.2.7", helo="mx.example")


@asynccontextmanager
async def api_client(
    runtime: Runtime, *, raise_app_exceptions: bool = True
) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client wired straight into ``create_app(runtime)`` (no sockets)."""
    transport = httpx.ASGITransport(
        app=create_app(runtime), raise_app_exceptions=raise_app_exceptions
    )
    async with httpx.AsyncClient(transport=transport, base_url="http://mailgate.test") as client:
        yield client


def all_routes(app: FastAPI) -> list[Any]:
    """The app's routes, flattened (newer FastAPI keeps included routers nested in
    ``app.routes``; its ``iter_route_contexts`` flattens them)."""
    flatten = getattr(fastapi.routing, "iter_route_contexts", None)
    return list(flatten(app.routes)) if flatten is not None else list(app.routes)


def route_table(app: FastAPI) -> set[tuple[str, str]]:
    """Every ``(method, path)`` the app serves.

    Newer FastAPI keeps included routers nested in ``app.routes``; its
    ``iter_route_contexts`` flattens them (older versions flatten on include).
    """
    routes = all_routes(app)
    table = {
        (method, str(route.path))
        for route in routes
        if getattr(route, "path", None)
        for method in getattr(route, "methods", None) or ()
        if method != "HEAD"
    }
    assert table, "found no routes: has FastAPI changed how it nests them?"
    return table


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def deliver(runtime: Runtime, agent: AgentHandle, **message: Any) -> Stored:
    """Ingest one message built by ``build_message`` for ``agent``, as SMTP would."""
    raw = message.pop("raw", None) or build_message(to=agent.address, **message)
    recipient = runtime.tenancy.resolve_recipient(agent.address)
    assert recipient is not None
    [stored] = runtime.ingest.ingest(raw, ENVELOPE, [recipient])
    return stored


def problem_code(response: httpx.Response) -> str:
    """The problem ``code`` of an error response, checking it *is* a problem."""
    assert response.headers["content-type"] == "application/problem+json", response.text
    body = response.json()
    assert body["status"] == response.status_code
    assert {"type", "title", "detail", "code"} <= body.keys()
    return str(body["code"])


async def wait_until(check: Callable[[], bool], *, timeout: float = 10.0) -> None:
    """Wait for ``check()`` (run in a thread: it may query the database) to hold."""
    with anyio.fail_after(timeout):
        while not await anyio.to_thread.run_sync(check):
            await anyio.sleep(0.01)
