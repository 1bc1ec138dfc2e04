"""Outbound: accepted sends/s through the policy gateway, and send→deliver over SMTP.

Two measurements, each against a baseline run in the same section, seconds apart:

1. **Accept** (``capture`` transport). ``mailgate serve`` on SQLite with one agent at
   tier ``open`` (new agents start at ``reply_only``, which blocks new mail) and the
   rate limits raised out of the way takes ``POST /v1/send`` (a unique
   ``Idempotency-Key`` each, one recipient, a ~2 KB text body) at c=8 over
   keep-alive HTTP/1.1. Its ``201 queued`` means the request passed every guard
   step and is committed with its recipients, its copy in the thread, the audit entry
   and the idempotent response. The baseline is `bench.asgi_baseline`'s bare
   ``POST /v1/send`` (``json.loads`` and ``201``, nothing stored) under the same
   uvicorn settings, posted the same bodies by the same client. Figures: sends/s from
   the first request to the last response, mailgate / baseline, and (informative)
   end to end, until the delivery worker running in the same process has marked every
   send ``sent`` (the ``outbound`` rows, read from the database file).
2. **Send → deliver** (``smtp`` transport). A second gateway relays through a real
   aiosmtpd sink in its own process (`mailgate.testing.smtp_sink`, one spool file per
   message, counting into a file); the clock runs from the first ``POST /v1/send`` to
   the N-th message at the sink. The baseline sends the *same* N messages (the very
   bytes mailgate delivered, read back from its sink's spool, to the same recipients)
   with raw aiosmtplib to a second sink of the same kind, over as many kept-open
   sessions as the gateway has delivery workers, from start to the N-th message at
   its sink. Ratio: baseline time / ours (higher is better; the issue's goal is ≥ 0.5).
   The baseline needs the gateway's bytes, so within a repeat the gateway goes first
   on even repeats; on odd repeats the baseline goes first with the previous repeat's
   messages (same recipients, sizes within a few bytes).

Both gateways run side by side from the start (their idle delivery workers poll once
a second). The HTTP client is `bench.webhook`'s raw HTTP/1.1 connection (httpx would
measure itself, see there); connections are opened before the clock, the warm-up
posts are untimed. Each cell is repeated ``repeats`` times and medians are reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
import sqlite3
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses
from pathlib import Path
from typing import Any

import aiosmtplib

from bench.load import close_sessions, open_sessions
from bench.procs import (
    LOOPBACK,
    BenchError,
    Child,
    machine_busy_seconds,
    spawn,
    wait_smtp_ready,
)
from bench.targets import REPO_ROOT, Target, start_mailgate
from bench.webhook import Http1Connection, HttpServer, start_baseline
from mailgate.config import Settings

SEND_PATH = "/v1/send"
SEND_CONCURRENCY = 8
DELIVERY_WORKERS: int = Settings.model_fields["delivery_workers"].default
"""The gateway's default pool; the relay baseline uses as many sessions."""
TARGET_RATIO = 0.5
"""Relay: baseline seconds / mailgate seconds for the same N messages."""
TEXT_SIZE = 2000
DOMAINS = 20
_LIFTED = "10000000"
_SETTLED = frozenset({"queued", "sending", "sent"})
_VOCABULARY = (
    "thanks for the quick reply we can ship the order on monday if the invoice is "
    "confirmed please find the summary below and let me know whether the delivery "
    "window works for your team the contract renewal is due next quarter"
)
_WORDS = tuple(_VOCABULARY.split())


@dataclass(frozen=True, slots=True)
class OutboundPlan:
    """How much to send. The gateway accepted ~90 sends/s on a busy 2-core VM when
    this was written (the baseline ~4,000/s), so the baseline posts more requests than
    the gateway to run long enough to measure; a relay cell carries the same N both
    ways (the baseline sends the gateway's messages)."""

    sends: int
    baseline_sends: int
    relay_sends: int
    repeats: int
    warmup: int
    cell_timeout: float


