"""Owner commands for held outbound mail, and the stand-alone delivery worker.

``mailgate outbox list|show|approve|reject`` act as the *operator* (the CLI on the
gateway's host): a request id is found in any workspace and the decision is audited as
``cli``; ``list`` covers every workspace unless ``--workspace`` names one. They call
the same :class:`~mailgate.services.outbound.OutboundService` methods as the API, so
an approval here executes exactly once even if an owner clicks approve in the console
at the same moment (the loser gets ``already_decided``).

``mailgate worker`` (:func:`worker`) runs only the delivery worker: no HTTP, no SMTP.
For scale-out, any number of them share one PostgreSQL database; claims use
``FOR UPDATE SKIP LOCKED``, so no request is delivered by two workers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Callable
from typing import Annotated, Any

import typer
from sqlalchemy.exc import NoResultFound

from mailgate.commands import common
from mailgate.commands.common import JsonFlag, emit, err, fail
from mailgate.domain.keys import Principal
from mailgate.errors import ConfigError, MailgateError, NotFound
from mailgate.runtime import Runtime
from mailgate.services.mailbox import Actor, Operator
from mailgate.store import migrate as migrations
from mailgate.workers.delivery import run_delivery

app = typer.Typer(no_args_is_help=True)

OPERATOR = Operator("cli")
MAX_LIST = 1000

WorkspaceOption = Annotated[
    str | None, typer.Option("--workspace", help="Workspace id or name (default: every one).")
]


@app.command("list")
def outbox_list(
    workspace: WorkspaceOption = None,
    limit: Annotated[
        int, typer.Option(min=1, max=MAX_LIST, help=f"Most requests to list (1..{MAX_LIST}).")
    ] = 100,
    as_json: JsonFlag = False,
) -> None:
    """Held requests waiting for an owner's approval, oldest first."""
    with common.runtime(as_json) as runtime:
        by: Actor = OPERATOR
        if workspace is not None:
            ws_id = runtime.tenancy.resolve_workspace(workspace)
            by = Principal(workspace_id=ws_id, key_id="cli", kind="owner")
        held = runtime.outbound.pending(by, limit=limit)
        emit(as_json, {"requests": held}, lambda: _print_held(held))


@app.command("show")
def outbox_show(outbound_id: str, as_json: JsonFlag = False) -> None:
    """One request: its decision step by step, approvals and delivery attempts."""
    with common.runtime(as_json) as runtime:
        detail = _detail(runtime, outbound_id)
        emit(as_json, detail, lambda: _print_detail(detail))


@app.command("approve")
def outbox_approve(
    outbound_id: str,
    comment: Annotated[str, typer.Option(help="Why, for the audit log.")] = "",
    as_json: JsonFlag = False,
) -> None:
    """Release a held request for delivery (exactly once)."""
    with common.runtime(as_json) as runtime:
        detail = runtime.outbound.approve(OPERATOR, outbound_id, comment=comment)
        emit(as_json, detail, lambda: _print_verdict("approved", detail))


@app.command("reject")
def outbox_reject(
    outbound_id: str,
    comment: Annotated[str, typer.Option(help="Why (required): the agent is told.")],
    as_json: JsonFlag = False,
) -> None:
    """Refuse a held request: it is never sent."""
    with common.runtime(as_json) as runtime:
        detail = runtime.outbound.reject(OPERATOR, outbound_id, comment=comment)
        emit(as_json, detail, lambda: _print_verdict("rejected", detail))


# -- mailgate worker -----------------------------------------------------------------------


def worker(
    migrate: Annotated[bool, typer.Option(help="Upgrade the database first.")] = False,
) -> None:
    """Run only the delivery worker (no HTTP, no SMTP) until SIGTERM/SIGINT."""
    try:
        settings = common.settings()
    except MailgateError as exc:
        fail(exc, False)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    runtime = Runtime.build(settings)
    try:
        if settings.delivery_workers <= 0:
            raise ConfigError("delivery_workers is 0: this worker would deliver nothing")
        if migrate:
            migrations.upgrade(runtime.db)
        migrations.ensure_migrated(runtime.db)
    except MailgateError as exc:
        runtime.close()
        fail(exc, False)

    def ready() -> None:
        # Plain text on stderr: scripts and tests wait for this exact line.
        err.print(
            f"mailgate worker ready: transport={runtime.transport.name} "
            f"slots={settings.delivery_workers} "
            f"database={settings.masked()['database_url']}",
            soft_wrap=True,
            markup=False,
            highlight=False,
        )

    asyncio.run(run_worker(runtime, on_ready=ready))


async def run_worker(runtime: Runtime, *, on_ready: Callable[[], None] | None = None) -> None:
    """Deliver until SIGTERM/SIGINT, then let in-flight deliveries record their outcome,
    drain the committer and close the runtime (always, even after an error)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    try:
        await runtime.attach_loop()
        for sig in signals:
            loop.add_signal_handler(sig, stop.set)
        delivery = asyncio.create_task(run_delivery(runtime, stop=stop), name="delivery")
        if on_ready is not None:
            on_ready()
        await delivery
    finally:
        stop.set()
        for sig in signals:
            loop.remove_signal_handler(sig)
        await runtime.detach_loop()
        await asyncio.to_thread(runtime.close)


# -- helpers -------------------------------------------------------------------------------


def _detail(runtime: Runtime, outbound_id: str) -> dict[str, Any]:
    """The request as an owner of its workspace sees it.

    Raises:
        NotFound: no such request (in any workspace).
    """
    try:
        return runtime.outbound.get_as_system(outbound_id)
    except NoResultFound:
        raise NotFound(f"no outbound request {outbound_id}") from None


def _print_held(held: list[dict[str, Any]]) -> None:
    """Two or three lines per request: a table would squeeze the reasons unreadable."""
    if not held:
        err.print("no held outbound mail")
        return
    for item in held:
        typer.echo(
            f"{item['id']}  {item['status']}  agent {item['agent_id']}  "
            f"created {item['created_at']}  expires {item['expires_at'] or '-'}"
        )
        typer.echo(f"    to: {', '.join(item['recipients'])}")
        typer.echo(f"    why: {'; '.join(item['reasons'])}")


def _print_verdict(verdict: str, detail: dict[str, Any]) -> None:
    err.print(f"{verdict}: {detail['id']} (now {detail['status']})", markup=False)


def _print_detail(detail: dict[str, Any]) -> None:
    typer.echo(f"{detail['id']}  {detail['kind']} by {detail['agent_id']}  {detail['status']}")
    to = ", ".join(f"{r['address']} ({r['status']})" for r in detail["recipients"])
    typer.echo(f"from {detail['from']} to {to}")
    decision = detail.get("decision") or {}
    typer.echo(f"decision: {decision.get('action')}")
    for step in decision.get("steps", []):
        typer.echo(f"  {step['step']:<16} {step['outcome']:<10} {step['reason']}")
    for verdict in detail["approvals"]:
        typer.echo(
            f"{verdict['verdict']} by {verdict['actor']} at {verdict['created_at']}"
            + (f": {verdict['comment']}" if verdict["comment"] else "")
        )
    for attempt in detail["attempts"]:
        typer.echo(
            f"attempt {attempt['number']} via {attempt['transport']}: {attempt['outcome']} "
            f"{attempt['code'] or ''} {attempt['detail'] or ''}".rstrip()
        )
    if detail.get("last_error"):
        typer.echo(f"last error: {json.dumps(detail['last_error'], default=str)}")
