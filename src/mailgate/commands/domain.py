"""``mailgate domain ...``: sending domains and the DNS records their DKIM keys need.

Thin over :class:`~mailgate.services.domains.DomainService`, acting as ``cli`` in the
audit log. ``add`` prints the records to publish (a table on stderr and zone-file lines on
stdout, or one JSON object with ``--json``); the private key never leaves the
database.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from mailgate.commands import common
from mailgate.commands.common import JsonFlag, emit
from mailgate.domain.signing import DnsRecord
from mailgate.services.domains import DEFAULT_SELECTOR, SendingDomain

app = typer.Typer(no_args_is_help=True, help="Sending domains and their DKIM keys.")

ACTOR = "cli"

DomainArg = Annotated[str, typer.Argument(help="The domain mail is sent from (example.com).")]


@app.command("add")
def domain_add(
    domain: DomainArg,
    selector: Annotated[
        str, typer.Option(help="DKIM selector: the DNS name is <selector>._domainkey.<domain>.")
    ] = DEFAULT_SELECTOR,
    as_json: JsonFlag = False,
) -> None:
    """Generate a DKIM key for a domain and print the DNS records to publish."""
    with common.runtime(as_json) as runtime:
        added = runtime.domains.add(domain, selector=selector, actor=ACTOR)
        emit(
            as_json,
            {**_domain_json(added.domain), "records": [_record_json(r) for r in added.records]},
            lambda: _print_records(added.domain.domain, added.records),
        )


@app.command("list")
def domain_list(as_json: JsonFlag = False) -> None:
    """List sending domains."""
    with common.runtime(as_json) as runtime:
        found = runtime.domains.list()
        emit(as_json, {"domains": [_domain_json(d) for d in found]}, lambda: _print_domains(found))


@app.command("records")
def domain_records(domain: DomainArg, as_json: JsonFlag = False) -> None:
    """Print the DNS records of a domain already added."""
    with common.runtime(as_json) as runtime:
        found = runtime.domains.get(domain)
        emit(
            as_json,
            {**_domain_json(found), "records": [_record_json(r) for r in found.records]},
            lambda: _print_records(found.domain, found.records),
        )


@app.command("remove")
def domain_remove(domain: DomainArg, as_json: JsonFlag = False) -> None:
    """Remove a domain and its key: its mail is no longer signed."""
    with common.runtime(as_json) as runtime:
        removed = runtime.domains.remove(domain, actor=ACTOR)
        emit(
            as_json,
            {"domain": removed, "removed": True},
            lambda: common.err.print(f"removed {removed}"),
        )


def _domain_json(found: SendingDomain) -> dict[str, Any]:
    return {
        "domain": found.domain,
        "selector": found.selector,
        "public_key": found.public_key_b64,
        "created_at": found.created_at.isoformat(),
    }


def _record_json(record: DnsRecord) -> dict[str, Any]:
    return dataclasses.asdict(record)


def _print_records(domain: str, records: list[DnsRecord]) -> None:
    """A table to read, then the records as zone-file lines to paste: a table would
    wrap the 400-character key, and a TXT string may hold 255 characters at most
    (RFC 1035 §3.3), so long values are split into several quoted strings."""
    table = Table("record", "type", title=f"DNS records for {domain}")
    table.add_column("name", overflow="fold")
    table.add_column("what for")
    for r in records:
        what, _, why = r.purpose.partition(": ")
        table.add_row(what, r.type, r.name, why)
    Console(stderr=True).print(table)
    for r in records:
        typer.echo(f"{r.name}. IN {r.type} {_txt_strings(r.value)}")


def _txt_strings(value: str) -> str:
    chunks = [value[i : i + 255] for i in range(0, len(value), 255)] or [""]
    return " ".join(f'"{chunk}"' for chunk in chunks)


def _print_domains(found: list[SendingDomain]) -> None:
    if not found:
        common.err.print("no sending domains")
        return
    table = Table("domain", "selector", "added")
    for d in found:
        table.add_row(d.domain, d.selector, d.created_at.isoformat(timespec="seconds"))
    Console().print(table)
