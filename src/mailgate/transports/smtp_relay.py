"""The SMTP relay transport: hand each message to one smarthost over a kept-open pool.

A relay is reached with STARTTLS (``auto``: when offered; ``require``; ``off``) or
implicit TLS, verified against ``relay_ca_file`` or the system CAs, and AUTH when a user
is configured. Opening a session (TCP, TLS handshake, EHLO, AUTH) costs several round
trips, more than a small message's transaction, so up to ``max(1, delivery_workers)``
sessions stay open and each carries many transactions, one after another. A pooled
session the relay has closed in the meantime is noticed before or at ``MAIL`` (nothing
of the message sent yet) and replaced once.

Replies map to the delivery contract (RFC 5321 §4.2.1):

==================================  ============================================
what happened                       result
==================================  ============================================
connect, TLS or AUTH fails          TemporaryDeliveryError (configuration or relay
                                    trouble, not the message's fault: keep it queued)
dropped connection, timeout         TemporaryDeliveryError
4xx to MAIL, any RCPT, or DATA      TemporaryDeliveryError (no DATA is sent after a
                                    4xx RCPT, so a retry cannot duplicate)
5xx to MAIL or DATA                 PermanentDeliveryError
5xx to every RCPT                   PermanentDeliveryError
5xx to some RCPT, others 250        success, ``receipt.refused`` names the refused
==================================  ============================================
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import aiosmtplib

from mailgate.config import Settings
from mailgate.errors import DeliveryError, PermanentDeliveryError, TemporaryDeliveryError
from mailgate.transports.base import OutgoingMessage, TransportReceipt

_CONNECTION_ERRORS = (
    aiosmtplib.SMTPServerDisconnected,
    aiosmtplib.SMTPConnectError,
    aiosmtplib.SMTPTimeoutError,
    ConnectionError,
    TimeoutError,
    OSError,  # ssl.SSLError (certificate not trusted) is one
)

_STARTTLS: dict[str, bool | None] = {"auto": None, "require": True, "off": False}


class _StaleSession(Exception):
    """A pooled session turned out dead before anything of the message was sent."""


class SmtpRelayTransport:
    """Delivers through ``relay_host:relay_port``; see the module docstring."""

    name = "smtp"

    def __init__(self, settings: Settings) -> None:
        self.host = settings.relay_host
        self.port = settings.relay_port
        self.username = settings.relay_username or None
        self.password = (
            settings.relay_password.get_secret_value() if settings.relay_password else None
        )
        self.implicit_tls = settings.relay_tls
        self.starttls = False if settings.relay_tls else _STARTTLS[settings.relay_starttls]
        self.ca_file = settings.relay_ca_file
        self.timeout = settings.relay_timeout_seconds
        self.local_hostname = settings.smtp_hostname
        self.pool_size = max(1, settings.delivery_workers)
        self._idle: list[aiosmtplib.SMTP] = []
        self._slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tls_context: ssl.SSLContext | None = None
        self.sessions_opened = 0
        """How many sessions this transport has opened (a pool that works keeps it low)."""

    async def send(self, message: OutgoingMessage) -> TransportReceipt:
        """Run one SMTP transaction for ``message`` on a pooled session.

        Raises:
            TemporaryDeliveryError: see the module docstring.
            PermanentDeliveryError: see the module docstring.
        """
        async with self._slot():
            client, reused = await self._checkout()
            try:
                try:
                    receipt = await _transaction(client, message, reused=reused)
                except _StaleSession:
                    client.close()
                    client = await self._connect()
                    receipt = await _transaction(client, message, reused=False)
            except DeliveryError:
                await self._release_after_error(client)
                raise
            except BaseException:
                client.close()
                raise
            self._idle.append(client)
            return receipt

    async def aclose(self) -> None:
        """Say QUIT on every idle session and close it."""
        idle, self._idle = self._idle, []
        for client in idle:
            try:
                await client.quit(timeout=min(self.timeout, 5.0))
            except (aiosmtplib.SMTPException, *_CONNECTION_ERRORS):
                pass
            finally:
                client.close()

    # -- pool -----------------------------------------------------------------------

    def _slot(self) -> asyncio.Semaphore:
        """At most ``pool_size`` sessions at once (created on the loop that sends)."""
        loop = asyncio.get_running_loop()
        if self._slots is None or self._loop is not loop:
            for client in self._idle:  # bound to a loop that is gone
                client.close()
            self._idle.clear()
            self._slots = asyncio.Semaphore(self.pool_size)
            self._loop = loop
        return self._slots

    async def _checkout(self) -> tuple[aiosmtplib.SMTP, bool]:
        """The most recently used live session (LIFO keeps few sessions warm), or a new
        one; the flag says whether it was reused."""
        while self._idle:
            client = self._idle.pop()
            if client.is_connected:
                return client, True
            client.close()
        return await self._connect(), False

    async def _connect(self) -> aiosmtplib.SMTP:
        client = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            username=self.username,
            password=self.password,
            local_hostname=self.local_hostname,
            timeout=self.timeout,
            use_tls=self.implicit_tls,
            start_tls=self.starttls,
            tls_context=self._context(),
        )
        try:
            await client.connect()
        except aiosmtplib.SMTPResponseException as exc:
            client.close()
            raise TemporaryDeliveryError(
                f"relay {self.host}:{self.port} refused the session: {exc.code} {exc.message}",
                reply_code=exc.code,
                stage="connect",
            ) from exc
        except (aiosmtplib.SMTPException, *_CONNECTION_ERRORS) as exc:
            client.close()
            raise TemporaryDeliveryError(
                f"cannot open a session with relay {self.host}:{self.port}: {exc}",
                stage="connect",
            ) from exc
        self.sessions_opened += 1
        return client

    def _context(self) -> ssl.SSLContext:
        if self._tls_context is None:
            cafile = str(self.ca_file) if self.ca_file is not None else None
            self._tls_context = ssl.create_default_context(cafile=cafile)
        return self._tls_context

    async def _release_after_error(self, client: aiosmtplib.SMTP) -> None:
        """After a refusal the session is still good once RSET clears the envelope."""
        if not client.is_connected:
            return
        try:
            await client.rset()
        except (aiosmtplib.SMTPException, *_CONNECTION_ERRORS):
            client.close()
            return
        self._idle.append(client)


async def _transaction(
    client: aiosmtplib.SMTP, message: OutgoingMessage, *, reused: bool
) -> TransportReceipt:
    """MAIL, RCPT for each recipient, DATA: the raw bytes verbatim (dot-stuffed on the
    wire, which the receiver undoes)."""
    utf8 = not all(addr.isascii() for addr in (message.mail_from, *message.recipients))
    options: list[str] = []
    if client.supports_extension("size"):
        options.append(f"SIZE={len(message.raw)}")
    if utf8:
        if not client.supports_extension("smtputf8"):
            raise PermanentDeliveryError(
                "an address is not ASCII and the relay does not offer SMTPUTF8", stage="mail"
            )
        options.append("SMTPUTF8")
    if not message.raw.isascii() and client.supports_extension("8bitmime"):
        options.append("BODY=8BITMIME")
    if client.supports_extension("dsn"):
        # RFC 3461: a bounce names our request (Original-Envelope-Id) and returns
        # only the headers, so feedback can match it without the Message-ID.
        options.extend((f"ENVID={message.outbound_id}", "RET=HDRS"))
    encoding = "utf-8" if utf8 else "ascii"

    try:
        await client.mail(message.mail_from, options=options, encoding=encoding)
    except aiosmtplib.SMTPResponseException as exc:
        raise _refused(exc, "mail") from exc
    except _CONNECTION_ERRORS as exc:
        if reused:
            raise _StaleSession from exc
        raise _dropped(exc, "mail") from exc

    refused: dict[str, str] = {}
    stage = "rcpt"
    try:
        for recipient in message.recipients:
            try:
                await client.rcpt(recipient, encoding=encoding)
            except aiosmtplib.SMTPResponseException as exc:
                if exc.code < 500:
                    raise _refused(exc, stage, recipient=recipient) from exc
                refused[recipient] = f"{exc.code} {exc.message}"
        if len(refused) == len(message.recipients):
            first = next(iter(refused.values()), "")
            raise PermanentDeliveryError(
                f"the relay refused every recipient: {first}",
                reply_code=int(first[:3]) if first[:3].isdigit() else None,
                stage=stage,
                refused=refused,
            )
        stage = "data"
        response = await client.data(message.raw)
    except aiosmtplib.SMTPResponseException as exc:
        raise _refused(exc, stage) from exc
    except _CONNECTION_ERRORS as exc:
        raise _dropped(exc, stage) from exc
    return TransportReceipt(
        transport="smtp", code=response.code, detail=response.message, refused=refused
    )


def _refused(exc: aiosmtplib.SMTPResponseException, stage: str, **extra: Any) -> DeliveryError:
    detail = f"relay answered {exc.code} {exc.message} to {stage.upper()}"
    if 400 <= exc.code < 500:
        return TemporaryDeliveryError(detail, reply_code=exc.code, stage=stage, **extra)
    return PermanentDeliveryError(detail, reply_code=exc.code, stage=stage, **extra)


def _dropped(exc: BaseException, stage: str) -> TemporaryDeliveryError:
    return TemporaryDeliveryError(
        f"connection to the relay failed during {stage.upper()}: {exc or type(exc).__name__}",
        stage=stage,
    )
