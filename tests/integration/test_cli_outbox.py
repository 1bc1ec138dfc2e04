"""``mailgate outbox ...``, ``mailgate agent tier``, ``mailgate lists ...`` and
``mailgate worker``: the owner's commands over the services the API uses, with
``--json`` printing exactly one object, against held requests made through the real
API (an outbound ``require_approval`` rule, then ``POST /v1/send``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from mailgate.cli import app
from mailgate.config import load_settings
from mailgate.domain import delivery as states
from mailgate.runtime import Runtime
from mailgate.services.mailbox import Operator
from mailgate.store.schema import audit_log, outbound
from tests.conftest import AgentHandle
from tests.integration.api_support import api_client, auth, wait_until
from tests.integration.outbound_support import send

MAILGATE = Path(sys.executable).parent / "mailgate"


@pytest.fixture
def cli_env(tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MAILGATE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("MAILGATE_DATABASE_URL", database_url)
    monkeypatch.setenv("MAILGATE_AGENT_DOMAIN", "agents.test")
    return tmp_path


@pytest.fixture
def gateway(cli_env: Path) -> Iterator[Runtime]:
    """The runtime a server would have on the CLI's database (to serve the API)."""
    runtime = Runtime.build(load_settings(), group_commit=False)
    yield runtime
    runtime.close()


@pytest.fixture
def bot(gateway: Runtime) -> AgentHandle:
    return create_agent("acme", "bot")


def create_agent(workspace: str, name: str, address: str | None = None) -> AgentHandle:
    ws = run_json("workspace", "create", workspace, "--json")
    agent = run_json(
        "agent", "create", name, "--workspace", workspace, "--address", address or name, "--json"
    )
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


async def require_approval(gateway: Runtime, bot: AgentHandle) -> None:
    """Open the agent's tier (CLI) and hold its mail to example.com for approval (API)."""
    run_json("agent", "tier", bot.agent_id, "open", "--json")
    rule = {
        "name": "external mail needs approval",
        "agent_id": bot.agent_id,
        "direction": "outbound",
        "action": "require_approval",
        "condition": {"field": "to", "match": "glob", "value": "*@example.com"},
    }
    async with api_client(gateway) as client:
        created = await client.post("/v1/rules", json=rule, headers=auth(bot.owner_key))
    assert created.status_code == 201, created.text


async def hold(gateway: Runtime, bot: AgentHandle, to: str = "carol@example.com") -> str:
    """A request held for approval, made through ``POST /v1/send``."""
    async with api_client(gateway) as client:
        response = await send(client, bot.agent_key, {"to": [to], "subject": "quote", "text": "x"})
    assert response.status_code == 201, response.text
    assert response.json()["status"] == states.PENDING_APPROVAL, response.text
    return str(response.json()["id"])


def actors(gateway: Runtime, outbound_id: str, action: str) -> list[str]:
    with gateway.db.read() as conn:
        return list(
            conn.execute(
                select(audit_log.c.actor).where(
                    audit_log.c.target_id == outbound_id, audit_log.c.action == action
                )
            ).scalars()
        )


# -- outbox -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_outbox_list_approve_and_show_round_trip(gateway: Runtime, bot: AgentHandle) -> None:
    await require_approval(gateway, bot)
    first, second = await hold(gateway, bot), await hold(gateway, bot, "dave@example.com")

    listed = run_json("outbox", "list", "--json")
    people = CliRunner().invoke(app, ["outbox", "list"])
    approved = run_json("outbox", "approve", first, "--comment", "looks fine", "--json")
    twice = run_json("outbox", "approve", first, "--json", exit_code=1)
    after = run_json("outbox", "list", "--workspace", "acme", "--json")
    shown = run_json("outbox", "show", first, "--json")
    shown_to_people = CliRunner().invoke(app, ["outbox", "show", first])

    assert [r["id"] for r in listed["requests"]] == [first, second]  # oldest first
    item = listed["requests"][0]
    assert item["agent_id"] == bot.agent_id and item["recipients"] == ["carol@example.com"]
    assert item["status"] == states.PENDING_APPROVAL and item["expires_at"]
    assert any("requires an owner's approval" in r for r in item["reasons"])
    assert approved["status"] == states.QUEUED
    assert twice["error"]["code"] == "already_decided"
    assert twice["error"]["state"] == states.QUEUED
    assert [r["id"] for r in after["requests"]] == [second]
    assert [(a["verdict"], a["actor"], a["comment"]) for a in shown["approvals"]] == [
        ("approved", "cli", "looks fine")
    ]
    assert shown["decision"]["action"] == "hold"
    assert {"step": "outbound_rules", "outcome": "hold"}.items() <= next(
        s for s in shown["decision"]["steps"] if s["step"] == "outbound_rules"
    ).items()
    assert actors(gateway, first, "outbound.approved") == ["cli"]
    assert people.exit_code == 0 and first in people.stdout and "carol@example.com" in people.stdout
    assert shown_to_people.exit_code == 0
    assert (
        "approved by cli" in shown_to_people.stdout and "outbound_rules" in shown_to_people.stdout
    )


