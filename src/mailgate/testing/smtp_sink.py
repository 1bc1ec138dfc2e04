"""A real SMTP server to deliver to in tests and benchmarks, with faults on demand.

:class:`SmtpSink` is an aiosmtpd server on loopback, in its own thread, that keeps what
it receives and can misbehave the way relays do: answer a chosen code at ``MAIL``,
``RCPT`` (for every recipient or only some) or ``DATA``, drop the connection at a
stage, or answer slowly. Faults queue up and each *transaction* (from ``MAIL`` on)
takes the next one; a standing fault applies to every transaction while the queue is
empty. :meth:`SmtpSink.stop` and :meth:`SmtpSink.start` take the relay down and up on
the same port. STARTTLS (a throwaway CA from ``trustme``) and AUTH PLAIN/LOGIN are
optional.

Run it as a separate process (``python -m mailgate.testing.smtp_sink --spool DIR``) to
count copies across a crash of the sender: each message becomes one file in the spool,
named by arrival sequence.

A ``DATA`` fault with a 2xx reply (or none) and a ``delay`` keeps the message *before*
waiting, like a relay that queued it and is slow to say so: the sender may time out
although the mail was taken. A non-2xx ``DATA`` reply or a drop keeps nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import ssl
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

Stage = Literal["mail", "rcpt", "data"]

HOST = "127.0.0.1"
SERVER_NAME = "sink.localhost"


@dataclass(frozen=True, slots=True)
class Fault:
    """How one transaction goes wrong, at one ``stage``.

    ``reply`` replaces the normal answer (``"450 4.2.0 Mailbox busy"``); at ``rcpt``,
    ``recipients`` limits it to those addresses (case-insensitive; others are
    accepted). ``drop`` closes
    the connection instead of answering. ``delay`` waits that many seconds first.
    """

    stage: Stage
    reply: str | None = None
    recipients: frozenset[str] | None = None
    drop: bool = False
    delay: float = 0.0

    def applies_to(self, stage: Stage, recipient: str | None = None) -> bool:
        if stage != self.stage:
            return False
        if self.recipients is None or recipient is None:
            return True
        return recipient.lower() in {r.lower() for r in self.recipients}


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    raw: bytes
    message_id: str | None
    connection: int
    """Which connection brought it (1, 2, ...): equal numbers mean a reused session."""


@dataclass
class _State:
    lock: threading.Condition = field(default_factory=threading.Condition)
    messages: list[ReceivedMessage] = field(default_factory=list)
    faults: deque[Fault] = field(default_factory=deque)
    standing: Fault | None = None
    connections: int = 0
    transacting: set[int] = field(default_factory=set)
    live: set[_SinkSMTP] = field(default_factory=set)
    spooled: int = 0


class SmtpSink:
    """See the module docstring. Use as a context manager or call start()/stop()."""

    def __init__(
        self,
        *,
        host: str = HOST,
        port: int = 0,
        starttls: bool = False,
        require_starttls: bool = False,
        credentials: tuple[str, str] | None = None,
        spool: Path | None = None,
        count_file: Path | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.credentials = credentials
        self.spool = spool
        self.count_file = count_file
        self._state = _State()
        self._controller: _Controller | None = None
        self._tls_dir: tempfile.TemporaryDirectory[str] | None = None
        self.ca_file: Path | None = None
        """PEM of the CA that signed the sink's certificate (``relay_ca_file``)."""
        self._server_tls: ssl.SSLContext | None = None
        self.require_starttls = require_starttls
        if starttls or require_starttls:
            self._server_tls = self._make_tls()
        if spool is not None:
            spool.mkdir(parents=True, exist_ok=True)
            self._state.spooled = sum(1 for _ in spool.glob("*.eml"))

    # -- life cycle -------------------------------------------------------------------

    def start(self) -> SmtpSink:
        """Listen (on the same port as before after a stop)."""
        if self._controller is not None:
            return self
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        kwargs: dict[str, Any] = {
            "server_hostname": SERVER_NAME,
            "authenticator": self._authenticate if self.credentials else None,
            "auth_require_tls": self._server_tls is not None,
        }
        if self._server_tls is not None:
            kwargs["tls_context"] = self._server_tls
            kwargs["require_starttls"] = self.require_starttls
        controller = _Controller(_Handler(self), sock, self._state, **kwargs)
        controller.start()
        self._controller = controller
        return self

    def stop(self) -> None:
        """Close the listener and every open connection (a relay going down)."""
        controller, self._controller = self._controller, None
        if controller is not None:
            asyncio.run_coroutine_threadsafe(_abort_all(self._state), controller.loop).result(5)
            controller.stop()

    def close(self) -> None:
        self.stop()
        if self._tls_dir is not None:
            self._tls_dir.cleanup()
            self._tls_dir = None

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- faults -----------------------------------------------------------------------

    def inject(self, *faults: Fault) -> None:
        """Queue faults; each transaction takes the next one."""
        with self._state.lock:
            self._state.faults.extend(faults)

    def set_standing(self, fault: Fault | None) -> None:
        """A fault for every transaction while the queue is empty (None: behave)."""
        with self._state.lock:
            self._state.standing = fault

    # -- what arrived -----------------------------------------------------------------

    @property
    def messages(self) -> list[ReceivedMessage]:
        with self._state.lock:
            return list(self._state.messages)

    @property
    def sessions(self) -> int:
        """Connections that started at least one transaction (said MAIL)."""
        with self._state.lock:
            return len(self._state.transacting)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[ReceivedMessage]:
        """Block until ``count`` messages arrived (or raise TimeoutError)."""
        with self._state.lock:
            if not self._state.lock.wait_for(
                lambda: len(self._state.messages) >= count, timeout=timeout
            ):
                raise TimeoutError(
                    f"{len(self._state.messages)} of {count} messages after {timeout}s"
                )
            return list(self._state.messages)

    def clear(self) -> None:
        with self._state.lock:
            self._state.messages.clear()
            self._state.transacting.clear()

    # -- internals --------------------------------------------------------------------

    def _make_tls(self) -> ssl.SSLContext:
        import trustme  # a dev dependency: only needed when TLS is asked for

        ca = trustme.CA()
        issued = ca.issue_cert(self.host, "localhost", SERVER_NAME)
        self._tls_dir = tempfile.TemporaryDirectory(prefix="mailgate-sink-")
        self.ca_file = Path(self._tls_dir.name) / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        issued.configure_cert(context)
        return context

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        assert self.credentials is not None
        if mechanism not in ("PLAIN", "LOGIN") or not isinstance(data, LoginPassword):
            return AuthResult(success=False, handled=False)
        user, password = self.credentials
        ok = data.login == user.encode() and data.password == password.encode()
        return AuthResult(success=ok, handled=False)

    def _next_fault(self, connection: int) -> Fault | None:
        with self._state.lock:
            self._state.transacting.add(connection)
            if self._state.faults:
                return self._state.faults.popleft()
            return self._state.standing

    def _keep(self, envelope: Envelope, connection: int) -> None:
        content = envelope.original_content or envelope.content or b""
        raw = content if isinstance(content, bytes) else content.encode("utf-8")
        headers = BytesHeaderParser(policy=compat32).parsebytes(raw)
        message_id = headers.get("Message-ID")
        message = ReceivedMessage(
            mail_from=str(envelope.mail_from),
            rcpt_tos=tuple(envelope.rcpt_tos),
            raw=raw,
            message_id=str(message_id).strip().strip("<>") if message_id else None,
            connection=connection,
        )
        with self._state.lock:
            if self.spool is not None:
                self._state.spooled += 1
                final = self.spool / f"{self._state.spooled:06d}.eml"
                partial = final.with_suffix(".part")
                partial.write_bytes(raw)
                partial.replace(final)
                if self.count_file is not None:
                    partial = self.count_file.with_suffix(".part")
                    partial.write_text(f"{self._state.spooled}\n")
                    partial.replace(self.count_file)
            self._state.messages.append(message)
            self._state.lock.notify_all()


