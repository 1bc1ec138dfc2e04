"""Outbound feedback: what happened to sent mail, and what the workspace does about it.

Two sources report on mail after a transport accepted it:

* **DSNs** (RFC 3464 bounces) arrive as mail to the agent that sent the original (its
  address is the envelope sender). Ingest calls :meth:`FeedbackService.apply_inbound`
  inside its own transaction, so the bounce is stored (and filed by the agent's rules)
  *and* applied, or neither. A DSN is matched to its request by the returned
  original's Message-ID (ours, stable across retries), else by ``Original-Envelope-Id``
  (we send ``ENVID=<outbound id>``), and only among the receiving agent's requests:
  mail to one agent can never bounce another agent's or workspace's mail.
* **SendGrid's Event Webhook** (:meth:`FeedbackService.apply_sendgrid`): signature
  and timestamp checked first, each event applied once (its ``sg_event_id`` is a
  ``webhook_receipts`` row, provider ``sendgrid_events``, claimed with ``ON CONFLICT DO
  NOTHING`` in the same transaction, so a retry or a concurrent duplicate post finds it
  and skips), matched by our ``outbound_id`` custom arg, else by ``sg_message_id``'s
  ``X-Message-Id`` prefix.

Applying a report to one recipient of one request:

1. the recipient's status moves only *forward* (:data:`STATUS_RANK`): a late
   ``deferred`` never hides a ``delivered``, a complaint overrides everything, and a
   repeated report changes nothing (no second event);
2. a hard bounce, a spam report, an unsubscribe or an address-level drop adds a
   workspace suppression (once; an existing one, e.g. ``manual``, is kept) and an
   audit entry;
3. the change is announced to the sending agent: ``outbound.delivered``,
   ``outbound.bounced`` (hard and soft failures, drops: ``permanent`` says which) or
   ``outbound.complained`` (spam reports and unsubscribes);
4. the request's own state follows its recipients while it is ``sent``: every
   recipient failed → ``bounced`` (``failed`` when no failure was permanent, as the
   retry policy uses the word), every recipient reached → ``delivered``; otherwise it
   stays ``sent`` and the recipients tell the detail.

Requests without an agent (owner notifications) get statuses but no suppression and
no event, as the delivery worker treats their 5xx: a bouncing owner address says
nothing about any agent.

**Trust and the tier drop.** After a post that carried complaints, each agent
concerned gets its :class:`~mailgate.domain.trust.TrustFigure` recomputed from its
recipients' statuses; when ``should_lower_tier`` says so, its tier goes down one step
(conditional update, audited ``agent.tier_lowered`` with the figures). The figure then
counts only mail sent since that drop (or the last 30 days, whichever is shorter), so
each further step needs ``complaint_min_sample`` fresh recipients and a fresh
complaint rate over the threshold, rather than every new complaint stepping down again
on the old evidence.

**Suppressions** are managed by owners (API) and the operator (CLI); agent keys get
``403``. :meth:`FeedbackService.is_suppressed` is the read the outbound policy runs in
its own transaction.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Connection, Executable, Row, Table, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from mailgate.clock import Clock
from mailgate.config import Settings
from mailgate.domain import delivery as states
from mailgate.domain import dsn, sendgrid_events, tiers
from mailgate.domain.dsn import DeliveryReport, RecipientStatus
from mailgate.domain.keys import MESSAGES_READ, Principal
from mailgate.domain.sendgrid_events import SendGridEvent
from mailgate.domain.trust import WINDOW_DAYS, TierVerdict, TrustFigure
from mailgate.errors import ConfigError, Conflict, InboundDisabled, NotFound, ValidationFailed
from mailgate.ids import new_id
from mailgate.services import audit
from mailgate.services.events import (
    OUTBOUND_BOUNCED,
    OUTBOUND_COMPLAINED,
    OUTBOUND_DELIVERED,
    append_event,
)
from mailgate.services.mailbox import Actor, Operator
from mailgate.services.queries import (
    DEFAULT_LIMIT,
    Page,
    check_limit,
    decode_time_cursor,
    encode_cursor,
)
from mailgate.store.db import Database
from mailgate.store.schema import (
    agents,
    audit_log,
    outbound,
    outbound_recipients,
    suppressions,
    webhook_receipts,
    workspaces,
)

__all__ = [
    "RECEIPT_PROVIDER",
    "SUPPRESSION_REASONS",
    "AgentTrust",
    "FeedbackOutcome",
    "FeedbackService",
    "SendGridResult",
    "Suppression",
    "TierChange",
]

log = logging.getLogger(__name__)

RECEIPT_PROVIDER: Final = "sendgrid_events"
"""``webhook_receipts.provider`` of applied Event Webhook events."""
SUPPRESSION_REASONS: Final = ("hard_bounce", "complaint", "unsubscribe", "dropped", "manual")
STATUS_RANK: Final = {
    "queued": 0,
    "sent": 1,
    "deferred": 2,
    "delivered": 3,
    "failed": 4,
    "bounced": 5,
    "dropped": 5,
    "unsubscribed": 6,
    "complained": 7,
}
"""How far along a recipient's status is; a report applies only if it moves it on."""
_FAILED: Final = frozenset({"failed", "bounced", "dropped"})
_REACHED: Final = frozenset({"delivered", "unsubscribed", "complained"})
_SENT: Final = frozenset({"sent", "delivered", "failed", "bounced", "unsubscribed", "complained"})
"""Recipient statuses a transport accepted (``deferred`` is the worker's retry state)."""
_EVENT_OF: Final = {
    "delivered": OUTBOUND_DELIVERED,
    "failed": OUTBOUND_BOUNCED,
    "bounced": OUTBOUND_BOUNCED,
    "dropped": OUTBOUND_BOUNCED,
    "complained": OUTBOUND_COMPLAINED,
    "unsubscribed": OUTBOUND_COMPLAINED,
}
_ADDRESS = re.compile(r"[^\s@<>()\[\]\\,;:\"]{1,64}@[^\s@<>()\[\]\\,;:\"]{1,255}")
_MAX_DETAIL: Final = 1000

