"""The outbound policy pipeline, as pure logic.

Every agent send, reply and forward passes the same named guard steps, in order::

    key_scope → tier → suppression → recipient_lists → rate_limits → loop_guard
              → outbound_rules → content

Each step records an outcome (``pass``, ``hold``, ``quarantine``, ``block``) and a
reason a human can read. A ``block`` ends the pipeline (later steps are recorded as
``skipped``); ``hold`` and ``quarantine`` do not, so that a held message that would
also be blocked is blocked, not put in front of an owner. The decision is the most
severe outcome: block > quarantine > hold > allow.

The service gathers :class:`OutboundFacts` from the database (counts, lists, the
thread) and applies the returned :class:`OutboundDecision`; nothing here does I/O, so
the whole policy is testable as a table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeAlias

from mailgate.domain import rules

Action: TypeAlias = Literal["allow", "hold", "quarantine", "block"]
Outcome: TypeAlias = Literal["pass", "hold", "quarantine", "block", "skipped"]
Kind: TypeAlias = Literal["send", "reply", "forward"]

STEPS: Final = (
    "key_scope",
    "tier",
    "suppression",
    "recipient_lists",
    "rate_limits",
    "loop_guard",
    "outbound_rules",
    "content",
)
_SEVERITY: Final[Mapping[str, int]] = {"pass": 0, "hold": 1, "quarantine": 2, "block": 3}
_ACTION_OF: Final[Mapping[int, Action]] = {0: "allow", 1: "hold", 2: "quarantine", 3: "block"}

BULK_PRECEDENCE: Final = frozenset({"bulk", "list", "junk"})


@dataclass(frozen=True, slots=True)
class StepOutcome:
    step: str
    outcome: Outcome
    reason: str
    code: str | None = None
    """Machine-readable reason for a non-pass outcome (``suppressed``, ``loop_guard``,
    ``tier``, ``rate_limited``, ``denied``, ``require_approval``, ``rule_block``,
    ``content``, ``missing_scope``)."""


@dataclass(frozen=True, slots=True)
class OutboundDecision:
    action: Action
    steps: tuple[StepOutcome, ...]

    @property
    def reasons(self) -> tuple[str, ...]:
        """Why, for every step that did not simply pass (or the all-clear)."""
        found = tuple(s.reason for s in self.steps if s.outcome not in ("pass", "skipped"))
        return found or ("every guard step passed",)

    @property
    def codes(self) -> tuple[str, ...]:
        return tuple(s.code for s in self.steps if s.code is not None)

    def as_dict(self) -> dict[str, Any]:
        """Stored on the request, returned to the caller and written to the audit log."""
        return {
            "action": self.action,
            "reasons": list(self.reasons),
            "codes": list(self.codes),
            "steps": [
                {"step": s.step, "outcome": s.outcome, "reason": s.reason, "code": s.code}
                for s in self.steps
            ],
        }


@dataclass(frozen=True, slots=True)
class RateLimits:
    per_hour: int
    per_day: int
    per_domain_hour: int


@dataclass(frozen=True, slots=True)
class RateCounts:
    """What the agent already sent, not counting this request."""

    last_hour: int = 0
    last_day: int = 0
    per_domain_last_hour: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LoopFacts:
    """RFC 3834 signals on the message a reply answers, and the thread's recent replies.

    ``auto_submitted`` is the header's value (None when absent); ``precedence`` is
    lower-cased; ``return_path`` is the envelope sender the message came with (empty
    string for the null sender ``<>``; None when unknown, e.g. a webhook without one).
    """

    auto_submitted: str | None = None
    precedence: str | None = None
    list_id: str | None = None
    return_path: str | None = None
    from_address: str = ""
    replies_in_window: int = 0
    cap: int = 5
    window_minutes: float = 60.0


@dataclass(frozen=True, slots=True)
class ContentFacts:
    size: int
    max_size: int
    attachment_names: tuple[str, ...] = ()
    blocked_extensions: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class OutboundFacts:
    """Everything the pipeline looks at for one request."""

    kind: Kind
    has_scope: bool
    tier: str
    recipients: tuple[str, ...]
    """Envelope recipients, lower-cased."""
    content: ContentFacts
    thread_has_inbound: bool = False
    """Replies only: the thread being answered holds inbound mail the agent received."""
    correspondents: frozenset[str] = frozenset()
    """Replies only: the addresses on the message answered (From, Reply-To, To, Cc),
    lower-cased. A reply to them stays in the conversation; anyone the agent adds is
    judged by its tier like new mail."""
    known_contacts: frozenset[str] = frozenset()
    """The recipients that are known contacts (by address or domain)."""
    allowlisted: frozenset[str] = frozenset()
    """The recipients on an allow list (by address or domain)."""
    denied: Mapping[str, str] = field(default_factory=dict)
    """Recipient -> the deny-list entry that names it."""
    suppressed: Mapping[str, str] = field(default_factory=dict)
    """Recipient -> suppression reason."""
    limits: RateLimits = RateLimits(100, 1000, 30)
    counts: RateCounts = RateCounts()
    loop: LoopFacts | None = None
    """Replies only."""
    rule: rules.RuleDecision | None = None
    """The agent's outbound rules applied to the message (None: no outbound rules)."""


