"""The matrix: every (size, concurrency) cell against mailgate and both baselines.

All three servers are up for the whole run and each cell measures them back to back
(the order rotating between repeats), so a baseline and the figure it is compared
with are taken seconds apart: drift on a shared machine (CPU steal, page cache, a
neighbour's build) hits both alike and cancels out of the ratio. Each figure is the
median of ``repeats`` runs.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.load import close_sessions, open_sessions, send_all
from bench.messages import MessageFactory, factory
from bench.procs import BenchError, machine_busy_seconds
from bench.targets import Target, start_mailgate, start_sink

TARGETS = ("discard", "sqlite", "mailgate")
TARGET_CELL = ("4 KB", 8)
TARGET_RATIO = 0.6


@dataclass(frozen=True, slots=True)
class Plan:
    """How much to send. Counts are sized so a cell takes ~2-5 s at the expected rate
    (long enough to swamp start-up jitter, short enough for ``make bench`` < 5 min)."""

    sizes: tuple[tuple[str, int], ...]
    concurrency: tuple[int, ...]
    counts: dict[tuple[str, int], int]
    repeats: int
    warmup: int
    rss_limit: int | None
    cell_timeout: float
    sqlite_mode: str = "thread"


FULL = Plan(
    sizes=(("4 KB", 4 * 1024), ("200 KB", 200 * 1024)),
    concurrency=(1, 8, 32),
    counts={
        ("4 KB", 1): 300,
        ("4 KB", 8): 2000,
        ("4 KB", 32): 2000,
        ("200 KB", 1): 60,
        ("200 KB", 8): 200,
        ("200 KB", 32): 200,
    },
    repeats=3,
    warmup=100,
    rss_limit=10 * 1024 * 1024,
    cell_timeout=180.0,
)

QUICK = Plan(
    sizes=FULL.sizes,
    concurrency=FULL.concurrency,
    counts={key: max(8, n // 40) for key, n in FULL.counts.items()},
    repeats=1,
    warmup=8,
    rss_limit=2 * 1024 * 1024,
    cell_timeout=60.0,
)


@dataclass(frozen=True, slots=True)
class Cell:
    """One measurement of one target in one (size, concurrency) cell."""

    target: str
    size_label: str
    size: int
    concurrency: int
    messages: int
    elapsed: float  # first send -> done (last 250; for mailgate, last event visible)
    send_elapsed: float  # first send -> last 250
    server_cpu: float
    client_cpu: float
    other_cpu: float  # CPU seconds used by everything else on the machine meanwhile
    latency_p50: float
    latency_p99: float

    @property
    def rate(self) -> float:
        return self.messages / self.elapsed

    @property
    def send_rate(self) -> float:
        return self.messages / self.send_elapsed

    @property
    def cpu_per_message_us(self) -> float:
        return self.server_cpu / self.messages * 1e6

    @property
    def other_load(self) -> float:
        """Cores' worth of CPU that other processes used during the cell."""
        return max(0.0, self.other_cpu) / self.elapsed


@dataclass
class RunResult:
    plan: Plan
    cells: list[Cell] = field(default_factory=list)
    visibility: str = "http"

    def samples(self, target: str, size_label: str, concurrency: int) -> list[Cell]:
        return [
            c
            for c in self.cells
            if (c.target, c.size_label, c.concurrency) == (target, size_label, concurrency)
        ]

    def median(
        self, target: str, size_label: str, concurrency: int, metric: Callable[[Cell], float]
    ) -> float | None:
        values = [metric(c) for c in self.samples(target, size_label, concurrency)]
        return statistics.median(values) if values else None


async def run_cell(
    target: Target,
    messages: MessageFactory,
    concurrency: int,
    count: int,
    first: int,
    timeout: float,
) -> Cell:
    """Send ``count`` messages over ``concurrency`` sessions and wait until done.

    Raises:
        BenchError: a send failed or the events did not all become visible in time.
    """
    batch = messages.batch(first, count)
    sessions = await open_sessions(target.port, concurrency, timeout)
    try:
        cpu0, own0, busy0 = target.child.cpu_seconds(), time.process_time(), machine_busy_seconds()
        async with asyncio.timeout(timeout):
            sent = await send_all(sessions, batch, target.rcpt)
            finished = sent.started + sent.elapsed
            if target.feed is not None:
                await target.feed.drain(count, timeout)
                finished = time.perf_counter()
        server_cpu = target.child.cpu_seconds() - cpu0
        other_cpu = machine_busy_seconds() - busy0 - server_cpu - (time.process_time() - own0)
    except TimeoutError:
        raise BenchError(f"{target.name} cell took longer than {timeout}s") from None
    finally:
        await close_sessions(sessions)
    return Cell(
        target=target.name,
        size_label=messages.label,
        size=len(batch[0]),
        concurrency=concurrency,
        messages=count,
        elapsed=finished - sent.started,
        send_elapsed=sent.elapsed,
        server_cpu=server_cpu,
        client_cpu=sent.client_cpu,
        other_cpu=other_cpu,
        latency_p50=sent.latency_p50,
        latency_p99=sent.latency_p99,
    )


async def run_matrix(
    plan: Plan, workdir: Path, progress: Callable[[str], None] = lambda _: None
) -> RunResult:
    """Start the three servers, warm them up, run every cell ``repeats`` times."""
    result = RunResult(plan)
    targets: dict[str, Target] = {}
    try:
        progress("starting servers")
        targets["discard"] = await start_sink("discard", workdir)
        targets["sqlite"] = await start_sink("sqlite", workdir, mode=plan.sqlite_mode)
        targets["mailgate"] = await start_mailgate(workdir)
        mailgate = targets["mailgate"]
        assert mailgate.feed is not None
        result.visibility = mailgate.feed.method
        # Every server gets identical bytes (the agent's address works for the sinks).
        factories = {
            label: factory(label, size, mailgate.rcpt, seed=i)
            for i, (label, size) in enumerate(plan.sizes)
        }
        seq = 0
        warm = factories[plan.sizes[0][0]]
        for name in TARGETS:
            progress(f"warming up {name}")
            await run_cell(targets[name], warm, 4, plan.warmup, seq, plan.cell_timeout)
            seq += plan.warmup
        for repeat in range(plan.repeats):
            order = TARGETS[repeat % 3 :] + TARGETS[: repeat % 3]
            for label, _ in plan.sizes:
                for concurrency in plan.concurrency:
                    count = plan.counts[(label, concurrency)]
                    for name in order:
                        progress(
                            f"run {repeat + 1}/{plan.repeats}: {label} c={concurrency} "
                            f"{name} ({count} msgs)"
                        )
                        cell = await run_cell(
                            targets[name],
                            factories[label],
                            concurrency,
                            count,
                            seq,
                            plan.cell_timeout,
                        )
                        seq += count
                        result.cells.append(cell)
    finally:
        for target in targets.values():
            await target.close()
    return result
