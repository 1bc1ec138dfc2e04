"""The agent's MCP tools, driven by the ``mcp`` package's own client.

Three ways in, all over the real services and database (SQLite and PostgreSQL):

* stdio: ``python -m mailgate.mcp`` spawned as a subprocess on the test's database
  with ``MAILGATE_API_KEY``, as Claude Desktop would start ``mailgate mcp``;
* streamable HTTP: ``/mcp`` on a real gateway (``serve`` in a thread) on loopback,
  with ``Authorization: Bearer``;
* in process (``Client(server)``), for the finer points of results and errors.

Errors are asserted by their stable ``code`` (first in the text, and in
``structuredContent.error``), never by message text.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from fastapi import FastAPI
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import CallToolResult
from sqlalchemy import func, select

from mailgate.config import Settings
from mailgate.errors import ValidationFailed
from mailgate.mcp.http import McpEndpoint, install
from mailgate.mcp.server import TOOL_NAMES, build_mcp_server, key_resolver
from mailgate.runtime import Runtime
from mailgate.services.search import MAX_QUERY_CHARS, SearchService
from mailgate.store.schema import captured
from mailgate.testing.gateway import RunningGateway, running_gateway
from tests.conftest import AgentHandle, make_agent
from tests.integration.api_support import auth, deliver, problem_code, wait_until
from tests.integration.outbound_support import count_outbound

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "test", "version": "0"},
    },
}
MCP_ACCEPT = {"Accept": "application/json, text/event-stream"}


# -- helpers ----------------------------------------------------------------------------


def ok(result: CallToolResult) -> dict[str, Any]:
    """The structured result of a call that must have succeeded."""
    assert not result.is_error, result.content
    assert result.structured_content is not None
    return dict(result.structured_content)


def error_code(result: CallToolResult) -> str:
    """The stable code of a failed call, checking the text leads with it too."""
    assert result.is_error, result.structured_content
    assert result.structured_content is not None
    code = str(result.structured_content["error"]["code"])
    text = result.content[0].text  # type: ignore[union-attr]
    assert text.startswith(f"{code}: "), text
    return code


def key() -> str:
    return str(uuid.uuid4())


def stdio_env(settings: Settings, api_key: str | None) -> dict[str, str]:
    env = {
        "MAILGATE_DATA_DIR": str(settings.data_dir),
        "MAILGATE_DATABASE_URL": settings.effective_database_url,
        "MAILGATE_SENDER_AUTH": "false",
    }
    if api_key is not None:
        env["MAILGATE_API_KEY"] = api_key
    return env


@asynccontextmanager
async def stdio_tools(
    settings: Settings, api_key: str, errlog: Path, *, mode: str = "auto"
) -> AsyncIterator[Client]:
    """An MCP client talking to ``python -m mailgate.mcp`` on the test's database."""
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "mailgate.mcp"], env=stdio_env(settings, api_key)
    )
    with errlog.open("w") as log:
        async with Client(stdio_client(params, errlog=log), mode=mode) as client:
            yield client


@asynccontextmanager
async def http_tools(url: str, api_key: str, *, mode: str = "auto") -> AsyncIterator[Client]:
    """An MCP client talking to ``<url>/mcp`` with the key as a bearer token."""
    async with httpx2.AsyncClient(headers=auth(api_key), timeout=30.0) as http:
        transport = streamable_http_client(f"{url}/mcp", http_client=http)
        async with Client(transport, mode=mode) as client:
            yield client


@pytest.fixture
def gateway(settings: Settings, runtime: Runtime) -> Iterator[RunningGateway]:
    """``mailgate serve`` in a thread on the test's (migrated) database."""
    with running_gateway(settings) as running:
        yield running


def second_agent(runtime: Runtime, first: AgentHandle, name: str = "billing bot") -> AgentHandle:
    """Another agent in ``first``'s workspace."""
    created = runtime.tenancy.create_agent(first.workspace_id, name)
    return AgentHandle(
        first.workspace_id, first.owner_key, created.agent_id, created.address, created.api_key
    )


