"""The test relay itself (mailgate.testing.smtp_sink): what it keeps, how its faults
fire, TLS and AUTH, restarts on one port, and running as a separate process."""

from __future__ import annotations

import smtplib
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgate.testing import build_message
from mailgate.testing.smtp_sink import Fault, SmtpSink, spooled, wait_until

SENDER = "agent@example.com"


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as running:
        yield running


def client(sink: SmtpSink) -> smtplib.SMTP:
    return smtplib.SMTP(sink.host, sink.port, local_hostname="client.test", timeout=10)


def test_the_sink_keeps_envelope_bytes_and_message_id(sink: SmtpSink) -> None:
    raw = build_message(to="bob@example.org", message_id="abc@example.com")
    with client(sink) as smtp:
        smtp.sendmail(SENDER, ["bob@example.org", "carol@example.org"], raw)
    [got] = sink.wait_for(1)
    assert (got.mail_from, got.rcpt_tos, got.raw, got.message_id) == (
        SENDER,
        ("bob@example.org", "carol@example.org"),
        raw,
        "abc@example.com",
    )


def test_wait_for_gives_up_after_its_bound(sink: SmtpSink) -> None:
    with pytest.raises(TimeoutError):
        sink.wait_for(1, timeout=0.05)


def test_faults_are_taken_one_per_transaction_in_order(sink: SmtpSink) -> None:
    sink.inject(Fault("mail", reply="451 4.3.0 first"), Fault("data", reply="554 5.6.0 second"))
    raw = build_message(to="bob@example.org")
    with client(sink) as smtp:
        with pytest.raises(smtplib.SMTPSenderRefused) as first:
            smtp.sendmail(SENDER, ["bob@example.org"], raw)
        with pytest.raises(smtplib.SMTPDataError) as second:
            smtp.sendmail(SENDER, ["bob@example.org"], raw)
        smtp.sendmail(SENDER, ["bob@example.org"], raw)
    assert (first.value.smtp_code, second.value.smtp_code) == (451, 554)
    assert len(sink.wait_for(1)) == 1


def test_a_standing_fault_applies_while_the_queue_is_empty(sink: SmtpSink) -> None:
    sink.set_standing(Fault("rcpt", reply="450 4.2.1 busy"))
    raw = build_message(to="bob@example.org")
    with client(sink) as smtp:
        for _ in range(2):
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                smtp.sendmail(SENDER, ["bob@example.org"], raw)
        sink.set_standing(None)
        smtp.sendmail(SENDER, ["bob@example.org"], raw)
    assert len(sink.wait_for(1)) == 1


def test_a_recipient_fault_can_name_some_recipients_only(sink: SmtpSink) -> None:
    sink.inject(Fault("rcpt", reply="550 5.1.1 no such user", recipients=frozenset({"C@x.org"})))
    with client(sink) as smtp:
        refused = smtp.sendmail(SENDER, ["b@x.org", "c@x.org"], build_message(to="b@x.org"))
    assert refused == {"c@x.org": (550, b"5.1.1 no such user")}
    assert sink.wait_for(1)[0].rcpt_tos == ("b@x.org",)


def test_a_dropped_data_keeps_nothing(sink: SmtpSink) -> None:
    sink.inject(Fault("data", drop=True))
    with client(sink) as smtp, pytest.raises(smtplib.SMTPServerDisconnected):
        smtp.sendmail(SENDER, ["b@x.org"], build_message(to="b@x.org"))
    assert sink.messages == []


def test_sessions_count_connections_that_sent_mail(sink: SmtpSink) -> None:
    raw = build_message(to="b@x.org")
    with client(sink) as smtp:
        smtp.sendmail(SENDER, ["b@x.org"], raw)
        smtp.sendmail(SENDER, ["b@x.org"], raw)
    with client(sink) as smtp:
        smtp.noop()
    first, second = sink.wait_for(2)
    assert first.connection == second.connection
    assert sink.sessions == 1


def test_stop_refuses_connections_and_start_listens_on_the_same_port(sink: SmtpSink) -> None:
    port = sink.port
    open_session = client(sink)
    open_session.ehlo()
    sink.stop()
    with pytest.raises(smtplib.SMTPServerDisconnected):
        open_session.noop()
    open_session.close()
    with pytest.raises(ConnectionRefusedError):
        client(sink)
    sink.start()
    assert sink.port == port
    with client(sink) as smtp:
        smtp.sendmail(SENDER, ["b@x.org"], build_message(to="b@x.org"))
    assert len(sink.wait_for(1)) == 1


def test_starttls_and_auth_are_required_when_configured() -> None:
    with SmtpSink(require_starttls=True, credentials=("relay", "s3cret")) as sink:
        assert sink.ca_file is not None
        context = ssl.create_default_context(cafile=str(sink.ca_file))
        raw = build_message(to="b@x.org")
        with client(sink) as smtp:
            with pytest.raises(smtplib.SMTPSenderRefused) as refused:
                smtp.sendmail(SENDER, ["b@x.org"], raw)
            assert refused.value.smtp_code == 530  # STARTTLS first (RFC 3207 §4)
            smtp.starttls(context=context)
            with pytest.raises(smtplib.SMTPSenderRefused) as no_auth:
                smtp.sendmail(SENDER, ["b@x.org"], raw)
            assert no_auth.value.smtp_code == 530
            with pytest.raises(smtplib.SMTPAuthenticationError):
                smtp.login("relay", "wrong")
            smtp.login("relay", "s3cret")
            smtp.sendmail(SENDER, ["b@x.org"], raw)
        assert sink.wait_for(1)[0].raw == raw


def test_the_sink_runs_as_a_process_and_spools_each_message(tmp_path: Path) -> None:
    spool, ready, count = tmp_path / "spool", tmp_path / "ready", tmp_path / "count"
    process = subprocess.Popen(
        [sys.executable, "-m", "mailgate.testing.smtp_sink", "--spool", str(spool),
         "--ready-file", str(ready), "--count-file", str(count)],
    )  # fmt: skip
    try:
        wait_until(ready.exists, timeout=30)
        port = int(ready.read_text())
        raws = [build_message(to="b@x.org", subject=f"n{i}") for i in range(2)]
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10) as smtp:
            for raw in raws:
                smtp.sendmail(SENDER, ["b@x.org"], raw)
        wait_until(lambda: count.exists() and count.read_text().strip() == "2")
        assert [path.read_bytes() for path in spooled(spool)] == raws
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0
