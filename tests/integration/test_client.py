"""The Python SDK (``mailgate.client``) against a real gateway on loopback: mail arrives
over real SMTP, the sync and async clients read it, lease and ack its events, reply
under idempotency keys and run the consumer helper; on SQLite and PostgreSQL.

Retry timing (``Retry-After``, backoff, what is never retried) is checked against an
``httpx.MockTransport``, which answers exactly the statuses under test.
"""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import aiosmtplib
import anyio
import httpx
import pytest

from mailgate.api.app import create_app
from mailgate.client import (
    AsyncConsumer,
    AsyncMailgate,
    AuthenticationError,
    ConflictError,
    Consumer,
    Event,
    Mailgate,
    MailgateClientError,
    MailgateConnectionError,
    MessageDetail,
    NotFoundError,
    OutgoingAttachment,
    PermissionDeniedError,
    RateLimitError,
    RetryPolicy,
    ServiceUnavailableError,
    ValidationError,
    idempotency_key,
)
from mailgate.config import Settings
from mailgate.runtime import Runtime
from mailgate.testing import build_message
from mailgate.testing.gateway import RunningGateway, running_gateway
from tests.conftest import AgentHandle, make_agent
from tests.integration.api_support import deliver
from tests.integration.outbound_support import count_outbound, set_tier


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def gateway(settings: Settings) -> Iterator[RunningGateway]:
    with running_gateway(settings) as gw:
        yield gw


@pytest.fixture
def bot(gateway: RunningGateway) -> AgentHandle:
    return make_agent(gateway.runtime)


@pytest.fixture
def mg(gateway: RunningGateway, bot: AgentHandle) -> Iterator[Mailgate]:
    with Mailgate(gateway.http_url, bot.agent_key) as client:
        yield client


def mail(gateway: RunningGateway, to: str, **message: Any) -> None:
    """One message over real SMTP (``250`` means it is committed)."""
    with smtplib.SMTP(gateway.smtp_host, gateway.smtp_port) as smtp:
        smtp.sendmail("alice@example.com", [to], build_message(to=to, **message))


async def amail(gateway: RunningGateway, to: str, **message: Any) -> None:
    await aiosmtplib.send(
        build_message(to=to, **message),
        sender="alice@example.com",
        recipients=[to],
        hostname=gateway.smtp_host,
        port=gateway.smtp_port,
    )


def no_wait(_: float) -> None:
    """Retries in tests do not wait: what they were asked to wait is asserted instead."""


# -- reading ----------------------------------------------------------------------------


def test_mail_that_arrived_over_smtp_is_listed_paged_and_iterated_newest_first(
    gateway: RunningGateway, bot: AgentHandle, mg: Mailgate
) -> None:
    for n in range(5):
        mail(gateway, bot.address, subject=f"order {n}")

    first = mg.messages.list(limit=2)
    assert [m.subject for m in first.items] == ["order 4", "order 3"]
    assert first.next_cursor is not None
    second = mg.messages.list(limit=2, cursor=first.next_cursor)
    assert [m.subject for m in second.items] == ["order 2", "order 1"]

    every = list(mg.messages.iter(page_size=2))
    assert [m.subject for m in every] == [f"order {n}" for n in (4, 3, 2, 1, 0)]
    assert {m.folder for m in every} == {"inbox"}
    assert every[0].from_ is not None and every[0].from_.address == "alice@example.com"
    assert list(mg.messages.iter(from_="nobody@example.com")) == []


def test_a_message_its_raw_bytes_and_its_attachment_are_read_as_they_arrived(
    gateway: RunningGateway, bot: AgentHandle, mg: Mailgate
) -> None:
    mail(
        gateway,
        bot.address,
        subject="Invoice",
        body="Please find it attached.\n",
        attachments=[("notes.txt", "text/plain", "Total: 42 €\n".encode())],
    )
    [summary] = mg.messages.list().items

    detail = mg.messages.get(summary.message_id)
    assert isinstance(detail, MessageDetail)
    assert detail.text == "Please find it attached.\n"
    assert detail.envelope is not None and detail.envelope.source == "smtp"
    [attachment] = detail.attachments
    assert attachment.filename == "notes.txt"

    raw = mg.messages.raw(summary.message_id)
    assert b"Subject: Invoice" in raw
    assert mg.messages.attachment(summary.message_id, attachment.attachment_id) == (
        "Total: 42 €\n".encode()
    )
    readable = mg.messages.attachment_text(summary.message_id, attachment.attachment_id)
    assert readable.extracted and readable.text is not None
    assert readable.text.strip() == "Total: 42 €"
    assert detail.extracted_text is not None
    assert detail.extracted_text.strip() == "Please find it attached."

    thread = mg.threads.get(summary.thread_id)
    assert [m.message_id for m in thread.messages] == [summary.message_id]
    assert [t.thread_id for t in mg.threads.iter()] == [summary.thread_id]


