"""``mailgate serve``: HTTP, SMTP and background work in one process, on one event loop.

Background work: the retention job (expired trash, expired webhook receipts) every
``retention_interval_seconds``, the delivery worker (outbound mail, owner
notifications, expiry of held requests) and the push worker (/v0 webhooks).

Shutdown order on SIGTERM/SIGINT: stop accepting SMTP connections and let in-flight
DATA transactions finish (they are the ones a sender is waiting on), let uvicorn finish
in-flight HTTP requests, let a running retention batch and in-flight deliveries finish
(each records its outcome), then drain the group
committer and close the database, so nothing acknowledged is lost and nothing
accepted is left half-done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Callable, Generator
from dataclasses import dataclass

import uvicorn

from mailgate.api.app import create_app
from mailgate.errors import ServiceUnavailable
from mailgate.ingress.smtp import SmtpIngress
from mailgate.runtime import Runtime
from mailgate.workers.delivery import run_delivery
from mailgate.workers.push import run_push
from mailgate.workers.retention import run_retention

log = logging.getLogger(__name__)


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its own signal handling (the gateway owns shutdown order), and
    with an event for "listening", so readiness is announced without polling."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.listening.set()


@dataclass(frozen=True)
class Listening:
    """The addresses actually bound. They differ from the configured ones when a port
    is 0: the kernel picks a free one at bind time, which is the only race-free way for
    tests to run several gateways side by side."""

    http: tuple[str, int]
    smtp: tuple[str, int]


async def serve(
    runtime: Runtime,
    *,
    http: tuple[str, int],
    smtp: tuple[str, int],
    on_ready: Callable[[Listening], None] | None = None,
    stop: asyncio.Event | None = None,
    http_socket: socket.socket | None = None,
) -> None:
    """Run until SIGTERM/SIGINT (or until ``stop`` is set, for an embedding program
    that owns the signals, such as :mod:`mailgate.testing.gateway`), then shut down
    gracefully. ``on_ready`` is called once both listeners are bound. ``http_socket``,
    when given, is an already bound socket to serve HTTP on instead of binding ``http``
    (its owner knows the port before the gateway starts, and can put it in links).

    Raises:
        ServiceUnavailable: the SMTP or HTTP address cannot be bound.
    """
    settings = runtime.settings
    grace = settings.shutdown_grace_seconds
    config = uvicorn.Config(
        create_app(runtime),
        host=http[0],
        port=http[1],
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=int(grace) or None,
        lifespan="on",
    )
    web = _EmbeddedUvicorn(config)
    ingress = SmtpIngress(runtime)
    try:
        await ingress.start(*smtp)
    except OSError as exc:
        runtime.close()
        raise ServiceUnavailable(f"cannot listen for SMTP on {smtp[0]}:{smtp[1]}: {exc}") from None
    await runtime.attach_loop()

    own_signals = stop is None
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    if own_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

    async def _serve_http() -> None:
        try:
            await web.serve(sockets=None if http_socket is None else [http_socket])
        except SystemExit:  # uvicorn exits when it cannot bind; a task must not
            raise ServiceUnavailable(f"cannot listen for HTTP on {http[0]}:{http[1]}") from None

    web_task = asyncio.create_task(_serve_http(), name="http")
    retention = asyncio.create_task(
        run_retention(runtime, interval=settings.retention_interval_seconds, stop=stop),
        name="retention",
    )
    delivery = asyncio.create_task(run_delivery(runtime, stop=stop), name="delivery")
    push = asyncio.create_task(run_push(runtime, stop=stop), name="push")

    async def _announce() -> None:
        await web.listening.wait()
        if web.started:
            bound = Listening(http=_http_address(web, http), smtp=(smtp[0], ingress.port))
            log.info("mailgate ready: http://%s:%d smtp://%s:%d", *bound.http, *bound.smtp)
            if on_ready is not None:
                on_ready(bound)

    announce = asyncio.create_task(_announce(), name="announce")
    stop_task = asyncio.create_task(stop.wait(), name="stop")
    http_failure: ServiceUnavailable | None = None
    try:
        await asyncio.wait({web_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        log.info("mailgate shutting down")
        for helper in (announce, stop_task):
            helper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await helper
        await ingress.stop(grace)
        runtime.notifier.close()  # open long-polls answer now, so HTTP can drain
        web.should_exit = True
        try:
            await web_task
        except asyncio.CancelledError:
            pass
        except ServiceUnavailable as exc:  # raised once the rest has shut down
            http_failure = exc
        stop.set()  # the HTTP side may have ended first; retention stops either way
        await retention
        await delivery
        await push
        if own_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        await runtime.detach_loop()
        await asyncio.to_thread(runtime.close)
        log.info("mailgate stopped")
    if http_failure is not None:
        raise http_failure


def _http_address(web: uvicorn.Server, configured: tuple[str, int]) -> tuple[str, int]:
    """The address uvicorn bound (its port differs from ``configured`` when that was 0)."""
    for server in web.servers:
        for sock in server.sockets:
            host, port = sock.getsockname()[:2]
            return str(host), int(port)
    return configured