OUTBOUND_FULL = OutboundPlan(
    sends=400, baseline_sends=2000, relay_sends=250, repeats=3, warmup=40, cell_timeout=120
)
OUTBOUND_QUICK = OutboundPlan(
    sends=120, baseline_sends=400, relay_sends=80, repeats=1, warmup=16, cell_timeout=60
)


# -- requests -----------------------------------------------------------------------------


def _text(size: int, seed: int = 11) -> str:
    """Plain prose of about ``size`` characters, in lines under 78."""
    rng = random.Random(seed)
    lines: list[str] = []
    total = 0
    while total < size:
        line = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(7, 11)))
        lines.append(line[:72].capitalize() + ".")
        total += len(lines[-1]) + 1
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class SendRequests:
    """Unique ``POST /v1/send`` requests: the n-th goes to ``r<n>@d<n % 20>.example``
    with its own subject and ``Idempotency-Key`` (the nonce keeps reruns apart)."""

    nonce: str
    text: str

    @staticmethod
    def recipient(n: int) -> str:
        return f"r{n:06d}@d{n % DOMAINS:02d}.example"

    def make(self, n: int) -> tuple[str, bytes]:
        body = {
            "to": [self.recipient(n)],
            "subject": f"Order {n:06d}: delivery window",
            "text": self.text,
        }
        return f"bench-{self.nonce}-{n:07d}", json.dumps(body).encode()

    def batch(self, start: int, count: int) -> list[tuple[str, bytes]]:
        return [self.make(n) for n in range(start, start + count)]


def send_requests(size: int = TEXT_SIZE) -> SendRequests:
    return SendRequests(secrets.token_hex(4), _text(size))


class SendConnection(Http1Connection):
    """A keep-alive connection posting JSON to ``POST /v1/send`` with the agent's key
    and a per-request ``Idempotency-Key`` (one request at a time per connection)."""

    prefix: bytes = b""

    @classmethod
    async def connect(cls, port: int, api_key: str) -> SendConnection:
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        connection = cls(reader, writer, b"")
        connection.prefix = (
            f"POST {SEND_PATH} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\n"
            f"Authorization: Bearer {api_key}\r\nContent-Type: application/json\r\n"
        ).encode()
        return connection

    async def send(self, key: str, body: bytes) -> tuple[int, bytes]:
        self.head = b"%sIdempotency-Key: %s\r\nContent-Length: " % (self.prefix, key.encode())
        return await self.post(body)


@dataclass
class _Submitted:
    started: float
    elapsed: float
    latencies: list[float]


async def _submit_all(
    name: str, connections: Sequence[SendConnection], requests: Sequence[tuple[str, bytes]]
) -> _Submitted:
    """Post every request once over the connections; returns at the last response.

    Raises:
        BenchError: a response was not ``201`` with ``status: queued`` (counted by
            status and shown), or a connection failed.
    """
    queue: Iterator[tuple[str, bytes]] = iter(requests)
    latencies: list[float] = []
    failures: dict[str, int] = {}
    first: list[str] = []

    async def worker(connection: SendConnection) -> None:
        for key, body in queue:  # one shared iterator: each request is posted once
            started = time.perf_counter()
            status, content = await connection.send(key, body)
            latencies.append(time.perf_counter() - started)
            state = json.loads(content).get("status") if status == 201 else None
            if state != "queued":
                label = f"{status} {state or ''}".strip()
                failures[label] = failures.get(label, 0) + 1
                if not first:
                    first.append(content[:800].decode("utf-8", "replace"))

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(worker(c) for c in connections))
    except (OSError, asyncio.IncompleteReadError) as exc:
        raise BenchError(f"{name}: request failed after {len(latencies)}: {exc!r}") from exc
    elapsed = time.perf_counter() - t0
    if failures:
        summary = ", ".join(f"{n}x {label}" for label, n in sorted(failures.items()))
        raise BenchError(
            f"{name}: {sum(failures.values())} of {len(requests)} sends were not "
            f"201 queued ({summary}); first: {first[0]}"
        )
    return _Submitted(t0, elapsed, latencies)


