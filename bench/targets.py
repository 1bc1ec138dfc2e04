"""The servers under test, started as subprocesses on free loopback ports.

A :class:`Target` is something the load generator can send to and that can say when
a batch of messages is done: the sinks are done at the last ``250``; mailgate is done
when every ``message.received`` event is visible to an agent pulling its feed, which
is the promise that matters to an agent (accepted, stored, event visible).
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.procs import (
    LOOPBACK,
    BenchError,
    Child,
    free_port,
    read_ready_line,
    spawn,
    wait_smtp_ready,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SINK_RCPT = "bot@agents.localhost"
FEED_CONSUMER = "bench"


@dataclass
class Target:
    """A running server: where to send, and (for mailgate) how to see the feed."""

    name: str
    child: Child
    rcpt: str = SINK_RCPT
    feed: Feed | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def port(self) -> int:
        return self.child.smtp_port

    async def close(self) -> None:
        try:
            if self.feed is not None:
                await self.feed.close()
        finally:
            self.child.stop()


async def start_sink(kind: str, workdir: Path, *, mode: str = "thread") -> Target:
    """Start ``python -m bench.sinks <kind>`` and wait for its banner.

    Raises:
        BenchError: it did not come up within 20 s.
    """
    argv = [sys.executable, "-m", "bench.sinks", kind, "--host", LOOPBACK, "--port", "0"]
    if kind == "sqlite":
        argv += ["--db", str(workdir / f"sink-{mode}.db"), "--mode", mode]
    child = spawn(kind, argv, workdir / f"{kind}.log", cwd=REPO_ROOT, capture_stdout=True)
    try:
        child.smtp_port = int(read_ready_line(child, "READY", 20))
        await wait_smtp_ready(child, 20)
    except BaseException:
        child.stop()
        raise
    return Target(kind, child)


# -- mailgate ---------------------------------------------------------------------------


def _mailgate_argv() -> list[str]:
    script = Path(sys.executable).with_name("mailgate")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from mailgate.cli import main; main()"]


def _mailgate_env(data_dir: Path, extra: dict[str, str]) -> dict[str, str]:
    """The caller's environment minus any MAILGATE_* (a developer's settings must not
    leak into the figures), plus a private data dir and short shutdown grace."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILGATE_")}
    env["MAILGATE_DATA_DIR"] = str(data_dir)
    env["MAILGATE_SHUTDOWN_GRACE_SECONDS"] = "2"
    # The store path is measured, not DNS: sender authentication would query the
    # machine's resolver (unreachable or remote here) for every message.
    env["MAILGATE_SENDER_AUTH"] = "false"
    env.update(extra)
    return env


