"""Webhook ingest: SendGrid Inbound Parse posts into mailgate against a bare ASGI endpoint.

Two servers, each in its own subprocess, both under uvicorn with the same settings:

- ``mailgate``: ``mailgate serve`` on a fresh data dir with
  ``MAILGATE_INBOUND_SENDGRID_SECRET`` set, so ``POST /inbound/sendgrid/<secret>``
  is on. Its ``200`` means the message is built, stored and committed;
- ``baseline``: `bench.asgi_baseline`, which parses the same multipart form with
  Starlette (every field and file read) and answers ``200`` without storing.

mailgate / baseline is therefore what the gateway's webhook path costs on top of
receiving and parsing the form. Bodies are SendGrid's parsed mode (``headers``,
``text``, ``html``, ``from``, ``to``, ``subject``, ``envelope``, ``charsets``, ``SPF``,
``dkim``, ``sender_ip``, ``spam_score``, ``spam_report``, ``attachments``: 14 fields,
~4 KB), built before timing, each with its own Message-ID and subject so mailgate
stores every one instead of deduplicating.

The load generator opens ``c`` keep-alive HTTP/1.1 connections per cell (each
warmed by one untimed post), runs ``c`` workers taking bodies from one shared
iterator, and times from the first timed request to the last response:
requests/s = N / wall time. It speaks HTTP on raw asyncio streams rather than
through httpx, which cost three times the server's CPU per request and so measured
itself (`Http1Connection` has the figures; ``client="httpx"`` still uses it).

Every response must be ``200`` (for mailgate with a non-empty ``stored`` list) or
the cell fails; after each mailgate cell its ``message.received`` events are pulled
(untimed), so a ``200`` that stored nothing visible is caught too. Each cell runs
``repeats`` times, the two servers back to back in alternating order, and the
medians are reported.

Until the gateway has the route (``404``), the section reports "not available"
with the answer it got instead of failing the whole run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path

import httpx

from bench.procs import LOOPBACK, BenchError, Child, free_port, machine_busy_seconds, spawn
from bench.targets import REPO_ROOT, Target, start_mailgate

HEADLINE_CONCURRENCY = 8
SENDGRID_PATH = "/inbound/sendgrid/"
_BOUNDARY = "xYzZY-mailgate-bench-7MA4YWxkTrZu0gW"
_ID_TOKEN = b"WEBHOOKMSGID00000000000000000000"
_SUBJECT_TOKEN = b"SUBJ000000"
_VOCABULARY = (
    "invoice order shipment please could you confirm the delivery date for our account "
    "thanks regards team meeting tomorrow agenda attached review contract renewal terms "
    "pricing quarter support ticket customer issue resolved pending update status report"
)
_WORDS = tuple(_VOCABULARY.split())


@dataclass(frozen=True, slots=True)
class WebhookPlan:
    """How much to post. A c=8 cell takes ~0.5 s on the baseline, 2-5 s on mailgate."""

    concurrency: tuple[int, ...]
    counts: dict[int, int]
    repeats: int
    warmup: int
    size: int
    cell_timeout: float
    client: str = "raw"
    """Load generator: ``raw`` (`Http1Connection`) or ``httpx`` (``httpx.AsyncClient``)."""


WEBHOOK_FULL = WebhookPlan(
    concurrency=(1, HEADLINE_CONCURRENCY),
    counts={1: 200, HEADLINE_CONCURRENCY: 1000},
    repeats=3,
    warmup=100,
    size=4 * 1024,
    cell_timeout=180.0,
)
WEBHOOK_QUICK = WebhookPlan(
    concurrency=WEBHOOK_FULL.concurrency,
    counts={1: 20, HEADLINE_CONCURRENCY: 60},
    repeats=1,
    warmup=8,
    size=4 * 1024,
    cell_timeout=60.0,
)


# -- request bodies -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendGridForm:
    """Unique SendGrid parsed-mode bodies: a template stamped per request."""

    template: bytes
    nonce: str
    fields: int

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={_BOUNDARY}"

    def make(self, n: int) -> bytes:
        unique = f"{self.nonce}{n:020d}".encode()[-len(_ID_TOKEN) :]
        return self.template.replace(_ID_TOKEN, unique).replace(
            _SUBJECT_TOKEN, f"{n:010d}".encode()
        )

    def batch(self, start: int, count: int) -> list[bytes]:
        return [self.make(n) for n in range(start, start + count)]


def _prose(rng: random.Random, size: int) -> list[str]:
    lines: list[str] = []
    total = 0
    while total < size:
        line = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 11)))
        lines.append(line[:74].capitalize() + ".")
        total += len(lines[-1]) + 2
    return lines


def _multipart(fields: Sequence[tuple[str, str]]) -> bytes:
    parts = [
        f'--{_BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        for name, value in fields
    ]
    return ("".join(parts) + f"--{_BOUNDARY}--\r\n").encode()


def _fields(rcpt: str, text: list[str], html: list[str]) -> list[tuple[str, str]]:
    sender = "ada@example.org"
    subject = f"Question about order #{_SUBJECT_TOKEN.decode()}"
    date = format_datetime(datetime.now(UTC))
    headers = "\n".join(
        (
            f"Received: by mx0047p1mdw1.sendgrid.net with SMTP id 6WCVv7KAWn {date}",
            "Received: from mail.example.org (mail.example.org [192.0.2.10]) by "
            "mx0047p1mdw1.sendgrid.net (Postfix) with ESMTPS id AA9FFA817F2 for "
            f"<{rcpt}>; {date}",
            "DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.org; s=s1; "
            "h=mime-version:from:date:message-id:subject:to; "
            "bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=; "
            "b=dGhpcyBpcyBub3QgYSByZWFsIHNpZ25hdHVyZSwganVzdCBiZW5jaCBwYWRkaW5n",
            "MIME-Version: 1.0",
            "From: Ada Lovelace <ada@example.org>",
            f"Date: {date}",
            f"Message-ID: <{_ID_TOKEN.decode()}@mail.example.org>",
            f"Subject: {subject}",
            f"To: {rcpt}",
            'Content-Type: multipart/alternative; boundary="000000000000b1c2d3e4f5a6b7c8"',
            "",
        )
    )
    html_body = (
        '<html><head><meta charset="utf-8"></head><body>'
        + "".join(f"<p>{line}</p>\n" for line in html)
        + "</body></html>"
    )
    return [
        ("headers", headers),
        ("dkim", "{@example.org : pass}"),
        ("to", rcpt),
        ("html", html_body),
        ("from", f"Ada Lovelace <{sender}>"),
        ("text", "\n".join(text) + "\n"),
        ("sender_ip", "192.0.2.10"),
        (
            "spam_report",
            'Spam detection software, running on the system "mx0047p1mdw1.sendgrid.net", '
            "has NOT identified this incoming email as spam.\n\nContent analysis details:"
            "   (0.1 points, 5.0 required)\n\n pts rule name              description\n"
            "---- ---------------------- ------------------------------------------\n"
            " 0.1 HTML_MESSAGE           BODY: HTML included in message\n",
        ),
        ("envelope", json.dumps({"to": [rcpt], "from": sender})),
        ("attachments", "0"),
        ("subject", subject),
        ("spam_score", "0.1"),
        (
            "charsets",
            json.dumps({k: "UTF-8" for k in ("to", "html", "subject", "from", "text")}),
        ),
        ("SPF", "pass"),
    ]


def sendgrid_form(rcpt: str, size: int, *, seed: int = 5) -> SendGridForm:
    """Bodies of about ``size`` bytes addressed to ``rcpt``: the prose fills what the
    fixed fields leave, about two fifths as text and the rest as HTML."""
    rng = random.Random(seed)
    room = max(0, size - len(_multipart(_fields(rcpt, [], []))))
    text = _prose(rng, room * 2 // 5)
    html = _prose(rng, room)
    fields = _fields(rcpt, text, html)
    while html and len(_multipart(fields)) > size:
        html.pop()
        fields = _fields(rcpt, text, html)
    return SendGridForm(_multipart(fields), secrets.token_hex(6), len(fields))


# -- servers ------------------------------------------------------------------------


@dataclass
class HttpServer:
    """A server the HTTP load generator posts to."""

    name: str
    child: Child
    base_url: str
    path: str
    target: Target | None = None
    """The mailgate target (feed included); None for the baseline."""
    parser: str = ""
    """The baseline's form parser, as its ``GET /`` names it."""

    async def close(self) -> None:
        if self.target is not None:
            await self.target.close()
        else:
            self.child.stop()