# -- events -----------------------------------------------------------------------------


def test_a_pulled_event_is_leased_then_acked_once_and_a_second_ack_is_reported(
    gateway: RunningGateway, bot: AgentHandle, mg: Mailgate
) -> None:
    mail(gateway, bot.address, subject="ping")

    [event] = mg.events.pull(limit=5, lease_seconds=30)
    assert event.type == "message.received"
    assert event.delivery_count == 1
    assert event.message_id == mg.messages.list().items[0].message_id
    assert mg.events.pull(limit=5) == []  # leased: hidden from other pullers

    assert mg.events.ack(event).acked == [event.event_id]
    again = mg.events.ack([event.event_id])
    assert again.acked == [] and again.already_acked == [event.event_id]


def test_a_nacked_event_comes_back_with_its_delivery_count_raised(
    gateway: RunningGateway, bot: AgentHandle, mg: Mailgate
) -> None:
    mail(gateway, bot.address)
    [event] = mg.events.pull(consumer="worker")

    assert mg.events.nack(event, consumer="worker").nacked == [event.event_id]
    [again] = mg.events.pull(consumer="worker")
    assert again.event_id == event.event_id
    assert again.delivery_count == 2
    assert mg.events.extend(again, 60, consumer="worker").extended == [event.event_id]


# -- sending ----------------------------------------------------------------------------


def test_a_reply_repeated_with_the_same_key_is_replayed_and_sent_once(
    gateway: RunningGateway, bot: AgentHandle, mg: Mailgate
) -> None:
    mail(gateway, bot.address, subject="Question")
    [event] = mg.events.pull()
    message_id = event.message_id
    assert message_id is not None
    key = idempotency_key("reply", event.event_id, message_id)

    first = mg.reply(message_id, text="On it.", idempotency_key=key)
    assert first.decision.action == "allow"
    assert [s.step for s in first.decision.steps][:2] == ["key_scope", "tier"]
    assert first.subject == "Re: Question"
    assert not first.replayed and first.idempotency_key == key

    second = mg.reply(message_id, text="On it.", idempotency_key=key)
    assert second.replayed
    assert second.id == first.id
    assert count_outbound(gateway.runtime, kind="reply") == 1

    with pytest.raises(ValidationError) as reused:
        mg.reply(message_id, text="Something else.", idempotency_key=key)
    assert reused.value.code == "idempotency_key_reused"
    assert count_outbound(gateway.runtime, kind="reply") == 1


class LoseFirstAnswer(httpx.BaseTransport):
    """Forwards requests to the real gateway but drops the first answer to ``path``
    after the gateway processed it: the client sees a reset connection."""

    def __init__(self, path: str) -> None:
        self.inner = httpx.HTTPTransport()
        self.path = path
        self.keys: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.url.path != self.path:
            return response
        self.keys.append(request.headers.get("Idempotency-Key"))
        if len(self.keys) == 1:
            response.read()
            response.close()
            raise httpx.ReadError("connection reset after the request was sent", request=request)
        return response

    def close(self) -> None:
        self.inner.close()


def test_a_reply_whose_answer_was_lost_is_retried_with_the_key_made_for_that_call(
    gateway: RunningGateway, bot: AgentHandle
) -> None:
    mail(gateway, bot.address)
    transport = LoseFirstAnswer("/v1/reply")
    with Mailgate(gateway.http_url, bot.agent_key, transport=transport, sleep=no_wait) as mg:
        [message] = mg.messages.list().items

        result = mg.reply(message.message_id, text="Thanks!")  # no key given

    first_key, second_key = transport.keys
    assert first_key is not None and first_key == second_key == result.idempotency_key
    assert result.replayed  # the retry got the first attempt's stored answer
    assert count_outbound(gateway.runtime, kind="reply") == 1


