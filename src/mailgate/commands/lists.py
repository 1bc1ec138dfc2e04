"""Owner commands for outbound reach: ``mailgate lists ...`` and ``mailgate agent tier``.

Thin over :class:`~mailgate.services.outbound_admin.OutboundAdmin`, the service the API
uses. Changes act as the operator (audited as ``cli``); reads act as an owner of the
workspace concerned. An agent may be named by id or by name (``--workspace`` settles
a name several workspaces use); a workspace-wide entry goes to ``--workspace``, or to
the only workspace there is.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

import typer

from mailgate.commands import common
from mailgate.commands.common import JsonFlag, emit, err
from mailgate.domain.keys import Principal
from mailgate.domain.tiers import TIERS
from mailgate.runtime import Runtime
from mailgate.services.mailbox import Operator
from mailgate.services.outbound_admin import Entry, TierInfo

app = typer.Typer(
    no_args_is_help=True,
    help="Recipient allow/deny lists: allow admits recipients under tier "
    "allowlisted_domains; deny blocks them whatever the tier.",
)

OPERATOR = Operator("cli")

WorkspaceOption = Annotated[str | None, typer.Option("--workspace", help="Workspace id or name.")]
AgentOption = Annotated[str | None, typer.Option("--agent", help="Agent id or name.")]


@app.command("add")
def lists_add(
    list_name: Annotated[str, typer.Argument(metavar="LIST", help="allow or deny.")],
    value: Annotated[str, typer.Argument(help="An address or a domain.")],
    agent: AgentOption = None,
    workspace: WorkspaceOption = None,
    reason: Annotated[str | None, typer.Option("--reason", help="Why; kept on the entry.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Put an address or a domain on a list, for one agent (--agent) or the workspace."""
    with common.runtime(as_json) as runtime:
        ws_id, agent_id = _target(runtime, workspace, agent)
        entry = runtime.outbound_admin.add_entry(
            OPERATOR, list=list_name, value=value, agent_id=agent_id, workspace_id=ws_id,
            reason=reason,
        )  # fmt: skip
        emit(
            as_json,
            _entry_json(entry),
            lambda: err.print(
                f"{entry.entry_id}: {entry.kind} {entry.value} on the {entry.list} list "
                f"({'agent ' + entry.agent_id if entry.agent_id else 'workspace-wide'})",
                markup=False,
                soft_wrap=True,
            ),
        )


@app.command("list")
def lists_list(
    agent: Annotated[
        str | None, typer.Option("--agent", help="Only what applies to this agent.")
    ] = None,
    workspace: WorkspaceOption = None,
    list_name: Annotated[str | None, typer.Option("--list", help="allow or deny.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """List entries (workspace-wide first, then each agent's)."""
    with common.runtime(as_json) as runtime:
        ws_id, agent_id = _target(runtime, workspace, agent)
        found = runtime.outbound_admin.list_entries(
            _owner_of(ws_id), list=list_name, agent_id=agent_id
        )
        emit(as_json, {"entries": [_entry_json(e) for e in found]}, lambda: _print(found))


@app.command("remove")
def lists_remove(entry_id: str, as_json: JsonFlag = False) -> None:
    """Take an entry off its list."""
    with common.runtime(as_json) as runtime:
        entry = runtime.outbound_admin.remove_entry(OPERATOR, entry_id)
        emit(
            as_json,
            {**_entry_json(entry), "removed": True},
            lambda: err.print(
                f"removed {entry.entry_id} ({entry.list} {entry.value})", markup=False
            ),
        )


def agent_tier(
    agent: Annotated[str, typer.Argument(help="Agent id or name.")],
    tier: Annotated[
        str | None, typer.Argument(help=f"Set it: {', '.join(TIERS)}. Without: show it.")
    ] = None,
    reason: Annotated[str, typer.Option(help="Why, for the audit log.")] = "",
    workspace: WorkspaceOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Show an agent's outbound tier, or set it."""
    with common.runtime(as_json) as runtime:
        ws_id = runtime.tenancy.resolve_workspace(workspace) if workspace else None
        ws_id, agent_id = runtime.outbound_admin.resolve_agent(agent, workspace_id=ws_id)
        if tier is None:
            info = runtime.outbound_admin.get_tier(_owner_of(ws_id), agent_id)
        else:
            info = runtime.outbound_admin.set_tier(OPERATOR, agent_id, tier, reason=reason)
        emit(as_json, _tier_json(info), lambda: _print_tier(info, setting=tier is not None))


# -- helpers -------------------------------------------------------------------------------


def _target(runtime: Runtime, workspace: str | None, agent: str | None) -> tuple[str, str | None]:
    """``(workspace id, agent id or None)`` from the options.

    Raises:
        NotFound: no such workspace, or no such agent (in it).
        Conflict: no --workspace and several workspaces (or agents of that name) exist.
    """
    ws_id = runtime.tenancy.resolve_workspace(workspace) if workspace else None
    if agent is not None:
        return runtime.outbound_admin.resolve_agent(agent, workspace_id=ws_id)
    return ws_id or runtime.tenancy.resolve_workspace(None), None


def _owner_of(workspace_id: str) -> Principal:
    """An owner of the workspace, as the CLI reads on its behalf."""
    return Principal(workspace_id=workspace_id, key_id="cli", kind="owner")


def _entry_json(entry: Entry) -> dict[str, Any]:
    return {**dataclasses.asdict(entry), "scope": entry.scope}


def _tier_json(info: TierInfo) -> dict[str, Any]:
    return {**dataclasses.asdict(info), "tiers": list(TIERS)}


def _print(found: list[Entry]) -> None:
    if not found:
        err.print("no recipient list entries")
        return
    for e in found:
        owner = f"agent {e.agent_id}" if e.agent_id else "workspace"
        why = f"  {e.reason}" if e.reason else ""
        typer.echo(f"{e.entry_id}  {e.list:<5}  {e.kind:<7}  {e.value}  ({owner}){why}")


def _print_tier(info: TierInfo, *, setting: bool) -> None:
    if setting and not info.changed:
        err.print(
            f"agent {info.agent_id} ({info.name}) already at tier {info.tier}",
            markup=False,
            soft_wrap=True,
        )
    elif setting:
        err.print(
            f"agent {info.agent_id} ({info.name}) now at tier {info.tier}",
            markup=False,
            soft_wrap=True,
        )
    typer.echo(info.tier)
