"""The one schema for SQLite and PostgreSQL (SQLAlchemy Core).

Alembic migrations in ``migrations/versions`` are snapshots of this module; change
both together (``alembic revision --autogenerate`` drafts the migration).

Conventions: public string ids (``ids.new_id``) for everything an API returns;
an integer ``seq`` where order matters (feed, pagination); times are UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# INTEGER PRIMARY KEY is SQLite's rowid alias (autoincrementing, cheap); BIGINT elsewhere.
SeqType = BigInteger().with_variant(Integer(), "sqlite")


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on both backends (SQLite has no timezone type).

    Stored naive-UTC so SQLite's text comparison orders correctly.
    """

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to UtcDateTime")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC)


def _id(name: str = "id") -> Column[str]:
    return Column(name, String(40), primary_key=True)


def _fk(target: str, *, nullable: bool = False, name: str | None = None) -> Column[str]:
    col = name or target.split(".")[0].rstrip("s") + "_id"
    return Column(col, String(40), ForeignKey(target, ondelete="CASCADE"), nullable=nullable)


def _created() -> Column[datetime]:
    return Column("created_at", UtcDateTime(), nullable=False)


workspaces = Table(
    "workspaces",
    metadata,
    _id(),
    Column("name", String(200), nullable=False),
    _created(),
    # An authenticated, auto-approved known contact skips the rules (DESIGN §3).
    Column("contacts_bypass", Boolean, nullable=False, server_default=text("true")),
    # Bumped by every change to the workspace's default rules or contacts, so each
    # process's compiled-policy cache can tell it is stale (services/policy.py).
    Column("policy_version", Integer, nullable=False, server_default=text("0")),
)

owners = Table(
    "owners",
    metadata,
    _id(),
    _fk("workspaces.id"),
    Column("name", String(200), nullable=False),
    Column("email", String(320)),
    _created(),
)

agents = Table(
    "agents",
    metadata,
    _id(),
    _fk("workspaces.id"),
    Column("name", String(200), nullable=False),
    _created(),
    Column("policy_version", Integer, nullable=False, server_default=text("0")),
    # Outbound rollout stage (domain/guards.py TIERS); set from settings.default_tier.
    Column("tier", String(30), nullable=False, server_default=text("'reply_only'")),
    # The AgentMail face (/v0) calls an agent an inbox: its display name, the caller's
    # idempotent ``client_id`` and free-form metadata live here (api/v0/).
    Column("display_name", Text),
    Column("client_id", String(200)),
    Column("inbox_metadata", JSON),
    Column("updated_at", UtcDateTime()),
    UniqueConstraint("workspace_id", "name"),
    UniqueConstraint("workspace_id", "client_id"),
)

agent_addresses = Table(
    "agent_addresses",
    metadata,
    Column("address", String(320), primary_key=True),  # lower-cased
    _fk("agents.id"),
    _fk("workspaces.id"),
    _created(),
)

api_keys = Table(
    "api_keys",
    metadata,
    _id(),
    _fk("workspaces.id"),
    _fk("owners.id", nullable=True),
    _fk("agents.id", nullable=True),
    Column("kind", String(10), nullable=False),  # owner | agent
    Column("name", String(200), nullable=False),
    Column("secret_hash", String(64), nullable=False),  # sha256 hex of the secret part
    Column("scopes", JSON, nullable=False),
    _created(),
    Column("revoked_at", UtcDateTime()),
)

threads = Table(
    "threads",
    metadata,
    _id(),
    _fk("workspaces.id"),
    _fk("agents.id"),
    Column("subject", Text, nullable=False),
    Column("subject_key", String(64), nullable=False),  # hash of the normalised subject
    Column("participants", JSON, nullable=False),  # sorted lower-cased addresses
    Column("message_count", Integer, nullable=False),
    Column("first_message_at", UtcDateTime(), nullable=False),
    Column("last_message_at", UtcDateTime(), nullable=False),
    Index(None, "agent_id", "subject_key", "last_message_at"),
    Index(None, "agent_id", "last_message_at"),
    Index(None, "workspace_id", "last_message_at"),
)

