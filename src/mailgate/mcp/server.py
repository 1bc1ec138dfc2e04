"""The agent's tools as an MCP server, in process over the service layer.

Every tool is an edge like an HTTP route: it resolves who is calling, calls one
service, and maps the result or error. The services do the rest, exactly as for
``/v1``: :class:`~mailgate.domain.keys.Principal` scopes, tenant and agent isolation
(another agent's message is ``not_found``), the outbound policy gateway and its
idempotency store. So the MCP face can never see or do more than the same key over
HTTP.

Who is calling comes from a :data:`PrincipalResolver`: over stdio it authenticates
the key the process was started with (on every call, so a revoked key stops working
at once); over HTTP it reads the principal the bearer check at the door put on the
request (:mod:`mailgate.mcp.http`).

Results are JSON: ``structuredContent`` (with an ``outputSchema`` per tool) and the
same JSON as text for clients that only read text. They are bounded for a model's
context: lists are paged with the API's limits and message bodies are cut at
``extract_max_chars``. A :class:`~mailgate.errors.MailgateError` becomes a tool
error (``isError``) whose text starts with the stable ``code`` and whose
``structuredContent`` is ``{"error": {"code", "detail", ...}}``.

Tools run as plain functions: the SDK runs them in a worker thread, so the database
work never blocks the event loop (as FastAPI does for ``def`` routes).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import version
from typing import Annotated, Any

from mcp.server.mcpserver import Context, MCPServer
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, Field, ValidationError
from starlette.requests import Request

from mailgate.api.outbound import ReplyBody, SendBody
from mailgate.api.schemas import (
    AckOut,
    AddressOut,
    AttachmentOut,
    EventList,
    EventOut,
    MessageSummaryOut,
    ThreadList,
    ThreadOut,
)
from mailgate.domain import compose
from mailgate.domain.extract import reply_text
from mailgate.domain.keys import EVENTS_ACK, EVENTS_READ, Principal
from mailgate.errors import MailgateError, Unauthorized, ValidationFailed
from mailgate.runtime import Runtime
from mailgate.services.feed import WORKSPACE_SCOPE
from mailgate.services.outbound import Submitted
from mailgate.services.queries import MAX_LIMIT, MessageDetail
from mailgate.services.search import MAX_QUERY_CHARS

PrincipalResolver = Callable[[Request | None], Principal]
"""Who is calling, from the HTTP request that carried the tool call (None on stdio).

Raises:
    Unauthorized: no usable key (the call becomes an ``invalid_api_key`` tool error).
