"""The retention worker: purges expired trash (and what only it used) and expired
idempotency keys on a timer.

Each round calls :meth:`~mailgate.services.mailbox.MailboxService.purge_trash` in a
worker thread (it does blocking database and file I/O) until a run reports nothing
more is due, then sleeps ``interval`` seconds or until ``stop`` is set. A failing run
is logged and retried next round: retention is housekeeping, and must never take the
gateway down with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from mailgate.runtime import Runtime

log = logging.getLogger(__name__)

IDEMPOTENCY_BATCH = 1000
"""Expired idempotency keys forgotten per run (``IdempotencyStore.purge_expired``)."""
MAX_RUNS_PER_ROUND = 100
"""Batches one round may purge before yielding to the next interval (a huge backlog
drains over several rounds instead of holding a thread indefinitely)."""


async def run_retention(runtime: Runtime, *, interval: float, stop: asyncio.Event) -> None:
    """Purge every ``interval`` seconds, starting now, until ``stop`` is set."""
    while not stop.is_set():
        try:
            for _ in range(MAX_RUNS_PER_ROUND):
                result = await asyncio.to_thread(runtime.mailbox.purge_trash)
                if not result.more or stop.is_set():
                    break
            for _ in range(MAX_RUNS_PER_ROUND):
                now = runtime.clock.now()
                forgotten = await asyncio.to_thread(runtime.outbound.idempotency.purge_expired, now)
                if forgotten < IDEMPOTENCY_BATCH or stop.is_set():
                    break
        except Exception:
            log.exception("retention run failed; next try in %.0f s", interval)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval):
                await stop.wait()
