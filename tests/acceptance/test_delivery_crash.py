"""A delivery worker process killed mid-delivery (SIGKILL): the message is still
delivered, and a second copy appears only on the documented boundary (the relay had
taken the DATA but the worker died before recording it), carrying the same
Message-ID. The copies are counted at a real SMTP sink."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from mailgate.config import Settings
from mailgate.runtime import Runtime
from mailgate.store import migrate
from mailgate.store.schema import delivery_attempts
from mailgate.testing.smtp_sink import Fault, SmtpSink, wait_until
from tests.conftest import make_agent
from tests.integration.api_support import api_client
from tests.integration.outbound_support import send, set_tier

pytestmark = pytest.mark.anyio

LEASE = 2.0


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as server:
        yield server


def _worker(settings: Settings, sink: SmtpSink, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "MAILGATE_DATA_DIR": str(settings.data_dir),
        "MAILGATE_DATABASE_URL": settings.effective_database_url,
        "MAILGATE_TRANSPORT": "smtp",
        "MAILGATE_RELAY_HOST": sink.host,
        "MAILGATE_RELAY_PORT": str(sink.port),
        "MAILGATE_RELAY_STARTTLS": "off",
        "MAILGATE_DELIVERY_LEASE_SECONDS": str(LEASE),
        "MAILGATE_DELIVERY_POLL_SECONDS": "0.1",
        "MAILGATE_SENDER_AUTH": "false",
    }
    with log.open("wb") as stderr:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [str(Path(sys.executable).parent / "mailgate"), "worker"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


def _attempts(runtime: Runtime, outbound_id: str) -> list[str | None]:
    with runtime.db.read() as conn:
        return list(
            conn.execute(
                select(delivery_attempts.c.outcome)
                .where(delivery_attempts.c.outbound_id == outbound_id)
                .order_by(delivery_attempts.c.number)
            ).scalars()
        )


@pytest.mark.parametrize(
    ("stage", "copies"),
    [
        pytest.param("data", 2, id="killed-after-the-relay-took-the-data"),
        pytest.param("rcpt", 1, id="killed-before-data"),
    ],
)
async def test_a_worker_killed_mid_delivery_delivers_with_copies_only_on_the_boundary(
    settings: Settings, sink: SmtpSink, tmp_path: Path, stage: str, copies: int
) -> None:
    runtime = Runtime.build(settings)
    migrate.upgrade(runtime.db)
    try:
        agent = make_agent(runtime)
        set_tier(runtime, agent.agent_id, "open")
        # The relay stalls at `stage`; at DATA it has already kept the message.
        sink.set_standing(Fault(stage, delay=60.0))  # type: ignore[arg-type]
        async with api_client(runtime) as client:
            body = (
                await send(client, agent.agent_key, {"to": ["a@example.com"], "text": "x"})
            ).json()
        first = _worker(settings, sink, tmp_path / "worker1.log")
        try:
            wait_until(lambda: _attempts(runtime, body["id"]) == [None], timeout=20)
            if stage == "data":
                wait_until(lambda: len(sink.messages) == 1, timeout=20)
            else:
                wait_until(lambda: sink.sessions == 1, timeout=20)  # it said MAIL
            first.send_signal(signal.SIGKILL)
            first.wait(10)
        finally:
            if first.poll() is None:
                first.kill()
        sink.set_standing(None)
        second = _worker(settings, sink, tmp_path / "worker2.log")
        try:
            wait_until(lambda: _attempts(runtime, body["id"])[-1:] == ["sent"], timeout=30)
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(20)
        received = sink.messages
        assert len(received) == copies
        assert {m.message_id for m in received} == {body["rfc_message_id"]}
        assert _attempts(runtime, body["id"]) == ["interrupted", "sent"]
        detail = runtime.outbound.get_as_system(body["id"])
        assert detail["status"] == "sent"
        assert "lease expired" in (detail["attempts"][0]["detail"] or "")
    finally:
        runtime.close()