# Every Message-ID seen by an agent (own ids and those in References) -> its thread,
# so replies join a thread even when the message they answer never reached us.
thread_refs = Table(
    "thread_refs",
    metadata,
    _fk("agents.id"),
    Column("ref_key", String(64), nullable=False),  # sha256 of the Message-ID
    _fk("threads.id"),
    UniqueConstraint("agent_id", "ref_key"),
)

messages = Table(
    "messages",
    metadata,
    Column("seq", SeqType, primary_key=True, autoincrement=True),
    Column("id", String(40), nullable=False, unique=True),
    _fk("workspaces.id"),
    _fk("agents.id"),
    _fk("threads.id"),
    Column("direction", String(10), nullable=False),  # inbound | outbound
    Column("folder", String(20), nullable=False),
    Column("source", String(20), nullable=False),  # smtp | webhook:<provider> | api
    Column("dedup_key", String(64), nullable=False),  # sha256(Message-ID, raw sha256)
    Column("rfc_message_id", Text, nullable=False),
    Column("message_id_generated", Boolean, nullable=False),
    Column("raw_sha256", String(64), nullable=False),
    Column("raw_size", BigInteger, nullable=False),
    Column("subject", Text, nullable=False),
    Column("from_addr", JSON, nullable=False),  # [{"name", "address"}]
    Column("from_address", String(320)),  # first From address, lower-cased: the filter key
    Column("to_addrs", JSON, nullable=False),
    Column("cc_addrs", JSON, nullable=False),
    Column("reply_to", JSON, nullable=False),
    Column("sent_date", UtcDateTime()),
    Column("in_reply_to", Text),
    Column("references", JSON, nullable=False),
    Column("text_body", Text),
    Column("html_body", Text),
    Column("preview", String(300), nullable=False),
    Column("defects", JSON, nullable=False),
    Column("labels", JSON, nullable=False),
    Column("mail_from", String(1000)),
    Column("rcpt_to", String(320)),
    Column("client_address", String(100)),
    Column("helo", String(300)),
    Column("received_at", UtcDateTime(), nullable=False),
    # When the message first reached the agent (inbox); NULL while it was only ever
    # held, quarantined or trashed by a rule. Agent keys see only visible messages.
    Column("visible_at", UtcDateTime()),
    # Where `restore` puts a trashed message back; where release came from.
    Column("previous_folder", String(20)),
    Column("folder_changed_at", UtcDateTime()),  # trash retention counts from here
    Column("decision", JSON),  # RuleDecision.as_dict(): action, rule id, reasons
    Column("auth_results", JSON),  # sender authentication, structured
    UniqueConstraint("agent_id", "dedup_key"),
    Index(None, "agent_id", "folder", "seq"),
    Index(None, "thread_id", "seq"),
    Index(None, "workspace_id", "seq"),
    Index(None, "agent_id", "from_address", "seq"),
    Index(None, "workspace_id", "from_address", "seq"),
    Index(None, "workspace_id", "folder", "seq"),
    Index(None, "folder", "folder_changed_at"),
)