def test_two_calls_without_a_key_get_different_keys_and_are_two_requests(
    gateway: RunningGateway, bot: AgentHandle, mg: Mailgate
) -> None:
    mail(gateway, bot.address)
    [message] = mg.messages.list().items

    one = mg.reply(message.message_id, text="First.")
    two = mg.reply(message.message_id, text="Second.")

    assert one.idempotency_key != two.idempotency_key
    assert count_outbound(gateway.runtime, kind="reply") == 2


def test_held_mail_is_listed_approved_once_and_a_second_verdict_conflicts(
    gateway: RunningGateway, bot: AgentHandle, mg: Mailgate
) -> None:
    set_tier(gateway.runtime, bot.agent_id, "open")
    rule = {
        "name": "external mail needs approval",
        "agent_id": bot.agent_id,
        "direction": "outbound",
        "action": "require_approval",
        "condition": {"field": "to", "match": "glob", "value": "*@example.com"},
    }
    created = httpx.post(
        f"{gateway.http_url}/v1/rules",
        json=rule,
        headers={"Authorization": f"Bearer {bot.owner_key}"},
    )
    assert created.status_code == 201, created.text

    held = mg.send(
        to="carol@example.com",
        subject="Quote",
        text="Attached.",
        attachments=[
            OutgoingAttachment(filename="q.txt", content=b"42", content_type="text/plain")
        ],
        idempotency_key=idempotency_key("quote", "carol"),
    )
    assert held.decision.action == "hold"
    assert held.status == "pending_approval"

    with Mailgate(gateway.http_url, bot.owner_key) as owner:
        pending = owner.outbound.list(status="pending_approval")
        assert [o.id for o in pending.items] == [held.id]
        approved = owner.outbound.approve(held.id, comment="fine")
        assert approved.status != "pending_approval"
        assert [a["verdict"] for a in approved.approvals] == ["approved"]
        with pytest.raises(ConflictError) as second:
            owner.outbound.reject(held.id)
        assert second.value.code == "already_decided"
        assert owner.outbound.get(held.id).decision is not None


def test_a_message_is_trashed_listed_in_the_trash_and_restored(
    gateway: RunningGateway, bot: AgentHandle, mg: Mailgate
) -> None:
    mail(gateway, bot.address)
    [message] = mg.messages.list().items

    moved = mg.messages.trash(message.message_id)
    assert (moved.transition.from_folder, moved.transition.to_folder) == ("inbox", "trash")
    assert [m.message_id for m in mg.trash.list().items] == [message.message_id]
    with pytest.raises(ConflictError) as twice:
        mg.messages.trash(message.message_id)
    assert twice.value.code == "invalid_folder_transition"

    assert mg.messages.restore(message.message_id).message.folder == "inbox"


# -- errors -----------------------------------------------------------------------------


def test_error_answers_become_typed_errors_with_the_gateways_code(
    gateway: RunningGateway, bot: AgentHandle, mg: Mailgate
) -> None:
    with pytest.raises(NotFoundError) as missing:
        mg.messages.get("msg_does_not_exist")
    assert (missing.value.status, missing.value.code) == (404, "not_found")

    with pytest.raises(ValidationError) as invalid:
        mg.messages.list(limit=0)
    assert invalid.value.code == "validation_failed"
    assert [e["field"] for e in invalid.value.errors] == ["limit"]

    with pytest.raises(PermissionDeniedError) as forbidden:
        mg.review.list()
    assert forbidden.value.code == "missing_scope"

    with (
        Mailgate(gateway.http_url, "mg_nope_notasecret") as stranger,
        pytest.raises(AuthenticationError) as unauthorized,
    ):
        stranger.messages.list()
    assert (unauthorized.value.status, unauthorized.value.code) == (401, "invalid_api_key")


