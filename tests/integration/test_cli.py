"""The CLI contract scripts rely on: one JSON object on stdout with --json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mailgate.cli import app


@pytest.fixture
def cli_env(tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MAILGATE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("MAILGATE_DATABASE_URL", database_url)
    monkeypatch.setenv("MAILGATE_AGENT_DOMAIN", "agents.test")
    return tmp_path


def _json(*args: str) -> dict[str, object]:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, result.stdout
    payload = json.loads(lines[0])
    assert isinstance(payload, dict)
    return payload


def test_workspace_agent_and_key_commands_print_one_json_object(cli_env: Path) -> None:
    ws = _json("workspace", "create", "acme", "--json")
    assert str(ws["workspace_id"]).startswith("ws_")
    assert str(ws["owner_api_key"]).startswith("mg_")
    agent = _json("agent", "create", "Support Bot", "--workspace", "acme", "--json")
    assert agent["address"] == "support-bot@agents.test"
    assert str(agent["agent_id"]).startswith("agt_") and str(agent["api_key"]).startswith("mg_")
    key = _json(
        "key", "create", "--workspace", str(ws["workspace_id"]), "--agent",
        str(agent["agent_id"]), "--scope", "events:read", "--json",
    )  # fmt: skip
    assert key["scopes"] == ["events:read"]
    revoked = _json("key", "revoke", str(key["key_id"]), "--json")
    assert revoked == {"key_id": key["key_id"], "revoked": True}


def test_errors_with_json_are_one_object_with_a_code_and_a_nonzero_exit(cli_env: Path) -> None:
    _json("workspace", "create", "acme", "--json")
    _json("agent", "create", "bot", "--json")
    result = CliRunner().invoke(app, ["agent", "create", "bot", "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["error"]["code"] == "conflict"


def test_agent_create_without_a_workspace_uses_a_default_one(cli_env: Path) -> None:
    agent = _json("agent", "create", "solo", "--json")
    assert agent["address"] == "solo@agents.test"


def test_config_show_masks_the_database_password(
    cli_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAILGATE_DATABASE_URL", "postgresql+psycopg://u:s3cret@db/x")
    shown = _json("config", "show", "--json")
    assert "s3cret" not in json.dumps(shown)
    assert shown["smtp_listen"] == "127.0.0.1:2525"


def test_commands_refuse_an_unmigrated_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAILGATE_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("MAILGATE_DATABASE_URL", raising=False)
    result = CliRunner().invoke(app, ["workspace", "create", "acme", "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["error"]["code"] == "database_not_migrated"
    migrated = _json("migrate", "--json")
    assert migrated["from_revision"] is None and migrated["revision"]
    assert _json("workspace", "create", "acme", "--json")["name"] == "acme"