@pytest.mark.anyio
async def test_outbox_reject_needs_a_comment_and_is_final(
    gateway: Runtime, bot: AgentHandle
) -> None:
    await require_approval(gateway, bot)
    held = await hold(gateway, bot)

    no_comment = CliRunner().invoke(app, ["outbox", "reject", held, "--json"])
    rejected = run_json("outbox", "reject", held, "--comment", "not to customers", "--json")
    approve_after = run_json("outbox", "approve", held, "--json", exit_code=1)

    assert no_comment.exit_code == 2  # a usage error: nothing was decided
    assert rejected["status"] == states.REJECTED
    assert rejected["approvals"][0]["comment"] == "not to customers"
    assert approve_after["error"]["code"] == "already_decided"
    assert run_json("outbox", "list", "--json") == {"requests": []}
    assert actors(gateway, held, "outbound.rejected") == ["cli"]


@pytest.mark.anyio
async def test_outbox_list_with_a_workspace_shows_only_its_requests(
    gateway: Runtime, bot: AgentHandle
) -> None:
    other = create_agent("globex", "helper")
    await require_approval(gateway, bot)
    await require_approval(gateway, other)
    ours, theirs = await hold(gateway, bot), await hold(gateway, other)

    acme = run_json("outbox", "list", "--workspace", "acme", "--json")
    globex = run_json("outbox", "list", "--workspace", "globex", "--json")
    every = run_json("outbox", "list", "--json")

    assert [r["id"] for r in acme["requests"]] == [ours]
    assert [r["id"] for r in globex["requests"]] == [theirs]
    assert [r["id"] for r in every["requests"]] == [ours, theirs]


def test_outbox_commands_on_an_unknown_request_are_not_found(gateway: Runtime) -> None:
    for command in ("show", "approve"):
        missing = run_json("outbox", command, "out_nope", "--json", exit_code=1)
        assert missing["error"]["code"] == "not_found"
    missing = run_json("outbox", "reject", "out_nope", "--comment", "x", "--json", exit_code=1)
    assert missing["error"]["code"] == "not_found"


def test_outbox_list_without_json_prints_a_table(gateway: Runtime, bot: AgentHandle) -> None:
    result = CliRunner().invoke(app, ["outbox", "list"])
    assert result.exit_code == 0, result.output
    assert "no held outbound mail" in result.output


# -- agent tier ---------------------------------------------------------------------------


def test_agent_tier_shows_and_sets_by_id_or_name_and_audits_the_change(
    gateway: Runtime, bot: AgentHandle
) -> None:
    shown = run_json("agent", "tier", "bot", "--json")
    changed = run_json("agent", "tier", "bot", "known_contacts", "--reason", "pilot", "--json")
    same = run_json("agent", "tier", bot.agent_id, "known_contacts", "--json")
    bad = run_json("agent", "tier", "bot", "everyone", "--json", exit_code=1)
    missing = run_json("agent", "tier", "nobody", "--json", exit_code=1)

    assert (shown["agent_id"], shown["tier"], shown["changed"]) == (
        bot.agent_id,
        "reply_only",
        False,
    )
    assert shown["tiers"][0] == "reply_only" and shown["tiers"][-1] == "open"
    assert (changed["tier"], changed["changed"]) == ("known_contacts", True)
    assert (same["tier"], same["changed"]) == ("known_contacts", False)
    assert bad["error"]["code"] == "validation_failed"
    assert [e["field"] for e in bad["error"]["errors"]] == ["tier"]
    assert missing["error"]["code"] == "not_found"
    with gateway.db.read() as conn:
        rows = conn.execute(
            select(audit_log.c.actor, audit_log.c.detail).where(
                audit_log.c.action == "agent.tier_changed"
            )
        ).all()
    assert [(r.actor, r.detail) for r in rows] == [
        ("cli", {"from": "reply_only", "to": "known_contacts", "reason": "pilot"})
    ]


def test_agent_tier_asks_for_a_workspace_when_a_name_is_ambiguous(
    gateway: Runtime, bot: AgentHandle
) -> None:
    twin = create_agent("globex", "bot", address="globex-bot")

    ambiguous = run_json("agent", "tier", "bot", "--json", exit_code=1)
    named = run_json("agent", "tier", "bot", "open", "--workspace", "globex", "--json")

    assert ambiguous["error"]["code"] == "conflict"
    assert named["agent_id"] == twin.agent_id and named["tier"] == "open"
    assert run_json("agent", "tier", bot.agent_id, "--json")["tier"] == "reply_only"


# -- lists --------------------------------------------------------------------------------


