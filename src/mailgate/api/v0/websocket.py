"""The ``/v0`` websocket: AgentMail's live event stream.

A client authenticates with ``?api_key=`` or an ``Authorization: Bearer`` header,
sends ``{"type": "subscribe", "event_types", "inbox_ids", "pod_ids"}`` and gets
``{"type": "subscribed", ...}`` echoing its filters, then one frame per event
(:mod:`mailgate.services.agentmail_events`) committed after the subscription, as
the key may see them (an agent key: its own inbox; an owner key: the workspace).
A new ``subscribe`` replaces the filters. A bad key is told so in an error frame
(``UnauthorizedError``) and the socket closes with 1008; a malformed frame gets an
error frame and the connection stays open.

The stream tails the ``events`` table from its newest ``seq`` at subscription time;
it is live, not durable: what happens while no socket is open is not replayed (use
a webhook or the native feed for that). It wakes on this process's commits and
re-checks every ``websocket_poll_seconds`` for other processes' writes. On
PostgreSQL a ``seq`` may commit after a higher one; the tail re-reads a short window
below its position so such an event is still sent, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from sqlalchemy import Connection, func, select

from mailgate.api.v0.common import find_inbox
from mailgate.domain.keys import Principal
from mailgate.errors import MailgateError, NotFound, Unauthorized
from mailgate.runtime import Runtime
from mailgate.services.agentmail import AgentMailViews
from mailgate.services.agentmail_events import StoredEvent, agentmail_type, event_frame
from mailgate.services.webhooks import EVENT_TYPES
from mailgate.store.schema import events

router = APIRouter()
"""Mounted at the root: the path is ``/v0`` itself."""

log = logging.getLogger(__name__)

_BATCH = 100
_REORDER_WINDOW = 1000
"""How far below its position the tail looks for late commits (PostgreSQL)."""


@dataclass
class _Subscription:
    event_types: frozenset[str] | None = None
    agent_ids: frozenset[str] | None = None
    position: int = 0
    start: int = 0  # the newest seq when subscribing: nothing at or below it is sent
    seen: set[int] = field(default_factory=set)

    def wants(self, event: StoredEvent) -> bool:
        kind = agentmail_type(event.type)
        if kind is None:
            return False
        if self.event_types is not None and kind not in self.event_types:
            return False
        return self.agent_ids is None or event.agent_id in self.agent_ids


@router.websocket("/v0")
async def stream(websocket: WebSocket) -> None:
    """AgentMail's websocket: subscribe, then receive event frames."""
    runtime: Runtime = websocket.app.state.runtime
    await websocket.accept()
    token = websocket.query_params.get("api_key") or _bearer(websocket)
    try:
        if not token:
            raise Unauthorized("an api_key query parameter or a bearer header is required")
        principal = await asyncio.to_thread(runtime.tenancy.authenticate, token)
    except Unauthorized as exc:
        await _error(websocket, "UnauthorizedError", exc.detail)
        await websocket.close(code=1008)
        return
    views = runtime.agentmail
    session = _Session(runtime, websocket, principal, views)
    await session.run()


def _bearer(websocket: WebSocket) -> str | None:
    scheme, _, value = websocket.headers.get("authorization", "").partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


async def _error(websocket: WebSocket, name: str, message: str) -> None:
    await websocket.send_json({"type": "error", "name": name, "message": message})


