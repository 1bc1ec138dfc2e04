"""SMTP ingress: aiosmtpd on the shared event loop, answering ``250`` only after the commit.

The server runs on the loop it is started from (the same loop as uvicorn in
``mailgate serve``) through ``loop.create_server``; aiosmtpd's ``Controller`` is not
used because it spawns a thread with a second loop, which would put a thread hop
between the SMTP conversation and the services and make shutdown order unknowable.

The edge stays thin: RCPT asks :meth:`TenancyService.resolve_recipient`, DATA hands
the bytes to :meth:`IngestService.ingest_async` and answers from its outcome. What
this module adds to aiosmtpd is framing and safety at the door:

========================================  ============  ===========================
refusal                                   reply         reference
========================================  ============  ===========================
RCPT to an address that is no agent's     ``550 5.1.1``  RFC 5321 §3.3 (never relayed)
RCPT beyond ``smtp_max_recipients``       ``452 4.5.3``  RFC 5321 §4.5.3.1.10
``MAIL FROM:<a> SIZE=n`` over the limit   ``552 5.3.4``  RFC 1870 §6
DATA body over the limit                  ``552 5.3.4``  RFC 1870 §6
DATA with a bare CR or bare LF            ``554 5.6.0``  RFC 5321 §2.3.8 (smuggling)
address that is not valid UTF-8           ``553 5.1.3``  RFC 6531 §3.3
lookup or ingest failure                  ``451 4.3.0``  RFC 5321 §4.2.5 (client retries)
server shutting down                      ``421 4.3.2``  RFC 5321 §3.8
========================================  ============  ===========================

Enhanced status codes are RFC 3463's. ``ENHANCEDSTATUSCODES`` is not advertised
because aiosmtpd's own replies (``503 Error: need RCPT command`` …) carry none.

Why a bare CR or LF is refused rather than normalised. SMTP smuggling (Postfix
CVE-2023-51764, aiosmtpd CVE-2024-27305) works because two hops disagree on where a
message ends: one passes ``<LF>.<CR><LF>`` through, the next takes it as the end, and
what follows runs as a second transaction with a forged sender. We end DATA only at
``<CR><LF>.<CR><LF>``, so nothing is split here; but a message carrying such a
sequence may already have been read as two messages by another hop, and normalising
bare LFs to CRLF would alter the raw bytes we promise to keep verbatim (and break
DKIM body hashes). RFC 5321 §2.3.8 allows no line terminator but CRLF, so a bare CR
or LF means a broken or hostile client. A permanent ``554`` is what Postfix's
``smtpd_forbid_bare_newline = reject``, chasquid and KumoMTA's default
``invalid_line_endings = "Deny"`` do: a legitimate sender learns of it (a bounce)
instead of having their mail silently changed, and no ambiguous bytes reach agents.
"""

from __future__ import annotations

import asyncio
import collections
import io
import logging
import ssl
from collections.abc import Callable
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from typing import Any

from aiosmtpd.smtp import SMTP, Session
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from mailgate.config import Settings
from mailgate.errors import ConfigError
from mailgate.runtime import Runtime
from mailgate.services.ingest import Envelope, IngestService, SenderAuth
from mailgate.services.sender_auth import SenderAuthenticator
from mailgate.services.tenancy import Recipient, TenancyService

__all__ = ["SmtpIngress", "has_bare_line_ending", "read_data"]

log = logging.getLogger(__name__)

IDENT = "ESMTP mailgate"
"""Banner text after the hostname; deliberately without a software version."""

END_OF_DATA = b"\r\n.\r\n"
"""The only end of mail data (RFC 5321 §4.1.1.4); bare-LF look-alikes are not."""

REPLY_TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
REPLY_BARE_EOL = (
    "554 5.6.0 Message contains a bare CR or LF; lines must end with CRLF (RFC 5321 section 2.3.8)"
)
REPLY_TEMPORARY = "451 4.3.0 Temporary failure, please try again later"
REPLY_TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"


