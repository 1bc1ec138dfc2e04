"""Operator commands for suppressions: ``mailgate suppressions list|add|remove``.

Thin over :class:`~mailgate.services.feedback.FeedbackService`, the service the API
uses. The CLI acts as the operator (audited as ``cli``, source ``cli``) in the
workspace given by ``--workspace`` (id or name), or the only one there is. ``--json``
prints the API's shapes.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from mailgate.api.feedback import SuppressionList, SuppressionOut
from mailgate.commands import common
from mailgate.commands.common import JsonFlag, emit, err
from mailgate.services.feedback import SUPPRESSION_REASONS
from mailgate.services.mailbox import Operator
from mailgate.services.queries import MAX_LIMIT

app = typer.Typer(no_args_is_help=True)

OPERATOR = Operator("cli")
WorkspaceOption = Annotated[str | None, typer.Option(help="Workspace id or name.")]
ReasonHelp = ", ".join(SUPPRESSION_REASONS)


@app.command("list")
def suppressions_list(
    workspace: WorkspaceOption = None,
    reason: Annotated[str | None, typer.Option(help=f"Only this reason ({ReasonHelp}).")] = None,
    limit: Annotated[
        int, typer.Option(min=1, max=MAX_LIMIT, help=f"Most entries (1..{MAX_LIMIT}).")
    ] = 50,
    cursor: Annotated[str | None, typer.Option(help="`next_cursor` of the previous page.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Addresses the workspace will not send to, newest first."""
    with common.runtime(as_json) as runtime:
        ws_id = runtime.tenancy.resolve_workspace(workspace)
        page = runtime.feedback.list_suppressions(
            OPERATOR, workspace_id=ws_id, reason=reason, limit=limit, cursor=cursor
        )
        listing = SuppressionList.of(page)
        emit(as_json, listing.model_dump(mode="json"), lambda: _show(listing))


@app.command("add")
def suppressions_add(
    address: str,
    workspace: WorkspaceOption = None,
    reason: Annotated[str, typer.Option(help=f"Why: {ReasonHelp}.")] = "manual",
    detail: Annotated[str, typer.Option(help="A note for the list.")] = "",
    as_json: JsonFlag = False,
) -> None:
    """Stop the workspace sending to ADDRESS."""
    with common.runtime(as_json) as runtime:
        ws_id = runtime.tenancy.resolve_workspace(workspace)
        found = runtime.feedback.add_suppression(
            OPERATOR, address, workspace_id=ws_id, reason=reason, detail=detail
        )
        emit(
            as_json,
            _json(SuppressionOut.of(found)),
            lambda: err.print(f"suppressed {found.address} ({found.reason})"),
        )


@app.command("remove")
def suppressions_remove(
    address: str, workspace: WorkspaceOption = None, as_json: JsonFlag = False
) -> None:
    """Allow the workspace to send to ADDRESS again."""
    with common.runtime(as_json) as runtime:
        ws_id = runtime.tenancy.resolve_workspace(workspace)
        found = runtime.feedback.remove_suppression(OPERATOR, address, workspace_id=ws_id)
        emit(
            as_json,
            {"removed": _json(SuppressionOut.of(found))},
            lambda: err.print(f"removed {found.address} (was {found.reason})"),
        )


def _json(value: SuppressionOut) -> dict[str, Any]:
    return value.model_dump(mode="json")


def _show(listing: SuppressionList) -> None:
    table = Table(title="suppressions")
    for name in ("address", "reason", "source", "added", "detail"):
        table.add_column(name)
    for s in listing.suppressions:
        table.add_row(
            s.address, s.reason, s.source, s.created_at.isoformat(timespec="seconds"), s.detail
        )
    Console().print(table)
    if listing.next_cursor:
        err.print(f"more: --cursor {listing.next_cursor}")
