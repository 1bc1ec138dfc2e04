"""Owner commands for the review inbox and the trash (filled in by the mailbox work)."""

from __future__ import annotations

import typer

review_app = typer.Typer(no_args_is_help=True, help="Mail held for review.")
trash_app = typer.Typer(no_args_is_help=True, help="Trashed mail: list, restore, purge.")
