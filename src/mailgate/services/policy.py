"""Each agent's inbound policy (rules + known contacts), compiled once and cached.

Ingest asks :meth:`PolicyCache.get` for every message, so a hit must cost nothing: the
cache holds a compiled `CompiledRuleSet` and the contact sets per agent. Staleness is
settled by version counters, not by reloading: every change to an agent's rules or
contacts bumps ``agents.policy_version`` (a workspace default bumps
``workspaces.policy_version``) in the change's own transaction (:func:`bump`). This
process drops its entry as soon as the change commits (:meth:`PolicyCache.invalidate`);
other processes (PostgreSQL scale-out) re-read the two counters at most every
``ttl`` seconds and recompile only when they moved.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from sqlalchemy import Connection, or_, select, update

from mailgate.domain import rules
from mailgate.domain.mime import ParsedMessage, ParseLimits, header_fields
from mailgate.store.schema import agents, contacts, workspaces
from mailgate.store.schema import rules as rules_table

__all__ = ["AgentPolicy", "ContactBook", "PolicyCache", "bump", "rule_from_row"]

_NO_RULES = rules.RuleDecision(action="deliver", reasons=("no rules; default action deliver",))
_NO_OUTBOUND_RULES = rules.CompiledRuleSet.compile((), direction="outbound")


@dataclass(frozen=True, slots=True)
class ContactBook:
    """Known senders of one agent (its own plus its workspace's), lower-cased."""

    addresses: frozenset[str] = frozenset()
    domains: frozenset[str] = frozenset()
    auto_addresses: frozenset[str] = frozenset()
    auto_domains: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.addresses or self.domains)

    def lookup(self, address: str) -> tuple[bool, bool]:
        """``(known, auto_approved)`` for one sender address.

        A domain contact covers addresses at exactly that domain, not its subdomains:
        ``example.com`` does not vouch for ``mail.attacker.example.com``'s owner.
        """
        address = address.lower()
        domain = address.rpartition("@")[2].rstrip(".")
        known = address in self.addresses or domain in self.domains
        auto = address in self.auto_addresses or domain in self.auto_domains
        return known, auto


@dataclass(frozen=True, slots=True)
class AgentPolicy:
    """What ingest needs to decide one agent's inbound mail."""

    workspace_id: str
    inbound: rules.CompiledRuleSet
    contacts: ContactBook
    contacts_bypass: bool
    version: tuple[int, int]
    """(agent policy_version, workspace policy_version) this was compiled from."""
    outbound: rules.CompiledRuleSet = _NO_OUTBOUND_RULES
    """The agent's outbound rules (then the workspace's): the outbound gateway's
    ``outbound_rules`` step."""

    def decide(
        self,
        parsed: ParsedMessage,
        *,
        raw: bytes,
        size: int,
        auth: rules.AuthResults,
        limits: ParseLimits,
        explain: bool = False,
    ) -> rules.RuleDecision:
        """The decision for one message: pure given the policy and the message."""
        if not self.inbound.rules and not self.contacts and not explain:
            return _NO_RULES
        sender = parsed.from_[0].address if parsed.from_ else ""
        known, auto = self.contacts.lookup(sender) if sender else (False, False)
        headers = header_fields(raw, limits) if (self.inbound.needs_headers or explain) else ()
        facts = rules.MessageFacts.from_parsed(
            parsed, size=size, headers=headers, auth=auth, known_contact=known
        )
        return rules.decide_inbound(
            self.inbound, facts, explain=explain, auto_approved=auto and self.contacts_bypass
        )

    def decide_outbound(
        self, parsed: ParsedMessage, *, raw: bytes, limits: ParseLimits
    ) -> rules.RuleDecision | None:
        """The outbound rules applied to a message the agent wants to send, or None
        when there are none (``known_contact`` is whether every recipient is one)."""
        if not self.outbound.rules:
            return None
        recipients = [a.address for a in (*parsed.to, *parsed.cc) if a.address]
        known = bool(recipients) and all(self.contacts.lookup(r)[0] for r in recipients)
        headers = header_fields(raw, limits) if self.outbound.needs_headers else ()
        facts = rules.MessageFacts.from_parsed(
            parsed, size=len(raw), headers=headers, known_contact=known
        )
        return self.outbound.evaluate(facts)

    def with_rules(self, extra: Iterable[rules.Rule]) -> AgentPolicy:
        """This policy with ``extra`` rules run before the stored ones (dry runs)."""
        stored = [c.rule for c in self.inbound.rules]  # already in evaluation order
        ordered = [replace(r, position=i) for i, r in enumerate([*extra, *stored])]
        return replace(self, inbound=rules.CompiledRuleSet.compile(ordered))