class _Session:
    """One connection: a reader of client frames and, once subscribed, a tail."""

    def __init__(
        self, runtime: Runtime, websocket: WebSocket, principal: Principal, views: AgentMailViews
    ) -> None:
        self.runtime = runtime
        self.websocket = websocket
        self.principal = principal
        self.views = views
        self.subscription: _Subscription | None = None
        self.subscribed = asyncio.Event()
        self.send_lock = asyncio.Lock()

    async def run(self) -> None:
        tail = asyncio.create_task(self._tail())
        try:
            await self._read()
        finally:
            tail.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await tail

    async def _send(self, frame: dict[str, Any]) -> None:
        async with self.send_lock:
            await self.websocket.send_text(json.dumps(frame, separators=(",", ":")))

    async def _read(self) -> None:
        """Client frames until the client goes away."""
        while True:
            try:
                message = await self.websocket.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if message["type"] == "websocket.disconnect":
                return
            try:
                text = message.get("text")
                if text is None:
                    raise ValueError("frames are JSON text, not binary")
                frame = json.loads(text)
                if not isinstance(frame, dict) or frame.get("type") != "subscribe":
                    raise ValueError('expected {"type": "subscribe", ...}')
                subscription = await asyncio.to_thread(self._subscription, frame)
            except ValueError as exc:
                await self._send({"type": "error", "name": "ValidationError", "message": str(exc)})
                continue
            except MailgateError as exc:
                name = "NotFoundError" if isinstance(exc, NotFound) else "ValidationError"
                await self._send({"type": "error", "name": name, "message": exc.detail})
                continue
            self.subscription = subscription
            self.subscribed.set()
            await self._send(
                {
                    "type": "subscribed",
                    "event_types": frame.get("event_types"),
                    "inbox_ids": frame.get("inbox_ids"),
                    "pod_ids": frame.get("pod_ids"),
                }
            )

    def _subscription(self, frame: dict[str, Any]) -> _Subscription:
        """Filters checked and resolved, positioned at the newest event.

        Raises:
            ValueError: malformed filters, unknown event types, or pods.
            NotFound: an inbox the key may not see.
        """
        types = _strings(frame.get("event_types"), "event_types")
        inboxes = _strings(frame.get("inbox_ids"), "inbox_ids")
        if _strings(frame.get("pod_ids"), "pod_ids"):
            raise ValueError("pod_ids: pods are not supported by this gateway")
        unknown = sorted(set(types or ()) - EVENT_TYPES)
        if unknown:
            raise ValueError(f"event_types: unknown event types: {', '.join(unknown)}")
        with self.runtime.db.read() as conn:
            agent_ids = None
            if inboxes:
                agent_ids = frozenset(find_inbox(conn, self.principal, i).agent_id for i in inboxes)
            position = int(conn.execute(select(func.max(events.c.seq))).scalar() or 0)
        return _Subscription(frozenset(types) if types else None, agent_ids, position, position)

    async def _tail(self) -> None:
        """Send frames for new events while subscribed."""
        await self.subscribed.wait()
        poll = self.runtime.settings.websocket_poll_seconds
        with self.runtime.notifier.listen(self.principal.workspace_id) as listener:
            while not self.runtime.notifier.closed:
                listener.clear()
                subscription = self.subscription
                assert subscription is not None
                frames = await asyncio.to_thread(self._next_frames, subscription)
                for frame in frames:
                    await self._send(frame)
                if not frames:
                    await listener.wait(poll)
        with contextlib.suppress(Exception):
            await self.websocket.close(code=1001)  # the gateway is shutting down

    def _next_frames(self, subscription: _Subscription) -> list[dict[str, Any]]:
        """Frames for events past the subscription's position (and late commits in the
        window below it), advancing it."""
        with self.runtime.db.read() as conn:
            rows = self._rows(conn, subscription)
            frames: list[dict[str, Any]] = []
            for event in rows:
                subscription.seen.add(event.seq)
                subscription.position = max(subscription.position, event.seq)
                if not subscription.wants(event):
                    continue
                frame = event_frame(conn, self.views, self.principal, event)
                if frame is not None:
                    frames.append(frame)
        floor = subscription.position - _REORDER_WINDOW
        subscription.seen = {s for s in subscription.seen if s > floor}
        return frames

    def _rows(self, conn: Connection, subscription: _Subscription) -> list[StoredEvent]:
        query = select(
            events.c.seq,
            events.c.id,
            events.c.workspace_id,
            events.c.type,
            events.c.created_at,
            events.c.agent_id,
            events.c.thread_id,
            events.c.payload,
        ).where(events.c.workspace_id == self.principal.workspace_id)
        if not self.principal.is_owner:
            query = query.where(events.c.agent_id == self.principal.agent_id)
        low = subscription.position
        if not self.runtime.db.is_sqlite:  # late commits below the position
            low = max(subscription.position - _REORDER_WINDOW, subscription.start)
        limit = _BATCH + len(subscription.seen)
        rows = conn.execute(
            query.where(events.c.seq > low).order_by(events.c.seq).limit(limit)
        ).all()
        return [
            StoredEvent(
                seq=int(r.seq),
                event_id=str(r.id),
                workspace_id=str(r.workspace_id),
                type=str(r.type),
                created_at=r.created_at,
                agent_id=r.agent_id,
                thread_id=r.thread_id,
                payload=dict(r.payload),
            )
            for r in rows
            if int(r.seq) not in subscription.seen
        ][:_BATCH]


def _strings(value: Any, name: str) -> list[str] | None:
    """Raises:
    ValueError: not null and not a list of strings.
    """
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name}: must be a list of strings")
    return [str(v) for v in value]
