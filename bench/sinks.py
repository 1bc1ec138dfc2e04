"""The two baselines: bare aiosmtpd servers, each run in its own process.

``discard`` answers ``250`` the moment DATA ends: the ceiling any aiosmtpd-based
ingress can reach on this machine. ``sqlite`` first writes the raw bytes to SQLite
(WAL, ``synchronous=FULL``, one commit per message, on one writer thread so the event
loop keeps serving other sessions; ``--mode inline`` commits inside the loop instead):
the cost of being merely durable. mailgate does strictly more work than either, so
the ratios say how much its pipeline costs.

Run as ``python -m bench.sinks {discard,sqlite} --port 0 [--db PATH]``; the process
prints ``READY <port>`` once listening and exits when its stdin closes, so a crashed
or killed benchmark never leaves a sink behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sqlite3
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

MAX_SIZE = 64 * 1024 * 1024


class DiscardHandler:
    """Accept and forget: measures aiosmtpd's own cost and nothing else."""

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 OK"


class SqliteHandler:
    """Store the raw bytes durably before answering, one fsynced commit per message."""

    def __init__(self, path: Path, *, inline: bool = False) -> None:
        self._inline = inline
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS raw ("
            "id INTEGER PRIMARY KEY, mail_from TEXT, rcpt_to TEXT, data BLOB)"
        )
        # One thread owns the connection: SQLite has one writer anyway, and a pool
        # would only add lock contention.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-sink")

    def _write(self, mail_from: str, rcpt_to: str, data: bytes) -> None:
        self._conn.execute("BEGIN IMMEDIATE")
        self._conn.execute(
            "INSERT INTO raw (mail_from, rcpt_to, data) VALUES (?, ?, ?)",
            (mail_from, rcpt_to, data),
        )
        self._conn.execute("COMMIT")

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        args = (
            envelope.mail_from or "",
            ",".join(envelope.rcpt_tos),
            envelope.original_content or b"",
        )
        if self._inline:
            # Blocks the loop for one fsync: faster on a fast disk (no thread hand-off),
            # but every other session stalls behind a slow one.
            self._write(*args)
        else:
            await asyncio.get_running_loop().run_in_executor(self._writer, self._write, *args)
        return "250 OK"

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self._conn.close()


def _watch_stdin(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """Stop when the parent's end of stdin closes (the parent exited or died)."""
    with contextlib.suppress(Exception):
        sys.stdin.buffer.read()
    loop.call_soon_threadsafe(stop.set)


async def serve(kind: str, host: str, port: int, db: Path | None, mode: str) -> None:
    """Listen until SIGTERM/SIGINT or stdin EOF; print ``READY <port>`` when bound."""
    handler: Any
    if kind == "discard":
        handler = DiscardHandler()
    else:
        if db is None:
            raise SystemExit("--db is required for the sqlite sink")
        handler = SqliteHandler(db, inline=mode == "inline")
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        return SMTP(
            handler,
            data_size_limit=MAX_SIZE,
            decode_data=False,
            hostname="bench-sink.localhost",
            timeout=60,
            loop=loop,
        )

    server = await loop.create_server(factory, host, port)
    bound = server.sockets[0].getsockname()[1]
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    threading.Thread(target=_watch_stdin, args=(loop, stop), daemon=True).start()
    print(f"READY {bound}", flush=True)
    try:
        await stop.wait()
    finally:
        server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 2)
        if isinstance(handler, SqliteHandler):
            handler.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sinks", description=__doc__)
    parser.add_argument("kind", choices=["discard", "sqlite"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--db", type=Path)
    parser.add_argument(
        "--mode",
        choices=["thread", "inline"],
        default="thread",
        help="sqlite: commit on a writer thread (default) or inside the event loop",
    )
    args = parser.parse_args(argv)
    asyncio.run(serve(args.kind, args.host, args.port, args.db, args.mode))


if __name__ == "__main__":
    main()
