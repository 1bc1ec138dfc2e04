"""/v0 sending: send, reply, reply-all and forward in AgentMail's dialect, through the
same policy gateway as ``/v1`` (:class:`~mailgate.services.outbound.OutboundService`).

The decision, as AgentMail's clients expect it:

* ``allow`` → ``200 {message_id, thread_id}``: ``message_id`` is the public id (see
  :func:`~mailgate.api.v0.common.public_message_id`) of the agent's own copy.
* ``hold`` / ``quarantine`` → the same ``200``: the message waits in the approval
  outbox; ``outbound.sent`` (AgentMail's ``message.sent``) follows once an owner
  approves. AgentMail has no "pending" answer, and an agent that must not retry a held
  message is better served by the ids than by an error.
* ``block`` → ``403 MessageRejectedError`` (the SDK's exception for a refused send)
  with ``code`` the blocking step's (``tier``, ``suppressed``, ``rate_limited``,
  ``loop_guard``, ``denied``, ``rule_block``, ``content``) and ``message`` its reason.

Idempotency: AgentMail's SDK sends ``Idempotency-Key`` when the caller passes
``idempotency_key``; it is honoured exactly as on ``/v1`` (a reuse with another body
is ``409 ConflictError``, AgentMail's answer). Without one a fresh key is minted per
request, so **a retry without a key is not de-duplicated on this face**: AgentMail's
own API behaves the same, and refusing keyless sends would break every client written
for it.

Bodies are read with a bound before they are parsed (``413`` past it, before the
bytes are held whole) and each base64 attachment is measured before it is decoded.
URL attachments are refused: the gateway never fetches URLs on an agent's behalf (a
server-side fetch of a caller-chosen URL is an SSRF hole).
"""

from __future__ import annotations

import base64
import binascii
import mimetypes
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

from fastapi import APIRouter, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool

from mailgate.api.auth import PrincipalDep, RuntimeDep
from mailgate.api.v0.common import InboxDep, InboxRef, public_message_id
from mailgate.api.v0.errors import agentmail_error
from mailgate.config import Settings
from mailgate.domain import compose
from mailgate.domain.keys import Principal
from mailgate.errors import IdempotencyKeyReused, PayloadTooLarge, ValidationFailed
from mailgate.ingress.webhooks import read_body
from mailgate.runtime import Runtime
from mailgate.services.agentmail import label_changes
from mailgate.services.outbound import Submitted

router = APIRouter(prefix="/v0")

M = TypeVar("M", bound=BaseModel)

BODY_SLACK = 1024 * 1024
"""Room for everything in a body besides one attachment at the size limit."""

MAX_LABELS = 50


# ----------------------------------------------------------------------------- bodies


def _addresses(value: Any) -> Any:
    """AgentMail's ``Addresses``: one string or a list of them."""
    return [value] if isinstance(value, str) else value


class SendAttachment(BaseModel):
    """AgentMail's ``SendAttachment``: ``content`` (base64) or ``url``."""

    model_config = ConfigDict(extra="ignore")

    filename: str | None = Field(None, max_length=255)
    content_type: str | None = Field(None, max_length=255)
    content_disposition: Literal["inline", "attachment"] | None = None
    content_id: str | None = Field(None, max_length=255)
    content: str | None = Field(None, description="The bytes, base64-encoded.")
    url: str | None = Field(None, description="Refused: the gateway does not fetch URLs.")


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    labels: list[str] | None = Field(None, max_length=MAX_LABELS)
    reply_to: list[str] | None = Field(None, max_length=10)
    text: str | None = None
    html: str | None = None
    attachments: list[SendAttachment] | None = Field(None, max_length=100)
    headers: dict[str, str] | None = None
    track_opens: bool | None = Field(None, description="Accepted and ignored: no tracking.")

    _reply_to = field_validator("reply_to", mode="before")(_addresses)


class SendMessageRequest(_Common):
    to: list[str] | None = Field(None, max_length=100)
    cc: list[str] | None = Field(None, max_length=100)
    bcc: list[str] | None = Field(None, max_length=100)
    subject: str | None = None

    _lists = field_validator("to", "cc", "bcc", mode="before")(_addresses)


class ReplyToMessageRequest(SendMessageRequest):
    reply_all: bool | None = None


class ReplyAllMessageRequest(_Common):
    pass


# ----------------------------------------------------------------------------- shared


def body_limit(settings: Settings) -> int:
    """The largest body a /v0 send or draft call may post: one attachment at
    ``v0_max_attachment_bytes``, base64-encoded (4/3), plus room for the rest."""
    return settings.v0_max_attachment_bytes * 4 // 3 + BODY_SLACK