def test_the_url_and_key_fall_back_to_the_environment(
    gateway: RunningGateway, bot: AgentHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAILGATE_URL", gateway.http_url)
    monkeypatch.setenv("MAILGATE_API_KEY", bot.agent_key)
    with Mailgate() as mg:
        assert mg.messages.list().items == []

    monkeypatch.delenv("MAILGATE_API_KEY")
    with pytest.raises(MailgateClientError, match="MAILGATE_API_KEY"):
        Mailgate()


# -- the consumer helper ----------------------------------------------------------------


def test_the_consumer_acks_after_its_handler_returns_and_nacks_when_it_raises(
    gateway: RunningGateway, bot: AgentHandle, mg: Mailgate
) -> None:
    mail(gateway, bot.address, subject="flaky")
    seen: list[tuple[str, int]] = []

    def handler(event: Event) -> None:
        seen.append((event.event_id, event.delivery_count))
        if event.delivery_count == 1:
            raise RuntimeError("downstream is down")

    consumer = Consumer(mg, handler, consumer="workers", batch=5, wait=0, nack_delay=0)

    failed = consumer.run_once()
    assert failed.acked == [] and len(failed.nacked) == 1
    succeeded = consumer.run_once()
    assert succeeded.acked == failed.nacked
    assert consumer.run_once().acked == []  # nothing left: the ack held

    [event_id] = failed.nacked
    assert seen == [(event_id, 1), (event_id, 2)]


def test_the_consumer_run_loop_stops_when_asked(
    gateway: RunningGateway, bot: AgentHandle, mg: Mailgate
) -> None:
    mail(gateway, bot.address)
    stop = threading.Event()
    handled: list[str] = []

    def handler(event: Event) -> None:
        handled.append(event.type)
        stop.set()

    Consumer(mg, handler, consumer="loop", wait=0.2).run(stop)

    assert handled == ["message.received"]
    assert mg.events.pull(consumer="loop") == []


# -- the async client -------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_async_client_reads_pages_and_iterates_with_async_for(
    gateway: RunningGateway, bot: AgentHandle
) -> None:
    for n in range(3):
        await amail(gateway, bot.address, subject=f"async {n}")

    async with AsyncMailgate(gateway.http_url, bot.agent_key) as mg:
        page = await mg.messages.list(limit=2)
        assert len(page.items) == 2 and page.next_cursor is not None
        subjects = [m.subject async for m in mg.messages.iter(page_size=2)]
        assert subjects == ["async 2", "async 1", "async 0"]

        detail = await mg.messages.get(page.items[0].message_id)
        assert detail.subject == "async 2"
        assert b"Subject: async 2" in await mg.messages.raw(detail.message_id)
        threads = [t async for t in mg.threads.iter()]
        assert len(threads) == 3

        with pytest.raises(NotFoundError):
            await mg.threads.get("thr_missing")


@pytest.mark.anyio
async def test_the_async_client_replies_once_under_a_derived_key_and_acks(
    gateway: RunningGateway, bot: AgentHandle
) -> None:
    await amail(gateway, bot.address, subject="Async question")
    async with AsyncMailgate(gateway.http_url, bot.agent_key) as mg:
        [event] = await mg.events.pull(wait=1)
        assert event.message_id is not None
        key = idempotency_key("reply", event.event_id, event.message_id)

        first = await mg.reply(event.message_id, text="Yes.", idempotency_key=key)
        again = await mg.reply(event.message_id, text="Yes.", idempotency_key=key)

        assert (first.replayed, again.replayed) == (False, True)
        assert again.id == first.id
        assert (await mg.events.ack(event)).acked == [event.event_id]
    assert count_outbound(gateway.runtime, kind="reply") == 1


class AsyncLoseFirstAnswer(httpx.AsyncBaseTransport):
    def __init__(self, path: str) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.path = path
        self.keys: list[str | None] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.url.path != self.path:
            return response
        self.keys.append(request.headers.get("Idempotency-Key"))
        if len(self.keys) == 1:
            await response.aread()
            await response.aclose()
            raise httpx.ReadError("connection reset after the request was sent", request=request)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.anyio
async def test_the_async_client_retries_a_lost_send_with_the_same_key(
    gateway: RunningGateway, bot: AgentHandle
) -> None:
    set_tier(gateway.runtime, bot.agent_id, "open")
    transport = AsyncLoseFirstAnswer("/v1/send")
    waits: list[float] = []

    async def record(seconds: float) -> None:
        waits.append(seconds)

    async with AsyncMailgate(
        gateway.http_url, bot.agent_key, transport=transport, sleep=record
    ) as mg:
        result = await mg.send(to="dave@example.net", subject="Hello", text="Hi")

    assert result.replayed and len(waits) == 1
    assert transport.keys == [result.idempotency_key, result.idempotency_key]
    assert count_outbound(gateway.runtime, kind="send") == 1


