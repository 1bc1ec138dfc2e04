"""SMTP ingress against a real server on loopback, on SQLite and PostgreSQL.

Conversations are tables of ``(step, client line, expected reply code, reference)``
(Mailpit's ``smtpd_test.go`` style). A ``str`` client line is a command and gets its
CRLF appended; ``bytes`` go on the wire exactly as written, which is how the
smuggling payloads keep their bare CRs and LFs (smtplib would normalise them).
``{agent}`` and ``{other}`` stand for agent addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import smtplib
import tracemalloc
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import aiosmtplib
import pytest
from sqlalchemy import func, select

from mailgate.errors import ConfigError, ServiceUnavailable
from mailgate.ingress.smtp import SmtpIngress, has_bare_line_ending, read_data
from mailgate.runtime import Runtime
from mailgate.store.schema import messages
from mailgate.testing import build_message
from tests.conftest import AgentHandle, make_agent

pytestmark = pytest.mark.anyio

HOST = "127.0.0.1"
BOUND = 10.0  # seconds any single wait may take before the test fails

Step = tuple[str, "str | bytes | None", int, str]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def with_settings(runtime: Runtime, **changes: Any) -> Runtime:
    """The same services seen through changed settings (the ingress reads only these)."""
    return dataclasses.replace(runtime, settings=runtime.settings.model_copy(update=changes))


@pytest.fixture
async def ingress(runtime: Runtime) -> AsyncIterator[SmtpIngress]:
    server = SmtpIngress(runtime)
    await server.start(HOST, 0)
    yield server
    await server.stop(grace=BOUND)


@pytest.fixture
def other(runtime: Runtime) -> AgentHandle:
    """A second agent in another workspace."""
    return make_agent(runtime, name="billing bot", workspace="globex")


class RawClient:
    """A byte-exact SMTP client on asyncio streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), BOUND)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self) -> tuple[int, str]:
        """One (possibly multi-line) reply: its code and its text lines joined by newlines."""
        lines: list[str] = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), BOUND)
            if not line:
                raise EOFError("server closed the connection")
            lines.append(line.decode("utf-8", "replace").rstrip("\r\n"))
            if line[3:4] != b"-":
                return int(lines[-1][:3]), "\n".join(item[4:] for item in lines)

    async def command(self, line: str) -> int:
        await self.send(line.encode() + b"\r\n")
        return (await self.reply())[0]

    async def closed_by_server(self) -> bool:
        return await asyncio.wait_for(self.reader.read(), BOUND) == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


@pytest.fixture
async def connect() -> AsyncIterator[Callable[[int], Any]]:
    """Open raw clients; every one is closed at teardown."""
    opened: list[RawClient] = []

    async def open_client(port: int) -> RawClient:
        client = await RawClient.connect(port)
        opened.append(client)
        return client

    yield open_client
    for client in opened:
        await client.close()


async def converse(client: RawClient, steps: Sequence[Step], names: dict[str, str]) -> None:
    for step, line, code, reference in steps:
        if line is not None:
            data = (
                line.encode("utf-8", "surrogateescape") + b"\r\n" if isinstance(line, str) else line
            )
            for key, value in names.items():
                data = data.replace(b"{%s}" % key.encode(), value.encode())
            await client.send(data)
        got, text = await client.reply()
        assert got == code, f"{step} ({reference}): expected {code}, got {got} {text}"


def stored_rows(runtime: Runtime) -> list[Any]:
    with runtime.db.read() as conn:
        return list(conn.execute(select(messages).order_by(messages.c.seq)))


def count_messages(runtime: Runtime) -> int:
    with runtime.db.read() as conn:
        return int(conn.execute(select(func.count()).select_from(messages)).scalar_one())


def body(subject: str, text: str = "Hello.") -> bytes:
    return (
        f"From: alice@example.com\r\nTo: {{agent}}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '-')}@example.com>\r\n\r\n{text}\r\n.\r\n"
    ).encode()


BIG = b"Subject: big\r\n\r\n" + (b"y" * 1000 + b"\r\n") * 27_000 + b".\r\n"  # > 25 MiB

OPEN = [
    ("greeting", None, 220, "RFC 5321 §3.1"),
    ("EHLO", "EHLO client.example", 250, "RFC 5321 §4.1.1.1"),
]

