"""/v0 webhooks: CRUD through the real app, and pushes from a real gateway to a real
receiver on loopback that verifies every delivery with svix's own verifier. SQLite and
PostgreSQL."""

from __future__ import annotations

import json
import queue
import smtplib
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from agentmail import AgentMail, AgentMailEnvironment
from agentmail.core.api_error import ApiError
from sqlalchemy import select
from svix.webhooks import Webhook as SvixWebhook

from mailgate.config import Settings
from mailgate.runtime import Runtime
from mailgate.services.webhooks import PushEngine, PushOutcome, httpx_post
from mailgate.store.schema import consumers, deliveries, webhooks
from mailgate.testing import build_message
from mailgate.testing.gateway import RunningGateway, running_gateway
from tests.conftest import AgentHandle, make_agent
from tests.integration.api_support import api_client, auth, deliver

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

WAIT = 20.0
HOOK = {"url": "https://hooks.example.com/in", "event_types": ["message.received"]}


# -- CRUD through the app ---------------------------------------------------------------


async def test_an_owner_creates_lists_gets_updates_and_deletes_a_webhook(
    runtime: Runtime, agent: AgentHandle
) -> None:
    async with api_client(runtime) as client:
        owner = auth(agent.owner_key)
        made = await client.post(
            "/v0/webhooks", json={**HOOK, "inbox_ids": [agent.address]}, headers=owner
        )
        assert made.status_code == 200, made.text
        hook = made.json()
        assert hook["webhook_id"].startswith("whk_")
        assert hook["secret"].startswith("whsec_") and hook["enabled"] is True
        assert hook["inbox_ids"] == [agent.address] and hook["pod_id"] == agent.workspace_id
        assert "inbox_id" not in hook  # a workspace webhook belongs to no inbox

        listed = (await client.get("/v0/webhooks", headers=owner)).json()
        assert listed["count"] == 1 and listed["webhooks"][0]["webhook_id"] == hook["webhook_id"]
        path = f"/v0/webhooks/{hook['webhook_id']}"
        assert (await client.get(path, headers=owner)).json() == hook

        patched = await client.patch(
            path,
            json={"event_types": ["message.sent", "message.bounced"], "enabled": False},
            headers=owner,
        )
        assert patched.status_code == 200, patched.text
        assert patched.json()["event_types"] == ["message.sent", "message.bounced"]
        assert patched.json()["enabled"] is False
        unfiltered = await client.patch(
            path, json={"remove_inbox_ids": [agent.address]}, headers=owner
        )
        assert "inbox_ids" not in unfiltered.json()

        assert (await client.delete(path, headers=owner)).status_code == 204
        assert (await client.get(path, headers=owner)).status_code == 404
    with runtime.db.read() as conn:  # its consumer went with it
        assert conn.execute(select(consumers.c.name)).scalars().all() == []


async def test_no_key_can_lease_or_settle_a_webhooks_consumer_but_owners_see_its_dead_letters(
    runtime: Runtime, agent: AgentHandle
) -> None:
    async with api_client(runtime) as client:
        owner = auth(agent.owner_key)
        hook = (await client.post("/v0/webhooks", json=HOOK, headers=owner)).json()
        name = f"webhook.{hook['webhook_id']}"
        deliver(runtime, agent, subject="for the receiver only")
        pulled = await client.get("/v1/events", params={"consumer": name}, headers=owner)
        settles = [
            await client.post(f"/v1/events/{verb}", json=body, headers=owner)
            for verb, body in [
                ("ack", {"consumer": name, "event_ids": ["evt_x"]}),
                ("nack", {"consumer": name, "event_ids": ["evt_x"]}),
                ("extend", {"consumer": name, "event_ids": ["evt_x"], "lease_seconds": 30}),
            ]
        ]
        dead = await client.get("/v1/events/dead", params={"consumer": name}, headers=owner)

    for response in [pulled, *settles]:
        assert response.status_code == 422, response.text
        assert response.json()["code"] == "validation_failed"
        assert "webhook" in response.text
    assert dead.status_code == 200, dead.text
    with runtime.db.read() as conn:  # nothing was leased away from the receiver
        assert conn.execute(select(deliveries.c.event_id)).all() == []
    # The webhook's own pusher still gets the event, and acks it.
    posted: list[str] = []

    async def post(url: str, body: bytes, headers: dict[str, str], _to: str | None) -> int:
        posted.append(json.loads(body)["message"]["subject"])
        return 200

    no_dns = runtime.settings.model_copy(update={"webhook_allow_private_targets": True})
    engine = PushEngine(runtime.db, runtime.feed, no_dns, runtime.clock, runtime.agentmail, post)
    [record] = runtime.webhooks.enabled()
    outcome = await engine.drain(record)
    assert posted == ["for the receiver only"] and outcome.acked == 1


