"""``mailgate mcp``: one agent's tools over MCP on stdin/stdout.

For a local MCP client (Claude Desktop, an IDE) that starts the server itself. It
opens the same database as every other command (no gateway needs to run) and acts as
the agent of ``--api-key`` / ``$MAILGATE_API_KEY``. stdout carries the protocol, so
everything else (logs, a start-up error) goes to stderr.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import anyio
import typer

from mailgate.commands import common
from mailgate.commands.common import fail
from mailgate.errors import MailgateError
from mailgate.runtime import Runtime
from mailgate.store import migrate as migrations

ApiKey = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="MAILGATE_API_KEY",
        show_envvar=True,
        help="The agent key the tools act as (an owner key is refused).",
    ),
]


def serve_mcp(api_key: ApiKey = None) -> None:
    """Serve an agent's tools (threads, messages, search, reply, send, events) over
    MCP on stdin/stdout."""
    # Imported here: the MCP SDK costs ~0.7 s to import, which every other command
    # would pay at start-up for nothing.
    from mailgate.mcp.server import agent_principal, build_mcp_server, key_resolver

    try:
        settings = common.settings()
    except MailgateError as exc:
        fail(exc, False)
    logging.basicConfig(
        level=settings.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)  # the migration check's chatter
    runtime = Runtime.build(settings, group_commit=False)
    try:
        migrations.ensure_migrated(runtime.db)
        # A bad key is a start-up error the client shows, not a failure on every call.
        agent_principal(runtime, api_key)
        server = build_mcp_server(runtime, key_resolver(runtime, api_key))
        anyio.run(server.run_stdio_async)
    except MailgateError as exc:
        fail(exc, False)
    finally:
        runtime.close()


def main() -> None:
    """``python -m mailgate.mcp`` (settings from ``MAILGATE_*`` only)."""
    typer.run(serve_mcp)