CONVERSATIONS: dict[str, tuple[list[Step], int]] = {
    "a stranger is refused, an agent accepted, the message stored": (
        [
            *OPEN,
            ("MAIL", "MAIL FROM:<alice@example.com>", 250, "RFC 5321 §4.1.1.2"),
            ("RCPT to a stranger", "RCPT TO:<bob@elsewhere.example>", 550, "RFC 5321 §3.3"),
            (
                "RCPT to no agent, our domain",
                "RCPT TO:<nobody@agents.localhost>",
                550,
                "RFC 5321 §3.3",
            ),
            ("RCPT to the agent", "RCPT TO:<{agent}>", 250, "RFC 5321 §4.1.1.3"),
            ("DATA", "DATA", 354, "RFC 5321 §4.1.1.4"),
            ("end of data", body("one"), 250, "RFC 5321 §4.1.1.4, §6.1"),
            ("QUIT", "QUIT", 221, "RFC 5321 §4.1.1.10"),
        ],
        1,
    ),
    "only strangers: DATA has no recipient": (
        [
            *OPEN,
            ("MAIL", "MAIL FROM:<alice@example.com>", 250, "RFC 5321 §4.1.1.2"),
            ("RCPT to a stranger", "RCPT TO:<bob@elsewhere.example>", 550, "RFC 5321 §3.3"),
            ("DATA without recipients", "DATA", 503, "RFC 5321 §3.3"),
        ],
        0,
    ),
    "sequence errors": (
        [
            ("greeting", None, 220, "RFC 5321 §3.1"),
            ("MAIL before EHLO", "MAIL FROM:<alice@example.com>", 503, "RFC 5321 §4.1.4"),
            ("EHLO", "EHLO client.example", 250, "RFC 5321 §4.1.1.1"),
            ("RCPT before MAIL", "RCPT TO:<{agent}>", 503, "RFC 5321 §4.1.4"),
            ("MAIL", "MAIL FROM:<alice@example.com>", 250, "RFC 5321 §4.1.1.2"),
            ("nested MAIL", "MAIL FROM:<alice@example.com>", 503, "RFC 5321 §4.1.4"),
            ("RSET", "RSET", 250, "RFC 5321 §4.1.1.5"),
            ("NOOP", "NOOP", 250, "RFC 5321 §4.1.1.9"),
        ],
        0,
    ),
    "SIZE declared over the limit is refused before any data": (
        [
            *OPEN,
            ("MAIL SIZE=limit", "MAIL FROM:<alice@example.com> SIZE=26214400", 250, "RFC 1870 §6"),
            ("RSET", "RSET", 250, "RFC 5321 §4.1.1.5"),
            (
                "MAIL SIZE=limit+1",
                "MAIL FROM:<alice@example.com> SIZE=26214401",
                552,
                "RFC 1870 §6",
            ),
            ("MAIL again", "MAIL FROM:<alice@example.com>", 250, "RFC 5321 §4.1.1.2"),
        ],
        0,
    ),
    "null reverse-path (a bounce) is accepted": (
        [
            *OPEN,
            ("MAIL FROM:<>", "MAIL FROM:<>", 250, "RFC 5321 §4.5.5"),
            ("RCPT", "RCPT TO:<{agent}>", 250, "RFC 5321 §4.1.1.3"),
            ("DATA", "DATA", 354, "RFC 5321 §4.1.1.4"),
            ("end of data", body("bounce"), 250, "RFC 5321 §4.1.1.4"),
        ],
        1,
    ),
    "two agents in one transaction: one copy each": (
        [
            *OPEN,
            ("MAIL", "MAIL FROM:<alice@example.com>", 250, "RFC 5321 §4.1.1.2"),
            ("RCPT agent", "RCPT TO:<{agent}>", 250, "RFC 5321 §4.1.1.3"),
            ("RCPT other agent", "RCPT TO:<{other}>", 250, "RFC 5321 §4.1.1.3"),
            ("DATA", "DATA", 354, "RFC 5321 §4.1.1.4"),
            ("end of data", body("both"), 250, "RFC 5321 §4.1.1.4"),
        ],
        2,
    ),
    "the same agent twice (sub-address) gets one copy": (
        [
            *OPEN,
            ("MAIL", "MAIL FROM:<alice@example.com>", 250, "RFC 5321 §4.1.1.2"),
            ("RCPT agent", "RCPT TO:<{agent}>", 250, "RFC 5321 §4.1.1.3"),
            ("RCPT agent+tag", "RCPT TO:<{agent_tagged}>", 250, "RFC 5321 §4.1.1.3"),
            ("DATA", "DATA", 354, "RFC 5321 §4.1.1.4"),
            ("end of data", body("once"), 250, "RFC 5321 §4.1.1.4"),
        ],
        1,
    ),
    "SMTPUTF8 sender accepted, invalid UTF-8 refused": (
        [
            *OPEN,
            ("MAIL not UTF-8", "MAIL FROM:<j\udcf6rg@example.com> SMTPUTF8", 553, "RFC 6531 §3.3"),
            ("MAIL UTF-8", "MAIL FROM:<jörg@exämple.de> SMTPUTF8", 250, "RFC 6531 §3.4"),
            ("RCPT", "RCPT TO:<{agent}>", 250, "RFC 5321 §4.1.1.3"),
            ("DATA", "DATA", 354, "RFC 5321 §4.1.1.4"),
            ("end of data", body("utf8"), 250, "RFC 6531 §3.4"),
        ],
        1,
    ),
    "dot-stuffed lines are unstuffed, not taken as the end": (
        [
            *OPEN,
            ("MAIL", "MAIL FROM:<alice@example.com>", 250, "RFC 5321 §4.1.1.2"),
            ("RCPT", "RCPT TO:<{agent}>", 250, "RFC 5321 §4.1.1.3"),
            ("DATA", "DATA", 354, "RFC 5321 §4.1.1.4"),
            (
                "body with '..' lines",
                b"Subject: dots\r\n\r\n..\r\n...\r\n..MAIL FROM:<x@y>\r\nend\r\n.\r\n",
                250,
                "RFC 5321 §4.5.2",
            ),
            ("NOOP", "NOOP", 250, "RFC 5321 §4.1.1.9"),
        ],
        1,
    ),
    "an oversize body is refused and the session goes on": (
        [
            *OPEN,
            ("MAIL", "MAIL FROM:<alice@example.com>", 250, "RFC 5321 §4.1.1.2"),
            ("RCPT", "RCPT TO:<{agent}>", 250, "RFC 5321 §4.1.1.3"),
            ("DATA", "DATA", 354, "RFC 5321 §4.1.1.4"),
            ("27 MB body", BIG, 552, "RFC 1870 §6, RFC 5321 §4.2.2"),
            ("MAIL again", "MAIL FROM:<alice@example.com>", 250, "RFC 5321 §4.1.1.2"),
            ("RCPT", "RCPT TO:<{agent}>", 250, "RFC 5321 §4.1.1.3"),
            ("DATA", "DATA", 354, "RFC 5321 §4.1.1.4"),
            ("small body", body("small"), 250, "RFC 5321 §4.1.1.4"),
        ],
        1,
    ),
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
async def test_each_conversation_gets_the_replies_its_table_lists(
    name: str,
    runtime: Runtime,
    ingress: SmtpIngress,
    agent: AgentHandle,
    other: AgentHandle,
    connect: Callable[[int], Any],
) -> None:
    steps, stored = CONVERSATIONS[name]
    local, _, domain = agent.address.partition("@")
    names = {"agent": agent.address, "other": other.address, "agent_tagged": f"{local}+x@{domain}"}
    await converse(await connect(ingress.port), steps, names)
    assert count_messages(runtime) == stored


SMUGGLED = (
    b"MAIL FROM:<mallory@evil.example>\r\nRCPT TO:<{agent}>\r\nDATA\r\n"
    b"From: ceo@example.com\r\nSubject: smuggled\r\n\r\nwire money\r\n"
)
SMUGGLING: dict[str, tuple[bytes, int, int]] = {
    # name: (what follows "Subject: one\r\n\r\nfirst", end-of-data reply, messages stored)
    "<LF>.<CR><LF>": (b"\n.\r\n" + SMUGGLED + b".\r\n", 554, 0),
    "<CR><LF>.<LF>": (b"\r\n.\n" + SMUGGLED + b".\r\n", 554, 0),
    "<LF>.<LF>": (b"\n.\n" + SMUGGLED + b".\r\n", 554, 0),
    "<CR>.<CR>": (b"\r.\r" + SMUGGLED + b".\r\n", 554, 0),
    "<CR><LF>.<CR>": (b"\r\n.\r" + SMUGGLED + b".\r\n", 554, 0),
    "<CR>.<CR><LF>": (b"\r.\r\n" + SMUGGLED + b".\r\n", 554, 0),
    "bare LF line endings": (b"\nsecond line\n\r\n.\r\n", 554, 0),
    "bare CR inside a line": (b" and\rmore\r\n.\r\n", 554, 0),
    "<CR><LF>..<CR><LF> (stuffed dot)": (b"\r\n..\r\n" + SMUGGLED + b".\r\n", 250, 1),
}


@pytest.mark.parametrize("name", list(SMUGGLING))
async def test_smuggling_never_makes_a_second_message(
    name: str,
    runtime: Runtime,
    ingress: SmtpIngress,
    agent: AgentHandle,
    connect: Callable[[int], Any],
) -> None:
    """aiosmtpd's ``test_smtpsmuggling.py`` payloads and their relatives: one DATA, one
    verdict, and the smuggled MAIL/RCPT/DATA inside it never run as commands."""
    tail, code, stored = SMUGGLING[name]
    steps: list[Step] = [
        *OPEN,
        ("MAIL", "MAIL FROM:<alice@example.com>", 250, "RFC 5321 §4.1.1.2"),
        ("RCPT", "RCPT TO:<{agent}>", 250, "RFC 5321 §4.1.1.3"),
        ("DATA", "DATA", 354, "RFC 5321 §4.1.1.4"),
        ("payload", b"Subject: one\r\n\r\nfirst" + tail, code, "RFC 5321 §2.3.8, §4.1.1.4"),
        # Had the smuggled commands run, their replies would come before QUIT's.
        ("QUIT", "QUIT", 221, "RFC 5321 §4.1.1.10"),
    ]
    client = await connect(ingress.port)
    await converse(client, steps, {"agent": agent.address})
    assert await client.closed_by_server()
    rows = stored_rows(runtime)
    assert len(rows) == stored
    assert all(row.subject == "one" and row.mail_from == "alice@example.com" for row in rows)


def test_a_bare_cr_or_lf_is_detected_and_crlf_is_not() -> None:
    assert not has_bare_line_ending(b"")
    assert not has_bare_line_ending(b"a\r\nb\r\n\r\n")
    for bad in (b"a\n", b"a\r", b"\n\r", b"a\r\r\n", b"a\r\n\n", b"\r\n\r"):
        assert has_bare_line_ending(bad), bad


# -- DATA framing (read_data), fed byte-exact at every chunking -------------------------


def reference_framing(stream: bytes) -> tuple[bytes, bytes]:
    """RFC 5321 §4.1.1.4 and §4.5.2 read literally: the body ends at the first
    <CRLF>.<CRLF> counting the DATA line's own CRLF; every line's leading dot goes."""
    text = b"\r\n" + stream
    end = text.index(b"\r\n.\r\n")
    return text[: end + 2].replace(b"\r\n.", b"\r\n")[2:], text[end + 5 :]


async def frame(stream: bytes, chunk: int, limit: int = 10**6) -> tuple[bytes | None, bytes]:
    """Feed ``stream`` in ``chunk``-byte pieces; the body read and what stays unread."""
    reader = asyncio.StreamReader(limit=1001)  # aiosmtpd's reader limit
    task = asyncio.create_task(read_data(reader, limit))
    for start in range(0, len(stream), chunk):
        reader.feed_data(stream[start : start + chunk])
        await asyncio.sleep(0)  # a yield, so the reader sees the stream piece by piece
    reader.feed_eof()
    body = await asyncio.wait_for(task, BOUND)
    return body, await reader.read()


FRAMING_CASES = [
    b".\r\nMAIL FROM:<a@b>\r\n",  # empty body: the DATA line's CRLF starts the marker
    b"\r\n.\r\nNEXT",  # one empty line
    b".\r\n.\r\n",  # empty body, then a stray end-of-data line left for the command loop
    b"..\r\n.\r\n",  # a stuffed lone dot
    b"\r\r\n.\r\n",  # bare CR right before the marker
    b"\r\n.\rx\r\n.\r\n",  # a broken marker, then a real one
    b"a\n.\r\nb\r\n.\r\n",  # <LF>.<CR><LF> is not the end
    b"line\r\n..dot\r\n...two\r\n.\r\n",
    b"Hi.\r\n" * 700 + b".\r\nQUIT\r\n",  # every line ends with a dot
    b"x" * 3000 + b"\r\n.leading\r\n" + b"y" * 1001 + b"\r\n.\r\nRSET\r\n",
]


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 5, 7, 1000, 1001, 1002, 1 << 20])
@pytest.mark.parametrize("stream", FRAMING_CASES, ids=range(len(FRAMING_CASES)))
async def test_data_framing_matches_the_rfc_at_any_chunking(stream: bytes, chunk: int) -> None:
    assert await frame(stream, chunk) == reference_framing(stream)


