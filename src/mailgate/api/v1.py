"""Routes of the native API (``/v1``) and the health probes.

Each route parses its input, calls one service and maps the result; errors become
problems in :mod:`mailgate.api.errors`. Authorisation lives in the services: the query
service checks scopes and pins every read to the caller's tenant itself, while the
feed service trusts the scope it is given, so the event routes derive that scope from
the key (:func:`_feed_scope`) and never from the request.

Routes that only touch the database are plain ``def`` so FastAPI runs them in its
threadpool; the long-poll is ``async`` so a waiting consumer holds no thread.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Query, Response

from mailgate.api.auth import PrincipalDep, RuntimeDep
from mailgate.api.errors import PROBLEM_JSON, PROBLEM_RESPONSES, Problem
from mailgate.api.schemas import (
    DEFAULT_CONSUMER,
    AckIn,
    AckOut,
    AttachmentTextOut,
    DeadLetterList,
    DeadLetterOut,
    EventList,
    EventOut,
    ExtendIn,
    ExtendOut,
    Folder,
    Health,
    MessageList,
    MessageOut,
    MessageSummaryOut,
    NackIn,
    NackOut,
    ThreadDetailOut,
    ThreadList,
    ThreadOut,
)
from mailgate.domain.keys import EVENTS_ACK, EVENTS_READ, Principal
from mailgate.errors import ValidationFailed
from mailgate.runtime import Runtime
from mailgate.services.extraction import ExtractionService
from mailgate.services.feed import WORKSPACE_SCOPE
from mailgate.services.queries import DEFAULT_LIMIT, MAX_LIMIT, MessageFilter

router = APIRouter(prefix="/v1", responses=PROBLEM_RESPONSES)
ops = APIRouter(tags=["operations"])

Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description=f"Page size, 1..{MAX_LIMIT}.")]
Cursor = Annotated[
    str | None,
    Query(max_length=512, description="`next_cursor` of the previous page; omit for the first."),
]
AgentFilter = Annotated[
    str | None, Query(max_length=40, description="Only this agent's objects (owner keys).")
]
MaxChars = Annotated[
    int | None,
    Query(
        ge=1,
        description="Most characters of extracted text to return; capped at the "
        "gateway's `extract_max_chars`. Longer text is cut and flagged `truncated`.",
    ),
]

_BINARY = {"schema": {"type": "string", "format": "binary"}}

# Headers for bytes that came from strangers: never rendered by a browser in our origin.
_UNTRUSTED_BYTES_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; sandbox",
    "Cache-Control": "private, no-store",
}


# -- messages ---------------------------------------------------------------------------


@router.get("/messages", tags=["messages"])
def list_messages(
    runtime: RuntimeDep,
    principal: PrincipalDep,
    folder: Folder | None = None,
    thread_id: Annotated[str | None, Query(max_length=40)] = None,
    from_: Annotated[
        str | None,
        Query(alias="from", max_length=320, description="Sender address, case-insensitive."),
    ] = None,
    since: Annotated[
        datetime | None,
        Query(description="Only messages received at or after this time (UTC if naive)."),
    ] = None,
    agent_id: AgentFilter = None,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> MessageList:
    """Messages visible to the key, newest first."""
    filters = MessageFilter(
        folder=folder, thread_id=thread_id, from_address=from_, since=since, agent_id=agent_id
    )
    page = runtime.queries.list_messages(principal, filters, limit=limit, cursor=cursor)
    return MessageList(
        messages=[MessageSummaryOut.of(m) for m in page.items], next_cursor=page.next_cursor
    )


@router.get("/messages/{message_id}", tags=["messages"])
def get_message(
    runtime: RuntimeDep, principal: PrincipalDep, message_id: str, max_chars: MaxChars = None
) -> MessageOut:
    """One message with its parsed fields, envelope and attachment list, plus what an
    agent reads: the new text (`extracted_text`) and the quote-free, sanitised HTML."""
    extraction = _extraction(runtime)
    budget = extraction.budget(max_chars)  # a bad budget fails before any read
    detail = runtime.queries.get_message(principal, message_id)
    return MessageOut.of_detail(detail, extraction.message_extract(detail, max_chars=budget))


@router.get(
    "/messages/{message_id}/raw",
    tags=["messages"],
    response_class=Response,
    responses={200: {"content": {"message/rfc822": _BINARY}, "description": "Raw MIME"}},
)
def get_raw_message(runtime: RuntimeDep, principal: PrincipalDep, message_id: str) -> Response:
    """The message byte for byte as it arrived (headers, signatures and all)."""
    raw = runtime.queries.get_raw(principal, message_id)
    headers = {
        **_UNTRUSTED_BYTES_HEADERS,
        "Content-Disposition": content_disposition(f"{message_id}.eml"),
    }
    return Response(raw, media_type="message/rfc822", headers=headers)


@router.get(
    "/messages/{message_id}/attachments/{attachment_id}",
    tags=["messages"],
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": _BINARY}, "description": "Bytes"}},
)
def get_attachment(
    runtime: RuntimeDep, principal: PrincipalDep, message_id: str, attachment_id: str
) -> Response:
    """An attachment's bytes, always as a download (never rendered inline)."""
    found = runtime.queries.get_attachment(principal, message_id, attachment_id)
    headers = {
        **_UNTRUSTED_BYTES_HEADERS,
        # Set directly, not as media_type: Starlette would append its own charset to
        # text/* types and mislabel the sender's bytes.
        "Content-Type": safe_content_type(found.info.content_type),
        "Content-Disposition": content_disposition(found.info.filename),
    }
    return Response(found.data, headers=headers)