@pytest.mark.anyio
async def test_the_async_consumer_redelivers_a_failed_event_and_acks_it_once_handled(
    gateway: RunningGateway, bot: AgentHandle
) -> None:
    await amail(gateway, bot.address)
    handled: list[int] = []

    async def handler(event: Event) -> None:
        if event.delivery_count == 1:
            raise RuntimeError("model timed out")
        handled.append(event.delivery_count)

    async with AsyncMailgate(gateway.http_url, bot.agent_key) as mg:
        consumer = AsyncConsumer(mg, handler, consumer="async-workers", wait=0, nack_delay=0)
        first = await consumer.run_once()
        second = await consumer.run_once()
        third = await consumer.run_once()

    assert len(first.nacked) == 1 and first.acked == []
    assert second.acked == first.nacked
    assert third.acked == third.nacked == []
    assert handled == [2]


@pytest.mark.anyio
async def test_the_async_consumer_run_stops_when_asked(
    gateway: RunningGateway, bot: AgentHandle
) -> None:
    await amail(gateway, bot.address)
    stop = anyio.Event()
    handled: list[str] = []

    def handler(event: Event) -> None:  # a plain function works too
        handled.append(event.event_id)
        stop.set()

    async with AsyncMailgate(gateway.http_url, bot.agent_key) as mg:
        consumer = AsyncConsumer(mg, handler, consumer="runner", wait=0.2)
        with anyio.fail_after(10):
            await consumer.run(stop)
        assert await mg.events.pull(consumer="runner") == []
    assert len(handled) == 1


@pytest.mark.anyio
async def test_the_async_client_runs_in_process_over_an_asgi_transport(runtime: Runtime) -> None:
    handle = make_agent(runtime)
    stored = deliver(runtime, handle, subject="in process")
    transport = httpx.ASGITransport(app=create_app(runtime))

    async with AsyncMailgate("http://mailgate.test", handle.agent_key, transport=transport) as mg:
        [message] = (await mg.messages.list()).items
        [event] = await mg.events.pull()

    assert message.message_id == stored.message_id
    assert event.message_id == stored.message_id


# -- retries, against a mock transport --------------------------------------------------


def problem(status: int, code: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": f"urn:mailgate:problem:{code}",
        "title": code,
        "status": status,
        "detail": code.replace("_", " "),
        "code": code,
        **extra,
    }


EMPTY_PAGE: dict[str, Any] = {"messages": [], "next_cursor": None}
SENT = {"id": "out_1", "status": "queued", "decision": {"action": "allow", "steps": []}}


