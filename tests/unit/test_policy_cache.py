"""The compiled-policy cache: versions, invalidation, contact books and the bypass.

`PolicyCache.get` reads through a connection, so these tests run on a small SQLite
file; the same behaviour on PostgreSQL is covered by the API tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from mailgate.clock import FakeClock
from mailgate.domain import rules
from mailgate.domain.mime import ParseLimits, parse_message
from mailgate.services.policy import AgentPolicy, ContactBook, PolicyCache, bump
from mailgate.services.rules_admin import RulesService
from mailgate.services.tenancy import TenancyService
from mailgate.store import migrate
from mailgate.store.blobs import MemoryBlobStore, TieredBlobStore
from mailgate.store.db import Database
from mailgate.store.schema import rules as rules_table
from mailgate.store.schema import workspaces
from mailgate.testing import build_message

TRASH_ALL = {"action": "trash", "condition": {"all": []}}
AUTHENTICATED = rules.AuthResults(spf="pass", spf_domain="example.com", dmarc="pass")


class Ticker:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# -- contact books ----------------------------------------------------------------------


def test_an_address_contact_matches_that_address_ignoring_case() -> None:
    book = ContactBook(addresses=frozenset({"bob@example.com"}))
    assert book.lookup("Bob@EXAMPLE.com") == (True, False)
    assert book.lookup("bobby@example.com") == (False, False)
    assert book.lookup("bob@example.com.evil") == (False, False)


def test_a_domain_contact_covers_that_domain_but_not_its_subdomains() -> None:
    book = ContactBook(domains=frozenset({"example.com"}), auto_domains=frozenset({"example.com"}))
    assert book.lookup("anyone@Example.COM") == (True, True)
    assert book.lookup("anyone@example.com.") == (True, True)  # a trailing root dot
    assert book.lookup("x@mail.example.com") == (False, False)
    assert book.lookup("x@notexample.com") == (False, False)


def test_a_contact_may_be_known_without_being_auto_approved() -> None:
    book = ContactBook(
        addresses=frozenset({"bob@example.com", "amy@example.com"}),
        auto_addresses=frozenset({"amy@example.com"}),
    )
    assert book.lookup("bob@example.com") == (True, False)
    assert book.lookup("amy@example.com") == (True, True)
    assert bool(book) and not bool(ContactBook())


# -- the bypass -------------------------------------------------------------------------


def policy(*, auto: bool, bypass: bool) -> AgentPolicy:
    """A policy that trashes everything, with bob@example.com as a contact."""
    trash = rules.validate_rule({**TRASH_ALL, "id": "rul_all"})
    known = frozenset({"bob@example.com"})
    return AgentPolicy(
        workspace_id="ws_1",
        inbound=rules.CompiledRuleSet.compile([trash]),
        contacts=ContactBook(addresses=known, auto_addresses=known if auto else frozenset()),
        contacts_bypass=bypass,
        version=(0, 0),
    )


@pytest.mark.parametrize(
    ("sender", "auto", "bypass", "auth", "action"),
    [
        ("bob@example.com", True, True, AUTHENTICATED, "deliver"),  # the only bypass
        ("bob@example.com", True, True, rules.AuthResults(), "trash"),  # spoofable
        ("bob@example.com", True, False, AUTHENTICATED, "trash"),  # workspace said no
        ("bob@example.com", False, True, AUTHENTICATED, "trash"),  # known, not trusted
        ("eve@example.com", True, True, AUTHENTICATED, "trash"),  # not a contact
        (
            "bob@example.com",
            True,
            True,
            rules.AuthResults(spf="pass", spf_domain="attacker.example"),
            "trash",
        ),  # SPF passed for another domain: not aligned with From
    ],
)
def test_only_an_authenticated_auto_approved_contact_skips_the_rules_and_only_if_allowed(
    sender: str, auto: bool, bypass: bool, auth: rules.AuthResults, action: str
) -> None:
    raw = build_message(to="bot@agents.test", sender=sender)
    decision = policy(auto=auto, bypass=bypass).decide(
        parse_message(raw), raw=raw, size=len(raw), auth=auth, limits=ParseLimits()
    )
    assert decision.action == action
    assert decision.contact_bypass is (action == "deliver")


def test_a_dry_run_rule_runs_before_the_stored_ones() -> None:
    raw = build_message(to="bot@agents.test", sender="eve@example.com")
    draft = rules.validate_rule({"action": "review", "condition": {"all": []}})
    decision = (
        policy(auto=True, bypass=True)
        .with_rules([draft])
        .decide(
            parse_message(raw),
            raw=raw,
            size=len(raw),
            auth=rules.AuthResults(),
            limits=ParseLimits(),
            explain=True,
        )
    )
    assert decision.action == "review" and decision.rule_id is None
    assert [t.rule_id for t in decision.trace] == [None]


# -- the cache --------------------------------------------------------------------------


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'policy.db'}")
    migrate.upgrade(database)
    yield database
    database.dispose()


@pytest.fixture
def ticker() -> Ticker:
    return Ticker()


@pytest.fixture
def cache(ticker: Ticker) -> PolicyCache:
    return PolicyCache(ttl=5.0, clock=ticker)


@pytest.fixture
def service(db: Database, cache: PolicyCache) -> RulesService:
    blobs = TieredBlobStore(db, MemoryBlobStore(), 128 * 1024)
    return RulesService(db, FakeClock(), cache, blobs, ParseLimits())


def new_agent(db: Database, workspace: str = "acme") -> tuple[str, str]:
    tenancy = TenancyService(db, FakeClock(), "agents.test")
    ws = tenancy.create_workspace(workspace)
    agent = tenancy.create_agent(ws.workspace_id, f"bot {workspace}")
    return ws.workspace_id, agent.agent_id


def get(db: Database, cache: PolicyCache, agent_id: str) -> AgentPolicy:
    with db.read() as conn:
        return cache.get(conn, agent_id)


def test_a_cached_policy_is_reused_until_its_ttl_passes(
    db: Database, cache: PolicyCache, ticker: Ticker
) -> None:
    _, agent_id = new_agent(db)
    first = get(db, cache, agent_id)
    ticker.now += 4.9
    assert get(db, cache, agent_id) is first
    ticker.now += 0.2  # stale: the versions are re-read, but they have not moved
    again = get(db, cache, agent_id)
    assert again is first


def test_a_change_from_another_process_is_seen_once_the_ttl_passes(
    db: Database, cache: PolicyCache, ticker: Ticker
) -> None:
    ws_id, agent_id = new_agent(db)
    before = get(db, cache, agent_id)
    # What another gateway process does: write and bump, but it cannot reach our cache.
    other = PolicyCache()
    blobs = TieredBlobStore(db, MemoryBlobStore(), 128 * 1024)
    RulesService(db, FakeClock(), other, blobs, ParseLimits()).create_rule(
        ws_id, agent_id, TRASH_ALL, actor="test"
    )
    assert get(db, cache, agent_id) is before  # within the TTL
    ticker.now += 5.0
    after = get(db, cache, agent_id)
    assert after.version == (before.version[0] + 1, before.version[1])
    assert [c.rule.action for c in after.inbound.rules] == ["trash"]


def test_invalidating_an_agent_reloads_it_at_once(
    db: Database, cache: PolicyCache, service: RulesService
) -> None:
    ws_id, agent_id = new_agent(db)
    assert get(db, cache, agent_id).inbound.rules == ()
    service.create_rule(ws_id, agent_id, TRASH_ALL, actor="test")  # invalidates after commit
    assert len(get(db, cache, agent_id).inbound.rules) == 1


def test_invalidating_a_workspace_drops_its_agents_and_no_others(
    db: Database, cache: PolicyCache
) -> None:
    ws_a, agent_a = new_agent(db, "a")
    _, agent_b = new_agent(db, "b")
    a, b = get(db, cache, agent_a), get(db, cache, agent_b)
    with db.write() as conn:
        bump(conn, ws_a, None)
    cache.invalidate(workspace_id=ws_a)
    fresh_a = get(db, cache, agent_a)
    assert fresh_a is not a and fresh_a.version == (a.version[0], a.version[1] + 1)
    assert get(db, cache, agent_b) is b


def test_unchanged_versions_keep_the_compiled_rules_but_pick_up_the_bypass_setting(
    db: Database, cache: PolicyCache, ticker: Ticker, service: RulesService
) -> None:
    ws_id, agent_id = new_agent(db)
    service.create_rule(ws_id, agent_id, TRASH_ALL, actor="test")
    before = get(db, cache, agent_id)
    assert before.contacts_bypass is True
    # A bypass change that (wrongly) bumped nothing is still noticed after the TTL.
    with db.write() as conn:
        conn.execute(
            update(workspaces).where(workspaces.c.id == ws_id).values(contacts_bypass=False)
        )
    ticker.now += 5.0
    after = get(db, cache, agent_id)
    assert after.contacts_bypass is False
    assert after.inbound is before.inbound  # not recompiled
    assert replace(after, contacts_bypass=True) == before


def test_the_setting_service_bumps_the_workspace_so_every_agent_sees_it_at_once(
    db: Database, cache: PolicyCache, service: RulesService
) -> None:
    ws_id, agent_id = new_agent(db)
    before = get(db, cache, agent_id)
    service.update_settings(ws_id, contacts_bypass=False, actor="test")
    after = get(db, cache, agent_id)
    assert after.contacts_bypass is False
    assert after.version == (before.version[0], before.version[1] + 1)


def test_the_cache_loads_agent_rules_then_defaults_enabled_inbound_only(
    db: Database, cache: PolicyCache, service: RulesService
) -> None:
    ws_id, agent_id = new_agent(db)
    default = service.create_rule(ws_id, None, {**TRASH_ALL, "name": "default"}, actor="t")
    own = service.create_rule(
        ws_id, agent_id, {"action": "review", "condition": {"all": []}}, actor="t"
    )
    service.create_rule(ws_id, agent_id, {**TRASH_ALL, "enabled": False, "name": "off"}, actor="t")
    service.create_rule(
        ws_id,
        agent_id,
        {"action": "block", "direction": "outbound", "condition": {"all": []}},
        actor="t",
    )
    loaded = get(db, cache, agent_id)
    assert [c.rule.id for c in loaded.inbound.rules] == [own.rule_id, default.rule_id]


def test_contacts_of_the_agent_and_its_workspace_both_count(
    db: Database, cache: PolicyCache, service: RulesService
) -> None:
    ws_id, agent_id = new_agent(db)
    _, other_agent = new_agent(db, "other")
    service.add_contact(ws_id, agent_id, address="bob@example.com", actor="t")
    service.add_contact(ws_id, None, domain="partner.example", auto_approve=False, actor="t")
    book = get(db, cache, agent_id).contacts
    assert book.lookup("bob@example.com") == (True, True)
    assert book.lookup("x@partner.example") == (True, False)
    assert get(db, cache, other_agent).contacts.lookup("bob@example.com") == (False, False)


def test_an_unknown_agent_is_a_key_error(db: Database, cache: PolicyCache) -> None:
    with db.read() as conn, pytest.raises(KeyError):
        cache.get(conn, "agt_nope")


def test_rules_rows_are_read_back_as_the_domain_rule(
    db: Database, cache: PolicyCache, service: RulesService
) -> None:
    ws_id, agent_id = new_agent(db)
    stored = service.create_rule(
        ws_id,
        agent_id,
        {"action": "review", "condition": {"field": "Header:X-Spam", "match": "is", "value": "y"}},
        actor="t",
    )
    with db.read() as conn:
        row = conn.execute(rules_table.select()).one()
    assert row.condition == {"field": "header:x-spam", "match": "is", "value": "y"}
    assert get(db, cache, agent_id).inbound.rules[0].rule.id == stored.rule_id
    assert get(db, cache, agent_id).inbound.needs_headers


class _ChangeMidRead:
    """A connection that lets a rule change commit (and invalidate) right after the
    cache read the versions: what a concurrent owner edit looks like to ingest."""

    def __init__(self, conn: Any, change: Callable[[], None]) -> None:
        self._conn = conn
        self._change: Callable[[], None] | None = change

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        result = self._conn.execute(*args, **kwargs)
        if self._change is not None:
            change, self._change = self._change, None
            change()
        return result


def test_a_read_that_raced_an_invalidation_is_used_once_but_not_cached(
    db: Database, cache: PolicyCache, service: RulesService
) -> None:
    ws_id, agent_id = new_agent(db)

    def change() -> None:
        service.create_rule(ws_id, agent_id, TRASH_ALL, actor="test")

    with db.read() as conn:
        raced = cache.get(_ChangeMidRead(conn, change), agent_id)  # type: ignore[arg-type]
    assert raced.inbound.rules == ()  # read from before the change: fine for that call
    assert len(get(db, cache, agent_id).inbound.rules) == 1  # but never served again
