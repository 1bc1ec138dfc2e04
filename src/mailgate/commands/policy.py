"""Owner commands for rules and known contacts: ``mailgate rules ...``, ``mailgate contacts ...``.

Thin over :class:`~mailgate.services.rules_admin.RulesService`, the same service the
API uses, acting as ``cli`` in the audit log. An agent names its workspace, so
``--agent`` alone is enough; ``--workspace`` (id or name) picks the workspace's
defaults and workspace-wide contacts.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from mailgate.commands import common
from mailgate.commands.common import JsonFlag, emit
from mailgate.domain.rules import RuleDecision
from mailgate.errors import BadRequest, NotFound, ValidationFailed
from mailgate.runtime import Runtime
from mailgate.services.rules_admin import Contact, StoredRule

rules_app = typer.Typer(no_args_is_help=True, help="Inbound and outbound rules.")
contacts_app = typer.Typer(no_args_is_help=True, help="Known contacts.")

ACTOR = "cli"

WorkspaceOpt = Annotated[str | None, typer.Option("--workspace", help="Workspace id or name.")]
AgentOpt = Annotated[str | None, typer.Option("--agent", help="Agent id.")]


# -- rules ------------------------------------------------------------------------------


@rules_app.command("list")
def rules_list(
    workspace: WorkspaceOpt = None,
    agent: Annotated[
        str | None, typer.Option("--agent", help="Only what applies to this agent.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """List rules in evaluation order (agents' own, then the workspace defaults)."""
    with common.runtime(as_json) as runtime:
        ws_id, agent_id = _owner(runtime, workspace, agent)
        found = runtime.rules.list_rules(ws_id, agent_id=agent_id)
        emit(as_json, {"rules": [_rule_json(r) for r in found]}, lambda: _print_rules(found))


@rules_app.command("add")
def rules_add(
    action: Annotated[
        str,
        typer.Option(
            help="deliver, review, trash, quarantine (inbound); "
            "deliver, require_approval, block (outbound)."
        ),
    ],
    condition: Annotated[
        str,
        typer.Option(
            help='Condition JSON, e.g. \'{"field": "from_domain", "match": "is", '
            '"value": "example.com"}\'.'
        ),
    ],
    agent: Annotated[str | None, typer.Option("--agent", help="The agent's rule.")] = None,
    workspace: Annotated[
        str | None, typer.Option("--workspace", help="A workspace default (id or name).")
    ] = None,
    name: Annotated[str, typer.Option(help="A label shown in decisions.")] = "",
    direction: Annotated[str, typer.Option(help="inbound or outbound.")] = "inbound",
    position: Annotated[
        int | None, typer.Option(help="Place in the owner's list (0 = first); default last.")
    ] = None,
    disabled: Annotated[bool, typer.Option("--disabled", help="Store it switched off.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Add a rule for an agent (--agent) or a workspace default (--workspace)."""
    with common.runtime(as_json) as runtime:
        ws_id, agent_id = _owner(runtime, workspace, agent, explicit=True)
        data: dict[str, Any] = {
            "name": name,
            "action": action,
            "direction": direction,
            "enabled": not disabled,
            "condition": _json_option("condition", condition),
            "position": position,
        }
        rule = runtime.rules.create_rule(ws_id, agent_id, data, actor=ACTOR)
        emit(
            as_json,
            _rule_json(rule),
            lambda: common.err.print(
                f"rule {rule.rule_id} added at position {rule.position} "
                f"({'agent ' + rule.agent_id if rule.agent_id else 'workspace default'})"
            ),
        )


@rules_app.command("test")
def rules_test(
    agent: Annotated[
        str | None,
        typer.Option("--agent", help="Whose rules; default the stored message's agent."),
    ] = None,
    message_id: Annotated[
        str | None, typer.Option("--message-id", help="A stored message.")
    ] = None,
    file: Annotated[
        Path | None, typer.Option("--file", help="A message file (.eml).", dir_okay=False)
    ] = None,
    rule: Annotated[
        str | None, typer.Option("--rule", help="An unsaved rule (JSON) to run first.")
    ] = None,
    workspace: WorkspaceOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Dry run: which rule would decide a message, and each condition's result."""
    with common.runtime(as_json) as runtime:
        ws_id, agent_id = _owner(runtime, workspace, agent)
        raw = None
        if file is not None:
            try:
                raw = file.read_bytes()
            except OSError as exc:
                raise BadRequest(
                    f"cannot read {file}: {exc.strerror}",
                    errors=[{"field": "file", "message": str(exc.strerror)}],
                ) from None
        extra = _json_option("rule", rule) if rule is not None else None
        decision = runtime.rules.test_rule(
            ws_id, agent_id=agent_id, message_id=message_id, raw=raw, rule=extra
        )
        emit(as_json, {"trace": [], **decision.as_dict()}, lambda: _print_decision(decision))


# -- contacts ---------------------------------------------------------------------------


@contacts_app.command("add")
def contacts_add(
    agent: Annotated[str | None, typer.Option("--agent", help="The agent's contact.")] = None,
    workspace: Annotated[
        str | None, typer.Option("--workspace", help="A workspace-wide contact (id or name).")
    ] = None,
    address: Annotated[str | None, typer.Option(help="One sender address.")] = None,
    domain: Annotated[
        str | None, typer.Option(help="Every address at exactly this domain.")
    ] = None,
    name: Annotated[str, typer.Option(help="Who this is.")] = "",
    auto_approve: Annotated[
        bool,
        typer.Option(
            "--auto-approve/--no-auto-approve",
            help="Let its authenticated mail skip the rules.",
        ),
    ] = True,
    as_json: JsonFlag = False,
) -> None:
    """Add a known sender for an agent (--agent) or the whole workspace (--workspace)."""
    with common.runtime(as_json) as runtime:
        ws_id, agent_id = _owner(runtime, workspace, agent, explicit=True)
        contact = runtime.rules.add_contact(
            ws_id,
            agent_id,
            address=address,
            domain=domain,
            name=name,
            auto_approve=auto_approve,
            actor=ACTOR,
        )
        emit(
            as_json,
            _contact_json(contact),
            lambda: common.err.print(f"contact {contact.contact_id} ({contact.value}) added"),
        )


@contacts_app.command("list")
def contacts_list(
    agent: Annotated[
        str | None, typer.Option("--agent", help="Only what applies to this agent.")
    ] = None,
    workspace: WorkspaceOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """List known contacts (the workspace's first, then each agent's)."""
    with common.runtime(as_json) as runtime:
        ws_id, agent_id = _owner(runtime, workspace, agent)
        found = runtime.rules.list_contacts(ws_id, agent_id=agent_id)
        emit(
            as_json,
            {"contacts": [_contact_json(c) for c in found]},
            lambda: _print_contacts(found),
        )


# -- helpers ----------------------------------------------------------------------------


def _owner(
    runtime: Runtime, workspace: str | None, agent: str | None, *, explicit: bool = False
) -> tuple[str, str | None]:
    """``(workspace id, agent id or None)`` from the options.

    ``explicit``: the command creates something, so a missing owner is an error rather
    than "the only workspace" (a forgotten --agent must not make a workspace default).

    Raises:
        ValidationFailed: ``explicit`` and neither option given.
        NotFound: no such agent (in the named workspace) or workspace.
    """
    if agent is not None:
        ws_id = runtime.rules.agent_workspace(agent)
        if workspace is not None and runtime.tenancy.resolve_workspace(workspace) != ws_id:
            raise NotFound(f"no agent {agent} in workspace {workspace!r}")
        return ws_id, agent
    if explicit and workspace is None:
        raise ValidationFailed(
            "say whose: --agent for an agent's, --workspace for the whole workspace",
            errors=[{"field": "agent", "message": "give --agent or --workspace"}],
        )
    return runtime.tenancy.resolve_workspace(workspace), None


def _json_option(option: str, text: str) -> Any:
    """Raises:
    BadRequest: ``text`` is not JSON (a 400-class error naming the option).
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        message = f"{exc.msg} (at character {exc.pos})"
        raise BadRequest(
            f"--{option} is not valid JSON: {message}",
            errors=[{"field": option, "message": message}],
        ) from None


def _rule_json(rule: StoredRule) -> dict[str, Any]:
    return {**dataclasses.asdict(rule), "scope": rule.scope}


def _contact_json(contact: Contact) -> dict[str, Any]:
    return {**dataclasses.asdict(contact), "scope": contact.scope}


def _print_rules(found: list[StoredRule]) -> None:
    """One line per rule, then its condition: rules are too wide for a table."""
    if not found:
        common.err.print("no rules")
        return
    for r in found:
        owner = f"agent {r.agent_id}" if r.agent_id else "workspace"
        state = "" if r.enabled else "  (disabled)"
        typer.echo(
            f"{owner}  #{r.position}  {r.rule_id}  {r.direction} -> {r.action}  {r.name!r}{state}"
        )
        typer.echo(f"    {json.dumps(r.condition)}")


def _print_contacts(found: list[Contact]) -> None:
    if not found:
        common.err.print("no contacts")
        return
    for c in found:
        owner = f"agent {c.agent_id}" if c.agent_id else "workspace"
        auto = "auto-approve" if c.auto_approve else "known only"
        typer.echo(f"{owner}  {c.contact_id}  {c.kind} {c.value}  {auto}  {c.name!r}")


def _print_decision(decision: RuleDecision) -> None:
    typer.echo(f"action: {decision.action}")
    if decision.rule_id or decision.rule_name:
        typer.echo(f"rule: {decision.rule_name or '-'} ({decision.rule_id or 'unsaved'})")
    for reason in decision.reasons:
        typer.echo(f"  {reason}")
    for trace in decision.trace:
        mark = "match   " if trace.matched else "no match"
        typer.echo(f"{mark} {trace.rule_name or 'unnamed'} ({trace.rule_id or 'unsaved'})")
        for c in trace.conditions:
            typer.echo(f"    {'✓' if c.result else '✗'} {c.path}: {c.description}")
