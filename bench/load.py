"""The load generator: N persistent SMTP sessions sending pre-built messages.

Each of the ``concurrency`` clients connects and says EHLO *before* the clock starts,
then sends message after message over its one session (a new MAIL FROM resets the
transaction), which is how a relay delivers a queue; one connection per message would
measure TCP and banner set-up instead (BASELINES: it halves throughput). Messages are
built before timing too, so the clock covers only the SMTP conversation.

The client's own CPU time is recorded: on a 2-core machine the load generator and the
server share the cores, and aiosmtplib spends real CPU on line-ending and
dot-stuffing regexes for large messages, so a client near 100% of a core means the
figure is a floor for the server, not its ceiling.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import aiosmtplib

from bench.procs import LOOPBACK, BenchError

SENDER = "loadgen@bench.example"


@dataclass(frozen=True, slots=True)
class SendResult:
    """What one cell's sending phase measured (the clock stops at the last 250)."""

    messages: int
    started: float  # perf_counter() at the first send, for end-to-end clocks
    elapsed: float
    client_cpu: float
    latency_p50: float
    latency_p99: float

    @property
    def rate(self) -> float:
        return self.messages / self.elapsed if self.elapsed > 0 else 0.0


async def open_sessions(port: int, concurrency: int, timeout: float) -> list[aiosmtplib.SMTP]:
    """``concurrency`` connected, EHLO'd sessions (no TLS: loopback only)."""
    sessions: list[aiosmtplib.SMTP] = []
    try:
        for _ in range(concurrency):
            client = aiosmtplib.SMTP(
                hostname=LOOPBACK,
                port=port,
                timeout=timeout,
                start_tls=False,
                use_tls=False,
                local_hostname="loadgen.bench.example",
            )
            await client.connect()
            await client.ehlo()
            sessions.append(client)
    except BaseException:
        await close_sessions(sessions)
        raise
    return sessions


async def close_sessions(sessions: Sequence[aiosmtplib.SMTP]) -> None:
    """QUIT politely where possible; never raise (this runs in ``finally`` blocks)."""

    async def close(client: aiosmtplib.SMTP) -> None:
        with contextlib.suppress(Exception):
            if client.is_connected:
                await asyncio.wait_for(client.quit(), 2.0)
        client.close()

    await asyncio.gather(*(close(c) for c in sessions), return_exceptions=True)


async def send_all(
    sessions: Sequence[aiosmtplib.SMTP], messages: Sequence[bytes], rcpt: str
) -> SendResult:
    """Send every message once, spread over the sessions; returns at the last ``250``.

    Raises:
        BenchError: a message was refused or a session broke (the figure would lie).
    """
    queue: Iterator[bytes] = iter(messages)
    latencies: list[float] = []

    async def worker(client: aiosmtplib.SMTP) -> None:
        for raw in queue:  # one shared iterator: each message is taken exactly once
            started = time.perf_counter()
            errors, _ = await client.sendmail(SENDER, [rcpt], raw)
            if errors:
                raise BenchError(f"recipient refused: {errors}")
            latencies.append(time.perf_counter() - started)

    cpu0 = time.process_time()
    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(worker(c) for c in sessions))
    except aiosmtplib.SMTPException as exc:
        raise BenchError(f"SMTP send failed after {len(latencies)} messages: {exc}") from exc
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return SendResult(len(latencies), t0, elapsed, cpu, statistics.median(latencies), p99)