async def test_data_framing_matches_the_rfc_on_random_streams() -> None:
    rng = random.Random(5321)
    tokens = [b"\r", b"\n", b".", b"a", b"\r\n", b"\r\n.", b".\r\n", b"\r\n.\r"]
    for _ in range(400):
        stream = b"".join(rng.choices(tokens, k=rng.randint(0, 30))) + b"\r\n.\r\nNEXT"
        assert await frame(stream, rng.randint(1, 9)) == reference_framing(stream), stream


@pytest.mark.parametrize("chunk", [1, 3, 1001, 1 << 20])
async def test_data_framing_enforces_the_limit_on_unstuffed_octets(chunk: int) -> None:
    stream = b"..a\r\n" * 300 + b"x" * 2000 + b"\r\n.\r\nNEXT"
    body, rest = reference_framing(stream)
    assert await frame(stream, chunk, limit=len(body)) == (body, rest)
    assert await frame(stream, chunk, limit=len(body) - 1) == (None, rest)


async def test_250_comes_only_once_the_message_is_committed(
    runtime: Runtime, ingress: SmtpIngress, agent: AgentHandle
) -> None:
    raw = build_message(to=agent.address, subject="durable")

    def send() -> tuple[int, int]:
        with smtplib.SMTP(HOST, ingress.port, timeout=BOUND) as client:
            client.ehlo("client.example")
            client.mail("alice@example.com")
            client.rcpt(agent.address)
            code, _ = client.data(raw)
            # Read from a separate connection the moment the reply is in.
            return code, count_messages(runtime)

    assert await asyncio.to_thread(send) == (250, 1)
    [row] = stored_rows(runtime)
    assert runtime.blobs.get(row.raw_sha256) == raw


