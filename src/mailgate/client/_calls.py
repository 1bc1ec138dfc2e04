"""Every API call as a value: method, path, parameters, body, how to read the answer
and whether it may be retried.

The sync and async clients only *perform* these (``_transport.py``), so the two can
never drift apart on what a call sends or how its answer is read.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

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
    OutgoingAttachment,
    Page,
    Thread,
    ThreadDetail,
)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

DEFAULT_CONSUMER = "default"
"""The consumer the gateway uses when none is named."""

KEY_PREFIX = "mgk_"


def idempotency_key(*parts: object) -> str:
    """A stable ``Idempotency-Key`` derived from what makes an action unique.

    The same parts give the same key in any process, so work redone after a crash
    (``idempotency_key("reply", event.event_id, message_id)``) reuses the first key and
    the gateway answers with the first result instead of sending again. Parts are
    encoded as a JSON list before hashing, so ``("a", "bc")`` and ``("ab", "c")`` differ.

    Raises:
        ValueError: no parts (a key from nothing would be shared by every call).
    """
    if not parts:
        raise ValueError("idempotency_key needs at least one part")
    canonical = json.dumps([str(p) for p in parts], separators=(",", ":"), ensure_ascii=False)
    return KEY_PREFIX + hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request and how to read its answer.

    ``retry_safe``: doing it twice cannot do its work twice (reads, feed acks, sends
    with an idempotency key). ``extra_timeout`` is added to the read timeout (a
    long-poll's ``wait``).
    """

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: Mapping[str, Any] | None = None
    json: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    retry_safe: bool = True
    extra_timeout: float = 0.0


# -- parsing ----------------------------------------------------------------------------


def _one(model: type[M]) -> Callable[[httpx.Response], M]:
    def parse(response: httpx.Response) -> M:
        return model.model_validate(response.json())

    return parse


def _page(model: type[M], key: str) -> Callable[[httpx.Response], Page[M]]:
    def parse(response: httpx.Response) -> Page[M]:
        body = response.json()
        items = [model.model_validate(item) for item in body.get(key) or []]
        return Page[model](items=items, next_cursor=body.get("next_cursor"))  # type: ignore[valid-type]

    return parse


def _events(response: httpx.Response) -> list[Event]:
    return [Event.model_validate(e) for e in response.json().get("events") or []]


def _bytes(response: httpx.Response) -> bytes:
    return response.content


def _outbound_result(key: str) -> Callable[[httpx.Response], OutboundResult]:
    def parse(response: httpx.Response) -> OutboundResult:
        result = OutboundResult.model_validate(response.json())
        replayed = response.headers.get("Idempotent-Replayed", "").lower() == "true"
        return result.model_copy(update={"replayed": replayed, "idempotency_key": key})

    return parse


# -- helpers ----------------------------------------------------------------------------


def _seg(value: str) -> str:
    """A path segment: ids are opaque strings, so quote anything odd."""
    return quote(value, safe="")


