"""Feed consumers: pull, handle, and ack only once the handler has returned.

The feed's contract is at-least-once: an event is acked only after its side effects
are done, so a crash in between redelivers it. The handler therefore has to be safe to
run twice for one event; for sends that means an idempotency key derived from the
event (``idempotency_key("reply", event.event_id, message_id)``), never a random one.
A handler that raises has its event nacked with a delay and logged; it comes back
(``delivery_count`` grows) until the gateway dead-letters it after
``feed_max_deliveries``.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio

from mailgate.client._async import AsyncMailgate
from mailgate.client._calls import DEFAULT_CONSUMER
from mailgate.client._errors import MailgateAPIError, MailgateConnectionError
from mailgate.client._models import Event
from mailgate.client._retry import RetryPolicy
from mailgate.client._sync import Mailgate

__all__ = ["AsyncConsumer", "AsyncStop", "Consumer", "ConsumerReport"]

_log = logging.getLogger("mailgate.client.consumer")

NackDelay = float | Callable[[Event, BaseException], float]
"""Seconds before a failed event comes back, fixed or chosen per event and error."""

_RESTART = RetryPolicy(max_retries=1_000_000, backoff_base=1.0, backoff_max=30.0)
"""Waits between ``run`` rounds after a network error or a 5xx/429 from the gateway."""


class AsyncStop(Protocol):
    """What stops :meth:`AsyncConsumer.run`: an ``asyncio.Event`` or ``anyio.Event``."""

    def is_set(self) -> bool: ...

    async def wait(self) -> Any: ...


@dataclass
class ConsumerReport:
    """What one round did: events handled and acked, events given back."""

    acked: list[str] = field(default_factory=list)
    nacked: list[str] = field(default_factory=list)


def _transient(exc: Exception) -> bool:
    """Errors ``run`` outlives: the gateway is unreachable or asks to wait. Anything
    else (a revoked key, a missing scope) would fail forever and is raised."""
    if isinstance(exc, MailgateConnectionError):
        return True
    return isinstance(exc, MailgateAPIError) and (exc.status >= 500 or exc.status == 429)


def _delay(nack_delay: NackDelay, event: Event, exc: BaseException) -> float:
    return nack_delay(event, exc) if callable(nack_delay) else nack_delay


class Consumer:
    """Runs ``handler`` for each event a named consumer leases (sync).

    Args:
        client: a :class:`~mailgate.client.Mailgate`.
        handler: called with each typed :class:`Event`; its return value is ignored.
        consumer: the consumer name; workers sharing a name share the work.
        lease_seconds: how long an event stays hidden from other workers while the
            handler runs (the gateway's default when None).
        batch: most events leased per round.
        wait: long-poll seconds per round while nothing is ready.
        nack_delay: seconds before a failed event is redelivered (or a function of
            the event and the error).
        logger: where failures are logged.
    """

    def __init__(
        self,
        client: Mailgate,
        handler: Callable[[Event], object],
        *,
        consumer: str = DEFAULT_CONSUMER,
        lease_seconds: float | None = None,
        batch: int = 10,
        wait: float = 10.0,
        nack_delay: NackDelay = 10.0,
        logger: logging.Logger | None = None,
    ) -> None:
        self.client = client
        self.handler = handler
        self.consumer = consumer
        self.lease_seconds = lease_seconds
        self.batch = batch
        self.wait = wait
        self.nack_delay = nack_delay
        self.log = logger or _log

    def run_once(self, *, wait: float | None = None) -> ConsumerReport:
        """Lease one batch and handle it, one event at a time.

        Each event is acked right after its handler returns (not at the end of the
        batch), so a crash later in the batch redelivers only unfinished work.

        Raises:
            MailgateClientError: pulling, acking or nacking failed.
        """
        events = self.client.events.pull(
            limit=self.batch,
            lease_seconds=self.lease_seconds,
            wait=self.wait if wait is None else wait,
            consumer=self.consumer,
        )
        report = ConsumerReport()
        for event in events:
            try:
                self.handler(event)
            except Exception as exc:
                delay = _delay(self.nack_delay, event, exc)
                self.log.exception(
                    "handler failed on %s %s (delivery %d); nacked for %.1fs",
                    event.type,
                    event.event_id,
                    event.delivery_count,
                    delay,
                )
                self.client.events.nack(event, consumer=self.consumer, delay=delay)
                report.nacked.append(event.event_id)
            else:
                self.client.events.ack(event, consumer=self.consumer)
                report.acked.append(event.event_id)
        return report

    def run(self, stop: threading.Event | None = None) -> None:
        """Handle events until ``stop`` is set (forever without one).

        Network errors and 5xx/429 answers are logged and waited out with backoff;
        other errors (a revoked key, a missing scope) are raised. ``stop`` is checked
        between rounds, so it takes effect within one long-poll ``wait``.

        Raises:
            MailgateAPIError: an error no retry can fix.
        """
        failures = 0
        while stop is None or not stop.is_set():
            try:
                self.run_once()
            except (MailgateConnectionError, MailgateAPIError) as exc:
                if not _transient(exc):
                    raise
                pause = _RESTART.backoff(failures)
                failures += 1
                self.log.warning("consumer %s: %s; retrying in %.1fs", self.consumer, exc, pause)
                if stop is not None:
                    stop.wait(pause)  # wakes at once when stopped
                else:
                    time.sleep(pause)
            else:
                failures = 0


class AsyncConsumer:
    """Runs ``handler`` (sync or async) for each event a named consumer leases, as
    :class:`Consumer` does, on an :class:`~mailgate.client.AsyncMailgate`."""

    def __init__(
        self,
        client: AsyncMailgate,
        handler: Callable[[Event], Awaitable[object] | object],
        *,
        consumer: str = DEFAULT_CONSUMER,
        lease_seconds: float | None = None,
        batch: int = 10,
        wait: float = 10.0,
        nack_delay: NackDelay = 10.0,
        logger: logging.Logger | None = None,
    ) -> None:
        self.client = client
        self.handler = handler
        self.consumer = consumer
        self.lease_seconds = lease_seconds
        self.batch = batch
        self.wait = wait
        self.nack_delay = nack_delay
        self.log = logger or _log

    async def run_once(self, *, wait: float | None = None) -> ConsumerReport:
        """Lease one batch and handle it (see :meth:`Consumer.run_once`)."""
        events = await self.client.events.pull(
            limit=self.batch,
            lease_seconds=self.lease_seconds,
            wait=self.wait if wait is None else wait,
            consumer=self.consumer,
        )
        report = ConsumerReport()
        for event in events:
            try:
                outcome = self.handler(event)
                if inspect.isawaitable(outcome):
                    await outcome
            except Exception as exc:
                delay = _delay(self.nack_delay, event, exc)
                self.log.exception(
                    "handler failed on %s %s (delivery %d); nacked for %.1fs",
                    event.type,
                    event.event_id,
                    event.delivery_count,
                    delay,
                )
                await self.client.events.nack(event, consumer=self.consumer, delay=delay)
                report.nacked.append(event.event_id)
            else:
                await self.client.events.ack(event, consumer=self.consumer)
                report.acked.append(event.event_id)
        return report

    async def run(self, stop: AsyncStop | None = None) -> None:
        """Handle events until ``stop`` is set (see :meth:`Consumer.run`); cancelling
        the task stops it too, leaving an unacked event to come back after its lease."""
        failures = 0
        while stop is None or not stop.is_set():
            try:
                await self.run_once()
            except (MailgateConnectionError, MailgateAPIError) as exc:
                if not _transient(exc):
                    raise
                pause = _RESTART.backoff(failures)
                failures += 1
                self.log.warning("consumer %s: %s; retrying in %.1fs", self.consumer, exc, pause)
                with anyio.move_on_after(pause):
                    if stop is not None:
                        await stop.wait()
                    else:
                        await anyio.sleep(pause)
            else:
                failures = 0