_Row = Row[Any]


@dataclass(frozen=True, slots=True)
class FeedbackOutcome:
    """What one report did to one recipient of one request."""

    source: str
    """``dsn`` or ``sendgrid``."""
    recipient: str
    outbound_id: str | None
    """None: no request of ours (within reach) matched the report."""
    status: str | None
    """The recipient status the report stands for (None: nothing to apply)."""
    changed: bool
    """The status moved (False: unmatched, or already as far along)."""
    suppressed: str | None = None
    """The suppression reason added by this report, if one was added."""
    detail: str = ""


@dataclass(frozen=True, slots=True)
class TierChange:
    agent_id: str
    workspace_id: str
    from_tier: str
    to_tier: str
    figure: TrustFigure
    reason: str


@dataclass(frozen=True, slots=True)
class SendGridResult:
    """What one Event Webhook post did, all of it committed."""

    received: int
    applied: int
    """Events matched to a request and applied (changed or not)."""
    duplicates: int
    """Events applied by an earlier post (SendGrid retries)."""
    ignored: int
    """Events that mean nothing here (processed, open, click, ...)."""
    unmatched: int
    outcomes: tuple[FeedbackOutcome, ...]
    tier_changes: tuple[TierChange, ...]


@dataclass(frozen=True, slots=True)
class Suppression:
    suppression_id: str
    workspace_id: str
    address: str
    reason: str
    source: str
    detail: str
    outbound_id: str | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class AgentTrust:
    """An agent's tier and its trust figure over the last 30 days."""

    agent_id: str
    tier: str
    figure: TrustFigure
    verdict: TierVerdict
    """What :meth:`TrustFigure.should_lower_tier` says of this figure now."""


@dataclass(slots=True)
class _Target:
    """A request a report was matched to, with its recipients' statuses as read."""

    id: str
    workspace_id: str
    agent_id: str | None
    thread_id: str | None
    state: str
    statuses: dict[str, str]
    changed: bool = False