def _params(**values: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in values.items():
        if value is None:
            continue
        out[name] = value.isoformat() if isinstance(value, datetime) else value
    return out


def event_ids(events: str | Event | Iterable[str | Event]) -> list[str]:
    """Ids from ids or :class:`Event` objects (one or many)."""
    if isinstance(events, str | Event):
        events = [events]
    return [e.event_id if isinstance(e, Event) else e for e in events]


def _addresses(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


Attachments = Sequence[OutgoingAttachment | Mapping[str, Any]] | None


def _attachments(items: Attachments) -> list[dict[str, Any]]:
    return [
        (item if isinstance(item, OutgoingAttachment) else OutgoingAttachment(**item)).wire()
        for item in items or ()
    ]


# -- messages ---------------------------------------------------------------------------


def list_messages(
    *,
    folder: str | None = None,
    thread_id: str | None = None,
    from_: str | None = None,
    since: datetime | str | None = None,
    agent_id: str | None = None,
    limit: int | None = None,
    cursor: str | None = None,
) -> Call[Page[Message]]:
    params = _params(
        folder=folder,
        thread_id=thread_id,
        since=since,
        agent_id=agent_id,
        limit=limit,
        cursor=cursor,
    )
    if from_ is not None:
        params["from"] = from_
    return Call("GET", "/v1/messages", _page(Message, "messages"), params=params)


def get_message(message_id: str, *, max_chars: int | None = None) -> Call[MessageDetail]:
    params = _params(max_chars=max_chars)
    return Call("GET", f"/v1/messages/{_seg(message_id)}", _one(MessageDetail), params=params)


def get_raw(message_id: str) -> Call[bytes]:
    return Call("GET", f"/v1/messages/{_seg(message_id)}/raw", _bytes)


def get_attachment(message_id: str, attachment_id: str) -> Call[bytes]:
    path = f"/v1/messages/{_seg(message_id)}/attachments/{_seg(attachment_id)}"
    return Call("GET", path, _bytes)


def get_attachment_text(
    message_id: str, attachment_id: str, *, max_chars: int | None = None
) -> Call[AttachmentText]:
    path = f"/v1/messages/{_seg(message_id)}/attachments/{_seg(attachment_id)}/text"
    return Call("GET", path, _one(AttachmentText), params=_params(max_chars=max_chars))


def trash_message(message_id: str) -> Call[FolderChange]:
    path = f"/v1/messages/{_seg(message_id)}/trash"
    return Call("POST", path, _one(FolderChange), retry_safe=False)


def restore_message(message_id: str) -> Call[FolderChange]:
    path = f"/v1/messages/{_seg(message_id)}/restore"
    return Call("POST", path, _one(FolderChange), retry_safe=False)


# -- threads ----------------------------------------------------------------------------


def list_threads(
    *, agent_id: str | None = None, limit: int | None = None, cursor: str | None = None
) -> Call[Page[Thread]]:
    params = _params(agent_id=agent_id, limit=limit, cursor=cursor)
    return Call("GET", "/v1/threads", _page(Thread, "threads"), params=params)


def get_thread(thread_id: str) -> Call[ThreadDetail]:
    return Call("GET", f"/v1/threads/{_seg(thread_id)}", _one(ThreadDetail))


# -- events -----------------------------------------------------------------------------


def pull_events(
    *,
    limit: int = 10,
    lease_seconds: float | None = None,
    wait: float = 0.0,
    consumer: str = DEFAULT_CONSUMER,
) -> Call[list[Event]]:
    params = _params(consumer=consumer, limit=limit, wait=wait, lease_seconds=lease_seconds)
    return Call("GET", "/v1/events", _events, params=params, extra_timeout=wait)


def ack_events(ids: list[str], *, consumer: str) -> Call[AckResult]:
    body = {"event_ids": ids, "consumer": consumer}
    return Call("POST", "/v1/events/ack", _one(AckResult), json=body)


def nack_events(ids: list[str], *, consumer: str, delay: float) -> Call[NackResult]:
    body = {"event_ids": ids, "consumer": consumer, "delay_seconds": delay}
    return Call("POST", "/v1/events/nack", _one(NackResult), json=body)


def extend_leases(ids: list[str], *, consumer: str, lease_seconds: float) -> Call[ExtendResult]:
    body = {"event_ids": ids, "consumer": consumer, "lease_seconds": lease_seconds}
    return Call("POST", "/v1/events/extend", _one(ExtendResult), json=body)


# -- outbound ---------------------------------------------------------------------------


def _keyed(path: str, body: dict[str, Any], key: str | None) -> Call[OutboundResult]:
    """A send-like call. A missing key is made here, once per logical call, so every
    retry of this call carries the same key: that is what makes retrying it safe."""
    key = key or f"{KEY_PREFIX}{uuid.uuid4().hex}"
    return Call("POST", path, _outbound_result(key), json=body, headers={"Idempotency-Key": key})


def send(
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
) -> Call[OutboundResult]:
    body: dict[str, Any] = {
        "to": _addresses(to),
        "cc": _addresses(cc),
        "bcc": _addresses(bcc),
        "reply_to": _addresses(reply_to),
        "subject": subject,
        "text": text,
        "html": html,
        "attachments": _attachments(attachments),
        "headers": dict(headers or {}),
    }
    if agent_id is not None:
        body["agent_id"] = agent_id
    return _keyed("/v1/send", body, idempotency_key)


def reply(
    message_id: str,
    *,
    text: str | None = None,
    html: str | None = None,
    reply_all: bool = False,
    attachments: Attachments = None,
    headers: Mapping[str, str] | None = None,
    idempotency_key: str | None = None,
) -> Call[OutboundResult]:
    body = {
        "message_id": message_id,
        "text": text,
        "html": html,
        "reply_all": reply_all,
        "attachments": _attachments(attachments),
        "headers": dict(headers or {}),
    }
    return _keyed("/v1/reply", body, idempotency_key)


def forward(
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
) -> Call[OutboundResult]:
    body: dict[str, Any] = {
        "message_id": message_id,
        "to": _addresses(to),
        "cc": _addresses(cc),
        "bcc": _addresses(bcc),
        "subject": subject,
        "text": text,
        "html": html,
        "attachments": _attachments(attachments),
        "headers": dict(headers or {}),
    }
    return _keyed("/v1/forward", body, idempotency_key)


def list_outbound(
    *,
    agent_id: str | None = None,
    status: str | None = None,
    limit: int | None = None,
    cursor: str | None = None,
) -> Call[Page[Outbound]]:
    params = _params(agent_id=agent_id, status=status, limit=limit, cursor=cursor)
    return Call("GET", "/v1/outbound", _page(Outbound, "outbound"), params=params)


def get_outbound(outbound_id: str) -> Call[Outbound]:
    return Call("GET", f"/v1/outbound/{_seg(outbound_id)}", _one(Outbound))


def decide_outbound(outbound_id: str, verdict: str, comment: str) -> Call[Outbound]:
    path = f"/v1/outbound/{_seg(outbound_id)}/{verdict}"
    return Call("POST", path, _one(Outbound), json={"comment": comment}, retry_safe=False)


# -- review and trash -------------------------------------------------------------------


def list_review(
    *,
    folder: str | None = None,
    agent_id: str | None = None,
    limit: int | None = None,
    cursor: str | None = None,
) -> Call[Page[Message]]:
    params = _params(folder=folder, agent_id=agent_id, limit=limit, cursor=cursor)
    return Call("GET", "/v1/review", _page(Message, "messages"), params=params)


def release_held(message_id: str) -> Call[FolderChange]:
    path = f"/v1/review/{_seg(message_id)}/release"
    return Call("POST", path, _one(FolderChange), retry_safe=False)


def trash_held(message_id: str) -> Call[FolderChange]:
    path = f"/v1/review/{_seg(message_id)}/trash"
    return Call("POST", path, _one(FolderChange), retry_safe=False)


def list_trash(
    *, agent_id: str | None = None, limit: int | None = None, cursor: str | None = None
) -> Call[Page[Message]]:
    params = _params(agent_id=agent_id, limit=limit, cursor=cursor)
    return Call("GET", "/v1/trash", _page(Message, "messages"), params=params)