@router.get("/messages/{message_id}/attachments/{attachment_id}/text", tags=["messages"])
def get_attachment_text(
    runtime: RuntimeDep,
    principal: PrincipalDep,
    message_id: str,
    attachment_id: str,
    max_chars: MaxChars = None,
) -> AttachmentTextOut:
    """The text of a PDF, DOCX, HTML or text attachment; other types (and files over
    the size limit) are described by type only, with a `reason`."""
    found = _extraction(runtime).attachment_extract(
        principal, message_id, attachment_id, max_chars=max_chars
    )
    return AttachmentTextOut.of_text(attachment_id, found)


def _extraction(runtime: Runtime) -> ExtractionService:
    service = getattr(runtime, "extraction", None)
    if isinstance(service, ExtractionService):
        return service
    return ExtractionService(runtime.queries, runtime.settings)


# -- threads ----------------------------------------------------------------------------


@router.get("/threads", tags=["threads"])
def list_threads(
    runtime: RuntimeDep,
    principal: PrincipalDep,
    agent_id: AgentFilter = None,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> ThreadList:
    """Threads visible to the key, most recently active first."""
    page = runtime.queries.list_threads(principal, agent_id=agent_id, limit=limit, cursor=cursor)
    return ThreadList(threads=[ThreadOut.of(t) for t in page.items], next_cursor=page.next_cursor)


@router.get("/threads/{thread_id}", tags=["threads"])
def get_thread(runtime: RuntimeDep, principal: PrincipalDep, thread_id: str) -> ThreadDetailOut:
    """A thread with all its messages, oldest first."""
    return ThreadDetailOut.of_detail(runtime.queries.get_thread(principal, thread_id))


# -- events -----------------------------------------------------------------------------

Consumer = Annotated[
    str, Query(max_length=200, description="Consumer name; each has its own leases and acks.")
]


def _feed_scope(principal: Principal, needed: str) -> str:
    """The feed scope a key reads: its own agent, or the whole workspace for owners.

    Raises:
        Forbidden: the key lacks ``needed``.
    """
    principal.require(needed)
    return WORKSPACE_SCOPE if principal.is_owner else str(principal.agent_id)


@router.get("/events", tags=["events"])
async def pull_events(
    runtime: RuntimeDep,
    principal: PrincipalDep,
    consumer: Consumer = DEFAULT_CONSUMER,
    limit: Annotated[int, Query(ge=1, description="Most events to lease.")] = 10,
    wait: Annotated[
        float, Query(ge=0, description="Long-poll: seconds to wait while nothing is ready.")
    ] = 0,
    lease_seconds: Annotated[
        float | None, Query(gt=0, description="How long the events stay hidden from others.")
    ] = None,
) -> EventList:
    """Lease the next events (ack each once its side effects are done).

    ``async``: a long-poll waits on the feed's wake-up signal in the event loop and
    holds no worker thread while it waits.
    """
    scope = _feed_scope(principal, EVENTS_READ)
    try:
        leased = await runtime.feed.pull(
            principal.workspace_id,
            scope,
            consumer,
            limit=limit,
            lease_seconds=lease_seconds or runtime.settings.feed_lease_seconds,
            wait_seconds=wait,
        )
    except ValidationFailed as exc:
        raise _renamed(exc, {"wait_seconds": "wait"}) from None
    return EventList(events=[EventOut.of(e) for e in leased])


def _renamed(exc: ValidationFailed, names: dict[str, str]) -> ValidationFailed:
    """``exc`` with its fields named as this route's parameters (the service's keyword
    names can differ from them), so a client can point at what it sent."""
    errors = [
        {**e, "field": names.get(e.get("field", ""), e.get("field", ""))}
        for e in exc.extra.get("errors", [])
    ]
    return ValidationFailed(exc.detail, **{**exc.extra, "errors": errors})


@router.post("/events/ack", tags=["events"])
def ack_events(runtime: RuntimeDep, principal: PrincipalDep, body: AckIn) -> AckOut:
    """Mark events done for the consumer; idempotent."""
    scope = _feed_scope(principal, EVENTS_ACK)
    result = runtime.feed.ack(principal.workspace_id, scope, body.consumer, body.event_ids)
    return AckOut.of(result)


@router.post("/events/nack", tags=["events"])
def nack_events(runtime: RuntimeDep, principal: PrincipalDep, body: NackIn) -> NackOut:
    """Give events back for redelivery, optionally after a delay."""
    scope = _feed_scope(principal, EVENTS_ACK)
    result = runtime.feed.nack(
        principal.workspace_id,
        scope,
        body.consumer,
        body.event_ids,
        delay_seconds=body.delay_seconds,
    )
    return NackOut.of(result)


@router.post("/events/extend", tags=["events"])
def extend_leases(runtime: RuntimeDep, principal: PrincipalDep, body: ExtendIn) -> ExtendOut:
    """Extend live leases (a heartbeat for work that outlasts its lease)."""
    scope = _feed_scope(principal, EVENTS_ACK)
    result = runtime.feed.extend(
        principal.workspace_id,
        scope,
        body.consumer,
        body.event_ids,
        lease_seconds=body.lease_seconds,
    )
    return ExtendOut.of(result)


@router.get("/events/dead", tags=["events"])
def list_dead_letters(
    runtime: RuntimeDep,
    principal: PrincipalDep,
    consumer: Annotated[str | None, Query(max_length=200)] = None,
    scope: Annotated[
        str | None, Query(max_length=40, description="An agent id, or `*` for owner consumers.")
    ] = None,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> DeadLetterList:
    """Events consumers gave up on after too many deliveries (owner keys only)."""
    principal.require_owner()
    page = runtime.feed.dead_letters(
        principal.workspace_id, consumer=consumer, scope=scope, limit=limit, cursor=cursor
    )
    return DeadLetterList(
        events=[DeadLetterOut.of(d) for d in page.items], next_cursor=page.next_cursor
    )


# -- operations -------------------------------------------------------------------------


@ops.get("/healthz")
async def healthz() -> Health:
    """The process is up and serving (touches nothing else: a liveness probe)."""
    return Health()


_NOT_READY: dict[int | str, dict[str, Any]] = {
    503: {
        "model": Problem,
        "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        "description": "Not ready",
    }
}


@ops.get("/readyz", responses=_NOT_READY)
def readyz(runtime: RuntimeDep) -> Health:
    """The database answers and its schema is current: safe to route traffic here."""
    runtime.queries.check_ready()
    return Health()


# -- header helpers ---------------------------------------------------------------------

_MEDIA_TYPE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}$")
# RFC 5987 attr-char: what may stand unencoded in ``filename*``.
_ATTR_CHARS = "!#$&+-.^_`|~"
_FALLBACK_UNSAFE = re.compile(r'[^\x20-\x7e]|["\\%;]')


def safe_content_type(value: str) -> str:
    """The sender's media type if it is a plain ``type/subtype``, else octet-stream
    (parameters and anything header-like are dropped: they come from a stranger)."""
    media = value.split(";", 1)[0].strip().lower()
    return media if _MEDIA_TYPE.match(media) else "application/octet-stream"


def content_disposition(filename: str | None) -> str:
    """``attachment`` with the name encoded per RFC 6266 / RFC 8187 (``filename*``) and
    an ASCII ``filename`` fallback for old clients.

    The name is reduced to its last path segment and stripped of control and format
    characters, so it cannot inject header text or steer where a client saves it.
    """
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C").strip(" .")
    name = name[:200] or "attachment"
    fallback = _FALLBACK_UNSAFE.sub("_", name)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe=_ATTR_CHARS)}"