class FeedbackService:
    """DSNs, provider events, suppressions and trust; see the module docstring."""

    def __init__(self, db: Database, clock: Clock, settings: Settings) -> None:
        self.db = db
        self.clock = clock
        self.settings = settings
        self._key: tuple[str, ec.EllipticCurvePublicKey] | None = None

    # -- DSNs ----------------------------------------------------------------------------

    def apply_inbound(
        self,
        conn: Connection,
        raw: bytes,
        *,
        workspace_id: str,
        agent_id: str,
        now: datetime,
    ) -> list[FeedbackOutcome]:
        """The ingest hook: apply ``raw`` if it is a delivery report, inside the ingest
        transaction. Costs one header scan for ordinary mail.

        A failure here is logged and rolled back to a savepoint, never raised: losing
        the bounce's feedback is better than refusing (and so losing) the message.
        """
        if not dsn.is_delivery_report(raw):
            return []
        report = dsn.parse_report(raw)
        if report is None:
            return []
        try:
            with conn.begin_nested():
                return self.apply_dsn(
                    conn, report, now=now, workspace_id=workspace_id, agent_id=agent_id
                )
        except Exception:
            log.exception("a delivery report could not be applied; the message is kept")
            return []

    def apply_dsn(
        self,
        conn: Connection,
        report: DeliveryReport,
        *,
        now: datetime,
        workspace_id: str | None = None,
        agent_id: str | None = None,
    ) -> list[FeedbackOutcome]:
        """Apply a parsed DSN in the caller's transaction.

        ``workspace_id``/``agent_id`` narrow the requests it may match: ingest passes
        the receiving agent's, so a report can only concern that agent's own mail.
        Returns one outcome per reported recipient (unmatched ones included).
        """
        target = self._find_for_report(conn, report, workspace_id, agent_id)
        outcomes: list[FeedbackOutcome] = []
        for entry in report.recipients:
            status = _dsn_status(entry)
            address = entry.address or ""
            if target is not None and address not in target.statuses:
                original = (entry.original_recipient or "").lower()
                address = original if original in target.statuses else address
            if target is None or address not in target.statuses or status is None:
                outcomes.append(
                    FeedbackOutcome("dsn", address, target.id if target else None, status, False)
                )
                continue
            outcomes.append(
                self._apply(
                    conn,
                    target,
                    address,
                    status,
                    source="dsn",
                    suppression="hard_bounce" if entry.is_permanent else None,
                    detail=_dsn_detail(entry),
                    permanent=entry.is_permanent,
                    now=now,
                )
            )
        if target is not None:
            self._roll_up(conn, target, now)
        return outcomes

    def _find_for_report(
        self,
        conn: Connection,
        report: DeliveryReport,
        workspace_id: str | None,
        agent_id: str | None,
    ) -> _Target | None:
        scope = []
        if workspace_id is not None:
            scope.append(outbound.c.workspace_id == workspace_id)
        if agent_id is not None:
            scope.append(outbound.c.agent_id == agent_id)
        if report.original_message_id:
            wanted = report.original_message_id.strip().strip("<>")
            row = conn.execute(
                _TARGET.where(outbound.c.rfc_message_id == wanted, *scope).limit(1)
            ).first()
            if row is not None:
                return self._target(conn, row)
        if report.original_envelope_id:
            row = conn.execute(
                _TARGET.where(outbound.c.id == report.original_envelope_id.strip(), *scope)
            ).first()
            if row is not None:
                return self._target(conn, row)
        return None

    # -- SendGrid ------------------------------------------------------------------------

    def apply_sendgrid(
        self, body: bytes, signature: str | None, timestamp: str | None
    ) -> SendGridResult:
        """Verify an Event Webhook post and apply its events; returns once committed.

        Raises:
            InboundDisabled: ``sendgrid_event_public_key`` is not set.
            ConfigError: the configured key is not an ECDSA P-256 public key.
            InvalidSignature: missing/bad signature or a stale timestamp (``reason``).
            BadRequest: the body is not a JSON array.
        """
        key = self.sendgrid_public_key()
        now = self.clock.now()
        sendgrid_events.verify_signature(
            key,
            body,
            signature,
            timestamp,
            now=now,
            max_age_seconds=self.settings.sendgrid_event_max_age_seconds,
        )
        events = sendgrid_events.parse_events(body)
        body_sha = hashlib.sha256(body).hexdigest()
        with self.db.write() as conn:
            return self._apply_events(conn, events, body_sha, now)

    def sendgrid_public_key(self) -> ec.EllipticCurvePublicKey:
        """The Event Webhook's verification key, loaded once per configured value.

        Raises:
            InboundDisabled: ``sendgrid_event_public_key`` is not set.
            ConfigError: it is not an ECDSA P-256 public key.
        """
        text = self.settings.sendgrid_event_public_key.strip()
        if not text:
            raise InboundDisabled(
                "POST /feedback/sendgrid is disabled: sendgrid_event_public_key is not set",
                endpoint="feedback/sendgrid",
            )
        if self._key is None or text != self._key[0]:
            try:
                self._key = (text, sendgrid_events.load_public_key(text))
            except ValueError as exc:
                raise ConfigError(f"sendgrid_event_public_key: {exc}") from None
        return self._key[1]

    def _apply_events(
        self, conn: Connection, events: Sequence[SendGridEvent], body_sha: str, now: datetime
    ) -> SendGridResult:
        expires = now + timedelta(days=self.settings.webhook_receipt_days)
        targets: dict[str, _Target] = {}
        complained: dict[str, str] = {}
        outcomes: list[FeedbackOutcome] = []
        applied = duplicates = ignored = unmatched = 0
        for event in events:
            status = event.recipient_status
            if status is None:
                ignored += 1
                continue
            claimed = _insert_new(
                conn,
                webhook_receipts,
                {
                    "provider": RECEIPT_PROVIDER,
                    "event_id": event.event_id,
                    "body_sha256": body_sha,
                    "results": [{"event": event.event, "email": event.email}],
                    "created_at": now,
                    "expires_at": expires,
                },
            )
            if not claimed:
                duplicates += 1
                continue
            target = self._find_for_event(conn, event, targets)
            if target is None or event.email not in target.statuses:
                unmatched += 1
                outcomes.append(
                    FeedbackOutcome(
                        "sendgrid", event.email, target.id if target else None, status, False
                    )
                )
                continue
            applied += 1
            outcome = self._apply(
                conn,
                target,
                event.email,
                status,
                source="sendgrid",
                suppression=event.suppression,
                detail=" ".join(p for p in (event.status or "", event.reason) if p),
                permanent=event.kind in {"bounced", "dropped"},
                now=now,
            )
            outcomes.append(outcome)
            if event.kind == "complained" and target.agent_id is not None:
                complained[target.agent_id] = target.workspace_id
        for target in targets.values():
            if target.changed:
                self._roll_up(conn, target, now)
        changes = [
            change
            for agent_id, workspace_id in sorted(complained.items())
            if (change := self._judge_tier(conn, workspace_id, agent_id, now)) is not None
        ]
        return SendGridResult(
            received=len(events),
            applied=applied,
            duplicates=duplicates,
            ignored=ignored,
            unmatched=unmatched,
            outcomes=tuple(outcomes),
            tier_changes=tuple(changes),
        )

    def _find_for_event(
        self, conn: Connection, event: SendGridEvent, cache: dict[str, _Target]
    ) -> _Target | None:
        row: Row[Any] | Any = None
        if event.outbound_id:
            if event.outbound_id in cache:
                return cache[event.outbound_id]
            row = conn.execute(_TARGET.where(outbound.c.id == event.outbound_id)).first()
        provider_id = event.provider_message_id
        if row is None and provider_id:
            row = conn.execute(
                _TARGET.where(outbound.c.provider_message_id == provider_id).limit(1)
            ).first()
        if row is None:
            return None
        if row.id not in cache:
            cache[row.id] = self._target(conn, row)
        return cache[row.id]

    # -- applying one report ---------------------------------------------------------------

    @staticmethod
    def _target(conn: Connection, row: Any) -> _Target:
        statuses = {
            r.address: r.status
            for r in conn.execute(
                select(outbound_recipients.c.address, outbound_recipients.c.status).where(
                    outbound_recipients.c.outbound_id == row.id
                )
            )
        }
        return _Target(row.id, row.workspace_id, row.agent_id, row.thread_id, row.state, statuses)

    def _apply(
        self,
        conn: Connection,
        target: _Target,
        address: str,
        status: str,
        *,
        source: str,
        suppression: str | None,
        detail: str,
        permanent: bool,
        now: datetime,
    ) -> FeedbackOutcome:
        detail = detail[:_MAX_DETAIL]
        current = target.statuses[address]
        changed = STATUS_RANK.get(status, 0) > STATUS_RANK.get(current, 0)
        if changed:
            conn.execute(
                update(outbound_recipients)
                .where(
                    outbound_recipients.c.outbound_id == target.id,
                    outbound_recipients.c.address == address,
                )
                .values(status=status, detail=detail, updated_at=now)
            )
            target.statuses[address] = status
            target.changed = True
            if status in _REACHED:
                conn.execute(
                    update(outbound)
                    .where(outbound.c.id == target.id, outbound.c.delivered_at.is_(None))
                    .values(delivered_at=now)
                )
        added = None
        if target.agent_id is None:
            return FeedbackOutcome(source, address, target.id, status, changed, None, detail)
        if suppression is not None and _add_suppression_row(
            conn,
            target.workspace_id,
            address,
            suppression,
            source=source,
            detail=detail,
            outbound_id=target.id,
            actor="system",
            now=now,
        ):
            added = suppression
        if changed and status in _EVENT_OF:
            reason = suppression or {"failed": "soft_bounce"}.get(status, status)
            payload: dict[str, Any] = {
                "outbound_id": target.id,
                "agent_id": target.agent_id,
                "recipient": address,
                "recipients": [address],
                "status": status,
                "reason": reason,
                "detail": detail,
                "source": source,
            }
            if _EVENT_OF[status] == OUTBOUND_BOUNCED:
                payload["permanent"] = permanent
            append_event(
                conn,
                workspace_id=target.workspace_id,
                agent_id=target.agent_id,
                type=_EVENT_OF[status],
                thread_id=target.thread_id,
                created_at=now,
                payload=payload,
            )
        return FeedbackOutcome(source, address, target.id, status, changed, added, detail)

    @staticmethod
    def _roll_up(conn: Connection, target: _Target, now: datetime) -> None:
        """Move a ``sent`` request to ``bounced``/``failed``/``delivered`` once every
        recipient's fate says so (see the module docstring)."""
        statuses = set(target.statuses.values())
        if not statuses or target.state != states.SENT:
            return
        if statuses <= _FAILED:
            state = states.BOUNCED if statuses & {"bounced", "dropped"} else states.FAILED
        elif statuses <= _REACHED:
            state = states.DELIVERED
        else:
            return
        changed = conn.execute(
            update(outbound)
            .where(outbound.c.id == target.id, outbound.c.state == states.SENT)
            .values(state=state, updated_at=now)
        ).rowcount
        if changed:
            target.state = state

    # -- trust and tiers -------------------------------------------------------------------

    def trust(self, principal: Principal, agent_id: str) -> AgentTrust:
        """An agent's trust figure over the last 30 days (owners, or the agent itself
        with ``messages:read``).

        Raises:
            Forbidden: an agent key without ``messages:read``.
            NotFound: no such agent within the caller's reach.
        """
        principal.require(MESSAGES_READ)
        if not principal.can_see_agent(agent_id):
            raise NotFound(f"no agent {agent_id}")
        now = self.clock.now()
        with self.db.read() as conn:
            tier = conn.execute(
                select(agents.c.tier).where(
                    agents.c.id == agent_id, agents.c.workspace_id == principal.workspace_id
                )
            ).scalar()
            if tier is None:
                raise NotFound(f"no agent {agent_id}")
            figure = _figure(conn, agent_id, now - timedelta(days=WINDOW_DAYS), WINDOW_DAYS)
        verdict = figure.should_lower_tier(
            self.settings.complaint_threshold, self.settings.complaint_min_sample
        )
        return AgentTrust(agent_id, str(tier), figure, verdict)

    def _judge_tier(
        self, conn: Connection, workspace_id: str, agent_id: str, now: datetime
    ) -> TierChange | None:
        """Lower the agent's tier one step if its figure (since its last drop, within
        30 days) says so; audited with the figures."""
        tier = conn.execute(select(agents.c.tier).where(agents.c.id == agent_id)).scalar()
        if tier is None or tiers.rank(str(tier)) == 0:
            return None
        since = now - timedelta(days=WINDOW_DAYS)
        last_drop = conn.execute(
            select(func.max(audit_log.c.created_at)).where(
                audit_log.c.workspace_id == workspace_id,
                audit_log.c.action == "agent.tier_lowered",
                audit_log.c.target_id == agent_id,
            )
        ).scalar()
        if isinstance(last_drop, datetime):
            since = max(since, _aware(last_drop))
        window = (now - since).total_seconds() / 86400
        figure = _figure(conn, agent_id, since, round(window, 3))
        verdict = figure.should_lower_tier(
            self.settings.complaint_threshold, self.settings.complaint_min_sample
        )
        if not verdict.lower:
            return None
        lowered = tiers.lower(str(tier))
        changed = conn.execute(
            update(agents)
            .where(agents.c.id == agent_id, agents.c.tier == tier)
            .values(tier=lowered)
        ).rowcount
        if not changed:
            return None
        audit.record(
            conn, workspace_id=workspace_id, actor="system", action="agent.tier_lowered",
            at=now, target_type="agent", target_id=agent_id, from_tier=tier,
            to_tier=lowered, reason=verdict.reason, figures=figure.as_dict(),
        )  # fmt: skip
        return TierChange(agent_id, workspace_id, str(tier), lowered, figure, verdict.reason)

    # -- suppressions ----------------------------------------------------------------------

    def is_suppressed(
        self, conn: Connection, workspace_id: str, addresses: Iterable[str]
    ) -> dict[str, str]:
        """``{address: reason}`` for those of ``addresses`` the workspace suppresses
        (lower-cased keys), read in the caller's transaction."""
        wanted = sorted({a.strip().lower() for a in addresses if a.strip()})
        if not wanted:
            return {}
        rows = conn.execute(
            select(suppressions.c.address, suppressions.c.reason).where(
                suppressions.c.workspace_id == workspace_id,
                suppressions.c.address.in_(wanted),
            )
        )
        return {row.address: row.reason for row in rows}

    def list_suppressions(
        self,
        by: Actor,
        *,
        workspace_id: str | None = None,
        reason: str | None = None,
        limit: int = DEFAULT_LIMIT,
        cursor: str | None = None,
    ) -> Page[Suppression]:
        """The workspace's suppressions, newest first.

        Raises:
            Forbidden: an agent key.
            NotFound: (operator) no such workspace.
            ValidationFailed: bad ``limit``, ``reason`` or ``cursor``.
        """
        check_limit(limit)
        if reason is not None and reason not in SUPPRESSION_REASONS:
            raise _invalid("reason", f"must be one of {', '.join(SUPPRESSION_REASONS)}")
        with self.db.read() as conn:
            ws_id, _, _ = _scope(conn, by, workspace_id)
            query = (
                select(suppressions)
                .where(suppressions.c.workspace_id == ws_id)
                .order_by(suppressions.c.created_at.desc(), suppressions.c.id.desc())
                .limit(limit + 1)
            )
            if reason is not None:
                query = query.where(suppressions.c.reason == reason)
            if cursor is not None:
                at, last_id = decode_time_cursor(cursor, _CURSOR_KIND)
                query = query.where(
                    (suppressions.c.created_at < at)
                    | ((suppressions.c.created_at == at) & (suppressions.c.id < last_id))
                )
            rows = conn.execute(query).all()
        page = rows[:limit]
        next_cursor = _encode_cursor(page[-1]) if len(rows) > limit else None
        return Page(tuple(_suppression(r) for r in page), next_cursor)

    def add_suppression(
        self,
        by: Actor,
        address: str,
        *,
        workspace_id: str | None = None,
        reason: str = "manual",
        detail: str = "",
    ) -> Suppression:
        """Stop the workspace sending to ``address`` (audited ``suppression.added``).

        Raises:
            Forbidden: an agent key.
            NotFound: (operator) no such workspace.
            ValidationFailed: not an address, or an unknown ``reason``.
            Conflict: the address is already suppressed (``extra['reason']`` says why).
        """
        normalized = _normalize_address(address)
        if reason not in SUPPRESSION_REASONS:
            raise _invalid("reason", f"must be one of {', '.join(SUPPRESSION_REASONS)}")
        detail = detail[:_MAX_DETAIL]
        now = self.clock.now()
        with self.db.write() as conn:
            ws_id, actor, source = _scope(conn, by, workspace_id)
            added = _add_suppression_row(
                conn, ws_id, normalized, reason, source=source, detail=detail,
                outbound_id=None, actor=actor, now=now,
            )  # fmt: skip
            row = _suppression_row(conn, ws_id, normalized)
        assert row is not None
        if not added:
            raise Conflict(
                f"{normalized} is already suppressed ({row.reason})",
                address=normalized,
                reason=row.reason,
            )
        return _suppression(row)

    def remove_suppression(
        self, by: Actor, address: str, *, workspace_id: str | None = None
    ) -> Suppression:
        """Allow sending to ``address`` again (audited ``suppression.removed``).

        Raises:
            Forbidden: an agent key.
            NotFound: the address is not suppressed in the workspace (or, operator, no
                such workspace).
        """
        normalized = address.strip().lower()
        now = self.clock.now()
        with self.db.write() as conn:
            ws_id, actor, source = _scope(conn, by, workspace_id)
            row = _suppression_row(conn, ws_id, normalized)
            if row is None:
                raise NotFound(f"{normalized} is not suppressed")
            conn.execute(delete(suppressions).where(suppressions.c.id == row.id))
            audit.record(
                conn, workspace_id=ws_id, actor=actor, action="suppression.removed", at=now,
                target_type="address", target_id=_address_key(normalized), address=normalized,
                reason=row.reason, source=source,
            )  # fmt: skip
        return _suppression(row)


