"""Push webhooks (AgentMail's ``/v0/webhooks``): their CRUD and the engine that POSTs.

A webhook is a feed consumer that pushes. Each one owns the consumer
``webhook.<id>`` of its scope (its inbox's agent id, or ``"*"`` for a workspace
webhook), created with its cursor at the newest event so it receives what happens
after it exists. The engine leases from that consumer, turns each event into an
AgentMail frame (:mod:`mailgate.services.agentmail_events`), drops what the webhook
does not want (acked at once), and POSTs the rest signed per Standard Webhooks
(:mod:`mailgate.domain.standard_webhooks`). A 2xx acks; anything else nacks with a
backoff, and after ``feed_max_deliveries`` leases the feed dead-letters the event
(visible with ``GET /v1/events/dead``). Delivery is at least once: the
``webhook-id`` header is the event id, which receivers dedupe on.

Targets: ``http``/``https`` only, and unless ``webhook_allow_private_targets``, none
on loopback, private, link-local or otherwise non-public addresses, checked when the
webhook is created (literal addresses and ``localhost``) and again before every POST
(the host resolved, every address checked), so a webhook cannot be pointed at the
gateway's own network. The POST then connects to the address that was checked, with
the name in ``Host`` and in TLS SNI/certificate checks, so a name that resolves
differently a moment later (DNS rebinding) cannot redirect it. Redirects are not
followed, for the same reason.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import logging
import random
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import Connection, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from mailgate.clock import Clock
from mailgate.config import Settings
from mailgate.domain.keys import EVENTS_READ, MESSAGES_READ, Principal
from mailgate.domain.standard_webhooks import new_secret, signature_headers
from mailgate.errors import Conflict, NotFound, NotSupported, ValidationFailed
from mailgate.ids import new_id
from mailgate.services.agentmail_events import (
    MessageViews,
    agentmail_type,
    event_frame,
)
from mailgate.services.feed import SYSTEM_PREFIX, WORKSPACE_SCOPE, FeedService, LeasedEvent
from mailgate.store.db import Database
from mailgate.store.schema import consumers, events, webhooks

__all__ = [
    "EVENT_TYPES",
    "PushEngine",
    "PushOutcome",
    "WebhookPage",
    "WebhookRecord",
    "WebhookService",
    "check_target",
    "consumer_name",
    "retry_delay",
]

log = logging.getLogger(__name__)

EVENT_TYPES = frozenset(
    {
        "message.received", "message.received.spam", "message.received.blocked",
        "message.received.unauthenticated", "message.security.completed",
        "message.security.review", "message.security.override", "message.sent",
        "message.delivered", "message.bounced", "message.complained", "message.rejected",
        "message.opened", "domain.verified", "calendar.event.created",
        "calendar.event.updated", "calendar.event.deleted", "calendar.event.responded",
        "calendar.event.starting", "calendar.event.ending",
    }
)  # fmt: skip
"""AgentMail's event types: a webhook may name any of them (those we never emit simply
never fire); anything else is a typo and refused."""

MAX_INBOX_IDS = 100
_URL_MAX = 2000
_CLIENT_ID_MAX = 200
_BATCH = 20


@dataclass(frozen=True, slots=True)
class WebhookRecord:
    """A webhook as stored; ``inbox_agent_ids`` filters by our agent ids (None: every
    agent in scope), ``agent_id`` is set for an inbox's own webhook."""

    id: str
    workspace_id: str
    agent_id: str | None
    url: str
    event_types: tuple[str, ...] | None
    inbox_agent_ids: tuple[str, ...] | None
    secret: str
    enabled: bool
    client_id: str | None
    created_at: datetime
    updated_at: datetime

    @property
    def scope(self) -> str:
        """The feed scope its consumer reads."""
        return self.agent_id or WORKSPACE_SCOPE

    def wants(self, event: LeasedEvent) -> bool:
        """Whether this webhook is sent ``event`` (type and inbox filters)."""
        kind = agentmail_type(event.type)
        if kind is None:
            return False
        if self.event_types is not None and kind not in self.event_types:
            return False
        return self.inbox_agent_ids is None or event.agent_id in self.inbox_agent_ids


@dataclass(frozen=True, slots=True)
class WebhookPage:
    items: tuple[WebhookRecord, ...]
    count: int
    next_page_token: str | None


