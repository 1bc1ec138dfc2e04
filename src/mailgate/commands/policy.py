"""Owner commands for rules and known contacts (filled in by the rules work)."""

from __future__ import annotations

import typer

rules_app = typer.Typer(no_args_is_help=True, help="Inbound and outbound rules.")
contacts_app = typer.Typer(no_args_is_help=True, help="Known contacts.")