# --------------------------------------------------------------------------- helpers

_TARGET = select(
    outbound.c.id,
    outbound.c.workspace_id,
    outbound.c.agent_id,
    outbound.c.thread_id,
    outbound.c.state,
)


def _dsn_status(entry: RecipientStatus) -> str | None:
    """The recipient status a DSN entry stands for (``relayed``/``expanded``: handed
    on for good, as close to delivered as a DSN gets)."""
    if entry.is_success:
        return "delivered"
    if entry.is_failure:
        return "bounced" if entry.is_permanent else "failed"
    if entry.is_delay:
        return "deferred"
    return None


def _dsn_detail(entry: RecipientStatus) -> str:
    parts = [entry.status or "", entry.diagnostic_code or ""]
    return " ".join(p for p in parts if p) or entry.action


def _figure(conn: Connection, agent_id: str, since: datetime, window_days: float) -> TrustFigure:
    counts: dict[str, int] = {
        str(row.status): int(row.n)
        for row in conn.execute(
            select(outbound_recipients.c.status, func.count().label("n"))
            .where(
                outbound_recipients.c.agent_id == agent_id,
                outbound_recipients.c.created_at >= since,
            )
            .group_by(outbound_recipients.c.status)
        )
    }
    return TrustFigure(
        sent=sum(n for s, n in counts.items() if s in _SENT),
        delivered=sum(n for s, n in counts.items() if s in _REACHED),
        bounced=counts.get("bounced", 0),
        complaints=counts.get("complained", 0),
        unsubscribes=counts.get("unsubscribed", 0),
        window_days=window_days,
    )


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _scope(conn: Connection, by: Actor, workspace_id: str | None) -> tuple[str, str, str]:
    """``(workspace id, audit actor, suppression source)`` for a caller.

    Raises:
        Forbidden: an agent key.
        NotFound: a workspace other than the owner's, or (operator) none such.
        ValidationFailed: the operator named no workspace.
    """
    if isinstance(by, Principal):
        by.require_owner()
        if workspace_id is not None and workspace_id != by.workspace_id:
            raise NotFound(f"no workspace {workspace_id}")
        return by.workspace_id, by.actor, "api"
    assert isinstance(by, Operator)
    if workspace_id is None:
        raise _invalid("workspace", "the operator must name a workspace")
    found = conn.execute(select(workspaces.c.id).where(workspaces.c.id == workspace_id)).scalar()
    if found is None:
        raise NotFound(f"no workspace {workspace_id}")
    return workspace_id, by.actor, "cli"