def count_captured(runtime: Runtime) -> int:
    with runtime.db.read() as conn:
        return int(conn.execute(select(func.count()).select_from(captured)).scalar_one())


# -- stdio ------------------------------------------------------------------------------


async def test_stdio_tools_read_search_lease_and_ack_the_agents_mail(
    settings: Settings, runtime: Runtime, agent: AgentHandle, tmp_path: Path
) -> None:
    """The handshake-era protocol (what Claude Desktop speaks today), end to end."""
    stored = deliver(
        runtime, agent, subject="Quarterly invoice", body="Please pay 100% by Friday.\n"
    )
    async with stdio_tools(settings, agent.agent_key, tmp_path / "err.log", mode="legacy") as mcp:
        tools = await mcp.list_tools()
        assert {t.name for t in tools.tools} == set(TOOL_NAMES)

        threads = ok(await mcp.call_tool("list_threads", {}))
        assert [t["thread_id"] for t in threads["threads"]] == [stored.thread_id]

        message = ok(await mcp.call_tool("read_message", {"message_id": stored.message_id}))
        assert message["subject"] == "Quarterly invoice"
        assert message["from"]["address"] == "alice@example.com"
        assert message["text"] == "Please pay 100% by Friday.\n"
        assert "100%" in message["extracted_text"]
        assert message["attachments"] == []

        found = ok(await mcp.call_tool("search_messages", {"query": "PAY 100%"}))
        assert [m["message_id"] for m in found["messages"]] == [stored.message_id]

        events = ok(await mcp.call_tool("list_events", {"limit": 5}))["events"]
        assert [(e["type"], e["payload"]["message_id"]) for e in events] == [
            ("message.received", stored.message_id)
        ]
        acked = ok(await mcp.call_tool("ack_events", {"event_ids": [events[0]["event_id"]]}))
        assert acked["acked"] == [events[0]["event_id"]]
        assert ok(await mcp.call_tool("list_events", {}))["events"] == []


async def test_stdio_reply_is_idempotent_and_isolated_to_the_agent(
    settings: Settings, runtime: Runtime, agent: AgentHandle, tmp_path: Path
) -> None:
    """The current protocol (discover, no handshake), against the outbound gateway."""
    mine = deliver(runtime, agent, subject="Question")
    other = second_agent(runtime, agent)
    theirs = deliver(runtime, other, subject="Not yours")
    async with stdio_tools(settings, agent.agent_key, tmp_path / "err.log") as mcp:
        missing = await mcp.call_tool("reply", {"message_id": mine.message_id, "text": "Hi"})
        assert error_code(missing) == "idempotency_key_required"
        assert count_outbound(runtime) == 0

        args = {"message_id": mine.message_id, "text": "Answer", "idempotency_key": key()}
        first = ok(await mcp.call_tool("reply", args))
        again = ok(await mcp.call_tool("reply", args))
        assert first["replayed"] is False and again["replayed"] is True
        assert again["id"] == first["id"]
        assert first["decision"]["action"] in {"allow", "hold", "quarantine", "block"}
        assert count_outbound(runtime, kind="reply") == 1

        stolen = await mcp.call_tool("read_message", {"message_id": theirs.message_id})
        assert error_code(stolen) == "not_found"
        answer = {"message_id": theirs.message_id, "text": "x", "idempotency_key": key()}
        assert error_code(await mcp.call_tool("reply", answer)) == "not_found"


