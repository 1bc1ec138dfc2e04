"""What 1,000 inbound rules cost: SMTP ingest with them against the same without.

Two fresh ``mailgate serve`` processes run side by side, started the same way as the
matrix's: one whose agent has no rules, one whose agent has ``plan.rules`` inbound
rules of which none matches the benchmark's mail. Each repeat sends the same 4 KB
messages at c=8 to both, back to back (order alternating), through the matrix's own
`run_cell` (clock stops when every ``message.received`` event was pulled), and the
figure is the median messages/s with rules over the median without. Target: ≥ 0.8.

The rules are a realistic owner's mix, not one kind, because the compiled rule set
answers different shapes on different paths (`mailgate.domain.rules`): sender and
domain block lists (hash index), subject / List-Id / body ``contains`` and subject
regexes (one RE2 set scan per field), ``all`` rules gated on one of those, and a
tail of rules only the generic evaluator can run (mixed-field ``any``, ``size`` with
``has_attachment``, ``not``). List-Id rules also make ingest decode every header of
every message, which a real rule set with one such rule does too. How many rules
landed on each path is read off the compiled set and printed with the figure.

Rules are written straight into the database before any mail arrives: one Python
process (``python -m bench.rules``, mailgate's own `Database` and schema) validates
every definition with `validate_rule`, inserts all rows in one transaction and bumps
the agent's ``policy_version`` as the rules service does. After the warm-up, the
stored decisions are checked: every message delivered to the inbox by no rule, the
rule count the decision reports equal to what was inserted (so a stale policy cache
or a rule that matches by accident fails loudly instead of flattering the figure).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import sqlite3
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.load import close_sessions, open_sessions, send_all
from bench.messages import MessageFactory, factory
from bench.procs import BenchError
from bench.runner import Cell, run_cell
from bench.targets import REPO_ROOT, Target, start_mailgate

TARGET_RATIO = 0.8
"""msgs/s with the rules / msgs/s without, at the plan's size and concurrency."""
_CHECKED = re.compile(r"\((\d+) checked\)")


@dataclass(frozen=True, slots=True)
class RulesPlan:
    """How much to send. Five short pairs rather than three long ones: the two rates
    are close, so the ratio needs more samples more than it needs longer cells
    (a cell takes 1-4 s at 300-1,000 msg/s)."""

    rules: int
    size: tuple[str, int]
    concurrency: int
    count: int
    repeats: int
    warmup: int
    cell_timeout: float


RULES_FULL = RulesPlan(
    rules=1000,
    size=("4 KB", 4 * 1024),
    concurrency=8,
    count=1000,
    repeats=5,
    warmup=100,
    cell_timeout=180.0,
)
RULES_QUICK = RulesPlan(
    rules=1000,
    size=("4 KB", 4 * 1024),
    concurrency=8,
    count=60,
    repeats=1,
    warmup=8,
    cell_timeout=60.0,
)


@dataclass
class RulesResult:
    plan: RulesPlan
    cells: list[Cell] = field(default_factory=list)
    paths: dict[str, int] = field(default_factory=dict)
    """How the compiled rule set answers the seeded rules: path -> rule count."""
    checked: int | None = None
    """Rule count the stored decisions report (None: their wording has no count)."""

    @property
    def names(self) -> tuple[str, str]:
        return "rules-0", f"rules-{self.plan.rules}"

    def median(self, target: str, metric: Callable[[Cell], float]) -> float | None:
        values = [metric(c) for c in self.cells if c.target == target]
        return statistics.median(values) if values else None

    def ratio(self) -> float | None:
        """Median msgs/s with the rules over median msgs/s without."""
        base, ruled = (self.median(name, lambda c: c.rate) for name in self.names)
        return None if base is None or ruled is None or not base else ruled / base

    def passed(self) -> bool | None:
        ratio = self.ratio()
        return None if ratio is None else ratio >= TARGET_RATIO

    def _pairs(self) -> list[tuple[Cell, Cell]]:
        """(without, with) cells of each repeat, measured back to back."""
        bare, ruled = ([c for c in self.cells if c.target == name] for name in self.names)
        return list(zip(bare, ruled, strict=False))

    def pair_ratios(self) -> list[float]:
        """The ratio within each repeat: its spread shows how noisy the machine was."""
        return [ruled.rate / bare.rate for bare, ruled in self._pairs()]

    def cpu_cost_us(self) -> float | None:
        """Median over repeats of the extra server CPU per message with the rules: the
        rules' own cost, steadier than the ratio where other processes share the cores."""
        diffs = [r.cpu_per_message_us - b.cpu_per_message_us for b, r in self._pairs()]
        return statistics.median(diffs) if diffs else None


