"""A whole gateway (HTTP, websocket, SMTP and the background workers) running in a
background thread on loopback ports, for tests that drive it with real clients: the
AgentMail SDK, our own SDK, an MCP client, a websocket.

It is :func:`mailgate.server.serve` itself, not a copy, so what these tests prove is
what ``mailgate serve`` does.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from mailgate.config import Settings
from mailgate.runtime import Runtime
from mailgate.server import Listening, serve

__all__ = ["RunningGateway", "running_gateway"]


@dataclass(frozen=True)
class RunningGateway:
    runtime: Runtime
    http_url: str  # http://127.0.0.1:<port>
    ws_url: str  # ws://127.0.0.1:<port>
    smtp_host: str
    smtp_port: int


@contextmanager
def running_gateway(settings: Settings, *, timeout: float = 30.0) -> Iterator[RunningGateway]:
    """Start ``serve`` over ``settings`` on loopback ports the kernel picks, and stop it
    gracefully on exit. The database must be migrated.

    The HTTP socket is bound here, before the runtime is built, so its port is known to
    the settings (signed links carry it); SMTP binds port 0 and reports what it got.
    Nothing is probed and released first, so two gateways can never race for a port.
    """
    http_sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    http_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    http_sock.bind(("127.0.0.1", 0))
    http_port = int(http_sock.getsockname()[1])
    settings = settings.model_copy(
        update={"http_listen": f"127.0.0.1:{http_port}", "smtp_listen": "127.0.0.1:0"}
    )
    runtime = Runtime.build(settings)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    bound: list[Listening] = []
    stop: asyncio.Event | None = None
    failure: list[BaseException] = []

    def on_ready(listening: Listening) -> None:
        bound.append(listening)
        ready.set()

    async def main() -> None:
        nonlocal stop
        stop = asyncio.Event()
        await serve(
            runtime,
            http=("127.0.0.1", http_port),
            smtp=("127.0.0.1", 0),
            on_ready=on_ready,
            stop=stop,
            http_socket=http_sock,
        )

    def run() -> None:
        try:
            loop.run_until_complete(main())
        except BaseException as exc:  # reported to the test thread below
            failure.append(exc)
        finally:
            ready.set()
            loop.close()
            http_sock.close()

    thread = threading.Thread(target=run, name="mailgate-gateway", daemon=True)
    thread.start()
    if not ready.wait(timeout) or failure or not bound:
        raise RuntimeError(f"gateway did not start: {failure[:1]}")
    smtp_port = bound[0].smtp[1]
    try:
        yield RunningGateway(
            runtime=runtime,
            http_url=f"http://127.0.0.1:{http_port}",
            ws_url=f"ws://127.0.0.1:{http_port}",
            smtp_host="127.0.0.1",
            smtp_port=smtp_port,
        )
    finally:
        if stop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)
        thread.join(timeout)
        if failure:
            raise RuntimeError("gateway failed while running") from failure[0]