def _cli_json(args: list[str], env: dict[str, str], timeout: float = 60) -> dict[str, Any]:
    done = subprocess.run(
        [*_mailgate_argv(), *args, "--json"],
        env=env,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    try:
        payload = json.loads(done.stdout.decode().strip().splitlines()[-1])
    except (IndexError, ValueError):
        payload = None
    if done.returncode != 0 or not isinstance(payload, dict) or "error" in payload:
        raise BenchError(
            f"mailgate {' '.join(args)} failed ({done.returncode}): "
            f"{done.stdout.decode()[-500:]} {done.stderr.decode()[-1500:]}"
        )
    return payload


async def start_mailgate(
    workdir: Path, *, name: str = "mailgate", extra_env: dict[str, str] | None = None
) -> Target:
    """Provision a fresh gateway (migrate, workspace, agent) and run ``mailgate serve``.

    Raises:
        BenchError: a CLI step failed or the server was not ready within 60 s.
    """
    data_dir = workdir / name
    data_dir.mkdir(parents=True, exist_ok=True)
    env = _mailgate_env(data_dir, extra_env or {})
    await asyncio.to_thread(_cli_json, ["migrate"], env)
    ws = await asyncio.to_thread(_cli_json, ["workspace", "create", "bench"], env)
    agent = await asyncio.to_thread(
        _cli_json, ["agent", "create", "bench", "--workspace", ws["workspace_id"]], env
    )
    smtp_port, http_port = free_port(), free_port()
    argv = [
        *_mailgate_argv(),
        "serve",
        "--http",
        f"{LOOPBACK}:{http_port}",
        "--smtp",
        f"{LOOPBACK}:{smtp_port}",
    ]
    child = spawn(name, argv, workdir / f"{name}.log", env=env)
    child.smtp_port, child.http_port = smtp_port, http_port
    feed: Feed | None = None
    try:
        await wait_smtp_ready(child, 60)
        feed = Feed(f"http://{LOOPBACK}:{http_port}", agent["api_key"], data_dir)
        await feed.wait_ready(child, 60)
    except BaseException:
        if feed is not None:
            await feed.close()
        child.stop()
        raise
    target = Target(name, child, rcpt=agent["address"], feed=feed)
    target.notes["agent_id"] = agent["agent_id"]
    target.notes["env"] = env  # for helpers that open the same database (bench.rules)
    return target


class Feed:
    """Counts ``message.received`` events the agent can see, pulling and acking them
    over the HTTP API as an agent would (or, where the API is missing, counting rows
    in the events table, which is noted in the report)."""

    def __init__(self, base_url: str, api_key: str, data_dir: Path) -> None:
        self.http = httpx.AsyncClient(
            base_url=base_url,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=httpx.Timeout(15.0, connect=5.0),
        )
        self.data_dir = data_dir
        self.method = "http"
        self._db_seen = 0

    async def close(self) -> None:
        await self.http.aclose()

    async def wait_ready(self, child: Child, timeout: float) -> None:
        """Wait for ``GET /readyz`` to answer 200, then probe the feed endpoint.

        Raises:
            BenchError: the process exited or the bound passed first.
        """
        deadline = time.monotonic() + timeout
        while True:
            if not child.alive():
                raise BenchError(f"{child.name} exited early:\n{child.log_tail()}")
            try:
                if (await self.http.get("/readyz")).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"{child.name} /readyz not 200 in {timeout}s")
            await asyncio.sleep(0.05)
        probe = await self.http.get("/v1/events", params={"consumer": FEED_CONSUMER, "wait": 0})
        if probe.status_code == 404:
            self.method = "db"
            self._db_seen = self._db_count()
        elif probe.status_code != 200:
            raise BenchError(f"GET /v1/events answered {probe.status_code}: {probe.text[:300]}")
        else:
            await self._ack(probe.json().get("events", []))

    def _db_count(self) -> int:
        path = self.data_dir / "mailgate.db"
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as conn:
            row = conn.execute(
                "SELECT count(*) FROM events WHERE type = 'message.received'"
            ).fetchone()
        return int(row[0])

    async def _ack(self, events: list[dict[str, Any]]) -> None:
        if not events:
            return
        ids = [e["event_id"] for e in events]
        response = await self.http.post(
            "/v1/events/ack", json={"event_ids": ids, "consumer": FEED_CONSUMER}
        )
        if response.status_code >= 300:
            raise BenchError(f"ack answered {response.status_code}: {response.text[:300]}")

    async def drain(self, expected: int, timeout: float) -> int:
        """Pull (and ack) until ``expected`` new ``message.received`` events were seen.

        Raises:
            BenchError: fewer arrived within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        seen = 0
        while seen < expected:
            if time.monotonic() > deadline:
                raise BenchError(f"only {seen} of {expected} events visible after {timeout}s")
            if self.method == "db":
                count = await asyncio.to_thread(self._db_count)
                seen, self._db_seen = seen + count - self._db_seen, count
                if seen < expected:
                    await asyncio.sleep(0.005)
                continue
            response = await self.http.get(
                "/v1/events",
                params={"consumer": FEED_CONSUMER, "limit": 100, "wait": 1},
            )
            if response.status_code != 200:
                raise BenchError(f"GET /v1/events answered {response.status_code}")
            events = response.json().get("events", [])
            seen += sum(1 for e in events if e.get("type") == "message.received")
            await self._ack(events)
        return seen