@contextlib.asynccontextmanager
async def _connections(port: int, api_key: str, count: int) -> Any:
    opened: list[SendConnection] = []
    try:
        for _ in range(count):
            opened.append(await SendConnection.connect(port, api_key))
        yield opened
    finally:
        for connection in opened:
            await connection.close()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


# -- servers ------------------------------------------------------------------------------


@dataclass
class Gateway:
    """A ``mailgate serve`` under test, and what the section needs to know about it."""

    target: Target
    api_key: str
    sender: str
    db_path: Path
    submitted: int = 0
    """Sends accepted so far (warm-up included): the ``sent`` count to wait for."""

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def child(self) -> Child:
        return self.target.child

    @property
    def port(self) -> int:
        assert self.target.child.http_port is not None
        return self.target.child.http_port


async def start_gateway(workdir: Path, name: str, extra_env: dict[str, str]) -> Gateway:
    """A fresh gateway whose agent may mail anyone, as often as the bench asks.

    ``MAILGATE_DEFAULT_TIER=open`` gives the bench agent tier ``open`` at creation
    (what ``mailgate agent tier bench open`` would set afterwards, one CLI start-up
    cheaper); the probe send checks the decision really is ``queued``.
    """
    env = {
        "MAILGATE_DEFAULT_TIER": "open",
        "MAILGATE_RATE_PER_HOUR": _LIFTED,
        "MAILGATE_RATE_PER_DAY": _LIFTED,
        "MAILGATE_RATE_PER_DOMAIN_HOUR": _LIFTED,
        **extra_env,
    }
    target = await start_mailgate(workdir, name=name, extra_env=env)
    assert target.feed is not None
    api_key = str(target.feed.http.headers["authorization"]).removeprefix("Bearer ")
    data_dir = Path(target.notes["env"]["MAILGATE_DATA_DIR"])
    return Gateway(target, api_key, target.rcpt, data_dir / "mailgate.db")


def outbound_states(db_path: Path) -> dict[str, int]:
    """``outbound`` rows per state, read from the gateway's SQLite file (read-only)."""
    with contextlib.closing(
        sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    ) as conn:
        rows = conn.execute("SELECT state, count(*) FROM outbound GROUP BY state").fetchall()
    return {str(state): int(n) for state, n in rows}


async def wait_sent(gateway: Gateway, timeout: float, interval: float = 0.005) -> float:
    """Wait until every accepted send is ``sent``; returns the perf_counter then.

    Raises:
        BenchError: a send ended in another state, or the bound passed first.
    """
    deadline = time.monotonic() + timeout
    while True:
        states = await asyncio.to_thread(outbound_states, gateway.db_path)
        seen = time.perf_counter()
        odd = {s: n for s, n in states.items() if s not in _SETTLED}
        if odd:
            raise BenchError(f"{gateway.name}: outbound rows in {odd} (see its log)")
        if states.get("sent", 0) >= gateway.submitted:
            return seen
        if time.monotonic() > deadline:
            raise BenchError(
                f"{gateway.name}: {states} after {timeout}s, "
                f"{gateway.submitted} expected sent:\n{gateway.child.log_tail()}"
            )
        await asyncio.sleep(interval)


@dataclass
class Sink:
    """A `mailgate.testing.smtp_sink` process: spools each message, counts into a file."""

    child: Child
    spool: Path
    count_file: Path

    @property
    def port(self) -> int:
        return self.child.smtp_port

    def count(self) -> int:
        try:
            return int(self.count_file.read_text() or 0)
        except (OSError, ValueError):
            return 0

    async def wait_count(self, count: int, timeout: float, interval: float = 0.002) -> float:
        """Wait until ``count`` messages have arrived in all; returns perf_counter then.

        Raises:
            BenchError: the bound passed first.
        """
        deadline = time.monotonic() + timeout
        while (seen := self.count()) < count:
            if time.monotonic() > deadline:
                raise BenchError(f"{self.child.name}: {seen} of {count} messages after {timeout}s")
            await asyncio.sleep(interval)
        return time.perf_counter()

    def messages(self, first: int, count: int) -> list[bytes]:
        """The spooled messages number ``first`` .. ``first + count - 1`` (1-based)."""
        return [(self.spool / f"{n:06d}.eml").read_bytes() for n in range(first, first + count)]


