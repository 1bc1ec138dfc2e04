"""Every message of the shared MIME corpus goes through the real SMTP server.

One long-lived smtplib connection delivers them all (as a relaying MTA would). Each
must get ``250`` and be stored byte-identical to what the server received. smtplib
dot-stuffs but does not fix line endings in ``bytes``, and the corpus has bare-LF and
mixed files, which the gateway refuses (RFC 5321 §2.3.8), so the client here first
normalises every file to CRLF, exactly as a conforming client (or smtplib with
``str``) would; the expected raw is that normalised text, plus the CRLF smtplib adds
when the last line has none. SQLite only: the SMTP edge does not depend on the backend.
"""

from __future__ import annotations

import asyncio
import re
import smtplib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select

from mailgate.config import load_settings
from mailgate.ingress.smtp import SmtpIngress
from mailgate.runtime import Runtime
from mailgate.store.schema import messages
from tests.conftest import make_agent

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus"
HOST = "127.0.0.1"
MAX_SIZE = 10 * 1024 * 1024
ANY_LINE_ENDING = re.compile(rb"\r\n|\r|\n")
MESSAGE_ID = re.compile(r"stored as (\S+)")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass(frozen=True)
class Sample:
    name: str
    original: bytes
    sent: bytes  # CRLF-normalised, as a conforming client puts it on the wire
    expected: bytes  # what the server should receive after unstuffing


def corpus() -> list[Sample]:
    samples = []
    for path in sorted(p for p in CORPUS.rglob("*") if p.is_file() and p.name != "SOURCES.md"):
        original = path.read_bytes()
        sent = ANY_LINE_ENDING.sub(b"\r\n", original)
        expected = sent if sent.endswith(b"\r\n") else sent + b"\r\n"
        samples.append(Sample(str(path.relative_to(CORPUS)), original, sent, expected))
    return samples


def defect_class(defect: str) -> str:
    """``header:Subject:InvalidHeaderDefect`` -> ``header:InvalidHeaderDefect``."""
    parts = defect.split(":")
    return f"header:{parts[-1]}" if parts[0] == "header" else parts[0]


@pytest.fixture
def runtime(tmp_path: Path, sqlite_url: str) -> Iterator[Runtime]:
    settings = load_settings(data_dir=tmp_path, database_url=sqlite_url, max_message_size=MAX_SIZE)
    rt = Runtime.build(settings)
    yield rt
    rt.close()


@pytest.mark.skipif(not CORPUS.is_dir(), reason=f"corpus not found at {CORPUS}")
async def test_the_whole_corpus_is_accepted_and_stored_byte_identical(runtime: Runtime) -> None:
    samples = corpus()
    assert len(samples) > 300
    address = make_agent(runtime).address
    server = SmtpIngress(runtime)
    await server.start(HOST, 0)

    def deliver_all() -> list[tuple[int, str]]:
        replies = []
        with smtplib.SMTP(HOST, server.port, timeout=60) as client:
            client.ehlo("corpus.example")
            for sample in samples:
                client.mail("corpus@example.com", [f"SIZE={len(sample.expected)}"])
                client.rcpt(address)
                code, text = client.data(sample.sent)
                replies.append((code, text.decode("utf-8", "replace")))
        return replies

    try:
        replies = await asyncio.to_thread(deliver_all)
    finally:
        await server.stop(grace=10)

    refused = [
        (s.name, code, text)
        for s, (code, text) in zip(samples, replies, strict=True)
        if code != 250
    ]
    assert not refused

    with runtime.db.read() as conn:
        rows = {row.id: row for row in conn.execute(select(messages))}
    mismatched, defects, defective = [], Counter[str](), 0
    for sample, (_, text) in zip(samples, replies, strict=True):
        found = MESSAGE_ID.search(text)
        assert found, text
        row = rows[found.group(1)]
        if runtime.blobs.get(row.raw_sha256) != sample.expected:
            mismatched.append(sample.name)
        if row.defects:
            defective += 1
            defects.update(map(defect_class, row.defects))
    assert not mismatched

    longest = {s.name: max(map(len, s.sent.split(b"\r\n"))) for s in samples}
    print(
        f"\ncorpus over SMTP: {len(samples)} messages, "
        f"{sum(len(s.expected) for s in samples):,} bytes, all 250 and byte-identical; "
        f"{len(rows)} stored rows\n"
        f"  CRLF-normalised by the client (bare LF/CR or mixed): "
        f"{sum(s.sent != s.original for s in samples)}\n"
        f"  lines over 998 octets: {sum(n > 998 for n in longest.values())} messages "
        f"(longest {max(longest.values()):,})\n"
        f"  parser defects: {defective} messages; "
        + ", ".join(f"{name} {count}" for name, count in defects.most_common())
    )