class Script:
    """A mock gateway answering from a list, recording each request."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def client(self, **kwargs: Any) -> tuple[Mailgate, list[float]]:
        waits: list[float] = []
        client = Mailgate(
            "http://mailgate.test",
            "mg_k_secret",
            transport=httpx.MockTransport(self),
            sleep=waits.append,
            **kwargs,
        )
        return client, waits


def unavailable(**headers: str) -> httpx.Response:
    return httpx.Response(503, json=problem(503, "unavailable", retryable=True), headers=headers)


def test_a_503_with_retry_after_in_seconds_is_waited_out_exactly_then_retried() -> None:
    script = Script(unavailable(**{"Retry-After": "7"}), httpx.Response(200, json=EMPTY_PAGE))
    client, waits = script.client()

    assert client.messages.list().items == []
    assert waits == [7.0]
    assert len(script.requests) == 2


def test_a_retry_after_given_as_an_http_date_is_honoured() -> None:
    when = datetime.now(UTC) + timedelta(seconds=30)
    script = Script(
        httpx.Response(
            429,
            json=problem(429, "rate_limited"),
            headers={"Retry-After": format_datetime(when, usegmt=True)},
        ),
        httpx.Response(200, json=EMPTY_PAGE),
    )
    client, waits = script.client()

    client.messages.list()
    [waited] = waits
    assert 27 < waited <= 30


def test_without_retry_after_the_waits_back_off_exponentially_within_their_bounds() -> None:
    script = Script(unavailable(), unavailable(), unavailable(), unavailable())
    policy = RetryPolicy(max_retries=3, backoff_base=0.5, backoff_max=8.0, jitter=lambda: 1.0)
    client, waits = script.client(retry=policy)

    with pytest.raises(ServiceUnavailableError) as failed:
        client.messages.list()
    assert waits == [0.5, 1.0, 2.0]
    assert failed.value.code == "unavailable" and failed.value.retryable
    assert len(script.requests) == 4


def test_jitter_spreads_each_wait_below_its_ceiling() -> None:
    draws = iter([0.25, 0.5, 0.75])
    policy = RetryPolicy(backoff_base=1.0, backoff_max=3.0, jitter=lambda: next(draws))
    assert [policy.backoff(n) for n in range(3)] == [0.25, 1.0, 2.25]


def test_a_retry_after_longer_than_the_policy_allows_raises_at_once() -> None:
    script = Script(
        httpx.Response(429, json=problem(429, "rate_limited"), headers={"Retry-After": "3600"})
    )
    client, waits = script.client()

    with pytest.raises(RateLimitError) as limited:
        client.messages.list()
    assert limited.value.retry_after == 3600.0
    assert waits == []


def test_an_idempotency_conflict_in_flight_is_retried_with_the_same_key() -> None:
    script = Script(
        httpx.Response(409, json=problem(409, "idempotency_in_flight", retryable=True)),
        httpx.Response(201, json=SENT, headers={"Idempotent-Replayed": "true"}),
    )
    client, _ = script.client()

    result = client.reply("msg_1", text="hi")

    assert result.replayed
    keys = [r.headers["Idempotency-Key"] for r in script.requests]
    assert keys == [result.idempotency_key] * 2


def test_other_conflicts_are_not_retried() -> None:
    script = Script(httpx.Response(409, json=problem(409, "already_decided")))
    client, _ = script.client()

    with pytest.raises(ConflictError):
        client.outbound.approve("out_1")
    assert len(script.requests) == 1


def test_an_approval_is_never_retried_even_when_the_gateway_asks_to_wait() -> None:
    request = httpx.Request("POST", "http://mailgate.test/v1/outbound/out_1/approve")
    script = Script(unavailable(**{"Retry-After": "1"}))
    client, waits = script.client()
    with pytest.raises(ServiceUnavailableError):
        client.outbound.approve("out_1")

    dropped = Script(httpx.ReadError("reset", request=request))
    client, waits = dropped.client()
    with pytest.raises(MailgateConnectionError):
        client.messages.trash("msg_1")
    assert len(script.requests) == len(dropped.requests) == 1
    assert waits == []


def test_connect_errors_are_retried_for_reads_and_acks_then_raised() -> None:
    request = httpx.Request("GET", "http://mailgate.test/v1/messages")
    script = Script(
        httpx.ConnectError("refused", request=request),
        httpx.Response(200, json={"acked": ["evt_1"], "already_acked": [], "not_found": []}),
        *[httpx.ConnectError("refused", request=request)] * 3,
    )
    client, _ = script.client(max_retries=2)

    assert client.events.ack("evt_1").acked == ["evt_1"]
    with pytest.raises(MailgateConnectionError):
        client.messages.list()
    assert len(script.requests) == 5


def test_an_answer_that_is_not_a_problem_still_maps_to_a_typed_error() -> None:
    script = Script(httpx.Response(502, text="<html>bad gateway</html>"))
    client, _ = script.client()

    with pytest.raises(MailgateClientError) as failed:
        client.messages.get("msg_1")
    assert getattr(failed.value, "code", None) == "http_502"


def test_idempotency_keys_are_stable_and_unambiguous() -> None:
    key = idempotency_key("reply", "evt_1", "msg_1")
    assert key == idempotency_key("reply", "evt_1", "msg_1")
    assert key != idempotency_key("reply", "evt_1", "msg_2")
    assert idempotency_key("a", "bc") != idempotency_key("ab", "c")
    assert key.startswith("mgk_") and len(key) <= 255
    with pytest.raises(ValueError):
        idempotency_key()


def test_the_client_package_imports_nothing_else_from_mailgate() -> None:
    """It may ship as its own distribution: a fresh interpreter importing it loads no
    other ``mailgate`` module."""
    code = (
        "import json, sys, mailgate.client; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('mailgate.')"
        " and not m.startswith('mailgate.client'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
