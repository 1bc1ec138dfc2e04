"""Server subprocesses: start, wait until ready, measure through /proc, always stop.

Every server under test runs in its own process so the load generator never shares
its GIL. Children are bound to the benchmark's lifetime three ways: ``stop()`` in a
``finally`` (normal exit, Ctrl-C, timeouts), ``PR_SET_PDEATHSIG`` (the kernel sends
SIGTERM if the benchmark is killed outright) and, for the sinks, stdin EOF.

Resource figures come straight from ``/proc/<pid>`` (no psutil dependency): CPU time
from ``stat``, current and peak resident memory from ``status`` (``VmRSS``,
``VmHWM``); the peak can be reset by writing ``5`` to ``clear_refs``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1


class BenchError(RuntimeError):
    """A server did not start, answer or finish within its bound."""


def _parent_death_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGTERM the child when we die (else None).

    libc is loaded here, before any fork, so the hook itself only makes one syscall.
    The signal fires when the *thread* that forked exits, so spawn from the main thread.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

    return hook


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy since boot (all CPUs, from /proc/stat).

    Subtracting what the benchmark and its servers used over a cell leaves what other
    processes took: a shared machine shows up as noise here instead of silently.
    """
    with open("/proc/stat") as stat:
        fields = stat.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


def free_port() -> int:
    """A loopback port free right now (the server binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@dataclass
class Child:
    """One server process and the ports it listens on."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    smtp_port: int = 0
    http_port: int | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def cpu_seconds(self) -> float:
        """User + system CPU of the whole process (all threads) so far."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK

    def _status_kib(self, key: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise BenchError(f"{key} missing from /proc/{self.pid}/status")

    def rss_bytes(self) -> int:
        return self._status_kib("VmRSS") * 1024

    def peak_rss_bytes(self) -> int:
        return self._status_kib("VmHWM") * 1024

    def reset_peak_rss(self) -> bool:
        """Reset VmHWM to the current RSS (Linux ≥ 4.0); False where refused."""
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL. Safe to call twice."""
        if self.popen.stdin is not None:
            with contextlib.suppress(OSError):
                self.popen.stdin.close()
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.kill()
                self.popen.wait(5)
        if self.popen.stdout is not None:
            with contextlib.suppress(OSError):
                self.popen.stdout.close()


def spawn(
    name: str,
    argv: Sequence[str],
    log_path: Path,
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    capture_stdout: bool = False,
) -> Child:
    """Start ``argv`` with stderr (and stdout unless captured) going to ``log_path``."""
    log = log_path.open("ab")
    try:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE if capture_stdout else log,
            stderr=log,
            env=env,
            cwd=cwd,
            preexec_fn=_parent_death_hook(),
        )
    finally:
        log.close()
    return Child(name, popen, log_path)


def read_ready_line(child: Child, prefix: str, timeout: float) -> str:
    """The first stdout line starting with ``prefix``, waiting at most ``timeout`` s."""
    assert child.popen.stdout is not None
    fd = child.popen.stdout.fileno()
    deadline = time.monotonic() + timeout
    buffer = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buffer += chunk
        for line in buffer.decode(errors="replace").splitlines():
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
    raise BenchError(f"{child.name} never printed {prefix!r}:\n{child.log_tail()}")


async def wait_smtp_ready(child: Child, timeout: float) -> None:
    """Wait until the SMTP port answers with a ``220`` banner.

    Raises:
        BenchError: the process exited or the bound passed first.
    """
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not child.alive():
            raise BenchError(f"{child.name} exited early:\n{child.log_tail()}")
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(LOOPBACK, child.smtp_port), 1.0
            )
            try:
                banner = await asyncio.wait_for(reader.readline(), 2.0)
                if banner.startswith(b"220"):
                    writer.write(b"QUIT\r\n")
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(reader.readline(), 1.0)
                    return
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
        except (OSError, TimeoutError) as exc:
            last = exc
        await asyncio.sleep(0.05)
    raise BenchError(f"{child.name} SMTP not ready in {timeout}s ({last}):\n{child.log_tail()}")