def test_lists_add_list_and_remove(gateway: Runtime, bot: AgentHandle) -> None:
    allow = run_json("lists", "add", "allow", "Partner.Example", "--agent", "bot", "--json")
    deny = run_json("lists", "add", "deny", "spam@bad.example", "--reason", "phishing", "--json")
    twice = run_json("lists", "add", "deny", "SPAM@bad.example", "--json", exit_code=1)
    bad = run_json("lists", "add", "deny", "not a domain", "--json", exit_code=1)
    listed = run_json("lists", "list", "--json")
    for_bot = run_json("lists", "list", "--agent", bot.agent_id, "--list", "allow", "--json")
    removed = run_json("lists", "remove", deny["entry_id"], "--json")
    gone = run_json("lists", "remove", deny["entry_id"], "--json", exit_code=1)

    assert (allow["list"], allow["kind"], allow["value"]) == ("allow", "domain", "partner.example")
    assert (allow["agent_id"], allow["scope"]) == (bot.agent_id, "agent")
    assert (deny["kind"], deny["scope"], deny["workspace_id"], deny["reason"]) == (
        "address",
        "workspace",
        bot.workspace_id,
        "phishing",
    )
    assert twice["error"]["code"] == "conflict"
    assert bad["error"]["code"] == "validation_failed"
    assert [e["entry_id"] for e in listed["entries"]] == [deny["entry_id"], allow["entry_id"]]
    assert [e["entry_id"] for e in for_bot["entries"]] == [allow["entry_id"]]
    assert removed["removed"] is True and removed["entry_id"] == deny["entry_id"]
    assert gone["error"]["code"] == "not_found"
    with gateway.db.read() as conn:
        logged = conn.execute(
            select(audit_log.c.action, audit_log.c.actor).where(
                audit_log.c.target_type == "recipient_list"
            )
        ).all()
    assert sorted(logged) == [
        ("recipient_list.added", "cli"),
        ("recipient_list.added", "cli"),
        ("recipient_list.removed", "cli"),
    ]


# -- mailgate worker ----------------------------------------------------------------------


class Worker:
    """``mailgate worker`` as a child process, its stderr read by a thread so that the
    test can wait (bounded) for the ready line."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.process = subprocess.Popen(
            [str(MAILGATE), "worker", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            if line.startswith("mailgate worker ready:"):
                self.ready.set()
        self.ready.set()  # the process ended: stop waiting either way

    def wait_ready(self, timeout: float = 8.0) -> str:
        assert self.ready.wait(timeout), "".join(self.lines)
        ready = [line for line in self.lines if line.startswith("mailgate worker ready:")]
        assert ready, f"worker exited early ({self.process.poll()}): {''.join(self.lines)}"
        return ready[0]

    def stop(self, timeout: float = 8.0) -> int:
        """SIGTERM (unless it already ended), then its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = 8.0) -> int:
        """Its exit code; killed if it is still running after ``timeout``."""
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self._reader.join(timeout)
            assert self.process.stderr is not None
            self.process.stderr.close()


@pytest.fixture
def worker_env(tmp_path: Path, sqlite_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "MAILGATE_DATA_DIR": str(tmp_path),
        "MAILGATE_DATABASE_URL": sqlite_url,
        "MAILGATE_TRANSPORT": "capture",
        "MAILGATE_DELIVERY_POLL_SECONDS": "0.1",
        "MAILGATE_SENDER_AUTH": "false",
    }


def test_the_worker_announces_itself_and_stops_cleanly_on_sigterm(
    worker_env: dict[str, str],
) -> None:
    worker = Worker(worker_env, "--migrate")
    try:
        line = worker.wait_ready()
    finally:
        code = worker.stop()

    assert "transport=capture" in line
    assert code == 0, "".join(worker.lines)


def test_a_worker_with_no_delivery_slots_refuses_to_start(worker_env: dict[str, str]) -> None:
    worker = Worker({**worker_env, "MAILGATE_DELIVERY_WORKERS": "0"})
    code = worker.wait()
    assert code == 1
    assert "invalid_config" in "".join(worker.lines)


@pytest.mark.anyio
async def test_a_worker_process_delivers_what_another_process_queued(
    worker_env: dict[str, str], tmp_path: Path, sqlite_url: str
) -> None:
    runtime = Runtime.build(load_settings(data_dir=tmp_path, database_url=sqlite_url))
    worker = Worker(worker_env)
    try:
        await anyio.to_thread.run_sync(worker.wait_ready)
        agent = runtime.tenancy.create_workspace("acme")
        created = runtime.tenancy.create_agent(agent.workspace_id, "bot")
        runtime.outbound_admin.set_tier(Operator(), created.agent_id, "open", reason="worker test")
        async with api_client(runtime) as client:
            response = await send(
                client, created.api_key, {"to": ["erin@example.com"], "text": "hi"}
            )
        assert response.status_code == 201, response.text
        outbound_id = response.json()["id"]

        def done() -> bool:
            with runtime.db.read() as conn:
                state = conn.execute(
                    select(outbound.c.state).where(outbound.c.id == outbound_id)
                ).scalar_one()
            return state in states.FINAL_STATES or state == states.SENT

        await wait_until(done, timeout=8)
        code = await anyio.to_thread.run_sync(worker.stop)
        detail = runtime.outbound.get_as_system(outbound_id)
    finally:
        await anyio.to_thread.run_sync(worker.stop)
        runtime.close()
    assert code == 0, "".join(worker.lines)
    assert detail["status"] in (states.SENT, states.DELIVERED)
    assert [a["transport"] for a in detail["attempts"]] == ["capture"]
    assert detail["attempts"][0]["worker"] != runtime.delivery.worker_id  # the other process
