"""The /v0 websocket with AgentMail's own SDK (sync and async) against a running
gateway: subscribe, mail arrives over real SMTP, the frame arrives. SQLite and
PostgreSQL."""

from __future__ import annotations

import asyncio
import queue
import smtplib
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from agentmail import AgentMail, AgentMailEnvironment, AsyncAgentMail
from agentmail.websockets.types import Subscribe
from websockets.exceptions import ConnectionClosed

from mailgate.config import Settings
from mailgate.runtime import Runtime
from mailgate.testing import build_message
from mailgate.testing.gateway import RunningGateway, running_gateway
from tests.conftest import make_agent

# The SDK imports websockets' deprecated legacy client and exception names.
pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

WAIT = 20.0


@pytest.fixture
def gateway(runtime: Runtime, settings: Settings) -> Iterator[RunningGateway]:
    runtime.close()  # the fixture migrated the database; the gateway opens its own
    with running_gateway(settings) as gw:
        yield gw


def _env(gw: RunningGateway) -> AgentMailEnvironment:
    return AgentMailEnvironment(http=gw.http_url, websockets=gw.ws_url)


def _smtp(gw: RunningGateway, to: str, subject: str) -> None:
    with smtplib.SMTP(gw.smtp_host, gw.smtp_port, timeout=WAIT) as client:
        client.sendmail("alice@example.com", [to], build_message(to=to, subject=subject))


class Frames:
    """Frames read by a background thread (the sync SDK's recv() has no timeout)."""

    def __init__(self, socket: Any) -> None:
        self.items: queue.Queue[Any] = queue.Queue()
        threading.Thread(target=self._read, args=(socket,), daemon=True).start()

    def _read(self, socket: Any) -> None:
        try:
            for frame in socket:
                self.items.put(frame)
        except Exception as exc:  # the connection closing ends the reader
            self.items.put(exc)
        self.items.put(None)

    def next(self) -> Any:
        frame = self.items.get(timeout=WAIT)
        assert not isinstance(frame, Exception), frame
        return frame


def test_a_subscribed_sync_client_receives_mail_that_arrives_over_smtp(
    gateway: RunningGateway,
) -> None:
    gw = gateway
    bot = make_agent(gw.runtime)
    with httpx.Client() as http:
        client = AgentMail(api_key=bot.agent_key, environment=_env(gw), httpx_client=http)
        with client.websockets.connect() as socket:
            frames = Frames(socket)
            socket.send_subscribe(Subscribe(event_types=["message.received"]))
            subscribed = frames.next()
            assert subscribed.type == "subscribed"
            assert subscribed.event_types == ["message.received"]
            _smtp(gw, bot.address, "Hello over the socket")
            event = frames.next()
    assert event.type == "event" and event.event_type == "message.received"
    assert event.event_id.startswith("evt_")
    assert event.message.subject == "Hello over the socket"
    assert event.message.inbox_id == bot.address
    assert event.thread.thread_id == event.message.thread_id


def test_a_subscribed_async_client_receives_mail_that_arrives_over_smtp(
    gateway: RunningGateway,
) -> None:
    gw = gateway
    bot = make_agent(gw.runtime)

    async def scenario() -> Any:
        async with httpx.AsyncClient() as http:
            client = AsyncAgentMail(api_key=bot.owner_key, environment=_env(gw), httpx_client=http)
            async with client.websockets.connect() as socket:
                await socket.send_subscribe(Subscribe(inbox_ids=[bot.address]))
                subscribed = await asyncio.wait_for(socket.recv(), WAIT)
                assert subscribed.type == "subscribed"
                assert subscribed.inbox_ids == [bot.address]
                await asyncio.to_thread(_smtp, gw, bot.address, "Async hello")
                return await asyncio.wait_for(socket.recv(), WAIT)

    event = asyncio.run(scenario())
    assert event.event_type == "message.received"
    assert event.message.subject == "Async hello"


def test_a_bad_key_gets_an_error_frame_and_a_policy_close(gateway: RunningGateway) -> None:
    gw = gateway
    with httpx.Client() as http:
        client = AgentMail(api_key="mg_nope_nope", environment=_env(gw), httpx_client=http)
        with client.websockets.connect() as socket:
            frames = Frames(socket)
            error = frames.next()
            assert error.type == "error" and error.name == "UnauthorizedError"
            closed = frames.items.get(timeout=WAIT)  # the server closed it: policy violation
            assert isinstance(closed, ConnectionClosed) and closed.rcvd is not None
            assert closed.rcvd.code == 1008


def test_a_malformed_frame_gets_an_error_frame_and_the_connection_stays(
    gateway: RunningGateway,
) -> None:
    gw = gateway
    bot = make_agent(gw.runtime)
    with httpx.Client() as http:
        client = AgentMail(api_key=bot.agent_key, environment=_env(gw), httpx_client=http)
        with client.websockets.connect() as socket:
            frames = Frames(socket)
            socket._websocket.send("not json")
            assert frames.next().name == "ValidationError"
            socket._websocket.send('{"type": "subscribe", "event_types": ["nope"]}')
            assert frames.next().name == "ValidationError"
            socket.send_subscribe(Subscribe(event_types=["message.received"]))
            assert frames.next().type == "subscribed"


def test_an_agent_key_never_receives_another_agents_events(gateway: RunningGateway) -> None:
    gw = gateway
    a = make_agent(gw.runtime, "alpha")
    b = gw.runtime.tenancy.create_agent(a.workspace_id, "beta")
    with httpx.Client() as http:
        client = AgentMail(api_key=a.agent_key, environment=_env(gw), httpx_client=http)
        with client.websockets.connect() as socket:
            frames = Frames(socket)
            socket.send_subscribe(Subscribe())
            assert frames.next().type == "subscribed"
            _smtp(gw, b.address, "for beta")
            _smtp(gw, a.address, "for alpha")
            event = frames.next()
            # B's mail was committed first; had it been sent, it would come first.
            assert event.message.subject == "for alpha"
            assert frames.items.empty()
