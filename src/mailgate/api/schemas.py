"""The JSON shapes of the native ``/v1`` API (requests and responses).

These models are the public contract and what ``/openapi.json`` documents; services
return plain dataclasses and the ``of`` constructors here map them, so a change of
storage never leaks into the wire format by accident. Field names are snake_case; the
sender is ``from`` on the wire (a Python keyword, hence ``from_`` with an alias).
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from mailgate.domain import extract
from mailgate.services import feed, mailbox, queries

Folder = Literal["inbox", "review", "quarantine", "trash", "outbox", "sent"]
"""``inbox``: delivered to the agent; ``review``: held by a rule for a human;
``quarantine``: held and kept out of every agent feed; ``trash``: soft-deleted."""
HeldFolder = Literal["review", "quarantine"]

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
    # from_attributes: responses are built from the services' result dataclasses, field
    # by field by name (nested ones too). validate_by_name lets ``from_`` be filled by
    # its Python name while the wire (and OpenAPI) say ``from``.
    model_config = ConfigDict(
        from_attributes=True, validate_by_name=True, validate_by_alias=True, frozen=True
    )

    @classmethod
    def of(cls, value: object) -> Self:
        """The response for a service result of the same shape."""
        return cls.model_validate(value)


class _Request(BaseModel):
    # A misspelt field ("delay" for "delay_seconds") must fail loudly, not be ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class AddressOut(_Model):
    name: str | None = Field(description="Display name, null when the header gave none.")
    address: str


class MessageSummaryOut(_Model):
    """A message as listings show it."""

    message_id: str
    agent_id: str
    thread_id: str
    folder: Folder
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
    previous_folder: Folder | None = Field(
        description="Where `restore` puts a trashed message; where released mail was held."
    )
    visible_at: datetime | None = Field(
        description="When the message first reached its agent; null while it never has "
        "(held, quarantined or trashed by a rule). Agent keys see only messages with one."
    )
    decision: dict[str, Any] | None = Field(
        description="The inbound rule decision (`action`, `rule_id`, `rule_name`, "
        "`reasons`, `contact_bypass`); owner keys only, null for agent keys."
    )


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
    auth_results: dict[str, Any] | None = Field(
        description="Sender authentication (SPF, DKIM, DMARC, ARC) as checked on arrival."
    )
    extracted_text: str | None = Field(
        None,
        description="The new text of the message: quoted history and signature removed, "
        "at most `max_chars` long. Null when the message has no body.",
    )
    extracted_html: str | None = Field(
        None,
        description="The HTML body without quoted history, sanitised (safe to render), "
        "at most `max_chars` long. Null when there is no HTML body.",
    )
    extracted_truncated: bool = Field(
        False, description="`extracted_text` or `extracted_html` was cut at `max_chars`."
    )

    @classmethod
    def of_detail(
        cls,
        value: queries.MessageDetail,
        extracted: tuple[extract.Extracted, extract.Extracted] | None = None,
    ) -> MessageOut:
        """The detail fields plus the summary's, flattened as the wire has them, and
        the extracted text and HTML when given."""
        fields = {**_fields(value.summary), **_fields(value)}
        if extracted is not None:
            text, html = extracted
            fields["extracted_text"] = text.text
            fields["extracted_html"] = html.text
            fields["extracted_truncated"] = text.truncated or html.truncated
        return cls.model_validate(fields)


class AttachmentTextOut(_Model):
    """What an agent can read of one attachment."""

    attachment_id: str
    content_type: str
    filename: str | None
    extracted: bool = Field(
        description="The file is of a readable type (PDF, DOCX, HTML, text) and was read."
    )
    text: str | None = Field(description="At most `max_chars` characters; null if not read.")
    truncated: bool
    reason: str | None = Field(
        description="Why there is no or only partial text: `too_large`, `unsupported_type`, "
        "`unreadable`, `partly_unreadable`, `encrypted`, `expands_too_large`, "
        "`page_limit`, `no_text`."
    )

    @classmethod
    def of_text(cls, attachment_id: str, value: extract.AttachmentText) -> AttachmentTextOut:
        return cls.model_validate({"attachment_id": attachment_id, **_fields(value)})


class MessageList(_Model):
    messages: list[MessageSummaryOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page.")


class TransitionOut(_Model):
    operation: Literal["trash", "restore", "release"]
    from_folder: Folder
    to_folder: Folder
    changed_at: datetime
    reached_agent: bool = Field(
        description="The agent saw the message for the first time (`message.received`)."
    )


class FolderChangeOut(_Model):
    """A message moved between folders: where it is now and the move itself."""

    message: MessageSummaryOut
    transition: TransitionOut

    @classmethod
    def of_change(cls, value: mailbox.FolderChange) -> FolderChangeOut:
        return cls.model_validate({"message": value.message, "transition": value})


class ThreadOut(_Model):
    thread_id: str
    agent_id: str
    subject: str
    participants: list[str] = Field(description="Lower-cased addresses, the agent's excluded.")
    message_count: int
    first_message_at: datetime
    last_message_at: datetime


class ThreadDetailOut(ThreadOut):
    messages: list[MessageSummaryOut] = Field(description="Oldest first.")

    @classmethod
    def of_detail(cls, value: queries.ThreadDetail) -> ThreadDetailOut:
        return cls.model_validate({**_fields(value.thread), "messages": value.messages})


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


class NackOut(_Model):
    nacked: list[str]
    visible_at: datetime = Field(description="When the nacked events become deliverable.")
    finished: list[str] = Field(description="Already acked or dead: left alone.")
    not_found: list[str]


class ExtendOut(_Model):
    extended: list[str]
    lease_expires_at: datetime
    not_leased: list[str] = Field(
        description="The lease had already expired or ended: another puller may hold it."
    )
    not_found: list[str]


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


class DeadLetterList(_Model):
    events: list[DeadLetterOut]
    next_cursor: str | None


class Health(_Model):
    status: Literal["ok"] = "ok"


def _fields(value: Any) -> dict[str, Any]:
    """A result dataclass's fields, one level deep (nested values stay objects)."""
    return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
