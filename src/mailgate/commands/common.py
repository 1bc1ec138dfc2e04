"""What every command shares: settings, a runtime per command, ``--json`` output.

With ``--json`` a command prints exactly one JSON object on stdout (errors too, as
``{"error": {...}}``, with exit code 1); without it, people get Rich output on stderr
and only secrets or data on stdout.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from mailgate.config import Settings, load_settings
from mailgate.errors import MailgateError
from mailgate.runtime import Runtime
from mailgate.store import migrate as migrations

err = Console(stderr=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]


class State:
    """Options of the top-level callback, read by every command."""

    config_file: Path | None = None


state = State()


def settings(**overrides: Any) -> Settings:
    return load_settings(state.config_file, **overrides)


def fail(exc: MailgateError, as_json: bool) -> NoReturn:
    if as_json:
        payload = {"error": {"code": exc.code, "detail": exc.detail, **exc.extra}}
        typer.echo(json.dumps(payload, default=str))
    else:
        err.print(f"[red]error[/red] ({exc.code}): {exc.detail}", soft_wrap=True)
    raise typer.Exit(1)


@contextmanager
def runtime(as_json: bool = False, *, check_migrated: bool = True) -> Iterator[Runtime]:
    """A runtime for one command; errors become a clean message and exit code 1."""
    built: Runtime | None = None
    try:
        built = Runtime.build(settings(), group_commit=False)
        if check_migrated:
            migrations.ensure_migrated(built.db)
        yield built
    except MailgateError as exc:
        fail(exc, as_json)
    finally:
        if built is not None:
            built.close()


def emit(as_json: bool, payload: dict[str, Any], human: Callable[[], None]) -> None:
    if as_json:
        typer.echo(json.dumps(payload, default=str))
    else:
        human()


def show_secret(what: str, label: str, secret: str) -> None:
    err.print(f"created {what}")
    err.print(f"{label} (shown once, store it now):")
    typer.echo(secret)