# -- the rule mix -------------------------------------------------------------------


def _cond(name: str, match: str, value: str | int | bool) -> dict[str, Any]:
    return {"field": name, "match": match, "value": value}


def rule_definitions(count: int) -> list[dict[str, Any]]:
    """``count`` inbound rules in the JSON `validate_rule` reads, none of which matches
    `bench.messages` mail (senders at example.org/net/com, subject "Question about
    order #N", plain prose, no List-Id, no attachment, ~4 KB).

    Shares of the mix, cycled so any count keeps it: 25% sender block list, 15%
    domain block list (some as an ``any`` of two domains), 15% subject contains, 10%
    List-Id contains, 10% subject regex, 10% ``all`` of two conditions, 5% body
    contains, 10% generic (no fast path).
    """
    kinds: list[Callable[[int], tuple[str, str, dict[str, Any]]]] = [
        lambda i: ("trash", f"block sender {i}", _cond("from", "is", f"x{i}@blocked-{i}.example")),
        lambda i: ("trash", f"block sender {i}b", _cond("from", "is", f"news@blocked-{i}.example")),
        lambda i: (
            "trash",
            f"block sender {i}c",
            _cond("from", "is", f"promo+{i}@mailer.blocked.example"),
        ),
        lambda i: (
            "quarantine",
            f"impersonation {i}",
            _cond("from", "is", f"ceo-{i}@examp1e-{i}.example"),
        ),
        lambda i: (
            "trash",
            f"unwanted sender {i}",
            _cond("from", "is", f"no-reply@offers-{i}.example"),
        ),
        lambda i: ("trash", f"block domain {i}", _cond("from_domain", "is", f"spam-{i}.example")),
        lambda i: (
            "trash",
            f"block domains {i}",
            {
                "any": [
                    _cond("from_domain", "is", f"bulk-{i}.example"),
                    _cond("from_domain", "is", f"bulk-{i}.example.net"),
                ]
            },
        ),
        lambda i: (
            "quarantine",
            f"lookalike domain {i}",
            _cond("from_domain", "is", f"paypa1-{i}.example"),
        ),
        lambda i: ("review", f"promo subject {i}", _cond("subject", "contains", f"[promo {i}]")),
        lambda i: (
            "trash",
            f"offer subject {i}",
            _cond("subject", "contains", f"limited time offer {i}"),
        ),
        lambda i: (
            "review",
            f"ticket subject {i}",
            _cond("subject", "contains", f"ticket tkt-{i:05d}"),
        ),
        lambda i: (
            "trash",
            f"mailing list {i}",
            _cond("header:List-Id", "contains", f"newsletter-{i}.lists.example"),
        ),
        lambda i: (
            "trash",
            f"list {i}",
            _cond("header:List-Id", "contains", f"<announce.project-{i}.example>"),
        ),
        lambda i: (
            "review",
            f"invoice regex {i}",
            _cond("subject", "regex", rf"^(re|fwd?):\s*invoice inv-{i}-\d+$"),
        ),
        lambda i: (
            "quarantine",
            f"urgent regex {i}",
            _cond("subject", "regex", rf"\burgent\b.*\bwire transfer {i}\b"),
        ),
        lambda i: (
            "review",
            f"vendor invoices {i}",
            {
                "all": [
                    _cond("from_domain", "is", f"vendor-{i}.example"),
                    _cond("subject", "contains", "invoice"),
                ]
            },
        ),
        lambda i: (
            "trash",
            f"list from mailer {i}",
            {
                "all": [
                    _cond("header:List-Id", "contains", f"digest-{i}.example"),
                    _cond("from", "glob", f"*@mailer-{i}.example"),
                ]
            },
        ),
        lambda i: (
            "quarantine",
            f"crypto body {i}",
            _cond("body", "contains", f"crypto opportunity ref {i}"),
        ),
        lambda i: (
            "review",
            f"partner or ticket {i}",
            {
                "any": [
                    _cond("from_domain", "is", f"partner-{i}.example"),
                    _cond("subject", "contains", f"case cs-{i}"),
                ]
            },
        ),
        lambda i: (
            "quarantine",
            f"huge outsider mail {i}",
            {
                "all": [
                    _cond("size", "gt", 5_000_000 + i),
                    {"not": _cond("from_domain", "is", "example.org")},
                ]
            },
        ),
    ]
    # 20 kinds above, one rule each per round: 5/20 sender, 3/20 domain, 3/20 subject,
    # 2/20 List-Id, 2/20 regex, 2/20 all, 1/20 body, 2/20 generic.
    out: list[dict[str, Any]] = []
    for position in range(count):
        action, name, condition = kinds[position % len(kinds)](position)
        out.append(
            {
                "name": name,
                "position": position,
                "enabled": True,
                "direction": "inbound",
                "action": action,
                "condition": condition,
            }
        )
    return out


