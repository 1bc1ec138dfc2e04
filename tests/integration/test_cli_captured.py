"""``mailgate captured list|show`` and ``mailgate workspace owner-email``: what the
capture transport kept, from the CLI on the gateway's database."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mailgate.cli import app
from mailgate.config import load_settings
from mailgate.runtime import Runtime
from tests.integration.api_support import api_client
from tests.integration.outbound_support import drain, send

pytestmark = pytest.mark.anyio


@pytest.fixture
def gateway(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Runtime]:
    monkeypatch.setenv("MAILGATE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("MAILGATE_DATABASE_URL", database_url)
    runtime = Runtime.build(load_settings(), group_commit=False)
    yield runtime
    runtime.close()


def run_json(*args: str) -> Any:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


async def test_captured_mail_is_listed_and_shown_verbatim_and_owners_get_approval_mail(
    gateway: Runtime,
) -> None:
    run_json("workspace", "create", "acme", "--owner-email", "Boss@Example.org", "--json")
    agent = run_json("agent", "create", "bot", "--workspace", "acme", "--json")
    run_json("agent", "tier", agent["agent_id"], "open", "--json")
    async with api_client(gateway) as client:
        body = (
            await send(
                client,
                agent["api_key"],
                {"to": ["alice@example.com"], "subject": "Hello there", "text": "Hi."},
            )
        ).json()
    await drain(gateway)
    listed = run_json("captured", "list", "--json")["captured"]
    assert [(c["outbound_id"], c["subject"], c["recipients"]) for c in listed] == [
        (body["id"], "Hello there", ["alice@example.com"])
    ]
    shown = CliRunner().invoke(app, ["captured", "show", listed[0]["captured_id"]])
    assert shown.exit_code == 0
    assert f"Message-ID: <{body['rfc_message_id']}>" in shown.stdout
    changed = run_json("workspace", "owner-email", "owner@example.org", "--json")
    assert changed["email"] == "owner@example.org"
    bad = CliRunner().invoke(app, ["workspace", "owner-email", "not an address", "--json"])
    assert bad.exit_code == 1
    assert json.loads(bad.stdout)["error"]["code"] == "validation_failed"
