"""Owner commands for the review inbox and the trash.

The CLI runs on the gateway's host, so it acts as the *operator*: moves apply to a
message id in any workspace and are audited as ``cli``; listings are per workspace
(``--workspace``, or the only one there is). Output uses the API's JSON shapes.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from mailgate.api.schemas import FolderChangeOut, MessageSummaryOut
from mailgate.commands import common
from mailgate.commands.common import JsonFlag, emit, err
from mailgate.domain.keys import Principal
from mailgate.runtime import Runtime
from mailgate.services.mailbox import FolderChange, Operator
from mailgate.services.queries import MAX_LIMIT, MessageSummary, Page

review_app = typer.Typer(no_args_is_help=True, help="Mail held for review.")
trash_app = typer.Typer(no_args_is_help=True, help="Trashed mail: list, restore, purge.")

WorkspaceOption = Annotated[str | None, typer.Option(help="Workspace id or name.")]
AgentOption = Annotated[str | None, typer.Option("--agent", help="Only this agent's mail.")]
LimitOption = Annotated[
    int, typer.Option(min=1, max=MAX_LIMIT, help=f"Most messages to list (1..{MAX_LIMIT}).")
]
CursorOption = Annotated[str | None, typer.Option(help="`next_cursor` of the previous page.")]
OPERATOR = Operator("cli")


def _owner_of(runtime: Runtime, workspace: str | None) -> Principal:
    """The workspace's owner, as the CLI reads on its behalf."""
    ws_id = runtime.tenancy.resolve_workspace(workspace)
    return Principal(workspace_id=ws_id, key_id="cli", kind="owner")


def _page(page: Page[MessageSummary]) -> dict[str, Any]:
    return {
        "messages": [
            MessageSummaryOut.of(m).model_dump(mode="json", by_alias=True) for m in page.items
        ],
        "next_cursor": page.next_cursor,
    }


def _show_page(title: str, page: Page[MessageSummary]) -> None:
    table = Table(title=title)
    table.add_column("message", no_wrap=True)  # ids are what people copy into commands
    for name in ("agent", "folder", "from", "subject", "received", "why"):
        table.add_column(name)
    for m in page.items:
        reasons = ", ".join((m.decision or {}).get("reasons", []))
        table.add_row(
            m.message_id,
            m.agent_id,
            m.folder,
            m.from_.address if m.from_ else "",
            m.subject,
            m.received_at.isoformat(timespec="seconds"),
            reasons,
        )
    Console().print(table)
    if page.next_cursor:
        err.print(f"more: --cursor {page.next_cursor}")


def _moved(as_json: bool, change: FolderChange) -> None:
    emit(
        as_json,
        FolderChangeOut.of_change(change).model_dump(mode="json", by_alias=True),
        lambda: err.print(
            f"{change.operation}: {change.message.message_id} "
            f"{change.from_folder} -> {change.to_folder}"
            + (" (delivered to the agent)" if change.reached_agent else "")
        ),
    )


# -- review -----------------------------------------------------------------------------


@review_app.command("list")
def review_list(
    workspace: WorkspaceOption = None,
    agent: AgentOption = None,
    folder: Annotated[
        str | None, typer.Option(help="`review` or `quarantine` (default: both).")
    ] = None,
    limit: LimitOption = 50,
    cursor: CursorOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Mail rules held for a human, newest first, with why it was held."""
    with common.runtime(as_json) as runtime:
        page = runtime.queries.list_held(
            _owner_of(runtime, workspace), folder=folder, agent_id=agent, limit=limit, cursor=cursor
        )
        emit(as_json, _page(page), lambda: _show_page("held mail", page))


@review_app.command("release")
def review_release(message_id: str, as_json: JsonFlag = False) -> None:
    """Deliver held mail to its agent (it gets message.received)."""
    with common.runtime(as_json) as runtime:
        _moved(as_json, runtime.mailbox.release(OPERATOR, message_id))


@review_app.command("trash")
def review_trash(message_id: str, as_json: JsonFlag = False) -> None:
    """Reject held mail: move it to the trash without the agent ever seeing it."""
    with common.runtime(as_json) as runtime:
        _moved(as_json, runtime.mailbox.trash_held(OPERATOR, message_id))


# -- trash ------------------------------------------------------------------------------


@trash_app.command("list")
def trash_list(
    workspace: WorkspaceOption = None,
    agent: AgentOption = None,
    limit: LimitOption = 50,
    cursor: CursorOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Trashed mail, newest first."""
    with common.runtime(as_json) as runtime:
        page = runtime.queries.list_trash(
            _owner_of(runtime, workspace), agent_id=agent, limit=limit, cursor=cursor
        )
        emit(as_json, _page(page), lambda: _show_page("trash", page))


@trash_app.command("restore")
def trash_restore(message_id: str, as_json: JsonFlag = False) -> None:
    """Put a trashed message back in the folder it came from."""
    with common.runtime(as_json) as runtime:
        _moved(as_json, runtime.mailbox.restore(OPERATOR, message_id))


@trash_app.command("purge")
def trash_purge(as_json: JsonFlag = False) -> None:
    """Delete trash older than the retention period now (what `serve` does hourly)."""
    with common.runtime(as_json) as runtime:
        totals: dict[str, int] = {}
        while True:
            result = runtime.mailbox.purge_trash(actor="cli")
            for name in (
                "messages",
                "attachments",
                "threads_deleted",
                "threads_updated",
                "blob_rows",
                "blob_files",
                "receipts",
            ):
                totals[name] = totals.get(name, 0) + getattr(result, name)
            if not result.more:
                break
        emit(
            as_json,
            totals,
            lambda: err.print(
                f"purged {totals['messages']} messages, {totals['blob_rows']} blob rows, "
                f"{totals['blob_files']} blob files, {totals['receipts']} webhook receipts"
            ),
        )
