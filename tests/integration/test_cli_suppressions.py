"""``mailgate suppressions list|add|remove``: the operator's commands over the same
service as the API, with ``--json`` printing exactly one object."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from mailgate.cli import app
from mailgate.runtime import Runtime
from tests.conftest import AgentHandle
from tests.integration.test_cli_mailbox import bot, cli_env, gateway, run_json
from tests.integration.test_feedback import audits, suppressed

__all__ = ["bot", "cli_env", "gateway"]  # fixtures shared with the mailbox commands


def test_add_list_and_remove_print_the_apis_shapes(gateway: Runtime, bot: AgentHandle) -> None:
    added = run_json("suppressions", "add", "Bob@Example.org", "--reason", "complaint",
                     "--detail", "reported by phone", "--json")  # fmt: skip
    run_json("suppressions", "add", "carol@example.org", "--workspace", "acme", "--json")
    listed = run_json("suppressions", "list", "--json")
    removed = run_json("suppressions", "remove", "bob@example.org", "--json")
    after = run_json("suppressions", "list", "--workspace", bot.workspace_id, "--json")

    assert (added["address"], added["reason"], added["source"], added["detail"]) == (
        "bob@example.org", "complaint", "cli", "reported by phone",
    )  # fmt: skip
    assert [s["address"] for s in listed["suppressions"]] == [
        "carol@example.org",
        "bob@example.org",
    ]
    assert listed["next_cursor"] is None
    assert removed["removed"]["address"] == "bob@example.org"
    assert [s["address"] for s in after["suppressions"]] == ["carol@example.org"]
    assert set(suppressed(gateway, bot.workspace_id)) == {"carol@example.org"}
    assert {a["_actor"] for a in audits(gateway, "suppression.added")} == {"cli"}


def test_list_pages_with_the_cursor_it_prints(gateway: Runtime, bot: AgentHandle) -> None:
    for i in range(3):
        run_json("suppressions", "add", f"p{i}@example.org", "--json")

    first = run_json("suppressions", "list", "--limit", "2", "--json")
    rest = run_json(
        "suppressions", "list", "--limit", "2", "--cursor", first["next_cursor"], "--json"
    )

    addresses = [s["address"] for s in first["suppressions"] + rest["suppressions"]]
    assert addresses == ["p2@example.org", "p1@example.org", "p0@example.org"]


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("add", "not-an-address"), "validation_failed"),
        (("add", "x@example.org", "--reason", "because"), "validation_failed"),
        (("remove", "nobody@example.org"), "not_found"),
        (("list", "--workspace", "no such workspace"), "not_found"),
    ],
)
def test_refusals_are_one_json_error_with_exit_code_1(
    gateway: Runtime, bot: AgentHandle, args: tuple[str, ...], code: str
) -> None:
    failed = run_json("suppressions", *args, "--json", exit_code=1)

    assert failed["error"]["code"] == code


def test_adding_an_address_twice_names_the_reason_it_has(
    gateway: Runtime, bot: AgentHandle
) -> None:
    run_json("suppressions", "add", "dup@example.org", "--reason", "unsubscribe", "--json")

    failed = run_json("suppressions", "add", "dup@example.org", "--json", exit_code=1)

    assert (failed["error"]["code"], failed["error"]["reason"]) == ("conflict", "unsubscribe")


def test_without_json_people_get_a_table_on_stdout(
    gateway: Runtime, bot: AgentHandle, cli_env: Path
) -> None:
    run_json("suppressions", "add", "table@example.org", "--json")

    result = CliRunner().invoke(app, ["suppressions", "list"])

    assert result.exit_code == 0, result.output
    assert "table@example.org" in result.stdout
    assert "manual" in result.stdout
