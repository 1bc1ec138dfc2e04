"""Peak memory while ingesting one message at the SIZE limit.

A gateway that copies a message a handful of times (DATA buffer, parsed tree, decoded
attachments, blob write) multiplies its size in RAM; with many concurrent large
messages that decides whether the process survives. The target is a peak no more than
5x the message size above idle.

Measured on a fresh ``mailgate serve`` so earlier load does not hide the cost: warm it
up with a few small messages (imports, caches and pools settle), read ``VmRSS`` as
idle, reset the kernel's peak counter (``VmHWM``) through ``clear_refs``, send one
message just under ``MAILGATE_MAX_MESSAGE_SIZE`` (mostly a base64 attachment, like
real large mail), and read ``VmHWM`` after the ``250`` and again once its event is
visible. The multiple is ``(peak - idle) / message size``.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.load import close_sessions, open_sessions, send_all
from bench.messages import factory, one_off
from bench.targets import start_mailgate

TARGET_MULTIPLE = 5.0
SIZE_MARGIN = 64 * 1024  # headers, dot-stuffing and CRLFs must stay under the limit


@dataclass(frozen=True, slots=True)
class RssResult:
    limit: int
    message_size: int
    idle_rss: int
    peak_after_250: int
    peak_after_visible: int
    peak_was_reset: bool
    ingest_seconds: float

    @property
    def multiple(self) -> float:
        """Peak above idle, in message sizes (what the target is stated in)."""
        return (max(self.peak_after_250, self.peak_after_visible) - self.idle_rss) / (
            self.message_size
        )

    @property
    def passed(self) -> bool:
        return self.multiple <= TARGET_MULTIPLE

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "multiple": self.multiple, "passed": self.passed}


async def measure(workdir: Path, limit: int, timeout: float = 180.0) -> RssResult:
    """Run the measurement on a fresh gateway with SIZE = ``limit`` bytes.

    Raises:
        BenchError: the gateway failed to start or refused the message.
    """
    target = await start_mailgate(
        workdir, name="mailgate-rss", extra_env={"MAILGATE_MAX_MESSAGE_SIZE": str(limit)}
    )
    assert target.feed is not None
    try:
        small = factory("warm", 4096, target.rcpt, seed=3).batch(0, 5)
        big = one_off(limit - SIZE_MARGIN, target.rcpt)
        sessions = await open_sessions(target.port, 1, timeout)
        try:
            await send_all(sessions, small, target.rcpt)
            await target.feed.drain(len(small), timeout)
            await asyncio.sleep(0.5)  # let the warm-up's garbage be collected
            idle = target.child.rss_bytes()
            was_reset = target.child.reset_peak_rss()
            sent = await send_all(sessions, [big], target.rcpt)
            after_250 = target.child.peak_rss_bytes()
            await target.feed.drain(1, timeout)
            after_visible = target.child.peak_rss_bytes()
        finally:
            await close_sessions(sessions)
        return RssResult(limit, len(big), idle, after_250, after_visible, was_reset, sent.elapsed)
    finally:
        await target.close()
