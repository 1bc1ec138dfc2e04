"""/v0 drafts: AgentMail's drafts over :class:`~mailgate.services.drafts.DraftService`.

Views are AgentMail's ``Draft`` (one draft) and ``DraftItem`` (in lists);
``in_reply_to`` and ``forward_of`` take and show public message ids (Message-ID or
``msg_`` alias). A draft's send answers like a message send (see
:mod:`mailgate.api.v0.sending`): ``200 {message_id, thread_id}`` when allowed or held
for approval, ``403 MessageRejectedError`` when blocked; it never sends twice.
Scheduled sending (``send_at``) is not offered (``501``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool

from mailgate.api.auth import PrincipalDep, RuntimeDep
from mailgate.api.v0.common import (
    DEFAULT_LIMIT,
    InboxDep,
    list_param,
    primary_address,
    public_message_id,
)
from mailgate.api.v0.messages import download
from mailgate.api.v0.sending import SendAttachment, answer, decode_attachments, read_model
from mailgate.domain.keys import Principal
from mailgate.errors import NotSupported
from mailgate.runtime import Runtime
from mailgate.services.agentmail import iso, label_changes
from mailgate.services.drafts import DraftFields, DraftService, preview

router = APIRouter(prefix="/v0")


def _addresses(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


_RECIPIENTS = ("to", "cc", "bcc", "reply_to")


class CreateDraftRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    labels: list[str] | None = Field(None, max_length=50)
    reply_to: list[str] | None = Field(None, max_length=10)
    to: list[str] | None = Field(None, max_length=100)
    cc: list[str] | None = Field(None, max_length=100)
    bcc: list[str] | None = Field(None, max_length=100)
    subject: str | None = None
    text: str | None = None
    html: str | None = None
    attachments: list[SendAttachment] | None = Field(None, max_length=100)
    in_reply_to: str | None = None
    forward_of: str | None = None
    reply_all: bool | None = None
    send_at: datetime | None = None
    client_id: str | None = Field(None, min_length=1, max_length=200)

    _lists = field_validator(*_RECIPIENTS, mode="before")(_addresses)


class UpdateDraftRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    reply_to: list[str] | None = Field(None, max_length=10)
    to: list[str] | None = Field(None, max_length=100)
    cc: list[str] | None = Field(None, max_length=100)
    bcc: list[str] | None = Field(None, max_length=100)
    subject: str | None = None
    text: str | None = None
    html: str | None = None
    add_attachments: list[SendAttachment] | None = Field(None, max_length=100)
    remove_attachments: list[str] | None = None
    add_labels: list[str] | None = None
    remove_labels: list[str] | None = None
    send_at: datetime | None = None

    _lists = field_validator(*_RECIPIENTS, "add_labels", "remove_labels", mode="before")(_addresses)


class SendDraftRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    add_labels: list[str] | None = None
    remove_labels: list[str] | None = None

    _lists = field_validator("add_labels", "remove_labels", mode="before")(_addresses)


def _service(runtime: Runtime) -> DraftService:
    return runtime.drafts


def _no_schedule(send_at: datetime | None) -> None:
    if send_at is not None:
        raise NotSupported("scheduled sending (send_at) is not supported by this gateway")


def _fields(body: CreateDraftRequest | UpdateDraftRequest) -> DraftFields:
    given = frozenset(body.model_fields_set) & {*_RECIPIENTS, "subject", "text", "html"}
    return DraftFields(
        to=tuple(body.to or ()),
        cc=tuple(body.cc or ()),
        bcc=tuple(body.bcc or ()),
        reply_to=tuple(body.reply_to or ()),
        subject=body.subject,
        text=body.text,
        html=body.html,
        given=given,
    )


# ------------------------------------------------------------------------------ views


def _attachments(row: Any) -> list[dict[str, Any]]:
    return [
        {
            "attachment_id": a["attachment_id"],
            "filename": a.get("filename"),
            "size": a["size"],
            "content_type": a.get("content_type"),
            "content_disposition": a.get("disposition"),
            "content_id": a.get("content_id"),
        }
        for a in row.attachments
    ]


def _views(runtime: Runtime, rows: Sequence[Any], *, full: bool) -> list[dict[str, Any]]:
    """AgentMail's ``Draft`` (``full``) or ``DraftItem`` for each row."""
    service = _service(runtime)
    ids = service.public_ids([r.in_reply_to or r.forward_of for r in rows])
    inboxes: dict[str, str] = {}
    with runtime.db.read() as conn:
        for agent_id in {r.agent_id for r in rows}:
            inboxes[agent_id] = primary_address(conn, agent_id)

    def public(message_id: str | None) -> str | None:
        if not message_id:
            return None
        rfc, ours = ids.get(message_id, ("", message_id))
        return public_message_id(rfc, ours)

    out = []
    for r in rows:
        view: dict[str, Any] = {
            "inbox_id": inboxes[r.agent_id],
            "draft_id": r.id,
            "labels": list(r.labels),
            "to": list(r.to_addrs),
            "cc": list(r.cc_addrs),
            "bcc": list(r.bcc_addrs),
            "subject": r.subject,
            "preview": preview(r),
            "attachments": _attachments(r),
            "in_reply_to": public(r.in_reply_to),
            "forward_of": public(r.forward_of),
            "send_status": r.send_status,
            "send_at": None,
            "updated_at": r.updated_at.isoformat(),
        }
        if full:
            view.update(
                client_id=r.client_id,
                reply_to=list(r.reply_to),
                text=r.text_body,
                html=r.html_body,
                created_at=r.created_at.isoformat(),
            )
        out.append(view)
    return out