def decide(facts: OutboundFacts) -> OutboundDecision:
    """Run every step in order; the first ``block`` ends the run."""
    outcomes: list[StepOutcome] = []
    blocked = False
    for name, step in _PIPELINE:
        if blocked:
            outcomes.append(StepOutcome(name, "skipped", "not run: an earlier step blocked"))
            continue
        outcome = step(facts)
        outcomes.append(outcome)
        blocked = outcome.outcome == "block"
    worst = max(_SEVERITY.get(o.outcome, 0) for o in outcomes)
    return OutboundDecision(_ACTION_OF[worst], tuple(outcomes))


# ------------------------------------------------------------------ steps


def _key_scope(f: OutboundFacts) -> StepOutcome:
    scope = "messages:reply" if f.kind == "reply" else "messages:send"
    if not f.has_scope:
        return StepOutcome("key_scope", "block", f"the key lacks {scope!r}", "missing_scope")
    return StepOutcome("key_scope", "pass", f"the key holds {scope!r}")


def _tier(f: OutboundFacts) -> StepOutcome:
    tier = f.tier
    judged = f.recipients
    in_thread = f.kind == "reply" and f.thread_has_inbound
    if in_thread:
        judged = tuple(r for r in f.recipients if r not in f.correspondents)
        if not judged:
            return StepOutcome(
                "tier",
                "pass",
                f"tier {tier}: a reply to its correspondents in a thread with inbound mail",
            )
    if tier == "open":
        return StepOutcome("tier", "pass", "tier open: any recipient")
    if tier == "reply_only":
        if in_thread:
            what = f"a reply adding {', '.join(judged[:5])}"
        elif f.kind == "reply":
            what = "a reply to a thread without inbound mail"
        else:
            what = "new mail"
        return StepOutcome(
            "tier",
            "block",
            f"tier reply_only: the agent may only reply to its correspondents in threads "
            f"with inbound mail, this is {what}",
            "tier",
        )
    allowed = set(f.known_contacts)
    label = "known contacts"
    if tier == "allowlisted_domains":
        allowed |= f.allowlisted
        label = "known contacts or allow-listed"
    outside = [r for r in judged if r not in allowed]
    if outside:
        return StepOutcome(
            "tier",
            "block",
            f"tier {tier}: not {label}: {', '.join(outside[:5])}",
            "tier",
        )
    return StepOutcome("tier", "pass", f"tier {tier}: every recipient is {label}")


def _suppression(f: OutboundFacts) -> StepOutcome:
    hits = [f"{r} ({f.suppressed[r]})" for r in f.recipients if r in f.suppressed]
    if hits:
        return StepOutcome(
            "suppression", "block", f"suppressed recipients: {', '.join(hits[:5])}", "suppressed"
        )
    return StepOutcome("suppression", "pass", "no recipient is suppressed")


def _recipient_lists(f: OutboundFacts) -> StepOutcome:
    hits = [f"{r} (deny {f.denied[r]})" for r in f.recipients if r in f.denied]
    if hits:
        return StepOutcome(
            "recipient_lists", "block", f"deny-listed: {', '.join(hits[:5])}", "denied"
        )
    return StepOutcome("recipient_lists", "pass", "no recipient is deny-listed")