def _add_suppression_row(
    conn: Connection,
    workspace_id: str,
    address: str,
    reason: str,
    *,
    source: str,
    detail: str,
    outbound_id: str | None,
    actor: str,
    now: datetime,
) -> bool:
    """Insert a suppression unless the address already has one; audit it if added."""
    added = _insert_new(
        conn,
        suppressions,
        {
            "id": new_id("sup"),
            "workspace_id": workspace_id,
            "address": address,
            "reason": reason,
            "source": source,
            "detail": detail,
            "outbound_id": outbound_id,
            "created_at": now,
        },
    )
    if added:
        audit.record(
            conn, workspace_id=workspace_id, actor=actor, action="suppression.added", at=now,
            target_type="address", target_id=_address_key(address), address=address,
            reason=reason, source=source, outbound_id=outbound_id,
        )  # fmt: skip
    return added


def _insert_new(conn: Connection, table: Table, row: dict[str, Any]) -> bool:
    """``INSERT ... ON CONFLICT DO NOTHING RETURNING``; True when the row went in (the
    driver's rowcount is not reliable for this on PostgreSQL). A concurrent insert of
    the same key waits for the other transaction there, then yields."""
    key = next(iter(table.primary_key.columns))
    statement: Executable = (
        sqlite.insert(table).on_conflict_do_nothing().returning(key)
        if conn.dialect.name == "sqlite"
        else postgresql.insert(table).on_conflict_do_nothing().returning(key)
    )
    return conn.execute(statement, row).first() is not None


