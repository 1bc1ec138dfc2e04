"""Provider webhooks refusing what they must, on SQLite and PostgreSQL: credentials and
signatures (401), disabled endpoints (404), malformed forms and JSON (400 naming the
field), bodies over the limit (413 before they are read whole), and five concurrent
copies of one delivery stored once."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.api_support import api_client, problem_code
from tests.integration.test_webhooks import (
    NOW,
    PDF,
    PM_PASSWORD,
    PM_USER,
    RAW_TOKEN,
    SG_SECRET,
    SG_USER,
    Gateway,
    basic,
    build_gateway,
    mailgun_parsed,
    mailgun_sign,
    message_count,
    multipart,
    postmark_payload,
    raw_message,
    sendgrid_parsed,
    signed_post,
)

pytestmark = pytest.mark.anyio

LIMIT = 64 * 1024


@pytest.fixture
def gateway(tmp_path: Path, database_url: str) -> Iterator[Gateway]:
    yield from build_gateway(tmp_path, database_url)


@pytest.fixture
def small(tmp_path: Path, database_url: str) -> Iterator[Gateway]:
    """Bodies over 64 KiB refused; messages over 32 KiB too."""
    yield from build_gateway(
        tmp_path, database_url, inbound_max_body_bytes=LIMIT, max_message_size=32 * 1024
    )


@pytest.fixture
def closed(tmp_path: Path, database_url: str) -> Iterator[Gateway]:
    """No webhook secret configured: every endpoint is off."""
    yield from build_gateway(
        tmp_path,
        database_url,
        inbound_sendgrid_secret=None,
        inbound_mailgun_signing_key=None,
        inbound_postmark_password=None,
        inbound_raw_token=None,
    )


def refusal(response: httpx.Response) -> tuple[int, str, str | None]:
    body = response.json()
    return response.status_code, problem_code(response), body.get("reason")


class CountingBody:
    """A request body of unknown length that counts the chunks the server pulled."""

    def __init__(self, chunks: int, size: int = 16 * 1024) -> None:
        self.total = chunks
        self.size = size
        self.pulled = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.total):
            self.pulled += 1
            yield b"x" * self.size


# --------------------------------------------------------------------------- auth


@pytest.mark.parametrize("endpoint", ["sendgrid", "mailgun", "mailgun/mime", "postmark", "raw"])
async def test_an_endpoint_without_its_secret_is_disabled(closed: Gateway, endpoint: str) -> None:
    async with api_client(closed.runtime) as client:
        response = await client.post(f"/inbound/{endpoint}", content=b"x")

    assert (response.status_code, problem_code(response)) == (404, "inbound_disabled")


@pytest.mark.parametrize(
    ("headers", "path", "reason"),
    [
        ({}, "/inbound/sendgrid", "missing_credentials"),
        (basic(SG_USER, "wrong"), "/inbound/sendgrid", "bad_credentials"),
        (basic("someone", SG_SECRET), "/inbound/sendgrid", "bad_credentials"),
        ({}, "/inbound/sendgrid/wrong-secret", "bad_credentials"),
        ({"Authorization": f"Bearer {SG_SECRET}"}, "/inbound/sendgrid", "bad_credentials"),
    ],
)
async def test_sendgrid_without_the_secret_is_refused(
    gateway: Gateway, headers: dict[str, str], path: str, reason: str
) -> None:
    body, form_headers = multipart(sendgrid_parsed(gateway.support.address, attachments="0"))
    async with api_client(gateway.runtime) as client:
        response = await client.post(path, content=body, headers={**form_headers, **headers})

    assert refusal(response) == (401, "invalid_signature", reason)
    if path == "/inbound/sendgrid":
        assert response.headers["www-authenticate"].startswith("Basic ")
    assert message_count(gateway.runtime) == 0


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "missing_credentials"),
        (basic(PM_USER, "wrong"), "bad_credentials"),
        ({"Authorization": "Basic !!!not-base64"}, "bad_credentials"),
    ],
)
async def test_postmark_without_its_basic_credentials_is_refused(
    gateway: Gateway, headers: dict[str, str], reason: str
) -> None:
    async with api_client(gateway.runtime) as client:
        response = await client.post(
            "/inbound/postmark", json=postmark_payload(gateway.support.address), headers=headers
        )

    assert refusal(response) == (401, "invalid_signature", reason)
    assert response.headers["www-authenticate"].startswith("Basic ")


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "missing_credentials"),
        ({"Authorization": "Bearer wrong"}, "bad_credentials"),
        (basic("raw", RAW_TOKEN), "bad_credentials"),
    ],
)
async def test_raw_without_its_bearer_token_is_refused(
    gateway: Gateway, headers: dict[str, str], reason: str
) -> None:
    async with api_client(gateway.runtime) as client:
        response = await client.post(
            "/inbound/raw", content=raw_message(gateway.support.address), headers=headers
        )

    assert refusal(response) == (401, "invalid_signature", reason)
    assert response.headers["www-authenticate"].startswith("Bearer ")


def _forged(form: dict[str, str | bytes]) -> dict[str, str | bytes]:
    return {**form, "signature": "0" * 64}


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (_forged, "bad_signature"),
        (lambda f: {**f, "token": "c" * 50}, "bad_signature"),  # signature of another token
        (lambda f: {k: v for k, v in f.items() if k != "signature"}, "missing_signature"),
        (lambda f: mailgun_sign(f, key="someone-elses-key"), "bad_signature"),
        (lambda f: mailgun_sign(f, at=NOW - timedelta(hours=9, minutes=1)), "stale_timestamp"),
        (lambda f: mailgun_sign(f, at=NOW + timedelta(hours=9, minutes=1)), "stale_timestamp"),
    ],
)
async def test_a_mailgun_post_whose_signature_does_not_hold_is_refused(
    gateway: Gateway, tamper: Any, reason: str
) -> None:
    form = mailgun_sign(mailgun_parsed(gateway.support.address, **{"attachment-count": "0"}))
    async with api_client(gateway.runtime) as client:
        response = await client.post("/inbound/mailgun", data=tamper(form))

    assert refusal(response) == (401, "invalid_signature", reason)
    assert message_count(gateway.runtime) == 0


async def test_a_replayed_mailgun_token_with_another_body_is_refused(gateway: Gateway) -> None:
    to = gateway.support.address
    genuine = mailgun_sign(mailgun_parsed(to, **{"attachment-count": "0"}))
    # The captured timestamp/token/signature, re-used with a message of the attacker's.
    forged = {**genuine, "subject": "Wire the money", "body-plain": "Now, please."}
    forged["message-headers"] = json.dumps([["Subject", "Wire the money"], ["To", to]])
    async with api_client(gateway.runtime) as client:
        first = await client.post("/inbound/mailgun", data=genuine)
        replay = await client.post("/inbound/mailgun", data=forged)

    assert first.status_code == 200
    assert refusal(replay) == (401, "invalid_signature", "replayed_token")
    assert message_count(gateway.runtime) == 1


async def test_credentials_are_checked_before_the_body_is_read(gateway: Gateway) -> None:
    body = CountingBody(chunks=100)
    async with api_client(gateway.runtime) as client:
        response = await client.post(
            "/inbound/raw", content=body, headers={"Authorization": "Bearer wrong"}
        )

    assert response.status_code == 401
    assert body.pulled == 0


# --------------------------------------------------------------------------- malformed


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"envelope": "{not json"}, "envelope"),
        ({"charsets": "[1, 2]"}, "charsets"),
        ({"attachment-info": "nope"}, "attachment-info"),
        ({"attachments": "2"}, "attachment2"),  # counted but not posted
        ({"attachments": "many"}, "attachments"),
    ],
)
async def test_a_malformed_sendgrid_form_is_a_400_naming_the_field(
    gateway: Gateway, overrides: dict[str, str], field: str
) -> None:
    form = sendgrid_parsed(gateway.support.address, **overrides)
    body, headers = multipart(form, {"attachment1": ("cv.pdf", "application/pdf", PDF)})
    async with api_client(gateway.runtime) as client:
        response = await client.post(
            f"/inbound/sendgrid/{SG_SECRET}", content=body, headers=headers
        )

    assert (response.status_code, problem_code(response)) == (400, "bad_request")
    assert [e["field"] for e in response.json()["errors"]] == [field]


@pytest.mark.parametrize(
    ("body", "content_type", "field"),
    [
        (b"--xYzZY\r\nContent-Disposition: form-data; name=\"to\"\r\n\r\nx", "multipart/form-data; boundary=xYzZY", "body"),  # noqa: E501
        (b"--xYzZY\r\nContent-Disposition: form-data\r\n\r\nx\r\n--xYzZY--", "multipart/form-data; boundary=xYzZY", "body"),  # noqa: E501
        (b"no boundary here", "multipart/form-data; boundary=xYzZY", "body"),
        (b"x", "multipart/form-data", "Content-Type"),
        (b"{}", "application/json", "Content-Type"),
    ],
)  # fmt: skip
async def test_a_body_that_is_not_a_well_formed_form_is_a_400_naming_the_field(
    gateway: Gateway, body: bytes, content_type: str, field: str
) -> None:
    async with api_client(gateway.runtime) as client:
        response = await client.post(
            f"/inbound/sendgrid/{SG_SECRET}", content=body, headers={"Content-Type": content_type}
        )

    assert (response.status_code, problem_code(response)) == (400, "bad_request")
    assert [e["field"] for e in response.json()["errors"]] == [field]


async def test_a_malformed_mailgun_form_is_a_400_naming_the_field(gateway: Gateway) -> None:
    form = mailgun_sign(
        mailgun_parsed(
            gateway.support.address, **{"attachment-count": "0", "message-headers": "{]"}
        )
    )
    async with api_client(gateway.runtime) as client:
        response = await client.post("/inbound/mailgun", data=form)

    assert (response.status_code, problem_code(response)) == (400, "bad_request")
    assert [e["field"] for e in response.json()["errors"]] == ["message-headers"]


@pytest.mark.parametrize(
    ("content", "field"),
    [
        (b'{"Subject": "unterminated', "body"),
        (b"\xff\xfe not utf-8", "body"),
        (b"[" * 100_000, "body"),  # nesting past the recursion limit
        (b"[]", "body"),
        (json.dumps({"ToFull": "not a list"}).encode(), "ToFull"),
        (
            json.dumps({"Attachments": [{"Content": "not base64!"}]}).encode(),
            "Attachments[0].Content",
        ),
    ],
)
async def test_malformed_postmark_json_is_a_400_naming_the_field(
    gateway: Gateway, content: bytes, field: str
) -> None:
    async with api_client(gateway.runtime) as client:
        response = await client.post(
            "/inbound/postmark",
            content=content,
            headers={**basic(PM_USER, PM_PASSWORD), "Content-Type": "application/json"},
        )

    assert (response.status_code, problem_code(response)) == (400, "bad_request")
    assert [e["field"] for e in response.json()["errors"]] == [field]


@pytest.mark.parametrize(
    ("content", "content_type", "field"),
    [(b"", "message/rfc822", "body"), (b"x", "application/json", "Content-Type")],
)
async def test_a_raw_post_that_is_no_message_is_a_400(
    gateway: Gateway, content: bytes, content_type: str, field: str
) -> None:
    async with api_client(gateway.runtime) as client:
        response = await client.post(
            "/inbound/raw",
            content=content,
            headers={"Authorization": f"Bearer {RAW_TOKEN}", "Content-Type": content_type},
        )

    assert (response.status_code, problem_code(response)) == (400, "bad_request")
    assert [e["field"] for e in response.json()["errors"]] == [field]


# --------------------------------------------------------------------------- size


async def test_a_declared_length_over_the_limit_is_refused_before_reading(small: Gateway) -> None:
    body = CountingBody(chunks=8)  # 128 KiB, declared up front
    async with api_client(small.runtime) as client:
        response = await client.post(
            "/inbound/raw",
            content=body,
            headers={
                "Authorization": f"Bearer {RAW_TOKEN}",
                "Content-Length": str(body.total * body.size),
            },
        )

    assert refusal(response)[:2] == (413, "payload_too_large")
    assert body.pulled == 0


@pytest.mark.parametrize("endpoint", ["sendgrid", "mailgun", "postmark", "raw"])
async def test_a_chunked_body_over_the_limit_stops_being_read_at_the_limit(
    small: Gateway, endpoint: str
) -> None:
    body = CountingBody(chunks=1000)  # 16 MB, of unknown length
    headers = {
        "sendgrid": basic(SG_USER, SG_SECRET) | {"Content-Type": "multipart/form-data; boundary=b"},
        "mailgun": {"Content-Type": "application/x-www-form-urlencoded"},
        "postmark": basic(PM_USER, PM_PASSWORD) | {"Content-Type": "application/json"},
        "raw": {"Authorization": f"Bearer {RAW_TOKEN}"},
    }[endpoint]
    async with api_client(small.runtime) as client:
        response = await client.post(f"/inbound/{endpoint}", content=body, headers=headers)

    assert "content-length" not in response.request.headers
    assert refusal(response)[:2] == (413, "payload_too_large")
    assert body.pulled == LIMIT // body.size + 1  # the chunk that crossed the limit


async def test_a_built_message_over_max_message_size_is_413(small: Gateway) -> None:
    """A body under the 64 KiB request limit whose attachment builds a message over
    the 32 KiB message limit: accepted as a request, refused as a message."""
    big = bytes(range(256)) * 144  # 36 KiB, 48 KiB as base64
    attachment = {"Name": "big.bin", "Content": base64.b64encode(big).decode()}
    content = json.dumps(postmark_payload(small.support.address, Attachments=[attachment]))
    assert len(content) < LIMIT
    async with api_client(small.runtime) as client:
        response = await client.post(
            "/inbound/postmark", content=content, headers=basic(PM_USER, PM_PASSWORD)
        )

    assert refusal(response)[:2] == (413, "message_too_large")
    assert message_count(small.runtime) == 0


# --------------------------------------------------------------------------- concurrency


@pytest.mark.parametrize("endpoint", ["sendgrid", "mailgun", "postmark", "raw"])
async def test_a_webhook_delivered_five_times_at_once_is_stored_once(
    gateway: Gateway, endpoint: str
) -> None:
    request = signed_post(endpoint, gateway.support.address)
    await gateway.runtime.attach_loop()  # group commit on this loop, as `mailgate serve` runs
    try:
        async with api_client(gateway.runtime) as client:
            responses = await asyncio.gather(
                *(client.post(f"/inbound/{endpoint}", **request) for _ in range(5))
            )
    finally:
        await gateway.runtime.detach_loop()

    assert [r.status_code for r in responses] == [200] * 5, [r.text for r in responses]
    stored = [r.json()["stored"][0] for r in responses]
    assert len({s["message_id"] for s in stored}) == 1
    assert sorted(s["duplicate"] for s in stored) == [False, True, True, True, True]
    assert message_count(gateway.runtime) == 1