class _SinkSMTP(SMTP):
    """aiosmtpd's server, numbering its connections."""

    def __init__(self, handler: Any, state: _State, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.fault: Fault | None = None
        self._sink_state = state
        with state.lock:
            state.connections += 1
            self.connection = state.connections
            state.live.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        with self._sink_state.lock:
            self._sink_state.live.discard(self)
        super().connection_lost(error)


class _Controller(Controller):
    """A controller on a socket we bound (so port 0 works and a restart keeps it)."""

    def __init__(self, handler: Any, sock: socket.socket, state: _State, **kwargs: Any) -> None:
        host, port = sock.getsockname()[:2]
        super().__init__(handler, hostname=host, port=port, **kwargs)
        self._sock = sock
        self._state = state

    def factory(self) -> SMTP:
        return _SinkSMTP(self.handler, self._state, **self.SMTP_kwargs)

    def _create_server(self) -> Any:
        return self.loop.create_server(self._factory_invoker, sock=self._sock)


class _Handler:
    """aiosmtpd hooks: apply the transaction's fault, keep what is accepted."""

    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_MAIL(
        self,
        server: _SinkSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        server.fault = self.sink._next_fault(server.connection)
        if self.sink.credentials is not None and not session.authenticated:
            return "530 5.7.0 Authentication required"
        answer = await _apply(server, "mail")
        if answer is not None:
            return answer
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self,
        server: _SinkSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        answer = await _apply(server, "rcpt", address)
        if answer is not None:
            return answer
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: _SinkSMTP, session: Session, envelope: Envelope) -> str:
        fault = server.fault
        if fault is not None and fault.applies_to("data"):
            accepted = not fault.drop and (fault.reply is None or fault.reply.startswith("2"))
            if accepted:
                self.sink._keep(envelope, server.connection)
            answer = await _apply(server, "data")
            return answer or "250 2.0.0 Queued"
        self.sink._keep(envelope, server.connection)
        return "250 2.0.0 Queued"


async def _abort_all(state: _State) -> None:
    """Reset every open connection and let the loop close their sockets (a stopped loop
    would leave them to the garbage collector)."""
    with state.lock:
        live = list(state.live)
    for server in live:
        if isinstance(server.transport, asyncio.Transport):
            server.transport.abort()
    for _ in range(100):
        with state.lock:
            if not state.live:
                return
        await asyncio.sleep(0)


async def _apply(server: _SinkSMTP, stage: Stage, recipient: str | None = None) -> str | None:
    """The fault's answer at this stage (None: answer normally)."""
    fault = server.fault
    if fault is None or not fault.applies_to(stage, recipient):
        return None
    if fault.delay:
        await asyncio.sleep(fault.delay)
    if fault.drop:
        if isinstance(server.transport, asyncio.Transport):
            server.transport.abort()
        return "421 4.4.2 Connection dropped"  # written to a closed transport: lost
    return fault.reply


# -- as a process ---------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mailgate.testing.smtp_sink``: serve until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m mailgate.testing.smtp_sink")
    parser.add_argument("--host", default=HOST)
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--spool", type=Path, required=True, help="one file per message")
    parser.add_argument("--count-file", type=Path, help="rewritten with the count")
    parser.add_argument("--ready-file", type=Path, help="written with the port once up")
    parser.add_argument(
        "--delay-data", type=float, default=0.0, help="seconds before answering DATA"
    )
    parser.add_argument("--reply-data", help="answer DATA with this (e.g. '451 4.3.0 later')")
    args = parser.parse_args(argv)

    done = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: done.set())
    sink = SmtpSink(host=args.host, port=args.port, spool=args.spool, count_file=args.count_file)
    if args.delay_data or args.reply_data:
        sink.set_standing(Fault("data", reply=args.reply_data, delay=args.delay_data))
    with sink:
        if args.ready_file is not None:
            partial = args.ready_file.with_suffix(".part")
            partial.write_text(f"{sink.port}\n")
            partial.replace(args.ready_file)
        while not done.wait(0.5):
            pass
    return 0


def spooled(spool: Path) -> list[Path]:
    """The messages a sink process has written, in arrival order."""
    return sorted(spool.glob("*.eml"))


def wait_until(
    predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.01
) -> None:
    """Poll ``predicate`` until true (for a sink in another process), else TimeoutError."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        time.sleep(interval)


if __name__ == "__main__":
    raise SystemExit(main())
