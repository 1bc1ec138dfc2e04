"""End to end through the delivery worker: the SendGrid transport against a local server
speaking its documented contract, DKIM signing for a sending domain (verified with
dkimpy against the published record), and the owners' approval webhook."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import dkim
import pytest
from pydantic import SecretStr
from sqlalchemy import select

from mailgate.config import Settings
from mailgate.runtime import Runtime
from mailgate.store.schema import captured
from mailgate.testing.sendgrid_api import FakeSendGrid
from tests.conftest import make_agent
from tests.integration.api_support import api_client
from tests.integration.outbound_support import drain, outbound_runtime, send, set_tier

pytestmark = pytest.mark.anyio

MAIL = {"to": ["alice@example.com"], "subject": "Status", "text": "All green."}


@pytest.fixture
def sendgrid() -> Iterator[FakeSendGrid]:
    with FakeSendGrid() as server:
        yield server


@pytest.fixture
async def sendgrid_runtime(settings: Settings, sendgrid: FakeSendGrid) -> AsyncIterator[Runtime]:
    async with outbound_runtime(
        settings,
        transport="sendgrid",
        sendgrid_api_url=sendgrid.base_url,
        sendgrid_api_key=SecretStr("SG.test-key"),
        retry_base_seconds=0.001,
        retry_max_seconds=0.002,
    ) as rt:
        yield rt


async def test_the_sendgrid_transport_sends_through_the_v3_contract_and_keeps_its_id(
    sendgrid_runtime: Runtime, sendgrid: FakeSendGrid
) -> None:
    agent = make_agent(sendgrid_runtime)
    set_tier(sendgrid_runtime, agent.agent_id, "open")
    sendgrid.fail_next(1, status=503)
    async with api_client(sendgrid_runtime) as client:
        body = (await send(client, agent.agent_key, {**MAIL, "bcc": ["audit@example.net"]})).json()
    for _ in range(20):
        await drain(sendgrid_runtime)
        detail = sendgrid_runtime.outbound.get_as_system(body["id"])
        if detail["status"] == "sent":
            break
    assert detail["status"] == "sent"
    assert [a["outcome"] for a in detail["attempts"]] == ["deferred", "sent"]
    [request] = sendgrid.requests
    assert detail["provider_message_id"] == request.message_id
    sent = request.body
    assert sent["subject"] == "Status"
    assert sent["custom_args"]["outbound_id"] == body["id"]
    recipients = {
        (kind, r["email"]) for p in sent["personalizations"] for kind in p for r in p[kind]
    }
    assert recipients == {("to", "alice@example.com"), ("bcc", "audit@example.net")}


async def test_mail_from_a_domain_with_a_key_is_dkim_signed_and_verifies(
    runtime: Runtime,
) -> None:
    added = runtime.domains.add(runtime.settings.agent_domain, selector="mg")
    agent = make_agent(runtime)
    set_tier(runtime, agent.agent_id, "open")
    async with api_client(runtime) as client:
        await send(client, agent.agent_key, MAIL)
    await drain(runtime)
    with runtime.db.read() as conn:
        row = conn.execute(select(captured)).one()
    raw = runtime.blobs.get(row.raw_sha256)
    assert raw.startswith(b"DKIM-Signature:")
    record = next(r for r in added.records if r.name.startswith("mg._domainkey."))

    def dns(name: bytes, timeout: int = 5) -> bytes:
        return (
            record.value.encode() if name.decode().rstrip(".") == record.name.rstrip(".") else b""
        )

    assert dkim.verify(raw, dnsfunc=dns)


class _Hook(BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []
    lock = threading.Lock()

    def do_POST(self) -> None:
        length = int(self.headers["content-length"])
        with self.lock:
            self.received.append(json.loads(self.rfile.read(length)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        del format, args


@pytest.fixture
def hook() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    _Hook.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/approvals"
    server.shutdown()
    server.server_close()


async def test_a_held_request_is_posted_to_the_approval_webhook(
    settings: Settings, hook: str
) -> None:
    async with outbound_runtime(settings, approval_webhook_url=hook) as rt:
        agent = make_agent(rt)
        set_tier(rt, agent.agent_id, "open")
        async with api_client(rt) as client:
            await client.post(
                "/v1/rules",
                json={
                    "name": "hold",
                    "agent_id": agent.agent_id,
                    "direction": "outbound",
                    "action": "require_approval",
                    "condition": {"field": "subject", "match": "is", "value": "Status"},
                },
                headers={"Authorization": f"Bearer {agent.owner_key}"},
            )
            held = (await send(client, agent.agent_key, MAIL)).json()
        outcomes = await drain(rt)
    assert [o.state for o in outcomes] == ["sent"]
    assert len(_Hook.received) == 1
    posted = _Hook.received[0]
    assert posted["type"] == "outbound.pending_approval"
    assert posted["outbound_id"] == held["id"]
    assert posted["recipients"] == ["alice@example.com"]