def _one(runtime: Runtime, row: Any) -> dict[str, Any]:
    return _views(runtime, [row], full=True)[0]


def _listing(
    runtime: Runtime,
    principal: Principal,
    agent_id: str | None,
    limit: int,
    page_token: str | None,
    labels: str | None,
    before: datetime | None,
    after: datetime | None,
    ascending: bool,
) -> dict[str, Any]:
    page = _service(runtime).list(
        principal,
        agent_id=agent_id,
        limit=limit,
        cursor=page_token,
        labels=list_param(labels, "labels"),
        before=before,
        after=after,
        ascending=ascending,
    )
    items = _views(runtime, page.items, full=False)
    body: dict[str, Any] = {"count": len(items), "limit": limit, "drafts": items}
    if page.next_cursor:
        body["next_page_token"] = page.next_cursor
    return body


LimitQ = Annotated[int, Query(description="Items per page (1-100).")]
TokenQ = Annotated[str | None, Query(description="`next_page_token` of the previous page.")]
LabelsQ = Annotated[str | None, Query(description="Only drafts with every label (JSON list).")]


# ----------------------------------------------------------------------------- routes


@router.get("/inboxes/{inbox_id}/drafts", summary="List an inbox's drafts")
def list_drafts(
    inbox: InboxDep,
    principal: PrincipalDep,
    runtime: RuntimeDep,
    limit: LimitQ = DEFAULT_LIMIT,
    page_token: TokenQ = None,
    labels: LabelsQ = None,
    before: datetime | None = None,
    after: datetime | None = None,
    ascending: bool = False,
) -> dict[str, Any]:
    return _listing(
        runtime, principal, inbox.agent_id, limit, page_token, labels, before, after, ascending
    )


@router.post("/inboxes/{inbox_id}/drafts", summary="Create a draft (client_id: idempotent)")
async def create_draft(
    request: Request, inbox: InboxDep, principal: PrincipalDep, runtime: RuntimeDep
) -> JSONResponse:
    body = await read_model(request, CreateDraftRequest, runtime.settings)
    _no_schedule(body.send_at)

    def work() -> dict[str, Any]:
        def resolve(ref: str | None) -> str | None:
            if not ref:
                return None
            return runtime.agentmail.resolve(conn, principal, ref, agent_id=inbox.agent_id)

        with runtime.db.read() as conn:
            in_reply_to, forward_of = resolve(body.in_reply_to), resolve(body.forward_of)
        row, _created = _service(runtime).create(
            principal,
            inbox.agent_id,
            _fields(body),
            attachments=decode_attachments(
                body.attachments, max_bytes=runtime.settings.v0_max_attachment_bytes
            ),
            labels=body.labels or (),
            in_reply_to=in_reply_to,
            forward_of=forward_of,
            reply_all=bool(body.reply_all),
            client_id=body.client_id,
        )
        return _one(runtime, row)

    return JSONResponse(await run_in_threadpool(work))


@router.get("/inboxes/{inbox_id}/drafts/{draft_id}", summary="One draft")
def get_draft(
    draft_id: str, inbox: InboxDep, principal: PrincipalDep, runtime: RuntimeDep
) -> dict[str, Any]:
    return _one(runtime, _service(runtime).get(principal, draft_id, agent_id=inbox.agent_id))


@router.patch("/inboxes/{inbox_id}/drafts/{draft_id}", summary="Edit a draft")
async def update_draft(
    draft_id: str,
    request: Request,
    inbox: InboxDep,
    principal: PrincipalDep,
    runtime: RuntimeDep,
) -> JSONResponse:
    body = await read_model(request, UpdateDraftRequest, runtime.settings)
    _no_schedule(body.send_at)

    def work() -> dict[str, Any]:
        row = _service(runtime).update(
            principal,
            inbox.agent_id,
            draft_id,
            _fields(body),
            add_attachments=decode_attachments(
                body.add_attachments,
                max_bytes=runtime.settings.v0_max_attachment_bytes,
                field="add_attachments",
            ),
            remove_attachments=body.remove_attachments or (),
            add_labels=body.add_labels or (),
            remove_labels=body.remove_labels or (),
        )
        return _one(runtime, row)

    return JSONResponse(await run_in_threadpool(work))