async def start_sink(workdir: Path, name: str) -> Sink:
    """Start ``python -m mailgate.testing.smtp_sink`` and wait for its banner.

    Raises:
        BenchError: it did not come up within 20 s.
    """
    spool, ready, count = workdir / f"{name}-spool", workdir / f"{name}.port", workdir / f"{name}.n"
    argv = [
        sys.executable, "-m", "mailgate.testing.smtp_sink", "--host", LOOPBACK,
        "--spool", str(spool), "--ready-file", str(ready), "--count-file", str(count),
    ]  # fmt: skip
    child = spawn(name, argv, workdir / f"{name}.log", cwd=REPO_ROOT)
    try:
        deadline = time.monotonic() + 20
        while not ready.exists():
            if not child.alive() or time.monotonic() > deadline:
                raise BenchError(f"{name} did not start:\n{child.log_tail()}")
            await asyncio.sleep(0.02)
        child.smtp_port = int(ready.read_text())
        await wait_smtp_ready(child, 20)
    except BaseException:
        child.stop()
        raise
    return Sink(child, spool, count)


# -- 1. accept ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendCell:
    """One accept measurement of one server."""

    target: str
    sends: int
    elapsed: float
    """First request -> last response."""
    delivered: float | None
    """First request -> every send ``sent`` (the gateway only)."""
    server_cpu: float
    """Server CPU over the requests (the gateway's delivery worker included)."""
    server_cpu_total: float
    """Server CPU until every send was ``sent``."""
    client_cpu: float
    other_cpu: float
    latency_p50: float
    latency_p99: float

    @property
    def rate(self) -> float:
        return self.sends / self.elapsed

    @property
    def delivered_rate(self) -> float | None:
        return None if self.delivered is None else self.sends / self.delivered

    @property
    def cpu_per_send_us(self) -> float:
        return self.server_cpu / self.sends * 1e6

    @property
    def cpu_total_per_send_us(self) -> float:
        return self.server_cpu_total / self.sends * 1e6

    @property
    def client_load(self) -> float:
        return self.client_cpu / self.elapsed

    @property
    def other_load(self) -> float:
        return max(0.0, self.other_cpu) / self.elapsed


async def run_send_cell(
    name: str,
    child: Child,
    api_key: str,
    requests: Sequence[tuple[str, bytes]],
    timeout: float,
    gateway: Gateway | None = None,
) -> SendCell:
    """Post ``requests`` at c=8; for a gateway, then wait until all are ``sent``.

    Raises:
        BenchError: a send was refused or failed, or the cell outran ``timeout``.
    """
    assert child.http_port is not None
    try:
        async with (
            asyncio.timeout(timeout),
            _connections(child.http_port, api_key, SEND_CONCURRENCY) as connections,
        ):
            cpu0, own0, busy0 = child.cpu_seconds(), time.process_time(), machine_busy_seconds()
            posted = await _submit_all(name, connections, requests)
            server_cpu = child.cpu_seconds() - cpu0
            client_cpu = time.process_time() - own0
            other = machine_busy_seconds() - busy0 - server_cpu - client_cpu
            delivered: float | None = None
            if gateway is not None:
                gateway.submitted += len(requests)
                delivered = await wait_sent(gateway, timeout) - posted.started
            server_total = child.cpu_seconds() - cpu0
    except TimeoutError:
        raise BenchError(f"{name} accept cell took longer than {timeout}s") from None
    return SendCell(
        target=name,
        sends=len(requests),
        elapsed=posted.elapsed,
        delivered=delivered,
        server_cpu=server_cpu,
        server_cpu_total=server_total,
        client_cpu=client_cpu,
        other_cpu=other,
        latency_p50=statistics.median(posted.latencies),
        latency_p99=_percentile(posted.latencies, 0.99),
    )