class FailingIngest:
    """An ingest port whose commit always fails (as a lost database would)."""

    def __init__(self) -> None:
        self.calls = 0

    async def ingest_async(self, raw: bytes, envelope: object, recipients: object) -> list[Any]:
        self.calls += 1
        raise ServiceUnavailable("database unavailable")


async def test_a_failed_commit_answers_451_so_the_client_retries(
    runtime: Runtime, agent: AgentHandle, connect: Callable[[int], Any]
) -> None:
    failing = FailingIngest()
    server = SmtpIngress(dataclasses.replace(runtime, ingest=failing))  # type: ignore[arg-type]
    await server.start(HOST, 0)
    try:
        steps: list[Step] = [
            *OPEN,
            ("MAIL", "MAIL FROM:<alice@example.com>", 250, "RFC 5321 §4.1.1.2"),
            ("RCPT", "RCPT TO:<{agent}>", 250, "RFC 5321 §4.1.1.3"),
            ("DATA", "DATA", 354, "RFC 5321 §4.1.1.4"),
            ("end of data", body("retry me"), 451, "RFC 5321 §4.2.5"),
            ("the session goes on", "NOOP", 250, "RFC 5321 §4.1.1.9"),
        ]
        await converse(await connect(server.port), steps, {"agent": agent.address})
    finally:
        await server.stop(grace=BOUND)
    assert failing.calls == 1
    assert count_messages(runtime) == 0