attachments = Table(
    "attachments",
    metadata,
    _id(),
    Column("message_id", String(40), ForeignKey("messages.id", ondelete="CASCADE"), nullable=False),
    Column("position", Integer, nullable=False),
    Column("filename", Text),
    Column("content_type", String(255), nullable=False),
    Column("disposition", String(20)),
    Column("content_id", Text),
    Column("size", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Index(None, "message_id"),
)

events = Table(
    "events",
    metadata,
    Column("seq", SeqType, primary_key=True, autoincrement=True),
    Column("id", String(40), nullable=False, unique=True),
    _fk("workspaces.id"),
    _fk("agents.id", nullable=True),
    Column("type", String(60), nullable=False),
    Column("thread_id", String(40)),
    Column("payload", JSON, nullable=False),
    _created(),
    Index(None, "agent_id", "seq"),
    Index(None, "workspace_id", "seq"),
    # Never reuse a seq after the newest event is deleted: a cursor may have passed it.
    sqlite_autoincrement=True,
)

# A named subscription. scope is an agent id (agent keys) or "*" (the whole workspace,
# owner keys); each consumer materialises deliveries past its cursor as it pulls.
consumers = Table(
    "consumers",
    metadata,
    _id(),
    _fk("workspaces.id"),
    Column("scope", String(40), nullable=False),
    Column("name", String(200), nullable=False),
    Column("cursor_seq", BigInteger, nullable=False),
    _created(),
    UniqueConstraint("workspace_id", "scope", "name"),
)

# One row per (consumer, event): SQS-style visibility. A pending row is deliverable
# once visible_at has passed; leasing pushes visible_at forward, so an expired lease
# redelivers with no sweeper.
deliveries = Table(
    "deliveries",
    metadata,
    Column(
        "consumer_id",
        String(40),
        ForeignKey("consumers.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("event_seq", BigInteger, primary_key=True),
    Column("event_id", String(40), nullable=False),
    Column("order_key", String(40), nullable=False),  # thread id, else the event id
    Column("state", String(10), nullable=False),  # pending | acked | dead
    Column("delivery_count", Integer, nullable=False),
    Column("visible_at", UtcDateTime(), nullable=False),
    Column("leased", Boolean, nullable=False),
    Column("last_delivered_at", UtcDateTime()),
    Column("finished_at", UtcDateTime()),
    # Partial indexes over pending rows only: a pull costs what is in flight, not
    # what was ever delivered.
    Index(
        "ix_deliveries_pending_seq",
        "consumer_id",
        "event_seq",
        sqlite_where=text("state = 'pending'"),
        postgresql_where=text("state = 'pending'"),
    ),
    Index(
        "ix_deliveries_pending_order",
        "consumer_id",
        "order_key",
        "event_seq",
        sqlite_where=text("state = 'pending'"),
        postgresql_where=text("state = 'pending'"),
    ),
    Index(None, "consumer_id", "state", "visible_at"),
    Index(None, "consumer_id", "event_id"),
)

# Small blobs live in the database: written in the ingest transaction, they share its
# (group) commit instead of paying two fsyncs each as files; see store/blobs.py.
blobs = Table(
    "blobs",
    metadata,
    Column("sha256", String(64), primary_key=True),
    Column("size", BigInteger, nullable=False),
    Column("data", LargeBinary, nullable=False),
)

# Ordered inbound/outbound rules: agent_id NULL = a workspace default, run after the
# agent's own. The condition is the JSON of mailgate.domain.rules (validated on write).
rules = Table(
    "rules",
    metadata,
    _id(),
    _fk("workspaces.id"),
    _fk("agents.id", nullable=True),
    Column("name", String(200), nullable=False),
    Column("position", Integer, nullable=False),
    Column("enabled", Boolean, nullable=False),
    Column("direction", String(10), nullable=False),
    Column("action", String(20), nullable=False),
    Column("condition", JSON, nullable=False),
    _created(),
    Column("updated_at", UtcDateTime(), nullable=False),
    Index(None, "workspace_id", "agent_id", "position"),
)

# Known senders. scope is the agent id, or "*" for the whole workspace, so that one
# unique index covers both (NULLs would not collide in a unique index).
contacts = Table(
    "contacts",
    metadata,
    _id(),
    _fk("workspaces.id"),
    _fk("agents.id", nullable=True),
    Column("scope", String(40), nullable=False),
    Column("kind", String(10), nullable=False),  # address | domain
    Column("value", String(320), nullable=False),  # lower-cased
    Column("name", String(200), nullable=False),
    Column("auto_approve", Boolean, nullable=False),
    _created(),
    UniqueConstraint("workspace_id", "scope", "value"),
)

# Provider deliveries already accepted (Mailgun token, Postmark MessageID): a retry is
# answered from here, and a replayed token with a different body is refused. Written
# in the ingest transaction; rows expire after the provider's retry window.
webhook_receipts = Table(
    "webhook_receipts",
    metadata,
    Column("provider", String(20), primary_key=True),
    Column("event_id", String(200), primary_key=True),
    Column("body_sha256", String(64), nullable=False),
    Column("results", JSON, nullable=False),  # [{"agent_id", "message_id", "thread_id"}]
    _created(),
    Column("expires_at", UtcDateTime(), nullable=False),
    Index(None, "expires_at"),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("seq", SeqType, primary_key=True, autoincrement=True),
    Column("id", String(40), nullable=False, unique=True),
    Column("workspace_id", String(40)),
    Column("actor", String(100), nullable=False),  # owner:<id> | agent:<id> | cli | system
    Column("action", String(60), nullable=False),
    Column("target_type", String(40)),
    Column("target_id", String(40)),
    Column("detail", JSON, nullable=False),
    _created(),
    Index(None, "workspace_id", "seq"),
)


# -- outbound ---------------------------------------------------------------------------

# One agent send/reply/forward (or a system notification to owners): its policy
# decision, its state and its delivery bookkeeping. The delivery worker claims rows in
# state `queued` whose next_attempt_at has passed, holding a lease until
# lease_expires_at (an expired lease is claimable again: a crashed worker's row).
outbound = Table(
    "outbound",
    metadata,
    Column("seq", SeqType, primary_key=True, autoincrement=True),
    Column("id", String(40), nullable=False, unique=True),
    _fk("workspaces.id"),
    _fk("agents.id", nullable=True),  # NULL: a system notification
    Column("kind", String(20), nullable=False),  # send | reply | forward | notification
    Column("state", String(20), nullable=False),  # see domain/delivery.py STATES
    Column("decision", JSON, nullable=False),  # OutboundDecision.as_dict()
    Column("message_id", String(40)),  # the stored copy in messages (outbox/sent)
    Column("thread_id", String(40)),
    Column("replied_message_id", String(40)),  # the message a reply/forward answers
    Column("rfc_message_id", Text, nullable=False),  # stable across retries
    Column("subject", Text, nullable=False, server_default=text("''")),
    Column("mail_from", String(320), nullable=False),
    Column("recipients", JSON, nullable=False),  # every envelope recipient (to+cc+bcc)
    Column("raw_sha256", String(64), nullable=False),
    Column("raw_size", BigInteger, nullable=False),
    Column("transport", String(20)),
    Column("provider_message_id", String(200)),  # e.g. SendGrid's X-Message-Id
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("next_attempt_at", UtcDateTime()),
    Column("lease_owner", String(100)),
    Column("lease_expires_at", UtcDateTime()),
    Column("last_error", Text),
    Column("expires_at", UtcDateTime()),  # pending approval lapses at this time
    _created(),
    Column("updated_at", UtcDateTime(), nullable=False),
    Column("sent_at", UtcDateTime()),
    Column("delivered_at", UtcDateTime()),
    Index(None, "state", "next_attempt_at"),
    Index(None, "agent_id", "created_at"),
    Index(None, "workspace_id", "seq"),
    Index(None, "agent_id", "seq"),
    Index(None, "thread_id", "created_at"),
    Index(None, "rfc_message_id"),
    Index(None, "provider_message_id"),
)

# Per-recipient delivery status; also what per-domain rate limits count.
outbound_recipients = Table(
    "outbound_recipients",
    metadata,
    Column(
        "outbound_id",
        String(40),
        ForeignKey("outbound.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("address", String(320), primary_key=True),  # lower-cased
    Column("workspace_id", String(40), nullable=False),
    Column("agent_id", String(40)),
    Column("domain", String(255), nullable=False),
    Column("kind", String(5), nullable=False),  # to | cc | bcc
    Column("status", String(20), nullable=False),  # queued|sent|delivered|bounced|...
    Column("detail", Text),
    _created(),
    Column("updated_at", UtcDateTime(), nullable=False),
    Index(None, "agent_id", "domain", "created_at"),
    Index(None, "address"),
)

# One row per transport attempt, inserted (and committed) before the transport is
# called: an attempt with no outcome is one a worker died in (the crash boundary).
delivery_attempts = Table(
    "delivery_attempts",
    metadata,
    _id(),
    Column(
        "outbound_id", String(40), ForeignKey("outbound.id", ondelete="CASCADE"), nullable=False
    ),
    Column("number", Integer, nullable=False),
    Column("transport", String(20), nullable=False),
    Column("worker", String(100), nullable=False),
    Column("started_at", UtcDateTime(), nullable=False),
    Column("finished_at", UtcDateTime()),
    Column("outcome", String(20)),  # sent | deferred | failed | interrupted; NULL: running
    Column("code", Integer),  # SMTP reply code or HTTP status
    Column("detail", Text),
    UniqueConstraint("outbound_id", "number"),
)

# At most one verdict per held request (the unique constraint is what makes two
# simultaneous approvals execute once).
approvals = Table(
    "approvals",
    metadata,
    _id(),
    Column(
        "outbound_id",
        String(40),
        ForeignKey("outbound.id", ondelete="CASCADE"),
        nullable=False,
        unique=True,
    ),
    _fk("workspaces.id"),
    Column("actor", String(100), nullable=False),
    Column("verdict", String(20), nullable=False),  # approved | rejected | expired
    Column("comment", Text, nullable=False),
    _created(),
)

# Idempotency-Key records (IETF httpapi draft, Stripe semantics), per agent. A row is
# `in_flight` from the claim until the response is stored; an in-flight row whose
# locked_until passed belongs to a crashed request and may be taken over.
idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("agent_id", String(40), ForeignKey("agents.id", ondelete="CASCADE"), primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("workspace_id", String(40), nullable=False),
    Column("endpoint", String(40), nullable=False),
    Column("request_sha256", String(64), nullable=False),
    Column("state", String(10), nullable=False),  # in_flight | done
    Column("locked_until", UtcDateTime()),
    Column("response_status", Integer),
    Column("response_body", JSON),
    Column("outbound_id", String(40)),
    _created(),
    Column("expires_at", UtcDateTime(), nullable=False),
    Index(None, "expires_at"),
)

# Addresses the workspace will not send to, with why and who said so.
suppressions = Table(
    "suppressions",
    metadata,
    _id(),
    _fk("workspaces.id"),
    Column("address", String(320), nullable=False),  # lower-cased
    Column("reason", String(20), nullable=False),  # hard_bounce|complaint|unsubscribe|manual
    Column("source", String(40), nullable=False),  # dsn | sendgrid | api | cli
    Column("detail", Text, nullable=False),
    Column("outbound_id", String(40)),
    _created(),
    UniqueConstraint("workspace_id", "address"),
)

# Outbound recipient allow/deny lists (address or domain), per agent or workspace-wide
# (scope "*"); the allow list is also what the `allowlisted_domains` tier admits.
recipient_lists = Table(
    "recipient_lists",
    metadata,
    _id(),
    _fk("workspaces.id"),
    _fk("agents.id", nullable=True),
    Column("scope", String(40), nullable=False),
    Column("list", String(5), nullable=False),  # allow | deny
    Column("kind", String(10), nullable=False),  # address | domain
    Column("value", String(320), nullable=False),  # lower-cased
    Column("reason", String(500)),  # why it is listed (AgentMail's list entry reason)
    _created(),
    UniqueConstraint("workspace_id", "scope", "list", "value"),
)

# DKIM keys per sending domain (`mailgate domain add`). The private key must be usable
# to sign, so it is stored as PEM: protect the database like the key it holds.
sending_domains = Table(
    "sending_domains",
    metadata,
    Column("domain", String(255), primary_key=True),  # lower-cased
    Column("selector", String(63), nullable=False),
    Column("private_key_pem", Text, nullable=False),
    Column("public_key_b64", Text, nullable=False),
    _created(),
)

# What the capture transport "sent": the embedded default's outbox to inspect.
captured = Table(
    "captured",
    metadata,
    Column("seq", SeqType, primary_key=True, autoincrement=True),
    Column("id", String(40), nullable=False, unique=True),
    _fk("workspaces.id"),
    Column("agent_id", String(40)),
    Column("outbound_id", String(40), nullable=False),
    Column("mail_from", String(320), nullable=False),
    Column("recipients", JSON, nullable=False),
    Column("rfc_message_id", Text, nullable=False),
    Column("subject", Text, nullable=False),
    Column("raw_sha256", String(64), nullable=False),
    Column("raw_size", BigInteger, nullable=False),
    _created(),
    Index(None, "workspace_id", "seq"),
    Index(None, "agent_id", "seq"),
)


# An agent's unsent message (the AgentMail face's drafts). Sending one turns it into an
# outbound request through the policy gateway; ``outbound_id`` then names that request.
drafts = Table(
    "drafts",
    metadata,
    Column("seq", SeqType, primary_key=True, autoincrement=True),
    Column("id", String(40), nullable=False, unique=True),
    _fk("workspaces.id"),
    _fk("agents.id"),
    Column("client_id", String(200)),
    Column("to_addrs", JSON, nullable=False),  # strings as given: "Name <a@b>" or "a@b"
    Column("cc_addrs", JSON, nullable=False),
    Column("bcc_addrs", JSON, nullable=False),
    Column("reply_to", JSON, nullable=False),
    Column("subject", Text),
    Column("text_body", Text),
    Column("html_body", Text),
    # [{"filename", "content_type", "content_id", "disposition", "sha256", "size"}];
    # the bytes are blobs, like a message's attachments.
    Column("attachments", JSON, nullable=False),
    Column("labels", JSON, nullable=False),
    Column("in_reply_to", String(40)),  # our message id the draft answers
    Column("forward_of", String(40)),  # our message id the draft forwards
    Column("send_status", String(20)),  # NULL | sending | failed
    Column("outbound_id", String(40)),
    _created(),
    Column("updated_at", UtcDateTime(), nullable=False),
    UniqueConstraint("agent_id", "client_id"),
    Index(None, "agent_id", "seq"),
    Index(None, "workspace_id", "seq"),
)

# Push subscriptions (Standard Webhooks / Svix signatures). Each is also a consumer of
# the durable feed named ``webhook:<id>``, so a push is leased, retried with backoff,
# acked on 2xx and dead-lettered like any pull: at least once, de-duplicable by event id.
webhooks = Table(
    "webhooks",
    metadata,
    _id(),
    _fk("workspaces.id"),
    _fk("agents.id", nullable=True),  # set for an agent's (inbox) webhook
    Column("url", Text, nullable=False),
    Column("event_types", JSON),  # None: every type
    Column("inbox_ids", JSON),  # agent ids to filter on; None: every agent in scope
    # The signing key ("whsec_" + base64). Kept readable because we sign with it; it
    # authenticates us to the receiver, not a caller to us, so it is not an API secret.
    Column("secret", String(100), nullable=False),
    Column("enabled", Boolean, nullable=False),
    Column("client_id", String(200)),
    _created(),
    Column("updated_at", UtcDateTime(), nullable=False),
    UniqueConstraint("workspace_id", "client_id"),
    Index(None, "enabled"),
)