# -- 2. send -> deliver -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RelayCell:
    """One send→deliver measurement: N messages at the sink."""

    target: str
    messages: int
    elapsed: float
    """Start (first submit / first MAIL) -> the N-th message at the sink."""
    submit_elapsed: float | None
    """The gateway: first request -> last ``201``."""
    server_cpu: float | None
    """The gateway's CPU over the cell (HTTP, policy, store, delivery)."""
    sink_cpu: float
    client_cpu: float
    other_cpu: float
    message_bytes: float
    """Mean size of the messages as the sink stored them."""

    @property
    def rate(self) -> float:
        return self.messages / self.elapsed

    @property
    def lag(self) -> float | None:
        """Seconds from the last ``201`` to the N-th message at the sink."""
        return None if self.submit_elapsed is None else self.elapsed - self.submit_elapsed

    @property
    def server_cpu_per_message_us(self) -> float | None:
        return None if self.server_cpu is None else self.server_cpu / self.messages * 1e6

    @property
    def sink_cpu_per_message_us(self) -> float:
        return self.sink_cpu / self.messages * 1e6

    @property
    def client_load(self) -> float:
        return self.client_cpu / self.elapsed

    @property
    def other_load(self) -> float:
        return max(0.0, self.other_cpu) / self.elapsed


Replay = list[tuple[str, bytes]]
"""(recipient, raw message) pairs the baseline sends."""


def _replay_of(raw_messages: Sequence[bytes]) -> Replay:
    """Recipients from each message's ``To:`` (the bench sends to exactly one)."""
    out: Replay = []
    parser = BytesHeaderParser(policy=compat32)
    for raw in raw_messages:
        to = getaddresses([str(parser.parsebytes(raw).get("To", ""))])
        if len(to) != 1 or not to[0][1]:
            raise BenchError(f"a delivered message has To: {to!r}, expected one address")
        out.append((to[0][1], raw))
    return out


async def run_gateway_relay_cell(
    gateway: Gateway, sink: Sink, requests: Sequence[tuple[str, bytes]], timeout: float
) -> tuple[RelayCell, Replay]:
    """Submit ``requests`` and time until the last one is at the sink; returns the cell
    and the delivered messages (for the baseline to send the same)."""
    n = len(requests)
    try:
        async with (
            asyncio.timeout(timeout),
            _connections(gateway.port, gateway.api_key, SEND_CONCURRENCY) as connections,
        ):
            offset = sink.count()
            cpu0, sink0 = gateway.child.cpu_seconds(), sink.child.cpu_seconds()
            own0, busy0 = time.process_time(), machine_busy_seconds()
            posted = await _submit_all(gateway.name, connections, requests)
            done = await sink.wait_count(offset + n, timeout)
            server_cpu = gateway.child.cpu_seconds() - cpu0
            sink_cpu = sink.child.cpu_seconds() - sink0
            client_cpu = time.process_time() - own0
            other = machine_busy_seconds() - busy0 - server_cpu - sink_cpu - client_cpu
            gateway.submitted += n
            await wait_sent(gateway, timeout)  # untimed: every row recorded as sent
    except TimeoutError:
        raise BenchError(f"{gateway.name} relay cell took longer than {timeout}s") from None
    delivered = await asyncio.to_thread(sink.messages, offset + 1, n)
    cell = RelayCell(
        target="mailgate",
        messages=n,
        elapsed=done - posted.started,
        submit_elapsed=posted.elapsed,
        server_cpu=server_cpu,
        sink_cpu=sink_cpu,
        client_cpu=client_cpu,
        other_cpu=other,
        message_bytes=statistics.fmean(len(m) for m in delivered),
    )
    return cell, _replay_of(delivered)