class FailingTenancy:
    def resolve_recipient(self, address: str) -> None:
        raise ServiceUnavailable("database unavailable")


async def test_a_failed_recipient_lookup_answers_451(
    runtime: Runtime, connect: Callable[[int], Any]
) -> None:
    server = SmtpIngress(dataclasses.replace(runtime, tenancy=FailingTenancy()))  # type: ignore[arg-type]
    await server.start(HOST, 0)
    try:
        steps: list[Step] = [
            *OPEN,
            ("MAIL", "MAIL FROM:<alice@example.com>", 250, "RFC 5321 §4.1.1.2"),
            ("RCPT, lookup fails", "RCPT TO:<someone@agents.localhost>", 451, "RFC 5321 §4.2.5"),
        ]
        await converse(await connect(server.port), steps, {})
    finally:
        await server.stop(grace=BOUND)


async def test_the_envelope_is_stored_beside_the_message(
    runtime: Runtime, ingress: SmtpIngress, agent: AgentHandle, other: AgentHandle
) -> None:
    raw = build_message(to=agent.address, cc=other.address)

    def send() -> None:
        with smtplib.SMTP(HOST, ingress.port, timeout=BOUND) as client:
            client.ehlo("mx.sender.example")
            client.sendmail("bounces+123@sender.example", [agent.address, other.address], raw)

    await asyncio.to_thread(send)
    rows = stored_rows(runtime)
    envelopes = {
        (r.agent_id, r.mail_from, r.rcpt_to, r.client_address, r.helo, r.source) for r in rows
    }
    assert envelopes == {
        (
            agent.agent_id,
            "bounces+123@sender.example",
            agent.address,
            HOST,
            "mx.sender.example",
            "smtp",
        ),
        (
            other.agent_id,
            "bounces+123@sender.example",
            other.address,
            HOST,
            "mx.sender.example",
            "smtp",
        ),
    }
    assert {r.raw_sha256 for r in rows} == {rows[0].raw_sha256}