@pytest.mark.parametrize("which", ["missing", "owner"])
def test_stdio_refuses_to_start_without_an_agent_key(
    settings: Settings, runtime: Runtime, agent: AgentHandle, which: str
) -> None:
    api_key = agent.owner_key if which == "owner" else None
    done = subprocess.run(
        [sys.executable, "-m", "mailgate.mcp"],
        env={"PATH": "/usr/bin:/bin", **stdio_env(settings, api_key)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "invalid_api_key" in done.stderr.decode()
    assert done.stdout == b""  # stdout belongs to the protocol


# -- streamable HTTP on a running gateway ---------------------------------------------


async def test_http_refuses_missing_wrong_and_owner_keys_before_any_mcp_session(
    runtime: Runtime, agent: AgentHandle, gateway: RunningGateway
) -> None:
    revoked = runtime.tenancy.create_key(agent.workspace_id, agent_id=agent.agent_id)
    runtime.tenancy.revoke_key(revoked.key_id)
    refused = {
        "missing": {},
        "not bearer": {"Authorization": f"Basic {agent.agent_key}"},
        "unknown": auth("mg_nope_secret"),
        "revoked": auth(revoked.api_key),
        "owner": auth(agent.owner_key),
    }
    async with httpx.AsyncClient(base_url=gateway.http_url) as http:
        for name, headers in refused.items():
            response = await http.post("/mcp", json=INITIALIZE, headers={**MCP_ACCEPT, **headers})
            assert response.status_code == 401, name
            assert problem_code(response) == "invalid_api_key", name
            assert response.headers["www-authenticate"] == "Bearer"
            assert "mcp-session-id" not in response.headers
        admitted = await http.post(
            "/mcp", json=INITIALIZE, headers={**MCP_ACCEPT, **auth(agent.agent_key)}
        )
    assert admitted.status_code == 200
    assert admitted.json()["result"]["serverInfo"]["name"] == "mailgate"


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_http_serves_both_protocol_eras(
    runtime: Runtime, agent: AgentHandle, gateway: RunningGateway, mode: str
) -> None:
    stored = deliver(runtime, agent, subject="Over HTTP")
    async with http_tools(gateway.http_url, agent.agent_key, mode=mode) as mcp:
        tools = await mcp.list_tools()
        assert {t.name for t in tools.tools} == set(TOOL_NAMES)
        assert all(t.output_schema is not None for t in tools.tools)
        threads = ok(await mcp.call_tool("list_threads", {"limit": 5}))
    assert [t["thread_id"] for t in threads["threads"]] == [stored.thread_id]


async def test_http_tools_never_reach_another_agents_mail(
    runtime: Runtime, agent: AgentHandle, gateway: RunningGateway
) -> None:
    mine = deliver(runtime, agent, subject="Mine")
    neighbour = second_agent(runtime, agent)
    stranger = make_agent(runtime, "stranger bot", workspace="globex")
    others = [
        deliver(runtime, neighbour, subject="Neighbour zebra"),
        deliver(runtime, stranger, subject="Stranger zebra"),
    ]
    async with http_tools(gateway.http_url, neighbour.agent_key) as mcp:
        neighbour_events = ok(await mcp.call_tool("list_events", {}))["events"]
    assert len(neighbour_events) == 1

    async with http_tools(gateway.http_url, agent.agent_key) as mcp:
        for message in others:
            read = await mcp.call_tool("read_message", {"message_id": message.message_id})
            assert error_code(read) == "not_found"
        assert ok(await mcp.call_tool("search_messages", {"query": "zebra"}))["messages"] == []
        threads = ok(await mcp.call_tool("list_threads", {}))["threads"]
        assert [t["thread_id"] for t in threads] == [mine.thread_id]
        events = ok(await mcp.call_tool("list_events", {}))["events"]
        assert [e["payload"]["message_id"] for e in events] == [mine.message_id]
        foreign = [neighbour_events[0]["event_id"]]
        acked = ok(await mcp.call_tool("ack_events", {"event_ids": foreign}))
        assert acked["acked"] == [] and acked["not_found"] == foreign


async def test_http_reply_without_an_idempotency_key_is_refused_and_sends_nothing(
    runtime: Runtime, agent: AgentHandle, gateway: RunningGateway
) -> None:
    stored = deliver(runtime, agent)
    async with http_tools(gateway.http_url, agent.agent_key) as mcp:
        for blank in ({}, {"idempotency_key": ""}, {"idempotency_key": "  "}):
            args = {"message_id": stored.message_id, "text": "Hi", **blank}
            assert error_code(await mcp.call_tool("reply", args)) == "idempotency_key_required"
        to = {"to": ["bob@example.com"], "subject": "New", "text": "Hi"}
        assert error_code(await mcp.call_tool("send", to)) == "idempotency_key_required"
    assert count_outbound(runtime) == 0


async def test_http_replying_twice_with_one_key_sends_once(
    runtime: Runtime, agent: AgentHandle, gateway: RunningGateway
) -> None:
    stored = deliver(runtime, agent, subject="Order 42")
    args = {"message_id": stored.message_id, "text": "Shipped today.", "idempotency_key": key()}
    async with http_tools(gateway.http_url, agent.agent_key) as mcp:
        first = ok(await mcp.call_tool("reply", args))
        again = ok(await mcp.call_tool("reply", args))
        changed = await mcp.call_tool("reply", {**args, "text": "Something else."})
    assert first["status"] == "queued" and first["to"] == ["alice@example.com"]
    assert again == {**first, "replayed": True}
    assert error_code(changed) == "idempotency_key_reused"
    await wait_until(lambda: count_outbound(runtime, state="sent") == 1)
    assert count_outbound(runtime) == 1
    assert count_captured(runtime) == 1


# -- in process -------------------------------------------------------------------------


async def test_read_message_bounds_the_text_at_the_extraction_budget(
    settings: Settings, agent: AgentHandle
) -> None:
    runtime = Runtime.build(settings.model_copy(update={"extract_max_chars": 40}))
    try:
        stored = deliver(runtime, agent, body="word " * 100)
        server = build_mcp_server(runtime, key_resolver(runtime, agent.agent_key))
        async with Client(server) as mcp:
            message = ok(await mcp.call_tool("read_message", {"message_id": stored.message_id}))
    finally:
        runtime.close()
    assert message["text"] == ("word " * 8) and message["text_truncated"] is True
    assert len(message["extracted_text"]) <= 40 and message["extracted_truncated"] is True


async def test_tools_hold_the_key_to_its_scopes_and_its_revocation(
    runtime: Runtime, agent: AgentHandle
) -> None:
    read_only = runtime.tenancy.create_key(
        agent.workspace_id, agent_id=agent.agent_id, scopes=("messages:read",)
    )
    stored = deliver(runtime, agent)
    server = build_mcp_server(runtime, key_resolver(runtime, read_only.api_key))
    async with Client(server) as mcp:
        ok(await mcp.call_tool("read_message", {"message_id": stored.message_id}))
        args = {"message_id": stored.message_id, "text": "Hi", "idempotency_key": key()}
        assert error_code(await mcp.call_tool("reply", args)) == "missing_scope"
        assert error_code(await mcp.call_tool("list_events", {})) == "missing_scope"
        runtime.tenancy.revoke_key(read_only.key_id)
        assert error_code(await mcp.call_tool("list_threads", {})) == "invalid_api_key"
    assert count_outbound(runtime) == 0


async def test_bad_arguments_are_validation_errors_that_write_nothing(
    runtime: Runtime, agent: AgentHandle
) -> None:
    stored = deliver(runtime, agent)
    idem = {"idempotency_key": key()}
    server = build_mcp_server(runtime, key_resolver(runtime, agent.agent_key))
    async with Client(server) as mcp:
        bad: list[tuple[str, dict[str, Any]]] = [
            ("list_threads", {"limit": 0}),
            ("list_threads", {"cursor": "not-a-cursor"}),
            ("search_messages", {"query": " "}),
            ("list_events", {"lease_seconds": -1}),
            ("list_events", {"consumer": "no spaces allowed"}),
            ("read_message", {"message_id": stored.message_id + "x"}),
            ("send", {"to": "bob@x.example", "subject": "a\r\nBcc: x@y.z", "text": "x", **idem}),
        ]
        codes = [error_code(await mcp.call_tool(name, args)) for name, args in bad]
    assert codes == ["validation_failed"] * 5 + ["not_found", "header_injection"]
    assert count_outbound(runtime) == 0


async def test_the_endpoint_answers_503_while_its_lifespan_is_not_running(
    runtime: Runtime, agent: AgentHandle
) -> None:
    endpoint = McpEndpoint(runtime)
    transport = httpx.ASGITransport(app=endpoint)
    async with httpx.AsyncClient(transport=transport, base_url="http://mailgate.test") as http:
        response = await http.post(
            "/mcp", json=INITIALIZE, headers={**MCP_ACCEPT, **auth(agent.agent_key)}
        )
    assert response.status_code == 503
    assert problem_code(response) == "unavailable"


async def test_install_routes_mcp_and_keeps_the_apps_own_lifespan(
    runtime: Runtime, agent: AgentHandle
) -> None:
    started: list[str] = []

    @asynccontextmanager
    async def own(_app: FastAPI) -> AsyncIterator[None]:
        started.append("app")
        yield

    app = FastAPI(lifespan=own)
    install(app, runtime)
    request = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
    headers = {**MCP_ACCEPT, **auth(agent.agent_key), "MCP-Protocol-Version": "2025-06-18"}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://mailgate.test") as http:
        async with app.router.lifespan_context(app):
            assert started == ["app"]
            listed = await http.post("/mcp", json=request, headers=headers)
        after = await http.post("/mcp", json=request, headers=headers)
    assert listed.status_code == 200
    assert {t["name"] for t in listed.json()["result"]["tools"]} == set(TOOL_NAMES)
    assert after.status_code == 503


# -- the search query -------------------------------------------------------------------


def test_search_matches_percent_underscore_and_backslash_literally(
    runtime: Runtime, agent: AgentHandle
) -> None:
    subjects = ["Paid 100% up front", "Paid 1000 later", "file_a.txt", "fileXa.txt", "C:\\tmp"]
    stored = {s: deliver(runtime, agent, subject=s).message_id for s in subjects}
    principal = runtime.tenancy.authenticate(agent.agent_key)
    search = SearchService(runtime.db)

    def found(query: str) -> set[str]:
        return {m.subject for m in search.search(principal, query)}

    assert found("100%") == {"Paid 100% up front"}
    assert found("file_a") == {"file_a.txt"}
    assert found("\\") == {"C:\\tmp"}
    assert found("PAID") == {"Paid 100% up front", "Paid 1000 later"}
    assert found("alice@EXAMPLE") == set(subjects)  # the sender address
    assert found("hi there") == set(subjects)  # the text body
    newest_first = [m.message_id for m in search.search(principal, "paid", limit=1)]
    assert newest_first == [stored["Paid 1000 later"]]


def test_search_refuses_an_empty_or_overlong_query(runtime: Runtime, agent: AgentHandle) -> None:
    principal = runtime.tenancy.authenticate(agent.agent_key)
    search = SearchService(runtime.db)
    for query in ("", "   ", "x" * (MAX_QUERY_CHARS + 1)):
        with pytest.raises(ValidationFailed) as refused:
            search.search(principal, query)
        assert refused.value.code == "validation_failed"


EMBED = """
import logging, sys
from mailgate.api.app import create_app
from mailgate.config import load_settings
from mailgate.runtime import Runtime

runtime = Runtime.build(load_settings(data_dir=sys.argv[1]))
create_app(runtime)  # builds the MCP server
root = logging.getLogger()
print(len(root.handlers), logging.getLevelName(root.level))
runtime.close()
"""


def test_building_the_app_leaves_an_embedding_programs_logging_alone(tmp_path: Path) -> None:
    # The MCP SDK's server calls logging.basicConfig(INFO) when constructed; in a
    # program that has not configured logging yet that would take the root logger.
    done = subprocess.run(
        [sys.executable, "-c", EMBED, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "WARNING"]
