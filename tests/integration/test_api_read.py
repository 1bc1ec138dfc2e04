"""The read side of the native API over HTTP: messages, threads, raw bytes, attachments,
auth, validation, problem responses and the probes, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest
from sqlalchemy import text

from mailgate.api.app import create_app
from mailgate.clock import FakeClock
from mailgate.config import Settings, load_settings
from mailgate.runtime import Runtime
from tests.conftest import AgentHandle, make_agent
from tests.integration.api_support import (
    all_routes,
    api_client,
    auth,
    deliver,
    problem_code,
    route_table,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def clocked(settings: Settings, clock: FakeClock) -> Iterator[Runtime]:
    """A runtime whose time moves only when the test says so."""
    rt = Runtime.build(settings, clock=clock)
    yield rt
    rt.close()


# -- listing ----------------------------------------------------------------------------


async def test_messages_list_newest_first_and_the_pages_walk_every_message_once(
    runtime: Runtime, agent: AgentHandle
) -> None:
    stored = [deliver(runtime, agent, subject=f"n{i}") for i in range(7)]
    seen: list[str] = []
    pages = 0
    cursor: str | None = None
    async with api_client(runtime) as client:
        while True:
            params: dict[str, str | int] = {"limit": 3}
            if cursor:
                params["cursor"] = cursor
            response = await client.get(
                "/v1/messages", params=params, headers=auth(agent.agent_key)
            )
            assert response.status_code == 200
            body = response.json()
            seen += [m["message_id"] for m in body["messages"]]
            pages += 1
            cursor = body["next_cursor"]
            if cursor is None:
                break
    assert pages == 3
    assert seen == [s.message_id for s in reversed(stored)]


async def test_an_exact_last_page_has_no_next_cursor(runtime: Runtime, agent: AgentHandle) -> None:
    for i in range(2):
        deliver(runtime, agent, subject=f"n{i}")
    async with api_client(runtime) as client:
        response = await client.get(
            "/v1/messages", params={"limit": 2}, headers=auth(agent.agent_key)
        )
    assert len(response.json()["messages"]) == 2
    assert response.json()["next_cursor"] is None


async def test_the_from_filter_matches_the_sender_address_exactly_and_ignoring_case(
    runtime: Runtime, agent: AgentHandle
) -> None:
    bob = deliver(runtime, agent, sender="Bob <Bob_Smith@Example.COM>")
    deliver(runtime, agent, sender="Bobx <bobxsmith@example.com>")  # "_" is no wildcard
    deliver(runtime, agent, sender="Rob <rob_smith@example.com.evil>")  # no substring match
    async with api_client(runtime) as client:
        response = await client.get(
            "/v1/messages",
            params={"from": "bob_smith@EXAMPLE.com"},
            headers=auth(agent.agent_key),
        )
    assert [m["message_id"] for m in response.json()["messages"]] == [bob.message_id]


async def test_the_folder_filter_narrows_the_listing(runtime: Runtime, agent: AgentHandle) -> None:
    inbox = deliver(runtime, agent)
    async with api_client(runtime) as client:
        headers = auth(agent.agent_key)
        found = await client.get("/v1/messages", params={"folder": "inbox"}, headers=headers)
        none = await client.get("/v1/messages", params={"folder": "trash"}, headers=headers)
        bad = await client.get("/v1/messages", params={"folder": "spam"}, headers=headers)
    assert [m["message_id"] for m in found.json()["messages"]] == [inbox.message_id]
    assert none.json()["messages"] == []
    assert problem_code(bad) == "validation_failed"
    assert [e["field"] for e in bad.json()["errors"]] == ["folder"]


async def test_the_thread_filter_lists_only_that_threads_messages(
    runtime: Runtime, agent: AgentHandle
) -> None:
    first = deliver(runtime, agent, subject="Invoice", message_id="inv-1@example.com")
    reply = deliver(runtime, agent, subject="Re: Invoice", in_reply_to="inv-1@example.com")
    deliver(runtime, agent, subject="Unrelated")
    assert reply.thread_id == first.thread_id
    async with api_client(runtime) as client:
        response = await client.get(
            "/v1/messages", params={"thread_id": first.thread_id}, headers=auth(agent.agent_key)
        )
    assert [m["message_id"] for m in response.json()["messages"]] == [
        reply.message_id,
        first.message_id,
    ]


async def test_the_since_filter_compares_arrival_times_in_utc(
    clocked: Runtime, clock: FakeClock
) -> None:
    agent = make_agent(clocked)
    deliver(clocked, agent, subject="early")  # 2026-01-01T00:00Z
    clock.advance(3600)
    late = deliver(clocked, agent, subject="late")  # 01:00Z
    headers = auth(agent.agent_key)
    async with api_client(clocked) as client:
        aware = await client.get(
            "/v1/messages", params={"since": "2026-01-01T00:30:00Z"}, headers=headers
        )
        naive = await client.get(
            "/v1/messages", params={"since": "2026-01-01T00:30:00"}, headers=headers
        )
        offset = await client.get(
            "/v1/messages", params={"since": "2026-01-01T00:30:00+01:00"}, headers=headers
        )
        bad = await client.get("/v1/messages", params={"since": "yesterday"}, headers=headers)
    assert [m["message_id"] for m in aware.json()["messages"]] == [late.message_id]
    assert naive.json() == aware.json()
    assert len(offset.json()["messages"]) == 2
    assert [e["field"] for e in bad.json()["errors"]] == ["since"]


async def test_an_owner_key_lists_the_whole_workspace_or_one_agent(
    runtime: Runtime, agent: AgentHandle
) -> None:
    other = runtime.tenancy.create_agent(agent.workspace_id, "sales bot")
    mine = deliver(runtime, agent)
    theirs = deliver(
        runtime,
        AgentHandle(
            agent.workspace_id, agent.owner_key, other.agent_id, other.address, other.api_key
        ),
    )
    async with api_client(runtime) as client:
        headers = auth(agent.owner_key)
        everything = await client.get("/v1/messages", headers=headers)
        one = await client.get("/v1/messages", params={"agent_id": other.agent_id}, headers=headers)
        as_agent = await client.get("/v1/messages", headers=auth(agent.agent_key))
    assert {m["message_id"] for m in everything.json()["messages"]} == {
        mine.message_id,
        theirs.message_id,
    }
    assert [m["message_id"] for m in one.json()["messages"]] == [theirs.message_id]
    assert [m["message_id"] for m in as_agent.json()["messages"]] == [mine.message_id]


# -- one message ------------------------------------------------------------------------


async def test_a_message_shows_its_parsed_fields_envelope_and_attachments(
    runtime: Runtime, agent: AgentHandle
) -> None:
    stored = deliver(
        runtime,
        agent,
        sender="Alice Example <alice@example.com>",
        cc="Carol <carol@example.com>",
        subject="Quarterly report",
        body="Numbers attached.\n",
        html="<p>Numbers attached.</p>",
        message_id="q3@example.com",
        in_reply_to="q2@example.com",
        references=["q1@example.com", "q2@example.com"],
        attachments=[("report.csv", "text/csv", b"a,b\n1,2\n")],
    )
    async with api_client(runtime) as client:
        response = await client.get(
            f"/v1/messages/{stored.message_id}", headers=auth(agent.agent_key)
        )
    assert response.status_code == 200
    body = response.json()
    assert body["message_id"] == stored.message_id
    assert body["agent_id"] == agent.agent_id
    assert body["thread_id"] == stored.thread_id
    assert (body["folder"], body["direction"]) == ("inbox", "inbound")
    assert body["from"] == {"name": "Alice Example", "address": "alice@example.com"}
    assert body["to"] == [{"name": None, "address": agent.address}]
    assert body["cc"] == [{"name": "Carol", "address": "carol@example.com"}]
    assert body["reply_to"] == []
    assert body["subject"] == "Quarterly report"
    assert body["date"] == "2026-01-02T03:04:05Z"
    assert body["rfc_message_id"] == "q3@example.com"
    assert body["message_id_generated"] is False
    assert body["in_reply_to"] == "q2@example.com"
    assert body["references"] == ["q1@example.com", "q2@example.com"]
    assert body["text"] == "Numbers attached.\n"
    assert "<p>Numbers attached.</p>" in body["html"]
    assert body["preview"].startswith("Numbers attached.")
    assert body["labels"] == ["unread"] and body["defects"] == []
    assert body["size"] > 0 and body["attachment_count"] == 1
    assert body["envelope"] == {
        "mail_from": "bounce@example.com",
        "rcpt_to": agent.address,
        "client_address": "192.0.2.7",
        "helo": "mx.example",
        "source": "smtp",
    }
    [attachment] = body["attachments"]
    assert attachment["attachment_id"].startswith("att_")
    assert attachment["filename"] == "report.csv"
    assert attachment["content_type"] == "text/csv"
    assert attachment["size"] == len(b"a,b\n1,2\n")
    assert attachment["disposition"] == "attachment"
    assert attachment["content_id"] is None


async def test_an_unknown_message_is_a_404_problem(runtime: Runtime, agent: AgentHandle) -> None:
    async with api_client(runtime) as client:
        response = await client.get("/v1/messages/msg_nope", headers=auth(agent.agent_key))
    assert response.status_code == 404
    assert problem_code(response) == "not_found"


async def test_the_raw_message_comes_back_byte_identical_as_message_rfc822(
    runtime: Runtime, agent: AgentHandle
) -> None:
    # Bytes a re-serialiser would change: 8-bit header, odd folding, trailing spaces.
    raw = (
        b"From: =?utf-8?q?Jos=C3=A9?= <jose@example.com>\r\n"
        b"To: " + agent.address.encode() + b"\r\n"
        b"Subject: caf\xe9 \r\n"
        b"X-Folded: one\r\n\t  two\r\n"
        b"Message-ID: <raw-1@example.com>\r\n"
        b"\r\n"
        b"body line with trailing space \r\n"
        b"\r\n"
    )
    stored = deliver(runtime, agent, raw=raw)
    async with api_client(runtime) as client:
        response = await client.get(
            f"/v1/messages/{stored.message_id}/raw", headers=auth(agent.agent_key)
        )
    assert response.status_code == 200
    assert response.content == raw
    assert response.headers["content-type"] == "message/rfc822"
    assert response.headers["x-content-type-options"] == "nosniff"


# -- attachments ------------------------------------------------------------------------


async def test_an_attachment_downloads_with_its_bytes_type_and_a_safe_disposition(
    runtime: Runtime, agent: AgentHandle
) -> None:
    data = b"%PDF-1.4\n\x00\xff binary"
    stored = deliver(
        runtime, agent, attachments=[('../../Résumé "final";.pdf', "application/pdf", data)]
    )
    async with api_client(runtime) as client:
        headers = auth(agent.agent_key)
        detail = (await client.get(f"/v1/messages/{stored.message_id}", headers=headers)).json()
        [info] = detail["attachments"]
        response = await client.get(
            f"/v1/messages/{stored.message_id}/attachments/{info['attachment_id']}",
            headers=headers,
        )
    assert response.status_code == 200
    assert response.content == data
    assert response.headers["content-type"] == "application/pdf"
    assert response.headers["x-content-type-options"] == "nosniff"
    disposition = response.headers["content-disposition"]
    assert disposition.startswith("attachment;")
    assert "\r" not in disposition and "\n" not in disposition
    encoded = disposition.split("filename*=UTF-8''", 1)[1]
    assert unquote(encoded) == 'Résumé "final";.pdf'  # path stripped, name kept
    assert disposition.split(";")[1].strip().isascii()


async def test_active_content_attachments_are_served_as_downloads_in_a_sandbox(
    runtime: Runtime, agent: AgentHandle
) -> None:
    stored = deliver(
        runtime, agent, attachments=[("page.html", "text/html", b"<script>alert(1)</script>")]
    )
    async with api_client(runtime) as client:
        headers = auth(agent.agent_key)
        detail = (await client.get(f"/v1/messages/{stored.message_id}", headers=headers)).json()
        attachment_id = detail["attachments"][0]["attachment_id"]
        response = await client.get(
            f"/v1/messages/{stored.message_id}/attachments/{attachment_id}", headers=headers
        )
    assert response.content == b"<script>alert(1)</script>"
    assert response.headers["content-type"] == "text/html"  # no charset guessed for it
    assert response.headers["content-disposition"].startswith("attachment;")
    assert "sandbox" in response.headers["content-security-policy"]


async def test_an_attachment_asked_for_under_another_message_is_not_found(
    runtime: Runtime, agent: AgentHandle
) -> None:
    with_file = deliver(runtime, agent, attachments=[("a.txt", "text/plain", b"a")])
    without = deliver(runtime, agent)
    async with api_client(runtime) as client:
        headers = auth(agent.agent_key)
        detail = (await client.get(f"/v1/messages/{with_file.message_id}", headers=headers)).json()
        attachment_id = detail["attachments"][0]["attachment_id"]
        response = await client.get(
            f"/v1/messages/{without.message_id}/attachments/{attachment_id}", headers=headers
        )
    assert response.status_code == 404
    assert problem_code(response) == "not_found"


# -- threads ----------------------------------------------------------------------------


async def test_threads_list_by_latest_activity_and_show_their_messages_oldest_first(
    clocked: Runtime, clock: FakeClock
) -> None:
    agent = make_agent(clocked)
    first = deliver(clocked, agent, subject="Order 1", message_id="o1@example.com")
    clock.advance(60)
    other = deliver(clocked, agent, subject="Order 2", message_id="o2@example.com")
    clock.advance(60)
    reply = deliver(clocked, agent, subject="Re: Order 1", in_reply_to="o1@example.com")
    headers = auth(agent.agent_key)
    async with api_client(clocked) as client:
        listing = (await client.get("/v1/threads", headers=headers)).json()
        thread = (await client.get(f"/v1/threads/{first.thread_id}", headers=headers)).json()
    assert [t["thread_id"] for t in listing["threads"]] == [first.thread_id, other.thread_id]
    assert listing["next_cursor"] is None
    assert thread["thread_id"] == first.thread_id
    assert thread["agent_id"] == agent.agent_id
    assert thread["subject"] == "Order 1"
    assert thread["message_count"] == 2
    assert thread["participants"] == ["alice@example.com"]
    assert thread["first_message_at"] == "2026-01-01T00:00:00Z"
    assert thread["last_message_at"] == "2026-01-01T00:02:00Z"
    assert [m["message_id"] for m in thread["messages"]] == [first.message_id, reply.message_id]


async def test_thread_pages_break_ties_in_activity_time_without_repeats(
    clocked: Runtime,
) -> None:
    agent = make_agent(clocked)  # the clock never moves: every thread has the same time
    made = {deliver(clocked, agent, subject=f"topic {i}").thread_id for i in range(5)}
    seen: list[str] = []
    cursor: str | None = None
    async with api_client(clocked) as client:
        while True:
            params: dict[str, str | int] = {"limit": 2}
            if cursor:
                params["cursor"] = cursor
            body = (
                await client.get("/v1/threads", params=params, headers=auth(agent.agent_key))
            ).json()
            seen += [t["thread_id"] for t in body["threads"]]
            cursor = body["next_cursor"]
            if cursor is None:
                break
    assert len(seen) == len(set(seen)) == 5
    assert set(seen) == made
    assert seen == sorted(seen, reverse=True)


async def test_an_unknown_thread_is_a_404_problem(runtime: Runtime, agent: AgentHandle) -> None:
    async with api_client(runtime) as client:
        response = await client.get("/v1/threads/thr_nope", headers=auth(agent.agent_key))
    assert problem_code(response) == "not_found"


# -- auth -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        None,
        "Basic dXNlcjpwYXNz",
        "Bearer",
        "Bearer not-a-key",
        "Bearer mg_0000000000_secret",
    ],
    ids=["missing", "basic", "empty bearer", "malformed", "unknown key"],
)
async def test_a_missing_or_unknown_key_is_a_401_problem(
    runtime: Runtime, agent: AgentHandle, header: str | None
) -> None:
    headers = {"Authorization": header} if header else {}
    async with api_client(runtime) as client:
        response = await client.get("/v1/messages", headers=headers)
    assert response.status_code == 401
    assert problem_code(response) == "invalid_api_key"
    assert response.headers["www-authenticate"] == "Bearer"


async def test_a_right_key_id_with_a_wrong_secret_is_a_401_problem(
    runtime: Runtime, agent: AgentHandle
) -> None:
    forged = agent.agent_key[:-4] + ("AAAA" if not agent.agent_key.endswith("AAAA") else "BBBB")
    async with api_client(runtime) as client:
        response = await client.get("/v1/messages", headers=auth(forged))
    assert problem_code(response) == "invalid_api_key"


async def test_a_revoked_key_is_refused_on_its_next_request(
    runtime: Runtime, agent: AgentHandle
) -> None:
    key = runtime.tenancy.create_key(agent.workspace_id, agent_id=agent.agent_id)
    async with api_client(runtime) as client:
        before = await client.get("/v1/messages", headers=auth(key.api_key))
        runtime.tenancy.revoke_key(key.key_id)
        after = await client.get("/v1/messages", headers=auth(key.api_key))
    assert before.status_code == 200
    assert after.status_code == 401
    assert problem_code(after) == "invalid_api_key"


async def test_a_key_without_the_messages_read_scope_is_a_403_problem(
    runtime: Runtime, agent: AgentHandle
) -> None:
    stored = deliver(runtime, agent, attachments=[("a.txt", "text/plain", b"a")])
    key = runtime.tenancy.create_key(
        agent.workspace_id, agent_id=agent.agent_id, scopes=("events:read",)
    )
    paths = [
        "/v1/messages",
        f"/v1/messages/{stored.message_id}",
        f"/v1/messages/{stored.message_id}/raw",
        "/v1/threads",
        f"/v1/threads/{stored.thread_id}",
    ]
    async with api_client(runtime) as client:
        for path in paths:
            response = await client.get(path, headers=auth(key.api_key))
            assert response.status_code == 403, path
            assert problem_code(response) == "missing_scope"
            assert response.json()["scope"] == "messages:read"


# -- validation and other problems ------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "params", "field"),
    [
        ("/v1/messages", {"limit": "0"}, "limit"),
        ("/v1/messages", {"limit": "101"}, "limit"),
        ("/v1/messages", {"limit": "ten"}, "limit"),
        ("/v1/messages", {"cursor": "not base64 at all!"}, "cursor"),
        ("/v1/messages", {"cursor": "dDoyMDI2"}, "cursor"),  # a thread cursor ("t:2026")
        ("/v1/threads", {"cursor": "bTox"}, "cursor"),  # a message cursor ("m:1")
        ("/v1/threads", {"limit": "0"}, "limit"),
    ],
)
async def test_a_malformed_query_value_is_a_422_problem_naming_the_field(
    runtime: Runtime, agent: AgentHandle, path: str, params: dict[str, str], field: str
) -> None:
    async with api_client(runtime) as client:
        response = await client.get(path, params=params, headers=auth(agent.agent_key))
    assert response.status_code == 422
    assert problem_code(response) == "validation_failed"
    assert [e["field"] for e in response.json()["errors"]] == [field]


async def test_unknown_routes_and_wrong_methods_answer_problems(
    runtime: Runtime, agent: AgentHandle
) -> None:
    async with api_client(runtime) as client:
        missing = await client.get("/v1/nothing-here", headers=auth(agent.agent_key))
        wrong = await client.delete("/v1/messages", headers=auth(agent.agent_key))
    assert missing.status_code == 404 and problem_code(missing) == "not_found"
    assert wrong.status_code == 405 and problem_code(wrong) == "method_not_allowed"


@pytest.mark.breaks_schema
async def test_an_unexpected_failure_is_a_500_problem_that_reveals_nothing(
    runtime: Runtime, agent: AgentHandle
) -> None:
    deliver(runtime, agent)
    with runtime.db.write() as conn:  # break the store under the app
        conn.execute(text("DROP TABLE attachments"))
    async with api_client(runtime, raise_app_exceptions=False) as client:
        response = await client.get("/v1/messages", headers=auth(agent.agent_key))
    assert response.status_code == 500
    assert problem_code(response) == "internal_error"
    body = response.text.lower()
    assert "attachments" not in body and "select" not in body and "traceback" not in body
    assert response.json()["reference"].startswith("err_")


# -- probes and the OpenAPI document ----------------------------------------------------


async def test_the_probes_report_a_live_and_ready_gateway(runtime: Runtime) -> None:
    async with api_client(runtime) as client:
        live = await client.get("/healthz")
        ready = await client.get("/readyz")
    assert (live.status_code, live.json()) == (200, {"status": "ok"})
    assert (ready.status_code, ready.json()) == (200, {"status": "ok"})


async def test_readiness_fails_with_a_503_problem_on_an_unmigrated_database(
    tmp_path: Path,
) -> None:
    settings = load_settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'empty.db'}")
    runtime = Runtime.build(settings)
    try:
        async with api_client(runtime) as client:
            live = await client.get("/healthz")
            ready = await client.get("/readyz")
    finally:
        runtime.close()
    assert live.status_code == 200
    assert ready.status_code == 503
    assert problem_code(ready) == "database_not_migrated"


async def test_readiness_fails_with_a_503_problem_when_the_database_is_unreachable(
    tmp_path: Path,
) -> None:
    url = "postgresql+psycopg://someone:hunter2@127.0.0.1:1/nowhere?connect_timeout=2"
    runtime = Runtime.build(load_settings(data_dir=tmp_path, database_url=url))
    try:
        async with api_client(runtime) as client:
            ready = await client.get("/readyz")
    finally:
        runtime.close()
    assert ready.status_code == 503
    assert problem_code(ready) == "unavailable"
    assert "hunter2" not in ready.text and "someone" not in ready.text


def test_the_openapi_document_lists_every_route_with_its_responses(runtime: Runtime) -> None:
    app = create_app(runtime)
    document = app.openapi()
    documented = {
        (method.upper(), path)
        for path, operations in document["paths"].items()
        for method in operations
    }
    hidden = {  # deliberately undocumented: the /v0 catch-all, 501 placeholders
        (method, route.path)
        for route in all_routes(app)
        if getattr(route, "include_in_schema", True) is False
        for method in getattr(route, "methods", None) or ()
    }
    served = {
        r
        for r in route_table(app)
        if not r[1].startswith(("/docs", "/redoc", "/openapi")) and r not in hidden
    }
    assert served == documented
    for method, path in served:
        operation = document["paths"][path][method.lower()]
        responses = operation["responses"]
        if method == "DELETE" and "204" in responses:
            assert not responses["204"].get("content"), f"{method} {path}: 204 with a body"
        else:
            success = responses.get("201") or responses.get("200")
            assert success and success.get("content"), f"{method} {path}: no 2xx body"
        if path.startswith("/v1/"):
            assert {"401", "403", "404", "422"} <= operation["responses"].keys(), path
    assert "apiKey" in document["components"]["securitySchemes"]
    assert "Problem" in document["components"]["schemas"]