def has_bare_line_ending(data: bytes) -> bool:
    """True if ``data`` holds a CR not followed by LF or an LF not preceded by CR.

    Each ``<CR><LF>`` pair accounts for exactly one CR and one LF and pairs never
    overlap, so the counts agree only when every CR and LF belongs to a pair. Three
    ``bytes.count`` scans in C cost ~6 µs for a 4 KB message (~40 ms for 25 MB), well
    inside the hot path's budget and cheaper than a regular expression with
    look-arounds.
    """
    pairs = data.count(b"\r\n")
    return data.count(b"\r") != pairs or data.count(b"\n") != pairs


async def read_data(
    reader: asyncio.StreamReader, limit: int, *, progress: Callable[[], object] = lambda: None
) -> bytes | None:
    """Read one DATA body through ``<CR><LF>.<CR><LF>``: unstuffed, or None if too big.

    ``readuntil(END_OF_DATA)`` takes whatever is buffered (a socket read, up to
    256 KiB) per call, and never consumes past the end of data, so pipelined commands
    stay in the reader. Its one blind spot is the start: the CRLF of the ``DATA`` line
    itself can begin the marker (an empty body is just ``.<CR><LF>``), so the first
    bytes go through a five-state matcher, one byte at a time, until no partial marker
    is pending (usually after the first byte).

    Over ``limit`` it keeps reading to the end of data, so the client can read our
    552, but keeps nothing. The size compared is the unstuffed size, as RFC 1870 §3
    defines it. ``progress`` is called for each piece kept (the idle timer's reset).

    The body grows in a `io.BytesIO`, whose ``getvalue()`` hands over its own buffer
    (trimmed in place) when nothing else holds it: the message exists once, where a
    list of pieces and their ``b"".join`` would hold it twice at the end.
    """
    body = io.BytesIO()
    size = 0
    too_big = False

    def keep(piece: bytes) -> None:
        nonlocal body, size, too_big
        if too_big:
            return
        size += len(piece)
        if size > limit:
            too_big = True
            body = io.BytesIO()  # discard at once: never hold an oversize body
        else:
            body.write(piece)
            progress()

    head = bytearray()
    state = 2  # matched "<CR><LF>" of END_OF_DATA: the DATA line's own CRLF
    while 0 < state < len(END_OF_DATA):
        byte = (await reader.readexactly(1))[0]
        head.append(byte)
        state = _match_step(state, byte)
    if state == len(END_OF_DATA):
        keep(_unstuff(b"\r\n", bytes(head[:-3])))
        return None if too_big else body.getvalue()
    keep(_unstuff(b"\r\n", bytes(head)))
    tail = bytes((b"\r\n" + head)[-2:])  # the stream's last two bytes so far
    while True:
        try:
            chunk = await reader.readuntil(END_OF_DATA)
        except asyncio.LimitOverrunError as exc:
            # No marker in the buffer yet: take all but its last four bytes, which
            # may begin one (readuntil reports that length as consumed).
            chunk = await reader.read(exc.consumed)
            keep(_unstuff(tail, chunk))
            tail = chunk[-2:] if len(chunk) >= 2 else (tail + chunk)[-2:]
        else:
            keep(_unstuff(tail, chunk[:-3]))  # the body keeps the CRLF before the dot
            return None if too_big else body.getvalue()


def _match_step(state: int, byte: int) -> int:
    """One step of a Knuth-Morris-Pratt matcher for ``<CR><LF>.<CR><LF>``.

    ``state`` is how much of the marker the bytes so far end with. On a mismatch the
    only prefix that can survive is a lone CR (the marker has no other repeated part).
    """
    if byte == END_OF_DATA[state]:
        return state + 1
    return 1 if byte == 0x0D else 0


