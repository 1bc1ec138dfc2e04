"""STARTTLS on the SMTP ingress with a certificate from a throwaway CA (trustme)."""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trustme

from mailgate.errors import ConfigError
from mailgate.ingress.smtp import SmtpIngress
from mailgate.runtime import Runtime
from mailgate.testing import build_message
from tests.conftest import AgentHandle
from tests.integration.test_smtp import (
    BOUND,
    HOST,
    OPEN,
    RawClient,
    Step,
    body,
    converse,
    count_messages,
    stored_rows,
    with_settings,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def cert_files(ca: trustme.CA, tmp_path: Path) -> tuple[Path, Path]:
    issued = ca.issue_cert(HOST, "mailgate.localhost")
    cert, key = tmp_path / "smtp.crt", tmp_path / "smtp.key"
    cert.write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    return cert, key


@pytest.fixture
def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def tls_runtime(runtime: Runtime, cert_files: tuple[Path, Path], **changes: Any) -> Runtime:
    cert, key = cert_files
    return with_settings(runtime, smtp_tls_cert=cert, smtp_tls_key=key, **changes)


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Runtime], Any]]:
    started: list[SmtpIngress] = []

    async def start(runtime: Runtime) -> SmtpIngress:
        server = SmtpIngress(runtime)
        await server.start(HOST, 0)
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop(grace=BOUND)


async def test_a_client_that_trusts_the_ca_delivers_over_starttls(
    runtime: Runtime,
    agent: AgentHandle,
    cert_files: tuple[Path, Path],
    client_context: ssl.SSLContext,
    serve: Callable[[Runtime], Any],
) -> None:
    server = await serve(tls_runtime(runtime, cert_files))
    raw = build_message(to=agent.address, subject="over tls")

    def send() -> tuple[bool, str | None, bool]:
        with smtplib.SMTP(HOST, server.port, timeout=BOUND) as client:
            client.ehlo("client.example")
            advertised = client.has_extn("starttls")
            client.starttls(context=client_context)
            version = client.sock.version() if isinstance(client.sock, ssl.SSLSocket) else None
            client.ehlo("client.example")
            # aiosmtpd would offer AUTH now; its mechanisms always fail, so it is hidden.
            auth = client.has_extn("auth")
            client.sendmail("alice@example.com", [agent.address], raw)
            return advertised, version, auth

    advertised, version, auth = await asyncio.to_thread(send)
    assert advertised and version is not None and version.startswith("TLSv1.")
    assert not auth
    [row] = stored_rows(runtime)
    assert runtime.blobs.get(row.raw_sha256) == raw


async def test_an_async_client_delivers_over_starttls(
    runtime: Runtime,
    agent: AgentHandle,
    cert_files: tuple[Path, Path],
    client_context: ssl.SSLContext,
    serve: Callable[[Runtime], Any],
) -> None:
    server = await serve(tls_runtime(runtime, cert_files, smtp_require_tls=True))
    raw = build_message(to=agent.address, subject="async tls")
    errors, reply = await aiosmtplib.send(
        raw,
        sender="alice@example.com",
        recipients=[agent.address],
        hostname=HOST,
        port=server.port,
        start_tls=True,
        tls_context=client_context,
        timeout=BOUND,
    )
    assert not errors and reply.startswith("2.0.0")
    assert count_messages(runtime) == 1


REQUIRE_TLS_BEFORE: list[Step] = [
    *OPEN,
    ("MAIL before STARTTLS", "MAIL FROM:<alice@example.com>", 530, "RFC 3207 §4"),
    ("RCPT before STARTTLS", "RCPT TO:<{agent}>", 530, "RFC 3207 §4"),
    ("NOOP is allowed", "NOOP", 250, "RFC 3207 §4"),
    ("STARTTLS", "STARTTLS", 220, "RFC 3207 §4"),
]
REQUIRE_TLS_AFTER: list[Step] = [
    ("EHLO again (state was reset)", "EHLO client.example", 250, "RFC 3207 §4.2"),
    ("MAIL", "MAIL FROM:<alice@example.com>", 250, "RFC 5321 §4.1.1.2"),
    ("RCPT", "RCPT TO:<{agent}>", 250, "RFC 5321 §4.1.1.3"),
    ("DATA", "DATA", 354, "RFC 5321 §4.1.1.4"),
    ("end of data", body("required tls"), 250, "RFC 5321 §4.1.1.4"),
    ("QUIT", "QUIT", 221, "RFC 5321 §4.1.1.10"),
]


async def test_with_tls_required_mail_before_starttls_gets_530(
    runtime: Runtime,
    agent: AgentHandle,
    cert_files: tuple[Path, Path],
    client_context: ssl.SSLContext,
    serve: Callable[[Runtime], Any],
) -> None:
    server = await serve(tls_runtime(runtime, cert_files, smtp_require_tls=True))
    client = await RawClient.connect(server.port)
    try:
        names = {"agent": agent.address}
        await converse(client, REQUIRE_TLS_BEFORE, names)
        await asyncio.wait_for(client.writer.start_tls(client_context, server_hostname=HOST), BOUND)
        await converse(client, REQUIRE_TLS_AFTER, names)
    finally:
        await client.close()
    [row] = stored_rows(runtime)
    assert row.subject == "required tls"


async def test_without_a_certificate_starttls_is_not_offered(
    runtime: Runtime, serve: Callable[[Runtime], Any]
) -> None:
    server = await serve(runtime)
    client = await RawClient.connect(server.port)
    try:
        assert (await client.reply())[0] == 220
        await client.send(b"EHLO client.example\r\n")
        code, text = await client.reply()
        assert code == 250 and "STARTTLS" not in text.splitlines()
        assert await client.command("STARTTLS") == 454  # RFC 3207 §4: TLS not available
    finally:
        await client.close()


def test_an_unreadable_certificate_is_a_config_error(runtime: Runtime, tmp_path: Path) -> None:
    missing = (tmp_path / "missing.crt", tmp_path / "missing.key")
    with pytest.raises(ConfigError):
        SmtpIngress(tls_runtime(runtime, missing))
