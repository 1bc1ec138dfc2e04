"""Outbound administration: each agent's tier and the recipient allow/deny lists.

These are the owner's levers on the outbound gateway (:mod:`mailgate.domain.guards`):
the ``tier`` step reads ``agents.tier`` and admits allow-listed recipients under tier
``allowlisted_domains``; the ``recipient_lists`` step blocks deny-listed ones. The
gateway reads both inside each send's own transaction, so a change here applies to
the very next request, in every process, with no cache to invalidate.

Who may do what: owners change tiers and lists in their workspace; the CLI acts as the
:class:`~mailgate.services.mailbox.Operator` (any workspace, audited as ``cli``); an
agent key may read its own tier and the list entries that apply to it (its own and
the workspace-wide ones), because a well-behaved agent wants to know in advance what
it may send, but it may change neither. An object outside the caller's reach is
``NotFound``, exactly like one that does not exist. Every change is one transaction
with its audit entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal, TypeAlias, get_args

from sqlalchemy import Connection, Row, delete, select, update
from sqlalchemy.exc import IntegrityError

from mailgate.clock import Clock
from mailgate.domain.keys import Principal
from mailgate.domain.tiers import TIERS, Tier
from mailgate.errors import Conflict, NotFound, ValidationFailed
from mailgate.ids import new_id
from mailgate.services import audit
from mailgate.services.mailbox import Actor, Operator
from mailgate.services.rules_admin import contact_value
from mailgate.store.db import Database
from mailgate.store.schema import agents, recipient_lists, workspaces

__all__ = ["WORKSPACE_SCOPE", "Entry", "ListName", "OutboundAdmin", "TierInfo"]

ListName: TypeAlias = Literal["allow", "deny"]
LISTS: Final[tuple[ListName, ...]] = get_args(ListName)
WORKSPACE_SCOPE: Final = "*"
"""``recipient_lists.scope`` of a workspace-wide entry (an agent's holds its id)."""


@dataclass(frozen=True, slots=True)
class TierInfo:
    """An agent's outbound tier (see :mod:`mailgate.domain.tiers`)."""

    agent_id: str
    workspace_id: str
    name: str
    tier: str
    changed: bool = False
    """Set by :meth:`OutboundAdmin.set_tier`: the tier moved (False for a no-op)."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One recipient allow- or deny-list entry."""

    entry_id: str
    workspace_id: str
    agent_id: str | None
    """None: the entry applies to every agent of the workspace."""
    list: str
    """``allow`` (admitted under tier ``allowlisted_domains``) or ``deny`` (blocked)."""
    kind: str
    """``address`` (one mailbox) or ``domain`` (every address at exactly that domain)."""
    value: str
    """Lower-cased address or domain."""
    created_at: datetime
    reason: str | None = None
    """Why it is listed, as the owner put it."""

    @property
    def scope(self) -> str:
        return "workspace" if self.agent_id is None else "agent"


class OutboundAdmin:
    """Tiers and recipient lists, for the API and the CLI alike."""

    def __init__(self, db: Database, clock: Clock) -> None:
        # No policy cache: the gateway reads tiers and lists uncached, in each send's
        # transaction, so there is nothing to invalidate after a change.
        self.db = db
        self.clock = clock

    # -- tiers ----------------------------------------------------------------------------

    def get_tier(self, principal: Principal, agent_id: str) -> TierInfo:
        """An agent's tier, for an owner of its workspace or the agent itself.

        Raises:
            NotFound: no such agent visible to the caller.
        """
        if not principal.can_see_agent(agent_id):
            raise NotFound(f"no agent {agent_id}")
        with self.db.read() as conn:
            return _tier_info(_agent_row(conn, agent_id, principal.workspace_id))

    def set_tier(self, by: Actor, agent_id: str, tier: str, *, reason: str = "") -> TierInfo:
        """Move an agent to ``tier`` (raise or lower its outbound reach).

        Setting the tier it already has changes and audits nothing, so a retried
        request leaves one audit entry.

        Raises:
            Forbidden: an agent key (agents do not widen their own reach).
            ValidationFailed: ``tier`` is not one of :data:`~mailgate.domain.tiers.TIERS`
                (``errors`` names ``tier``), or ``reason`` is too long.
            NotFound: no such agent in the caller's workspace.
        """
        actor, workspace_id = _writer(by)
        checked = _check_tier(tier)
        if not isinstance(reason, str) or len(reason) > 1000:
            raise ValidationFailed(
                "invalid reason",
                errors=[_error("reason", "must be a string of at most 1000 characters")],
            )
        now = self.clock.now()
        with self.db.write() as conn:
            row = _agent_row(conn, agent_id, workspace_id, lock=True)
            if row.tier == checked:
                return _tier_info(row)
            conn.execute(update(agents).where(agents.c.id == agent_id).values(tier=checked))
            audit.record(
                conn, workspace_id=row.workspace_id, actor=actor, action="agent.tier_changed",
                at=now, target_type="agent", target_id=agent_id,
                **{"from": row.tier, "to": checked, "reason": reason},
            )  # fmt: skip
        return TierInfo(agent_id, row.workspace_id, row.name, checked, changed=True)

    def resolve_agent(self, ref: str, *, workspace_id: str | None = None) -> tuple[str, str]:
        """``(workspace id, agent id)`` from an agent id or name (the CLI names agents
        either way; a name is unique within its workspace only).

        Raises:
            NotFound: no such agent (in ``workspace_id``, when given).
            Conflict: a name several workspaces use, and no workspace given.
        """
        query = select(agents.c.workspace_id, agents.c.id).where(
            (agents.c.id == ref) | (agents.c.name == ref)
        )
        if workspace_id is not None:
            query = query.where(agents.c.workspace_id == workspace_id)
        with self.db.read() as conn:
            rows = conn.execute(query.order_by(agents.c.created_at)).all()
        by_id = [r for r in rows if r.id == ref]
        found = by_id or rows
        if not found:
            raise NotFound(f"no agent {ref!r}")
        if len(found) > 1:
            raise Conflict(f"several agents are named {ref!r}: name the workspace")
        return str(found[0].workspace_id), str(found[0].id)

    # -- recipient lists --------------------------------------------------------------------

    def list_entries(
        self,
        principal: Principal,
        *,
        list: str | None = None,
        agent_id: str | None = None,
    ) -> list[Entry]:
        """Entries, workspace-wide first, then by agent; each by list and value.

        With ``agent_id``: the entries that apply to that agent (its own and the
        workspace's). An agent key always gets exactly that, for itself.

        Raises:
            ValidationFailed: ``list`` is not ``allow`` or ``deny``.
            NotFound: no such agent visible to the caller.
        """
        if list is not None:
            _check_list(list)
        if not principal.is_owner:
            if agent_id is not None and agent_id != principal.agent_id:
                raise NotFound(f"no agent {agent_id}")
            agent_id = principal.agent_id
        query = select(recipient_lists).where(
            recipient_lists.c.workspace_id == principal.workspace_id
        )
        if list is not None:
            query = query.where(recipient_lists.c.list == list)
        if agent_id is not None:
            query = query.where(recipient_lists.c.scope.in_([agent_id, WORKSPACE_SCOPE]))
        query = query.order_by(
            recipient_lists.c.agent_id.is_not(None),
            recipient_lists.c.agent_id,
            recipient_lists.c.list,
            recipient_lists.c.value,
        )
        with self.db.read() as conn:
            if agent_id is not None:
                _agent_row(conn, agent_id, principal.workspace_id)
            rows = conn.execute(query).all()
        return [_entry(r) for r in rows]

    def add_entry(
        self,
        by: Actor,
        *,
        list: str,
        value: str,
        agent_id: str | None = None,
        workspace_id: str | None = None,
        reason: str | None = None,
    ) -> Entry:
        """Allow- or deny-list an address or a domain, for one agent or (``agent_id``
        None) the whole workspace, with an optional ``reason`` kept on the entry.

        ``value`` is an address if it holds ``@`` (``@example.com`` reads as the domain)
        and a domain otherwise; a domain covers addresses at exactly that domain, not
        its subdomains. Stored lower-cased. The :class:`Operator` names the workspace
        with ``workspace_id`` (or through the agent); an owner's is its own.

        Raises:
            Forbidden: an agent key.
            ValidationFailed: unknown list, malformed value (``errors`` names it), or
                the operator named no workspace.
            Conflict: the same value is already on that list for the same scope.
            NotFound: no such agent (or workspace) in the caller's reach.
        """
        actor, own_workspace = _writer(by)
        _check_list(list)
        kind, normalised = _list_value(value)
        reason = _check_reason(reason)
        now = self.clock.now()
        entry_id = new_id("rcl")
        try:
            with self.db.write() as conn:
                ws_id = own_workspace or workspace_id
                if agent_id is not None:
                    agent = _agent_row(conn, agent_id, ws_id)
                    ws_id = agent.workspace_id
                if ws_id is None:
                    raise ValidationFailed(
                        "name the workspace",
                        errors=[_error("workspace_id", "give a workspace or an agent")],
                    )
                if own_workspace is None and agent_id is None:
                    _require_workspace(conn, ws_id)
                scope = agent_id or WORKSPACE_SCOPE
                taken = conn.execute(
                    select(recipient_lists.c.id).where(
                        recipient_lists.c.workspace_id == ws_id,
                        recipient_lists.c.scope == scope,
                        recipient_lists.c.list == list,
                        recipient_lists.c.value == normalised,
                    )
                ).first()
                if taken is not None:
                    raise _duplicate(list, normalised, taken.id)
                conn.execute(
                    recipient_lists.insert().values(
                        id=entry_id,
                        workspace_id=ws_id,
                        agent_id=agent_id,
                        scope=scope,
                        list=list,
                        kind=kind,
                        value=normalised,
                        reason=reason,
                        created_at=now,
                    )
                )
                audit.record(
                    conn, workspace_id=ws_id, actor=actor, action="recipient_list.added",
                    at=now, target_type="recipient_list", target_id=entry_id,
                    list=list, kind=kind, value=normalised, agent_id=agent_id,
                    **({"reason": reason} if reason else {}),
                )  # fmt: skip
        except IntegrityError:
            # Another writer added the same entry between our check and our insert.
            raise _duplicate(list, normalised, None) from None
        return Entry(entry_id, ws_id, agent_id, list, kind, normalised, now, reason)

    def remove_entry(self, by: Actor, entry_id: str) -> Entry:
        """Take an entry off its list; returns what was removed.

        Raises:
            Forbidden: an agent key.
            NotFound: no such entry in the caller's reach.
        """
        actor, workspace_id = _writer(by)
        now = self.clock.now()
        with self.db.write() as conn:
            query = select(recipient_lists).where(recipient_lists.c.id == entry_id)
            if workspace_id is not None:
                query = query.where(recipient_lists.c.workspace_id == workspace_id)
            row = conn.execute(query).first()
            if row is None:
                raise NotFound(f"no recipient list entry {entry_id}")
            conn.execute(delete(recipient_lists).where(recipient_lists.c.id == entry_id))
            audit.record(
                conn, workspace_id=row.workspace_id, actor=actor,
                action="recipient_list.removed", at=now, target_type="recipient_list",
                target_id=entry_id, list=row.list, kind=row.kind, value=row.value,
                agent_id=row.agent_id,
            )  # fmt: skip
        return _entry(row)


# -- helpers ---------------------------------------------------------------------------------

_Row: TypeAlias = Row[Any]


def _writer(by: Actor) -> tuple[str, str | None]:
    """(audit actor, workspace id or None for the operator) of an owner-only change.

    Raises:
        Forbidden: an agent key.
    """
    if isinstance(by, Operator):
        return by.actor, None
    by.require_owner()
    return by.actor, by.workspace_id


def _agent_row(
    conn: Connection, agent_id: str, workspace_id: str | None, *, lock: bool = False
) -> _Row:
    """The agent (in ``workspace_id`` unless None), locked for update on PostgreSQL.

    Raises:
        NotFound: no such agent there.
    """
    query = select(agents).where(agents.c.id == agent_id)
    if workspace_id is not None:
        query = query.where(agents.c.workspace_id == workspace_id)
    if lock:
        # Two owners changing one tier at once: the second reads the first's result,
        # so each audit entry's "from" is what the tier really was.
        query = query.with_for_update()
    row = conn.execute(query).first()
    if row is None:
        raise NotFound(f"no agent {agent_id}")
    return row


def _require_workspace(conn: Connection, workspace_id: str) -> None:
    if conn.execute(select(workspaces.c.id).where(workspaces.c.id == workspace_id)).first() is None:
        raise NotFound(f"no workspace {workspace_id}")


def _tier_info(row: _Row) -> TierInfo:
    return TierInfo(row.id, row.workspace_id, row.name, row.tier)


def _check_tier(tier: Any) -> Tier:
    """Raises:
    ValidationFailed: not a known tier (``errors`` names ``tier``).
    """
    for known in TIERS:
        if tier == known:
            return known
    raise ValidationFailed(
        f"unknown tier {tier!r}", errors=[_error("tier", f"must be one of {list(TIERS)}")]
    )


def _check_list(name: Any) -> None:
    if name not in LISTS:
        raise ValidationFailed(
            f"unknown list {name!r}", errors=[_error("list", f"must be one of {list(LISTS)}")]
        )


def _list_value(value: Any) -> tuple[str, str]:
    """``(kind, normalised value)``, validated as known contacts are.

    Raises:
        ValidationFailed: not an address or a domain (``errors`` names ``value``).
    """
    text = value.strip() if isinstance(value, str) else ""
    try:
        if "@" in text.removeprefix("@"):
            return contact_value(text, None)
        return contact_value(None, text)
    except ValidationFailed as exc:
        raise ValidationFailed(
            exc.detail,
            errors=[_error("value", "must be an address (name@example.com) or a domain")],
        ) from None


def _duplicate(list_name: str, value: str, entry_id: str | None) -> Conflict:
    return Conflict(
        f"{value} is already on the {list_name} list here", field="value", entry_id=entry_id
    )


def _entry(row: _Row) -> Entry:
    return Entry(
        entry_id=row.id,
        workspace_id=row.workspace_id,
        agent_id=row.agent_id,
        list=row.list,
        kind=row.kind,
        value=row.value,
        created_at=row.created_at,
        reason=row.reason,
    )


MAX_REASON = 500


def _check_reason(reason: str | None) -> str | None:
    """The reason stripped (None when empty).

    Raises:
        ValidationFailed: longer than ``MAX_REASON`` or holding control characters.
    """
    if reason is None or not reason.strip():
        return None
    reason = reason.strip()
    if len(reason) > MAX_REASON or any(ord(c) < 32 or ord(c) == 127 for c in reason):
        raise ValidationFailed(
            "invalid reason",
            errors=[_error("reason", f"at most {MAX_REASON} characters, no control characters")],
        )
    return reason


def _error(field: str, message: str) -> dict[str, str]:
    return {"field": field, "message": message}
