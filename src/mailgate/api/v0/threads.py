"""/v0 threads: per inbox (``client.inboxes.threads.*``) and across every inbox the
key may see (``client.threads.*``: an owner key, the whole workspace; an agent key,
its own inbox). A thread exists for an agent key only once one of its messages has
reached it, and lists only those messages.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query

from mailgate.api.auth import PrincipalDep, RuntimeDep
from mailgate.api.v0.common import (
    DEFAULT_LIMIT,
    InboxDep,
    LimitQuery,
    PageTokenQuery,
    check_page_limit,
    list_param,
)
from mailgate.domain.keys import Principal
from mailgate.runtime import Runtime
from mailgate.services.agentmail import ThreadQuery

router = APIRouter(prefix="/v0")

THREAD_PAGE_LIMIT = 100
"""Messages on a thread's first page when the caller names no ``limit``."""

LabelsQuery = Annotated[str | None, Query(description='JSON list, e.g. ["unread"].')]
ListQuery = Annotated[str | None, Query(description="JSON list of substrings.")]


def thread_query(
    labels: LabelsQuery = None,
    before: datetime | None = None,
    after: datetime | None = None,
    ascending: bool = False,
    include_spam: bool = False,
    include_blocked: bool = False,
    include_unauthenticated: bool = False,
    include_trash: bool = False,
    senders: ListQuery = None,
    recipients: ListQuery = None,
    subject: ListQuery = None,
) -> ThreadQuery:
    """The filters both thread listings take (``include_unauthenticated`` is accepted
    for AgentMail clients and ignored: sender authentication never hides mail here)."""
    return ThreadQuery(
        labels=list_param(labels, "labels"),
        before=before,
        after=after,
        ascending=ascending,
        include_spam=include_spam,
        include_blocked=include_blocked,
        include_trash=include_trash,
        senders=list_param(senders, "senders"),
        recipients=list_param(recipients, "recipients"),
        subject=list_param(subject, "subject"),
    )


ThreadQueryDep = Annotated[ThreadQuery, Depends(thread_query)]


def _list(
    runtime: Runtime,
    principal: Principal,
    agent_id: str | None,
    query: ThreadQuery,
    limit: int,
    page_token: str | None,
) -> dict[str, Any]:
    with runtime.db.read() as conn:
        return runtime.agentmail.list_threads(
            conn,
            principal,
            query,
            agent_id=agent_id,
            limit=check_page_limit(limit),
            page_token=page_token,
        )


@router.get("/inboxes/{inbox_id}/threads", tags=["v0 threads"])
def list_inbox_threads(
    runtime: RuntimeDep,
    principal: PrincipalDep,
    inbox: InboxDep,
    query: ThreadQueryDep,
    limit: LimitQuery = DEFAULT_LIMIT,
    page_token: PageTokenQuery = None,
) -> dict[str, Any]:
    """``ListThreadsResponse`` of one inbox, most recent activity first."""
    return _list(runtime, principal, inbox.agent_id, query, limit, page_token)


@router.get("/inboxes/{inbox_id}/threads/{thread_id}", tags=["v0 threads"])
def get_inbox_thread(
    runtime: RuntimeDep,
    principal: PrincipalDep,
    inbox: InboxDep,
    thread_id: str,
    limit: Annotated[int, Query(description="Messages per page (1-100).")] = THREAD_PAGE_LIMIT,
    page_token: PageTokenQuery = None,
) -> dict[str, Any]:
    """``Thread`` with its newest messages (each page oldest first)."""
    with runtime.db.read() as conn:
        return runtime.agentmail.thread(
            conn,
            principal,
            thread_id,
            agent_id=inbox.agent_id,
            limit=check_page_limit(limit),
            page_token=page_token,
        )


@router.get(
    "/inboxes/{inbox_id}/threads/{thread_id}/attachments/{attachment_id}",
    tags=["v0 threads"],
)
def get_inbox_thread_attachment(
    runtime: RuntimeDep,
    principal: PrincipalDep,
    inbox: InboxDep,
    thread_id: str,
    attachment_id: str,
) -> dict[str, Any]:
    """``AttachmentResponse`` of an attachment on one of the thread's messages."""
    with runtime.db.read() as conn:
        return runtime.agentmail.attachment(
            conn, principal, attachment_id, thread_id=thread_id, agent_id=inbox.agent_id
        )


@router.get("/threads", tags=["v0 threads"])
def list_threads(
    runtime: RuntimeDep,
    principal: PrincipalDep,
    query: ThreadQueryDep,
    limit: LimitQuery = DEFAULT_LIMIT,
    page_token: PageTokenQuery = None,
) -> dict[str, Any]:
    """``ListThreadsResponse`` across every inbox the key may see."""
    return _list(runtime, principal, None, query, limit, page_token)


@router.get("/threads/{thread_id}", tags=["v0 threads"])
def get_thread(
    runtime: RuntimeDep,
    principal: PrincipalDep,
    thread_id: str,
    limit: Annotated[int, Query(description="Messages per page (1-100).")] = THREAD_PAGE_LIMIT,
    page_token: PageTokenQuery = None,
) -> dict[str, Any]:
    """``Thread`` with its newest messages, found in any inbox the key may see."""
    with runtime.db.read() as conn:
        return runtime.agentmail.thread(
            conn, principal, thread_id, limit=check_page_limit(limit), page_token=page_token
        )


@router.get("/threads/{thread_id}/attachments/{attachment_id}", tags=["v0 threads"])
def get_thread_attachment(
    runtime: RuntimeDep, principal: PrincipalDep, thread_id: str, attachment_id: str
) -> dict[str, Any]:
    """``AttachmentResponse`` of an attachment in the thread."""
    with runtime.db.read() as conn:
        return runtime.agentmail.attachment(conn, principal, attachment_id, thread_id=thread_id)