async def run_raw_relay_cell(
    sink: Sink, sender: str, replay: Replay, sessions: int, timeout: float
) -> RelayCell:
    """Send ``replay`` with aiosmtplib over ``sessions`` kept-open sessions (connected
    and EHLO'd before the clock); time until the last message is at the sink.

    Raises:
        BenchError: a message was refused or a session broke.
    """
    n = len(replay)
    queue = iter(replay)

    async def worker(client: aiosmtplib.SMTP) -> None:
        for rcpt, raw in queue:  # one shared iterator: each message is sent once
            errors, _ = await client.sendmail(sender, [rcpt], raw)
            if errors:
                raise BenchError(f"the sink refused {errors}")

    clients = await open_sessions(sink.port, sessions, timeout)
    try:
        async with asyncio.timeout(timeout):
            offset = sink.count()
            sink0, own0, busy0 = (
                sink.child.cpu_seconds(),
                time.process_time(),
                machine_busy_seconds(),
            )
            t0 = time.perf_counter()
            try:
                await asyncio.gather(*(worker(c) for c in clients))
            except aiosmtplib.SMTPException as exc:
                raise BenchError(f"aiosmtplib baseline failed: {exc}") from exc
            done = await sink.wait_count(offset + n, timeout)
            sink_cpu = sink.child.cpu_seconds() - sink0
            client_cpu = time.process_time() - own0
            other = machine_busy_seconds() - busy0 - sink_cpu - client_cpu
    except TimeoutError:
        raise BenchError(f"aiosmtplib relay cell took longer than {timeout}s") from None
    finally:
        await close_sessions(clients)
    return RelayCell(
        target="aiosmtplib",
        messages=n,
        elapsed=done - t0,
        submit_elapsed=None,
        server_cpu=None,
        sink_cpu=sink_cpu,
        client_cpu=client_cpu,
        other_cpu=other,
        message_bytes=statistics.fmean(len(raw) for _, raw in replay),
    )


# -- the section --------------------------------------------------------------------------


@dataclass
class OutboundResult:
    plan: OutboundPlan
    send_cells: list[SendCell] = field(default_factory=list)
    relay_cells: list[RelayCell] = field(default_factory=list)
    request_bytes: int = 0
    sessions: int = DELIVERY_WORKERS

    def send_median(self, target: str, metric: Callable[[SendCell], float | None]) -> float | None:
        values = [v for c in self.send_cells if c.target == target if (v := metric(c)) is not None]
        return statistics.median(values) if values else None

    def relay_median(
        self, target: str, metric: Callable[[RelayCell], float | None]
    ) -> float | None:
        values = [v for c in self.relay_cells if c.target == target if (v := metric(c)) is not None]
        return statistics.median(values) if values else None

    def send_ratio(self) -> float | None:
        """Median gateway sends/s over median baseline requests/s."""
        m = self.send_median("mailgate", lambda c: c.rate)
        b = self.send_median("baseline", lambda c: c.rate)
        return None if m is None or not b else m / b

    def relay_ratio(self) -> float | None:
        """Median baseline seconds over median gateway seconds (higher is better)."""
        m = self.relay_median("mailgate", lambda c: c.elapsed)
        b = self.relay_median("aiosmtplib", lambda c: c.elapsed)
        return None if m is None or b is None or not m else b / m

    def pair_ratios(self) -> list[float]:
        """The relay ratio within each repeat (its spread is the machine's noise)."""
        ours = [c.elapsed for c in self.relay_cells if c.target == "mailgate"]
        theirs = [c.elapsed for c in self.relay_cells if c.target == "aiosmtplib"]
        return [b / m for m, b in zip(ours, theirs, strict=False)]

    def passed(self) -> bool | None:
        ratio = self.relay_ratio()
        return None if ratio is None else ratio >= TARGET_RATIO


