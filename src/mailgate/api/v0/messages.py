"""/v0 messages: list, get, label updates, raw and attachments, as AgentMail's SDK
calls them (``client.inboxes.messages.*``), plus the signed download links those hand
out (``/v0/attachments/{id}/download|text``, ``/v0/messages/{id}/raw/download``).

The download routes take no bearer key: the link's signature is the credential
(:mod:`mailgate.services.links`). Everything else is read through
:class:`~mailgate.services.agentmail.AgentMailViews` under the caller's key.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Query
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict

from mailgate.api.auth import PrincipalDep, RuntimeDep
from mailgate.api.v0.common import (
    DEFAULT_LIMIT,
    InboxDep,
    LimitQuery,
    PageTokenQuery,
    check_page_limit,
    list_param,
)
from mailgate.domain.extract import attachment_text
from mailgate.services.agentmail import MessageQuery

router = APIRouter(prefix="/v0")

_UNSAFE_FILENAME = re.compile(r'[\x00-\x1f\x7f"\\/;:*?<>|]+')


class UpdateMessageRequest(BaseModel):
    """AgentMail's ``UpdateMessageRequest``: one label or a list, to add or remove."""

    model_config = ConfigDict(extra="forbid")

    add_labels: str | list[str] | None = None
    remove_labels: str | list[str] | None = None


def _as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else value


@router.get("/inboxes/{inbox_id}/messages", tags=["v0 messages"])
def list_messages(
    runtime: RuntimeDep,
    principal: PrincipalDep,
    inbox: InboxDep,
    limit: LimitQuery = DEFAULT_LIMIT,
    page_token: PageTokenQuery = None,
    labels: Annotated[str | None, Query(description='JSON list, e.g. ["unread"].')] = None,
    before: datetime | None = None,
    after: datetime | None = None,
    ascending: bool = False,
    include_spam: bool = False,
    include_blocked: bool = False,
    include_unauthenticated: bool = False,
    include_trash: bool = False,
    from_: Annotated[str | None, Query(alias="from")] = None,
    to: str | None = None,
    subject: str | None = None,
) -> dict[str, Any]:
    """``ListMessagesResponse``, newest first (or oldest first with ``ascending``)."""
    query = MessageQuery(
        labels=list_param(labels, "labels"),
        before=before,
        after=after,
        ascending=ascending,
        include_spam=include_spam,
        include_blocked=include_blocked,
        include_trash=include_trash,
        from_=list_param(from_, "from"),
        to=list_param(to, "to"),
        subject=list_param(subject, "subject"),
    )
    with runtime.db.read() as conn:
        return runtime.agentmail.list_messages(
            conn,
            principal,
            inbox.agent_id,
            query,
            limit=check_page_limit(limit),
            page_token=page_token,
        )


@router.get("/inboxes/{inbox_id}/messages/{message_id}", tags=["v0 messages"])
def get_message(
    runtime: RuntimeDep, principal: PrincipalDep, inbox: InboxDep, message_id: str
) -> dict[str, Any]:
    """``Message``: the full message, with extracted reply text."""
    with runtime.db.read() as conn:
        ours = runtime.agentmail.resolve(conn, principal, message_id, agent_id=inbox.agent_id)
        return runtime.agentmail.message(conn, principal, ours)


@router.patch("/inboxes/{inbox_id}/messages/{message_id}", tags=["v0 messages"])
def update_message(
    runtime: RuntimeDep,
    principal: PrincipalDep,
    inbox: InboxDep,
    message_id: str,
    body: UpdateMessageRequest,
) -> dict[str, Any]:
    """``UpdateMessageResponse``: stored labels changed (``unread``, own labels)."""
    with runtime.db.write() as conn:
        ours = runtime.agentmail.resolve(conn, principal, message_id, agent_id=inbox.agent_id)
        return runtime.agentmail.update_labels(
            conn,
            principal,
            ours,
            add=_as_list(body.add_labels),
            remove=_as_list(body.remove_labels),
        )


@router.get("/inboxes/{inbox_id}/messages/{message_id}/raw", tags=["v0 messages"])
def get_raw(
    runtime: RuntimeDep, principal: PrincipalDep, inbox: InboxDep, message_id: str
) -> dict[str, Any]:
    """``RawMessageResponse``: a signed link to the bytes as received."""
    with runtime.db.read() as conn:
        ours = runtime.agentmail.resolve(conn, principal, message_id, agent_id=inbox.agent_id)
        return runtime.agentmail.raw(conn, principal, ours)


