"""The event feed over HTTP: lease, ack, nack, extend, long-poll and dead letters, on
SQLite and PostgreSQL. Time is a fake clock, so leases expire when the test says."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from sqlalchemy import select

from mailgate.clock import FakeClock
from mailgate.config import load_settings
from mailgate.runtime import Runtime
from mailgate.store.schema import consumers
from mailgate.testing import build_message
from tests.conftest import AgentHandle, make_agent
from tests.integration.api_support import (
    ENVELOPE,
    api_client,
    auth,
    deliver,
    problem_code,
    wait_until,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def rt(tmp_path: Path, database_url: str, clock: FakeClock) -> Iterator[Runtime]:
    """Two deliveries before dead-lettering; the long-poll re-checks only every minute,
    so a prompt wake-up can only come from the commit notification."""
    settings = load_settings(
        data_dir=tmp_path,
        database_url=database_url,
        feed_max_deliveries=2,
        feed_poll_interval=60,
        feed_lease_seconds=30,
    )
    runtime = Runtime.build(settings, clock=clock)
    yield runtime
    runtime.close()


@pytest.fixture
def bot(rt: Runtime) -> AgentHandle:
    return make_agent(rt)


async def pull(client: httpx.AsyncClient, key: str, **params: Any) -> list[dict[str, Any]]:
    response = await client.get("/v1/events", params=params, headers=auth(key))
    assert response.status_code == 200, response.text
    events: list[dict[str, Any]] = response.json()["events"]
    return events


async def post(client: httpx.AsyncClient, key: str, action: str, **body: Any) -> dict[str, Any]:
    response = await client.post(f"/v1/events/{action}", json=body, headers=auth(key))
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def at(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


async def test_a_pulled_event_has_the_contract_shape_and_stays_hidden_while_leased(
    rt: Runtime, bot: AgentHandle, clock: FakeClock
) -> None:
    stored = deliver(rt, bot, subject="Hello there")
    async with api_client(rt) as client:
        [event] = await pull(client, bot.agent_key)
        hidden = await pull(client, bot.agent_key)
        clock.advance(31)
        [again] = await pull(client, bot.agent_key)
    assert set(event) == {
        "event_id",
        "type",
        "created_at",
        "agent_id",
        "thread_id",
        "delivery_count",
        "lease_expires_at",
        "payload",
    }
    assert event["event_id"].startswith("evt_")
    assert event["type"] == "message.received"
    assert event["agent_id"] == bot.agent_id
    assert event["thread_id"] == stored.thread_id
    assert event["delivery_count"] == 1
    assert at(event["lease_expires_at"]) - at(event["created_at"]) == timedelta(seconds=30)
    assert event["payload"]["message_id"] == stored.message_id
    assert event["payload"]["thread_id"] == stored.thread_id
    assert event["payload"]["subject"] == "Hello there"
    assert event["payload"]["from"]["address"] == "alice@example.com"
    assert hidden == []
    assert again["event_id"] == event["event_id"]
    assert again["delivery_count"] == 2


async def test_an_acked_event_never_returns_and_acking_again_is_harmless(
    rt: Runtime, bot: AgentHandle, clock: FakeClock
) -> None:
    deliver(rt, bot)
    async with api_client(rt) as client:
        [event] = await pull(client, bot.agent_key, lease_seconds=5)
        first = await post(client, bot.agent_key, "ack", event_ids=[event["event_id"]])
        second = await post(
            client, bot.agent_key, "ack", event_ids=[event["event_id"], "evt_unknown"]
        )
        clock.advance(60)
        after = await pull(client, bot.agent_key)
    assert first == {"acked": [event["event_id"]], "already_acked": [], "not_found": []}
    assert second == {
        "acked": [],
        "already_acked": [event["event_id"]],
        "not_found": ["evt_unknown"],
    }
    assert after == []


async def test_a_nacked_event_is_redelivered_once_its_delay_has_passed(
    rt: Runtime, bot: AgentHandle, clock: FakeClock
) -> None:
    deliver(rt, bot)
    async with api_client(rt) as client:
        [event] = await pull(client, bot.agent_key)
        result = await post(
            client, bot.agent_key, "nack", event_ids=[event["event_id"]], delay_seconds=10
        )
        during = await pull(client, bot.agent_key)
        clock.advance(10)
        [again] = await pull(client, bot.agent_key)
    assert result["nacked"] == [event["event_id"]]
    assert result["finished"] == [] and result["not_found"] == []
    assert at(result["visible_at"]) == clock.now()  # the nack time + 10 s
    assert during == []
    assert (again["event_id"], again["delivery_count"]) == (event["event_id"], 2)


async def test_extending_a_live_lease_keeps_the_event_hidden_longer(
    rt: Runtime, bot: AgentHandle, clock: FakeClock
) -> None:
    deliver(rt, bot)
    async with api_client(rt) as client:
        [event] = await pull(client, bot.agent_key, lease_seconds=30)
        clock.advance(20)
        result = await post(
            client, bot.agent_key, "extend", event_ids=[event["event_id"]], lease_seconds=120
        )
        clock.advance(60)  # past the first lease, inside the extended one
        hidden = await pull(client, bot.agent_key)
        clock.advance(61)
        late = await post(
            client, bot.agent_key, "extend", event_ids=[event["event_id"]], lease_seconds=120
        )
        [again] = await pull(client, bot.agent_key)
    assert result["extended"] == [event["event_id"]]
    assert at(result["lease_expires_at"]) - at(event["lease_expires_at"]) == timedelta(seconds=110)
    assert hidden == []
    assert late["extended"] == [] and late["not_leased"] == [event["event_id"]]
    assert again["event_id"] == event["event_id"]


async def test_each_consumer_gets_every_event_with_its_own_leases(
    rt: Runtime, bot: AgentHandle
) -> None:
    deliver(rt, bot)
    async with api_client(rt) as client:
        [first] = await pull(client, bot.agent_key, consumer="indexer")
        [second] = await pull(client, bot.agent_key, consumer="responder")
        await post(client, bot.agent_key, "ack", event_ids=[first["event_id"]], consumer="indexer")
        default = await pull(client, bot.agent_key)
    assert first["event_id"] == second["event_id"]
    assert [e["event_id"] for e in default] == [first["event_id"]]  # "default" is a third


async def test_an_owner_key_pulls_the_events_of_every_agent_in_its_workspace(
    rt: Runtime, bot: AgentHandle
) -> None:
    other = rt.tenancy.create_agent(bot.workspace_id, "sales bot")
    deliver(rt, bot)
    deliver(
        rt,
        AgentHandle(bot.workspace_id, bot.owner_key, other.agent_id, other.address, other.api_key),
    )
    async with api_client(rt) as client:
        events = await pull(client, bot.owner_key, limit=10)
        acked = await post(client, bot.owner_key, "ack", event_ids=[e["event_id"] for e in events])
    assert {e["agent_id"] for e in events} == {bot.agent_id, other.agent_id}
    assert len(acked["acked"]) == 2


async def test_a_long_poll_wakes_when_a_message_is_ingested_during_the_wait(
    rt: Runtime, bot: AgentHandle
) -> None:
    result: list[list[dict[str, Any]]] = []

    def polling() -> bool:
        # The consumer row is made in the pull's first (empty) lease transaction.
        with rt.db.read() as conn:
            found = conn.execute(select(consumers.c.id).where(consumers.c.name == "waiter"))
            return found.first() is not None

    async with api_client(rt) as client, anyio.create_task_group() as group:

        async def long_poll() -> None:
            result.append(await pull(client, bot.agent_key, consumer="waiter", wait=25))

        with anyio.fail_after(15):  # far below the wait and the poll interval (60 s)
            group.start_soon(long_poll)
            await wait_until(polling)
            recipient = rt.tenancy.resolve_recipient(bot.address)
            assert recipient is not None
            [stored] = await rt.ingest.ingest_async(
                build_message(to=bot.address), ENVELOPE, [recipient]
            )
            await wait_until(lambda: bool(result))
    [[event]] = result
    assert event["payload"]["message_id"] == stored.message_id


async def test_a_long_poll_with_nothing_arriving_answers_an_empty_list(
    rt: Runtime, bot: AgentHandle
) -> None:
    async with api_client(rt) as client:
        with anyio.fail_after(10):
            events = await pull(client, bot.agent_key, wait=0.05)
    assert events == []


async def test_dead_letters_are_listed_for_owners_only(
    rt: Runtime, bot: AgentHandle, clock: FakeClock
) -> None:
    deliver(rt, bot)
    async with api_client(rt) as client:
        [event] = await pull(client, bot.agent_key)
        clock.advance(31)
        await pull(client, bot.agent_key)  # second and last delivery
        clock.advance(31)
        gone = await pull(client, bot.agent_key)  # over the limit: dead-lettered
        listed = await client.get("/v1/events/dead", headers=auth(bot.owner_key))
        filtered = await client.get(
            "/v1/events/dead", params={"consumer": "other"}, headers=auth(bot.owner_key)
        )
        as_agent = await client.get("/v1/events/dead", headers=auth(bot.agent_key))
    assert gone == []
    [dead] = listed.json()["events"]
    assert dead["event_id"] == event["event_id"]
    assert (dead["consumer"], dead["scope"]) == ("default", bot.agent_id)
    assert dead["delivery_count"] == 2
    assert dead["payload"] == event["payload"]
    assert listed.json()["next_cursor"] is None
    assert filtered.json()["events"] == []
    assert as_agent.status_code == 403 and problem_code(as_agent) == "missing_scope"


async def test_keys_without_the_event_scopes_are_refused_with_403(
    rt: Runtime, bot: AgentHandle
) -> None:
    deliver(rt, bot)
    reader_only = rt.tenancy.create_key(
        bot.workspace_id, agent_id=bot.agent_id, scopes=("events:read",)
    ).api_key
    mail_only = rt.tenancy.create_key(
        bot.workspace_id, agent_id=bot.agent_id, scopes=("messages:read",)
    ).api_key
    async with api_client(rt) as client:
        no_pull = await client.get("/v1/events", headers=auth(mail_only))
        [event] = await pull(client, reader_only)
        refused = [
            await client.post(
                f"/v1/events/{action}",
                json={"event_ids": [event["event_id"]], **extra},
                headers=auth(reader_only),
            )
            for action, extra in (("ack", {}), ("nack", {}), ("extend", {"lease_seconds": 5}))
        ]
    assert no_pull.status_code == 403 and problem_code(no_pull) == "missing_scope"
    assert no_pull.json()["scope"] == "events:read"
    for response in refused:
        assert response.status_code == 403 and problem_code(response) == "missing_scope"
        assert response.json()["scope"] == "events:ack"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "1000"}, "limit"),  # above feed_max_limit
        ({"wait": "-1"}, "wait"),
        ({"wait": "31"}, "wait"),  # above feed_max_wait_seconds
        ({"lease_seconds": "0"}, "lease_seconds"),
        ({"lease_seconds": "99999"}, "lease_seconds"),
        ({"consumer": "no spaces allowed"}, "consumer"),
    ],
)
async def test_a_malformed_pull_is_a_422_problem_naming_the_field(
    rt: Runtime, bot: AgentHandle, params: dict[str, str], field: str
) -> None:
    async with api_client(rt) as client:
        response = await client.get("/v1/events", params=params, headers=auth(bot.agent_key))
    assert response.status_code == 422
    assert problem_code(response) == "validation_failed"
    assert [e["field"] for e in response.json()["errors"]] == [field]


@pytest.mark.parametrize(
    ("action", "body", "field"),
    [
        ("ack", {"event_ids": []}, "event_ids"),
        ("ack", {"event_ids": [f"evt_{i}" for i in range(1001)]}, "event_ids"),
        ("ack", {"event_ids": "evt_1"}, "event_ids"),
        ("ack", {}, "event_ids"),
        ("ack", {"event_ids": ["evt_1"], "consumer": "bad name"}, "consumer"),
        ("nack", {"event_ids": ["evt_1"], "delay_seconds": -1}, "delay_seconds"),
        ("extend", {"event_ids": ["evt_1"]}, "lease_seconds"),
        ("extend", {"event_ids": ["evt_1"], "lease_seconds": 0}, "lease_seconds"),
        ("nack", {"event_ids": ["evt_1"], "delay": 5}, "delay"),  # misspelt: not ignored
    ],
)
async def test_a_malformed_settle_request_is_a_422_problem_naming_the_field(
    rt: Runtime, bot: AgentHandle, action: str, body: dict[str, Any], field: str
) -> None:
    async with api_client(rt) as client:
        response = await client.post(f"/v1/events/{action}", json=body, headers=auth(bot.agent_key))
    assert response.status_code == 422
    assert problem_code(response) == "validation_failed"
    assert field in [e["field"] for e in response.json()["errors"]]


async def test_a_body_that_is_not_json_is_a_400_problem_naming_the_body(
    rt: Runtime, bot: AgentHandle
) -> None:
    async with api_client(rt) as client:
        response = await client.post(
            "/v1/events/ack",
            content=b"{not json",
            headers={**auth(bot.agent_key), "content-type": "application/json"},
        )
    assert response.status_code == 400
    assert problem_code(response) == "bad_request"
    assert [e["field"] for e in response.json()["errors"]] == ["body"]