async def test_the_same_client_id_returns_the_first_webhook(
    runtime: Runtime, agent: AgentHandle
) -> None:
    async with api_client(runtime) as client:
        body = {**HOOK, "client_id": "hook-1"}
        first = await client.post("/v0/webhooks", json=body, headers=auth(agent.owner_key))
        again = await client.post(
            "/v0/webhooks",
            json={**body, "url": "https://other.example.com/"},
            headers=auth(agent.owner_key),
        )
        assert first.status_code == again.status_code == 200
        assert again.json() == first.json()
    with runtime.db.read() as conn:
        assert len(conn.execute(select(webhooks.c.id)).all()) == 1


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({**HOOK, "url": "ftp://hooks.example.com/"}, 400, "validation_failed"),
        ({**HOOK, "url": "not a url"}, 400, "validation_failed"),
        ({**HOOK, "url": "http://127.0.0.1:8080/"}, 400, "validation_failed"),
        ({**HOOK, "url": "http://localhost/"}, 400, "validation_failed"),
        ({**HOOK, "url": "http://10.1.2.3/"}, 400, "validation_failed"),
        ({**HOOK, "url": "http://[::1]/"}, 400, "validation_failed"),
        ({**HOOK, "url": "http://169.254.169.254/latest"}, 400, "validation_failed"),
        ({**HOOK, "event_types": ["message.recieved"]}, 400, "validation_failed"),
        ({**HOOK, "event_types": []}, 400, "validation_failed"),
        ({**HOOK, "pod_ids": ["pod_1"]}, 501, "not_implemented"),
        ({**HOOK, "headers": {"X-Token": "t"}}, 501, "not_implemented"),
        ({**HOOK, "inbox_ids": ["nobody@agents.example"]}, 404, "not_found"),
    ],
)
async def test_a_bad_webhook_is_refused_with_a_stable_code_and_nothing_is_written(
    runtime: Runtime, agent: AgentHandle, body: dict[str, Any], status: int, code: str
) -> None:
    async with api_client(runtime) as client:
        response = await client.post("/v0/webhooks", json=body, headers=auth(agent.owner_key))
    assert response.status_code == status, response.text
    assert response.json()["code"] == code
    with runtime.db.read() as conn:
        assert conn.execute(select(webhooks.c.id)).all() == []
        assert conn.execute(select(consumers.c.id)).all() == []


async def test_an_agent_key_manages_only_its_own_inbox_webhooks(runtime: Runtime) -> None:
    a = make_agent(runtime, "alpha")
    b_agent = runtime.tenancy.create_agent(a.workspace_id, "beta")
    async with api_client(runtime) as client:
        made = await client.post("/v0/webhooks", json=HOOK, headers=auth(a.agent_key))
        assert made.status_code == 200, made.text
        hook = made.json()
        assert hook["inbox_id"] == a.address  # an agent's webhook is its inbox's
        path = f"/v0/webhooks/{hook['webhook_id']}"
        b = auth(b_agent.api_key)
        assert (await client.get(path, headers=b)).status_code == 404
        assert (await client.patch(path, json={"enabled": False}, headers=b)).status_code == 404
        assert (await client.delete(path, headers=b)).status_code == 404
        assert (await client.get("/v0/webhooks", headers=b)).json()["count"] == 0
        inbox_path = f"/v0/inboxes/{a.address}/webhooks"
        assert (await client.get(inbox_path, headers=b)).status_code == 404
        # The owner sees it, under the inbox too; agent A still has it, unchanged.
        listed = (await client.get(inbox_path, headers=auth(a.owner_key))).json()
        assert [h["webhook_id"] for h in listed["webhooks"]] == [hook["webhook_id"]]
        assert (await client.get(path, headers=auth(a.agent_key))).json()["enabled"] is True


async def test_an_inbox_webhook_is_fixed_to_its_inbox(runtime: Runtime, agent: AgentHandle) -> None:
    async with api_client(runtime) as client:
        owner = auth(agent.owner_key)
        base = f"/v0/inboxes/{agent.address}/webhooks"
        made = await client.post(base, json=HOOK, headers=owner)
        assert made.status_code == 200, made.text
        hook = made.json()
        assert hook["inbox_id"] == agent.address
        path = f"{base}/{hook['webhook_id']}"
        assert (await client.get(path, headers=owner)).json()["webhook_id"] == hook["webhook_id"]
        moved = await client.patch(path, json={"add_inbox_ids": [agent.address]}, headers=owner)
        assert moved.status_code == 400 and moved.json()["code"] == "validation_failed"
        assert (await client.delete(path, headers=owner)).status_code == 204


