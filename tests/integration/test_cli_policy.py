"""``mailgate rules ...`` and ``mailgate contacts ...``: one JSON object with --json,
errors as ``{"error": {...}}`` with exit code 1, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from mailgate.cli import app
from mailgate.config import load_settings
from mailgate.runtime import Runtime
from mailgate.services.ingest import Envelope
from mailgate.store.schema import audit_log
from mailgate.testing import build_message

FROM_EXAMPLE = '{"field": "from_domain", "match": "is", "value": "example.com"}'


@pytest.fixture
def cli_env(tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MAILGATE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("MAILGATE_DATABASE_URL", database_url)
    monkeypatch.setenv("MAILGATE_AGENT_DOMAIN", "agents.test")
    return tmp_path


def run_json(*args: str) -> dict[str, Any]:
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, result.stdout
    payload = json.loads(lines[0])
    assert isinstance(payload, dict)
    return payload


def run_error(*args: str) -> dict[str, Any]:
    """The ``error`` object of a command that must fail."""
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 1, result.output
    error = json.loads(result.stdout)["error"]
    assert isinstance(error, dict)
    return error


@pytest.fixture
def bot(cli_env: Path) -> dict[str, Any]:
    run_json("workspace", "create", "acme")
    return run_json("agent", "create", "Support Bot", "--workspace", "acme")


def test_rules_add_and_list_print_one_json_object_each(bot: dict[str, Any]) -> None:
    agent_id = str(bot["agent_id"])
    mine = run_json(
        "rules", "add", "--agent", agent_id, "--action", "review", "--name", "example",
        "--condition", FROM_EXAMPLE,
    )  # fmt: skip
    assert mine["rule_id"].startswith("rul_")
    assert mine["agent_id"] == agent_id and mine["scope"] == "agent"
    assert mine["position"] == 0 and mine["enabled"] is True
    default = run_json(
        "rules", "add", "--workspace", "acme", "--action", "block", "--direction", "outbound",
        "--condition", FROM_EXAMPLE, "--disabled",
    )  # fmt: skip
    assert default["agent_id"] is None and default["scope"] == "workspace"
    assert default["enabled"] is False and default["direction"] == "outbound"
    first = run_json(
        "rules", "add", "--agent", agent_id, "--action", "trash", "--position", "0",
        "--condition", '{"field": "subject", "match": "contains", "value": "spam"}',
    )  # fmt: skip
    assert first["position"] == 0

    listed = run_json("rules", "list", "--agent", agent_id)
    assert [(r["rule_id"], r["position"]) for r in listed["rules"]] == [
        (first["rule_id"], 0),
        (mine["rule_id"], 1),
        (default["rule_id"], 0),
    ]
    everything = run_json("rules", "list", "--workspace", "acme")
    assert len(everything["rules"]) == 3


def test_rules_list_without_json_prints_a_table(bot: dict[str, Any]) -> None:
    run_json(
        "rules", "add", "--agent", str(bot["agent_id"]), "--action", "review",
        "--name", "from example", "--condition", FROM_EXAMPLE,
    )  # fmt: skip
    result = CliRunner().invoke(app, ["rules", "list"])
    assert result.exit_code == 0, result.output
    assert "from example" in result.stdout and "review" in result.stdout


@pytest.mark.parametrize(
    ("args", "code", "field"),
    [
        (["--condition", '{"field": "from"'], "bad_request", "condition"),
        (["--condition", '{"field": "subject", "match": "regex", "value": "(a)\\\\1"}'],
         "validation_failed", "condition.value"),
        (["--condition", '{"field": "colour", "match": "is", "value": "red"}'],
         "validation_failed", "condition.field"),
        (["--condition", FROM_EXAMPLE, "--position", "-1"], "validation_failed", "position"),
    ],
)  # fmt: skip
def test_rules_add_refuses_bad_input_with_a_code_and_the_field(
    bot: dict[str, Any], args: list[str], code: str, field: str
) -> None:
    error = run_error("rules", "add", "--agent", str(bot["agent_id"]), "--action", "trash", *args)
    assert error["code"] == code
    assert field in [e["field"] for e in error["errors"]]


def test_rules_add_needs_an_owner_and_a_real_agent(bot: dict[str, Any]) -> None:
    missing = run_error("rules", "add", "--action", "trash", "--condition", FROM_EXAMPLE)
    assert missing["code"] == "validation_failed"
    unknown = run_error(
        "rules", "add", "--agent", "agt_nope", "--action", "trash", "--condition", FROM_EXAMPLE
    )
    assert unknown["code"] == "not_found"
    run_json("workspace", "create", "other")
    elsewhere = run_error(
        "rules", "add", "--agent", str(bot["agent_id"]), "--workspace", "other",
        "--action", "trash", "--condition", FROM_EXAMPLE,
    )  # fmt: skip
    assert elsewhere["code"] == "not_found"


def test_rules_test_runs_a_message_file_and_a_stored_message_and_prints_the_trace(
    bot: dict[str, Any], cli_env: Path
) -> None:
    agent_id = str(bot["agent_id"])
    rule = run_json(
        "rules", "add", "--agent", agent_id, "--action", "quarantine", "--name", "example",
        "--condition", FROM_EXAMPLE,
    )  # fmt: skip
    raw = build_message(to=str(bot["address"]), sender="bob@example.com", subject="hi")
    eml = cli_env / "message.eml"
    eml.write_bytes(raw)

    from_file = run_json("rules", "test", "--agent", agent_id, "--file", str(eml))
    assert from_file["action"] == "quarantine" and from_file["rule_id"] == rule["rule_id"]
    assert from_file["trace"][0]["matched"] is True
    assert from_file["trace"][0]["conditions"][0]["path"] == "condition"

    runtime = Runtime.build(load_settings(), group_commit=False)
    try:
        recipient = runtime.tenancy.resolve_recipient(str(bot["address"]))
        assert recipient is not None
        [stored] = runtime.ingest.ingest(raw, Envelope(mail_from="bob@example.com"), [recipient])
    finally:
        runtime.close()
    from_store = run_json("rules", "test", "--message-id", stored.message_id)
    assert from_store["action"] == "quarantine"
    draft = run_json(
        "rules", "test", "--agent", agent_id, "--message-id", stored.message_id,
        "--rule", '{"name": "draft", "action": "trash", "condition": {"all": []}}',
    )  # fmt: skip
    assert draft["action"] == "trash" and draft["rule_id"] is None

    human = CliRunner().invoke(app, ["rules", "test", "--agent", agent_id, "--file", str(eml)])
    assert human.exit_code == 0, human.output
    assert "quarantine" in human.stdout and "from_domain is 'example.com'" in human.stdout


def test_rules_test_refuses_two_messages_or_a_missing_file(
    bot: dict[str, Any], cli_env: Path
) -> None:
    agent_id = str(bot["agent_id"])
    neither = run_error("rules", "test", "--agent", agent_id)
    assert neither["code"] == "validation_failed"
    missing = run_error("rules", "test", "--agent", agent_id, "--file", str(cli_env / "no.eml"))
    assert missing["code"] == "bad_request"
    assert missing["errors"][0]["field"] == "file"


def test_contacts_add_and_list_for_an_agent_and_the_workspace(bot: dict[str, Any]) -> None:
    agent_id = str(bot["agent_id"])
    bob = run_json(
        "contacts", "add", "--agent", agent_id, "--address", "Bob@Example.com", "--name", "Bob"
    )
    assert bob["value"] == "bob@example.com" and bob["kind"] == "address"
    assert bob["auto_approve"] is True and bob["agent_id"] == agent_id
    partner = run_json(
        "contacts", "add", "--workspace", "acme", "--domain", "partner.example",
        "--no-auto-approve",
    )  # fmt: skip
    assert partner["scope"] == "workspace" and partner["auto_approve"] is False

    listed = run_json("contacts", "list", "--agent", agent_id)
    assert [c["value"] for c in listed["contacts"]] == ["partner.example", "bob@example.com"]
    human = CliRunner().invoke(app, ["contacts", "list"])
    assert human.exit_code == 0 and "partner.example" in human.stdout


def test_contacts_add_refuses_duplicates_and_malformed_values(bot: dict[str, Any]) -> None:
    agent_id = str(bot["agent_id"])
    run_json("contacts", "add", "--agent", agent_id, "--address", "bob@example.com")
    dup = run_error("contacts", "add", "--agent", agent_id, "--address", "BOB@example.com")
    assert dup["code"] == "conflict"
    bad = run_error("contacts", "add", "--agent", agent_id, "--domain", "not a domain")
    assert bad["code"] == "validation_failed" and bad["errors"][0]["field"] == "domain"
    nowhere = run_error("contacts", "add", "--address", "x@example.com")
    assert nowhere["code"] == "validation_failed"


def test_cli_changes_are_audited_as_the_cli(bot: dict[str, Any]) -> None:
    agent_id = str(bot["agent_id"])
    run_json("rules", "add", "--agent", agent_id, "--action", "trash", "--condition", FROM_EXAMPLE)
    run_json("contacts", "add", "--agent", agent_id, "--address", "bob@example.com")
    runtime = Runtime.build(load_settings(), group_commit=False)
    try:
        with runtime.db.read() as conn:
            rows = conn.execute(
                select(audit_log.c.action, audit_log.c.actor).where(
                    audit_log.c.action.in_(["rule.created", "contact.created"])
                )
            ).all()
    finally:
        runtime.close()
    assert sorted((row.action, row.actor) for row in rows) == [
        ("contact.created", "cli"),
        ("rule.created", "cli"),
    ]