async def start_baseline(workdir: Path) -> HttpServer:
    """Start `bench.asgi_baseline` and wait until ``GET /`` answers.

    Raises:
        BenchError: it did not come up within 20 s.
    """
    port = free_port()
    argv = [sys.executable, "-m", "bench.asgi_baseline", "--host", LOOPBACK, "--port", str(port)]
    child = spawn("baseline", argv, workdir / "asgi-baseline.log", cwd=REPO_ROOT)
    child.http_port = port
    base_url = f"http://{LOOPBACK}:{port}"
    try:
        async with httpx.AsyncClient(base_url=base_url, timeout=2.0) as client:
            deadline = time.monotonic() + 20
            while True:
                if not child.alive():
                    raise BenchError(f"baseline exited early:\n{child.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    ready = await client.get("/")
                    if ready.status_code == 200:
                        parser = ready.text.removeprefix("ok:").strip()
                        break
                if time.monotonic() > deadline:
                    raise BenchError(f"baseline not ready in 20s:\n{child.log_tail()}")
                await asyncio.sleep(0.05)
    except BaseException:
        child.stop()
        raise
    return HttpServer("baseline", child, base_url, SENDGRID_PATH + "baseline", parser=parser)


async def start_webhook_mailgate(workdir: Path) -> HttpServer:
    """``mailgate serve`` with the SendGrid endpoint enabled under a random secret."""
    secret = secrets.token_urlsafe(24)
    target = await start_mailgate(
        workdir,
        name="mailgate-webhook",
        extra_env={"MAILGATE_INBOUND_SENDGRID_SECRET": secret},
    )
    base_url = f"http://{LOOPBACK}:{target.child.http_port}"
    return HttpServer("mailgate", target.child, base_url, SENDGRID_PATH + secret, target)


# -- load ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HttpCell:
    """One measurement of one server at one concurrency."""

    target: str
    concurrency: int
    requests: int
    body_size: int
    elapsed: float  # first request -> last response
    server_cpu: float
    client_cpu: float
    other_cpu: float
    latency_p50: float
    latency_p99: float

    @property
    def rate(self) -> float:
        return self.requests / self.elapsed

    @property
    def cpu_per_request_us(self) -> float:
        return self.server_cpu / self.requests * 1e6

    @property
    def client_load(self) -> float:
        """Load generator CPU in cores (1.00 = one core busy the whole cell)."""
        return self.client_cpu / self.elapsed

    @property
    def other_load(self) -> float:
        return max(0.0, self.other_cpu) / self.elapsed


class _Refused(BenchError):
    """A response other than the expected ``200`` (carries the status)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


Poster = Callable[[bytes], Awaitable[tuple[int, bytes]]]
"""Posts one body to the server's endpoint; returns ``(status, response body)``."""


class Http1Connection:
    """One keep-alive HTTP/1.1 connection that speaks just enough of RFC 9112 to post
    a form and read a ``Content-Length`` answer.

    Why not httpx here: measured on this 2-core VM against the baseline at c=8,
    ``httpx.AsyncClient`` spent 1.1-1.5 ms of CPU per request (httpcore alone
    0.85-0.95 ms) where the server spent ~0.4 ms, so the figure was the load
    generator's (~600 req/s); this client spends ~55 µs and the baseline reaches
    ~2,600 req/s, its own ceiling. ``--webhook-client httpx`` measures with httpx.
    """

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.head = head

    @classmethod
    async def open(cls, port: int, path: str, content_type: str) -> Http1Connection:
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: "
        ).encode()
        return cls(reader, writer, head)

    async def post(self, body: bytes) -> tuple[int, bytes]:
        """Send one request and read its whole response.

        Raises:
            BenchError: the server closed the connection or answered in a framing
                this client does not read (chunked, no length).
        """
        self.writer.write(b"%s%d\r\n\r\n%s" % (self.head, len(body), body))
        status_line = await self.reader.readline()
        if not status_line:
            raise BenchError("the server closed a keep-alive connection")
        status = int(status_line.split(b" ", 2)[1])
        length: int | None = None
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" or (
                name == b"connection" and value.strip().lower() == b"close"
            ):
                raise BenchError(f"unexpected response framing: {line!r}")
        if length is None:
            raise BenchError(f"response without Content-Length (status {status})")
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def open_posters(
    server: HttpServer, content_type: str, concurrency: int, client: str, timeout: float
) -> AsyncIterator[list[Poster]]:
    """``concurrency`` posters, one per worker: a raw connection each (``client="raw"``)
    or one shared ``httpx.AsyncClient`` pool of that many connections."""
    if client == "httpx":
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        headers = {"content-type": content_type}
        async with httpx.AsyncClient(
            base_url=server.base_url, limits=limits, timeout=httpx.Timeout(timeout)
        ) as pool:

            async def post(body: bytes) -> tuple[int, bytes]:
                response = await pool.post(server.path, content=body, headers=headers)
                return response.status_code, response.content

            yield [post] * concurrency
        return
    assert server.child.http_port is not None
    connections: list[Http1Connection] = []
    try:
        for _ in range(concurrency):
            connections.append(
                await Http1Connection.open(server.child.http_port, server.path, content_type)
            )
        yield [c.post for c in connections]
    finally:
        for connection in connections:
            await connection.close()


