"""Delivery through the SMTP relay transport to a real loopback sink with faults:
exactly-once under concurrent identical sends, retries through an outage, bounces."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from sqlalchemy import select

from mailgate.config import Settings
from mailgate.runtime import Runtime
from mailgate.store.schema import events, outbound, suppressions
from mailgate.testing.smtp_sink import Fault, SmtpSink
from tests.conftest import AgentHandle, make_agent
from tests.integration.api_support import api_client
from tests.integration.outbound_support import drain, outbound_runtime, send, set_tier
from tests.integration.test_feedback import dsn_bytes
from tests.integration.test_feedback import ingest as feedback_ingest

pytestmark = pytest.mark.anyio

MAIL = {"to": ["alice@example.com"], "subject": "Report", "text": "Attached soon."}


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as server:
        yield server


@pytest.fixture
async def relay_runtime(settings: Settings, sink: SmtpSink) -> AsyncIterator[Runtime]:
    async with outbound_runtime(
        settings,
        transport="smtp",
        relay_host=sink.host,
        relay_port=sink.port,
        relay_starttls="off",
        relay_timeout_seconds=5.0,
        retry_base_seconds=0.001,
        retry_max_seconds=0.002,
    ) as rt:
        yield rt


@pytest.fixture
def sender(relay_runtime: Runtime) -> AgentHandle:
    handle = make_agent(relay_runtime)
    set_tier(relay_runtime, handle.agent_id, "open")
    return handle


async def _drain_all(runtime: Runtime, *, until: str, outbound_id: str) -> dict[str, Any]:
    """Delivery rounds until the request reaches ``until`` (retries come due at once)."""
    for _ in range(50):
        await drain(runtime)
        detail = runtime.outbound.get_as_system(outbound_id)
        if detail["status"] == until:
            return detail
        await asyncio.sleep(0.01)  # the next retry is due in a few milliseconds
    raise AssertionError(f"{outbound_id} never reached {until}: {detail}")


async def test_fifty_concurrent_identical_sends_deliver_exactly_one_message(
    relay_runtime: Runtime, sender: AgentHandle, sink: SmtpSink
) -> None:
    async with api_client(relay_runtime) as client:
        responses = await asyncio.gather(
            *(send(client, sender.agent_key, MAIL, idem="same-key") for _ in range(50))
        )
        reused = await send(client, sender.agent_key, {**MAIL, "text": "other"}, idem="same-key")
    codes = sorted({r.status_code for r in responses})
    assert set(codes) <= {201, 409}, codes
    ids = {r.json()["id"] for r in responses if r.status_code == 201}
    assert len(ids) == 1
    busy = [r.json()["code"] for r in responses if r.status_code == 409]
    assert set(busy) <= {"idempotency_in_flight"}
    assert reused.status_code == 422 and reused.json()["code"] == "idempotency_key_reused"
    await drain(relay_runtime)
    assert len(sink.wait_for(1)) == 1
    with relay_runtime.db.read() as conn:
        assert len(conn.execute(select(outbound)).all()) == 1
    assert len(sink.messages) == 1


async def test_a_relay_down_for_several_retries_then_up_delivers_exactly_once(
    relay_runtime: Runtime, sender: AgentHandle, sink: SmtpSink
) -> None:
    sink.stop()
    async with api_client(relay_runtime) as client:
        body = (await send(client, sender.agent_key, MAIL)).json()
    for _ in range(3):
        outcomes = await relay_runtime.delivery.run_once()
        assert [o.state for o in outcomes] == ["queued"]  # deferred, retry scheduled
        await asyncio.sleep(0.01)  # the retry is due in a few milliseconds
    sink.start()
    detail = await _drain_all(relay_runtime, until="sent", outbound_id=body["id"])
    assert [a["outcome"] for a in detail["attempts"]] == ["deferred"] * 3 + ["sent"]
    assert len(sink.wait_for(1)) == 1
    await drain(relay_runtime)
    assert len(sink.messages) == 1
    assert sink.messages[0].message_id == body["rfc_message_id"]


@pytest.mark.parametrize("reply", ["421 4.3.2 Service shutting down", "450 4.2.0 Mailbox busy"])
async def test_a_4xx_reply_is_retried_with_backoff(
    relay_runtime: Runtime, sender: AgentHandle, sink: SmtpSink, reply: str
) -> None:
    sink.inject(Fault("rcpt", reply=reply), Fault("data", reply=reply))
    async with api_client(relay_runtime) as client:
        body = (await send(client, sender.agent_key, MAIL)).json()
    detail = await _drain_all(relay_runtime, until="sent", outbound_id=body["id"])
    assert [a["outcome"] for a in detail["attempts"]] == ["deferred", "deferred", "sent"]
    assert detail["attempts"][0]["code"] == int(reply[:3])
    assert len(sink.messages) == 1


async def test_a_dropped_connection_is_a_temporary_failure(
    relay_runtime: Runtime, sender: AgentHandle, sink: SmtpSink
) -> None:
    sink.inject(Fault("data", drop=True))
    async with api_client(relay_runtime) as client:
        body = (await send(client, sender.agent_key, MAIL)).json()
    detail = await _drain_all(relay_runtime, until="sent", outbound_id=body["id"])
    assert [a["outcome"] for a in detail["attempts"]] == ["deferred", "sent"]
    assert len(sink.messages) == 1


async def test_a_5xx_is_a_permanent_failure_that_bounces_and_suppresses(
    relay_runtime: Runtime, sender: AgentHandle, sink: SmtpSink
) -> None:
    sink.inject(Fault("data", reply="550 5.1.1 No such user"))
    async with api_client(relay_runtime) as client:
        body = (await send(client, sender.agent_key, MAIL)).json()
        await drain(relay_runtime)
        again = (await send(client, sender.agent_key, MAIL)).json()
    detail = relay_runtime.outbound.get_as_system(body["id"])
    assert detail["status"] == "bounced"
    assert [a["outcome"] for a in detail["attempts"]] == ["failed"]
    assert detail["recipients"][0]["status"] == "bounced"
    with relay_runtime.db.read() as conn:
        rows = conn.execute(select(suppressions)).all()
        types = list(conn.execute(select(events.c.type)).scalars())
    assert [(r.address, r.reason, r.source) for r in rows] == [
        ("alice@example.com", "hard_bounce", "smtp")
    ]
    assert "outbound.bounced" in types
    assert again["status"] == "blocked" and again["decision"]["codes"] == ["suppressed"]
    assert sink.messages == []


async def test_one_refused_recipient_of_two_bounces_alone(
    relay_runtime: Runtime, sender: AgentHandle, sink: SmtpSink
) -> None:
    sink.inject(Fault("rcpt", reply="550 5.1.1 Unknown", recipients=frozenset({"bob@example.com"})))
    async with api_client(relay_runtime) as client:
        body = (await send(client, sender.agent_key, {**MAIL, "cc": ["bob@example.com"]})).json()
    await drain(relay_runtime)
    detail = relay_runtime.outbound.get_as_system(body["id"])
    statuses = {r["address"]: r["status"] for r in detail["recipients"]}
    assert detail["status"] == "sent"
    assert statuses == {"alice@example.com": "sent", "bob@example.com": "bounced"}
    assert [m.rcpt_tos for m in sink.messages] == [("alice@example.com",)]


async def test_mail_to_an_agent_on_the_gateway_is_delivered_locally_not_relayed(
    relay_runtime: Runtime, sender: AgentHandle, sink: SmtpSink
) -> None:
    colleague = make_agent(relay_runtime, "colleague", workspace="elsewhere")
    async with api_client(relay_runtime) as client:
        body = (
            await send(
                client, sender.agent_key, {**MAIL, "to": [colleague.address, "alice@example.com"]}
            )
        ).json()
        await drain(relay_runtime)
        inbox = (
            await client.get(
                "/v1/messages", headers={"Authorization": f"Bearer {colleague.agent_key}"}
            )
        ).json()
    detail = relay_runtime.outbound.get_as_system(body["id"])
    statuses = {r["address"]: r["status"] for r in detail["recipients"]}
    assert statuses == {colleague.address: "delivered", "alice@example.com": "sent"}
    assert [m["subject"] for m in inbox["messages"]] == ["Report"]
    assert [m.rcpt_tos for m in sink.messages] == [("alice@example.com",)]


async def test_a_dsn_arriving_later_bounces_the_sent_message_and_suppresses_the_address(
    relay_runtime: Runtime, sender: AgentHandle, sink: SmtpSink
) -> None:
    async with api_client(relay_runtime) as client:
        body = (await send(client, sender.agent_key, MAIL)).json()
        await drain(relay_runtime)
        assert relay_runtime.outbound.get_as_system(body["id"])["status"] == "sent"
        report = dsn_bytes(
            sender, [("alice@example.com", "failed", "5.1.1")], original_id=body["rfc_message_id"]
        )
        await asyncio.to_thread(feedback_ingest, relay_runtime, sender, report)
        again = (await send(client, sender.agent_key, MAIL)).json()
    detail = relay_runtime.outbound.get_as_system(body["id"])
    assert detail["status"] == "bounced"
    assert detail["recipients"][0]["status"] == "bounced"
    with relay_runtime.db.read() as conn:
        rows = conn.execute(select(suppressions)).all()
        types = list(conn.execute(select(events.c.type).order_by(events.c.seq)).scalars())
    assert [(r.address, r.reason, r.source) for r in rows] == [
        ("alice@example.com", "hard_bounce", "dsn")
    ]
    assert types.index("outbound.bounced") > types.index("outbound.sent")
    assert again["decision"]["codes"] == ["suppressed"]