async def read_model(request: Request, model: type[M], settings: Settings) -> M:
    """The JSON body as ``model``, read with :func:`body_limit` as its bound.

    Raises:
        RequestTooLarge: the body is (or is declared to be) over the bound.
        RequestValidationError: not JSON, or a field does not fit ``model``.
    """
    raw = await read_body(request, body_limit(settings))
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e.get("loc", ()))} for e in exc.errors()]
        raise RequestValidationError(errors) from None


def decode_attachments(
    items: Sequence[SendAttachment] | None, *, max_bytes: int, field: str = "attachments"
) -> tuple[compose.AttachmentIn, ...]:
    """AgentMail attachments as ours, each measured before it is decoded.

    Raises:
        PayloadTooLarge: an attachment is over ``max_bytes`` (``413``).
        ValidationFailed: bad base64, no content, or a ``url`` attachment; ``errors``
            names each (``attachments[1].content``).
    """
    out: list[compose.AttachmentIn] = []
    errors: list[dict[str, str]] = []
    for i, item in enumerate(items or ()):
        name = f"{field}[{i}]"
        if item.url is not None:
            errors.append(
                {
                    "field": f"{name}.url",
                    "message": "URL attachments are not fetched by this gateway; send the "
                    "bytes base64-encoded in content",
                }
            )
            continue
        if item.content is None:
            errors.append({"field": f"{name}.content", "message": "required (base64)"})
            continue
        # Base64 holds 3 bytes per 4 characters: refuse before decoding a huge value.
        if len(item.content) // 4 * 3 > max_bytes + 2:
            raise PayloadTooLarge(
                f"{name} is over the {max_bytes}-byte attachment limit",
                errors=[{"field": f"{name}.content", "message": f"over {max_bytes} bytes"}],
            )
        try:
            data = base64.b64decode(item.content, validate=True)
        except (binascii.Error, ValueError):
            errors.append({"field": f"{name}.content", "message": "not valid base64"})
            continue
        if len(data) > max_bytes:
            raise PayloadTooLarge(
                f"{name} is over the {max_bytes}-byte attachment limit",
                errors=[{"field": f"{name}.content", "message": f"over {max_bytes} bytes"}],
            )
        filename = item.filename or "attachment"
        content_type = (
            item.content_type or mimetypes.guess_type(filename)[0] or "application/octet-stream"
        )
        out.append(
            compose.AttachmentIn(
                filename=filename,
                content_type=content_type,
                data=data,
                content_id=item.content_id,
                inline=item.content_disposition == "inline",
            )
        )
    if errors:
        raise ValidationFailed(
            "; ".join(f"{e['field']}: {e['message']}" for e in errors), errors=errors
        )
    return tuple(out)


def idempotency_key(request: Request) -> str:
    """The caller's ``Idempotency-Key``, or a fresh one: AgentMail clients usually
    send none, and a keyless retry is then a new message (documented above)."""
    given = request.headers.get("idempotency-key")
    if given is not None and given.strip():
        return given
    return f"v0-{uuid.uuid4()}"


def blocking_step(decision: dict[str, Any]) -> tuple[str, str]:
    """(code, reason) of the step that blocked a request."""
    for step in decision.get("steps", ()):
        if step.get("outcome") == "block":
            return str(step.get("code") or step.get("step") or "blocked"), str(step["reason"])
    reasons = decision.get("reasons") or ["blocked by policy"]
    return "blocked", str(reasons[0])


def answer(
    runtime: Runtime,
    submitted: Submitted,
    labels: Sequence[str] | None,
    remove_labels: Sequence[str] = (),
) -> JSONResponse:
    """AgentMail's answer to a decided send (see the module docstring); ``labels`` go
    on the agent's copy of the message (kept on replays: adding them is idempotent)."""
    body = submitted.body
    decision = body.get("decision") or {}
    if decision.get("action") == "block":
        code, reason = blocking_step(decision)
        return agentmail_error(403, code, reason, name="MessageRejectedError")
    message_id = body.get("message_id")
    if (labels or remove_labels) and message_id:
        with runtime.db.write() as conn:
            runtime.agentmail.label_sent_copy(conn, str(message_id), labels or (), remove_labels)
    headers = {"Idempotent-Replayed": "true"} if submitted.replayed else {}
    return JSONResponse(
        {
            "message_id": public_message_id(str(body.get("rfc_message_id") or ""), str(message_id)),
            "thread_id": body.get("thread_id"),
        },
        headers=headers,
    )