"""

DEFAULT_CONSUMER = "mcp"
"""The feed consumer ``list_events``/``ack_events`` use unless told otherwise: its own
leases and acks, apart from an SDK or webhook consumer of the same agent."""

DEFAULT_PAGE = 20
"""Default page size of the listing tools: a model reads every row it is given."""

_READ = ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False)
_LEASE = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False)
_ACK = ToolAnnotations(
    read_only_hint=False, destructive_hint=False, idempotent_hint=True, open_world_hint=False
)
_SEND = ToolAnnotations(
    read_only_hint=False, destructive_hint=False, idempotent_hint=True, open_world_hint=True
)

INSTRUCTIONS = """\
You act as one mailgate agent: a mailbox with its own address. Read with list_threads,
read_message and search_messages; learn about new mail with list_events and ack each
event once you have handled it. Send with reply or send: both need an idempotency_key
(a fresh UUID per intended message; reuse it only to retry the same message). Outbound
mail passes the owner's policy, so the answer is a decision (allow, hold, quarantine,
block) with reasons, not a promise of delivery. Errors start with a stable code such as
not_found or idempotency_key_required."""


# -- result shapes ----------------------------------------------------------------------


class MessageRead(MessageSummaryOut):
    """One message for a model to read: the parsed headers, the text body and just the
    new text of a reply, both bounded, and what is attached (not the bytes)."""

    reply_to: list[AddressOut]
    rfc_message_id: str = Field(description="The `Message-ID:` (generated when absent).")
    in_reply_to: str | None
    references: list[str]
    text: str | None = Field(description="The text body, cut at the extraction budget.")
    text_truncated: bool
    extracted_text: str | None = Field(
        description="The new text of the message, quoted history and signature removed "
        "(from the HTML body when there is no text), cut at the extraction budget; read "
        "this first. Null when the message has no body."
    )
    extracted_truncated: bool
    has_html: bool = Field(description="The message also has an HTML body (not included).")
    attachments: list[AttachmentOut]


class SearchResults(BaseModel):
    query: str
    messages: list[MessageSummaryOut] = Field(description="Newest first.")


# -- bounding ---------------------------------------------------------------------------


def _cut(text: str, max_chars: int) -> tuple[str, bool]:
    return (text, False) if len(text) <= max_chars else (text[:max_chars], True)


def _message_read(detail: MessageDetail, max_chars: int) -> MessageRead:
    text, text_truncated = (None, False) if detail.text is None else _cut(detail.text, max_chars)
    extracted = reply_text(detail.text, detail.html, max_chars=max_chars)
    summary = MessageSummaryOut.of(detail.summary).model_dump()
    return MessageRead.model_validate(
        {
            **summary,
            "reply_to": detail.reply_to,
            "rfc_message_id": detail.rfc_message_id,
            "in_reply_to": detail.in_reply_to,
            "references": detail.references,
            "text": text,
            "text_truncated": text_truncated,
            "extracted_text": extracted.text,
            "extracted_truncated": extracted.truncated,
            "has_html": bool(detail.html),
            "attachments": detail.attachments,
        }
    )


# -- results and errors -----------------------------------------------------------------

_Result = BaseModel | dict[str, Any]


def _ok(value: _Result) -> CallToolResult:
    data = value.model_dump(mode="json", by_alias=True) if isinstance(value, BaseModel) else value
    text = json.dumps(data, separators=(",", ":"), default=str)
    return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=data)


def tool_error(exc: MailgateError) -> CallToolResult:
    """A tool error naming the stable ``code`` first, as text and as structured data."""
    error = json.loads(
        json.dumps(
            {
                **exc.extra,
                "code": exc.code,
                "detail": exc.detail,
                "retryable": exc.retryable,
            },
            default=str,
        )
    )
    return CallToolResult(
        content=[TextContent(type="text", text=f"{exc.code}: {exc.detail}")],
        structured_content={"error": error},
        is_error=True,
    )


def _validation_failed(exc: ValidationError) -> ValidationFailed:
    """A body model's complaint in the services' shape (``errors`` naming each field)."""
    errors = [
        {"field": ".".join(str(p) for p in e["loc"]) or "arguments", "message": e["msg"]}
        for e in exc.errors()
    ]
    fields = ", ".join(dict.fromkeys(e["field"] for e in errors))
    return ValidationFailed(f"invalid: {fields}", errors=errors)


def agent_principal(runtime: Runtime, api_key: str | None) -> Principal:
    """The agent an API key acts as.

    Raises:
        Unauthorized: no key, or one that is malformed, unknown or revoked, or an owner
            key (the tools act as one agent, and an owner key is not one).
    """
    if not api_key:
        raise Unauthorized("an agent API key is required")
    principal = runtime.tenancy.authenticate(api_key)
    if principal.is_owner:
        raise Unauthorized("the MCP tools act as one agent: use an agent key, not an owner key")
    return principal


def key_resolver(runtime: Runtime, api_key: str | None) -> PrincipalResolver:
    """The resolver for a process started with one key (stdio): the key is checked on
    every call, so revoking it cuts the running client off at its next call."""
    return lambda _request: agent_principal(runtime, api_key)


def _feed_scope(principal: Principal, needed: str) -> str:
    principal.require(needed)
    return WORKSPACE_SCOPE if principal.is_owner else str(principal.agent_id)


def _submitted(submitted: Submitted) -> dict[str, Any]:
    """What ``/v1/send`` and ``/v1/reply`` answer, plus whether it was a replay."""
    body = {k: v for k, v in submitted.body.items() if k != "notified"}
    return {**body, "replayed": submitted.replayed}


# -- the server -------------------------------------------------------------------------

Limit = Annotated[int, Field(description=f"Page size, 1..{MAX_LIMIT}.")]
IdempotencyKey = Annotated[
    str | None,
    Field(
        description="Required. Unique per intended message (e.g. a UUID); a retry of the "
        "same message reuses it and gets the first answer instead of a second send."
    ),
]


@contextmanager
def _root_logging_left_alone() -> Iterator[None]:
    """Keep ``MCPServer()`` from configuring the root logger.

    It calls ``logging.basicConfig(level=INFO)`` with a Rich handler, which in a
    process that has not configured logging yet (an embedding program, the benchmark)
    turns on every library's INFO chatter and makes the program's own later
    ``basicConfig`` a no-op. A root logger with a handler makes that call do nothing,
    so one is lent for the duration.
    """
    root = logging.getLogger()
    lent = logging.NullHandler()
    if not root.handlers:
        root.addHandler(lent)
    try:
        yield
    finally:
        root.removeHandler(lent)


def build_mcp_server(runtime: Runtime, principal_resolver: PrincipalResolver) -> MCPServer:
    """The MCP server with the agent's tools over ``runtime``'s services.

    One server serves any number of sessions: nothing about the caller is kept on it,
    every call resolves its principal through ``principal_resolver``.
    """
    with _root_logging_left_alone():
        server: MCPServer = MCPServer(
            name="mailgate",
            title="mailgate",
            version=version("mailgate"),
            instructions=INSTRUCTIONS,
        )
    search = runtime.search
    max_chars = runtime.settings.extract_max_chars

    def call(ctx: Context, action: Callable[[Principal], _Result]) -> CallToolResult:
        request = ctx.request_context.request
        try:
            principal = principal_resolver(request if isinstance(request, Request) else None)
            return _ok(action(principal))
        except MailgateError as exc:
            return tool_error(exc)

    @server.tool(annotations=_READ)
    def list_threads(
        ctx: Context, limit: Limit = DEFAULT_PAGE, cursor: str | None = None
    ) -> Annotated[CallToolResult, ThreadList]:
        """The agent's threads, most recently active first. Pass `next_cursor` back as
        `cursor` for the next page."""

        def run(principal: Principal) -> ThreadList:
            page = runtime.queries.list_threads(principal, limit=limit, cursor=cursor)
            return ThreadList(
                threads=[ThreadOut.of(t) for t in page.items], next_cursor=page.next_cursor
            )

        return call(ctx, run)

    @server.tool(annotations=_READ)
    def read_message(ctx: Context, message_id: str) -> Annotated[CallToolResult, MessageRead]:
        """One message: its headers, its text (and the new text of a reply, without the
        quoted history), and the list of attachments."""
        return call(
            ctx,
            lambda principal: _message_read(
                runtime.queries.get_message(principal, message_id), max_chars
            ),
        )

    @server.tool(annotations=_READ)
    def search_messages(
        ctx: Context,
        query: Annotated[
            str,
            Field(description=f"Text to find (1..{MAX_QUERY_CHARS} characters, no wildcards)."),
        ],
        limit: Limit = DEFAULT_PAGE,
    ) -> Annotated[CallToolResult, SearchResults]:
        """Messages whose subject, sender address or text contains `query`
        (case-insensitive), newest first."""

        def run(principal: Principal) -> SearchResults:
            found = search.search(principal, query, limit=limit)
            return SearchResults(
                query=query.strip(), messages=[MessageSummaryOut.of(m) for m in found]
            )

        return call(ctx, run)

    @server.tool(annotations=_SEND)
    def reply(
        ctx: Context,
        message_id: Annotated[str, Field(description="The message answered.")],
        text: str,
        html: str | None = None,
        reply_all: bool = False,
        idempotency_key: IdempotencyKey = None,
    ) -> Annotated[CallToolResult, dict[str, Any]]:
        """Reply in the thread of `message_id` (to its sender; with `reply_all`, to every
        recipient too). Returns the policy decision: `status` is `queued` (will be
        sent), `pending_approval`, `quarantined` or `blocked`, with `decision.reasons`."""

        def run(principal: Principal) -> dict[str, Any]:
            try:
                body = ReplyBody.model_validate(
                    {"message_id": message_id, "text": text, "html": html, "reply_all": reply_all}
                )
            except ValidationError as exc:
                raise _validation_failed(exc) from None
            return _submitted(
                runtime.outbound.reply(
                    principal,
                    body.message_id,
                    text=body.text,
                    html=body.html,
                    reply_all=body.reply_all,
                    idempotency_key=idempotency_key,
                    payload=body.model_dump(mode="json"),
                )
            )

        return call(ctx, run)

    @server.tool(annotations=_SEND)
    def send(
        ctx: Context,
        to: Annotated[list[str] | str, Field(description="Recipient addresses.")],
        subject: str,
        text: str,
        html: str | None = None,
        cc: list[str] | str | None = None,
        idempotency_key: IdempotencyKey = None,
    ) -> Annotated[CallToolResult, dict[str, Any]]:
        """Send new mail (a new thread) from the agent's address. Returns the policy
        decision, as `reply` does."""

        def run(principal: Principal) -> dict[str, Any]:
            try:
                body = SendBody.model_validate(
                    {"to": to, "cc": cc or [], "subject": subject, "text": text, "html": html}
                )
            except ValidationError as exc:
                raise _validation_failed(exc) from None
            draft = compose.Draft(
                to=tuple(body.to),
                cc=tuple(body.cc),
                subject=body.subject,
                text=body.text,
                html=body.html,
            )
            return _submitted(
                runtime.outbound.send(
                    principal,
                    draft,
                    idempotency_key=idempotency_key,
                    payload=body.model_dump(mode="json"),
                )
            )

        return call(ctx, run)

    @server.tool(annotations=_LEASE)
    def list_events(
        ctx: Context,
        limit: Annotated[int, Field(description="Most events to lease.")] = 10,
        lease_seconds: Annotated[
            float | None,
            Field(
                description="How long the events stay hidden from other pulls; default "
                "the gateway's feed lease."
            ),
        ] = None,
        consumer: Annotated[
            str, Field(description="Feed consumer name: each has its own leases and acks.")
        ] = DEFAULT_CONSUMER,
    ) -> Annotated[CallToolResult, EventList]:
        """Lease the agent's next pending events (new mail, delivery outcomes, ...),
        oldest first. Ack each with `ack_events` once handled; an event not acked comes
        back when its lease expires."""

        def run(principal: Principal) -> EventList:
            leased = runtime.feed.lease(
                principal.workspace_id,
                _feed_scope(principal, EVENTS_READ),
                consumer,
                limit=limit,
                lease_seconds=(
                    runtime.settings.feed_lease_seconds if lease_seconds is None else lease_seconds
                ),
            )
            return EventList(events=[EventOut.of(e) for e in leased])

        return call(ctx, run)

    @server.tool(annotations=_ACK)
    def ack_events(
        ctx: Context,
        event_ids: Annotated[list[str], Field(description="Ids from `list_events`.")],
        consumer: str = DEFAULT_CONSUMER,
    ) -> Annotated[CallToolResult, AckOut]:
        """Mark events handled; they are not delivered to this consumer again
        (idempotent: acking twice is reported, not refused)."""

        def run(principal: Principal) -> AckOut:
            result = runtime.feed.ack(
                principal.workspace_id, _feed_scope(principal, EVENTS_ACK), consumer, event_ids
            )
            return AckOut.of(result)

        return call(ctx, run)

    return server


TOOL_NAMES = (
    "list_threads",
    "read_message",
    "search_messages",
    "reply",
    "send",
    "list_events",
    "ack_events",
)
"""The tool names are a contract with agents' prompts: renaming one breaks them."""

__all__ = [
    "DEFAULT_CONSUMER",
    "TOOL_NAMES",
    "MessageRead",
    "PrincipalResolver",
    "SearchResults",
    "agent_principal",
    "build_mcp_server",
    "key_resolver",
    "tool_error",
]
