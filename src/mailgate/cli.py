"""The ``mailgate`` command line: thin commands over the same services as the API.

Every command talks to the database named by the settings, so administration works
with or without a running server. With ``--json`` a command prints exactly one JSON
object on stdout (errors too, as ``{"error": {...}}``, with a non-zero exit code).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mailgate.commands import (
    captured,
    common,
    domain,
    feedback,
    lists,
    mailbox,
    mcp,
    outbox,
    policy,
)
from mailgate.commands.common import JsonFlag, emit, err, fail, show_secret
from mailgate.config import Settings
from mailgate.errors import MailgateError
from mailgate.runtime import Runtime
from mailgate.store import migrate as migrations

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
workspace_app = typer.Typer(no_args_is_help=True, help="Workspaces (tenants).")
agent_app = typer.Typer(no_args_is_help=True, help="Agents and their addresses.")
key_app = typer.Typer(no_args_is_help=True, help="API keys.")
config_app = typer.Typer(no_args_is_help=True, help="Configuration.")
app.add_typer(workspace_app, name="workspace")
app.add_typer(agent_app, name="agent")
app.add_typer(key_app, name="key")
app.add_typer(config_app, name="config")
app.add_typer(policy.rules_app, name="rules")
app.add_typer(policy.contacts_app, name="contacts")
app.add_typer(mailbox.review_app, name="review")
app.add_typer(mailbox.trash_app, name="trash")
app.add_typer(outbox.app, name="outbox", help="Held outbound mail: list, approve, reject.")
app.add_typer(lists.app, name="lists")
agent_app.command("tier")(lists.agent_tier)
app.command("worker")(outbox.worker)
app.command("mcp")(mcp.serve_mcp)
app.add_typer(captured.app, name="captured", help="What the capture transport kept.")
app.add_typer(domain.app, name="domain", help="Sending domains and their DKIM keys.")
app.add_typer(feedback.app, name="suppressions", help="Addresses the workspace will not send to.")


@app.callback()
def _main(
    config: Annotated[
        Path | None, typer.Option("--config", help="TOML file with settings.", exists=False)
    ] = None,
) -> None:
    common.state.config_file = config


# -- serve / migrate / config ------------------------------------------------------------


@app.command()
def serve(
    http: Annotated[str | None, typer.Option(help="HTTP address host:port.")] = None,
    smtp: Annotated[str | None, typer.Option(help="SMTP address host:port.")] = None,
    migrate: Annotated[bool, typer.Option(help="Upgrade the database first.")] = False,
) -> None:
    """Run the gateway: HTTP API, SMTP ingress and background workers in one process."""
    from mailgate.server import Listening
    from mailgate.server import serve as run_server

    try:
        settings = common.settings(http_listen=http, smtp_listen=smtp)
    except MailgateError as exc:
        fail(exc, False)
        return
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    # aiosmtpd logs every SMTP command at INFO on "mail.log": noise, and CPU on the hot path.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # readyz checks the revision
    runtime = Runtime.build(settings)
    try:
        if migrate:
            migrations.upgrade(runtime.db)
        migrations.ensure_migrated(runtime.db)
    except MailgateError as exc:
        runtime.close()
        fail(exc, False)

    def ready(bound: Listening) -> None:
        err.print(
            f"[green]mailgate[/green] HTTP http://{bound.http[0]}:{bound.http[1]}  "
            f"SMTP smtp://{bound.smtp[0]}:{bound.smtp[1]}  "
            f"database {settings.masked()['database_url']}"
        )

    try:
        asyncio.run(
            run_server(
                runtime, http=settings.http_address, smtp=settings.smtp_address, on_ready=ready
            )
        )
    except MailgateError as exc:
        fail(exc, False)


@app.command()
def migrate(as_json: JsonFlag = False) -> None:
    """Upgrade the database to the current schema (idempotent)."""
    with common.runtime(as_json, check_migrated=False) as runtime:
        before = migrations.current_revision(runtime.db)
        after = migrations.upgrade(runtime.db)
        emit(
            as_json,
            {"from_revision": before, "revision": after},
            lambda: err.print(f"database at revision {after} (was {before or 'empty'})"),
        )


@config_app.command("show")
def config_show(as_json: JsonFlag = False) -> None:
    """Print the effective settings, secrets masked."""
    try:
        values = common.settings().masked()
    except MailgateError as exc:
        fail(exc, as_json)
        return
    if as_json:
        typer.echo(json.dumps(values, default=str))
        return
    from rich.table import Table

    table = Table("setting", "env", "value", "description")
    for name, value in values.items():
        field = Settings.model_fields[name]
        table.add_row(name, f"MAILGATE_{name.upper()}", str(value), field.description or "")
    Console().print(table)


# -- tenancy ---------------------------------------------------------------------------


@workspace_app.command("create")
def workspace_create(
    name: str,
    owner_email: Annotated[
        str | None,
        typer.Option(help="Where approval requests for held outbound mail are emailed."),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Create a workspace with its first owner and owner key (shown once)."""
    with common.runtime(as_json) as runtime:
        created = runtime.tenancy.create_workspace(name, owner_email=owner_email)
        emit(
            as_json,
            asdict(created),
            lambda: show_secret(
                f"workspace {created.workspace_id} ({created.name})",
                "owner key",
                created.owner_api_key,
            ),
        )