def _draft(body: SendMessageRequest, settings: Settings) -> compose.Draft:
    return compose.Draft(
        to=tuple(body.to or ()),
        cc=tuple(body.cc or ()),
        bcc=tuple(body.bcc or ()),
        reply_to=tuple(body.reply_to or ()),
        subject=body.subject or "",
        text=body.text,
        html=body.html,
        attachments=decode_attachments(
            body.attachments, max_bytes=settings.v0_max_attachment_bytes
        ),
        headers=dict(body.headers or {}),
    )


MessageIdPath = Path(description="The message's Message-ID (with <>), or its msg_ alias.")


# ----------------------------------------------------------------------------- routes


@router.post("/inboxes/{inbox_id}/messages/send", summary="Send a message (a new thread)")
async def send_message(
    request: Request, inbox: InboxDep, principal: PrincipalDep, runtime: RuntimeDep
) -> JSONResponse:
    body = await read_model(request, SendMessageRequest, runtime.settings)
    key = idempotency_key(request)

    def work() -> Submitted:
        return runtime.outbound.send(
            principal,
            _draft(body, runtime.settings),
            agent_id=inbox.agent_id,
            idempotency_key=key,
            payload={"inbox": inbox.agent_id, **body.model_dump(mode="json")},
        )

    return await _run(runtime, work, body.labels)


@router.post("/inboxes/{inbox_id}/messages/{message_id}/reply", summary="Reply to a message")
async def reply_message(
    request: Request,
    inbox: InboxDep,
    principal: PrincipalDep,
    runtime: RuntimeDep,
    message_id: str = MessageIdPath,
) -> JSONResponse:
    body = await read_model(request, ReplyToMessageRequest, runtime.settings)
    return await _reply(request, inbox, principal, runtime, message_id, body, bool(body.reply_all))


@router.post(
    "/inboxes/{inbox_id}/messages/{message_id}/reply-all", summary="Reply to everyone on it"
)
async def reply_all_message(
    request: Request,
    inbox: InboxDep,
    principal: PrincipalDep,
    runtime: RuntimeDep,
    message_id: str = MessageIdPath,
) -> JSONResponse:
    body = await read_model(request, ReplyAllMessageRequest, runtime.settings)
    return await _reply(request, inbox, principal, runtime, message_id, body, True)


@router.post("/inboxes/{inbox_id}/messages/{message_id}/forward", summary="Forward a message")
async def forward_message(
    request: Request,
    inbox: InboxDep,
    principal: PrincipalDep,
    runtime: RuntimeDep,
    message_id: str = MessageIdPath,
) -> JSONResponse:
    body = await read_model(request, SendMessageRequest, runtime.settings)
    key = idempotency_key(request)

    def work() -> Submitted:
        with runtime.db.read() as conn:
            original = runtime.agentmail.resolve(
                conn, principal, message_id, agent_id=inbox.agent_id
            )
        return runtime.outbound.forward(
            principal,
            original,
            _draft(body, runtime.settings),
            idempotency_key=key,
            payload={"message": original, **body.model_dump(mode="json")},
        )

    return await _run(runtime, work, body.labels)


async def _reply(
    request: Request,
    inbox: InboxRef,
    principal: Principal,
    runtime: Runtime,
    message_ref: str,
    body: _Common,
    reply_all: bool,
) -> JSONResponse:
    key = idempotency_key(request)

    def work() -> Submitted:
        with runtime.db.read() as conn:
            original = runtime.agentmail.resolve(
                conn, principal, message_ref, agent_id=inbox.agent_id
            )
        return runtime.outbound.reply(
            principal,
            original,
            text=body.text,
            html=body.html,
            reply_all=reply_all,
            attachments=decode_attachments(
                body.attachments, max_bytes=runtime.settings.v0_max_attachment_bytes
            ),
            headers=dict(body.headers or {}),
            to=getattr(body, "to", None) or (),
            cc=getattr(body, "cc", None) or (),
            bcc=getattr(body, "bcc", None) or (),
            reply_to=body.reply_to or (),
            idempotency_key=key,
            payload={
                "message": original,
                "reply_all": reply_all,
                **body.model_dump(mode="json", exclude={"reply_all"}),
            },
        )

    return await _run(runtime, work, body.labels)


async def _run(
    runtime: Runtime, work: Callable[[], Submitted], labels: Sequence[str] | None
) -> JSONResponse:
    """Run the (blocking) outbound call off the loop and answer its decision; a key
    reused with another body is AgentMail's ``409 ConflictError`` (ours is 422). The
    labels are checked first, so a bad one refuses the send instead of failing after."""
    label_changes(labels or (), (), fields=("labels", "labels"))
    try:
        submitted = await run_in_threadpool(work)
    except IdempotencyKeyReused as exc:
        return agentmail_error(409, exc.code, exc.detail, name="ConflictError")
    return await run_in_threadpool(answer, runtime, submitted, labels)