async def test_a_null_sender_is_stored_as_empty(
    runtime: Runtime, ingress: SmtpIngress, agent: AgentHandle
) -> None:
    raw = build_message(to=agent.address, subject="Undelivered Mail Returned to Sender")

    def send() -> None:
        with smtplib.SMTP(HOST, ingress.port, timeout=BOUND) as client:
            client.sendmail("<>", [agent.address], raw)

    await asyncio.to_thread(send)
    [row] = stored_rows(runtime)
    assert row.mail_from == ""


async def test_recipients_per_transaction_are_limited(
    runtime: Runtime, agent: AgentHandle, connect: Callable[[int], Any]
) -> None:
    server = SmtpIngress(with_settings(runtime, smtp_max_recipients=2))
    await server.start(HOST, 0)
    try:
        steps: list[Step] = [
            *OPEN,
            ("MAIL", "MAIL FROM:<alice@example.com>", 250, "RFC 5321 §4.1.1.2"),
            ("RCPT 1", "RCPT TO:<{agent}>", 250, "RFC 5321 §4.1.1.3"),
            ("refused RCPT does not count", "RCPT TO:<x@elsewhere.example>", 550, "RFC 5321 §3.3"),
            ("RCPT 2", "RCPT TO:<{agent}>", 250, "RFC 5321 §4.1.1.3"),
            ("RCPT 3: over the limit", "RCPT TO:<{agent}>", 452, "RFC 5321 §4.5.3.1.10"),
            ("DATA", "DATA", 354, "RFC 5321 §4.1.1.4"),
            ("end of data", body("limited"), 250, "RFC 5321 §4.1.1.4"),
            (
                "next transaction starts afresh",
                "MAIL FROM:<a@example.com>",
                250,
                "RFC 5321 §4.1.1.2",
            ),
            ("RCPT 1 again", "RCPT TO:<{agent}>", 250, "RFC 5321 §4.1.1.3"),
        ]
        await converse(await connect(server.port), steps, {"agent": agent.address})
    finally:
        await server.stop(grace=BOUND)
    assert count_messages(runtime) == 1


async def test_an_address_created_while_running_is_accepted_at_once(
    runtime: Runtime, ingress: SmtpIngress, connect: Callable[[int], Any]
) -> None:
    client = await connect(ingress.port)
    await converse(client, OPEN, {})
    assert await client.command("MAIL FROM:<alice@example.com>") == 250
    assert await client.command("RCPT TO:<late-bot@agents.localhost>") == 550
    make_agent(runtime, name="late bot")
    assert await client.command("RCPT TO:<late-bot@agents.localhost>") == 250


async def test_banner_and_ehlo_name_the_configured_host_and_advertise_size(
    runtime: Runtime, connect: Callable[[int], Any]
) -> None:
    server = SmtpIngress(
        with_settings(runtime, smtp_hostname="mx.gateway.test", max_message_size=4096)
    )
    await server.start(HOST, 0)
    try:
        client = await connect(server.port)
        code, banner = await client.reply()
        assert code == 220 and banner.split()[0] == "mx.gateway.test"
        await client.send(b"EHLO client.example\r\n")
        code, text = await client.reply()
        lines = text.splitlines()
        assert code == 250 and lines[0] == "mx.gateway.test"
        assert "SIZE 4096" in lines and "8BITMIME" in lines and "SMTPUTF8" in lines
        assert not any(line.startswith(("AUTH", "STARTTLS")) for line in lines)
    finally:
        await server.stop(grace=BOUND)


async def test_an_idle_client_is_cut_after_the_timeout(
    runtime: Runtime, connect: Callable[[int], Any]
) -> None:
    server = SmtpIngress(with_settings(runtime, smtp_timeout=0.2))
    await server.start(HOST, 0)
    try:
        client = await connect(server.port)
        await converse(client, OPEN, {})
        assert await client.closed_by_server()  # RFC 5321 §4.5.3.2.7: server timeout
    finally:
        await server.stop(grace=BOUND)