@router.delete("/inboxes/{inbox_id}/drafts/{draft_id}", summary="Delete a draft")
def delete_draft(
    draft_id: str, inbox: InboxDep, principal: PrincipalDep, runtime: RuntimeDep
) -> Response:
    _service(runtime).delete(principal, inbox.agent_id, draft_id)
    return Response(status_code=204)


@router.post("/inboxes/{inbox_id}/drafts/{draft_id}/send", summary="Send a draft (once)")
async def send_draft(
    draft_id: str,
    request: Request,
    inbox: InboxDep,
    principal: PrincipalDep,
    runtime: RuntimeDep,
) -> JSONResponse:
    body = await read_model(request, SendDraftRequest, runtime.settings)
    label_changes(body.add_labels or (), body.remove_labels or ())  # refused before sending
    submitted = await run_in_threadpool(_service(runtime).send, principal, inbox.agent_id, draft_id)
    return await run_in_threadpool(
        answer, runtime, submitted, body.add_labels, body.remove_labels or ()
    )


@router.get("/drafts", summary="Drafts across the caller's inboxes")
def list_all_drafts(
    principal: PrincipalDep,
    runtime: RuntimeDep,
    limit: LimitQ = DEFAULT_LIMIT,
    page_token: TokenQ = None,
    labels: LabelsQ = None,
    before: datetime | None = None,
    after: datetime | None = None,
    ascending: bool = False,
) -> dict[str, Any]:
    return _listing(runtime, principal, None, limit, page_token, labels, before, after, ascending)


@router.get("/drafts/{draft_id}", summary="One draft, by id alone")
def get_any_draft(draft_id: str, principal: PrincipalDep, runtime: RuntimeDep) -> dict[str, Any]:
    return _one(runtime, _service(runtime).get(principal, draft_id))


@router.get(
    "/inboxes/{inbox_id}/drafts/{draft_id}/attachments/{attachment_id}",
    summary="A draft attachment's metadata and signed download link",
)
def inbox_draft_attachment(
    draft_id: str,
    attachment_id: str,
    inbox: InboxDep,
    principal: PrincipalDep,
    runtime: RuntimeDep,
) -> dict[str, Any]:
    return _attachment_response(runtime, principal, draft_id, attachment_id, inbox.agent_id)


@router.get(
    "/drafts/{draft_id}/attachments/{attachment_id}",
    summary="A draft attachment's metadata and signed download link",
)
def draft_attachment(
    draft_id: str, attachment_id: str, principal: PrincipalDep, runtime: RuntimeDep
) -> dict[str, Any]:
    return _attachment_response(runtime, principal, draft_id, attachment_id, None)


@router.get("/drafts/{draft_id}/attachments/{attachment_id}/download", tags=["v0 links"])
def download_draft_attachment(
    runtime: RuntimeDep,
    draft_id: str,
    attachment_id: str,
    expires: str = "",
    signature: str = "",
) -> Response:
    """A draft attachment's bytes, for the holder of a link that has not expired (and
    while the draft exists: a sent or deleted draft has no attachments)."""
    runtime.agentmail.links.verify(
        "draft-attachment", _link_object(draft_id, attachment_id), expires, signature
    )
    meta, data = _service(runtime).attachment_bytes(draft_id, attachment_id)
    return download(data, str(meta.get("content_type") or ""), meta.get("filename"), attachment_id)


def _link_object(draft_id: str, attachment_id: str) -> str:
    """What a draft attachment link signs: both ids, so a link names one file."""
    return f"{draft_id}/{attachment_id}"


def _attachment_response(
    runtime: Runtime,
    principal: Principal,
    draft_id: str,
    attachment_id: str,
    agent_id: str | None,
) -> dict[str, Any]:
    """AgentMail's ``AttachmentResponse`` for a draft's attachment."""
    meta = _service(runtime).attachment(principal, draft_id, attachment_id, agent_id=agent_id)
    link = runtime.agentmail.links.sign(
        "draft-attachment",
        _link_object(draft_id, attachment_id),
        f"/v0/drafts/{draft_id}/attachments/{attachment_id}/download",
    )
    return {
        "attachment_id": attachment_id,
        "filename": meta.get("filename"),
        "size": meta["size"],
        "content_type": meta.get("content_type"),
        "content_disposition": meta.get("disposition"),
        "content_id": meta.get("content_id"),
        "download_url": link.url,
        "expires_at": iso(link.expires_at),
    }