def _unstuff(tail: bytes, chunk: bytes) -> bytes:
    """Undo dot-stuffing (RFC 5321 §4.5.2) in one piece of the DATA stream.

    A line that starts with a dot lost that dot's twin on the way in; we drop the
    first dot of every line. ``tail`` is the stream's last two bytes before ``chunk``
    so that a line start falling on the chunk boundary is seen too.
    """
    if chunk[:1] == b"." and tail == b"\r\n":
        chunk = chunk[1:]
    elif chunk[:2] == b"\n." and tail[-1:] == b"\r":
        chunk = b"\n" + chunk[2:]
    if b"\r\n." in chunk:
        chunk = chunk.replace(b"\r\n.", b"\r\n")
    return chunk


def _is_utf8(text: str) -> bool:
    # aiosmtpd decodes SMTPUTF8 arguments with surrogateescape: invalid bytes become
    # lone surrogates, which cannot be stored (PostgreSQL refuses them) or echoed.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _Transaction(SmtpEnvelope):
    """aiosmtpd's envelope plus the agents each accepted RCPT resolved to."""

    def __init__(self) -> None:
        super().__init__()
        self.recipients: list[Recipient] = []


class _Handler:
    """aiosmtpd hooks: each parses, calls one service and maps the outcome to a reply."""

    def __init__(
        self,
        tenancy: TenancyService,
        ingest: IngestService,
        settings: Settings,
        sender_auth: SenderAuthenticator | None = None,
    ) -> None:
        self.tenancy = tenancy
        self.ingest = ingest
        self.max_recipients = settings.smtp_max_recipients
        self.sender_auth = sender_auth
        self.authserv_id = settings.effective_authserv_id

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: _Transaction, hostname: str,
        responses: list[str],
    ) -> list[str]:  # fmt: skip
        """Drop aiosmtpd's ``AUTH`` line: there is no submission login here (its
        built-in mechanisms always fail), so advertising them would only mislead."""
        session.host_name = hostname
        return [line for line in responses if not line[4:].upper().startswith("AUTH")]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: _Transaction, address: str,
        mail_options: list[str],
    ) -> str:  # fmt: skip
        if not _is_utf8(address):
            return "553 5.1.3 Sender address is not valid UTF-8"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: _Transaction, address: str,
        rcpt_options: list[str],
    ) -> str:  # fmt: skip
        """Accept only agent addresses.

        A known address is answered from the tenancy cache on the loop (no thread hop;
        ``recipient_cache_seconds``); anything else is one indexed read in a thread, so
        an address created a moment ago is accepted at once.
        Refusing here (not after DATA) means a stranger's mail is never even received,
        let alone relayed.
        """
        if len(envelope.rcpt_tos) >= self.max_recipients:
            return REPLY_TOO_MANY_RCPTS
        if not _is_utf8(address):
            return "553 5.1.3 Recipient address is not valid UTF-8"
        try:
            recipient = self.tenancy.cached_recipient(address) or await asyncio.to_thread(
                self.tenancy.resolve_recipient, address
            )
        except Exception:
            log.exception("recipient lookup failed for %r; answering 451", address)
            return REPLY_TEMPORARY
        if recipient is None:
            return f"550 5.1.1 <{address}>: no such mailbox here (this server does not relay)"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        envelope.recipients.append(recipient)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: _Transaction) -> str:
        """Store the message for every recipient agent, then (and only then) say 250.

        ``ingest_async`` returns after the group commit is durable (RFC 5321 §6.1: a
        250 accepts responsibility). If it raises, nothing was written (one
        transaction), so a temporary 451 makes the client retry, and dedup absorbs a
        retry of a message whose commit raced the error.
        """
        raw = envelope.original_content
        assert raw is not None  # set by _Connection.smtp_DATA before this hook runs
        peer = session.peer
        client = str(peer[0]) if isinstance(peer, tuple) else peer
        # aiosmtpd keeps the null reverse-path (RFC 5321 §4.5.5, bounces) as "<>".
        mail_from = "" if envelope.mail_from == "<>" else str(envelope.mail_from)
        helo = session.host_name
        try:
            auth = await self._authenticate(raw, mail_from, client, helo)
            details = Envelope(mail_from, client_address=client, helo=helo, auth=auth)
            stored = await self.ingest.ingest_async(raw, details, envelope.recipients)
        except Exception:
            log.exception("ingest failed for a message from %r; answering 451", client)
            return REPLY_TEMPORARY
        for outcome in stored:
            log.debug(
                "accepted message %s for agent %s from %r (duplicate=%s)",
                outcome.message_id, outcome.agent_id, client, outcome.duplicate,
            )  # fmt: skip
        first = stored[0].message_id if stored else "nothing"
        more = f" (+{len(stored) - 1} more)" if len(stored) > 1 else ""
        return f"250 2.0.0 OK: stored as {first}{more}"

    async def _authenticate(
        self, raw: bytes, mail_from: str, client: str | None, helo: str | None
    ) -> SenderAuth | None:
        """SPF/DKIM/DMARC/ARC in a worker thread (blocking DNS, bounded by the budget),
        before and outside the ingest transaction; None when checks are off."""
        if self.sender_auth is None:
            return None
        return await asyncio.to_thread(
            self.sender_auth.check,
            raw,
            mail_from=mail_from,
            client_ip=client or "",
            helo=helo or "",
            authserv_id=self.authserv_id,
        )

    async def handle_exception(self, error: Exception) -> str:
        """A bug in a hook must not leak its text to the client; log it and ask for a retry."""
        log.error("SMTP session error", exc_info=error)
        return REPLY_TEMPORARY