def consumer_name(webhook_id: str) -> str:
    """The feed consumer a webhook pushes from; clients cannot lease or settle it
    (see :data:`mailgate.services.feed.SYSTEM_PREFIX`)."""
    return f"{SYSTEM_PREFIX}{webhook_id}"


def retry_delay(attempt: int, *, base: float, cap: float, rand: Callable[[], float]) -> float:
    """Seconds before retry number ``attempt`` (1 = the first retry): exponential,
    capped, with "equal jitter" (half fixed, half random), so retries of many events
    spread out but never come back at once."""
    ceiling = min(cap, base * 2.0 ** max(attempt - 1, 0))
    return ceiling / 2 + rand() * ceiling / 2


def check_target(url: str, *, allow_private: bool) -> tuple[str, int]:
    """The host and port of a webhook URL, refusing what can never be a target.

    Without ``allow_private``, literal non-public addresses and ``localhost`` names
    are refused here; names are resolved (and checked) before each POST.

    Raises:
        ValidationFailed: not an absolute http(s) URL, or a non-public literal target.
    """
    if len(url) > _URL_MAX:
        raise _invalid("url", f"at most {_URL_MAX} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise _invalid("url", "not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _invalid("url", "must be an absolute http:// or https:// URL")
    if parts.username or parts.password:
        raise _invalid("url", "must not carry credentials")
    host = parts.hostname
    port = port or (443 if parts.scheme == "https" else 80)
    if not allow_private:
        lowered = host.lower().rstrip(".")
        if lowered == "localhost" or lowered.endswith(".localhost"):
            raise _invalid("url", "loopback targets are not allowed")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return host, port
        if not _public(address):
            raise _invalid("url", "private, loopback and link-local targets are not allowed")
    return host, port


def _public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return _public(address.ipv4_mapped)
    return address.is_global and not address.is_multicast


Resolve = Callable[[str, int], Awaitable[list[str]]]
"""(host, port) -> its addresses; raises OSError when it does not resolve."""


async def system_resolve(host: str, port: int) -> list[str]:
    """``host``'s addresses from the system resolver."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


async def resolve_public(host: str, port: int, resolve: Resolve = system_resolve) -> str:
    """The address to connect to for ``host``: every address it resolves to must be
    public (one private answer means the name is not trusted at all).

    Raises:
        OSError: it does not resolve, or resolves to a non-public address.
    """
    try:
        return str(ipaddress.ip_address(host))  # a literal, already checked
    except ValueError:
        pass
    addresses = await resolve(host, port)
    for address in addresses:
        if not _public(ipaddress.ip_address(address.split("%", 1)[0])):
            raise OSError(f"{host} resolves to a non-public address {address}")
    if not addresses:
        raise OSError(f"{host} does not resolve")
    return addresses[0]


# -- CRUD ---------------------------------------------------------------------------------


class WebhookService:
    """Webhook CRUD, one transaction each. Owner keys manage every webhook of their
    workspace; agent keys (``events:read``) manage their own inbox's webhooks and see
    no others (404, like any object outside a key's scope)."""

    def __init__(self, db: Database, clock: Clock, settings: Settings) -> None:
        self._db = db
        self._clock = clock
        self._settings = settings

    def create(
        self,
        principal: Principal,
        *,
        url: str,
        event_types: Sequence[str],
        inbox_agent_ids: Sequence[str] | None = None,
        agent_id: str | None = None,
        client_id: str | None = None,
    ) -> tuple[WebhookRecord, bool]:
        """A new webhook, or the one ``client_id`` already names (then False).

        ``agent_id`` makes it the inbox's own webhook; an agent key's webhooks always
        are. ``inbox_agent_ids`` (already resolved and checked by the caller) filter
        a workspace webhook.

        Raises:
            Forbidden: an agent key without ``events:read``.
            NotFound: an agent key naming another agent.
            ValidationFailed: bad url, event types or client_id.
            Conflict: ``client_id`` names a webhook the caller may not see.
        """
        principal.require(EVENTS_READ)
        if not principal.is_owner:
            if agent_id not in (None, principal.agent_id):
                raise NotFound(f"no inbox {agent_id}")
            agent_id = principal.agent_id
        check_target(url, allow_private=self._settings.webhook_allow_private_targets)
        types = _event_types(event_types, required=True)
        filters = _filter_ids(inbox_agent_ids)
        if client_id is not None and not 1 <= len(client_id) <= _CLIENT_ID_MAX:
            raise _invalid("client_id", f"must be 1-{_CLIENT_ID_MAX} characters")
        now = self._clock.now()
        row = {
            "id": new_id("whk"),
            "workspace_id": principal.workspace_id,
            "agent_id": agent_id,
            "url": url,
            "event_types": list(types) if types is not None else None,
            "inbox_ids": list(filters) if filters is not None else None,
            "secret": new_secret(),
            "enabled": True,
            "client_id": client_id,
            "created_at": now,
            "updated_at": now,
        }
        if client_id is not None:
            existing = self._by_client_id(principal, client_id)
            if existing is not None:
                return existing, False
        try:
            with self._db.write() as conn:
                conn.execute(insert(webhooks).values(row))
                _start_consumer(conn, principal.workspace_id, agent_id or WORKSPACE_SCOPE, row)
        except IntegrityError:  # a concurrent create with the same client_id won
            existing = self._by_client_id(principal, str(client_id))
            if client_id is None or existing is None:
                raise
            return existing, False
        return _record(row), True

    def get(
        self, principal: Principal, webhook_id: str, *, agent_id: str | None = None
    ) -> WebhookRecord:
        """Raises:
        Forbidden: an agent key without ``events:read``.
        NotFound: no such webhook visible to the caller (in inbox ``agent_id``).
        """
        principal.require(EVENTS_READ)
        with self._db.read() as conn:
            return self._find(conn, principal, webhook_id, agent_id)

    def list_webhooks(
        self,
        principal: Principal,
        *,
        agent_id: str | None = None,
        limit: int = 10,
        page_token: str | None = None,
        ascending: bool = False,
    ) -> WebhookPage:
        """The caller's webhooks (an inbox's when ``agent_id``), newest first unless
        ``ascending``.

        Raises:
            Forbidden: an agent key without ``events:read``.
            ValidationFailed: a page token not from this listing.
        """
        principal.require(EVENTS_READ)
        offset = _decode_token(page_token)
        where = [webhooks.c.workspace_id == principal.workspace_id]
        if not principal.is_owner:
            where.append(webhooks.c.agent_id == principal.agent_id)
        if agent_id is not None:
            where.append(webhooks.c.agent_id == agent_id)
        order = (webhooks.c.created_at, webhooks.c.id)
        ordered = order if ascending else tuple(c.desc() for c in order)
        with self._db.read() as conn:
            total = int(
                conn.execute(select(func.count()).select_from(webhooks).where(*where)).scalar_one()
            )
            rows = conn.execute(
                select(webhooks).where(*where).order_by(*ordered).offset(offset).limit(limit)
            ).all()
        more = offset + len(rows) < total
        token = _encode_token(offset + len(rows)) if more else None
        return WebhookPage(tuple(_record(r._mapping) for r in rows), total, token)

    def update(
        self,
        principal: Principal,
        webhook_id: str,
        *,
        agent_id: str | None = None,
        event_types: Sequence[str] | None = None,
        enabled: bool | None = None,
        add_inbox_agent_ids: Sequence[str] | None = None,
        remove_inbox_agent_ids: Sequence[str] | None = None,
    ) -> WebhookRecord:
        """Replace event types (when non-empty), switch ``enabled``, add/remove inbox
        filters (workspace webhooks only). Re-enabling starts from now: events that
        happened while disabled are not delivered.

        Raises:
            Forbidden: an agent key without ``events:read``.
            NotFound: no such webhook visible to the caller.
            ValidationFailed: bad event types, or inbox filters on an inbox webhook.
        """
        principal.require(EVENTS_READ)
        types = _event_types(event_types, required=False) if event_types else None
        now = self._clock.now()
        with self._db.write() as conn:
            current = self._find(conn, principal, webhook_id, agent_id)
            values: dict[str, Any] = {"updated_at": now}
            if types is not None:
                values["event_types"] = list(types)
            if add_inbox_agent_ids or remove_inbox_agent_ids:
                if current.agent_id is not None:
                    raise _invalid("add_inbox_ids", "an inbox webhook is fixed to its inbox")
                if current.inbox_agent_ids is None and add_inbox_agent_ids:
                    pass  # already every inbox: adding changes nothing (AgentMail's rule)
                else:
                    kept = [
                        a
                        for a in (current.inbox_agent_ids or ())
                        if a not in set(remove_inbox_agent_ids or ())
                    ]
                    kept += [a for a in add_inbox_agent_ids or () if a not in kept]
                    values["inbox_ids"] = list(_filter_ids(kept) or ())
            if enabled is not None:
                values["enabled"] = enabled
                if enabled and not current.enabled:
                    _restart_consumer(conn, current)
            conn.execute(update(webhooks).where(webhooks.c.id == current.id).values(values))
            return self._find(conn, principal, webhook_id, agent_id)

    def delete(self, principal: Principal, webhook_id: str, *, agent_id: str | None = None) -> None:
        """Delete the webhook and its consumer (pending deliveries go with it).

        Raises:
            Forbidden: an agent key without ``events:read``.
            NotFound: no such webhook visible to the caller.
        """
        principal.require(EVENTS_READ)
        with self._db.write() as conn:
            current = self._find(conn, principal, webhook_id, agent_id)
            _drop_consumer(conn, current)
            conn.execute(delete(webhooks).where(webhooks.c.id == current.id))

    def enabled(self) -> list[WebhookRecord]:
        """Every enabled webhook, of every workspace (the engine's work list)."""
        with self._db.read() as conn:
            rows = conn.execute(
                select(webhooks).where(webhooks.c.enabled.is_(True)).order_by(webhooks.c.id)
            ).all()
        return [_record(r._mapping) for r in rows]

    def _find(
        self, conn: Connection, principal: Principal, webhook_id: str, agent_id: str | None
    ) -> WebhookRecord:
        row = conn.execute(
            select(webhooks).where(
                webhooks.c.id == webhook_id, webhooks.c.workspace_id == principal.workspace_id
            )
        ).first()
        if row is None:
            raise NotFound(f"no webhook {webhook_id}")
        record = _record(row._mapping)
        visible = principal.is_owner or record.agent_id == principal.agent_id
        if not visible or (agent_id is not None and record.agent_id != agent_id):
            raise NotFound(f"no webhook {webhook_id}")
        return record

    def _by_client_id(self, principal: Principal, client_id: str) -> WebhookRecord | None:
        with self._db.read() as conn:
            row = conn.execute(
                select(webhooks).where(
                    webhooks.c.workspace_id == principal.workspace_id,
                    webhooks.c.client_id == client_id,
                )
            ).first()
        if row is None:
            return None
        record = _record(row._mapping)
        if not (principal.is_owner or record.agent_id == principal.agent_id):
            raise Conflict(f"client_id {client_id!r} is already used in this workspace")
        return record


def _start_consumer(conn: Connection, workspace_id: str, scope: str, row: dict[str, Any]) -> None:
    """The webhook's consumer, its cursor at the newest event: it gets what comes
    after, not the workspace's history."""
    newest = conn.execute(select(func.max(events.c.seq))).scalar()
    conn.execute(
        insert(consumers).values(
            id=new_id("con"),
            workspace_id=workspace_id,
            scope=scope,
            name=consumer_name(str(row["id"])),
            cursor_seq=int(newest or 0),
            created_at=row["created_at"],
        )
    )


def _drop_consumer(conn: Connection, record: WebhookRecord) -> None:
    conn.execute(
        delete(consumers).where(
            consumers.c.workspace_id == record.workspace_id,
            consumers.c.scope == record.scope,
            consumers.c.name == consumer_name(record.id),
        )
    )


def _restart_consumer(conn: Connection, record: WebhookRecord) -> None:
    """Forget what the webhook missed while disabled (AgentMail does not redeliver it)."""
    _drop_consumer(conn, record)
    _start_consumer(
        conn,
        record.workspace_id,
        record.scope,
        {"id": record.id, "created_at": record.created_at},
    )


def _record(row: Any) -> WebhookRecord:
    types = row["event_types"]
    inboxes = row["inbox_ids"]
    return WebhookRecord(
        id=str(row["id"]),
        workspace_id=str(row["workspace_id"]),
        agent_id=row["agent_id"],
        url=str(row["url"]),
        event_types=tuple(types) if types is not None else None,
        inbox_agent_ids=tuple(inboxes) if inboxes else None,
        secret=str(row["secret"]),
        enabled=bool(row["enabled"]),
        client_id=row["client_id"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _event_types(values: Sequence[str] | None, *, required: bool) -> tuple[str, ...] | None:
    """Raises:
    ValidationFailed: not a list, empty when ``required``, or an unknown type.
    """
    if values is None or isinstance(values, str):
        if required or isinstance(values, str):
            raise _invalid("event_types", "must be a list of event types")
        return None
    listed = list(dict.fromkeys(values))
    if required and not listed:
        raise _invalid("event_types", "must name at least one event type")
    unknown = [v for v in listed if v not in EVENT_TYPES]
    if unknown:
        raise _invalid("event_types", f"unknown event types: {', '.join(map(str, unknown))}")
    return tuple(listed)


def _filter_ids(values: Sequence[str] | None) -> tuple[str, ...] | None:
    if not values:
        return None
    listed = tuple(dict.fromkeys(values))
    if len(listed) > MAX_INBOX_IDS:
        raise _invalid("inbox_ids", f"at most {MAX_INBOX_IDS}")
    return listed


def _encode_token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"whk:{offset}".encode()).decode().rstrip("=")


def _decode_token(token: str | None) -> int:
    """Raises:
    ValidationFailed: not a token from this listing.
    """
    if not token:
        return 0
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        prefix, _, offset = raw.partition(":")
        if prefix == "whk" and offset.isdigit():
            return int(offset)
    except ValueError:
        pass
    raise _invalid("page_token", "not a page token from this listing")


def _invalid(field: str, message: str) -> ValidationFailed:
    return ValidationFailed(f"{field}: {message}", errors=[{"field": field, "message": message}])


# -- the push engine ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PushOutcome:
    """What one drain of one webhook did (tests and the bench read it)."""

    webhook_id: str
    posted: int = 0
    acked: int = 0
    failed: int = 0
    skipped: int = 0


Post = Callable[[str, bytes, dict[str, str], str | None], Awaitable[int]]
"""POST (url, body, headers, connect_to) -> status code; raises on a network failure.
``connect_to``, when set, is the address to connect to instead of resolving the URL's
host again."""


class PushEngine:
    """Drains webhooks' consumers: lease, translate, filter, POST, ack or nack.

    Each webhook is drained by its own task (see :mod:`mailgate.workers.push`), so a
    slow receiver holds back only itself. Database work runs in worker threads.
    """

    def __init__(
        self,
        db: Database,
        feed: FeedService,
        settings: Settings,
        clock: Clock,
        views: MessageViews,
        post: Post,
        *,
        rand: Callable[[], float] = random.random,
        resolve: Resolve = system_resolve,
    ) -> None:
        self._db = db
        self._feed = feed
        self._settings = settings
        self._clock = clock
        self._views = views
        self._post = post
        self._rand = rand
        self._resolve = resolve
        self.service = WebhookService(db, clock, settings)

    @property
    def lease_seconds(self) -> float:
        """Long enough for a whole batch of POSTs to time out, so a live lease is never
        taken over by a second puller mid-delivery."""
        wanted = self._settings.webhook_timeout_seconds * 2 + 30
        return min(wanted, self._settings.feed_max_lease_seconds)

    async def drain(self, webhook: WebhookRecord) -> PushOutcome:
        """Deliver what is deliverable now for ``webhook``, batch after batch."""
        outcome = PushOutcome(webhook.id)
        while True:
            batch = await asyncio.to_thread(
                self._feed.lease,
                webhook.workspace_id,
                webhook.scope,
                consumer_name(webhook.id),
                limit=_BATCH,
                lease_seconds=self.lease_seconds,
                system=True,
            )
            if not batch:
                return outcome
            outcome = await self._deliver_batch(webhook, batch, outcome)

    async def _deliver_batch(
        self, webhook: WebhookRecord, batch: list[LeasedEvent], outcome: PushOutcome
    ) -> PushOutcome:
        wanted = [e for e in batch if webhook.wants(e)]
        frames = await asyncio.to_thread(self._frames, webhook, wanted) if wanted else {}
        done = [e.event_id for e in batch if e.event_id not in frames]
        results = await asyncio.gather(
            *(self._send(webhook, event_id, frame) for event_id, frame in frames.items())
        )
        failed = [(e, ok) for e, ok in zip(frames, results, strict=True) if not ok]
        done += [e for e, ok in zip(frames, results, strict=True) if ok]
        counts = {e.event_id: e.delivery_count for e in batch}
        if done:
            await asyncio.to_thread(
                self._feed.ack,
                webhook.workspace_id,
                webhook.scope,
                consumer_name(webhook.id),
                done,
                system=True,
            )
        for event_id, _ in failed:
            delay = retry_delay(
                counts[event_id],
                base=self._settings.webhook_retry_base_seconds,
                cap=self._settings.webhook_retry_max_seconds,
                rand=self._rand,
            )
            await asyncio.to_thread(
                self._feed.nack,
                webhook.workspace_id,
                webhook.scope,
                consumer_name(webhook.id),
                [event_id],
                delay_seconds=min(delay, self._settings.feed_max_lease_seconds),
                system=True,
            )
        return replace(
            outcome,
            posted=outcome.posted + len(frames),
            acked=outcome.acked + len(frames) - len(failed),
            failed=outcome.failed + len(failed),
            skipped=outcome.skipped + len(batch) - len(frames),
        )

    def _frames(self, webhook: WebhookRecord, wanted: list[LeasedEvent]) -> dict[str, bytes]:
        """Each wanted event's JSON body, in lease order; events with no frame (the
        message is gone) are left out, so they are acked unsent."""
        reader: Principal | str = webhook.workspace_id
        if webhook.agent_id is not None:
            reader = Principal(
                workspace_id=webhook.workspace_id,
                key_id="system:push",
                kind="agent",
                agent_id=webhook.agent_id,
                scopes=(MESSAGES_READ,),
            )
        out: dict[str, bytes] = {}
        with self._db.read() as conn:
            for event in wanted:
                frame = event_frame(conn, self._views, reader, event)
                if frame is not None:
                    out[event.event_id] = json.dumps(frame, separators=(",", ":")).encode()
        return out

    async def _send(self, webhook: WebhookRecord, event_id: str, body: bytes) -> bool:
        """POST one frame; True on a 2xx."""
        try:
            host, port = check_target(
                webhook.url, allow_private=self._settings.webhook_allow_private_targets
            )
            connect_to = None
            if not self._settings.webhook_allow_private_targets:
                connect_to = await resolve_public(host, port, self._resolve)
            timestamp = int(self._clock.now().timestamp())
            headers = signature_headers(webhook.secret, event_id, timestamp, body)
            headers["content-type"] = "application/json"
            status = await self._post(webhook.url, body, headers, connect_to)
        except (OSError, ValidationFailed, httpx.HTTPError) as exc:
            log.warning("webhook %s: %s failed: %s", webhook.id, event_id, exc)
            return False
        if not 200 <= status < 300:
            log.info("webhook %s: %s answered %d", webhook.id, event_id, status)
        return 200 <= status < 300


def httpx_post(client: httpx.AsyncClient) -> Post:
    """The engine's POST over ``client`` (redirects are not followed).

    With ``connect_to``, the connection goes to that address while the request still
    names the URL's host: in ``Host``, and for https in SNI and the certificate check.
    """

    async def post(url: str, body: bytes, headers: dict[str, str], connect_to: str | None) -> int:
        target = httpx.URL(url)
        extensions: dict[str, str] = {}
        if connect_to is not None:
            headers = {**headers, "host": target.netloc.decode("ascii")}
            if target.scheme == "https":
                extensions["sni_hostname"] = target.host
            target = target.copy_with(host=connect_to)
        response = await client.post(
            target, content=body, headers=headers, follow_redirects=False, extensions=extensions
        )
        return response.status_code

    return post


def refuse_unsupported(**fields: object) -> None:
    """AgentMail webhook fields this gateway has no counterpart for (pods, custom
    delivery headers): refusing beats silently ignoring them.

    Raises:
        NotSupported: a non-empty one was given.
    """
    used = sorted(name for name, value in fields.items() if value)
    if used:
        raise NotSupported(f"webhook {', '.join(used)} are not supported by this gateway")
