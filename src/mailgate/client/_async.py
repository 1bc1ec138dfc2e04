"""The asynchronous client: :class:`AsyncMailgate` (same surface as :class:`Mailgate`,
every call awaited; cursor iterators are ``async for``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Self

import httpx

from mailgate.client import _calls as calls
from mailgate.client._calls import DEFAULT_CONSUMER, Attachments
from mailgate.client._models import (
    AckResult,
    AttachmentText,
    Event,
    ExtendResult,
    FolderChange,
    Message,
    MessageDetail,
    NackResult,
    Outbound,
    OutboundResult,
    Page,
    Thread,
    ThreadDetail,
)
from mailgate.client._retry import RetryPolicy
from mailgate.client._transport import AsyncTransport, _Config

__all__ = ["AsyncMailgate"]


class _Resource:
    def __init__(self, transport: AsyncTransport) -> None:
        self._t = transport


class Messages(_Resource):
    async def list(
        self,
        *,
        folder: str | None = None,
        thread_id: str | None = None,
        from_: str | None = None,
        since: datetime | str | None = None,
        agent_id: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page[Message]:
        """One page of messages visible to the key, newest first."""
        return await self._t.perform(
            calls.list_messages(
                folder=folder,
                thread_id=thread_id,
                from_=from_,
                since=since,
                agent_id=agent_id,
                limit=limit,
                cursor=cursor,
            )
        )

    async def iter(
        self,
        *,
        folder: str | None = None,
        thread_id: str | None = None,
        from_: str | None = None,
        since: datetime | str | None = None,
        agent_id: str | None = None,
        page_size: int | None = None,
    ) -> AsyncIterator[Message]:
        """Every matching message, following ``next_cursor`` page by page (lazily)."""
        cursor: str | None = None
        while True:
            page = await self.list(
                folder=folder,
                thread_id=thread_id,
                from_=from_,
                since=since,
                agent_id=agent_id,
                limit=page_size,
                cursor=cursor,
            )
            for item in page.items:
                yield item
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def get(self, message_id: str, *, max_chars: int | None = None) -> MessageDetail:
        """One message with its parsed fields, attachment list and extracted text
        (``extracted_text``: the new text without quoted history, at most ``max_chars``).

        Raises:
            NotFoundError: no such message visible to this key.
        """
        return await self._t.perform(calls.get_message(message_id, max_chars=max_chars))

    async def raw(self, message_id: str) -> bytes:
        """The message byte for byte as it arrived."""
        return await self._t.perform(calls.get_raw(message_id))

    async def attachment(self, message_id: str, attachment_id: str) -> bytes:
        """An attachment's bytes."""
        return await self._t.perform(calls.get_attachment(message_id, attachment_id))

    async def attachment_text(
        self, message_id: str, attachment_id: str, *, max_chars: int | None = None
    ) -> AttachmentText:
        """The text the gateway extracted from a PDF, DOCX, HTML or text attachment
        (``text`` is None for other types, with a ``reason``)."""
        return await self._t.perform(
            calls.get_attachment_text(message_id, attachment_id, max_chars=max_chars)
        )

    async def trash(self, message_id: str) -> FolderChange:
        """Move a message to the trash (reversible until retention purges it).

        Raises:
            ConflictError: ``invalid_folder_transition`` (already in the trash, ...).
        """
        return await self._t.perform(calls.trash_message(message_id))

    async def restore(self, message_id: str) -> FolderChange:
        """Put a trashed message back where it was trashed from."""
        return await self._t.perform(calls.restore_message(message_id))


class Threads(_Resource):
    async def list(
        self, *, agent_id: str | None = None, limit: int | None = None, cursor: str | None = None
    ) -> Page[Thread]:
        """One page of threads, most recently active first."""
        return await self._t.perform(
            calls.list_threads(agent_id=agent_id, limit=limit, cursor=cursor)
        )

    async def iter(
        self, *, agent_id: str | None = None, page_size: int | None = None
    ) -> AsyncIterator[Thread]:
        """Every thread, following ``next_cursor``."""
        cursor: str | None = None
        while True:
            page = await self.list(agent_id=agent_id, limit=page_size, cursor=cursor)
            for item in page.items:
                yield item
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def get(self, thread_id: str) -> ThreadDetail:
        """A thread with its messages, oldest first."""
        return await self._t.perform(calls.get_thread(thread_id))


