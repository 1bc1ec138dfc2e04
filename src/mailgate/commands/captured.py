"""``mailgate captured``: what the capture transport (the embedded default) "sent".

Nothing captured leaves the machine; these commands show it. They act for one
workspace (``--workspace``, or the only one there is) with owner visibility.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from typing import Annotated, Any

import typer

from mailgate.commands import common
from mailgate.commands.common import JsonFlag, emit, err
from mailgate.domain.keys import Principal

app = typer.Typer(no_args_is_help=True)

WorkspaceOption = Annotated[str | None, typer.Option(help="Workspace id or name.")]


def _owner(workspace_id: str) -> Principal:
    return Principal(workspace_id=workspace_id, key_id="cli", kind="owner")


@app.command("list")
def captured_list(
    workspace: WorkspaceOption = None,
    agent: Annotated[str | None, typer.Option(help="Only this agent's mail (agent id).")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100)] = 20,
    as_json: JsonFlag = False,
) -> None:
    """Captured messages, newest first."""
    with common.runtime(as_json) as runtime:
        ws = runtime.tenancy.resolve_workspace(workspace)
        page = runtime.captured.list(_owner(ws), agent_id=agent, limit=limit)
        items: list[dict[str, Any]] = [
            {**asdict(m), "recipients": list(m.recipients), "created_at": m.created_at.isoformat()}
            for m in page.items
        ]

        def show() -> None:
            from rich.table import Table

            table = Table("id", "from", "to", "subject", "size", "at")
            for m in page.items:
                table.add_row(
                    m.captured_id,
                    m.mail_from,
                    ", ".join(m.recipients),
                    m.subject,
                    str(m.size),
                    m.created_at.isoformat(timespec="seconds"),
                )
            err.print(table)

        emit(as_json, {"captured": items, "next_cursor": page.next_cursor}, show)


@app.command("show")
def captured_show(captured_id: str, workspace: WorkspaceOption = None) -> None:
    """Print one captured message's raw bytes (exactly what would have been sent)."""
    with common.runtime(False) as runtime:
        ws = runtime.tenancy.resolve_workspace(workspace)
        raw = runtime.captured.get_raw(_owner(ws), captured_id)
    sys.stdout.buffer.write(raw)