# -- seeding (runs in its own process: python -m bench.rules) ---------------------------


def seed(agent_id: str, count: int) -> dict[str, Any]:
    """Validate ``count`` rules, insert them for ``agent_id`` in one transaction and bump
    the agent's policy version; return how the compiled set answers them.

    Reads the database location from the environment (``MAILGATE_DATA_DIR``), like
    ``mailgate serve`` does. mailgate is imported here, not at the top, so that the
    benchmark process (the load generator) never loads it.
    """
    from sqlalchemy import select

    from mailgate.config import load_settings
    from mailgate.domain.rules import CompiledRuleSet, validate_rule
    from mailgate.ids import new_id
    from mailgate.services.policy import bump
    from mailgate.store.db import Database
    from mailgate.store.schema import agents
    from mailgate.store.schema import rules as rules_table

    validated = [validate_rule(d) for d in rule_definitions(count)]
    now = datetime.now(UTC)
    db = Database(load_settings().effective_database_url)
    try:
        with db.write() as conn:
            workspace_id = conn.execute(
                select(agents.c.workspace_id).where(agents.c.id == agent_id)
            ).scalar_one()
            conn.execute(
                rules_table.insert(),
                [
                    {
                        "id": new_id("rul"),
                        "workspace_id": workspace_id,
                        "agent_id": agent_id,
                        "name": rule.name,
                        "position": rule.position,
                        "enabled": rule.enabled,
                        "direction": rule.direction,
                        "action": rule.action,
                        "condition": rule.condition.as_dict(),
                        "created_at": now,
                        "updated_at": now,
                    }
                    for rule in validated
                ],
            )
            bump(conn, workspace_id, agent_id)
    finally:
        db.dispose()
    compiled = CompiledRuleSet.compile(validated)
    indexed = {p for table in compiled.index.values() for p in table.values()}
    bulk = {p for _, slots in compiled.bulk for p in slots.values()}
    return {
        "rules": len(validated),
        "paths": {
            "hash index": len(indexed),
            "RE2 set": len(bulk),
            "gated all": len(compiled.gated),
            "generic": len(compiled.generic),
        },
        "needs_headers": compiled.needs_headers,
    }


async def _seed_target(target: Target, count: int) -> dict[str, Any]:
    """Run the seeder against ``target``'s database in a subprocess.

    Raises:
        BenchError: the seeder failed.
    """
    env = dict(target.notes["env"])
    argv = [sys.executable, "-m", "bench.rules", "--agent-id", target.notes["agent_id"]]
    argv += ["--count", str(count)]
    done = await asyncio.to_thread(
        subprocess.run, argv, env=env, cwd=REPO_ROOT, capture_output=True, timeout=120
    )
    if done.returncode != 0:
        raise BenchError(f"seeding {count} rules failed: {done.stderr.decode()[-2000:]}")
    payload: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return payload


def _decisions(target: Target, limit: int) -> list[tuple[str, dict[str, Any]]]:
    """The folder and stored decision of the agent's last ``limit`` messages."""
    assert target.feed is not None
    path = target.feed.data_dir / "mailgate.db"
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as conn:
        rows = conn.execute(
            "SELECT folder, decision FROM messages WHERE agent_id = ? ORDER BY seq DESC LIMIT ?",
            (target.notes["agent_id"], limit),
        ).fetchall()
    return [(folder, json.loads(decision) if decision else {}) for folder, decision in rows]