class Events(_Resource):
    async def pull(
        self,
        *,
        limit: int = 10,
        lease_seconds: float | None = None,
        wait: float = 0.0,
        consumer: str = DEFAULT_CONSUMER,
    ) -> list[Event]:
        """Lease up to ``limit`` events for ``lease_seconds`` (the gateway's default when
        None), waiting up to ``wait`` seconds while none is ready (long-poll). Ack each
        once its side effects are done; an unacked event comes back after its lease."""
        return await self._t.perform(
            calls.pull_events(
                limit=limit, lease_seconds=lease_seconds, wait=wait, consumer=consumer
            )
        )

    async def ack(
        self, events: str | Event | Iterable[str | Event], *, consumer: str = DEFAULT_CONSUMER
    ) -> AckResult:
        """Mark events done. Idempotent: acking twice is reported, not refused."""
        return await self._t.perform(calls.ack_events(calls.event_ids(events), consumer=consumer))

    async def nack(
        self,
        events: str | Event | Iterable[str | Event],
        *,
        consumer: str = DEFAULT_CONSUMER,
        delay: float = 0.0,
    ) -> NackResult:
        """Give events back for redelivery no sooner than ``delay`` seconds from now."""
        return await self._t.perform(
            calls.nack_events(calls.event_ids(events), consumer=consumer, delay=delay)
        )

    async def extend(
        self,
        events: str | Event | Iterable[str | Event],
        lease_seconds: float,
        *,
        consumer: str = DEFAULT_CONSUMER,
    ) -> ExtendResult:
        """Extend live leases to ``lease_seconds`` from now (a heartbeat for long work)."""
        return await self._t.perform(
            calls.extend_leases(
                calls.event_ids(events), consumer=consumer, lease_seconds=lease_seconds
            )
        )


