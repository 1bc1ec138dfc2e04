"""The newcomer's path, end to end with real processes: `mailgate serve --migrate`,
then `mailgate demo` in another process, then SIGTERM for a clean stop."""

from __future__ import annotations

import os
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited early with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)  # polling a child process that has no readiness pipe
    raise AssertionError("gateway did not become ready")


@pytest.fixture
def gateway_env(tmp_path: Path, database_url: str) -> Iterator[dict[str, str]]:
    env = dict(os.environ)
    env.update(
        MAILGATE_DATA_DIR=str(tmp_path),
        MAILGATE_DATABASE_URL=database_url,
        MAILGATE_HTTP_LISTEN=f"127.0.0.1:{_free_port()}",
        MAILGATE_SMTP_LISTEN=f"127.0.0.1:{_free_port()}",
        MAILGATE_SHUTDOWN_GRACE_SECONDS="5",
    )
    yield env


def test_serve_then_demo_shows_mail_received_pulled_and_acked(gateway_env: dict[str, str]) -> None:
    proc = subprocess.Popen(
        [str(MAILGATE), "serve", "--migrate"],
        env=gateway_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_ready(f"http://{gateway_env['MAILGATE_HTTP_LISTEN']}/readyz", proc)
        demo = subprocess.run(
            [str(MAILGATE), "demo", "--timeout", "10"],
            env=gateway_env,
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


def test_serve_reports_a_taken_smtp_port_as_a_clear_error(
    gateway_env: dict[str, str],
) -> None:
    host, port = gateway_env["MAILGATE_SMTP_LISTEN"].split(":")
    with socket.socket() as taken:
        taken.bind((host, int(port)))
        taken.listen()
        result = subprocess.run(
            [str(MAILGATE), "serve", "--migrate"],
            env=gateway_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert "unavailable" in result.stderr
    assert f"{host}:{port}" in result.stderr
