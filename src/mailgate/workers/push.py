"""The push worker: delivers /v0 webhooks (``mailgate serve`` runs it).

Each enabled webhook is drained by a task of its own (a slow or dead receiver holds
back only its own events). A round starts a drain for every webhook that has none
running; rounds start when this process commits events (the feed notifier), when a
drain that found work finishes (there may be more), and at least every ``feed_poll_interval`` for
events written by other processes and retries coming due. Everything that touches
the database runs in worker threads.

On stop it starts nothing new and waits for running drains: a POST in flight
finishes and records its ack or nack. A drain cut short by a crash leaves leased
events that come back when their lease expires (at least once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import httpx

from mailgate.runtime import Runtime
from mailgate.services.webhooks import PushEngine, WebhookRecord, httpx_post

log = logging.getLogger(__name__)


def build_engine(runtime: Runtime, client: httpx.AsyncClient) -> PushEngine:
    """The engine over ``runtime``'s services, POSTing through ``client``."""
    views = runtime.agentmail
    return PushEngine(
        runtime.db,
        runtime.feed,
        runtime.settings,
        runtime.clock,
        views,
        httpx_post(client),
    )


async def run_push(runtime: Runtime, *, stop: asyncio.Event) -> None:
    """Push webhook events until ``stop`` is set, then finish in-flight POSTs."""
    settings = runtime.settings
    timeout = httpx.Timeout(settings.webhook_timeout_seconds)
    # trust_env=False: a proxy from the environment must not carry (or re-route)
    # deliveries the target check has just approved.
    async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
        engine = build_engine(runtime, client)
        running: dict[str, asyncio.Task[None]] = {}
        wake = asyncio.Event()

        async def drain_one(hook: WebhookRecord) -> None:
            try:
                outcome = await engine.drain(hook)
            except Exception:
                log.exception("push to webhook %s failed; retrying next round", hook.id)
                return
            finally:
                running.pop(hook.id, None)
            if outcome.posted or outcome.skipped:
                wake.set()  # it found work, so there may be more (or another webhook's)

        with runtime.notifier.listen(None) as listener:
            try:
                while not stop.is_set():
                    listener.clear()
                    wake.clear()
                    try:
                        hooks = await asyncio.to_thread(engine.service.enabled)
                    except Exception:
                        log.exception("listing webhooks failed; retrying")
                        hooks = []
                    for hook in hooks:
                        if hook.id not in running:
                            running[hook.id] = asyncio.create_task(
                                drain_one(hook), name=f"push {hook.id}"
                            )
                    await _wait(listener.wait, wake, stop, settings.feed_poll_interval)
            finally:
                if running:
                    await asyncio.gather(*running.values(), return_exceptions=True)


async def _wait(
    notified: Callable[[float], Awaitable[bool]],
    wake: asyncio.Event,
    stop: asyncio.Event,
    timeout: float,
) -> None:
    """Until the notifier fires, a drain that found work ends, ``stop`` is set, or
    ``timeout`` passes."""
    waiters = {
        asyncio.ensure_future(notified(timeout)),
        asyncio.ensure_future(wake.wait()),
        asyncio.ensure_future(stop.wait()),
    }
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