def rule_from_row(row: object) -> rules.Rule:
    """A stored rule row as the domain value (stored rules were validated on write)."""
    return rules.Rule(
        id=row.id,  # type: ignore[attr-defined]
        name=row.name,  # type: ignore[attr-defined]
        condition=rules.node_from_dict(row.condition),  # type: ignore[attr-defined]
        action=row.action,  # type: ignore[attr-defined]
        direction=row.direction,  # type: ignore[attr-defined]
        position=row.position,  # type: ignore[attr-defined]
        enabled=row.enabled,  # type: ignore[attr-defined]
    )


def bump(conn: Connection, workspace_id: str, agent_id: str | None) -> None:
    """Mark an agent's (or, with ``agent_id=None``, a whole workspace's) policy changed.

    Call inside the transaction that changes rules or contacts, then
    :meth:`PolicyCache.invalidate` after it commits.
    """
    if agent_id is None:
        conn.execute(
            update(workspaces)
            .where(workspaces.c.id == workspace_id)
            .values(policy_version=workspaces.c.policy_version + 1)
        )
    else:
        conn.execute(
            update(agents)
            .where(agents.c.id == agent_id)
            .values(policy_version=agents.c.policy_version + 1)
        )


class PolicyCache:
    """Compiled policies by agent id; safe to share between threads."""

    def __init__(self, *, ttl: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._entries: dict[str, tuple[AgentPolicy, float]] = {}
        self._lock = threading.Lock()
        self._generation = 0
        """Bumped by every `invalidate`: a `get` that raced one does not cache its read."""

    def get(self, conn: Connection, agent_id: str) -> AgentPolicy:
        """The agent's current policy, read through ``conn`` when not cached or stale.

        Raises:
            KeyError: no such agent.
        """
        now = self._clock()
        generation = self._generation
        entry = self._entries.get(agent_id)
        if entry is not None and now - entry[1] < self.ttl:
            return entry[0]
        head = conn.execute(
            select(
                agents.c.workspace_id,
                agents.c.policy_version,
                workspaces.c.policy_version.label("workspace_version"),
                workspaces.c.contacts_bypass,
            )
            .join(workspaces, workspaces.c.id == agents.c.workspace_id)
            .where(agents.c.id == agent_id)
        ).first()
        if head is None:
            raise KeyError(agent_id)
        version = (head.policy_version, head.workspace_version)
        if entry is not None and entry[0].version == version:
            policy = entry[0]
            if policy.contacts_bypass != head.contacts_bypass:
                policy = replace(policy, contacts_bypass=head.contacts_bypass)
        else:
            policy = self._load(conn, agent_id, head.workspace_id, version, head.contacts_bypass)
        with self._lock:
            # A change that committed (and invalidated) while we read may be missing
            # from what we read: use it for this call, but do not keep it for `ttl`.
            if self._generation == generation:
                self._entries[agent_id] = (policy, now)
        return policy

    def invalidate(self, *, workspace_id: str | None = None, agent_id: str | None = None) -> None:
        """Forget one agent's policy, or every cached agent of a workspace."""
        with self._lock:
            self._generation += 1
            if agent_id is not None:
                self._entries.pop(agent_id, None)
            if workspace_id is not None:
                for key, (policy, _) in list(self._entries.items()):
                    if policy.workspace_id == workspace_id:
                        del self._entries[key]

    @staticmethod
    def _load(
        conn: Connection,
        agent_id: str,
        workspace_id: str,
        version: tuple[int, int],
        contacts_bypass: bool,
    ) -> AgentPolicy:
        rows = conn.execute(
            select(rules_table)
            .where(
                rules_table.c.workspace_id == workspace_id,
                or_(rules_table.c.agent_id == agent_id, rules_table.c.agent_id.is_(None)),
                rules_table.c.enabled.is_(True),
            )
            .order_by(rules_table.c.position, rules_table.c.created_at)
        ).all()
        own = [rule_from_row(r) for r in rows if r.agent_id is not None]
        defaults = [rule_from_row(r) for r in rows if r.agent_id is None]
        inbound = [r for r in own if r.direction == "inbound"]
        inbound_defaults = [r for r in defaults if r.direction == "inbound"]
        found = conn.execute(
            select(contacts.c.kind, contacts.c.value, contacts.c.auto_approve).where(
                contacts.c.workspace_id == workspace_id,
                contacts.c.scope.in_([agent_id, "*"]),
            )
        ).all()
        book = ContactBook(
            addresses=frozenset(c.value for c in found if c.kind == "address"),
            domains=frozenset(c.value for c in found if c.kind == "domain"),
            auto_addresses=frozenset(
                c.value for c in found if c.kind == "address" and c.auto_approve
            ),
            auto_domains=frozenset(c.value for c in found if c.kind == "domain" and c.auto_approve),
        )
        return AgentPolicy(
            workspace_id=workspace_id,
            inbound=rules.CompiledRuleSet.compile(inbound, inbound_defaults),
            contacts=book,
            contacts_bypass=contacts_bypass,
            version=version,
            outbound=rules.CompiledRuleSet.compile(own, defaults, direction="outbound"),
        )
