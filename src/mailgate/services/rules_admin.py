"""Rules and known contacts as owners manage them: CRUD, reorder, dry runs, settings.

One service for every face (the API and the CLI). Each method takes the caller's
workspace id and pins every read and write to it, so an object of another workspace
is `NotFound`, exactly like one that never existed. Every change is one transaction
that also writes its audit entry and bumps the owner's policy version
(:func:`mailgate.services.policy.bump`); once it commits, this process's policy cache
forgets the owner's compiled policy, so the very next message is decided with the
change (other processes notice the version within the cache's TTL).

Ordering: each owner (an agent, or the workspace for its defaults) has one ordered
list of rules, both directions together, with dense positions ``0..n-1``. Creating,
moving, deleting and reordering rewrite the positions of that one list. The version
bump is the first write of each change, so on PostgreSQL its row lock on the agent
(or workspace) row serialises concurrent edits of the same list; SQLite has a single
writer anyway.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Final, Literal, TypeAlias, get_args

from sqlalchemy import Connection, Row, bindparam, delete, select, update
from sqlalchemy.exc import IntegrityError

from mailgate.clock import Clock
from mailgate.domain import rules
from mailgate.domain.mime import ParseLimits, parse_message
from mailgate.errors import Conflict, NotFound, ValidationFailed
from mailgate.ids import new_id
from mailgate.services import audit
from mailgate.services.policy import PolicyCache, bump
from mailgate.store.blobs import TieredBlobStore
from mailgate.store.db import Database
from mailgate.store.schema import agents, contacts, messages, workspaces
from mailgate.store.schema import rules as rules_table

__all__ = [
    "RULE_FIELDS",
    "Contact",
    "ContactKind",
    "RulesService",
    "Scope",
    "StoredRule",
    "WorkspaceSettings",
]

Scope: TypeAlias = Literal["agent", "workspace", "all"]
"""Which owners a listing covers: agents' own, the workspace's defaults, or both."""
ContactKind: TypeAlias = Literal["address", "domain"]

RULE_FIELDS: Final = ("name", "condition", "action", "direction", "enabled", "position")
"""What a rule update may change (the owner of a rule is fixed at creation)."""
WORKSPACE_SCOPE: Final = "*"
"""``contacts.scope`` of a workspace-wide contact (an agent's holds its id)."""
_MAX_NAME: Final = 200
_ADDRESS_SPECIALS: Final = frozenset('<>()[]\\,;:@"')

_Row: TypeAlias = Row[Any]


@dataclass(frozen=True, slots=True)
class StoredRule:
    """A rule as stored: the domain rule's JSON plus owner, id and times."""

    rule_id: str
    agent_id: str | None
    """None for a workspace default (runs after every agent's own rules)."""
    name: str
    position: int
    enabled: bool
    direction: str
    action: str
    condition: dict[str, Any]
    created_at: datetime
    updated_at: datetime

    @property
    def scope(self) -> str:
        return "workspace" if self.agent_id is None else "agent"


@dataclass(frozen=True, slots=True)
class Contact:
    """A known sender of one agent (or, with ``agent_id`` None, of the workspace)."""

    contact_id: str
    agent_id: str | None
    kind: str
    """``address`` (one mailbox) or ``domain`` (every address at exactly that domain)."""
    value: str
    """Lower-cased address or domain."""
    name: str
    auto_approve: bool
    """Whether the contact's authenticated mail skips the rules (see the settings)."""
    created_at: datetime

    @property
    def scope(self) -> str:
        return "workspace" if self.agent_id is None else "agent"


@dataclass(frozen=True, slots=True)
class WorkspaceSettings:
    workspace_id: str
    contacts_bypass: bool
    """Whether an authenticated, auto-approved contact skips the rules (default on)."""


class RulesService:
    """Owner-side management of rules, contacts and the workspace's policy settings."""

    def __init__(
        self,
        db: Database,
        clock: Clock,
        policies: PolicyCache,
        blobs: TieredBlobStore,
        limits: ParseLimits,
    ) -> None:
        self.db = db
        self.clock = clock
        self.policies = policies
        self.blobs = blobs
        self.limits = limits

    # -- rules ------------------------------------------------------------------------

    def create_rule(
        self,
        workspace_id: str,
        agent_id: str | None,
        data: Mapping[str, Any],
        *,
        actor: str,
    ) -> StoredRule:
        """Store a rule for an agent (or, with ``agent_id`` None, a workspace default).

        ``data`` is the rule's JSON (``name``, ``condition``, ``action``, ``direction``,
        ``enabled``, ``position``). Without a position (or with None) the rule goes
        last in its owner's list; with one, it is inserted there and the rules from
        that position on move down one.

        Raises:
            ValidationFailed: the rule is invalid; ``errors`` name paths such as
                ``condition.any[1].value``.
            NotFound: no such agent in the workspace.
        """
        errors, fields = _known(data)
        position = fields.pop("position", None)
        _check_position(position, errors, optional=True)
        rule = _validated(fields, errors)
        now = self.clock.now()
        rule_id = new_id("rul")
        with self.db.write() as conn:
            if agent_id is not None:
                _require_agent(conn, workspace_id, agent_id)
            bump(conn, workspace_id, agent_id)  # first: locks the owner's list (PG)
            order = _order(conn, workspace_id, agent_id)
            index = len(order) if position is None else min(position, len(order))
            conn.execute(
                rules_table.insert().values(
                    id=rule_id,
                    workspace_id=workspace_id,
                    agent_id=agent_id,
                    name=rule.name,
                    position=index,
                    enabled=rule.enabled,
                    direction=rule.direction,
                    action=rule.action,
                    condition=rule.condition.as_dict(),
                    created_at=now,
                    updated_at=now,
                )
            )
            ids = [rid for rid, _ in order]
            ids.insert(index, rule_id)
            _renumber(conn, ids, dict(order) | {rule_id: index})
            audit.record(
                conn, workspace_id=workspace_id, actor=actor, action="rule.created", at=now,
                target_type="rule", target_id=rule_id, agent_id=agent_id, name=rule.name,
                rule_action=rule.action, direction=rule.direction, position=index,
            )  # fmt: skip
            row = _rule_row(conn, workspace_id, rule_id)
        self._invalidate(workspace_id, agent_id)
        return _stored_rule(row)

    def list_rules(
        self,
        workspace_id: str,
        *,
        agent_id: str | None = None,
        scope: Scope = "all",
        direction: str | None = None,
    ) -> list[StoredRule]:
        """Rules in evaluation order: agents' own (by agent, then position), then the
        workspace defaults.

        ``scope="all"`` with an ``agent_id`` is exactly what applies to that agent:
        its rules, then the defaults. ``scope="agent"`` lists agents' own rules only
        (one agent's with ``agent_id``), ``scope="workspace"`` the defaults only.

        Raises:
            ValidationFailed: unknown scope or direction, or an ``agent_id`` with
                ``scope="workspace"``.
            NotFound: no such agent in the workspace.
        """
        errors: list[dict[str, str]] = []
        if scope not in get_args(Scope):
            errors.append(_error("scope", f"must be one of {list(get_args(Scope))}"))
        elif scope == "workspace" and agent_id is not None:
            errors.append(_error("agent_id", "workspace defaults belong to no agent"))
        if direction is not None and direction not in get_args(rules.Direction):
            errors.append(_error("direction", "must be 'inbound' or 'outbound'"))
        if errors:
            raise ValidationFailed("invalid rule listing", errors=errors)
        query = select(rules_table).where(rules_table.c.workspace_id == workspace_id)
        if scope == "workspace":
            query = query.where(rules_table.c.agent_id.is_(None))
        elif scope == "agent":
            query = query.where(rules_table.c.agent_id.is_not(None))
        if agent_id is not None:
            mine = rules_table.c.agent_id == agent_id
            query = query.where(
                mine if scope == "agent" else mine | rules_table.c.agent_id.is_(None)
            )
        if direction is not None:
            query = query.where(rules_table.c.direction == direction)
        query = query.order_by(
            rules_table.c.agent_id.is_(None),
            rules_table.c.agent_id,
            rules_table.c.position,
            rules_table.c.created_at,
            rules_table.c.id,
        )
        with self.db.read() as conn:
            if agent_id is not None:
                _require_agent(conn, workspace_id, agent_id)
            rows = conn.execute(query).all()
        return [_stored_rule(row) for row in rows]

    def get_rule(self, workspace_id: str, rule_id: str) -> StoredRule:
        """Raises:
        NotFound: no such rule in the workspace.
        """
        with self.db.read() as conn:
            return _stored_rule(_rule_row(conn, workspace_id, rule_id))

    def update_rule(
        self,
        workspace_id: str,
        rule_id: str,
        changes: Mapping[str, Any],
        *,
        actor: str,
    ) -> StoredRule:
        """Change some of a rule's fields (:data:`RULE_FIELDS`); the merged rule is
        validated as a whole, so a new action must suit the (new) direction.

        A new ``position`` moves the rule within its owner's list (clamped to the end).

        Raises:
            ValidationFailed: an unknown field, or the merged rule is invalid.
            NotFound: no such rule in the workspace.
        """
        if not changes:
            return self.get_rule(workspace_id, rule_id)
        errors, fields = _known(changes)
        position = fields.pop("position", None)
        _check_position(position, errors, optional="position" not in changes)
        if errors:
            raise ValidationFailed("invalid rule", errors=errors)
        now = self.clock.now()
        with self.db.write() as conn:
            row = _rule_row(conn, workspace_id, rule_id)
            bump(conn, workspace_id, row.agent_id)
            current = _stored_rule(row)
            merged = {
                "name": current.name,
                "enabled": current.enabled,
                "direction": current.direction,
                "action": current.action,
                "condition": current.condition,
                **fields,
            }
            rule = _validated(merged, [])
            conn.execute(
                update(rules_table)
                .where(rules_table.c.id == rule_id)
                .values(
                    name=rule.name,
                    enabled=rule.enabled,
                    direction=rule.direction,
                    action=rule.action,
                    condition=rule.condition.as_dict(),
                    updated_at=now,
                )
            )
            if position is not None:
                order = _order(conn, workspace_id, row.agent_id)
                ids = [rid for rid, _ in order if rid != rule_id]
                ids.insert(min(position, len(ids)), rule_id)
                _renumber(conn, ids, dict(order))
            audit.record(
                conn, workspace_id=workspace_id, actor=actor, action="rule.updated", at=now,
                target_type="rule", target_id=rule_id, agent_id=row.agent_id,
                changed=sorted(changes),
            )  # fmt: skip
            row = _rule_row(conn, workspace_id, rule_id)
        self._invalidate(workspace_id, row.agent_id)
        return _stored_rule(row)

    def delete_rule(self, workspace_id: str, rule_id: str, *, actor: str) -> None:
        """Delete a rule; the rules after it move up one.

        Raises:
            NotFound: no such rule in the workspace.
        """
        now = self.clock.now()
        with self.db.write() as conn:
            row = _rule_row(conn, workspace_id, rule_id)
            bump(conn, workspace_id, row.agent_id)
            conn.execute(delete(rules_table).where(rules_table.c.id == rule_id))
            order = _order(conn, workspace_id, row.agent_id)
            _renumber(conn, [rid for rid, _ in order], dict(order))
            audit.record(
                conn, workspace_id=workspace_id, actor=actor, action="rule.deleted", at=now,
                target_type="rule", target_id=rule_id, agent_id=row.agent_id, name=row.name,
                condition=row.condition, rule_action=row.action,
            )  # fmt: skip
        self._invalidate(workspace_id, row.agent_id)

    def reorder(
        self,
        workspace_id: str,
        agent_id: str | None,
        rule_ids: Sequence[str],
        *,
        actor: str,
    ) -> list[StoredRule]:
        """Put an owner's rules in the given order (positions ``0..n-1``).

        ``rule_ids`` must name every rule of the owner (an agent, or the workspace's
        defaults with ``agent_id`` None) exactly once, so a client working from a stale
        listing is refused instead of silently dropping a rule from the order.

        Raises:
            ValidationFailed: ``rule_ids`` is not exactly the owner's rules.
            NotFound: no such agent in the workspace.
        """
        if len(set(rule_ids)) != len(rule_ids):
            raise ValidationFailed(
                "rule ids repeat", errors=[_error("rule_ids", "each rule may appear once")]
            )
        now = self.clock.now()
        with self.db.write() as conn:
            if agent_id is not None:
                _require_agent(conn, workspace_id, agent_id)
            bump(conn, workspace_id, agent_id)
            order = _order(conn, workspace_id, agent_id)
            have, wanted = {rid for rid, _ in order}, set(rule_ids)
            missing = [rid for rid, _ in order if rid not in wanted]
            unknown = [rid for rid in rule_ids if rid not in have]
            if missing or unknown:
                owner = "the agent's" if agent_id is not None else "the workspace default"
                parts = [f"must list exactly {owner} {len(order)} rules"]
                if missing:
                    parts.append(f"missing {', '.join(missing)}")
                if unknown:
                    parts.append(f"not among them {', '.join(unknown)}")
                raise ValidationFailed(
                    "rule ids do not match the rules", errors=[_error("rule_ids", "; ".join(parts))]
                )
            _renumber(conn, list(rule_ids), dict(order))
            audit.record(
                conn, workspace_id=workspace_id, actor=actor, action="rule.reordered", at=now,
                target_type="agent" if agent_id else "workspace",
                target_id=agent_id or workspace_id, rule_ids=list(rule_ids),
            )  # fmt: skip
        self._invalidate(workspace_id, agent_id)
        scope: Scope = "agent" if agent_id is not None else "workspace"
        return self.list_rules(workspace_id, agent_id=agent_id, scope=scope)

    def test_rule(
        self,
        workspace_id: str,
        *,
        agent_id: str | None = None,
        message_id: str | None = None,
        raw: bytes | None = None,
        rule: Mapping[str, Any] | None = None,
        auth: rules.AuthResults | None = None,
    ) -> rules.RuleDecision:
        """A dry run: what the agent's inbound policy decides for one message, with
        every rule tried up to the first match and each condition's result (``trace``).

        The message is a stored one (``message_id``, any agent's in the workspace; its
        recorded sender-authentication results apply) or pasted bytes (``raw``, as
        unauthenticated unless ``auth`` says otherwise). ``agent_id`` defaults to the
        stored message's agent. ``rule`` is an unsaved rule (JSON as for
        :meth:`create_rule`), run enabled and before the stored ones. Nothing is written.

        Raises:
            ValidationFailed: not exactly one of ``message_id``/``raw``, no agent for
                pasted bytes, or an invalid ``rule`` (paths start with ``rule.``).
            NotFound: no such agent or message in the workspace.
        """
        errors: list[dict[str, str]] = []
        if (message_id is None) == (raw is None):
            errors.append(_error("message_id", "give exactly one of message_id or raw"))
        elif raw is not None and agent_id is None:
            errors.append(_error("agent_id", "required with raw"))
        extra: list[rules.Rule] = []
        if rule is not None:
            try:
                extra.append(replace(rules.validate_rule(rule), id=None, enabled=True))
            except ValidationFailed as exc:
                errors.extend(
                    _error(_join("rule", e["field"]), e["message"])
                    for e in exc.extra.get("errors", [])
                )
            if extra and extra[0].direction != "inbound":
                errors.append(_error("rule.direction", "a dry run tests inbound rules"))
        if errors:
            raise ValidationFailed("invalid dry run", errors=errors)
        stored_auth: rules.AuthResults | None = None
        sha: str | None = None
        with self.db.read() as conn:
            if message_id is not None:
                found = conn.execute(
                    select(
                        messages.c.agent_id, messages.c.raw_sha256, messages.c.auth_results
                    ).where(messages.c.id == message_id, messages.c.workspace_id == workspace_id)
                ).first()
                if found is None:
                    raise NotFound(f"no message {message_id}")
                agent_id = agent_id or found.agent_id
                sha = found.raw_sha256
                stored_auth = rules.AuthResults.from_dict(found.auth_results)
            assert agent_id is not None
            _require_agent(conn, workspace_id, agent_id)
        if raw is None:
            assert sha is not None
            raw = self.blobs.get(sha)
        parsed = parse_message(raw, self.limits)
        with self.db.read() as conn:
            policy = self.policies.get(conn, agent_id)
        if extra:
            policy = policy.with_rules(extra)
        return policy.decide(
            parsed,
            raw=raw,
            size=len(raw),
            auth=auth or stored_auth or rules.AuthResults(),
            limits=self.limits,
            explain=True,
        )

    # -- contacts ---------------------------------------------------------------------

    def add_contact(
        self,
        workspace_id: str,
        agent_id: str | None,
        *,
        address: str | None = None,
        domain: str | None = None,
        name: str = "",
        auto_approve: bool = True,
        actor: str,
    ) -> Contact:
        """Remember a known sender for one agent (or, ``agent_id`` None, the workspace).

        Exactly one of ``address`` or ``domain``; a domain covers addresses at exactly
        that domain, not its subdomains. Values are stored lower-cased.

        Raises:
            ValidationFailed: neither or both given, a malformed value or name.
            Conflict: the owner already has this contact.
            NotFound: no such agent in the workspace.
        """
        kind, value = contact_value(address, domain)
        _check_contact_fields(name, auto_approve)
        now = self.clock.now()
        contact_id = new_id("con")
        try:
            with self.db.write() as conn:
                if agent_id is not None:
                    _require_agent(conn, workspace_id, agent_id)
                bump(conn, workspace_id, agent_id)
                scope = agent_id or WORKSPACE_SCOPE
                taken = conn.execute(
                    select(contacts.c.id).where(
                        contacts.c.workspace_id == workspace_id,
                        contacts.c.scope == scope,
                        contacts.c.value == value,
                    )
                ).first()
                if taken is not None:
                    raise _duplicate(kind, value, taken.id)
                conn.execute(
                    contacts.insert().values(
                        id=contact_id,
                        workspace_id=workspace_id,
                        agent_id=agent_id,
                        scope=scope,
                        kind=kind,
                        value=value,
                        name=name,
                        auto_approve=auto_approve,
                        created_at=now,
                    )
                )
                audit.record(
                    conn, workspace_id=workspace_id, actor=actor, action="contact.created",
                    at=now, target_type="contact", target_id=contact_id, agent_id=agent_id,
                    kind=kind, value=value, auto_approve=auto_approve,
                )  # fmt: skip
                row = _contact_row(conn, workspace_id, contact_id)
        except IntegrityError:
            # Another writer added the same contact between our check and our insert.
            raise _duplicate(kind, value, None) from None
        self._invalidate(workspace_id, agent_id)
        return _contact(row)

    def list_contacts(
        self, workspace_id: str, *, agent_id: str | None = None, scope: Scope = "all"
    ) -> list[Contact]:
        """Contacts, workspace-wide ones first, then by agent, each by value.

        Scopes read as for :meth:`list_rules`: ``all`` with an ``agent_id`` is every
        contact that counts for that agent (its own and the workspace's).

        Raises:
            ValidationFailed: unknown scope, or an ``agent_id`` with ``scope="workspace"``.
            NotFound: no such agent in the workspace.
        """
        if scope not in get_args(Scope):
            raise ValidationFailed(
                "invalid scope", errors=[_error("scope", f"must be one of {list(get_args(Scope))}")]
            )
        if scope == "workspace" and agent_id is not None:
            raise ValidationFailed(
                "invalid listing",
                errors=[_error("agent_id", "workspace contacts belong to no agent")],
            )
        query = select(contacts).where(contacts.c.workspace_id == workspace_id)
        if scope == "workspace":
            query = query.where(contacts.c.scope == WORKSPACE_SCOPE)
        elif scope == "agent":
            query = query.where(contacts.c.scope != WORKSPACE_SCOPE)
        if agent_id is not None:
            allowed = [agent_id] if scope == "agent" else [agent_id, WORKSPACE_SCOPE]
            query = query.where(contacts.c.scope.in_(allowed))
        query = query.order_by(
            contacts.c.agent_id.is_not(None), contacts.c.agent_id, contacts.c.value
        )
        with self.db.read() as conn:
            if agent_id is not None:
                _require_agent(conn, workspace_id, agent_id)
            rows = conn.execute(query).all()
        return [_contact(row) for row in rows]

    def get_contact(self, workspace_id: str, contact_id: str) -> Contact:
        """Raises:
        NotFound: no such contact in the workspace.
        """
        with self.db.read() as conn:
            return _contact(_contact_row(conn, workspace_id, contact_id))

    def update_contact(
        self,
        workspace_id: str,
        contact_id: str,
        *,
        name: str | None = None,
        auto_approve: bool | None = None,
        actor: str,
    ) -> Contact:
        """Rename a contact or change whether it skips the rules (None = unchanged).
        The address or domain itself is fixed: delete the contact and add another.

        Raises:
            ValidationFailed: a malformed name or flag.
            NotFound: no such contact in the workspace.
        """
        _check_contact_fields(
            "" if name is None else name, True if auto_approve is None else auto_approve
        )
        values: dict[str, Any] = {}
        if name is not None:
            values["name"] = name
        if auto_approve is not None:
            values["auto_approve"] = auto_approve
        if not values:
            return self.get_contact(workspace_id, contact_id)
        now = self.clock.now()
        with self.db.write() as conn:
            row = _contact_row(conn, workspace_id, contact_id)
            bump(conn, workspace_id, row.agent_id)
            conn.execute(update(contacts).where(contacts.c.id == contact_id).values(**values))
            audit.record(
                conn, workspace_id=workspace_id, actor=actor, action="contact.updated", at=now,
                target_type="contact", target_id=contact_id, agent_id=row.agent_id, **values,
            )  # fmt: skip
            row = _contact_row(conn, workspace_id, contact_id)
        self._invalidate(workspace_id, row.agent_id)
        return _contact(row)

    def delete_contact(self, workspace_id: str, contact_id: str, *, actor: str) -> None:
        """Forget a contact.

        Raises:
            NotFound: no such contact in the workspace.
        """
        now = self.clock.now()
        with self.db.write() as conn:
            row = _contact_row(conn, workspace_id, contact_id)
            bump(conn, workspace_id, row.agent_id)
            conn.execute(delete(contacts).where(contacts.c.id == contact_id))
            audit.record(
                conn, workspace_id=workspace_id, actor=actor, action="contact.deleted", at=now,
                target_type="contact", target_id=contact_id, agent_id=row.agent_id,
                kind=row.kind, value=row.value,
            )  # fmt: skip
        self._invalidate(workspace_id, row.agent_id)

    # -- workspace settings -----------------------------------------------------------

    def get_settings(self, workspace_id: str) -> WorkspaceSettings:
        """Raises:
        NotFound: no such workspace.
        """
        with self.db.read() as conn:
            return _settings(conn, workspace_id)

    def update_settings(
        self, workspace_id: str, *, contacts_bypass: bool | None = None, actor: str
    ) -> WorkspaceSettings:
        """Change the workspace's policy settings (None = unchanged).

        Raises:
            ValidationFailed: a setting of the wrong type.
            NotFound: no such workspace.
        """
        if contacts_bypass is None:
            return self.get_settings(workspace_id)
        if not isinstance(contacts_bypass, bool):
            raise ValidationFailed(
                "invalid setting", errors=[_error("contacts_bypass", "must be true or false")]
            )
        now = self.clock.now()
        with self.db.write() as conn:
            before = _settings(conn, workspace_id)
            bump(conn, workspace_id, None)
            conn.execute(
                update(workspaces)
                .where(workspaces.c.id == workspace_id)
                .values(contacts_bypass=contacts_bypass)
            )
            audit.record(
                conn, workspace_id=workspace_id, actor=actor,
                action="workspace.settings_updated", at=now, target_type="workspace",
                target_id=workspace_id, contacts_bypass=contacts_bypass,
                previous={"contacts_bypass": before.contacts_bypass},
            )  # fmt: skip
            after = _settings(conn, workspace_id)
        self._invalidate(workspace_id, None)
        return after

    # -- helpers ----------------------------------------------------------------------

    def agent_workspace(self, agent_id: str) -> str:
        """The workspace an agent belongs to (for the CLI, which names agents alone).

        Raises:
            NotFound: no such agent.
        """
        with self.db.read() as conn:
            found = conn.execute(
                select(agents.c.workspace_id).where(agents.c.id == agent_id)
            ).scalar()
        if found is None:
            raise NotFound(f"no agent {agent_id}")
        return str(found)

    def _invalidate(self, workspace_id: str, agent_id: str | None) -> None:
        """After the commit: drop the compiled policies the change affects."""
        if agent_id is None:
            self.policies.invalidate(workspace_id=workspace_id)
        else:
            self.policies.invalidate(agent_id=agent_id)


# -- rule helpers ---------------------------------------------------------------------


def _validated(fields: Mapping[str, Any], errors: list[dict[str, str]]) -> rules.Rule:
    """The domain rule for ``fields``, or every problem (``errors`` plus the rule's own)
    as one `ValidationFailed`."""
    try:
        rule = rules.validate_rule(fields)
    except ValidationFailed as exc:
        raise ValidationFailed(exc.detail, errors=[*errors, *exc.extra.get("errors", [])]) from None
    if errors:
        raise ValidationFailed("invalid rule", errors=errors)
    return rule


def _known(data: Mapping[str, Any]) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """Errors for keys that are no rule field, and the rule fields given."""
    errors = [_error(str(key), "unknown key") for key in data if key not in RULE_FIELDS]
    return errors, {key: value for key, value in data.items() if key in RULE_FIELDS}


def _check_position(position: Any, errors: list[dict[str, str]], *, optional: bool) -> None:
    if position is None and optional:
        return
    if not isinstance(position, int) or isinstance(position, bool) or position < 0:
        errors.append(_error("position", "must be a non-negative integer"))


def _order(conn: Connection, workspace_id: str, agent_id: str | None) -> list[tuple[str, int]]:
    """``(rule id, stored position)`` of one owner's rules, in order."""
    owner = (
        rules_table.c.agent_id.is_(None) if agent_id is None else rules_table.c.agent_id == agent_id
    )
    rows = conn.execute(
        select(rules_table.c.id, rules_table.c.position)
        .where(rules_table.c.workspace_id == workspace_id, owner)
        .order_by(rules_table.c.position, rules_table.c.created_at, rules_table.c.id)
    ).all()
    return [(row.id, row.position) for row in rows]


_SET_POSITION = (
    update(rules_table)
    .where(rules_table.c.id == bindparam("rule_key"))
    .values(position=bindparam("new_position"))
)


def _renumber(conn: Connection, ordered: Iterable[str], current: Mapping[str, int]) -> None:
    """Give ``ordered`` positions ``0..n-1``, writing only the rows that move."""
    moved = [
        {"rule_key": rid, "new_position": index}
        for index, rid in enumerate(ordered)
        if current.get(rid) != index
    ]
    if moved:
        conn.execute(_SET_POSITION, moved)


def _rule_row(conn: Connection, workspace_id: str, rule_id: str) -> _Row:
    row = conn.execute(
        select(rules_table).where(
            rules_table.c.id == rule_id, rules_table.c.workspace_id == workspace_id
        )
    ).first()
    if row is None:
        raise NotFound(f"no rule {rule_id}")
    return row


def _stored_rule(row: _Row) -> StoredRule:
    return StoredRule(
        rule_id=row.id,
        agent_id=row.agent_id,
        name=row.name,
        position=row.position,
        enabled=bool(row.enabled),
        direction=row.direction,
        action=row.action,
        condition=dict(row.condition),
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _require_agent(conn: Connection, workspace_id: str, agent_id: str) -> None:
    found = conn.execute(
        select(agents.c.id).where(agents.c.id == agent_id, agents.c.workspace_id == workspace_id)
    ).first()
    if found is None:
        raise NotFound(f"no agent {agent_id}")


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if path else prefix


def _error(field: str, message: str) -> dict[str, str]:
    return {"field": field, "message": message}


# -- contact helpers ------------------------------------------------------------------


def contact_value(address: str | None, domain: str | None) -> tuple[ContactKind, str]:
    """``(kind, normalised value)``.

    Raises:
        ValidationFailed: not exactly one given, or a malformed one.
    """
    if (address is None) == (domain is None):
        raise ValidationFailed(
            "give an address or a domain",
            errors=[_error("address", "give exactly one of address or domain")],
        )
    if address is not None:
        value = address.strip().strip("<>").lower() if isinstance(address, str) else ""
        local, at, host = value.rpartition("@")
        if not (
            at
            and 0 < len(local) <= 64
            and all(c.isprintable() and not c.isspace() for c in local)
            and not _ADDRESS_SPECIALS.intersection(local)
            and _valid_domain(host)
        ):
            raise ValidationFailed(
                f"not an email address: {address!r}",
                errors=[_error("address", "must be an address such as name@example.com")],
            )
        return "address", value
    value = domain.strip().removeprefix("@").rstrip(".").lower() if isinstance(domain, str) else ""
    if not _valid_domain(value):
        raise ValidationFailed(
            f"not a domain: {domain!r}",
            errors=[_error("domain", "must be a domain such as example.com")],
        )
    return "domain", value


def _valid_domain(domain: str) -> bool:
    """A host name of two or more labels (letters, digits, inner hyphens; IDN letters
    allowed), not an IP address."""
    labels = domain.split(".")
    if len(domain) > 253 or len(labels) < 2 or labels[-1].isdigit():
        return False
    return all(
        0 < len(label) <= 63
        and label[0].isalnum()
        and label[-1].isalnum()
        and all(c.isalnum() or c == "-" for c in label)
        for label in labels
    )


def _check_contact_fields(name: Any, auto_approve: Any) -> None:
    errors: list[dict[str, str]] = []
    if not isinstance(name, str) or len(name) > _MAX_NAME:
        errors.append(_error("name", f"must be a string of at most {_MAX_NAME} characters"))
    if not isinstance(auto_approve, bool):
        errors.append(_error("auto_approve", "must be true or false"))
    if errors:
        raise ValidationFailed("invalid contact", errors=errors)


def _duplicate(kind: str, value: str, contact_id: str | None) -> Conflict:
    return Conflict(f"{value} is already a known contact here", field=kind, contact_id=contact_id)


def _contact_row(conn: Connection, workspace_id: str, contact_id: str) -> _Row:
    row = conn.execute(
        select(contacts).where(contacts.c.id == contact_id, contacts.c.workspace_id == workspace_id)
    ).first()
    if row is None:
        raise NotFound(f"no contact {contact_id}")
    return row


def _contact(row: _Row) -> Contact:
    return Contact(
        contact_id=row.id,
        agent_id=row.agent_id,
        kind=row.kind,
        value=row.value,
        name=row.name,
        auto_approve=bool(row.auto_approve),
        created_at=row.created_at,
    )


def _settings(conn: Connection, workspace_id: str) -> WorkspaceSettings:
    found = conn.execute(
        select(workspaces.c.contacts_bypass).where(workspaces.c.id == workspace_id)
    ).first()
    if found is None:
        raise NotFound(f"no workspace {workspace_id}")
    return WorkspaceSettings(workspace_id, bool(found.contacts_bypass))
