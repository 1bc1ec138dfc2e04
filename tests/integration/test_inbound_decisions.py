"""Ingest applies each agent's rules and contacts, on SQLite and PostgreSQL.

Rules and contacts are stored through the owners' service (`runtime.rules`); these
tests pin what *ingest* does with them: the folder, the stored decision, the events,
the audit row, and the provider receipts that answer webhook retries.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import func, select

from mailgate.domain import rules
from mailgate.errors import InvalidSignature
from mailgate.runtime import Runtime
from mailgate.services.events import (
    MESSAGE_HELD,
    MESSAGE_QUARANTINED,
    MESSAGE_RECEIVED,
    MESSAGE_TRASHED,
)
from mailgate.services.ingest import Envelope, Receipt, SenderAuth, Stored
from mailgate.store.schema import audit_log, events, messages
from mailgate.testing import build_message
from tests.conftest import AgentHandle, make_agent

ENVELOPE = Envelope(mail_from="bob@example.com", client_address="192.0.2.7", helo="mx.example")
AUTHENTICATED = SenderAuth(
    facts=rules.AuthResults(spf="pass", spf_domain="example.com", dmarc="pass"),
    record={"spf": "pass", "dmarc": "pass", "source": "test"},
)
SPOOFED = SenderAuth(
    facts=rules.AuthResults(spf="fail", spf_domain="attacker.example", dmarc="fail"),
    record={"spf": "fail", "dmarc": "fail", "source": "test"},
)


def add_rule(
    runtime: Runtime, agent: AgentHandle, data: dict[str, Any], *, default: bool = False
) -> str:
    """Store a rule through the owners' service (validated, versioned, audited)."""
    agent_id = None if default else agent.agent_id
    return runtime.rules.create_rule(agent.workspace_id, agent_id, data, actor="test").rule_id


def add_contact(
    runtime: Runtime, agent: AgentHandle, value: str, *, auto_approve: bool = True
) -> None:
    kind = {"address": value} if "@" in value else {"domain": value}
    runtime.rules.add_contact(
        agent.workspace_id, agent.agent_id, **kind, auto_approve=auto_approve, actor="test"
    )


def deliver(
    runtime: Runtime, agent: AgentHandle, envelope: Envelope = ENVELOPE, **message: Any
) -> Stored:
    raw = message.pop("raw", None) or build_message(to=agent.address, **message)
    recipient = runtime.tenancy.resolve_recipient(agent.address)
    assert recipient is not None
    return runtime.ingest.ingest(raw, envelope, [recipient])[0]


def row(runtime: Runtime, message_id: str) -> Any:
    with runtime.db.read() as conn:
        return conn.execute(select(messages).where(messages.c.id == message_id)).one()


def events_of(runtime: Runtime, message_id: str) -> list[tuple[str, str | None]]:
    with runtime.db.read() as conn:
        found = conn.execute(select(events.c.type, events.c.agent_id, events.c.payload)).all()
    return [(e.type, e.agent_id) for e in found if e.payload.get("message_id") == message_id]


HOLD_INVOICES = {
    "name": "hold invoices",
    "action": "review",
    "condition": {"field": "subject", "match": "contains", "value": "invoice"},
}


def test_mail_no_rule_matches_is_delivered_and_announced_to_the_agent(
    runtime: Runtime, agent: AgentHandle
) -> None:
    add_rule(runtime, agent, HOLD_INVOICES)
    stored = deliver(runtime, agent, subject="lunch?")
    message = row(runtime, stored.message_id)
    assert (message.folder, message.visible_at is not None) == ("inbox", True)
    assert message.decision["action"] == "deliver"
    assert message.decision["rule_id"] is None
    assert events_of(runtime, stored.message_id) == [(MESSAGE_RECEIVED, agent.agent_id)]