def _suppression_row(conn: Connection, workspace_id: str, address: str) -> _Row | None:
    return conn.execute(
        select(suppressions).where(
            suppressions.c.workspace_id == workspace_id, suppressions.c.address == address
        )
    ).first()


def _suppression(row: _Row) -> Suppression:
    return Suppression(
        suppression_id=row.id,
        workspace_id=row.workspace_id,
        address=row.address,
        reason=row.reason,
        source=row.source,
        detail=row.detail,
        outbound_id=row.outbound_id,
        created_at=row.created_at,
    )


def _address_key(address: str) -> str:
    """The audit ``target_id`` of an address (the column holds 40 characters), as the
    delivery worker writes it."""
    return hashlib.sha256(address.encode()).hexdigest()[:40]


def _normalize_address(address: str) -> str:
    """Raises:
    ValidationFailed: not a bare address (``user@example.com``).
    """
    value = address.strip().lower()
    if len(value) > 320 or _ADDRESS.fullmatch(value) is None or not value.isprintable():
        raise _invalid("address", "must be an email address such as user@example.com")
    return value


def _invalid(field: str, message: str) -> ValidationFailed:
    return ValidationFailed(f"{field} {message}", errors=[{"field": field, "message": message}])


_CURSOR_KIND = "s"


def _encode_cursor(last: _Row) -> str:
    """The position after ``last`` in (created_at, id) order: ids alone order only to
    the millisecond."""
    return encode_cursor(_CURSOR_KIND, f"{last.created_at.isoformat()}|{last.id}")