class OutboundRequests(_Resource):
    async def list(
        self,
        *,
        agent_id: str | None = None,
        status: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page[Outbound]:
        """One page of outbound requests, newest first."""
        return await self._t.perform(
            calls.list_outbound(agent_id=agent_id, status=status, limit=limit, cursor=cursor)
        )

    async def iter(
        self,
        *,
        agent_id: str | None = None,
        status: str | None = None,
        page_size: int | None = None,
    ) -> AsyncIterator[Outbound]:
        """Every outbound request, following ``next_cursor``."""
        cursor: str | None = None
        while True:
            page = await self.list(agent_id=agent_id, status=status, limit=page_size, cursor=cursor)
            for item in page.items:
                yield item
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def get(self, outbound_id: str) -> Outbound:
        """One request with its decision, approvals and delivery attempts."""
        return await self._t.perform(calls.get_outbound(outbound_id))

    async def approve(self, outbound_id: str, *, comment: str = "") -> Outbound:
        """Release held mail for delivery (owner keys). Not retried automatically.

        Raises:
            ConflictError: ``already_decided``: approved, rejected or expired already.
        """
        return await self._t.perform(calls.decide_outbound(outbound_id, "approve", comment))

    async def reject(self, outbound_id: str, *, comment: str = "") -> Outbound:
        """Refuse held mail: it is never sent (owner keys). Not retried automatically."""
        return await self._t.perform(calls.decide_outbound(outbound_id, "reject", comment))


class Review(_Resource):
    async def list(
        self,
        *,
        folder: str | None = None,
        agent_id: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page[Message]:
        """Mail held by rules for a human (owner keys), newest first."""
        return await self._t.perform(
            calls.list_review(folder=folder, agent_id=agent_id, limit=limit, cursor=cursor)
        )

    async def release(self, message_id: str) -> FolderChange:
        """Deliver held mail to its agent (owner keys)."""
        return await self._t.perform(calls.release_held(message_id))

    async def trash(self, message_id: str) -> FolderChange:
        """Reject held mail into the trash without it reaching the agent (owner keys)."""
        return await self._t.perform(calls.trash_held(message_id))


class Trash(_Resource):
    async def list(
        self, *, agent_id: str | None = None, limit: int | None = None, cursor: str | None = None
    ) -> Page[Message]:
        """Trashed mail, newest first."""
        return await self._t.perform(
            calls.list_trash(agent_id=agent_id, limit=limit, cursor=cursor)
        )


class AsyncMailgate:
    """An asynchronous client for the native ``/v1`` API (as :class:`Mailgate`).

    Every argument falls back to the environment (``MAILGATE_URL``,
    ``MAILGATE_API_KEY``). Reads, feed acks and sends are retried on network errors,
    ``429``, ``503`` and ``409 idempotency_in_flight`` with exponential backoff and
    jitter, honouring ``Retry-After``; approvals and folder moves are not.

    Args:
        base_url: the gateway, e.g. ``http://127.0.0.1:8025``.
        api_key: an owner or agent key (``mg_...``).
        timeout: seconds (or an ``httpx.Timeout``); a long-poll adds its ``wait``.
        max_retries: retries after the first attempt (ignored when ``retry`` is given).
        retry: the full retry policy.
        httpx_client: a client to use instead of making one (not closed by us).
        transport: an httpx transport for the client we make (``httpx.MockTransport``,
            ``httpx.ASGITransport``), for tests and in-process use.
        sleep: how to wait between retries (an async callable; tests pass a recorder).

    Raises:
        MailgateClientError: no base URL or key, given or in the environment.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int = 3,
        retry: RetryPolicy | None = None,
        httpx_client: httpx.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        config = _Config(base_url, api_key, timeout, max_retries, retry)
        self._transport = AsyncTransport(
            config, http_client=httpx_client, transport=transport, sleep=sleep
        )
        self.base_url = config.base_url
        self.messages = Messages(self._transport)
        self.threads = Threads(self._transport)
        self.events = Events(self._transport)
        self.outbound = OutboundRequests(self._transport)
        self.review = Review(self._transport)
        self.trash = Trash(self._transport)

    async def send(
        self,
        *,
        to: str | Sequence[str],
        subject: str = "",
        text: str | None = None,
        html: str | None = None,
        cc: str | Sequence[str] | None = None,
        bcc: str | Sequence[str] | None = None,
        reply_to: str | Sequence[str] | None = None,
        attachments: Attachments = None,
        headers: Mapping[str, str] | None = None,
        agent_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> OutboundResult:
        """New mail in a new thread, through the outbound policy.

        ``idempotency_key``: one per intended message (derive it with
        :func:`idempotency_key` from what makes it unique); without one a random key
        is made for this call and reused by its retries only.

        Returns:
            The decision (``allow``/``hold``/``quarantine``/``block``) with its steps.

        Raises:
            ValidationError: ``validation_failed``, ``header_injection``, or
                ``idempotency_key_reused`` (the key was used for another message).
        """
        return await self._transport.perform(
            calls.send(
                to=to,
                subject=subject,
                text=text,
                html=html,
                cc=cc,
                bcc=bcc,
                reply_to=reply_to,
                attachments=attachments,
                headers=headers,
                agent_id=agent_id,
                idempotency_key=idempotency_key,
            )
        )

    async def reply(
        self,
        message_id: str,
        *,
        text: str | None = None,
        html: str | None = None,
        reply_all: bool = False,
        attachments: Attachments = None,
        headers: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> OutboundResult:
        """Reply in the thread of ``message_id`` (see :meth:`send` for the key).

        Raises:
            NotFoundError: no such message visible to this key.
            ValidationError: as :meth:`send`.
        """
        return await self._transport.perform(
            calls.reply(
                message_id,
                text=text,
                html=html,
                reply_all=reply_all,
                attachments=attachments,
                headers=headers,
                idempotency_key=idempotency_key,
            )
        )

    async def forward(
        self,
        message_id: str,
        *,
        to: str | Sequence[str],
        subject: str = "",
        text: str | None = None,
        html: str | None = None,
        cc: str | Sequence[str] | None = None,
        bcc: str | Sequence[str] | None = None,
        attachments: Attachments = None,
        headers: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> OutboundResult:
        """Forward ``message_id`` (attached whole) to ``to`` (see :meth:`send`)."""
        return await self._transport.perform(
            calls.forward(
                message_id,
                to=to,
                subject=subject,
                text=text,
                html=html,
                cc=cc,
                bcc=bcc,
                attachments=attachments,
                headers=headers,
                idempotency_key=idempotency_key,
            )
        )

    async def aclose(self) -> None:
        """Close the connection pool (not an ``httpx_client`` that was passed in)."""
        await self._transport.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"AsyncMailgate(base_url={self.base_url!r})"