async def _start_all(workdir: Path) -> tuple[HttpServer, Gateway, Gateway, Sink, Sink]:
    """Start the five processes concurrently; on any failure stop those that started."""
    relay_sink = await start_sink(workdir, "relay-sink")
    raw_sink: Sink | None = None
    try:
        raw_sink = await start_sink(workdir, "raw-sink")
        relay_env = {
            "MAILGATE_TRANSPORT": "smtp",
            "MAILGATE_RELAY_HOST": LOOPBACK,
            "MAILGATE_RELAY_PORT": str(relay_sink.port),
            "MAILGATE_RELAY_STARTTLS": "off",
        }
        started = await asyncio.gather(
            start_baseline(workdir),
            start_gateway(workdir, "mailgate-capture", {}),
            start_gateway(workdir, "mailgate-relay", relay_env),
            return_exceptions=True,
        )
    except BaseException:
        relay_sink.child.stop()
        if raw_sink is not None:
            raw_sink.child.stop()
        raise
    failed = [s for s in started if isinstance(s, BaseException)]
    if failed:
        for server in started:
            if isinstance(server, HttpServer):
                await server.close()
            elif isinstance(server, Gateway):
                await server.target.close()
        relay_sink.child.stop()
        raw_sink.child.stop()
        raise failed[0]
    baseline, capture, relay = started
    assert isinstance(baseline, HttpServer)
    assert isinstance(capture, Gateway) and isinstance(relay, Gateway)
    return baseline, capture, relay, relay_sink, raw_sink


async def run_outbound(
    plan: OutboundPlan, workdir: Path, progress: Callable[[str], None] = lambda _: None
) -> OutboundResult:
    """Start the servers, warm up, run both measurements."""
    result = OutboundResult(plan)
    requests = send_requests()
    result.request_bytes = len(requests.make(0)[1])
    progress("outbound: starting two gateways, the JSON baseline and two SMTP sinks")
    baseline, capture, relay, relay_sink, raw_sink = await _start_all(workdir)
    seq = 0

    def take(count: int) -> list[tuple[str, bytes]]:
        nonlocal seq
        batch = requests.batch(seq, count)
        seq += count
        return batch

    try:
        progress("outbound: warming up")
        for gateway in (capture, relay):
            await run_send_cell(
                gateway.name, gateway.child, gateway.api_key, take(plan.warmup),
                plan.cell_timeout, gateway,
            )  # fmt: skip
        await run_send_cell(
            "baseline", baseline.child, capture.api_key, take(plan.warmup), plan.cell_timeout
        )
        await relay_sink.wait_count(plan.warmup, plan.cell_timeout)
        replay = _replay_of(await asyncio.to_thread(relay_sink.messages, 1, plan.warmup))
        await run_raw_relay_cell(
            raw_sink, relay.sender, replay, DELIVERY_WORKERS, plan.cell_timeout
        )

        for repeat in range(plan.repeats):
            label = f"outbound run {repeat + 1}/{plan.repeats}"
            order = ("baseline", "mailgate") if repeat % 2 == 0 else ("mailgate", "baseline")
            for name in order:
                measured = None if name == "baseline" else capture
                child = baseline.child if measured is None else capture.child
                count = plan.baseline_sends if measured is None else plan.sends
                progress(f"{label}: accept, {name} ({count} sends at c={SEND_CONCURRENCY})")
                result.send_cells.append(
                    await run_send_cell(
                        name, child, capture.api_key, take(count), plan.cell_timeout, measured
                    )
                )
            gateway_first = repeat % 2 == 0
            for step in ("gateway", "raw") if gateway_first else ("raw", "gateway"):
                if step == "gateway":
                    progress(f"{label}: send→deliver, mailgate ({plan.relay_sends} messages)")
                    relay_cell, delivered = await run_gateway_relay_cell(
                        relay, relay_sink, take(plan.relay_sends), plan.cell_timeout
                    )
                    result.relay_cells.append(relay_cell)
                else:
                    source = delivered if gateway_first else replay
                    progress(f"{label}: send→deliver, aiosmtplib ({len(source)} messages)")
                    result.relay_cells.append(
                        await run_raw_relay_cell(
                            raw_sink, relay.sender, source, DELIVERY_WORKERS, plan.cell_timeout
                        )
                    )
            replay = delivered
    finally:
        await baseline.close()
        for gateway in (capture, relay):
            await gateway.target.close()
        relay_sink.child.stop()
        raw_sink.child.stop()
    return result
