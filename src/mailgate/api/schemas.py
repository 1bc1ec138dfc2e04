"""The JSON shapes of the native ``/v1`` API (requests and responses).

These models are the public contract and what ``/openapi.json`` documents; services
return plain dataclasses and the ``of`` constructors here map them, so a change of
storage never leaks into the wire format by accident. Field names are snake_case; the
sender is ``from`` on the wire (a Python keyword, hence ``from_`` with an alias).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from mailgate.services import feed, queries

Folder = Literal["inbox", "review", "trash", "outbox", "sent", "quarantine"]

MAX_EVENT_IDS = feed.MAX_IDS_PER_CALL
"""Most event ids one ack/nack/extend call may name (bounds one transaction)."""

DEFAULT_CONSUMER = "default"

EventId = Annotated[str, StringConstraints(min_length=1, max_length=40)]
EventIds = Annotated[
    list[EventId],
    Field(min_length=1, max_length=MAX_EVENT_IDS, description="Ids from `GET /v1/events`."),
]
ConsumerField = Annotated[
    str,
    Field(
        max_length=200,
        description="The consumer the events were leased to (validated by the feed).",
    ),
]


class _Model(BaseModel):
    # validate_by_name lets the ``of`` constructors fill ``from_`` by its Python name
    # while the wire (and OpenAPI) say ``from``.
    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True, frozen=True)


class _Request(BaseModel):
    # A misspelt field ("delay" for "delay_seconds") must fail loudly, not be ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class AddressOut(_Model):
    name: str | None = Field(description="Display name, null when the header gave none.")
    address: str

    @classmethod
    def of(cls, value: queries.Address) -> AddressOut:
        return cls(name=value.name, address=value.address)


class MessageSummaryOut(_Model):
    """A message as listings show it."""

    message_id: str
    agent_id: str
    thread_id: str
    folder: str
    direction: Literal["inbound", "outbound"]
    from_: AddressOut | None = Field(alias="from", description="First address of `From:`.")
    to: list[AddressOut]
    cc: list[AddressOut]
    subject: str
    preview: str = Field(description="The start of the text body, for list views.")
    date: datetime | None = Field(description="The `Date:` header, null when absent/invalid.")
    received_at: datetime = Field(description="When the gateway stored the message.")
    labels: list[str]
    size: int = Field(description="Size of the raw message in bytes.")
    attachment_count: int

    @classmethod
    def of(cls, value: queries.MessageSummary) -> MessageSummaryOut:
        return cls(**_summary_fields(value))


class EnvelopeOut(_Model):
    """What the sending transport said (SMTP envelope), not what the headers claim."""

    mail_from: str | None
    rcpt_to: str | None
    client_address: str | None
    helo: str | None
    source: str = Field(description="`smtp`, `webhook:<provider>` or `api`.")


class AttachmentOut(_Model):
    attachment_id: str
    filename: str | None
    content_type: str
    size: int
    content_id: str | None
    disposition: str | None

    @classmethod
    def of(cls, value: queries.AttachmentInfo) -> AttachmentOut:
        return cls(
            attachment_id=value.attachment_id,
            filename=value.filename,
            content_type=value.content_type,
            size=value.size,
            content_id=value.content_id,
            disposition=value.disposition,
        )


class MessageOut(MessageSummaryOut):
    """One message with everything parsed from it; the bytes are at `/raw`."""

    reply_to: list[AddressOut]
    rfc_message_id: str = Field(description="The `Message-ID:` (generated when absent).")
    message_id_generated: bool
    in_reply_to: str | None
    references: list[str]
    text: str | None
    html: str | None = Field(description="Untrusted HTML as sent; sanitise before display.")
    defects: list[str] = Field(description="What the lenient parser had to repair or skip.")
    envelope: EnvelopeOut
    attachments: list[AttachmentOut]

    @classmethod
    def of_detail(cls, value: queries.MessageDetail) -> MessageOut:
        env = value.envelope
        return cls(
            **_summary_fields(value.summary),
            reply_to=[AddressOut.of(a) for a in value.reply_to],
            rfc_message_id=value.rfc_message_id,
            message_id_generated=value.message_id_generated,
            in_reply_to=value.in_reply_to,
            references=list(value.references),
            text=value.text,
            html=value.html,
            defects=list(value.defects),
            envelope=EnvelopeOut(
                mail_from=env.mail_from,
                rcpt_to=env.rcpt_to,
                client_address=env.client_address,
                helo=env.helo,
                source=env.source,
            ),
            attachments=[AttachmentOut.of(a) for a in value.attachments],
        )


class MessageList(_Model):
    messages: list[MessageSummaryOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page.")


class ThreadOut(_Model):
    thread_id: str
    agent_id: str
    subject: str
    participants: list[str] = Field(description="Lower-cased addresses, the agent's excluded.")
    message_count: int
    first_message_at: datetime
    last_message_at: datetime

    @classmethod
    def of(cls, value: queries.ThreadSummary) -> ThreadOut:
        return cls(
            thread_id=value.thread_id,
            agent_id=value.agent_id,
            subject=value.subject,
            participants=list(value.participants),
            message_count=value.message_count,
            first_message_at=value.first_message_at,
            last_message_at=value.last_message_at,
        )


class ThreadDetailOut(ThreadOut):
    messages: list[MessageSummaryOut] = Field(description="Oldest first.")

    @classmethod
    def of_detail(cls, value: queries.ThreadDetail) -> ThreadDetailOut:
        base = ThreadOut.of(value.thread)
        return cls(**base.model_dump(), messages=[MessageSummaryOut.of(m) for m in value.messages])


class ThreadList(_Model):
    threads: list[ThreadOut]
    next_cursor: str | None


class EventOut(_Model):
    """One leased event. Ack it once its side effects are done; until
    ``lease_expires_at`` no other puller of the same consumer gets it."""

    event_id: str
    type: str = Field(description="`message.received`, `outbound.sent`, ...")
    created_at: datetime
    agent_id: str | None
    thread_id: str | None = Field(description="Events of one thread come in order.")
    delivery_count: int = Field(description="1 on first delivery; grows on redelivery.")
    lease_expires_at: datetime
    payload: dict[str, Any]

    @classmethod
    def of(cls, value: feed.LeasedEvent) -> EventOut:
        return cls(
            event_id=value.event_id,
            type=value.type,
            created_at=value.created_at,
            agent_id=value.agent_id,
            thread_id=value.thread_id,
            delivery_count=value.delivery_count,
            lease_expires_at=value.lease_expires_at,
            payload=value.payload,
        )


class EventList(_Model):
    events: list[EventOut] = Field(description="Empty when nothing arrived within `wait`.")


class AckIn(_Request):
    event_ids: EventIds
    consumer: ConsumerField = DEFAULT_CONSUMER


class NackIn(AckIn):
    delay_seconds: float = Field(0, ge=0, description="Redeliver no sooner than this.")


class ExtendIn(AckIn):
    lease_seconds: float = Field(gt=0, description="New lease, counted from now.")


class AckOut(_Model):
    """Acks are idempotent: an id acked before is reported, not refused."""

    acked: list[str]
    already_acked: list[str]
    not_found: list[str] = Field(description="Never leased to this consumer (or not yours).")

    @classmethod
    def of(cls, value: feed.AckResult) -> AckOut:
        return cls(
            acked=list(value.acked),
            already_acked=list(value.already_acked),
            not_found=list(value.not_found),
        )


class NackOut(_Model):
    nacked: list[str]
    visible_at: datetime = Field(description="When the nacked events become deliverable.")
    finished: list[str] = Field(description="Already acked or dead: left alone.")
    not_found: list[str]

    @classmethod
    def of(cls, value: feed.NackResult) -> NackOut:
        return cls(
            nacked=list(value.nacked),
            visible_at=value.visible_at,
            finished=list(value.finished),
            not_found=list(value.not_found),
        )


class ExtendOut(_Model):
    extended: list[str]
    lease_expires_at: datetime
    not_leased: list[str] = Field(
        description="The lease had already expired or ended: another puller may hold it."
    )
    not_found: list[str]

    @classmethod
    def of(cls, value: feed.ExtendResult) -> ExtendOut:
        return cls(
            extended=list(value.extended),
            lease_expires_at=value.lease_expires_at,
            not_leased=list(value.not_leased),
            not_found=list(value.not_found),
        )


class DeadLetterOut(_Model):
    consumer: str
    scope: str = Field(description="The consumer's scope: an agent id, or `*` (workspace).")
    event_id: str
    type: str
    created_at: datetime
    agent_id: str | None
    thread_id: str | None
    delivery_count: int
    last_delivered_at: datetime | None
    dead_at: datetime | None
    payload: dict[str, Any]

    @classmethod
    def of(cls, value: feed.DeadLetter) -> DeadLetterOut:
        return cls(
            consumer=value.consumer,
            scope=value.scope,
            event_id=value.event_id,
            type=value.type,
            created_at=value.created_at,
            agent_id=value.agent_id,
            thread_id=value.thread_id,
            delivery_count=value.delivery_count,
            last_delivered_at=value.last_delivered_at,
            dead_at=value.dead_at,
            payload=value.payload,
        )


class DeadLetterList(_Model):
    events: list[DeadLetterOut]
    next_cursor: str | None


class Health(_Model):
    status: Literal["ok"] = "ok"


def _summary_fields(value: queries.MessageSummary) -> dict[str, Any]:
    return {
        "message_id": value.message_id,
        "agent_id": value.agent_id,
        "thread_id": value.thread_id,
        "folder": value.folder,
        "direction": value.direction,
        "from_": AddressOut.of(value.from_) if value.from_ else None,
        "to": [AddressOut.of(a) for a in value.to],
        "cc": [AddressOut.of(a) for a in value.cc],
        "subject": value.subject,
        "preview": value.preview,
        "date": value.date,
        "received_at": value.received_at,
        "labels": list(value.labels),
        "size": value.size,
        "attachment_count": value.attachment_count,
    }