# -- targets: checked, then pinned ------------------------------------------------------


class Recorder:
    """The engine's ``post`` port, recording where each POST would connect."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []

    async def __call__(self, url: str, body: bytes, headers: dict[str, str], to: str | None) -> int:
        self.calls.append((url, to))
        return 200


def resolver(*answers: list[str]) -> Callable[[str, int], Awaitable[list[str]]]:
    """A resolver giving each answer in turn (the last one from then on)."""
    queue_ = list(answers)

    async def resolve(host: str, port: int) -> list[str]:
        assert host == "hooks.example.com" and port == 443
        return queue_.pop(0) if len(queue_) > 1 else queue_[0]

    return resolve


async def drain_with(
    runtime: Runtime, agent: AgentHandle, post: Recorder, resolve: Any
) -> PushOutcome:
    """Create a workspace webhook to ``HOOK``, deliver one message, drain it once."""
    async with api_client(runtime) as client:
        made = await client.post("/v0/webhooks", json=HOOK, headers=auth(agent.owner_key))
        assert made.status_code == 200, made.text
    deliver(runtime, agent, subject="pinned")
    engine = PushEngine(
        runtime.db, runtime.feed, runtime.settings, runtime.clock, runtime.agentmail, post,
        resolve=resolve,
    )  # fmt: skip
    [record] = runtime.webhooks.enabled()
    return await engine.drain(record)


async def test_a_post_connects_to_the_address_that_was_checked(
    runtime: Runtime, agent: AgentHandle
) -> None:
    # A rebinding name: public when checked, loopback a moment later.
    post = Recorder()
    outcome = await drain_with(runtime, agent, post, resolver(["93.184.216.34"], ["127.0.0.1"]))
    assert post.calls == [(HOOK["url"], "93.184.216.34")] and outcome.acked == 1


async def test_a_name_with_any_non_public_address_is_not_posted_to(
    runtime: Runtime, agent: AgentHandle
) -> None:
    post = Recorder()
    outcome = await drain_with(runtime, agent, post, resolver(["93.184.216.34", "10.1.2.3"]))
    assert post.calls == [] and outcome.failed == 1 and outcome.acked == 0


async def test_a_webhook_deleted_while_its_pusher_holds_it_gets_nothing_and_stays_gone(
    runtime: Runtime, agent: AgentHandle
) -> None:
    post = Recorder()
    async with api_client(runtime) as client:
        made = await client.post("/v0/webhooks", json=HOOK, headers=auth(agent.owner_key))
        deliver(runtime, agent, subject="before the delete")
        [record] = runtime.webhooks.enabled()  # what the push worker listed a moment ago
        gone = await client.delete(
            f"/v0/webhooks/{made.json()['webhook_id']}", headers=auth(agent.owner_key)
        )
    assert gone.status_code == 204
    engine = PushEngine(
        runtime.db, runtime.feed, runtime.settings, runtime.clock, runtime.agentmail, post,
        resolve=resolver(["93.184.216.34"]),
    )  # fmt: skip
    outcome = await engine.drain(record)
    assert post.calls == [] and outcome.posted == 0
    with runtime.db.read() as conn:  # its consumer was not recreated (at cursor 0)
        assert conn.execute(select(consumers.c.name)).scalars().all() == []


async def test_the_http_post_connects_to_the_pinned_address_and_names_the_host() -> None:
    with Receiver() as receiver:
        port = receiver.server.server_address[1]
        async with httpx.AsyncClient(trust_env=False) as client:
            status = await httpx_post(client)(
                f"http://hooks.test:{port}/hook", b"{}", {"webhook-id": "evt_1"}, "127.0.0.1"
            )
        delivery = receiver.deliveries.get(timeout=WAIT)
    headers = {name.lower(): value for name, value in delivery.headers.items()}
    assert status == 200
    assert headers["host"] == f"hooks.test:{port}"
    assert headers["webhook-id"] == "evt_1"


# -- pushes from a running gateway -------------------------------------------------------


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes

    @property
    def payload(self) -> dict[str, Any]:
        return dict(json.loads(self.body))


class Receiver:
    """A webhook endpoint on loopback: records every POST, answers the scripted
    statuses in turn (then 200)."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.deliveries: queue.Queue[Delivery] = queue.Queue()
        script = list(statuses or [])
        received = self.deliveries

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                received.put(Delivery(dict(self.headers.items()), body))
                self.send_response(script.pop(0) if script else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def next(self, secret: str) -> Delivery:
        """The next delivery, which must verify with ``secret``."""
        delivery = self.deliveries.get(timeout=WAIT)
        SvixWebhook(secret).verify(delivery.body, delivery.headers)
        return delivery


@pytest.fixture
def gateway(runtime: Runtime, settings: Settings) -> Iterator[RunningGateway]:
    runtime.close()  # the fixture migrated the database; the gateway opens its own
    tuned = settings.model_copy(
        update={"webhook_allow_private_targets": True, "webhook_retry_base_seconds": 0.05}
    )
    with running_gateway(tuned) as gw:
        yield gw


@pytest.fixture
def sdk(gateway: RunningGateway) -> Iterator[Callable[[str], AgentMail]]:
    """AgentMail clients for keys, over HTTP connections closed after the test."""
    opened: list[httpx.Client] = []

    def make(key: str) -> AgentMail:
        opened.append(httpx.Client(timeout=WAIT))
        return AgentMail(
            api_key=key,
            environment=AgentMailEnvironment(http=gateway.http_url, websockets=gateway.ws_url),
            httpx_client=opened[-1],
        )

    yield make
    for client in opened:
        client.close()


def _smtp(gw: RunningGateway, to: str, subject: str) -> None:
    with smtplib.SMTP(gw.smtp_host, gw.smtp_port, timeout=WAIT) as client:
        client.sendmail("alice@example.com", [to], build_message(to=to, subject=subject))


def test_mail_over_smtp_is_pushed_signed_with_its_message_and_thread(
    gateway: RunningGateway, sdk: Callable[[str], AgentMail]
) -> None:
    gw = gateway
    bot = make_agent(gw.runtime)
    with Receiver() as receiver:
        hook = sdk(bot.owner_key).webhooks.create(
            url=receiver.url, event_types=["message.received"], client_id="hook-1"
        )
        _smtp(gw, bot.address, "Quarterly report")
        delivery = receiver.next(hook.secret)
    payload = delivery.payload
    assert payload["type"] == "event" and payload["event_type"] == "message.received"
    assert payload["event_id"].startswith("evt_")
    assert delivery.headers["webhook-id"] == delivery.headers["svix-id"] == payload["event_id"]
    assert payload["message"]["subject"] == "Quarterly report"
    assert payload["message"]["inbox_id"] == bot.address
    assert payload["thread"]["thread_id"] == payload["message"]["thread_id"]


def test_a_receiver_failing_twice_gets_the_same_event_three_times(
    gateway: RunningGateway, sdk: Callable[[str], AgentMail]
) -> None:
    gw = gateway
    bot = make_agent(gw.runtime)
    with Receiver([500, 503]) as receiver:
        hook = sdk(bot.owner_key).webhooks.create(
            url=receiver.url, event_types=["message.received"]
        )
        _smtp(gw, bot.address, "Try again")
        attempts = [receiver.next(hook.secret) for _ in range(3)]
    ids = {d.payload["event_id"] for d in attempts}
    assert len(ids) == 1
    assert {d.headers["webhook-id"] for d in attempts} == ids
    # The third answer (200) acked it: delivered three times, done.
    with gw.runtime.db.read() as conn:
        row = conn.execute(
            select(deliveries.c.state, deliveries.c.delivery_count).where(
                deliveries.c.event_id == ids.pop()
            )
        ).one()
    assert row.delivery_count == 3
    assert row.state in ("acked", "pending")  # the ack may still be committing


def test_an_agent_webhook_never_receives_another_agents_events(
    gateway: RunningGateway, sdk: Callable[[str], AgentMail]
) -> None:
    gw = gateway
    a = make_agent(gw.runtime, "alpha")
    b = gw.runtime.tenancy.create_agent(a.workspace_id, "beta")
    agent_a, agent_b = sdk(a.agent_key), sdk(b.api_key)
    with Receiver() as receiver:
        hook = agent_a.webhooks.create(url=receiver.url, event_types=["message.received"])
        for call in (
            lambda: agent_b.webhooks.get(hook.webhook_id),
            lambda: agent_b.webhooks.update(hook.webhook_id, enabled=False),
            lambda: agent_b.webhooks.delete(hook.webhook_id),
        ):
            with pytest.raises(ApiError) as refused:
                call()
            assert refused.value.status_code == 404
        _smtp(gw, b.address, "for beta")
        _smtp(gw, a.address, "for alpha")
        first = receiver.next(hook.secret)
    assert first.payload["message"]["subject"] == "for alpha"
    assert receiver.deliveries.empty()
    # B's event was never even queued for A's webhook.
    with gw.runtime.db.read() as conn:
        queued = (
            conn.execute(
                select(deliveries.c.event_id)
                .join(consumers, consumers.c.id == deliveries.c.consumer_id)
                .where(consumers.c.name == f"webhook.{hook.webhook_id}")
            )
            .scalars()
            .all()
        )
    assert queued == [first.payload["event_id"]]
    assert agent_a.webhooks.get(hook.webhook_id).enabled is True