def _check_decisions(target: Target, sent: int, rules: int) -> int | None:
    """Every warm-up message delivered to the inbox by no rule; returns the rule count
    the decisions report (None when their wording carries no count).

    Raises:
        BenchError: a message is missing, held, or matched a rule, or the decisions
            report another rule count than was seeded.
    """
    rows = _decisions(target, sent)
    if len(rows) != sent:
        raise BenchError(f"{target.name}: {len(rows)} of {sent} warm-up messages stored")
    checked: set[int | None] = set()
    for folder, decision in rows:
        if folder != "inbox" or decision.get("rule_id") or decision.get("action") != "deliver":
            raise BenchError(
                f"{target.name}: a benchmark message was not simply delivered "
                f"(folder {folder}, decision {decision}): a seeded rule matches"
            )
        found = _CHECKED.search(" ".join(decision.get("reasons", [])))
        checked.add(int(found.group(1)) if found else None)
    if rules and checked != {None} and checked != {rules}:
        raise BenchError(
            f"{target.name}: decisions report {sorted(checked, key=str)} rules checked, "
            f"{rules} were seeded (stale policy cache?)"
        )
    return next(iter(checked)) if len(checked) == 1 else None


async def _warm(
    target: Target, messages: MessageFactory, plan: RulesPlan, expected: int
) -> int | None:
    """Send the warm-up, check its decisions, then drain its events. The check comes
    before the drain because a matching rule holds mail out of the feed: that must
    fail at once, not after the drain's timeout."""
    assert target.feed is not None
    sessions = await open_sessions(target.port, 4, plan.cell_timeout)
    try:
        await send_all(sessions, messages.batch(0, plan.warmup), target.rcpt)
    finally:
        await close_sessions(sessions)
    checked = await asyncio.to_thread(_check_decisions, target, plan.warmup, expected)
    await target.feed.drain(plan.warmup, plan.cell_timeout)
    return checked


async def run_rules(
    plan: RulesPlan, workdir: Path, progress: Callable[[str], None] = lambda _: None
) -> RulesResult:
    """Start both gateways, seed the rules, warm up and check, run the repeats."""
    result = RulesResult(plan)
    bare_name, ruled_name = result.names
    targets: dict[str, Target] = {}
    try:
        progress(f"rules: starting {bare_name} and {ruled_name}")
        started = await asyncio.gather(
            start_mailgate(workdir, name=bare_name),
            start_mailgate(workdir, name=ruled_name),
            return_exceptions=True,
        )
        for outcome in started:
            if isinstance(outcome, Target):
                targets[outcome.name] = outcome
        for outcome in started:
            if isinstance(outcome, BaseException):
                raise outcome
        progress(f"rules: seeding {plan.rules} rules")
        seeded = await _seed_target(targets[ruled_name], plan.rules)
        if seeded["rules"] != plan.rules:
            raise BenchError(f"seeded {seeded['rules']} rules, not {plan.rules}")
        result.paths = dict(seeded["paths"])
        label, size = plan.size
        factories = {
            name: factory(label, size, target.rcpt, seed=0) for name, target in targets.items()
        }
        for name, expected in ((bare_name, 0), (ruled_name, plan.rules)):
            progress(f"rules: warming up {name}")
            checked = await _warm(targets[name], factories[name], plan, expected)
            if expected:
                result.checked = checked
        seq = plan.warmup
        for repeat in range(plan.repeats):
            order = (bare_name, ruled_name) if repeat % 2 == 0 else (ruled_name, bare_name)
            for name in order:
                progress(
                    f"rules run {repeat + 1}/{plan.repeats}: {label} c={plan.concurrency} "
                    f"{name} ({plan.count} msgs)"
                )
                cell = await run_cell(
                    targets[name],
                    factories[name],
                    plan.concurrency,
                    plan.count,
                    seq,
                    plan.cell_timeout,
                )
                result.cells.append(cell)
            seq += plan.count
    finally:
        for target in targets.values():
            await target.close()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.rules", description=__doc__)
    parser.add_argument("--agent-id", required=True)
    parser.add_argument("--count", type=int, default=RULES_FULL.rules)
    args = parser.parse_args(argv)
    if "MAILGATE_DATA_DIR" not in os.environ:
        raise SystemExit("MAILGATE_DATA_DIR must name the gateway's data dir")
    print(json.dumps(seed(args.agent_id, args.count)))


if __name__ == "__main__":
    main()