def _rate_limits(f: OutboundFacts) -> StepOutcome:
    limits, counts = f.limits, f.counts
    if counts.last_hour + 1 > limits.per_hour:
        return StepOutcome(
            "rate_limits",
            "block",
            f"{counts.last_hour} messages in the last hour (limit {limits.per_hour})",
            "rate_limited",
        )
    if counts.last_day + 1 > limits.per_day:
        return StepOutcome(
            "rate_limits",
            "block",
            f"{counts.last_day} messages in the last day (limit {limits.per_day})",
            "rate_limited",
        )
    adding: dict[str, int] = {}
    for r in f.recipients:
        domain = domain_of(r)
        adding[domain] = adding.get(domain, 0) + 1
    for domain, extra in sorted(adding.items()):
        already = counts.per_domain_last_hour.get(domain, 0)
        if already + extra > limits.per_domain_hour:
            return StepOutcome(
                "rate_limits",
                "block",
                f"{already} recipients at {domain} in the last hour, {extra} more "
                f"(limit {limits.per_domain_hour})",
                "rate_limited",
            )
    return StepOutcome("rate_limits", "pass", "within hourly, daily and per-domain limits")


def _loop_guard(f: OutboundFacts) -> StepOutcome:
    loop = f.loop
    if f.kind != "reply" or loop is None:
        return StepOutcome("loop_guard", "pass", "not a reply")
    why = loop_signal(loop)
    if why is not None:
        return StepOutcome("loop_guard", "block", f"no reply to {why} (RFC 3834)", "loop_guard")
    if loop.replies_in_window >= loop.cap:
        return StepOutcome(
            "loop_guard",
            "block",
            f"{loop.replies_in_window} replies in this thread in the last "
            f"{loop.window_minutes:g} minutes (cap {loop.cap})",
            "loop_guard",
        )
    return StepOutcome("loop_guard", "pass", "not an automatic or list message; under the cap")


def loop_signal(loop: LoopFacts) -> str | None:
    """Why a message must not be answered automatically, or None (RFC 3834 §2)."""
    auto = (loop.auto_submitted or "").split(";", 1)[0].strip().lower()
    if auto and auto != "no":
        return f"an Auto-Submitted: {auto} message"
    if loop.precedence in BULK_PRECEDENCE:
        return f"a Precedence: {loop.precedence} message"
    if loop.list_id:
        return "a mailing-list message (List-Id)"
    if loop.return_path is not None and loop.return_path.strip("<> ") == "":
        return "a message with a null sender (<>)"
    local = loop.from_address.partition("@")[0].lower()
    if local in ("mailer-daemon", "postmaster") or (
        loop.return_path is not None
        and loop.return_path.strip("<> ").partition("@")[0].lower() == "mailer-daemon"
    ):
        return "a message from MAILER-DAEMON"
    return None


def _outbound_rules(f: OutboundFacts) -> StepOutcome:
    decision = f.rule
    if decision is None or decision.rule_id is None:
        return StepOutcome("outbound_rules", "pass", "no outbound rule matched")
    named = f"rule {decision.rule_name or decision.rule_id!r}"
    if decision.action == "block":
        return StepOutcome("outbound_rules", "block", f"{named} blocks it", "rule_block")
    if decision.action == "require_approval":
        return StepOutcome(
            "outbound_rules", "hold", f"{named} requires an owner's approval", "require_approval"
        )
    return StepOutcome("outbound_rules", "pass", f"{named} allows it")


def _content(f: OutboundFacts) -> StepOutcome:
    c = f.content
    if c.size > c.max_size:
        return StepOutcome(
            "content", "block", f"{c.size} bytes exceeds the limit of {c.max_size}", "content"
        )
    risky = [
        name
        for name in c.attachment_names
        if name.rpartition(".")[2].lower() in c.blocked_extensions and "." in name
    ]
    if risky:
        return StepOutcome(
            "content",
            "quarantine",
            f"attachment types refused without review: {', '.join(risky[:5])}",
            "content",
        )
    return StepOutcome("content", "pass", f"{c.size} bytes; attachments allowed")


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].strip("[]").rstrip(".").lower()


_PIPELINE: Final[tuple[tuple[str, Callable[[OutboundFacts], StepOutcome]], ...]] = (
    ("key_scope", _key_scope),
    ("tier", _tier),
    ("suppression", _suppression),
    ("recipient_lists", _recipient_lists),
    ("rate_limits", _rate_limits),
    ("loop_guard", _loop_guard),
    ("outbound_rules", _outbound_rules),
    ("content", _content),
)
