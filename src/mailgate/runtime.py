"""The composition root: build every service once from the settings.

Edges (the HTTP app, the SMTP server, the CLI) receive a :class:`Runtime` and call its
services; nothing reads settings or opens databases on its own.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from mailgate.clock import Clock, SystemClock
from mailgate.config import Settings, parse_listen
from mailgate.domain.delivery import RetryPolicy
from mailgate.domain.mime import ParseLimits
from mailgate.ids import new_id
from mailgate.services.agentmail import AgentMailViews
from mailgate.services.agentmail_lists import AgentMailLists
from mailgate.services.delivery import DeliveryService
from mailgate.services.domains import DomainService
from mailgate.services.drafts import DraftService
from mailgate.services.feed import FeedNotifier, FeedService
from mailgate.services.feedback import FeedbackService
from mailgate.services.inboxes import InboxService
from mailgate.services.ingest import IngestService
from mailgate.services.mailbox import MailboxService
from mailgate.services.outbound import OutboundService
from mailgate.services.outbound_admin import OutboundAdmin
from mailgate.services.policy import PolicyCache
from mailgate.services.queries import QueryService
from mailgate.services.rules_admin import RulesService
from mailgate.services.search import SearchService
from mailgate.services.sender_auth import DnsPythonResolver, SenderAuthenticator
from mailgate.services.tenancy import TenancyService
from mailgate.services.webhooks import WebhookService
from mailgate.store.blobs import BlobStore, LocalBlobStore, TieredBlobStore
from mailgate.store.committer import (
    Committer,
    DirectCommitter,
    GroupCommitter,
    LoopGroupCommitter,
)
from mailgate.store.db import Database
from mailgate.transports import Transport, build_transport
from mailgate.transports.capture import CapturedService


@dataclass
class Runtime:
    settings: Settings
    db: Database
    blobs: TieredBlobStore
    clock: Clock
    notifier: FeedNotifier
    committer: Committer
    tenancy: TenancyService
    ingest: IngestService
    feed: FeedService
    queries: QueryService
    policies: PolicyCache
    rules: RulesService
    mailbox: MailboxService
    sender_auth: SenderAuthenticator | None
    """None when ``settings.sender_auth`` is off."""
    feedback: FeedbackService
    outbound: OutboundService
    transport: Transport
    delivery: DeliveryService
    domains: DomainService
    captured: CapturedService
    outbound_admin: OutboundAdmin
    # The AgentMail face (/v0), push and MCP: built from the services above, after them.
    agentmail: AgentMailViews = field(init=False)
    inboxes: InboxService = field(init=False)
    agentmail_lists: AgentMailLists = field(init=False)
    drafts: DraftService = field(init=False)
    webhooks: WebhookService = field(init=False)
    search: SearchService = field(init=False)
    _closers: list[object] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        settings: Settings,
        *,
        clock: Clock | None = None,
        group_commit: bool = True,
        files: BlobStore | None = None,
    ) -> Runtime:
        """Wire everything. ``group_commit=False`` commits in the caller's thread (CLI);
        ``files`` replaces the local folder as the large-blob tier."""
        clock = clock or SystemClock()
        db = Database(settings.effective_database_url)
        blob_store = TieredBlobStore(
            db, files or LocalBlobStore(settings.effective_blob_dir), settings.blob_inline_max
        )
        notifier = FeedNotifier()
        committer: Committer
        if group_commit and db.is_sqlite:
            committer = LoopGroupCommitter(
                db, max_batch=settings.ingest_batch_max, on_commit=notifier.notify
            )
        elif group_commit:
            committer = GroupCommitter(
                db, max_batch=settings.ingest_batch_max, on_commit=notifier.notify
            )
        else:
            committer = DirectCommitter(db, on_commit=notifier.notify)
        limits = ParseLimits(
            max_header_bytes=settings.max_header_bytes, max_parts=settings.max_mime_parts
        )
        policies = PolicyCache(ttl=settings.recipient_cache_seconds)
        feedback = FeedbackService(db, clock, settings)
        runtime = cls(
            settings=settings,
            db=db,
            blobs=blob_store,
            clock=clock,
            notifier=notifier,
            committer=committer,
            tenancy=TenancyService(
                db,
                clock,
                settings.agent_domain,
                recipient_cache_seconds=settings.recipient_cache_seconds,
                default_tier=settings.default_tier,
            ),
            ingest=IngestService(
                committer,
                blob_store,
                clock,
                limits=limits,
                thread_window=timedelta(days=settings.thread_window_days),
                policies=policies,
                authserv_id=settings.effective_authserv_id,
                receipt_days=settings.webhook_receipt_days,
                feedback=feedback,
            ),
            feed=FeedService(db, settings, clock, notifier),
            queries=QueryService(db, blob_store),
            policies=policies,
            rules=RulesService(db, clock, policies, blob_store, limits),
            mailbox=MailboxService(
                db,
                committer,
                blob_store,
                clock,
                trash_retention=timedelta(days=settings.trash_retention_days),
            ),
            sender_auth=_sender_authenticator(settings),
            feedback=feedback,
            domains=DomainService(db, clock),
            captured=CapturedService(db, blob_store),
            outbound_admin=OutboundAdmin(db, clock),
            **_outbound_parts(settings, db, blob_store, clock, policies),
        )
        runtime.agentmail = AgentMailViews(db, blob_store, settings, clock=clock)
        runtime.inboxes = InboxService(
            db, runtime.tenancy, settings, clock, policies=runtime.policies
        )
        runtime.agentmail_lists = AgentMailLists(db, runtime.rules, runtime.outbound_admin)
        runtime.drafts = DraftService(db, blob_store, clock, settings, runtime.outbound)
        runtime.webhooks = WebhookService(db, clock, settings)
        runtime.search = SearchService(db)
        runtime.delivery.resolve_local = runtime.tenancy.resolve_recipient
        runtime.delivery.deliver_local = runtime.ingest.ingest
        runtime.outbound.on_signer(runtime._dkim_signer)
        return runtime

    def _dkim_signer(self, domain: str) -> Callable[[bytes], bytes] | None:
        """The DKIM signing function of a sending domain (``mailgate domain add``)."""
        signer = self.domains.signer_for(domain)
        return signer.sign if signer is not None else None

    async def aclose_outbound(self) -> None:
        """Close the transport's and the delivery service's connections (on the loop
        that opened them); the delivery worker does this when it stops."""
        await self.delivery.aclose()
        await self.transport.aclose()

    async def attach_loop(self) -> None:
        """Move loop-friendly work (SQLite group commit) onto the running loop."""
        if isinstance(self.committer, LoopGroupCommitter):
            await self.committer.attach()

    async def detach_loop(self) -> None:
        """Finish queued loop work; call before :meth:`close` when leaving the loop."""
        if isinstance(self.committer, LoopGroupCommitter):
            await self.committer.detach()

    def close(self) -> None:
        """Drain queued writes, then release the database."""
        if isinstance(self.committer, GroupCommitter | LoopGroupCommitter):
            self.committer.stop()
        self.db.dispose()


def _outbound_parts(
    settings: Settings,
    db: Database,
    blobs: TieredBlobStore,
    clock: Clock,
    policies: PolicyCache,
) -> dict[str, Any]:
    transport = build_transport(settings, db, blobs, clock)
    return {
        "outbound": OutboundService(db, blobs, clock, settings, policies),
        "transport": transport,
        "delivery": DeliveryService(
            db,
            blobs,
            clock,
            transport,
            retry=RetryPolicy(
                base_seconds=settings.retry_base_seconds,
                max_seconds=settings.retry_max_seconds,
                max_attempts=settings.delivery_max_attempts,
            ),
            lease=timedelta(seconds=settings.delivery_lease_seconds),
            worker_id=f"{socket.gethostname()}:{os.getpid()}:{new_id('wrk')[-8:]}",
        ),
    }


def _sender_authenticator(settings: Settings) -> SenderAuthenticator | None:
    """SPF/DKIM/DMARC/ARC checks over the configured resolvers (``ip`` or ``ip:port``;
    dnspython queries every nameserver on one port, so the first entry's port is used)."""
    if not settings.sender_auth:
        return None
    nameservers: list[str] | None = None
    port = 53
    if settings.dns_nameservers:
        nameservers = []
        for entry in settings.dns_nameservers:
            if entry.startswith("[") or entry.count(":") == 1:  # [v6]:port or v4:port
                host, entry_port = parse_listen(entry)
                port = port if nameservers else entry_port
                nameservers.append(host)
            else:  # a bare IPv4 or IPv6 address
                nameservers.append(entry)
    resolver = DnsPythonResolver(nameservers, port=port, timeout=settings.dns_timeout_seconds)
    return SenderAuthenticator(resolver, budget_seconds=settings.sender_auth_budget_seconds)