def test_a_review_rule_holds_mail_and_only_owners_hear_of_it(
    runtime: Runtime, agent: AgentHandle
) -> None:
    rule_id = add_rule(runtime, agent, HOLD_INVOICES)
    stored = deliver(runtime, agent, subject="Your INVOICE is overdue")
    message = row(runtime, stored.message_id)
    assert message.folder == "review"
    assert message.visible_at is None  # the agent has not seen it
    assert message.decision["rule_id"] == rule_id
    assert message.decision["action"] == "review"
    assert any("hold invoices" in reason for reason in message.decision["reasons"])
    # workspace-scoped (agent_id NULL): the agent's consumer never leases it
    assert events_of(runtime, stored.message_id) == [(MESSAGE_HELD, None)]


@pytest.mark.parametrize(
    ("action", "folder", "event", "previous"),
    [
        ("quarantine", "quarantine", MESSAGE_QUARANTINED, None),
        ("trash", "trash", MESSAGE_TRASHED, "inbox"),
        ("deliver", "inbox", MESSAGE_RECEIVED, None),
    ],
)
def test_each_inbound_action_files_the_message_in_its_folder(
    runtime: Runtime, agent: AgentHandle, action: str, folder: str, event: str, previous: str | None
) -> None:
    add_rule(
        runtime,
        agent,
        {"action": action, "condition": {"field": "from_domain", "match": "is", "value": "x.test"}},
    )
    stored = deliver(runtime, agent, sender="Zed <zed@X.TEST>")
    message = row(runtime, stored.message_id)
    assert (message.folder, message.previous_folder) == (folder, previous)
    assert [type_ for type_, _ in events_of(runtime, stored.message_id)] == [event]


def test_the_first_matching_rule_wins_and_agent_rules_run_before_workspace_defaults(
    runtime: Runtime, agent: AgentHandle
) -> None:
    any_mail = {"all": []}
    default_id = add_rule(
        runtime, agent, {"action": "quarantine", "condition": any_mail}, default=True
    )
    first = add_rule(
        runtime,
        agent,
        {
            "action": "trash",
            "condition": {"field": "subject", "match": "is", "value": "a"},
        },
    )
    second = add_rule(
        runtime,
        agent,
        {
            "action": "review",
            "position": 0,
            "condition": {"field": "subject", "match": "glob", "value": "a*"},
        },
    )
    assert (
        row(runtime, deliver(runtime, agent, subject="a").message_id).decision["rule_id"] == second
    )
    assert (
        row(runtime, deliver(runtime, agent, subject="b").message_id).decision["rule_id"]
        == default_id
    )
    assert first != second


def test_rules_can_test_any_header(runtime: Runtime, agent: AgentHandle) -> None:
    add_rule(
        runtime,
        agent,
        {
            "action": "trash",
            "condition": {"field": "header:X-Spam-Flag", "match": "is", "value": "yes"},
        },
    )
    raw = build_message(to=agent.address).replace(b"Subject:", b"X-Spam-Flag: YES\r\nSubject:", 1)
    assert row(runtime, deliver(runtime, agent, raw=raw).message_id).folder == "trash"
    assert row(runtime, deliver(runtime, agent).message_id).folder == "inbox"


def test_every_decision_is_in_the_audit_log(runtime: Runtime, agent: AgentHandle) -> None:
    add_rule(runtime, agent, HOLD_INVOICES)
    held = deliver(runtime, agent, subject="invoice 7")
    with runtime.db.read() as conn:
        entry = conn.execute(
            select(audit_log).where(audit_log.c.target_id == held.message_id)
        ).one()
    assert (entry.actor, entry.action, entry.workspace_id) == (
        "system",
        "inbound.decided",
        agent.workspace_id,
    )
    assert entry.detail["folder"] == "review"
    assert entry.detail["action"] == "review"


def test_an_authenticated_known_contact_skips_the_rules(
    runtime: Runtime, agent: AgentHandle
) -> None:
    add_rule(runtime, agent, {"action": "review", "condition": {"all": []}})
    add_contact(runtime, agent, "example.com")
    envelope = Envelope("bob@example.com", auth=AUTHENTICATED)
    message = row(runtime, deliver(runtime, agent, envelope, sender="bob@example.com").message_id)
    assert message.folder == "inbox"
    assert message.decision["contact_bypass"] is True
    assert message.auth_results["dmarc"] == "pass"