@dataclass
class _Posted:
    started: float
    elapsed: float
    latencies: list[float]
    stored: int


async def _post_all(
    server: HttpServer, posters: Sequence[Poster], bodies: Sequence[bytes]
) -> _Posted:
    """Post every body once, one worker per poster; returns at the last response.

    Raises:
        _Refused: any response was not ``200`` (or, from mailgate, stored nothing);
            the statuses of every response are counted in the message.
        BenchError: a connection failed.
    """
    queue: Iterator[bytes] = iter(bodies)
    latencies: list[float] = []
    failures: dict[int, int] = {}
    first_failure: list[str] = []
    stored = 0
    expect_stored = server.target is not None

    async def worker(post: Poster) -> None:
        nonlocal stored
        for body in queue:  # one shared iterator: each body is posted exactly once
            started = time.perf_counter()
            status, content = await post(body)
            latencies.append(time.perf_counter() - started)
            if status == 200:
                if not expect_stored:
                    continue
                count = len(json.loads(content).get("stored") or ())
                stored += count
                if count:
                    continue
            failures[status] = failures.get(status, 0) + 1
            if not first_failure:
                first_failure.append(content[:500].decode("utf-8", "replace"))

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(worker(post) for post in posters))
    except (OSError, asyncio.IncompleteReadError, httpx.HTTPError) as exc:
        raise BenchError(f"{server.name}: request failed after {len(latencies)}: {exc!r}") from exc
    elapsed = time.perf_counter() - t0
    if failures:
        summary = ", ".join(f"{n}x {status}" for status, n in sorted(failures.items()))
        raise _Refused(
            f"{server.name}: {sum(failures.values())} of {len(bodies)} responses were not "
            f"200 with a stored message ({summary}); first: {first_failure[0]}",
            next(iter(failures)),
        )
    return _Posted(t0, elapsed, latencies, stored)