@router.get(
    "/inboxes/{inbox_id}/messages/{message_id}/attachments/{attachment_id}",
    tags=["v0 messages"],
)
def get_attachment(
    runtime: RuntimeDep,
    principal: PrincipalDep,
    inbox: InboxDep,
    message_id: str,
    attachment_id: str,
) -> dict[str, Any]:
    """``AttachmentResponse``: metadata and signed download links."""
    with runtime.db.read() as conn:
        ours = runtime.agentmail.resolve(conn, principal, message_id, agent_id=inbox.agent_id)
        return runtime.agentmail.attachment(conn, principal, attachment_id, message_id=ours)


# -- signed links (no bearer key: the signature is the credential) ----------------------


@router.get("/attachments/{attachment_id}/download", tags=["v0 links"])
def download_attachment(
    runtime: RuntimeDep, attachment_id: str, expires: str = "", signature: str = ""
) -> Response:
    """The attachment's bytes, for the holder of a link that has not expired."""
    signer = runtime.agentmail
    signer.links.verify("attachment", attachment_id, expires, signature)
    with runtime.db.read() as conn:
        meta, data = signer.attachment_bytes(conn, attachment_id)
    return download(data, str(meta["content_type"]), meta["filename"], attachment_id)


@router.get("/attachments/{attachment_id}/text", tags=["v0 links"])
def attachment_text_link(
    runtime: RuntimeDep, attachment_id: str, expires: str = "", signature: str = ""
) -> dict[str, Any]:
    """The attachment's extracted text (within ``extract_max_chars``)."""
    signer = runtime.agentmail
    signer.links.verify("attachment-text", attachment_id, expires, signature)
    with runtime.db.read() as conn:
        meta, data = signer.attachment_bytes(conn, attachment_id)
    extracted = attachment_text(
        data,
        content_type=str(meta["content_type"]),
        filename=meta["filename"],
        max_chars=runtime.settings.extract_max_chars,
        max_bytes=runtime.settings.extract_max_attachment_bytes,
    )
    return {
        "attachment_id": attachment_id,
        "filename": extracted.filename,
        "content_type": extracted.content_type,
        "text": extracted.text,
        "truncated": extracted.truncated,
        "extracted": extracted.extracted,
        "reason": extracted.reason,
    }


@router.get("/messages/{message_id}/raw/download", tags=["v0 links"])
def download_raw(
    runtime: RuntimeDep, message_id: str, expires: str = "", signature: str = ""
) -> Response:
    """The message's bytes as received (``message/rfc822``)."""
    signer = runtime.agentmail
    signer.links.verify("raw", message_id, expires, signature)
    with runtime.db.read() as conn:
        data = signer.raw_bytes(conn, message_id)
    return download(data, "message/rfc822", f"{message_id}.eml", message_id)


def download(data: bytes, content_type: str, filename: Any, fallback: str) -> Response:
    """Bytes behind a signed link, as a file to save: the type only when it is a plain
    ``type/subtype``, never sniffed, never cached by a shared cache."""
    return Response(
        data,
        media_type=_media_type(content_type),
        headers={
            "Content-Disposition": _disposition(filename, fallback),
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "private, no-store",
        },
    )


def _media_type(content_type: str) -> str:
    """The stored type when it is a plain ``type/subtype`` (parameters kept), else
    ``application/octet-stream``: a header value must not carry what the sender wrote
    unchecked."""
    value = content_type.strip()
    if re.fullmatch(r"[\w.+-]+/[\w.+-]+(\s*;\s*[\w.-]+=(\"[^\"\r\n]*\"|[\w.-]+))*", value):
        return value
    return "application/octet-stream"


def _disposition(filename: Any, fallback: str) -> str:
    """``attachment`` with an ASCII ``filename`` (unsafe characters replaced) and the
    exact name as RFC 6266 ``filename*``."""
    name = str(filename or "").strip() or fallback
    name = _UNSAFE_FILENAME.sub("_", name).strip(". ") or fallback
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    ascii_name = _UNSAFE_FILENAME.sub("_", ascii_name).strip(". ") or "attachment"
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name, safe='')}"
