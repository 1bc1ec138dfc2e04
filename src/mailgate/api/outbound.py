"""Outbound routes: send, reply, forward, the outbound log and the approval queue.

Send, reply and forward need an ``Idempotency-Key`` header. Their answer is ``201``
with the request's decision (``allow`` / ``hold`` / ``quarantine`` / ``block``) and
reasons, also for a blocked request: the request exists, it is audited, and a retry
with the same key gets the same answer (with ``Idempotent-Replayed: true``).
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mailgate.api.auth import PrincipalDep, RuntimeDep
from mailgate.api.errors import PROBLEM_RESPONSES
from mailgate.domain import compose
from mailgate.errors import ValidationFailed
from mailgate.services.outbound import Submitted

router = APIRouter(prefix="/v1", tags=["outbound"], responses=PROBLEM_RESPONSES)

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description="Unique per intended message (e.g. a UUID); a retry reuses it. Kept "
        "at least 24 h: the same key and body return the first response, a different "
        "body is 422, a concurrent duplicate is 409.",
    ),
]


class AttachmentBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    filename: str = Field(max_length=255)
    content_type: str = Field("application/octet-stream", max_length=255)
    content: str = Field(description="The bytes, base64-encoded.")
    content_id: str | None = Field(None, max_length=255, description="For inline images.")
    inline: bool = False


def _addresses(value: Any) -> Any:
    """A single address may be given as a string."""
    return [value] if isinstance(value, str) else value


class SendBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    agent_id: str | None = Field(None, description="Required with an owner key.")
    to: list[str] = Field(default_factory=list, max_length=100)
    cc: list[str] = Field(default_factory=list, max_length=100)
    bcc: list[str] = Field(default_factory=list, max_length=100)
    reply_to: list[str] = Field(default_factory=list, max_length=10)
    subject: str = ""
    text: str | None = None
    html: str | None = None
    attachments: list[AttachmentBody] = Field(default_factory=list, max_length=100)
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="Extra header fields: X-*, List-Unsubscribe, List-Unsubscribe-Post, "
        "Keywords, Comments, Organization.",
    )

    _lists = field_validator("to", "cc", "bcc", "reply_to", mode="before")(_addresses)


class ReplyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message_id: str = Field(description="The message answered; the reply joins its thread.")
    text: str | None = None
    html: str | None = None
    reply_all: bool = False
    to: list[str] = Field(
        default_factory=list,
        max_length=100,
        description="Replaces the derived recipients. Anyone not on the message answered "
        "is judged by the agent's tier like new mail.",
    )
    cc: list[str] = Field(default_factory=list, max_length=100)
    bcc: list[str] = Field(default_factory=list, max_length=100)
    reply_to: list[str] = Field(default_factory=list, max_length=10)
    attachments: list[AttachmentBody] = Field(default_factory=list, max_length=100)
    headers: dict[str, str] = Field(default_factory=dict)

    _lists = field_validator("to", "cc", "bcc", "reply_to", mode="before")(_addresses)


class ForwardBody(SendBody):
    message_id: str = Field(description="The message forwarded (attached whole).")


class VerdictBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    comment: str = Field("", max_length=4000)


def _attachments(items: list[AttachmentBody]) -> tuple[compose.AttachmentIn, ...]:
    out = []
    errors = []
    for i, item in enumerate(items):
        try:
            data = base64.b64decode(item.content, validate=True)
        except (binascii.Error, ValueError):
            errors.append({"field": f"attachments[{i}].content", "message": "not base64"})
            continue
        out.append(
            compose.AttachmentIn(
                filename=item.filename,
                content_type=item.content_type,
                data=data,
                content_id=item.content_id,
                inline=item.inline,
            )
        )
    if errors:
        raise ValidationFailed("attachment content must be base64", errors=errors)
    return tuple(out)


def _draft(body: SendBody) -> compose.Draft:
    return compose.Draft(
        to=tuple(body.to),
        cc=tuple(body.cc),
        bcc=tuple(body.bcc),
        reply_to=tuple(body.reply_to),
        subject=body.subject,
        text=body.text,
        html=body.html,
        attachments=_attachments(body.attachments),
        headers=dict(body.headers),
    )


def _answer(submitted: Submitted) -> JSONResponse:
    headers = {"Idempotent-Replayed": "true"} if submitted.replayed else {}
    body = {k: v for k, v in submitted.body.items() if k != "notified"}
    return JSONResponse(body, status_code=submitted.status, headers=headers)


@router.post("/send", status_code=201, summary="Send new mail (a new thread)")
def send(
    body: SendBody,
    principal: PrincipalDep,
    runtime: RuntimeDep,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    return _answer(
        runtime.outbound.send(
            principal,
            _draft(body),
            agent_id=body.agent_id,
            idempotency_key=idempotency_key,
            payload=body.model_dump(mode="json"),
        )
    )


@router.post("/reply", status_code=201, summary="Reply in a thread")
def reply(
    body: ReplyBody,
    principal: PrincipalDep,
    runtime: RuntimeDep,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    return _answer(
        runtime.outbound.reply(
            principal,
            body.message_id,
            text=body.text,
            html=body.html,
            reply_all=body.reply_all,
            attachments=_attachments(body.attachments),
            headers=dict(body.headers),
            to=body.to,
            cc=body.cc,
            bcc=body.bcc,
            reply_to=body.reply_to,
            idempotency_key=idempotency_key,
            payload=body.model_dump(mode="json"),
        )
    )


@router.post("/forward", status_code=201, summary="Forward a message (attached whole)")
def forward(
    body: ForwardBody,
    principal: PrincipalDep,
    runtime: RuntimeDep,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    return _answer(
        runtime.outbound.forward(
            principal,
            body.message_id,
            _draft(body),
            idempotency_key=idempotency_key,
            payload=body.model_dump(mode="json"),
        )
    )


@router.get("/outbound", summary="Outbound requests, newest first")
def list_outbound(
    principal: PrincipalDep,
    runtime: RuntimeDep,
    agent_id: str | None = None,
    status: str | None = Query(None, description="e.g. pending_approval, queued, sent"),
    limit: int = 50,
    cursor: str | None = None,
) -> dict[str, Any]:
    page = runtime.outbound.list(
        principal, agent_id=agent_id, state=status, limit=limit, cursor=cursor
    )
    return {"outbound": list(page.items), "next_cursor": page.next_cursor}


@router.get("/outbound/{outbound_id}", summary="One request: decision, approvals, attempts")
def get_outbound(outbound_id: str, principal: PrincipalDep, runtime: RuntimeDep) -> dict[str, Any]:
    return runtime.outbound.get(principal, outbound_id)


@router.post("/outbound/{outbound_id}/approve", summary="Approve held mail (owners)")
def approve(
    outbound_id: str, principal: PrincipalDep, runtime: RuntimeDep, body: VerdictBody | None = None
) -> dict[str, Any]:
    return runtime.outbound.approve(principal, outbound_id, comment=body.comment if body else "")


@router.post("/outbound/{outbound_id}/reject", summary="Reject held mail (owners)")
def reject(
    outbound_id: str, principal: PrincipalDep, runtime: RuntimeDep, body: VerdictBody | None = None
) -> dict[str, Any]:
    return runtime.outbound.reject(principal, outbound_id, comment=body.comment if body else "")