class _Connection(SMTP):
    """One SMTP connection: aiosmtpd's state machine with our DATA framing.

    ``smtp_DATA`` is replaced (by :func:`read_data`) because aiosmtpd 1.4.6's own
    DATA loop, read in its ``smtp.py``, falls short in three ways:

    * **Size.** Once the byte count passes ``data_size_limit`` it sets ``TOO_MUCH``
      and empties the lines kept so far (``data *= 0``), so a many-line oversize body
      is not buffered. But pieces of an over-long line go to ``line_fragments``
      whatever the state, and that list is emptied only at a CRLF: an oversize body
      sent as one endless line is buffered whole, without bound.
    * **Line length.** Any line over 1001 octets ends in ``500 Line too long``.
      RFC 5321 §4.5.3.1.6's 1000 octets is a minimum a server must accept, and
      §4.5.3.1 asks for "techniques that impose no limits on the length of these
      objects" where possible. Real mail breaks it (the corpus has lines of 11,677
      characters), and re-wrapping would break verbatim storage and DKIM. We accept
      any line length; memory stays bounded by the message size limit.
    * **Cost.** It reads line by line (~6.7 ms per 285 KB message, BASELINES.md); we
      read whole socket reads, a handful of iterations per message.

    The end of data is ``<CR><LF>.<CR><LF>`` and nothing else (RFC 5321 §4.1.1.4,
    as aiosmtpd >= 1.4.5 also does); a message containing a bare CR or LF is refused
    (see the module docstring for why). Command lines keep aiosmtpd's leniency (a bare
    LF ends a command): that cannot split a message, and hand-typed sessions use it.
    """

    def __init__(
        self,
        handler: _Handler,
        *,
        settings: Settings,
        tls_context: ssl.SSLContext | None,
        on_closed: Callable[[_Connection], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        # aiosmtpd keeps command_size_limits on the class and clears it in every
        # __init__ (while EHLO adds to it), so one connection resets another's MAIL
        # limit. A per-connection dict keeps connections independent.
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        super().__init__(
            handler,
            data_size_limit=settings.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=settings.smtp_hostname,
            ident=IDENT,
            tls_context=tls_context,
            require_starttls=settings.smtp_require_tls,
            timeout=settings.smtp_timeout,
            loop=loop,
        )
        self._on_closed = on_closed
        self._limit = settings.max_message_size
        self.closed: asyncio.Future[None] = loop.create_future()
        self.in_data = False
        self.shutting_down = False

    def _create_envelope(self) -> _Transaction:
        return _Transaction()

    def _end_transaction(self) -> None:
        self._set_post_data_state()  # type: ignore[no-untyped-call]

    # -- lifecycle ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first and self.shutting_down:
            # Accepted by the kernel just before the listener closed.
            self._goodbye()

    def connection_lost(self, error: Exception | None) -> None:
        try:
            super().connection_lost(error)
        finally:
            self.mark_closed()

    def mark_closed(self) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        self._on_closed(self)

    def shut_down(self) -> None:
        """Close now if idle; a connection inside DATA closes after its reply."""
        self.shutting_down = True
        if not self.in_data:
            self._goodbye()

    def abort(self) -> None:
        """Cut the connection (the grace period is over)."""
        transport = self.transport
        if isinstance(transport, asyncio.Transport):
            transport.abort()
        else:
            self.mark_closed()

    def _goodbye(self) -> None:
        """Say 421 and close (RFC 5321 §3.8: a server shutting down SHOULD say 421)."""
        transport = self.transport
        if not isinstance(transport, asyncio.Transport) or transport.is_closing():
            return
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()
        reply = f"421 4.3.2 {self.hostname} Service shutting down, closing transmission channel"
        transport.write(reply.encode() + b"\r\n")
        transport.close()

    # -- commands ----------------------------------------------------------------------

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's address parse, minus the ``typing.Protocol`` class it defines on
        every call (measured at ~5% of server CPU per message: it runs for MAIL and
        for every RCPT). Same parsers, same results."""
        if not arg:
            return "", ""
        try:
            if arg.lstrip().startswith("<"):
                angle, rest = get_angle_addr(arg)
                addr = angle.addr_spec
            else:
                spec, rest = get_addr_spec(arg)
                addr = spec.addr_spec
        except HeaderParseError:
            return None, None
        localpart = addr.rpartition("@")[0]
        if self.local_part_limit and len(localpart) > self.local_part_limit:
            return None, None
        return addr, rest

    async def smtp_MAIL(self, arg: str | None) -> None:
        """Refuse ``SIZE=`` over the limit with RFC 1870's 552 and an enhanced code
        (aiosmtpd's own reply has none); everything else is aiosmtpd's."""
        declared = self._declared_size(arg)
        if declared is not None and declared > self._limit:
            await self.push(REPLY_TOO_BIG)
            return
        await super().smtp_MAIL(arg)

    def _declared_size(self, arg: str | None) -> int | None:
        session, envelope = self.session, self.envelope
        if not arg or "SIZE=" not in arg.upper():
            return None  # the common case: skip parsing the address twice
        if session is None or not session.extended_smtp or not session.host_name:
            return None  # let aiosmtpd answer with its syntax or sequence error
        if envelope is None or envelope.mail_from:
            return None
        rest = self._strip_command_keyword("FROM:", arg)
        if rest is None:
            return None
        # Parameters follow the path's closing ">" (RFC 5321 §4.1.2); splitting there
        # spares a second full address parse on every MAIL (aiosmtpd parses it next).
        path, closed, after = rest.rpartition(">")
        params: str | None = after
        if not closed or not path.lstrip().startswith("<"):
            address, params = self._getaddr(rest)
            if not address:
                return None
        if not params:
            return None
        for param in params.upper().split():
            name, _, value = param.partition("=")
            if name == "SIZE" and value.isdigit():
                return int(value)
        return None

    async def smtp_DATA(self, arg: str) -> None:
        self.in_data = True
        try:
            await self._data(arg)
        finally:
            self.in_data = False
            if self.shutting_down:
                self._goodbye()

    async def _data(self, arg: str) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        envelope = self.envelope
        assert envelope is not None
        if not envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        body = await read_data(self._reader, self._limit, progress=self._reset_timeout)
        if body is None:
            self._end_transaction()
            await self.push(REPLY_TOO_BIG)
            return
        if has_bare_line_ending(body):
            peer = self.session.peer if self.session is not None else None
            log.info("%r: refused a message with a bare CR or LF", peer)
            self._end_transaction()
            await self.push(REPLY_BARE_EOL)
            return
        envelope.content = envelope.original_content = body
        status = await self._call_handler_hook("DATA")
        self._end_transaction()
        await self.push(status)


def _tls_context(settings: Settings) -> ssl.SSLContext | None:
    """A server context from the configured PEM pair, or None (no STARTTLS).

    Raises:
        ConfigError: TLS is required without a certificate, or the pair cannot be loaded.
    """
    if settings.smtp_tls_cert is None or settings.smtp_tls_key is None:
        if settings.smtp_require_tls:
            # aiosmtpd would silently ignore require_starttls without a context.
            raise ConfigError("smtp_require_tls needs smtp_tls_cert and smtp_tls_key")
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.smtp_tls_cert, settings.smtp_tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the SMTP TLS certificate: {exc}") from exc
    return context


class SmtpIngress:
    """The SMTP server of one gateway process, on the running event loop."""

    def __init__(self, runtime: Runtime) -> None:
        """Prepare the server (nothing listens until :meth:`start`).

        Raises:
            ConfigError: the TLS settings are inconsistent or unreadable.
        """
        self.settings = runtime.settings
        self._handler = _Handler(
            runtime.tenancy, runtime.ingest, runtime.settings, runtime.sender_auth
        )
        self._tls = _tls_context(runtime.settings)
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._stopping = False

    async def start(self, host: str | None = None, port: int | None = None) -> None:
        """Listen on ``host:port`` (default ``settings.smtp_address``; port 0 picks one).

        Raises:
            RuntimeError: already started.
            OSError: the address cannot be bound.
        """
        if self._server is not None:
            raise RuntimeError("the SMTP ingress is already started")
        default_host, default_port = self.settings.smtp_address
        loop = asyncio.get_running_loop()
        self._stopping = False

        def factory() -> _Connection:
            conn = _Connection(
                self._handler,
                settings=self.settings,
                tls_context=self._tls,
                on_closed=self._connections.discard,
                loop=loop,
            )
            conn.shutting_down = self._stopping
            self._connections.add(conn)
            return conn

        self._server = await loop.create_server(
            factory,
            default_host if host is None else host,
            default_port if port is None else port,
        )
        log.info("SMTP listening on %s", ", ".join(_name(s) for s in self._server.sockets))

    @property
    def port(self) -> int:
        """The bound port (useful after ``start(port=0)``).

        Raises:
            RuntimeError: not started.
        """
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the SMTP ingress is not listening")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def serving(self) -> bool:
        """Whether the listening socket is open."""
        return self._server is not None and self._server.is_serving()

    async def stop(self, grace: float | None = None) -> None:
        """Stop listening at once, let transactions inside DATA finish, then close all.

        Idle connections get ``421`` and are closed now. A connection in the middle of
        DATA (its sender is waiting for the verdict on a whole message) may finish and
        get its reply (then ``421`` and close), for up to ``grace`` seconds (default
        ``settings.shutdown_grace_seconds``); after that it is cut, and the client,
        having no ``250``, will retry.
        """
        server = self._server
        if server is None:
            return
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        self._stopping = True
        server.close()
        for conn in list(self._connections):
            conn.shut_down()
        if not await self._wait_closed(grace):
            log.warning(
                "SMTP shutdown grace (%ss) over; cutting %d connection(s)",
                grace, len(self._connections),
            )  # fmt: skip
            for conn in list(self._connections):
                conn.abort()
            await self._wait_closed(5.0)
        await server.wait_closed()
        self._server = None
        log.info("SMTP stopped")

    async def _wait_closed(self, timeout: float) -> bool:
        """Wait until every connection is closed (True) or ``timeout`` passes (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._connections:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            await asyncio.wait([c.closed for c in self._connections], timeout=remaining)
        return True


def _name(sock: Any) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