async def run_http_cell(
    server: HttpServer,
    form: SendGridForm,
    concurrency: int,
    count: int,
    first: int,
    timeout: float,
    client: str = "raw",
) -> HttpCell:
    """Open ``concurrency`` keep-alive connections (one untimed post each), post
    ``count`` bodies, and (for mailgate, untimed) pull the events of all it stored.

    Raises:
        BenchError: a request failed, was refused, or its event never became visible.
    """
    warm = form.batch(first, concurrency)
    bodies = form.batch(first + concurrency, count)
    try:
        async with (
            asyncio.timeout(timeout),
            open_posters(server, form.content_type, concurrency, client, timeout) as posters,
        ):
            opened = await _post_all(server, posters, warm)
            cpu0, own0 = server.child.cpu_seconds(), time.process_time()
            busy0 = machine_busy_seconds()
            posted = await _post_all(server, posters, bodies)
            server_cpu = server.child.cpu_seconds() - cpu0
            client_cpu = time.process_time() - own0
            other = machine_busy_seconds() - busy0 - server_cpu - client_cpu
            if server.target is not None and server.target.feed is not None:
                await server.target.feed.drain(opened.stored + posted.stored, timeout)
    except TimeoutError:
        raise BenchError(f"{server.name} cell took longer than {timeout}s") from None
    latencies = sorted(posted.latencies)
    return HttpCell(
        target=server.name,
        concurrency=concurrency,
        requests=count,
        body_size=len(bodies[0]),
        elapsed=posted.elapsed,
        server_cpu=server_cpu,
        client_cpu=client_cpu,
        other_cpu=other,
        latency_p50=statistics.median(latencies),
        latency_p99=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
    )


