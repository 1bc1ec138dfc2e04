"""The newcomer's path, end to end with real processes: `mailgate serve --migrate`,
then `mailgate demo` in another process, then SIGTERM for a clean stop."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

MAILGATE = Path(sys.executable).with_name("mailgate")


READY = re.compile(rb"HTTP http://([0-9.]+:[0-9]+)\s+SMTP smtp://([0-9.]+:[0-9]+)")


def _wait_ready(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> tuple[str, str]:
    """The HTTP and SMTP addresses from serve's ready line (it binds port 0, so only it
    knows them), after checking /readyz answers."""
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout
    while (found := READY.search(seen)) is None:
        line = proc.stdout.readline()
        if not line or time.monotonic() > deadline:
            raise AssertionError(f"serve did not become ready: {seen.decode(errors='replace')}")
        seen += line
    http, smtp = found.group(1).decode(), found.group(2).decode()
    assert httpx.get(f"http://{http}/readyz", timeout=5).status_code == 200
    return http, smtp


@pytest.fixture
def gateway_env(tmp_path: Path, database_url: str) -> Iterator[dict[str, str]]:
    env = dict(os.environ)
    env.update(
        MAILGATE_DATA_DIR=str(tmp_path),
        MAILGATE_DATABASE_URL=database_url,
        MAILGATE_HTTP_LISTEN="127.0.0.1:0",
        MAILGATE_SMTP_LISTEN="127.0.0.1:0",
        MAILGATE_SHUTDOWN_GRACE_SECONDS="5",
        COLUMNS="400",  # one ready line, however long the database path
    )
    yield env


def _taken_port() -> socket.socket:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    return taken


def test_serve_then_demo_shows_mail_received_pulled_and_acked(gateway_env: dict[str, str]) -> None:
    proc = subprocess.Popen(
        [str(MAILGATE), "serve", "--migrate"],
        env=gateway_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        http, smtp = _wait_ready(proc)
        demo = subprocess.run(
            [str(MAILGATE), "demo", "--timeout", "10"],
            env=dict(gateway_env, MAILGATE_HTTP_LISTEN=http, MAILGATE_SMTP_LISTEN=smtp),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert demo.returncode == 0, demo.stdout + demo.stderr
        assert "message.received" in demo.stdout
        assert "acked" in demo.stdout
        assert "0 events left" in demo.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output.decode(errors="replace")
    assert b"mailgate stopped" in output


def test_serve_refuses_an_unmigrated_database_with_a_clear_message(tmp_path: Path) -> None:
    env = dict(os.environ, MAILGATE_DATA_DIR=str(tmp_path / "fresh"))
    env.pop("MAILGATE_DATABASE_URL", None)
    result = subprocess.run(
        [str(MAILGATE), "serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "database_not_migrated" in result.stderr
    assert "mailgate migrate" in result.stderr


@pytest.mark.parametrize("listener", ["SMTP", "HTTP"])
def test_serve_reports_a_taken_port_as_a_clear_error(
    gateway_env: dict[str, str], listener: str
) -> None:
    with _taken_port() as taken:
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        result = subprocess.run(
            [str(MAILGATE), "serve", "--migrate"],
            env=dict(gateway_env, **{f"MAILGATE_{listener}_LISTEN": address}),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1, result.stderr
    assert "unavailable" in result.stderr
    assert f"cannot listen for {listener} on {address}" in result.stderr