@workspace_app.command("owner-email")
def workspace_owner_email(
    email: str,
    workspace: Annotated[str | None, typer.Option(help="Workspace id or name.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Set the first owner's email address (approval requests go there)."""
    with common.runtime(as_json) as runtime:
        ws = runtime.tenancy.resolve_workspace(workspace)
        owner_id = runtime.tenancy.set_owner_email(ws, email)
        emit(
            as_json,
            {"workspace_id": ws, "owner_id": owner_id, "email": email.strip().lower()},
            lambda: err.print(f"owner {owner_id} of {ws}: {email}"),
        )


@agent_app.command("create")
def agent_create(
    name: str,
    workspace: Annotated[str | None, typer.Option(help="Workspace id or name.")] = None,
    address: Annotated[str | None, typer.Option(help="Local part of the address.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Create an agent with its address and an agent key (shown once)."""
    with common.runtime(as_json) as runtime:
        ws_id = runtime.tenancy.resolve_workspace(workspace)
        created = runtime.tenancy.create_agent(ws_id, name, local_part=address)
        payload = asdict(created)
        payload["scopes"] = list(created.scopes)
        emit(
            as_json,
            payload,
            lambda: show_secret(
                f"agent {created.agent_id} <{created.address}>", "agent key", created.api_key
            ),
        )


@key_app.command("create")
def key_create(
    workspace: Annotated[str | None, typer.Option(help="Workspace id or name.")] = None,
    agent: Annotated[str | None, typer.Option(help="Agent id: makes an agent key.")] = None,
    scope: Annotated[
        list[str] | None, typer.Option(help="Agent key scope (repeatable); default all.")
    ] = None,
    name: Annotated[str, typer.Option(help="A label for the key.")] = "",
    as_json: JsonFlag = False,
) -> None:
    """Create an owner key (no --agent) or an agent key."""
    with common.runtime(as_json) as runtime:
        ws_id = runtime.tenancy.resolve_workspace(workspace)
        created = runtime.tenancy.create_key(
            ws_id, agent_id=agent, scopes=tuple(scope) if scope else None, name=name
        )
        payload = asdict(created)
        payload["scopes"] = list(created.scopes)
        emit(
            as_json,
            payload,
            lambda: show_secret(f"{created.kind} key {created.key_id}", "key", created.api_key),
        )


@key_app.command("revoke")
def key_revoke(key_id: str, as_json: JsonFlag = False) -> None:
    """Revoke a key; requests with it get 401 from now on."""
    with common.runtime(as_json) as runtime:
        runtime.tenancy.revoke_key(key_id)
        emit(
            as_json,
            {"key_id": key_id, "revoked": True},
            lambda: err.print(f"key {key_id} revoked"),
        )


# -- demo ------------------------------------------------------------------------------


@app.command()
def demo(
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each step.")] = 15.0,
) -> None:
    """Walk a message through a running gateway: agent → SMTP → feed → ack."""
    from mailgate.demo import run_demo

    try:
        ok = run_demo(common.settings(), timeout=timeout, console=Console())
    except MailgateError as exc:
        fail(exc, False)
        return
    if not ok:
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover - console script shim
    sys.exit(app())
