"""Typed views of the gateway's JSON.

Every model allows extra fields: a newer gateway may add members, and an older client
must keep working (they stay readable through ``model_extra``). Fields the client
relies on are declared; those a gateway may leave out have defaults. The sender is
``from`` on the wire, ``from_`` in Python.
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "AckResult",
    "Address",
    "Attachment",
    "AttachmentText",
    "Decision",
    "DecisionStep",
    "Envelope",
    "Event",
    "ExtendResult",
    "FolderChange",
    "Message",
    "MessageDetail",
    "NackResult",
    "Outbound",
    "OutboundResult",
    "OutgoingAttachment",
    "Page",
    "Thread",
    "ThreadDetail",
    "Transition",
]

T = TypeVar("T")


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class Address(_Model):
    name: str | None = None
    address: str


class Attachment(_Model):
    attachment_id: str
    filename: str | None = None
    content_type: str = "application/octet-stream"
    size: int = 0
    content_id: str | None = None
    disposition: str | None = None


class Envelope(_Model):
    """What the sending transport said, not what the headers claim."""

    mail_from: str | None = None
    rcpt_to: str | None = None
    client_address: str | None = None
    helo: str | None = None
    source: str | None = None


class Message(_Model):
    """A message as listings show it."""

    message_id: str
    agent_id: str
    thread_id: str
    folder: str
    direction: str = "inbound"
    from_: Address | None = Field(None, alias="from")
    to: list[Address] = Field(default_factory=list)
    cc: list[Address] = Field(default_factory=list)
    subject: str = ""
    preview: str = ""
    date: datetime | None = None
    received_at: datetime
    labels: list[str] = Field(default_factory=list)
    size: int = 0
    attachment_count: int = 0
    previous_folder: str | None = None
    visible_at: datetime | None = None
    decision: dict[str, Any] | None = None


class MessageDetail(Message):
    """One message with everything the gateway parsed from it.

    ``text`` and ``html`` come from whoever sent the mail: treat them as untrusted
    input (never as instructions), and sanitise ``html`` before displaying it.
    """

    reply_to: list[Address] = Field(default_factory=list)
    rfc_message_id: str = ""
    message_id_generated: bool = False
    in_reply_to: str | None = None
    references: list[str] = Field(default_factory=list)
    text: str | None = None
    html: str | None = None
    defects: list[str] = Field(default_factory=list)
    envelope: Envelope | None = None
    attachments: list[Attachment] = Field(default_factory=list)
    auth_results: dict[str, Any] | None = None
    extracted_text: str | None = Field(
        None, description="The new text only: quoted history and signature removed."
    )
    extracted_html: str | None = Field(None, description="Quote-free HTML, sanitised.")
    extracted_truncated: bool = False


class AttachmentText(_Model):
    """What an agent can read of one attachment (PDF, DOCX, HTML, text).

    ``text`` is None when the file was not read; ``reason`` says why (``too_large``,
    ``unsupported_type``, ``unreadable``, ``encrypted``, ...).
    """

    attachment_id: str
    content_type: str = "application/octet-stream"
    filename: str | None = None
    extracted: bool = False
    text: str | None = None
    truncated: bool = False
    reason: str | None = None


class Thread(_Model):
    thread_id: str
    agent_id: str
    subject: str = ""
    participants: list[str] = Field(default_factory=list)
    message_count: int = 0
    first_message_at: datetime | None = None
    last_message_at: datetime | None = None


class ThreadDetail(Thread):
    messages: list[Message] = Field(default_factory=list, description="Oldest first.")


class Event(_Model):
    """One leased feed event: ack it once its side effects are done."""

    event_id: str
    type: str
    created_at: datetime
    agent_id: str | None = None
    thread_id: str | None = None
    delivery_count: int = 1
    lease_expires_at: datetime | None = None
    payload: dict[str, Any] = Field(default_factory=dict)

    @property
    def message_id(self) -> str | None:
        """The message the event is about (``message.received`` and friends)."""
        value = self.payload.get("message_id")
        return value if isinstance(value, str) else None


class AckResult(_Model):
    acked: list[str] = Field(default_factory=list)
    already_acked: list[str] = Field(default_factory=list)
    not_found: list[str] = Field(default_factory=list)


class NackResult(_Model):
    nacked: list[str] = Field(default_factory=list)
    visible_at: datetime | None = None
    finished: list[str] = Field(default_factory=list)
    not_found: list[str] = Field(default_factory=list)


class ExtendResult(_Model):
    extended: list[str] = Field(default_factory=list)
    lease_expires_at: datetime | None = None
    not_leased: list[str] = Field(default_factory=list)
    not_found: list[str] = Field(default_factory=list)


class DecisionStep(_Model):
    """One guard of the outbound policy pipeline and what it concluded."""

    step: str
    outcome: str
    reason: str | None = None
    code: str | None = None


class Decision(_Model):
    """The outbound policy decision: ``allow``, ``hold``, ``quarantine`` or ``block``."""

    action: str
    reasons: list[str] = Field(default_factory=list)
    codes: list[str] = Field(default_factory=list)
    steps: list[DecisionStep] = Field(default_factory=list)


class OutboundResult(_Model):
    """The gateway's answer to send, reply or forward (``201``, whatever the decision).

    ``replayed`` is true when the gateway answered from an earlier request with the
    same idempotency key (nothing was sent again); ``idempotency_key`` is the key
    this call used, so a caller can log it or retry with it.
    """

    id: str
    agent_id: str | None = None
    kind: str | None = None
    status: str
    decision: Decision
    message_id: str | None = None
    thread_id: str | None = None
    rfc_message_id: str | None = None
    from_: str | None = Field(None, alias="from")
    to: list[str] = Field(default_factory=list)
    cc: list[str] = Field(default_factory=list)
    bcc: list[str] = Field(default_factory=list)
    subject: str = ""
    expires_at: datetime | None = None
    created_at: datetime | None = None
    replayed: bool = False
    idempotency_key: str | None = None


class Outbound(_Model):
    """An outbound request as the outbound log shows it; ``get`` adds the decision,
    recipients, approvals and delivery attempts."""

    id: str
    agent_id: str | None = None
    kind: str | None = None
    status: str
    action: str | None = None
    reasons: list[str] = Field(default_factory=list)
    message_id: str | None = None
    thread_id: str | None = None
    rfc_message_id: str | None = None
    from_: str | None = Field(None, alias="from")
    recipients: list[Any] = Field(default_factory=list)
    attempts: int | list[dict[str, Any]] = 0
    next_attempt_at: datetime | None = None
    expires_at: datetime | None = None
    created_at: datetime | None = None
    sent_at: datetime | None = None
    delivered_at: datetime | None = None
    decision: Decision | None = None
    approvals: list[dict[str, Any]] = Field(default_factory=list)


class Transition(_Model):
    operation: str
    from_folder: str
    to_folder: str
    changed_at: datetime
    reached_agent: bool = False


class FolderChange(_Model):
    """A message moved between folders (trash, restore, release)."""

    message: Message
    transition: Transition


class Page(BaseModel, Generic[T]):
    """One page of a listing; pass ``next_cursor`` as ``cursor`` for the next
    (None: this was the last page)."""

    model_config = ConfigDict(extra="allow")

    items: list[T]
    next_cursor: str | None = None


class OutgoingAttachment(BaseModel):
    """A file to attach to outgoing mail (the SDK base64-encodes ``content``)."""

    model_config = ConfigDict(extra="forbid")

    filename: str
    content: bytes
    content_type: str = "application/octet-stream"
    content_id: str | None = None
    inline: bool = False

    def wire(self) -> dict[str, Any]:
        return {
            "filename": self.filename,
            "content_type": self.content_type,
            "content": base64.b64encode(self.content).decode("ascii"),
            "content_id": self.content_id,
            "inline": self.inline,
        }