# -- the section --------------------------------------------------------------------


@dataclass
class WebhookResult:
    plan: WebhookPlan
    cells: list[HttpCell] = field(default_factory=list)
    body_size: int = 0
    fields: int = 0
    unavailable: str | None = None
    """Why mailgate could not be measured (its endpoint answered 404), else None."""
    baseline_parser: str = ""

    def median(
        self, target: str, concurrency: int, metric: Callable[[HttpCell], float]
    ) -> float | None:
        values = [
            metric(c) for c in self.cells if (c.target, c.concurrency) == (target, concurrency)
        ]
        return statistics.median(values) if values else None

    def ratio(self, concurrency: int = HEADLINE_CONCURRENCY) -> float | None:
        """Median mailgate requests/s over median baseline requests/s."""
        m = self.median("mailgate", concurrency, lambda c: c.rate)
        b = self.median("baseline", concurrency, lambda c: c.rate)
        return None if m is None or not b else m / b


async def _probe(server: HttpServer, form: SendGridForm) -> str | None:
    """One post to mailgate's endpoint: None when it stores, else why it is unavailable.

    Raises:
        BenchError: it answered something other than 200 or 404 (a bug, not absence).
    """
    async with open_posters(server, form.content_type, 1, "httpx", 30.0) as posters:
        try:
            await _post_all(server, posters, [form.make(0)])
        except _Refused as exc:
            if exc.status in (404, 405):
                return f"POST /inbound/sendgrid/<secret> answered {exc.status}: {exc}"
            raise
    assert server.target is not None and server.target.feed is not None
    await server.target.feed.drain(1, 30.0)
    return None


async def run_webhook(
    plan: WebhookPlan, workdir: Path, progress: Callable[[str], None] = lambda _: None
) -> WebhookResult:
    """Start both servers, probe mailgate's endpoint, warm up, run every cell."""
    result = WebhookResult(plan)
    servers: dict[str, HttpServer] = {}
    try:
        progress("webhook: starting mailgate and the ASGI baseline")
        servers["mailgate"] = await start_webhook_mailgate(workdir)
        servers["baseline"] = await start_baseline(workdir)
        result.baseline_parser = servers["baseline"].parser
        assert servers["mailgate"].target is not None
        form = sendgrid_form(servers["mailgate"].target.rcpt, plan.size)
        result.body_size, result.fields = len(form.make(0)), form.fields
        result.unavailable = await _probe(servers["mailgate"], form)
        if result.unavailable is not None:
            progress(f"webhook: not available ({result.unavailable[:120]})")
            return result
        seq = 1
        for name in ("baseline", "mailgate"):
            progress(f"webhook: warming up {name}")
            await run_http_cell(
                servers[name], form, 4, plan.warmup, seq, plan.cell_timeout, plan.client
            )
            seq += plan.warmup + 4
        for repeat in range(plan.repeats):
            order = ("baseline", "mailgate") if repeat % 2 == 0 else ("mailgate", "baseline")
            for concurrency in plan.concurrency:
                count = plan.counts[concurrency]
                for name in order:
                    progress(
                        f"webhook run {repeat + 1}/{plan.repeats}: c={concurrency} {name} "
                        f"({count} requests)"
                    )
                    cell = await run_http_cell(
                        servers[name], form, concurrency, count, seq, plan.cell_timeout, plan.client
                    )
                    seq += count + concurrency
                    result.cells.append(cell)
    finally:
        for server in servers.values():
            await server.close()
    return result
