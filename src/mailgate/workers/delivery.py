"""The delivery worker: keeps up to ``delivery_workers`` deliveries in flight.

It claims due requests (:meth:`DeliveryService.claim`) whenever a slot is free, sleeps
until new work is queued in this process (the outbound service wakes it after each
commit), a delivery finishes, or ``delivery_poll_seconds`` pass (catching work queued
by other processes and retries coming due). Every ``EXPIRY_INTERVAL`` it also expires
held requests nobody decided on. It runs inside ``mailgate serve`` and, alone, as
``mailgate worker`` (scale-out: any number of worker processes share one PostgreSQL).

On stop it claims nothing new and waits for in-flight deliveries, so that each one
records its outcome; a delivery cut short by a crash is retried after its lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from mailgate.runtime import Runtime
from mailgate.services.delivery import Claimed

log = logging.getLogger(__name__)

EXPIRY_INTERVAL = 60.0


async def run_delivery(runtime: Runtime, *, stop: asyncio.Event) -> None:
    """Deliver until ``stop`` is set, then finish what is in flight."""
    settings = runtime.settings
    service = runtime.delivery
    slots = settings.delivery_workers
    if slots <= 0:
        return
    wake = asyncio.Event()
    loop = asyncio.get_running_loop()

    def _wake() -> None:
        loop.call_soon_threadsafe(wake.set)

    runtime.outbound.on_queued(_wake)
    running: set[asyncio.Task[object]] = set()
    next_expiry = 0.0

    async def _one(job: Claimed) -> None:
        try:
            await service.deliver(job)
        except Exception:
            log.exception("delivery of %s failed to record; its lease will expire", job.id)
        finally:
            wake.set()

    try:
        while not stop.is_set():
            wake.clear()
            free = slots - len(running)
            claimed: list[Claimed] = []
            if free > 0:
                try:
                    claimed = await asyncio.to_thread(service.claim, free)
                except Exception:
                    log.exception("claiming deliveries failed; retrying")
            for job in claimed:
                task: asyncio.Task[object] = asyncio.create_task(
                    _one(job), name=f"deliver {job.id}"
                )
                running.add(task)
                task.add_done_callback(running.discard)
            if time.monotonic() >= next_expiry:
                next_expiry = time.monotonic() + EXPIRY_INTERVAL
                try:
                    await asyncio.to_thread(runtime.outbound.expire_pending)
                except Exception:
                    log.exception("expiring held outbound mail failed")
            if claimed and len(running) < slots:
                continue  # there may be more due right now
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(settings.delivery_poll_seconds):
                    waiters = {
                        asyncio.ensure_future(wake.wait()),
                        asyncio.ensure_future(stop.wait()),
                    }
                    try:
                        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        for w in waiters:
                            w.cancel()
    finally:
        runtime.outbound.on_queued(lambda: None)
        if running:
            await asyncio.gather(*running, return_exceptions=True)
        await runtime.aclose_outbound()