def test_a_spoofed_known_contact_goes_through_the_rules(
    runtime: Runtime, agent: AgentHandle
) -> None:
    add_rule(runtime, agent, {"action": "review", "condition": {"all": []}})
    add_contact(runtime, agent, "bob@example.com")
    for auth in (SPOOFED, None):  # failed checks, or no checks at all
        envelope = Envelope("x@attacker.example", auth=auth)
        stored = deliver(runtime, agent, envelope, sender="Bob <bob@example.com>")
        message = row(runtime, stored.message_id)
        assert message.folder == "review"
        assert message.decision["contact_bypass"] is False
        assert "not authenticated" in message.decision["reasons"][0]


def test_the_contact_bypass_can_be_turned_off_per_workspace_or_per_contact(
    runtime: Runtime, agent: AgentHandle
) -> None:
    add_rule(runtime, agent, {"action": "review", "condition": {"all": []}})
    add_contact(runtime, agent, "example.com", auto_approve=False)
    envelope = Envelope("bob@example.com", auth=AUTHENTICATED)
    assert row(runtime, deliver(runtime, agent, envelope).message_id).folder == "review"

    other = make_agent(runtime, name="second", workspace="initech")
    add_rule(runtime, other, {"action": "review", "condition": {"all": []}})
    add_contact(runtime, other, "example.com")
    runtime.rules.update_settings(other.workspace_id, contacts_bypass=False, actor="test")
    assert row(runtime, deliver(runtime, other, envelope).message_id).folder == "review"


def test_a_rule_change_applies_to_the_very_next_message(
    runtime: Runtime, agent: AgentHandle
) -> None:
    assert row(runtime, deliver(runtime, agent, subject="invoice").message_id).folder == "inbox"
    add_rule(runtime, agent, HOLD_INVOICES)
    assert row(runtime, deliver(runtime, agent, subject="invoice").message_id).folder == "review"


# -- provider receipts -----------------------------------------------------------------


def test_a_provider_retry_is_answered_from_its_receipt(
    runtime: Runtime, agent: AgentHandle
) -> None:
    raw = build_message(to=agent.address)
    envelope = Envelope(
        "bob@example.com", source="webhook:postmark", receipt=Receipt("postmark", "pm-1")
    )
    first = deliver(runtime, agent, envelope, raw=raw)
    again = deliver(runtime, agent, envelope, raw=raw)
    assert (first.duplicate, again.duplicate) == (False, True)
    assert again.message_id == first.message_id
    # a lenient receipt acknowledges a changed body too: the provider's id is the identity
    changed = deliver(runtime, agent, envelope, raw=build_message(to=agent.address))
    assert changed.message_id == first.message_id


def test_a_strict_token_replayed_with_another_body_is_refused(
    runtime: Runtime, agent: AgentHandle
) -> None:
    envelope = Envelope("bob@example.com", receipt=Receipt("mailgun", "tok-1", strict=True))
    raw = build_message(to=agent.address)
    first = deliver(runtime, agent, envelope, raw=raw)
    assert deliver(runtime, agent, envelope, raw=raw).message_id == first.message_id
    with pytest.raises(InvalidSignature) as caught:
        deliver(runtime, agent, envelope, raw=build_message(to=agent.address, subject="forged"))
    assert caught.value.extra["reason"] == "replayed_token"
    with runtime.db.read() as conn:
        assert conn.execute(select(func.count()).select_from(messages)).scalar() == 1


def test_five_concurrent_posts_of_one_provider_event_store_one_message(
    runtime: Runtime, agent: AgentHandle
) -> None:
    raw = build_message(to=agent.address)
    envelope = Envelope("bob@example.com", receipt=Receipt("mailgun", "tok-5", strict=True))
    recipient = runtime.tenancy.resolve_recipient(agent.address)
    assert recipient is not None
    results: list[Stored] = []
    barrier = threading.Barrier(5)

    def post() -> None:
        barrier.wait()
        results.extend(runtime.ingest.ingest(raw, envelope, [recipient]))

    threads = [threading.Thread(target=post) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(results) == 5
    assert len({r.message_id for r in results}) == 1
    assert sum(not r.duplicate for r in results) == 1
    with runtime.db.read() as conn:
        assert conn.execute(select(func.count()).select_from(messages)).scalar() == 1