async def test_the_size_limit_counts_unstuffed_octets(
    runtime: Runtime, agent: AgentHandle, connect: Callable[[int], Any]
) -> None:
    """RFC 1870 §3: the size excludes the doubled dots, so a message of exactly the
    limit passes however many dot lines it has, and one octet more does not."""
    message = b"Subject: s\r\n\r\n" + b".x\r\n" * 100
    server = SmtpIngress(with_settings(runtime, max_message_size=len(message)))
    await server.start(HOST, 0)
    try:
        client = await connect(server.port)
        await converse(client, OPEN, {})
        for extra, code in ((b"", 250), (b"y", 552)):
            stuffed = (extra + message).replace(b"\r\n.", b"\r\n..")
            assert await client.command("MAIL FROM:<alice@example.com>") == 250
            assert await client.command(f"RCPT TO:<{agent.address}>") == 250
            assert await client.command("DATA") == 354
            await client.send(stuffed + b".\r\n")
            assert (await client.reply())[0] == code
    finally:
        await server.stop(grace=BOUND)
    [row] = stored_rows(runtime)
    assert runtime.blobs.get(row.raw_sha256) == message


async def test_an_oversize_single_line_body_is_not_buffered(
    runtime: Runtime, agent: AgentHandle, connect: Callable[[int], Any]
) -> None:
    """Stock aiosmtpd 1.4.6 keeps every fragment of an over-long line until its CRLF,
    whatever the size limit; measured there: 30 MB traced for a 30 MB line with a
    1 MB limit. Here the peak stays near the limit."""
    limit = 1_000_000
    server = SmtpIngress(with_settings(runtime, max_message_size=limit))
    await server.start(HOST, 0)
    client = await connect(server.port)
    try:
        await converse(client, OPEN, {})
        assert await client.command("MAIL FROM:<alice@example.com>") == 250
        assert await client.command(f"RCPT TO:<{agent.address}>") == 250
        assert await client.command("DATA") == 354
        block = b"x" * 65536
        tracemalloc.start()
        try:
            for _ in range(8 * limit // len(block)):  # 8 MB, no line ending at all
                await client.send(block)
            await client.send(b"\r\n.\r\n")
            code, _ = await client.reply()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert code == 552
        assert peak < 3 * limit, f"peak {peak} bytes traced while receiving 8 MB"
    finally:
        await server.stop(grace=BOUND)
    assert count_messages(runtime) == 0


async def test_long_lines_are_accepted_and_kept_verbatim(
    runtime: Runtime, ingress: SmtpIngress, agent: AgentHandle
) -> None:
    """RFC 5321 §4.5.3.1.6's 1000 octets is a floor, not a ceiling (§4.5.3.1); real
    mail has longer lines, and rewrapping would break verbatim storage and DKIM."""
    raw = build_message(to=agent.address) + b"X" * 20_000 + b"\r\n.leading dot\r\n"

    def send() -> None:
        with smtplib.SMTP(HOST, ingress.port, timeout=BOUND) as client:
            client.sendmail("alice@example.com", [agent.address], raw)

    await asyncio.to_thread(send)
    [row] = stored_rows(runtime)
    assert runtime.blobs.get(row.raw_sha256) == raw


async def test_each_accepted_message_id_is_logged_at_debug(
    runtime: Runtime, ingress: SmtpIngress, agent: AgentHandle, caplog: pytest.LogCaptureFixture
) -> None:
    raw = build_message(to=agent.address)

    def send() -> None:
        with smtplib.SMTP(HOST, ingress.port, timeout=BOUND) as client:
            client.sendmail("alice@example.com", [agent.address], raw)

    with caplog.at_level(logging.DEBUG, logger="mailgate.ingress.smtp"):
        await asyncio.to_thread(send)
    [row] = stored_rows(runtime)
    assert any(
        row.id in r.getMessage() and r.levelno == logging.DEBUG
        for r in caplog.records
        if r.name == "mailgate.ingress.smtp"
    )


async def test_the_same_message_sent_twice_is_acknowledged_twice_and_stored_once(
    runtime: Runtime, ingress: SmtpIngress, agent: AgentHandle
) -> None:
    raw = build_message(to=agent.address)

    def send_twice() -> list[int]:
        codes = []
        for _ in range(2):
            with smtplib.SMTP(HOST, ingress.port, timeout=BOUND) as client:
                client.ehlo("client.example")
                client.mail("alice@example.com")
                client.rcpt(agent.address)
                codes.append(client.data(raw)[0])
        return codes

    assert await asyncio.to_thread(send_twice) == [250, 250]
    assert count_messages(runtime) == 1


async def test_concurrent_copies_from_four_clients_are_stored_once(
    runtime: Runtime, ingress: SmtpIngress, agent: AgentHandle
) -> None:
    raw = build_message(to=agent.address)

    async def send() -> str:
        response = await aiosmtplib.send(
            raw,
            sender="alice@example.com",
            recipients=[agent.address],
            hostname=HOST,
            port=ingress.port,
            timeout=BOUND,
            use_tls=False,
            start_tls=False,
        )
        return str(response[1])

    replies = await asyncio.gather(*(send() for _ in range(4)))
    assert all(reply.startswith("2.0.0") for reply in replies)
    assert count_messages(runtime) == 1


async def test_a_message_to_many_agents_is_stored_per_agent_and_deduplicated_per_agent(
    runtime: Runtime, ingress: SmtpIngress, agent: AgentHandle, other: AgentHandle
) -> None:
    raw = build_message(to=f"{agent.address}, {other.address}")

    def send() -> None:
        with smtplib.SMTP(HOST, ingress.port, timeout=BOUND) as client:
            client.sendmail("alice@example.com", [agent.address, other.address], raw)
            client.sendmail("alice@example.com", [other.address], raw)

    await asyncio.to_thread(send)
    rows = stored_rows(runtime)
    assert sorted(r.agent_id for r in rows) == sorted([agent.agent_id, other.agent_id])


# -- shutdown ---------------------------------------------------------------------------


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Yield to the loop until ``predicate`` holds (bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BOUND
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0)


async def test_stop_refuses_new_connections_but_lets_data_in_flight_finish(
    runtime: Runtime, agent: AgentHandle, connect: Callable[[int], Any]
) -> None:
    server = SmtpIngress(runtime)
    await server.start(HOST, 0)
    port = server.port
    busy = await connect(port)
    idle = await connect(port)
    await converse(idle, OPEN, {})
    steps: list[Step] = [
        *OPEN,
        ("MAIL", "MAIL FROM:<alice@example.com>", 250, "RFC 5321 §4.1.1.2"),
        ("RCPT", "RCPT TO:<{agent}>", 250, "RFC 5321 §4.1.1.3"),
        ("DATA", "DATA", 354, "RFC 5321 §4.1.1.4"),
    ]
    await converse(busy, steps, {"agent": agent.address})
    await busy.send(b"Subject: in flight\r\n\r\nfirst half\r\n")

    stopping = asyncio.create_task(server.stop(grace=BOUND))
    await wait_until(lambda: not server.serving)
    with pytest.raises(ConnectionRefusedError):
        await RawClient.connect(port)
    # The idle session is told and closed at once (RFC 5321 §3.8).
    assert (await idle.reply())[0] == 421
    assert await idle.closed_by_server()
    assert not stopping.done()

    await busy.send(b"second half\r\n.\r\n")
    assert (await busy.reply())[0] == 250
    assert (await busy.reply())[0] == 421
    assert await busy.closed_by_server()
    await asyncio.wait_for(stopping, BOUND)
    [row] = stored_rows(runtime)
    assert row.subject == "in flight"


async def test_a_transaction_that_outlasts_the_grace_is_cut_and_not_stored(
    runtime: Runtime, agent: AgentHandle, connect: Callable[[int], Any]
) -> None:
    server = SmtpIngress(runtime)
    await server.start(HOST, 0)
    client = await connect(server.port)
    steps: list[Step] = [
        *OPEN,
        ("MAIL", "MAIL FROM:<alice@example.com>", 250, "RFC 5321 §4.1.1.2"),
        ("RCPT", "RCPT TO:<{agent}>", 250, "RFC 5321 §4.1.1.3"),
        ("DATA", "DATA", 354, "RFC 5321 §4.1.1.4"),
    ]
    await converse(client, steps, {"agent": agent.address})
    await client.send(b"Subject: never finished\r\n\r\n")
    await asyncio.wait_for(server.stop(grace=0.2), BOUND)
    with pytest.raises((EOFError, ConnectionError)):
        await client.reply()
    assert count_messages(runtime) == 0


def test_requiring_tls_without_a_certificate_is_a_config_error(runtime: Runtime) -> None:
    with pytest.raises(ConfigError):
        SmtpIngress(with_settings(runtime, smtp_require_tls=True))
