"""SPF, DKIM and DMARC on mail arriving over real SMTP, against DNS served on loopback.

The gateway runs with ``sender_auth`` on and its resolver pointed at a
:class:`DnsTestServer`; messages are signed with a real RSA key by dkimpy and sent with
aiosmtplib from 127.0.0.1, which the test zones' SPF records name (or do not). Each
case checks the structured verdicts stored on the message, the
``Authentication-Results`` field on top of the stored bytes, and what the rules made
of it.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiosmtplib
import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import select

from mailgate.config import load_settings
from mailgate.ingress.smtp import SmtpIngress
from mailgate.runtime import Runtime
from mailgate.store.schema import messages
from mailgate.testing import build_message
from mailgate.testing.dns import DnsTestServer
from tests.conftest import AgentHandle, make_agent

pytestmark = pytest.mark.anyio
AUTHSERV = "mx.gateway.test"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def key() -> tuple[bytes, str]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    spki = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(spki).decode()


@pytest.fixture
def dns(key: tuple[bytes, str]) -> Iterator[DnsTestServer]:
    with DnsTestServer() as server:
        server.add("example.com", "TXT", "v=spf1 ip4:127.0.0.1 -all")
        server.add("sel1._domainkey.example.com", "TXT", key[1])
        server.add("_dmarc.example.com", "TXT", "v=DMARC1; p=reject")
        server.add("elsewhere.test", "TXT", "v=spf1 ip4:127.0.0.1 -all")
        server.add("sel1._domainkey.elsewhere.test", "TXT", key[1])
        server.add("strict.test", "TXT", "v=spf1 ip4:192.0.2.1 -all")
        yield server


@pytest.fixture
def runtime(tmp_path: Path, database_url: str, dns: DnsTestServer) -> Iterator[Runtime]:
    settings = load_settings(
        data_dir=tmp_path,
        database_url=database_url,
        sender_auth=True,
        dns_nameservers=[f"127.0.0.1:{dns.port}"],
        authserv_id=AUTHSERV,
    )
    built = Runtime.build(settings)
    yield built
    built.close()


@pytest.fixture
async def ingress(runtime: Runtime) -> AsyncIterator[SmtpIngress]:
    await runtime.attach_loop()
    server = SmtpIngress(runtime)
    await server.start("127.0.0.1", 0)
    yield server
    await server.stop(grace=10)
    await runtime.detach_loop()


def signed(key: tuple[bytes, str], raw: bytes, domain: str) -> bytes:
    signature = dkim.sign(
        raw, b"sel1", domain.encode(), key[0], include_headers=[b"from", b"to", b"subject"]
    )
    return bytes(signature) + raw


async def send(ingress: SmtpIngress, raw: bytes, mail_from: str, to: str) -> None:
    await aiosmtplib.send(
        raw, sender=mail_from, recipients=[to], hostname="127.0.0.1", port=ingress.port
    )


def stored(runtime: Runtime, agent: AgentHandle) -> tuple[Any, bytes]:
    with runtime.db.read() as conn:
        message = conn.execute(select(messages).where(messages.c.agent_id == agent.agent_id)).one()
    return message, runtime.blobs.get(message.raw_sha256)


CASES = [
    # name, From domain, MAIL FROM, DKIM signer (None: unsigned), tamper, spf, dkim, dmarc
    ("pass", "example.com", "bounce@example.com", "example.com", False, "pass", "pass", "pass"),
    ("fail", "example.com", "bounce@strict.test", "example.com", True, "fail", "fail", "fail"),
    ("missing", "nowhere.test", "bounce@nowhere.test", None, False, "none", "none", "none"),
    (
        "misaligned",
        "example.com",
        "bounce@elsewhere.test",
        "elsewhere.test",
        False,
        "pass",
        "pass",
        "fail",
    ),
]


@pytest.mark.parametrize(
    ("case", "from_domain", "mail_from", "signer", "tamper", "spf", "dkim_", "dmarc"),
    CASES,
    ids=[c[0] for c in CASES],
)
async def test_sender_auth_verdicts_are_stored_and_stamped_on_the_message(
    runtime: Runtime,
    ingress: SmtpIngress,
    key: tuple[bytes, str],
    case: str,
    from_domain: str,
    mail_from: str,
    signer: str | None,
    tamper: bool,
    spf: str,
    dkim_: str,
    dmarc: str,
) -> None:
    agent = make_agent(runtime)
    raw = build_message(to=agent.address, sender=f"Bob <bob@{from_domain}>")
    if signer:
        raw = signed(key, raw, signer)
    if tamper:
        raw = raw.replace(b"Subject: Hello", b"Subject: Hellp")
    await send(ingress, raw, mail_from, agent.address)
    message, stored_raw = stored(runtime, agent)
    record = message.auth_results
    assert (record["spf"], record["dkim"], record["dmarc"]) == (spf, dkim_, dmarc), case
    assert record["source"] == "smtp"
    first_line = stored_raw.split(b"\r\n", 1)[0].decode()
    assert first_line == f"Authentication-Results: {AUTHSERV};"
    header = stored_raw.split(b"\r\n\r\n", 1)[0].decode()
    assert f"spf={spf}" in header and f"dmarc={dmarc}" in header
    assert stored_raw.endswith(raw)  # everything received is kept, after our field


async def test_a_forged_authentication_results_claiming_our_id_is_removed(
    runtime: Runtime, ingress: SmtpIngress
) -> None:
    agent = make_agent(runtime)
    forged = f"Authentication-Results: {AUTHSERV}; dmarc=pass header.from=bank.test\r\n"
    theirs = "Authentication-Results: mx.other.test; spf=pass\r\n"
    raw = (forged + theirs).encode() + build_message(to=agent.address, sender="x@bank.test")
    await send(ingress, raw, "x@bank.test", agent.address)
    message, stored_raw = stored(runtime, agent)
    headers = stored_raw.split(b"\r\n\r\n", 1)[0].decode()
    assert "header.from=bank.test" in headers  # our own verdict names the From domain
    assert "dmarc=pass" not in headers
    assert headers.count(f"Authentication-Results: {AUTHSERV}") == 1
    assert theirs.strip() in headers  # someone else's claim stays, for what it is worth
    assert message.auth_results["dmarc"] == "none"


async def test_only_an_authenticated_known_contact_skips_the_rules(
    runtime: Runtime, ingress: SmtpIngress, key: tuple[bytes, str]
) -> None:
    agent = make_agent(runtime)
    hold_all = {"name": "hold everything", "action": "review", "condition": {"all": []}}
    runtime.rules.create_rule(agent.workspace_id, agent.agent_id, hold_all, actor="test")
    runtime.rules.add_contact(
        agent.workspace_id, agent.agent_id, domain="example.com", name="Example", actor="test"
    )

    genuine = signed(key, build_message(to=agent.address, sender="bob@example.com"), "example.com")
    await send(ingress, genuine, "bounce@example.com", agent.address)
    spoof = build_message(to=agent.address, sender="bob@example.com", subject="wire money")
    await send(ingress, spoof, "x@nowhere.test", agent.address)

    with runtime.db.read() as conn:
        found = {
            m.subject: m
            for m in conn.execute(select(messages).where(messages.c.agent_id == agent.agent_id))
        }
    assert found["Hello"].folder == "inbox"
    assert found["Hello"].decision["contact_bypass"] is True
    assert found["wire money"].folder == "review"
    assert "not authenticated" in found["wire money"].decision["reasons"][0]
