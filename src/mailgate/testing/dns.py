"""A tiny authoritative DNS server on loopback, serving in-memory test zones.

Sender authentication is DNS all the way down (SPF policies, DKIM keys, DMARC records),
and tests must never reach the internet. This server answers from a dict on
``127.0.0.1`` at an ephemeral UDP port, so tests exercise the real resolver code path
(dnspython on the wire) instead of a patched function::

    with DnsTestServer() as server:
        server.add("example.com", "TXT", "v=spf1 ip4:192.0.2.1 -all")
        resolver = server.resolver()
        ...

Names that exist with other types answer NOERROR/no data; unknown names NXDOMAIN, like
a real authoritative server. ``failing = True`` makes every answer SERVFAIL, which is
how a test provokes ``temperror`` without waiting for a timeout.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

from dnslib import AAAA, MX, PTR, QTYPE, RCODE, RR, TXT, A, DNSRecord
from dnslib.server import BaseResolver, DNSLogger, DNSServer

from mailgate.services.sender_auth import DnsPythonResolver

__all__ = ["DnsTestServer"]

_log = logging.getLogger("mailgate.testing.dns")

_BUILDERS: dict[str, Callable[[str], Any]] = {
    "A": A,
    "AAAA": AAAA,
    "PTR": PTR,
    # TXT character-strings are at most 255 octets; long records (DKIM keys) are split.
    "TXT": lambda v: TXT([v.encode()[i : i + 255] for i in range(0, len(v.encode()), 255)]),
    "MX": lambda v: MX(v.split()[1], int(v.split()[0])),
}


class _ZoneResolver(BaseResolver):  # type: ignore[misc]  # dnslib is untyped
    def __init__(self, owner: DnsTestServer) -> None:
        self._owner = owner

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        if self._owner.failing:
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        name = str(request.q.qname).rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        with self._owner.lock:
            records = dict(self._owner.records.get(name, {}))
        self._owner.queries.append((name, qtype))
        if not records:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for value in records.get(qtype, []):
            reply.add_answer(
                RR(request.q.qname, getattr(QTYPE, qtype), rdata=_BUILDERS[qtype](value), ttl=60)
            )
        return reply


class DnsTestServer:
    """Authoritative loopback DNS for tests; start with ``with`` or :meth:`start`.

    Records are ``add(name, type, value)`` with type one of A, AAAA, TXT, MX
    (``"10 mx.example.com"``) or PTR. They may be added while the server runs.
    ``queries`` lists every ``(name, type)`` asked, so tests can assert what was
    (not) looked up.
    """

    def __init__(self, address: str = "127.0.0.1") -> None:
        self.address = address
        self.records: dict[str, dict[str, list[str]]] = {}
        self.queries: list[tuple[str, str]] = []
        self.failing = False
        self.lock = threading.Lock()
        self._server: DNSServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def add(self, name: str, rtype: str, value: str) -> DnsTestServer:
        """Serve one more record; returns the server so calls can chain."""
        rtype = rtype.upper()
        if rtype not in _BUILDERS:
            raise ValueError(f"unsupported record type {rtype!r}")
        with self.lock:
            by_type = self.records.setdefault(name.rstrip(".").lower(), {})
            by_type.setdefault(rtype, []).append(value)
        return self

    def start(self) -> DnsTestServer:
        """Bind an ephemeral UDP port on ``address`` and answer in a daemon thread."""
        logger = DNSLogger(logf=lambda text: _log.debug("%s", text))
        self._server = DNSServer(_ZoneResolver(self), address=self.address, port=0, logger=logger)
        self.port = int(self._server.server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"dns-test-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop answering and release the port (later queries to it time out)."""
        if self._server is not None:
            self._server.server.shutdown()
            self._server.server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def resolver(self, *, timeout: float = 2.0) -> DnsPythonResolver:
        """A :class:`DnsPythonResolver` that asks this server and nothing else."""
        if not self.port:
            raise RuntimeError("start the server before asking for its resolver")
        return DnsPythonResolver([self.address], port=self.port, timeout=timeout)

    def __enter__(self) -> DnsTestServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
