"""``mailgate review ...`` and ``mailgate trash ...``: owners' commands over the same
services as the API, with ``--json`` printing exactly one object."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from typer.testing import CliRunner

from mailgate.cli import app
from mailgate.config import load_settings
from mailgate.runtime import Runtime
from mailgate.store.schema import audit_log, messages
from tests.conftest import AgentHandle
from tests.integration.api_support import deliver
from tests.integration.test_mailbox import file_as


@pytest.fixture
def cli_env(tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MAILGATE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("MAILGATE_DATABASE_URL", database_url)
    monkeypatch.setenv("MAILGATE_AGENT_DOMAIN", "agents.test")
    return tmp_path


@pytest.fixture
def gateway(cli_env: Path) -> Iterator[Runtime]:
    """The runtime a server would have on the CLI's database (to deliver mail)."""
    runtime = Runtime.build(load_settings(), group_commit=False)
    yield runtime
    runtime.close()


@pytest.fixture
def bot(gateway: Runtime) -> AgentHandle:
    ws = run_json("workspace", "create", "acme", "--json")
    agent = run_json("agent", "create", "bot", "--workspace", "acme", "--json")
    return AgentHandle(
        str(ws["workspace_id"]),
        str(ws["owner_api_key"]),
        str(agent["agent_id"]),
        str(agent["address"]),
        str(agent["api_key"]),
    )


def run_json(*args: str, exit_code: int = 0) -> dict[str, Any]:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == exit_code, result.output
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, result.stdout
    payload = json.loads(lines[0])
    assert isinstance(payload, dict)
    return payload


def held(gateway: Runtime, bot: AgentHandle, folder: str = "review") -> str:
    stored = deliver(gateway, bot)
    file_as(gateway, stored.message_id, folder)
    return stored.message_id


def test_review_list_shows_held_mail_as_one_json_object(gateway: Runtime, bot: AgentHandle) -> None:
    deliver(gateway, bot)
    review, quarantine = held(gateway, bot), held(gateway, bot, "quarantine")

    both = run_json("review", "list", "--json")
    one = run_json("review", "list", "--workspace", "acme", "--agent", bot.agent_id, "--folder",
                   "quarantine", "--json")  # fmt: skip

    assert [m["message_id"] for m in both["messages"]] == [quarantine, review]
    assert both["messages"][0]["from"]["address"] == "alice@example.com"  # the API's shape
    assert both["next_cursor"] is None
    assert [m["message_id"] for m in one["messages"]] == [quarantine]


def test_review_release_delivers_and_is_audited_as_the_cli(
    gateway: Runtime, bot: AgentHandle
) -> None:
    message_id = held(gateway, bot)

    moved = run_json("review", "release", message_id, "--json")

    assert moved["transition"]["operation"] == "release"
    assert moved["transition"]["reached_agent"] is True
    assert moved["message"]["folder"] == "inbox"
    with gateway.db.read() as conn:
        actor = conn.execute(
            select(audit_log.c.actor).where(
                audit_log.c.target_id == message_id, audit_log.c.action == "message.released"
            )
        ).scalar_one()
    assert actor == "cli"


def test_review_trash_then_trash_list_and_restore(gateway: Runtime, bot: AgentHandle) -> None:
    message_id = held(gateway, bot)

    rejected = run_json("review", "trash", message_id, "--json")
    listing = run_json("trash", "list", "--json")
    restored = run_json("trash", "restore", message_id, "--json")

    assert rejected["transition"]["to_folder"] == "trash"
    assert [m["message_id"] for m in listing["messages"]] == [message_id]
    assert restored["transition"]["to_folder"] == "review"


def test_a_move_that_does_not_apply_is_one_error_object_with_its_code(
    gateway: Runtime, bot: AgentHandle
) -> None:
    delivered = deliver(gateway, bot)
    conflict = run_json("review", "release", delivered.message_id, "--json", exit_code=1)
    missing = run_json("trash", "restore", "msg_nope", "--json", exit_code=1)
    assert conflict["error"]["code"] == "invalid_folder_transition"
    assert missing["error"]["code"] == "not_found"


def test_trash_purge_deletes_expired_trash_and_reports_counts(
    gateway: Runtime, bot: AgentHandle
) -> None:
    expired, fresh = deliver(gateway, bot), deliver(gateway, bot)
    for stored in (expired, fresh):
        run_json("trash", "restore", stored.message_id, "--json", exit_code=1)  # not trashed
        gateway.mailbox.trash(gateway.tenancy.authenticate(bot.owner_key), stored.message_id)
    long_ago = datetime.now(UTC) - timedelta(days=31)
    with gateway.db.write() as conn:
        conn.execute(
            update(messages)
            .where(messages.c.id == expired.message_id)
            .values(folder_changed_at=long_ago)
        )

    counts = run_json("trash", "purge", "--json")

    assert counts["messages"] == 1
    assert run_json("trash", "list", "--json")["messages"][0]["message_id"] == fresh.message_id


def test_without_json_the_commands_print_for_people(gateway: Runtime, bot: AgentHandle) -> None:
    message_id = held(gateway, bot)
    runner = CliRunner()
    listing = runner.invoke(app, ["review", "list"])
    released = runner.invoke(app, ["review", "release", message_id])
    purged = runner.invoke(app, ["trash", "purge"])
    assert listing.exit_code == released.exit_code == purged.exit_code == 0
    assert message_id in listing.stdout
    assert "release" in released.stderr and "inbox" in released.stderr
    assert "purged 0 messages" in purged.stderr
